//! An instance's own `/etc/resolv.conf` and `/etc/hosts`: written in its directory when it
//! starts and bound read-only over the image's (the sandbox resolves both mount points inside
//! the root and makes them where the image has none). The host's files would be wrong there:
//! its loopback resolver is not the instance's loopback, and its hosts name the host. An
//! instance on the host's network or a user-mode one gets a resolv.conf only where graven's
//! server is reached from it, and keeps the image's hosts.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::runtime::InstanceDns;
use crate::sandbox::Bind;

/// Where the host's resolvers are read from: the usual file (`GRAVEN_RESOLV_CONF` names
/// another, as kubelet's `--resolv-conf` does), and systemd-resolved's list of its upstream
/// servers for a host whose usual file names only its loopback stub (as Docker does), for
/// instances that do not reach the host's loopback.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
pub const RESOLV_CONF_ENV: &str = "GRAVEN_RESOLV_CONF";
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// Which of the host's resolvers an instance's network reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A network of its own, or a user-mode one: those off the host's loopback (through the
    /// bridge, or pasta's outbound connections); none on it.
    OffLoopback,
    /// The host's network: all of them.
    All,
}

/// The resolv.conf of an instance: graven's server (`server`) first, with the search domain
/// of its app and environment, then the host's nameservers the instance can reach for every
/// other name, which graven refuses.
pub fn resolv_conf(server: Option<(IpAddr, &str)>, reach: Reach, host: &str) -> String {
    let mut out = String::from("# Written by graven for this instance.\n");
    let mut search: Vec<&str> = Vec::new();
    if let Some((ip, domain)) = server {
        out += &format!("nameserver {ip}\n");
        search.push(domain);
    }
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok())
                    && (reach == Reach::All || !ip.is_loopback())
                    && server.is_none_or(|(graven, _)| graven != ip)
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

/// The host's resolv.conf as graven reads it: `GRAVEN_RESOLV_CONF`, else the usual file.
pub fn host_file() -> String {
    let path = std::env::var_os(RESOLV_CONF_ENV).unwrap_or_else(|| HOST_RESOLV_CONF.into());
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The host's resolvers as an instance off its loopback may use them: the host's file, or
/// resolved's upstreams where that names only loopback.
fn host_resolv_conf() -> String {
    let usual = host_file();
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

/// An instance's network, as its names depend on it.
#[derive(Debug, Clone, Copy)]
pub enum Network {
    /// Its own, at this address on the bridge.
    Own(Ipv4Addr),
    Host,
    User,
}

/// The instance's files by its network: with a network of its own both, naming graven's
/// server on the bridge if it has one there; otherwise a resolv.conf where graven's server is
/// reached (`network = "host"`: the home's loopback address; user-mode: its own 127.0.0.1,
/// which pasta forwards to the server's loopback port), and none where it is not.
pub fn files(
    dns: Option<&InstanceDns>,
    network: Network,
    hostname: &str,
) -> Vec<(&'static str, String)> {
    let server = |ip: Option<Ipv4Addr>| Some((IpAddr::V4(ip?), dns?.search.as_str()));
    match network {
        Network::Own(ip) => vec![
            (
                "resolv.conf",
                resolv_conf(
                    server(dns.and_then(|d| d.nameserver)),
                    Reach::OffLoopback,
                    &host_resolv_conf(),
                ),
            ),
            ("hosts", hosts(ip, hostname)),
        ],
        Network::Host => match server(dns.and_then(|d| d.host)) {
            Some(server) => vec![(
                "resolv.conf",
                resolv_conf(Some(server), Reach::All, &host_file()),
            )],
            None => Vec::new(),
        },
        Network::User => {
            let loopback = dns
                .and_then(|d| d.loopback_port)
                .map(|_| Ipv4Addr::LOCALHOST);
            match server(loopback) {
                Some(server) => vec![(
                    "resolv.conf",
                    resolv_conf(Some(server), Reach::OffLoopback, &host_resolv_conf()),
                )],
                None => Vec::new(),
            }
        }
    }
}

/// Writes `files` in `dir` and returns their binds over `/etc/NAME`, each only where the
/// image can take it: `/etc/NAME` missing (the sandbox makes it) or a regular file, resolved
/// inside `root`. An image whose `/etc/resolv.conf` is a symlink to a file it lacks (a
/// resolver's runtime file) keeps its own.
pub fn binds(
    dir: &Path,
    root: &Path,
    files: Vec<(&'static str, String)>,
) -> std::io::Result<Vec<Bind>> {
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
        let graven = Some((
            IpAddr::V4(Ipv4Addr::new(10, 213, 0, 7)),
            "production.hello.graven",
        ));
        expect![[r#"
            # Written by graven for this instance.
            nameserver 10.213.0.7
            nameserver 192.0.2.53
            nameserver 2001:db8::53
            search production.hello.graven corp.example
            options timeout:2 attempts:2
        "#]]
        .assert_eq(&resolv_conf(graven, Reach::OffLoopback, HOST));
        // Without graven's server: the host's, still without its loopback stub.
        expect![[r#"
            # Written by graven for this instance.
            nameserver 192.0.2.53
            nameserver 2001:db8::53
            search corp.example
            options timeout:2 attempts:2
        "#]]
        .assert_eq(&resolv_conf(None, Reach::OffLoopback, HOST));
        // On the host's network: graven's loopback address, and the stub is reachable.
        let host = Some((
            IpAddr::V4(Ipv4Addr::new(127, 53, 4, 9)),
            "production.hello.graven",
        ));
        expect![[r#"
            # Written by graven for this instance.
            nameserver 127.53.4.9
            nameserver 127.0.0.53
            nameserver 192.0.2.53
            nameserver 2001:db8::53
            search production.hello.graven corp.example
            options timeout:2 attempts:2
        "#]]
        .assert_eq(&resolv_conf(host, Reach::All, HOST));
        // User-mode: its own loopback (forwarded to graven's by pasta); the host's loopback,
        // 127.0.0.1 included, is not its own.
        let user = Some((IpAddr::V4(Ipv4Addr::LOCALHOST), "production.hello.graven"));
        expect![[r#"
            # Written by graven for this instance.
            nameserver 127.0.0.1
            nameserver 192.0.2.53
            search production.hello.graven
            options timeout:2 attempts:2
        "#]]
        .assert_eq(&resolv_conf(
            user,
            Reach::OffLoopback,
            "nameserver 127.0.0.1\nnameserver 192.0.2.53\n",
        ));
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
