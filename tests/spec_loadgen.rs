//! `graven __load`, the benchmark scripts' load generator, against a real example instance:
//! it counts every response by version, and counts failures once the instance is gone.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::load::{Load, LoadReport};

/// The example service as a child process, killed (by its PID, through `Child`) on drop.
struct Hello {
    child: Child,
    address: SocketAddr,
}

impl Hello {
    fn start(version: &str) -> Hello {
        let address = support::daemon::free_port();
        let child = Command::new(support::hello_binary())
            .env("PORT", address.port().to_string())
            .env("VERSION", version)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        support::wait_for(Duration::from_secs(20), "hello to listen", || {
            std::net::TcpStream::connect(address).ok()
        });
        Hello { child, address }
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_cli_reports_versions_as_json() {
    let hello = Hello::start("7.0.0");
    let output = support::succeed(
        Command::new(support::graven_bin())
            .args(["__load", "--address", &hello.address.to_string()])
            .args(["--connections", "2", "--duration", "300ms", "--json"]),
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let total = report["total"].as_u64().unwrap();
    assert!(total > 0, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(
        report["versions"]["7.0.0"].as_u64(),
        Some(total),
        "{report}"
    );
    assert_eq!(report["version_sequence"], serde_json::json!(["7.0.0"]));
}

#[test]
fn killing_the_server_under_load_is_counted() {
    let mut hello = Hello::start("1.0.0");
    let load = Load::start(hello.address, 4);
    support::wait_for(Duration::from_secs(20), "responses", || {
        (load.snapshot().total >= 100).then_some(())
    });
    hello.child.kill().unwrap();
    hello.child.wait().unwrap();
    support::wait_for(Duration::from_secs(20), "failures", || {
        (load.snapshot().failed >= 10).then_some(())
    });
    let report: LoadReport = load.stop();
    assert!(report.versions["1.0.0"] >= 100, "{report:?}");
    assert!(report.failed >= 10, "{report:?}");
    assert!(!report.failures.is_empty());
}
