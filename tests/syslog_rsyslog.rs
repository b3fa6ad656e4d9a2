//! Syslog out and in against a real rsyslog (Debian's `rsyslogd`), started by each test on
//! loopback with a config it writes into its own directory and stopped by its PID.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use graven::syslog::{
    BadInput, Endpoint, Facility, ForwardConfig, Forwarder, ListenConfig, Listener, OutRecord,
    Stream, Transport, VecFeed, VecSink, WireFormat,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// Waits for `ready` with a deadline, polling.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_async(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free UDP port on loopback: rsyslog's imudp has no port file.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An rsyslogd of the test's own: `-n -f CONF -i PIDFILE`, everything under `dir`.
struct Rsyslog {
    dir: PathBuf,
    child: Child,
    tcp_port: u16,
}

impl Rsyslog {
    /// Starts rsyslogd with the body of `config` (inputs, templates, rulesets) after the
    /// global settings; `tcp.port` is written by an imtcp input with `ListenPortFileName`.
    fn start(dir: &Path, config: &str) -> Rsyslog {
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let _ = std::fs::remove_file(dir.join("tcp.port"));
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{work}\" maxMessageSize=\"64k\")\n{config}\n",
                work = dir.join("work").display()
            ),
        )
        .unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("rsyslogd.stderr")).unwrap())
            .spawn()
            .expect("rsyslogd (Debian's rsyslog package; scripts/test installs it)");
        let port_file = dir.join("tcp.port");
        wait_for("rsyslogd's port file", || {
            std::fs::read_to_string(&port_file).is_ok_and(|p| p.trim().parse::<u16>().is_ok())
        });
        let tcp_port = std::fs::read_to_string(&port_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Rsyslog {
            dir: dir.to_owned(),
            child,
            tcp_port,
        }
    }

    /// SIGTERM to its own PID, then waits for it.
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("rsyslogd.stderr")).unwrap_or_default()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The lines of a file rsyslog writes (none while it does not exist).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// rsyslog receiving on imtcp (port file) and imudp (`udp_port`), writing each message's
/// parsed fields and its raw form to `out.log`.
fn receiving_config(dir: &Path, tcp_port: u16, udp_port: u16) -> String {
    format!(
        r#"module(load="imtcp")
module(load="imudp")
template(name="fields" type="string" string="%pri%|%app-name%|%procid%|%msgid%|%structured-data%|%hostname%|%msg%|%rawmsg%\n")
ruleset(name="in") {{ action(type="omfile" file="{out}" template="fields") }}
input(type="imtcp" port="{tcp_port}" listenPortFileName="{port_file}" ruleset="in")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="in")
"#,
        out = dir.join("out.log").display(),
        port_file = dir.join("tcp.port").display(),
    )
}

fn record(service: &str, n: u64, stream: Stream) -> OutRecord {
    OutRecord {
        time: SystemTime::now(),
        app: "shop".into(),
        environment: "production".into(),
        service: service.into(),
        release: 7,
        instance: format!("{service}-7-abc"),
        stream,
        line: format!("line {n} of {service}\n").into_bytes(),
        cursor: n,
    }
}

fn forward_config(transport: Transport, port: u16, format: WireFormat) -> ForwardConfig {
    let mut config = ForwardConfig::new(Endpoint {
        transport,
        host: "127.0.0.1".into(),
        port,
    });
    config.format = format;
    config.facility = Facility::LOCAL0;
    config.hostname = Some("graven-host".into());
    config
}

/// The numbers of `line N of SERVICE` among rsyslog's output lines, with how often each came.
fn numbers(lines: &[String]) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for l in lines {
        let msg = l.splitn(8, '|').nth(6).unwrap_or_default().trim_start();
        if let Some(rest) = msg.strip_prefix("line ") {
            let n: u64 = rest.split(' ').next().unwrap().parse().unwrap();
            *seen.entry(n).or_insert(0) += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graven_forwards_to_rsyslog_over_tcp_and_udp_as_rfc5424() {
    let dir = tempfile::tempdir().unwrap();
    let udp_port = free_udp_port();
    let rsyslog = Rsyslog::start(dir.path(), &receiving_config(dir.path(), 0, udp_port));
    for (transport, port, first) in [
        (Transport::Tcp, rsyslog.tcp_port, 0),
        (Transport::Udp, udp_port, 1000),
    ] {
        let feed = VecFeed::new();
        let forwarder = Forwarder::spawn(
            forward_config(transport, port, WireFormat::Rfc5424),
            feed.clone(),
        );
        for n in first..first + 200 {
            let stream = if n % 2 == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            feed.push(record("web", n, stream));
        }
        let out = dir.path().join("out.log");
        wait_async("every line in rsyslog's file", || {
            numbers(&lines(&out)).range(first..first + 200).count() == 200
        })
        .await;
        forwarder.stop().await;
    }
    let all = lines(&dir.path().join("out.log"));
    assert_eq!(numbers(&all).len(), 400, "{}", rsyslog.stderr());
    // local0 (16) * 8 + info (6) for stdout, + err (3) for stderr; the fields as rsyslog read
    // them, and the raw message exactly as RFC 5424 lays it out.
    let line0 = all.iter().find(|l| l.contains("|line 0 of web|")).unwrap();
    let parts: Vec<&str> = line0.splitn(8, '|').collect();
    assert_eq!(parts[0], "134");
    assert_eq!(parts[1], "web");
    assert_eq!(parts[2], "web-7-abc");
    assert_eq!(parts[3], "stdout");
    assert_eq!(
        parts[4],
        r#"[graven@32473 app="shop" environment="production" release="7" instance="web-7-abc"]"#
    );
    assert_eq!(parts[5], "graven-host");
    assert_eq!(parts[6], "line 0 of web");
    let raw = parts[7];
    assert!(raw.starts_with("<134>1 20"), "{raw}");
    assert!(
        raw.ends_with(r#"Z graven-host web web-7-abc stdout [graven@32473 app="shop" environment="production" release="7" instance="web-7-abc"] line 0 of web"#),
        "{raw}"
    );
    let line1001 = all
        .iter()
        .find(|l| l.contains("|line 1001 of web|"))
        .unwrap();
    assert!(
        line1001.starts_with("131|web|web-7-abc|stderr|"),
        "{line1001}"
    );
    rsyslog.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graven_forwards_rfc3164_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(
        dir.path(),
        &receiving_config(dir.path(), 0, free_udp_port()),
    );
    let feed = VecFeed::new();
    let forwarder = Forwarder::spawn(
        forward_config(Transport::Tcp, rsyslog.tcp_port, WireFormat::Rfc3164),
        feed.clone(),
    );
    for n in 0..50 {
        feed.push(record("api", n, Stream::Stdout));
    }
    let out = dir.path().join("out.log");
    wait_async("every line", || numbers(&lines(&out)).len() == 50).await;
    forwarder.stop().await;
    let all = lines(&out);
    let parts: Vec<&str> = all[0].splitn(8, '|').collect();
    assert_eq!(&parts[..3], ["134", "api", "api-7-abc"]);
    assert_eq!(parts[5], "graven-host");
    // rsyslog keeps the space after the tag's colon in an RFC 3164 message's text.
    assert_eq!(parts[6], " line 0 of api");
    // `<134>Mmm dd hh:mm:ss graven-host api[api-7-abc]: line 0 of api`
    let raw = parts[7];
    assert!(raw.starts_with("<134>"), "{raw}");
    assert!(
        raw.ends_with(" graven-host api[api-7-abc]: line 0 of api"),
        "{raw}"
    );
    assert_eq!(
        raw.len(),
        "<134>Dec  6 11:02:43 graven-host api[api-7-abc]: line 0 of api".len()
    );
    rsyslog.stop();
}
