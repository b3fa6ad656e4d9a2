//! graven's DNS server, asked with `dig` (Debian's bind9-dnsutils) while `graven up` serves a
//! project on the in-memory runtime: names, SRV, instances, NXDOMAIN, NODATA, REFUSED, TCP,
//! and a removed service's names gone.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::daemon::{Up, free_port, run, run_ok};

/// A project `demo` with `web` (HTTP route, two instances) and `db` (TCP route), and `extra`
/// appended (the `[dns]` table).
fn write_project(dir: &std::path::Path, web: SocketAddr, db: Option<SocketAddr>, extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Containerfile"), "FROM scratch\n").unwrap();
    let service = |name: &str, instances: u32, route: String| {
        format!(
            r#"
[services.{name}]
instances = {instances}
port = 8080
route = "{route}"
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "60s" }}
stop_grace = "1s"
"#
        )
    };
    let mut text = format!("app = \"demo\"\n{}", service("web", 2, web.to_string()));
    if let Some(db) = db {
        text += &service("db", 1, format!("tcp://{db}"));
    }
    text += extra;
    std::fs::write(dir.join("graven.toml"), text).unwrap();
}

/// The names of the blobs in the home's image store.
fn blobs(home: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = walkdir(&home.join("store").join("blobs"));
    names.sort();
    names
}

fn walkdir(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            names.extend(walkdir(&path));
        } else {
            names.push(path.display().to_string());
        }
    }
    names
}

/// The address the server's startup line names for loopback.
fn dns_address(up: &mut Up) -> SocketAddr {
    up.wait_for_line("dns listening on 127.0.0.1:", Duration::from_secs(10));
    let stderr = up.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("dns listening on 127.0.0.1:"))
        .unwrap();
    line.split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// `graven up` of the project with `web` alone, its server on a free loopback port with the
/// `[dns]` keys `dns` besides: the temp dir to keep, the control plane, and the address.
fn serve_web(dns: &str) -> (tempfile::TempDir, Up, SocketAddr) {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let extra = format!("\n[dns]\nlisten = [\"127.0.0.1:0\"]\n{dns}");
    write_project(&dir, free_port(), None, &extra);
    let mut up = Up::start(&home, &dir, "fake");
    let server = dns_address(&mut up);
    (temp, up, server)
}

/// `dig` against graven's server with `args`, its whole output.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let output = Command::new("dig")
        .args([
            format!("@{}", server.ip()),
            "-p".to_owned(),
            server.port().to_string(),
            "+time=2".to_owned(),
            "+tries=1".to_owned(),
        ])
        .args(args)
        .output()
        .expect("dig runs (Debian's bind9-dnsutils)");
    assert!(output.status.success(), "dig {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// `text` with every run of white space made one space (dig aligns its columns with tabs).
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn short(server: SocketAddr, name: &str, kind: &str) -> Vec<String> {
    let mut lines: Vec<String> = dig(server, &["+short", name, kind])
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// The status `dig` reports (`NOERROR`, `NXDOMAIN`, `REFUSED`, ...) and the answer count.
fn status(server: SocketAddr, args: &[&str]) -> (String, u32) {
    let out = dig(server, args);
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in {out}"))
        .to_owned();
    let answers = out
        .split("ANSWER: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer count in {out}"));
    (status, answers)
}

#[test]
fn dig_finds_services_their_ports_and_instances_and_removed_ones_go() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let (web, db) = (free_port(), free_port());
    write_project(
        &dir,
        web,
        Some(db),
        "\n[dns]\nlisten = [\"127.0.0.1:0\"]\nttl = 1\n",
    );
    let mut up = Up::start(&home, &dir, "fake");
    let server = dns_address(&mut up);

    // The service's route, with the TTL asked for (the zone follows the controllers'
    // snapshots, looked at every 100 ms: shortly after `up` serves).
    let started = std::time::Instant::now();
    support::wait_for(Duration::from_secs(10), "web's name in the zone", || {
        (short(server, "web.local.demo.graven.", "A") == ["127.0.0.1"]).then_some(())
    });
    eprintln!(
        "web's name answered {:?} after up served",
        started.elapsed()
    );
    let answer = words(&dig(
        server,
        &["+noall", "+answer", "web.local.demo.graven.", "A"],
    ));
    assert_eq!(answer, "web.local.demo.graven. 1 IN A 127.0.0.1");
    // SRV with the route's port: `http` for an HTTP route, the service's name for TCP.
    assert_eq!(
        short(server, "_http._tcp.web.local.demo.graven.", "SRV"),
        [format!("0 0 {} web.local.demo.graven.", web.port())]
    );
    assert_eq!(
        short(server, "_db._tcp.db.local.demo.graven.", "SRV"),
        [format!("0 0 {} db.local.demo.graven.", db.port())]
    );
    // The instances behind the route: the in-memory runtime's all listen on loopback.
    assert_eq!(
        short(server, "instances.web.local.demo.graven.", "A"),
        ["127.0.0.1"]
    );
    // Over TCP the same.
    assert_eq!(
        dig(server, &["+tcp", "+short", "web.local.demo.graven.", "A"]).trim(),
        "127.0.0.1"
    );
    // No such name: NXDOMAIN; the name without the type: NODATA (NOERROR, no answer), also
    // for a name that only leads to others.
    assert_eq!(
        status(server, &["nope.local.demo.graven.", "A"]),
        ("NXDOMAIN".into(), 0)
    );
    assert_eq!(
        status(server, &["web.local.demo.graven.", "AAAA"]),
        ("NOERROR".into(), 0)
    );
    assert_eq!(
        status(server, &["local.demo.graven.", "A"]),
        ("NOERROR".into(), 0)
    );
    // The apex, and no other zone: graven is no resolver.
    assert_eq!(status(server, &["graven.", "SOA"]), ("NOERROR".into(), 1));
    assert_eq!(status(server, &["graven.", "NS"]), ("NOERROR".into(), 1));
    assert_eq!(
        status(server, &["example.com.", "A"]),
        ("REFUSED".into(), 0)
    );
    assert_eq!(
        status(server, &["+tcp", "example.com.", "A"]),
        ("REFUSED".into(), 0)
    );

    // A deploy without `db` removes it: its names go, web's stay.
    write_project(
        &dir,
        web,
        None,
        "\n[dns]\nlisten = [\"127.0.0.1:0\"]\nttl = 1\n",
    );
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    support::wait_for(Duration::from_secs(10), "db's name gone", || {
        (status(server, &["db.local.demo.graven.", "A"]).0 == "NXDOMAIN").then_some(())
    });
    assert_eq!(
        status(server, &["_db._tcp.db.local.demo.graven.", "SRV"]).0,
        "NXDOMAIN"
    );
    assert_eq!(short(server, "web.local.demo.graven.", "A"), ["127.0.0.1"]);
}

#[test]
fn a_zone_of_its_own_replaces_graven() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let web = free_port();
    write_project(
        &dir,
        web,
        None,
        "\n[dns]\nzone = \"Internal.Example\"\nlisten = [\"127.0.0.1:0\"]\n",
    );
    let mut up = Up::start(&home, &dir, "fake");
    let server = dns_address(&mut up);
    // The zone follows the controllers' snapshots (looked at every 100 ms): the route is in
    // it shortly after `up` serves, not necessarily at that instant.
    support::wait_for(Duration::from_secs(10), "web's name in the zone", || {
        (short(server, "web.local.demo.internal.example.", "A") == ["127.0.0.1"]).then_some(())
    });
    // The default TTL: 5 s.
    let answer = words(&dig(
        server,
        &["+noall", "+answer", "web.local.demo.internal.example.", "A"],
    ));
    assert_eq!(answer, "web.local.demo.internal.example. 5 IN A 127.0.0.1");
    assert_eq!(
        status(server, &["web.local.demo.graven.", "A"]).0,
        "REFUSED"
    );
}

#[test]
fn malformed_queries_get_formerr_or_nothing_and_the_server_goes_on() {
    let (_temp, _up, server) = serve_web("");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // A header and a question cut short: FORMERR, with the query's id.
    let mut cut = vec![
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e',
    ];
    socket.send_to(&cut, server).unwrap();
    let mut buffer = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buffer).unwrap();
    assert!(n >= 12);
    assert_eq!(&buffer[..2], &[0x12, 0x34]);
    assert_eq!(buffer[3] & 0x0f, 1, "FORMERR");
    // Scraps and someone's answer: no reply at all (an answer to an answer could loop).
    socket.send_to(&[1, 2, 3], server).unwrap();
    cut[2] |= 0x80;
    socket.send_to(&cut, server).unwrap();
    // TCP: a length that promises more than ever comes, then the connection closed.
    {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(server).unwrap();
        stream.write_all(&[0xff, 0xff, 0, 0]).unwrap();
    }
    // The server still answers.
    assert_eq!(status(server, &["graven.", "SOA"]), ("NOERROR".into(), 1));
    assert!(
        socket.recv_from(&mut buffer).is_err(),
        "nothing answers the scraps or the answer"
    );
}

/// A query for the zone's SOA with `id`, as bytes (RFC 1035 4.1): one question, RD set.
fn soa_query(id: u16) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    query.extend_from_slice(b"\x06graven\x00");
    query.extend_from_slice(&[0, 6, 0, 1]);
    query
}

/// A source that floods the server is answered up to `[dns] rate_limit` a second and the rest
/// dropped, while another source's queries, asked during the flood, are all answered.
#[test]
fn a_flood_from_one_source_is_cut_to_its_limit_and_others_are_answered() {
    let (_temp, _up, server) = serve_web("rate_limit = 100\n");
    // Two sources of their own on loopback (127.0.0.1 itself, the host, is never limited).
    let flood = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let answers = {
        let flood = flood.try_clone().unwrap();
        flood
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 512];
            let mut answers = 0u32;
            while flood.recv_from(&mut buffer).is_ok() {
                answers += 1;
            }
            answers
        })
    };
    let other = std::thread::spawn(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buffer = [0u8; 512];
        let mut answered = 0;
        for id in 0..50u16 {
            socket.send_to(&soa_query(id), server).unwrap();
            if let Ok((n, _)) = socket.recv_from(&mut buffer) {
                answered += u32::from(n >= 12 && buffer[..2] == id.to_be_bytes());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        answered
    });
    let mut sent = 0u32;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        if flood.send_to(&soa_query(sent as u16), server).is_ok() {
            sent += 1;
        }
    }
    let answered_others = other.join().unwrap();
    let answered_flood = answers.join().unwrap();
    println!(
        "flood: {sent} sent, {answered_flood} answered; the other source: {answered_others} of 50"
    );
    assert_eq!(
        answered_others, 50,
        "every query of the other source is answered"
    );
    assert!(
        answered_flood >= 1,
        "the flood's first queries are answered"
    );
    // The flood lasted under a second, but each reader counts its own seconds: at most two
    // of them, each up to the limit.
    assert!(
        answered_flood <= 2 * 100 + 2,
        "{answered_flood} answers to a source limited to 100 a second"
    );
    assert!(sent > 1000, "the flood was a flood: {sent} queries");
}

/// `dig`'s answer lines for `name` (`NAME TTL IN TYPE DATA`, white space made one space).
fn answers(server: SocketAddr, name: &str) -> Vec<String> {
    dig(server, &["+noall", "+answer", name, "A"])
        .lines()
        .map(words)
        .collect()
}

/// The loopback address of the DNS server a background control plane's log names.
fn logged_dns_address(home: &std::path::Path) -> SocketAddr {
    support::wait_for(
        Duration::from_secs(10),
        "the dns line in daemon.log",
        || {
            let log = std::fs::read_to_string(home.join("daemon.log")).ok()?;
            let line = log
                .lines()
                .find(|l| l.contains("dns listening on 127.0.0.1:"))?
                .to_owned();
            line.split_whitespace().find_map(|w| w.parse().ok())
        },
    )
}

/// `graven daemon` reads no graven.toml: it runs the `[dns]` settings its flags (or their
/// variables) give. A deploy without `[dns]` is named in its zone with its TTL; a deploy
/// whose `[dns]` asks for another zone is refused, naming both, and the running names stay;
/// `up --detach` starts a control plane running the project's `[dns]`.
#[test]
fn the_daemon_runs_the_dns_settings_it_is_given_and_refuses_a_deploy_asking_for_others() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let (plain, other) = (temp.path().join("plain"), temp.path().join("other"));
    write_project(&plain, free_port(), None, "");
    let mut daemon = Up::daemon_with(&home, "fake", |command| {
        command
            .env("GRAVEN_DNS_ZONE", "Corp.Example")
            .env("GRAVEN_DNS_LISTEN", "127.0.0.1:0")
            .env("GRAVEN_DNS_TTL", "30");
    });
    let server = dns_address(&mut daemon);
    run_ok(&home, &["deploy", plain.to_str().unwrap()]);
    let answer = support::wait_for(Duration::from_secs(10), "web named", || {
        let answer = answers(server, "web.local.demo.corp.example.");
        (!answer.is_empty()).then_some(answer)
    });
    assert_eq!(
        answer,
        ["web.local.demo.corp.example. 30 IN A 127.0.0.1"],
        "the daemon's zone and TTL"
    );
    assert_eq!(
        status(server, &["web.local.demo.graven.", "A"]).0,
        "REFUSED"
    );

    // Another app whose graven.toml asks for the default zone and another TTL: refused.
    write_project(
        &other,
        free_port(),
        None,
        "\n[dns]\nzone = \"graven\"\nttl = 30\n",
    );
    let text = std::fs::read_to_string(other.join("graven.toml")).unwrap();
    std::fs::write(
        other.join("graven.toml"),
        text.replace("app = \"demo\"", "app = \"other\""),
    )
    .unwrap();
    // An image of its own (the plain one's digest would hide a bake), which is never baked:
    // the refusal comes before.
    std::fs::write(other.join("Containerfile"), "FROM scratch\nENV WHO=other\n").unwrap();
    let blobs_before = blobs(&home);
    let (ok, _, stderr) = run(&home, &["deploy", other.to_str().unwrap()]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(
            "other/local's [dns] asks for zone \"graven.\" (here \"corp.example.\"), which this \
             control plane does not run"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("graven: bake"), "baked first: {stderr}");
    assert_eq!(blobs(&home), blobs_before, "the store changed: {stderr}");
    let (status_out, _) = run_ok(&home, &["status", "--app", "demo", "--env", "local"]);
    assert!(status_out.contains("web"), "{status_out}");
    assert_eq!(
        answers(server, "web.local.demo.corp.example."),
        ["web.local.demo.corp.example. 30 IN A 127.0.0.1"]
    );
    drop(daemon);

    // `up --detach` on a home with no control plane: the one it starts runs the [dns] of the
    // project (its flags), so the deploy that follows agrees with it.
    let detached_home = temp.path().join("detached");
    let detached = temp.path().join("detached-project");
    write_project(
        &detached,
        free_port(),
        None,
        "\n[dns]\nzone = \"detached.example\"\nlisten = [\"127.0.0.1:0\"]\nttl = 7\n",
    );
    support::succeed(
        support::graven(&detached_home)
            .env("GRAVEN_RUNTIME", "fake")
            .args(["up", "--detach", detached.to_str().unwrap()]),
    );
    let server = logged_dns_address(&detached_home);
    // The zone follows the deploy within a controller round of its answer.
    let answer = support::try_wait_for(Duration::from_secs(10), || {
        Some(answers(server, "web.local.demo.detached.example.")).filter(|a| !a.is_empty())
    })
    .unwrap_or_default();
    run_ok(&detached_home, &["daemon", "stop"]);
    assert_eq!(
        answer,
        ["web.local.demo.detached.example. 7 IN A 127.0.0.1"]
    );
}
