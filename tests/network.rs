//! A network of its own for each instance, through the real binary: own address at the
//! image's port, loopback isolation (with `--network host` as the negative control),
//! outbound on and off, addresses that stay put, nothing left after removal.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use graven::store::RuntimeConfig;
use support::runtime::{File, hello_image, put_image};
use support::{graven, succeed, wait_for};

/// A busybox image with no command of its own: each instance is told `/busybox APPLET ...`.
fn busybox_image(home: &Path) {
    let config = RuntimeConfig {
        cmd: Some(vec!["/busybox".to_owned(), "true".to_owned()]),
        ..RuntimeConfig::default()
    };
    put_image(
        home,
        "box:test",
        &[File::executable("busybox", support::busybox())],
        config,
    );
}

/// `graven run -d --json ARGS`: the instance's id and address.
fn start(home: &Path, args: &[&str]) -> (String, SocketAddr) {
    let out = succeed(graven(home).args(["run", "-d", "--json"]).args(args));
    let instance: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        instance["id"].as_str().unwrap().to_owned(),
        instance["address"].as_str().unwrap().parse().unwrap(),
    )
}

/// Runs `busybox ARGS` in a new instance (`graven run`, followed to its end) and says
/// whether it succeeded.
fn run_box(home: &Path, network: &[&str], args: &[&str]) -> bool {
    let status = graven(home)
        .arg("run")
        .args(network)
        .arg("box:test")
        .args(["--", "/busybox"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    status.success()
}

/// The shell line that asks `HOST:PORT` for `/` and succeeds on any HTTP answer within 2 s (busybox's
/// `nc`: its static `wget` needs a resolver a scratch image lacks).
fn ask(address: &str) -> String {
    let (host, port) = address.rsplit_once(':').unwrap();
    format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /busybox nc -w 2 {host} {port} | /busybox grep -q '^HTTP/'"
    )
}

/// Whether a new instance gets an answer from `address` (`HOST:PORT`).
fn wget(home: &Path, network: &[&str], address: &str) -> bool {
    run_box(home, network, &["sh", "-c", &ask(address)])
}

fn get(address: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200")
        .then(|| text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

/// A one-answer-per-connection HTTP server of the test's own, on `address`, stopped when
/// the test ends (its thread is the test process's).
fn serve(address: &str) -> SocketAddr {
    let listener = TcpListener::bind(address).unwrap();
    let bound = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    bound
}

fn remove(home: &Path, ids: &[&str]) {
    succeed(graven(home).args(["rm", "-f"]).args(ids));
}

fn leased(ip: &str) -> bool {
    Path::new("/run/graven/net/leases").join(ip).exists()
}

fn netns_file(ip: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(format!("graven-{}", ip.replace('.', "-")))
}

fn veth(ip: std::net::Ipv4Addr) -> std::path::PathBuf {
    Path::new("/sys/class/net").join(format!("gv{:08x}", u32::from(ip)))
}

#[test]
fn two_instances_of_one_image_answer_on_the_same_port_at_their_own_addresses() {
    let home = tempfile::tempdir().unwrap();
    hello_image(home.path());
    let (a, a_address) = start(home.path(), &["--env", "GREETING=first", "hello:test"]);
    let (b, b_address) = start(home.path(), &["--env", "GREETING=second", "hello:test"]);
    // The image's port (8080, its $PORT) for both, each at its own address.
    assert_eq!(a_address.port(), 8080);
    assert_eq!(b_address.port(), 8080);
    assert_ne!(a_address.ip(), b_address.ip());
    assert!(!a_address.ip().is_loopback());
    for (address, greeting) in [(a_address, "first"), (b_address, "second")] {
        let body = wait_for(Duration::from_secs(10), "the instance to answer", || {
            get(address, "/")
        });
        assert!(body.starts_with(greeting), "{address}: {body:?}");
    }
    remove(home.path(), &[&a, &b]);
}

#[test]
fn an_instance_reaches_neither_another_instance_s_loopback_nor_the_host_s() {
    let home = tempfile::tempdir().unwrap();
    busybox_image(home.path());
    // An instance serving on its own loopback only.
    let (server, _) = start(
        home.path(),
        &[
            "box:test",
            "--",
            "/busybox",
            "httpd",
            "-f",
            "-p",
            "127.0.0.1:9000",
            "-h",
            "/",
        ],
    );
    let own_loopback = "127.0.0.1:9000";
    // It does serve there: from inside itself (exec joins its network).
    wait_for(Duration::from_secs(10), "the server instance", || {
        let ok = graven(home.path())
            .args([
                "exec",
                &server,
                "--",
                "/busybox",
                "sh",
                "-c",
                &ask(own_loopback),
            ])
            .status()
            .unwrap()
            .success();
        ok.then_some(())
    });
    // Another instance's 127.0.0.1 is its own: nothing there.
    assert!(!wget(home.path(), &[], own_loopback));
    // A server on the host's loopback is out of reach too...
    let host = serve("127.0.0.1:0");
    let url = host.to_string();
    assert!(!wget(home.path(), &[], &url));
    // ...but not on the host's network (the negative control).
    assert!(wget(home.path(), &["--network", "host"], &url));
    remove(home.path(), &[&server]);
}

/// An address of the host's that is not loopback, on a veth pair the test makes (so the
/// test does not depend on the machine's uplink), removed when dropped.
struct HostAddress {
    link: String,
    ip: &'static str,
}

impl HostAddress {
    fn new() -> HostAddress {
        let link = format!("gvt{}", std::process::id() % 100_000);
        let peer = format!("gvu{}", std::process::id() % 100_000);
        let ip = "198.51.100.77";
        succeed(
            Command::new("ip").args(["link", "add", &link, "type", "veth", "peer", "name", &peer]),
        );
        let address = HostAddress { link, ip };
        succeed(Command::new("ip").args([
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            &address.link,
        ]));
        succeed(Command::new("ip").args(["link", "set", &address.link, "up"]));
        address
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
    }
}

/// Held by the tests that need graven's nftables table in place and by the one that deletes
/// it: run side by side, the deletion let a `--no-outbound` instance reach the host (CI).
static FIREWALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds `FIREWALL` (a test that failed while holding it leaves it usable).
fn firewall() -> std::sync::MutexGuard<'static, ()> {
    FIREWALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn outbound_false_reaches_nothing_beyond_the_bridge_while_the_default_does() {
    let _rules = firewall();
    let home = tempfile::tempdir().unwrap();
    busybox_image(home.path());
    let host = HostAddress::new();
    let outside = serve(&format!("{}:0", host.ip));
    let url = outside.to_string();
    assert!(wget(home.path(), &[], &url), "the default reaches out");
    assert!(!wget(home.path(), &["--no-outbound"], &url));
    // Nor the host's services on every address, through the bridge's own address.
    let everywhere = serve("0.0.0.0:0");
    let gateway = format!("10.213.0.1:{}", everywhere.port());
    assert!(!wget(home.path(), &["--no-outbound"], &gateway));
    assert!(!wget(home.path(), &[], &gateway));

    // A port graven opened for a listener of its own on the gateway (the app event log's) lets
    // instances reach that listener, and never a host service on 0.0.0.0 that has the port:
    // openings outlive their daemons, and hundreds of stale ones once let this test's server
    // through on a port the kernel had handed out before (CI).
    let opened = serve("10.213.0.1:0");
    graven::runtime::local::net::open_port(opened.port()).unwrap();
    assert!(wget(home.path(), &[], &opened.to_string()));
    // A port opened for a listener on the gateway, whose daemon went, taken by a service on
    // 0.0.0.0 before any reload forgot the opening; then one on `[::]`, which takes IPv4
    // connections too. A full pool first, so that no refill of this test's starts reloads
    // the rules meanwhile; another test's may, so each is tried until the rules still named
    // the port after both tries.
    for wildcard in ["0.0.0.0", "[::]"] {
        let mut exercised = false;
        for _ in 0..5 {
            succeed(graven(home.path()).args(["__net", "fill"]));
            let gone = TcpListener::bind("10.213.0.1:0").unwrap();
            let port = gone.local_addr().unwrap().port();
            graven::runtime::local::net::open_port(port).unwrap();
            drop(gone);
            let taken = serve(&format!("{wildcard}:{port}"));
            let on_gateway = format!("10.213.0.1:{}", taken.port());
            assert!(!wget(home.path(), &[], &on_gateway), "{wildcard}");
            assert!(
                !wget(home.path(), &["--no-outbound"], &on_gateway),
                "{wildcard}"
            );
            exercised = rules().contains(&format!(" {port}"));
            let _ = std::fs::remove_file(opening(port));
            if exercised {
                break;
            }
        }
        assert!(
            exercised,
            "{wildcard}: a reload forgot the opening in each of 5 tries"
        );
    }
    let _ = std::fs::remove_file(opening(opened.port()));
}

/// The openings' markers, one per port (`net::open_port`).
fn opening(port: u16) -> std::path::PathBuf {
    Path::new("/run/graven/net/open").join(port.to_string())
}

/// The rules of graven's table as `nft` lists them.
fn rules() -> String {
    String::from_utf8(succeed(Command::new("nft").args(["list", "table", "ip", "graven"])).stdout)
        .unwrap()
}

#[test]
fn an_opening_nothing_listens_on_any_more_leaves_the_rules_at_the_next_reload() {
    let _rules = firewall();
    let home = tempfile::tempdir().unwrap();
    busybox_image(home.path());
    // The bridge and its address, where graven's listeners are.
    succeed(graven(home.path()).args(["__net", "fill"]));
    let live = serve("10.213.0.1:0");
    let gone = TcpListener::bind("10.213.0.1:0").unwrap();
    let gone_port = gone.local_addr().unwrap().port();
    graven::runtime::local::net::open_port(live.port()).unwrap();
    graven::runtime::local::net::open_port(gone_port).unwrap();
    assert!(opening(live.port()).exists() && opening(gone_port).exists());
    let listed = rules();
    assert!(
        listed.contains(&format!(" {}", live.port())) && listed.contains(&format!(" {gone_port}")),
        "{listed}"
    );
    // Its daemon gone (openings outlive their daemons), the next reload, here another
    // daemon's opening, leaves it out and forgets it; the live one stays, and still lets
    // instances through.
    drop(gone);
    let next = serve("10.213.0.1:0");
    graven::runtime::local::net::open_port(next.port()).unwrap();
    assert!(!opening(gone_port).exists());
    assert!(opening(live.port()).exists() && opening(next.port()).exists());
    let listed = rules();
    assert!(!listed.contains(&format!(" {gone_port}")), "{listed}");
    assert!(listed.contains(&format!(" {}", live.port())), "{listed}");
    assert!(wget(home.path(), &[], &live.to_string()));
    // A pool fill, which compares the rules it wants with those loaded, forgets a stale
    // opening too (here one an older graven's daemon left).
    let stale = TcpListener::bind("10.213.0.1:0").unwrap();
    let stale_port = stale.local_addr().unwrap().port();
    drop(stale);
    std::fs::write(opening(stale_port), b"").unwrap();
    succeed(graven(home.path()).args(["__net", "fill"]));
    assert!(!opening(stale_port).exists());
    assert!(opening(live.port()).exists());
    for port in [live.port(), next.port()] {
        let _ = std::fs::remove_file(opening(port));
    }
}

#[test]
fn addresses_stay_with_their_instances_and_go_with_their_removal() {
    let home = tempfile::tempdir().unwrap();
    hello_image(home.path());
    let (first, address) = start(home.path(), &["hello:test"]);
    let ip = address.ip().to_string();
    let std::net::IpAddr::V4(v4) = address.ip() else {
        panic!("{address} is not IPv4")
    };
    assert!(leased(&ip) && netns_file(&ip).exists() && veth(v4).exists());
    // Later starts, each by a new graven process, never take it.
    let mut others = Vec::new();
    for _ in 0..3 {
        let (id, other) = start(home.path(), &["hello:test"]);
        assert_ne!(other.ip(), address.ip());
        others.push(id);
    }
    // A new graven process reads it back from the instance's state.
    let out = succeed(graven(home.path()).args(["ps", "--json"]));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let again = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == first.as_str())
        .unwrap();
    assert_eq!(again["address"].as_str().unwrap(), address.to_string());
    remove(home.path(), &[&first]);
    // Its lease, its namespace's name and (once the kernel has torn the namespace down) its
    // veth are gone.
    assert!(!leased(&ip));
    assert!(!netns_file(&ip).exists());
    wait_for(Duration::from_secs(10), "the veth to go", || {
        (!veth(v4).exists()).then_some(())
    });
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    remove(home.path(), &others);
}

#[test]
fn a_server_that_is_not_root_binds_port_80_and_holds_no_namespace_descriptor() {
    let home = tempfile::tempdir().unwrap();
    // The image runs as 65534; unprivileged ports start at 0 in its own network.
    hello_image(home.path());
    let out =
        succeed(graven(home.path()).args(["run", "-d", "--json", "--port", "80", "hello:test"]));
    let instance: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = instance["id"].as_str().unwrap().to_owned();
    let address: SocketAddr = instance["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(address.port(), 80);
    wait_for(Duration::from_secs(10), "the instance on port 80", || {
        get(address, "/healthz")
    });
    // The namespace was joined through a descriptor the workload never holds.
    let pid = instance["pid"].as_u64().unwrap() as u32;
    let links = support::fd_links(pid);
    assert!(!links.iter().any(|l| l.starts_with("net:")), "{links:?}");
    remove(home.path(), &[&id]);
}

#[test]
fn gc_frees_the_lease_and_namespace_of_an_instance_that_is_gone() {
    let home = tempfile::tempdir().unwrap();
    hello_image(home.path());
    // Something to make the bridge and the lease directory exist.
    let (id, _) = start(home.path(), &["hello:test"]);
    remove(home.path(), &[&id]);
    // A leftover as a crash would leave it: a lease whose instance directory is gone, and
    // its namespace.
    let ip = "10.213.255.250";
    assert!(!leased(ip), "{ip} is in use");
    let owner = home.path().join("instances/gone");
    std::fs::write(
        Path::new("/run/graven/net/leases").join(ip),
        owner.to_str().unwrap(),
    )
    .unwrap();
    let name = format!("graven-{}", ip.replace('.', "-"));
    succeed(Command::new("ip").args(["netns", "add", &name]));
    succeed(graven(home.path()).arg("gc"));
    assert!(!leased(ip));
    assert!(!netns_file(ip).exists());
}

/// Whether graven's nftables table (NAT and the bridge address's guard) is loaded.
fn rules_loaded() -> bool {
    Command::new("nft")
        .args(["list", "table", "ip", "graven"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_filler_loads_the_rules_again_once_a_firewall_reload_removed_them() {
    let _rules = firewall();
    let home = tempfile::tempdir().unwrap();
    // A filler runs `nft` only when the table is missing: made once here...
    succeed(graven(home.path()).args(["__net", "fill"]));
    assert!(rules_loaded());
    // ... then removed, as `nft flush ruleset` in a firewall's reload does, and the next
    // filler sees it gone (its own record says the rules were loaded) and loads them again.
    succeed(Command::new("nft").args(["delete", "table", "ip", "graven"]));
    succeed(graven(home.path()).args(["__net", "fill"]));
    assert!(rules_loaded());
}

#[test]
fn gc_deletes_a_veth_of_graven_s_whose_namespace_is_gone() {
    let home = tempfile::tempdir().unwrap();
    succeed(graven(home.path()).args(["__net", "fill"]));
    // A pair as a filler that died half-way would leave it: graven's name, no namespace.
    let ip = std::net::Ipv4Addr::new(10, 213, 255, 249);
    let name = format!("gv{:08x}", u32::from(ip));
    assert!(!veth(ip).exists() && !netns_file(&ip.to_string()).exists());
    let pair = format!("link add {name} type veth peer name gvtest-peer");
    succeed(Command::new("ip").args(pair.split(' ')));
    assert!(veth(ip).exists());
    // A filler at work (another test's start may have begun one) holds `gc` back from links.
    wait_for(Duration::from_secs(10), "gc to delete the veth", || {
        succeed(graven(home.path()).arg("gc"));
        (!veth(ip).exists()).then_some(())
    });
    assert!(!Path::new("/sys/class/net/gvtest-peer").exists());
}
