//! The API socket bounds what a client can make the daemon hold: request bodies over the
//! limit are refused with 413 without being buffered, and connections that send nothing
//! are closed.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);

/// `graven daemon` on the fake runtime with `env`; killed by its PID when dropped.
struct Daemon {
    child: std::process::Child,
}

impl Daemon {
    fn start(home: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut child = support::graven(home)
            .arg("daemon")
            .env("GRAVEN_RUNTIME", "fake")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("graven daemon starts");
        let lines = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped");
        let seen = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut seen = seen.lock().unwrap();
                seen.push_str(&line);
                seen.push('\n');
            }
        });
        let daemon = Daemon { child };
        support::wait_for(DEADLINE * 3, "the daemon to listen", || {
            lines
                .lock()
                .unwrap()
                .contains("graven: daemon listening")
                .then_some(())
        });
        daemon
    }

    /// The most RSS the daemon has had, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(home: &Path) -> UnixStream {
    let stream = UnixStream::connect(home.join("graven.sock")).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Sends `head`, then `body` chunks from another thread (stopping quietly when the daemon
/// stops reading), and returns everything the daemon answers until it closes.
fn exchange(
    home: &Path,
    head: String,
    body: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> String {
    let mut stream = connect(home);
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        for chunk in body {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    drop(stream);
    let _ = sending.join();
    String::from_utf8_lossy(&answer).into_owned()
}

const BIG: usize = 256 * 1024 * 1024;
const MIB: usize = 1024 * 1024;

#[test]
fn oversized_api_bodies_get_413_without_ballooning_the_daemon() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let daemon = Daemon::start(&home, &[]);

    // Declared: refused before any of it is read.
    let declared = exchange(
        &home,
        format!("POST /v1/status HTTP/1.1\r\nhost: graven\r\ncontent-length: {BIG}\r\n\r\n"),
        (0..BIG / MIB).map(|_| vec![b' '; MIB]),
    );
    // Undeclared (chunked): refused once the limit is passed.
    let chunk = {
        let mut chunk = format!("{MIB:x}\r\n").into_bytes();
        chunk.extend(std::iter::repeat_n(b' ', MIB));
        chunk.extend_from_slice(b"\r\n");
        chunk
    };
    let chunked = exchange(
        &home,
        "POST /v1/status HTTP/1.1\r\nhost: graven\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
        (0..BIG / MIB).map(move |_| chunk.clone()),
    );
    // Far below one such body: the daemon did not buffer it.
    let peak = daemon.peak_rss_kib();
    assert!(peak < 64 * 1024, "the daemon's RSS peaked at {peak} KiB");
    for answer in [&declared, &chunked] {
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(
            answer.ends_with(
                r#"{"error":"the request body is larger than the api's limit of 4194304 bytes"}"#
            ),
            "{answer}"
        );
    }

    // Negative control: a body under the limit (3 MiB of JSON whitespace) is read whole
    // and answered.
    let padded = exchange(
        &home,
        format!(
            "POST /v1/status HTTP/1.1\r\nhost: graven\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            3 * MIB + 2
        ),
        [vec![b' '; 3 * MIB], b"{}".to_vec()].into_iter(),
    );
    assert!(padded.starts_with("HTTP/1.1 200 "), "{padded}");
}

#[test]
fn idle_api_connections_are_closed() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let _daemon = Daemon::start(&home, &[("GRAVEN_API_IDLE_TIMEOUT", "300ms")]);
    let read_to_close = |stream: &mut UnixStream| {
        let mut seen = Vec::new();
        stream
            .read_to_end(&mut seen)
            .expect("closed within the read timeout");
        String::from_utf8_lossy(&seen).into_owned()
    };

    // A connection that never sends a request.
    let mut silent = connect(&home);
    assert_eq!(read_to_close(&mut silent), "");

    // A keep-alive connection after its answer: answered first (the negative control: the
    // timeout does not cut off a client that asks), then closed.
    let mut idle = connect(&home);
    idle.write_all(b"POST /v1/status HTTP/1.1\r\nhost: graven\r\ncontent-length: 2\r\n\r\n{}")
        .unwrap();
    let answer = read_to_close(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.ends_with("[]"), "{answer}");
}
