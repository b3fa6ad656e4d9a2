//! An instance's own `/etc/resolv.conf` and `/etc/hosts`, for an instance with a network of
//! its own: written in its directory when it starts and bound read-only over the image's
//! (the sandbox resolves both mount points inside the root and makes them where the image
//! has none). The host's files would be wrong there: its loopback resolver is not the
//! instance's loopback, and its hosts name the host.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::runtime::InstanceDns;
use crate::sandbox::Bind;

/// Where the host's resolvers are read from: the usual file, and systemd-resolved's list of
/// its upstream servers for a host whose usual file names only its loopback stub (as Docker
/// does).
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// The resolv.conf of an instance: graven's server first, with the search domain of its app
/// and environment, then the host's nameservers (those the instance can reach: not on
/// loopback) for every other name, which graven refuses.
pub fn resolv_conf(dns: Option<&InstanceDns>, host: &str) -> String {
    let mut out = String::from("# Written by graven for this instance.\n");
    let mut search: Vec<&str> = Vec::new();
    if let Some(dns) = dns {
        out += &format!("nameserver {}\n", dns.nameserver);
        search.push(&dns.search);
    }
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok())
                    && !ip.is_loopback()
                    && dns.is_none_or(|d| ip != IpAddr::V4(d.nameserver))
                {
                    out += &format!("nameserver {ip}\n");
                }
            }
            Some("search" | "domain") => search.extend(words),
            _ => {}
        }
    }
    if !search.is_empty() {
        out += &format!("search {}\n", search.join(" "));
    }
    // A daemon being restarted should not cost each lookup the default five seconds before
    // the next server is asked.
    out += "options timeout:2 attempts:2\n";
    out
}

/// The hosts file of an instance: loopback, and its own name at its own address.
pub fn hosts(ip: Ipv4Addr, hostname: &str) -> String {
    format!(
        "# Written by graven for this instance.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         {ip}\t{hostname}\n"
    )
}

/// The host's resolvers as an instance may use them.
fn host_resolv_conf() -> String {
    let usual = std::fs::read_to_string(HOST_RESOLV_CONF).unwrap_or_default();
    let only_loopback = !usual.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("nameserver")
            && words
                .next()
                .and_then(|w| w.parse::<IpAddr>().ok())
                .is_some_and(|ip| !ip.is_loopback())
    });
    if only_loopback && let Ok(upstreams) = std::fs::read_to_string(RESOLVED_UPSTREAMS) {
        return upstreams;
    }
    usual
}

/// Writes the instance's two files in `dir` and returns their binds, each only where the
/// image can take it: `/etc/X` missing (the sandbox makes it) or a regular file, resolved
/// inside `root`. An image whose `/etc/resolv.conf` is a symlink to a file it lacks (a
/// resolver's runtime file) keeps its own.
pub fn binds(
    dir: &Path,
    root: &Path,
    ip: Ipv4Addr,
    hostname: &str,
    dns: Option<&InstanceDns>,
) -> std::io::Result<Vec<Bind>> {
    let files = [
        ("resolv.conf", resolv_conf(dns, &host_resolv_conf())),
        ("hosts", hosts(ip, hostname)),
    ];
    let mut binds = Vec::new();
    for (name, content) in files {
        let target = format!("/etc/{name}");
        if !mount_point_usable(root, &target) {
            continue;
        }
        let source = dir.join(name);
        // Readable by the workload's user, whoever that is; written once, before it runs.
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&source)?;
        std::io::Write::write_all(&mut file, content.as_bytes())?;
        binds.push(Bind {
            source,
            target,
            readonly: true,
        });
    }
    Ok(binds)
}

/// Whether `path` in the image is missing without being a symlink, or resolves, inside the
/// root, to a regular file.
fn mount_point_usable(root: &Path, path: &str) -> bool {
    use rustix::fs::{FileType, OFlags};
    let Ok(root_fd) = crate::sandbox::root::open_root(root) else {
        return false;
    };
    match crate::sandbox::root::open_in(&root_fd, path, OFlags::PATH) {
        Ok(fd) => rustix::fs::fstat(&fd)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            crate::sandbox::root::open_in(&root_fd, path, OFlags::PATH | OFlags::NOFOLLOW).is_err()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    const HOST: &str = "# from the DHCP client\n\
        search corp.example\n\
        nameserver 127.0.0.53\n\
        nameserver 192.0.2.53\n\
        nameserver 2001:db8::53\n\
        options edns0\n";

    #[test]
    fn resolv_conf_names_graven_first_then_the_hosts_reachable_servers() {
        let dns = InstanceDns {
            nameserver: Ipv4Addr::new(10, 213, 0, 7),
            search: "production.hello.graven".to_owned(),
        };
        expect![[r#"
            # Written by graven for this instance.
            nameserver 10.213.0.7
            nameserver 192.0.2.53
            nameserver 2001:db8::53
            search production.hello.graven corp.example
            options timeout:2 attempts:2
        "#]]
        .assert_eq(&resolv_conf(Some(&dns), HOST));
        // Without graven's server: the host's, still without its loopback stub.
        expect![[r#"
            # Written by graven for this instance.
            nameserver 192.0.2.53
            nameserver 2001:db8::53
            search corp.example
            options timeout:2 attempts:2
        "#]]
        .assert_eq(&resolv_conf(None, HOST));
    }

    #[test]
    fn hosts_names_loopback_and_the_instance() {
        expect![[r#"
            # Written by graven for this instance.
            127.0.0.1	localhost
            ::1	localhost ip6-localhost ip6-loopback
            10.213.0.11	4f2a9c1d0e7b
        "#]]
        .assert_eq(&hosts(Ipv4Addr::new(10, 213, 0, 11), "4f2a9c1d0e7b"));
    }

    #[test]
    fn a_dangling_resolv_conf_symlink_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            root.path().join("etc/resolv.conf"),
        )
        .unwrap();
        std::fs::write(root.path().join("etc/hosts"), "").unwrap();
        assert!(!mount_point_usable(root.path(), "/etc/resolv.conf"));
        assert!(mount_point_usable(root.path(), "/etc/hosts"));
        // Missing, even with /etc: the sandbox makes it.
        let empty = tempfile::tempdir().unwrap();
        assert!(mount_point_usable(empty.path(), "/etc/hosts"));
        // A symlink out of the root is resolved inside it, to the image's own file.
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("etc/escape")).unwrap();
        std::fs::write(root.path().join("etc/hostname"), "").unwrap();
        assert!(mount_point_usable(root.path(), "/etc/escape"));
    }
}
