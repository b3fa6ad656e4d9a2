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
           getent hosts db > /data/getent.new; mv /data/getent.new /data/getent; \
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
    // Baked beforehand (the Debian base is imported once), so `up` serves within its
    // deadline; its own bake is then the cache's.
    support::succeed(
        support::graven(&home)
            .args(["bake", "--file"])
            .arg(dir.join("Containerfile"))
            .arg(&dir),
    );
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
