//! Clients that hold connections open: silent and idle connections are closed, a route
//! refuses clearly beyond its connection cap, and under `ulimit -n 1024` an attack of more
//! idle connections than that neither stops the route for good nor gets a healthy instance
//! drained, while an instance that really stops answering is still replaced.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graven::proxy::Route;
use http::StatusCode;
use support::daemon::{demo_instances, remove_instances, v1_project};
use support::proxy::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// Reads until the peer closes (or resets); what came before.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buffer)).await {
            Err(_) => panic!("the route did not close the connection within {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => return String::from_utf8_lossy(&seen).into_owned(),
            Ok(Ok(read)) => seen.extend_from_slice(&buffer[..read]),
        }
    }
}

/// One `GET /` on `stream` (kept alive), the answer's head and body.
async fn get_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(read > 0, "closed before answering");
        seen.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
    }
}

async fn served_route(
    configure: impl FnOnce(&mut graven::proxy::RouteOptions),
) -> (TestBackend, Route) {
    let backend = TestBackend::start("a").await;
    let route = route(configure).await;
    route.set_backends(vec![backend.backend(1)]);
    (backend, route)
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let (_backend, route) = served_route(|options| {
        options.header_timeout = Duration::from_millis(200);
        options.idle_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut silent = TcpStream::connect(route.local_addr()).await.unwrap();
    eventually(DEADLINE, "the connection to be counted", || {
        route.connections() == 1
    })
    .await;
    assert_eq!(read_to_close(&mut silent).await, "");
    eventually(DEADLINE, "no connection left open", || {
        route.connections() == 0
    })
    .await;

    // Negative control: a connection that keeps sending requests outlives many header
    // timeouts.
    let mut busy = TcpStream::connect(route.local_addr()).await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(1);
    let mut answered = 0;
    while std::time::Instant::now() < until {
        assert!(get_on(&mut busy).await.starts_with("HTTP/1.1 200"));
        answered += 1;
    }
    assert!(answered > 1);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let (_backend, route) = served_route(|options| {
        options.header_timeout = Duration::from_secs(3600);
        options.idle_timeout = Duration::from_millis(300);
    })
    .await;
    // HTTP/1.1: one request, then nothing.
    let mut idle = TcpStream::connect(route.local_addr()).await.unwrap();
    assert!(get_on(&mut idle).await.starts_with("HTTP/1.1 200"));
    assert_eq!(read_to_close(&mut idle).await, "");

    // HTTP/2: the connection ends (GOAWAY) once no stream began for the idle timeout.
    let stream = TcpStream::connect(route.local_addr()).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/", route.local_addr()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    drop(answer);
    tokio::time::timeout(DEADLINE, connection)
        .await
        .expect("the route closed the idle HTTP/2 connection")
        .unwrap()
        .unwrap();
    eventually(DEADLINE, "no connection left open", || {
        route.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_cap_get_a_clear_refusal() {
    let (_backend, route) = served_route(|options| options.max_connections = 2).await;
    let first = TcpStream::connect(route.local_addr()).await.unwrap();
    let _second = TcpStream::connect(route.local_addr()).await.unwrap();
    eventually(DEADLINE, "two connections open", || {
        route.connections() == 2
    })
    .await;

    let mut third = TcpStream::connect(route.local_addr()).await.unwrap();
    let refusal = read_to_close(&mut third).await;
    let expected_body = format!(
        "graven: route {} is at its connection limit (2 connections)\n",
        route.local_addr()
    );
    assert!(refusal.starts_with("HTTP/1.1 503 "), "{refusal}");
    assert!(refusal.contains("\r\nconnection: close\r\n"), "{refusal}");
    assert!(
        refusal.contains("\r\nx-graven-error: graven\r\n"),
        "{refusal}"
    );
    assert!(refusal.ends_with(&expected_body), "{refusal}");
    let metrics = route.metrics();
    assert_eq!((metrics.refused, metrics.connections), (1, 2));

    // Negative control: below the cap, a client is served again.
    drop(first);
    eventually(DEADLINE, "one connection open", || route.connections() == 1).await;
    let answer = get(&client(), route.local_addr(), "/").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

/// Raises this test process's own descriptor limit, so that it can hold more connections
/// than the graven under test may.
fn raise_own_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the given struct.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        assert!(limit.rlim_cur >= 4096, "the test needs 4096 descriptors");
    }
}

/// `graven up` under a descriptor limit of `soft` and `hard`, with a short header timeout;
/// killed by its PID when dropped.
struct LimitedUp {
    child: std::process::Child,
    home: std::path::PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl LimitedUp {
    fn start(home: &std::path::Path, dir: &std::path::Path, soft: u64, hard: u64) -> LimitedUp {
        let mut command = support::graven(home);
        command
            .arg("up")
            .arg(dir)
            .env("GRAVEN_RUNTIME", "local")
            .env(graven::proxy::HEADER_TIMEOUT_ENV, "1s")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("graven up starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped");
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = lines.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let up = LimitedUp {
            child,
            home: home.to_owned(),
            stderr,
        };
        support::wait_for(Duration::from_secs(120), "graven up to serve", || {
            up.stderr().contains("graven: serving").then_some(())
        });
        up
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for LimitedUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_instances(&self.home);
    }
}

/// Rounds of `count` connections to a route opened at once and held, sending nothing,
/// until the route has closed every one (those it accepted only by their header timeout);
/// counts the refusals seen and the rounds completed.
struct Attack {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    rounds: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attack {
    fn start(route: SocketAddr, count: usize) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let rounds = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, refused, rounds) = (stop.clone(), refused.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    let mut streams: Vec<std::net::TcpStream> = (0..count)
                        .filter_map(|_| std::net::TcpStream::connect_timeout(&route, DEADLINE).ok())
                        .collect();
                    for stream in &streams {
                        stream.set_nonblocking(true).unwrap();
                    }
                    while !streams.is_empty() && !stop.load(Ordering::SeqCst) {
                        streams.retain_mut(|stream| match stream.read(&mut buffer) {
                            Ok(0) => false,
                            Ok(read) => {
                                if buffer[..read].starts_with(b"HTTP/1.1 503") {
                                    refused.fetch_add(1, Ordering::SeqCst);
                                }
                                false
                            }
                            Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
                        });
                        // A pause between scans of the sockets, not a wait for anything.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if streams.is_empty() {
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        Attack {
            stop,
            refused,
            rounds,
            thread: Some(thread),
        }
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    fn rounds(&self) -> usize {
        self.rounds.load(Ordering::SeqCst)
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs a graven command, giving up on it (killed by its PID) after `DEADLINE`: a graven
/// out of descriptors cannot accept on its API socket, and the CLI would wait for ever.
/// Its stdout, or None when it failed or gave no answer.
fn run_bounded(home: &std::path::Path, args: &[&str]) -> Option<String> {
    let mut child = support::graven(home)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("graven runs");
    let mut stdout = child.stdout.take().expect("piped");
    let reading = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let end = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = reading.join().unwrap();
    status.filter(|status| status.success()).map(|_| text)
}

/// The ids of the instances `graven status` shows healthy.
fn healthy(home: &std::path::Path) -> Vec<String> {
    let Some(stdout) = run_bounded(home, &["status", "--json"]) else {
        return Vec::new();
    };
    let status: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let mut ids: Vec<String> = status[0]["state"]["instances"]
        .as_object()
        .map(|instances| {
            instances
                .iter()
                .filter(|(_, i)| i["lifecycle"] == "healthy")
                .map(|(id, _)| id.clone())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A process's descriptor limit, soft and hard.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a descriptor limit");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn workloads_keep_the_descriptor_limit_graven_was_started_with() {
    let (_temp, home, dir, _route) = v1_project(1);
    // The build step is another program `up` starts after raising its limit.
    let toml = dir.join("graven.toml");
    let mut project = std::fs::read_to_string(&toml).unwrap();
    project.push_str("\n[build]\ncommand = \"ulimit -Sn > build-nofile\"\n");
    std::fs::write(&toml, project).unwrap();
    let up = LimitedUp::start(&home, &dir, 1024, 4096);
    // graven raised its own soft limit (which the workload would inherit unless put back).
    assert_eq!(open_files_limit(up.child.id()), (4096, 4096));
    let pid = support::wait_for(DEADLINE * 3, "a running instance", || {
        demo_instances(&home)
            .into_iter()
            .find_map(|instance| instance.pid)
    });
    assert_eq!(open_files_limit(pid), (1024, 4096));
    let build = std::fs::read_to_string(dir.join("build-nofile")).unwrap();
    assert_eq!(build.trim(), "1024", "the build step's soft limit");
}

/// The kinds of events `graven history` shows about `instance`.
fn events_of(home: &std::path::Path, instance: &str) -> Vec<String> {
    let stdout = run_bounded(home, &["history", "--json"]).unwrap_or_default();
    let events: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap_or_default();
    events
        .iter()
        .filter(|event| event.to_string().contains(instance))
        .filter_map(|event| event["payload"]["kind"].as_str().map(str::to_owned))
        .collect()
}

/// One `GET /` on a fresh connection: Some(answer) when served or refused with the clear
/// refusal, None when closed unanswered (a refusal past the refusal budget).
fn fresh_request(route: SocketAddr) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&route, DEADLINE).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let clear = answer.starts_with("HTTP/1.1 200")
        || (answer.starts_with("HTTP/1.1 503") && answer.contains("is at its connection limit"));
    clear.then_some(answer)
}

#[test]
fn idle_connections_do_not_get_healthy_instances_killed() {
    raise_own_limit();
    let (_temp, home, dir, route) = v1_project(2);
    // Soft and hard: graven's own raise cannot help.
    let up = LimitedUp::start(&home, &dir, 1024, 1024);
    assert_eq!(open_files_limit(up.child.id()), (1024, 1024));
    let before = support::wait_for(DEADLINE * 3, "two healthy instances", || {
        let ids = healthy(&home);
        (ids.len() == 2).then_some(ids)
    });

    // More idle connections than graven may open at all, until the route has closed two
    // rounds of them, or (what this test is about) an instance stopped being healthy.
    let attack = Attack::start(route, 1100);
    support::wait_for(
        DEADLINE * 6,
        "two rounds of the attack, or a health change",
        || (attack.rounds() >= 2 || healthy(&home) != before).then_some(()),
    );
    assert_eq!(healthy(&home), before, "{}", up.stderr());
    assert!(attack.refused() > 0, "the route never reached its limit");
    let answer = support::wait_for(DEADLINE, "a served or clearly refused request", || {
        fresh_request(route)
    });
    assert!(answer.contains("\r\nconnection: close\r\n") || answer.starts_with("HTTP/1.1 200"));
    assert_eq!(healthy(&home), before, "{}", up.stderr());
    for instance in &before {
        let events = events_of(&home, instance);
        assert!(
            !events.iter().any(|kind| kind == "instance_unhealthy"
                || kind == "instance_draining"
                || kind == "instance_exited"),
            "{instance}: {events:?}\n{}",
            up.stderr()
        );
    }

    // Negative control, under the same attack: an instance that really stops answering is
    // found unhealthy and replaced, and only that one.
    let stopped = &before[0];
    let instances = demo_instances(&home);
    let pid = instances
        .iter()
        .find(|instance| instance.labels.get("instance") == Some(stopped))
        .and_then(|instance| instance.pid)
        .unwrap_or_else(|| panic!("no workload PID for {stopped} in {instances:#?}"));
    // SAFETY: kill(2) on the workload of an instance this test's graven started; it is
    // running (listed with its PID just now, which the runtime checks by start time).
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    support::wait_for(DEADLINE * 3, "the stopped instance unhealthy", || {
        events_of(&home, stopped)
            .iter()
            .any(|kind| kind == "instance_unhealthy")
            .then_some(())
    });
    assert!(healthy(&home).contains(&before[1]), "{}", up.stderr());
    assert!(
        !events_of(&home, &before[1])
            .iter()
            .any(|kind| kind == "instance_unhealthy"),
        "{}",
        up.stderr()
    );

    drop(attack);
    support::wait_for(DEADLINE * 3, "a request served after the attack", || {
        fresh_request(route).filter(|answer| answer.starts_with("HTTP/1.1 200"))
    });
}
