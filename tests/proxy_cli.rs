//! `graven __proxy`, the standalone route the benchmark runs, in front of the real example
//! service.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the child it holds by PID when the test ends, passed or failed.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(address: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
}

#[test]
fn standalone_proxy_serves_the_example_and_stops_on_sigterm() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let hello = Reaped(
        Command::new(support::hello_binary())
            .env("PORT", port.to_string())
            .env("VERSION", "7")
            .stdout(Stdio::null())
            .spawn()
            .expect("start hello"),
    );
    let backend = format!("127.0.0.1:{port}");
    support::wait_for(Duration::from_secs(10), "hello to listen", || {
        TcpStream::connect(&backend).ok()
    });

    let mut proxy = Reaped(
        Command::new(support::graven_bin())
            .args(["__proxy", "--listen", "127.0.0.1:0", "--backend", &backend])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start graven __proxy"),
    );
    let mut line = String::new();
    BufReader::new(proxy.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("proxy listening on ")
        .expect("the listen line")
        .to_owned();

    let answer = get(&address, "/");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from hello 7\n"), "{answer}");
    assert!(get(&address, "/missing").starts_with("HTTP/1.1 404"));

    // SAFETY: kill(2) on the PID of a child this test started and has not reaped yet.
    let sent = unsafe { libc::kill(proxy.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = proxy.0.wait().unwrap();
    assert!(status.success(), "{status}");
    drop(hello);
}

#[test]
fn the_proxy_subcommand_is_hidden() {
    let output = support::succeed(support::graven(&std::env::temp_dir()).arg("--help"));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("bake"), "{help}");
    assert!(!help.contains("__proxy"), "{help}");
}
