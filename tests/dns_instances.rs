//! Names resolved inside instances with networks of their own: a service reaches another by
//! its short name (its generated resolv.conf names graven's server on the bridge and the
//! search domain of its app and environment) and connects to it, through the route; and the
//! instances' own records follow their health.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::daemon::{RemoveInstancesOnDrop, Up, free_port};

/// `shop`: `db` (the example's HTTP server, routed on loopback only) and `web`, a Debian
/// shell that, every half second, looks `db` up and asks it for `/` through the name, and
/// writes what it saw and its resolv.conf and hosts into its volume. `web` is healthy while
/// the volume has no `sick` file.
fn write_project(dir: &Path, db_route: SocketAddr) {
    write_project_with(dir, db_route, "", "");
}

/// `write_project`, with `web_keys` added to web's table and `lookup` run by web in its loop
/// (after looking `db` up).
fn write_project_with(dir: &Path, db_route: SocketAddr, web_keys: &str, lookup: &str) {
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::copy(support::hello_binary(), dir.join("dist/hello")).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        format!(
            "FROM docker-archive:{}\nCOPY dist/hello /hello\n",
            support::debian_base().display()
        ),
    )
    .unwrap();
    let port = db_route.port();
    let script = format!(
        "cat /etc/resolv.conf > /data/resolv.conf; cat /etc/hosts > /data/hosts; \
         while :; do \
           getent hosts db > /data/getent.new; mv /data/getent.new /data/getent; {lookup} \
           (exec 3<>/dev/tcp/db/{port} && printf 'GET / HTTP/1.0\\r\\nHost: db\\r\\n\\r\\n' >&3 && cat <&3) > /data/http.new 2>&1; \
           mv /data/http.new /data/http; sleep 0.5; \
         done"
    );
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "shop"

[services.db]
port = 8080
route = "{db_route}"
command = ["/hello"]
env = {{ VERSION = "db-v1" }}
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ health_deadline = "60s" }}
stop_grace = "1s"

[services.web]
port = 8080
{web_keys}
command = ["/bin/bash", "-c", "{script}"]
volumes = {{ webdata = "/data" }}
health = {{ kind = "exec", command = ["/usr/bin/test", "!", "-e", "/data/sick"], interval = "200ms", timeout = "2s", healthy_after = 1, unhealthy_after = 1 }}
deploy = {{ health_deadline = "60s" }}
stop_grace = "1s"

[dns]
listen = ["127.0.0.1:0"]
"#
        ),
    )
    .unwrap();
}

fn dns_address(up: &mut Up) -> SocketAddr {
    up.wait_for_line("dns listening on 127.0.0.1:", Duration::from_secs(10));
    let stderr = up.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("dns listening on 127.0.0.1:"))
        .unwrap()
        .to_owned();
    line.split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

fn dig_short(server: SocketAddr, name: &str) -> Vec<String> {
    let output = Command::new("dig")
        .args([
            format!("@{}", server.ip()),
            "-p".to_owned(),
            server.port().to_string(),
            "+short".to_owned(),
            "+time=2".to_owned(),
            name.to_owned(),
            "A".to_owned(),
        ])
        .output()
        .expect("dig runs (Debian's bind9-dnsutils)");
    assert!(output.status.success(), "{output:?}");
    let mut lines: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_service_reaches_another_by_its_short_name_inside_its_network() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let db_route = free_port();
    write_project(&dir, db_route);
    bake_beforehand(&mut support::graven(&home), &dir);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let mut up = Up::start(&home, &dir, "local");
    let server = dns_address(&mut up);
    let bridge = graven::runtime::local::net::daemon_address_of(&home)
        .expect("the daemon's address on the bridge is kept in its home");
    let data = home.join("volumes/webdata");

    // Inside `web`: `db` alone is db.local.shop.graven, the daemon's bridge address, where
    // the loopback route is forwarded; the request through the name reaches db.
    let getent = support::wait_for(Duration::from_secs(30), "web resolving db", || {
        std::fs::read_to_string(data.join("getent"))
            .ok()
            .filter(|t| !t.is_empty())
    });
    assert_eq!(
        getent.split_whitespace().collect::<Vec<_>>(),
        [bridge.to_string().as_str(), "db.local.shop.graven"],
        "{getent}"
    );
    let http = support::wait_for(Duration::from_secs(30), "web reaching db by name", || {
        std::fs::read_to_string(data.join("http"))
            .ok()
            .filter(|t| t.contains("200 OK"))
    });
    assert!(http.contains("hello from hello db-v1"), "{http}");
    let resolv = std::fs::read_to_string(data.join("resolv.conf")).unwrap();
    assert!(
        resolv.starts_with(&format!(
            "# Written by graven for this instance.\nnameserver {bridge}\n"
        )),
        "{resolv}"
    );
    assert!(resolv.contains("search local.shop.graven"), "{resolv}");
    let hosts = std::fs::read_to_string(data.join("hosts")).unwrap();
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");

    // From the host: db's route as it listens, and web's instance at its own address, which
    // its hosts file names too.
    assert_eq!(dig_short(server, "db.local.shop.graven."), ["127.0.0.1"]);
    // (The zone follows the controllers' snapshots, looked at every 100 ms.)
    let instances = support::wait_for(Duration::from_secs(10), "web's instance named", || {
        let instances = dig_short(server, "instances.web.local.shop.graven.");
        (instances.len() == 1).then_some(instances)
    });
    assert!(hosts.contains(&format!("{}\t", instances[0])), "{hosts}");

    // web turns unhealthy: its instance leaves the name within a health interval or so.
    std::fs::write(data.join("sick"), "").unwrap();
    support::wait_for(
        Duration::from_secs(10),
        "web's instance gone from its name",
        || {
            dig_short(server, "instances.web.local.shop.graven.")
                .is_empty()
                .then_some(())
        },
    );
    drop(up);
    // Its address is off the bridge again.
    let addresses = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let addresses = String::from_utf8(addresses.stdout).unwrap();
    assert!(!addresses.contains(&format!(" {bridge}/")), "{addresses}");
}

/// A resolver of the test's own, standing for the host's (the machine has no other): unbound
/// on port 53 of an address of its own that is not loopback's (198.18.0.0/15, added to `lo`
/// for the test and taken off again), so every kind of instance reaches it as it would the
/// host's resolver, answering `www.outside.test` from a local zone. Stopped by its PID.
struct Outside {
    child: std::process::Child,
    address: std::net::Ipv4Addr,
    /// A resolv.conf naming it alone, for `GRAVEN_RESOLV_CONF`.
    resolv_conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// What `www.outside.test` is, on the outside resolver.
const OUTSIDE_ADDRESS: &str = "192.0.2.80";

impl Outside {
    fn start() -> Outside {
        let dir = tempfile::tempdir().unwrap();
        // Readable by every user: a rootless control plane reads its resolv.conf.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let addresses = String::from_utf8(
            support::succeed(Command::new("ip").args(["-4", "-o", "addr", "show"])).stdout,
        )
        .unwrap();
        let address = std::net::Ipv4Addr::new(198, 18, fastrand::u8(..), fastrand::u8(1..255));
        assert!(!addresses.contains(&format!(" {address}/")), "{addresses}");
        support::succeed(
            Command::new("ip")
                .args(["addr", "add"])
                .arg(format!("{address}/32"))
                .args(["dev", "lo"]),
        );
        let config = dir.path().join("unbound.conf");
        std::fs::write(
            &config,
            format!(
                "server:\n  interface: {address}\n  port: 53\n  do-daemonize: no\n  chroot: \"\"\n  \
                 username: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  \
                 logfile: \"\"\n  do-ip6: no\n  access-control: 0.0.0.0/0 allow\n  \
                 local-zone: \"outside.test.\" static\n  \
                 local-data: \"www.outside.test. 60 IN A {OUTSIDE_ADDRESS}\"\n\
                 remote-control:\n  control-enable: no\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let resolv_conf = dir.path().join("resolv.conf");
        std::fs::write(&resolv_conf, format!("nameserver {address}\n")).unwrap();
        let mut command = Command::new("unbound");
        command
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: close_range is a single async-signal-safe system call. unbound keeps no
        // descriptor of the test's (a lock its runner holds, say) if it ever outlives it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::close_range(3, u32::MAX, 0);
                Ok(())
            });
        }
        // Stopped, and its address taken off, by the guard, whatever happens next.
        let outside = Outside {
            child: command.spawn().expect("unbound runs (Debian's unbound)"),
            address,
            resolv_conf,
            _dir: dir,
        };
        support::wait_for(Duration::from_secs(10), "unbound answering", || {
            let answer = Command::new("dig")
                .arg(format!("@{address}"))
                .args(["+short", "+time=1", "+tries=1", "www.outside.test.", "A"])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&answer.stdout).trim() == OUTSIDE_ADDRESS).then_some(())
        });
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["addr", "del"])
            .arg(format!("{}/32", self.address))
            .args(["dev", "lo"])
            .status();
    }
}

/// Bakes the project in `dir` with `graven` before `up` (the Debian base is imported once),
/// so `up` serves within its deadline; its own bake is then the cache's.
fn bake_beforehand(graven: &mut Command, dir: &Path) {
    support::succeed(
        graven
            .args(["bake", "--file"])
            .arg(dir.join("Containerfile"))
            .arg(dir),
    );
}

/// What web does besides: looks the outside name up, through the host's resolver.
const OUTSIDE_LOOKUP: &str =
    "getent hosts www.outside.test > /data/outside.new; mv /data/outside.new /data/outside;";

/// Waits for web's view of `db` and of the outside name and checks them: `db` alone resolved
/// to `db_address` and answering through the name, the outside name to its address.
fn check_web_reaches_db_and_outside(data: &Path, db_address: &str) {
    // What web wrote to `file` in its volume, once it holds `wanted`.
    let written = |file: &str, what: &str, wanted: &str| {
        support::wait_for(Duration::from_secs(30), what, || {
            std::fs::read_to_string(data.join(file))
                .ok()
                .filter(|t| !t.is_empty() && t.contains(wanted))
        })
    };
    let getent = written("getent", "web resolving db", "");
    assert_eq!(
        getent.split_whitespace().collect::<Vec<_>>(),
        [db_address, "db.local.shop.graven"],
        "{getent}"
    );
    let http = written("http", "web reaching db by name", "200 OK");
    assert!(http.contains("hello from hello db-v1"), "{http}");
    let outside = written("outside", "web resolving an outside name", "");
    assert_eq!(
        outside.split_whitespace().collect::<Vec<_>>(),
        [OUTSIDE_ADDRESS, "www.outside.test"],
        "{outside}"
    );
}

/// The resolv.conf graven wrote for web's instance, as it saw it: `first` the server it names
/// first, then the test's outside resolver, and web's search domain.
fn assert_resolv_conf(data: &Path, first: impl std::fmt::Display, outside: &Outside) {
    let resolv = std::fs::read_to_string(data.join("resolv.conf")).unwrap();
    assert_eq!(
        resolv,
        format!(
            "# Written by graven for this instance.\nnameserver {first}\nnameserver {}\n\
             search local.shop.graven\noptions timeout:2 attempts:2\n",
            outside.address
        )
    );
}

/// A `network = "host"` instance shares the host's loopback, where graven's server listens on
/// a port resolv.conf cannot name: its resolv.conf names port 53 of the home's own loopback
/// address instead, where the control plane (as root) answers as it does on loopback, then
/// the host's resolvers (here the test's).
#[test]
fn a_host_network_service_reaches_another_by_its_short_name() {
    let outside = Outside::start();
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let db_route = free_port();
    write_project_with(&dir, db_route, "network = \"host\"", OUTSIDE_LOOKUP);
    bake_beforehand(&mut support::graven(&home), &dir);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let mut up = Up::start_with(&home, &dir, "local", |command| {
        command.env("GRAVEN_RESOLV_CONF", &outside.resolv_conf);
    });
    let host = graven::dns::host_address(&home);
    up.wait_for_line(
        &format!("dns listening on {host}:53"),
        Duration::from_secs(10),
    );
    let data = home.join("volumes/webdata");
    check_web_reaches_db_and_outside(&data, "127.0.0.1");
    assert_resolv_conf(&data, host, &outside);
    // From the host too, at that address's port 53.
    assert_eq!(
        dig_short(SocketAddr::from((host, 53)), "db.local.shop.graven."),
        ["127.0.0.1"]
    );
}

/// A rootless instance (graven run by an unprivileged user, uid 65534) has pasta's user-mode
/// network, whose loopback is its own: pasta forwards its 127.0.0.1:53 to graven's server on
/// the host's loopback and its app's loopback routes' ports to the host's, so `db` resolves
/// to 127.0.0.1 and connects there as on the host; the host's resolver is reached through
/// pasta's outbound connections. The control plane cannot bind port 53 for host-network
/// instances without root, and says so.
#[test]
fn a_rootless_service_reaches_another_by_its_short_name() {
    use std::os::unix::process::CommandExt as _;
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: this test needs root only to become the unprivileged user");
        return;
    }
    // Else instances share the host's network, and nothing here is what it tests.
    let tun = std::fs::metadata("/dev/net/tun").unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&tun.permissions()) & 0o006,
        0o006,
        "pasta opens /dev/net/tun as the user: scripts/test makes it 0666, as udev does"
    );
    let outside = Outside::start();
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let db_route = free_port();
    write_project_with(&dir, db_route, "", OUTSIDE_LOOKUP);
    std::fs::create_dir(&home).unwrap();
    support::succeed(
        Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(temp.path()),
    );
    let as_user = |command: &mut Command| {
        command.uid(65534).gid(65534).current_dir("/");
    };
    let mut bake = support::graven(&home);
    as_user(&mut bake);
    bake_beforehand(&mut bake, &dir);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let mut up = Up::start_with(&home, &dir, "local", |command| {
        as_user(command);
        command.env("GRAVEN_RESOLV_CONF", &outside.resolv_conf);
    });
    let server = dns_address(&mut up);
    let data = home.join("volumes/webdata");
    check_web_reaches_db_and_outside(&data, "127.0.0.1");
    assert_resolv_conf(&data, "127.0.0.1", &outside);
    let host = graven::dns::host_address(&home);
    let stderr = up.stderr();
    assert!(
        stderr.contains(&format!(
            "instances with network = \"host\" cannot reach graven's DNS server at {host}:53"
        )),
        "{stderr}"
    );
    assert_eq!(dig_short(server, "db.local.shop.graven."), ["127.0.0.1"]);
}
