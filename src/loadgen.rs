//! A keep-alive HTTP/1.1 load generator: a test and benchmark tool, not part of serving.
//!
//! The zero-downtime tests and `bench/deploy.sh` (through the hidden `graven __load`
//! subcommand) use it to hold C persistent connections to a route and send GET requests
//! back to back, counting every failure (a connection error, a malformed or missing
//! response, a non-2xx status) and which version served each response (the example's
//! `x-hello-version` header), in the order versions were seen. A failed request drops its
//! connection, is counted, and the worker reconnects and goes on: the load never stops on
//! its own, so an outage shows up as a count, not as a silent pause.
//!
//! Plain std threads and a minimal HTTP/1.1 client keep it independent of the code under
//! test (hyper is what the proxy uses); it owns nothing else and touches nothing else.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The response header that names the version that served a request.
pub const VERSION_HEADER: &str = "x-hello-version";
/// Recorded for a successful response without a version header.
pub const NO_VERSION: &str = "(none)";
/// At most this many failure reasons are kept as a sample; `failed` counts them all.
const FAILURE_SAMPLE: usize = 20;
/// At most this many entries of the version sequence are kept. During a rollout responses
/// from both versions interleave, so the sequence can flip thousands of times;
/// `version_changes` counts every flip.
const SEQUENCE_LIMIT: usize = 256;

/// How to load a route.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub address: SocketAddr,
    pub connections: usize,
    pub path: String,
    /// A request with no complete response within this long is a failure.
    pub timeout: Duration,
}

impl LoadOptions {
    pub fn new(address: SocketAddr, connections: usize) -> LoadOptions {
        LoadOptions {
            address,
            connections,
            path: "/".to_owned(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What the load saw so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// Requests attempted, including failed ones (a failed connect counts as one).
    pub total: u64,
    pub failed: u64,
    /// A sample of failure reasons, the first ones seen.
    pub failures: Vec<String>,
    /// Successful responses per version.
    pub versions: BTreeMap<String, u64>,
    /// Versions in the order responses completed, consecutive repeats collapsed; the first
    /// 256 entries.
    pub version_sequence: Vec<String>,
    /// How many times the version changed from one response to the next (across all
    /// connections, in completion order).
    pub version_changes: u64,
    /// The version of the most recent successful response.
    pub last_version: Option<String>,
    /// Time since the load started.
    pub elapsed_ms: u64,
}

impl LoadReport {
    fn record_success(&mut self, version: String) {
        self.total += 1;
        if self.last_version.as_ref() != Some(&version) {
            if self.last_version.is_some() {
                self.version_changes += 1;
            }
            if self.version_sequence.len() < SEQUENCE_LIMIT {
                self.version_sequence.push(version.clone());
            }
            self.last_version = Some(version.clone());
        }
        *self.versions.entry(version).or_default() += 1;
    }

    fn record_failure(&mut self, reason: String) {
        self.total += 1;
        self.failed += 1;
        if self.failures.len() < FAILURE_SAMPLE {
            self.failures.push(reason);
        }
    }
}

/// A running load; `stop` ends it and returns the final report.
pub struct Load {
    report: Arc<Mutex<LoadReport>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `connections` workers sending `GET /` to `address`.
    pub fn start(address: SocketAddr, connections: usize) -> Load {
        Load::start_with(LoadOptions::new(address, connections))
    }

    pub fn start_with(options: LoadOptions) -> Load {
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let options = Arc::new(options);
        let workers = (0..options.connections.max(1))
            .map(|i| {
                let (report, stop, options) = (report.clone(), stop.clone(), options.clone());
                std::thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || worker(&options, &report, &stop))
                    .expect("a load worker thread starts")
            })
            .collect();
        Load {
            report,
            stop,
            started: Instant::now(),
            workers,
        }
    }

    pub fn snapshot(&self) -> LoadReport {
        let mut report = lock(&self.report).clone();
        report.elapsed_ms = self.started.elapsed().as_millis() as u64;
        report
    }

    /// Stops every worker after its current request and returns the final report.
    pub fn stop(mut self) -> LoadReport {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

fn lock(report: &Mutex<LoadReport>) -> std::sync::MutexGuard<'_, LoadReport> {
    report
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One keep-alive connection's loop: request, record, and on failure reconnect.
fn worker(options: &LoadOptions, report: &Mutex<LoadReport>, stop: &AtomicBool) {
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: graven-load\r\n\r\n",
        options.path, options.address
    );
    let mut connection: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let reader = match connection.as_mut() {
            Some(reader) => reader,
            None => match connect(options) {
                Ok(stream) => connection.insert(BufReader::new(stream)),
                Err(error) => {
                    lock(report).record_failure(format!("connect: {error}"));
                    // Without a pause a refused connect would spin a core and drown the
                    // counts; a real client would back off too.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        match exchange(reader, request.as_bytes()) {
            Ok(response) => {
                let ok = (200..300).contains(&response.status);
                {
                    let mut report = lock(report);
                    if ok {
                        report.record_success(
                            response.version.unwrap_or_else(|| NO_VERSION.to_owned()),
                        );
                    } else {
                        report.record_failure(format!("status {}", response.status));
                    }
                }
                if response.close {
                    connection = None;
                }
            }
            Err(error) => {
                lock(report).record_failure(error);
                connection = None;
            }
        }
    }
}

fn connect(options: &LoadOptions) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&options.address, options.timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(options.timeout))?;
    stream.set_write_timeout(Some(options.timeout))?;
    Ok(stream)
}

struct Response {
    status: u16,
    version: Option<String>,
    /// The server will close the connection after this response.
    close: bool,
}

/// Sends one request and reads one whole response (head and body) from the connection.
fn exchange(reader: &mut BufReader<TcpStream>, request: &[u8]) -> Result<Response, String> {
    reader
        .get_mut()
        .write_all(request)
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    let read_line = |reader: &mut BufReader<TcpStream>, line: &mut String| {
        line.clear();
        match reader.read_line(line) {
            Ok(0) => Err("the connection closed before a complete response".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("receive: {e}")),
        }
    };
    read_line(reader, &mut line)?;
    let status = parse_status_line(&line)?;
    let mut version = None;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = line.starts_with("HTTP/1.0");
    loop {
        read_line(reader, &mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("malformed header line {header:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case(VERSION_HEADER) {
            version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .map_err(|_| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if chunked {
        read_chunked(reader)?;
    } else if let Some(length) = length {
        let mut body = vec![0; length];
        reader
            .read_exact(&mut body)
            .map_err(|e| format!("the body was cut short: {e}"))?;
    } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
        // No length: the body runs to the end of the connection.
        let mut sink = Vec::new();
        reader
            .read_to_end(&mut sink)
            .map_err(|e| format!("receive: {e}"))?;
        close = true;
    }
    Ok(Response {
        status,
        version,
        close,
    })
}

fn parse_status_line(line: &str) -> Result<u16, String> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(status))) if v.starts_with("HTTP/1.") => Ok(status),
        _ => Err(format!("malformed status line {:?}", line.trim_end())),
    }
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("receive: {e}"))?;
        let size = line.trim_end().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| format!("bad chunk size {:?}", line.trim_end()))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => return Err("the connection closed inside a chunked body".into()),
                    Ok(_) if line.trim_end().is_empty() => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
        }
        let mut chunk = vec![0; size + 2];
        reader
            .read_exact(&mut chunk)
            .map_err(|e| format!("the body was cut short: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicU64;

    /// A tiny keep-alive server on 127.0.0.1:0 answering with the version it currently
    /// holds; with `close_every = Some(n)` it drops each connection, unanswered, at its
    /// n-th request (the negative control). Stopped on drop.
    struct TestServer {
        address: SocketAddr,
        version: Arc<Mutex<String>>,
        stop: Arc<AtomicBool>,
        accept: Option<JoinHandle<()>>,
    }

    impl TestServer {
        fn start(close_every: Option<u64>, chunked: bool) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            let version = Arc::new(Mutex::new("v1".to_owned()));
            let stop = Arc::new(AtomicBool::new(false));
            let accept = {
                let (version, stop) = (version.clone(), stop.clone());
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(stream) = stream else { continue };
                        let version = version.clone();
                        std::thread::spawn(move || serve(stream, &version, close_every, chunked));
                    }
                })
            };
            TestServer {
                address,
                version,
                stop,
                accept: Some(accept),
            }
        }

        fn set_version(&self, version: &str) {
            *self.version.lock().unwrap() = version.to_owned();
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so it sees the flag.
            let _ = TcpStream::connect(self.address);
            if let Some(accept) = self.accept.take() {
                let _ = accept.join();
            }
        }
    }

    fn serve(stream: TcpStream, version: &Mutex<String>, close_every: Option<u64>, chunked: bool) {
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let served = AtomicU64::new(0);
        loop {
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let n = served.fetch_add(1, Ordering::SeqCst) + 1;
            if close_every.is_some_and(|every| n.is_multiple_of(every)) {
                return;
            }
            let version = version.lock().unwrap().clone();
            let response = if chunked {
                format!(
                    "HTTP/1.1 200 OK\r\nx-hello-version: {version}\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhi\n\r\n0\r\n\r\n"
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nX-Hello-Version: {version}\r\ncontent-length: 3\r\n\r\nhi\n"
                )
            };
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_healthy_server_sees_no_failures_and_the_version_switch() {
        for chunked in [false, true] {
            let server = TestServer::start(None, chunked);
            let load = Load::start(server.address, 4);
            wait_until("v1 responses", || load.snapshot().total >= 200);
            server.set_version("v2");
            let switched = load.snapshot().versions.get("v1").copied().unwrap_or(0);
            wait_until("v2 responses", || {
                load.snapshot().versions.get("v2").copied().unwrap_or(0) >= 200
            });
            let report = load.stop();
            assert_eq!(report.failed, 0, "{:?}", report.failures);
            assert_eq!(report.total, report.versions.values().sum::<u64>());
            // Requests in flight at the switch may complete with v1 after another
            // connection's first v2, so the sequence may flip a few times, then ends at v2.
            assert_eq!(
                report.version_sequence.first().map(String::as_str),
                Some("v1")
            );
            assert_eq!(report.last_version.as_deref(), Some("v2"), "{report:?}");
            assert!(report.version_changes <= 1 + 2 * 4, "{report:?}");
            assert!(report.versions["v1"] <= switched + 4, "{report:?}");
        }
    }

    #[test]
    fn connections_closed_mid_request_are_counted_and_the_load_goes_on() {
        let server = TestServer::start(Some(5), false);
        let load = Load::start(server.address, 2);
        wait_until("failures", || load.snapshot().failed >= 10);
        let report = load.stop();
        assert!(report.failed >= 10);
        // Each connection answered 4 requests before failing the 5th: the workers
        // reconnected after every failure instead of stopping.
        assert!(report.total - report.failed >= 4 * 10, "{report:?}");
        assert!(
            report.failures[0].contains("closed before a complete response")
                || report.failures[0].starts_with("receive:"),
            "{:?}",
            report.failures
        );
        assert!(report.failures.len() <= FAILURE_SAMPLE);
    }

    #[test]
    fn a_closed_port_is_counted_as_failures() {
        let address = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let load = Load::start(address, 1);
        wait_until("refused connects", || load.snapshot().failed >= 3);
        let report = load.stop();
        assert_eq!(report.total, report.failed);
        assert!(report.failures[0].starts_with("connect:"), "{report:?}");
        assert!(report.versions.is_empty());
    }

    #[test]
    fn non_2xx_statuses_are_failures() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        let _ = writer.write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                        );
                    }
                    line.clear();
                }
            }
        });
        let load = Load::start(address, 1);
        wait_until("503s", || load.snapshot().failed >= 5);
        let report = load.stop();
        assert_eq!(report.failures[0], "status 503");
        assert_eq!(report.total, report.failed);
    }

    #[test]
    fn a_flip_flopping_sequence_is_capped_but_counted() {
        let mut report = LoadReport::default();
        for i in 0..1000 {
            report.record_success(format!("v{}", i % 2));
            report.record_success(format!("v{}", i % 2));
        }
        assert_eq!(report.version_sequence.len(), SEQUENCE_LIMIT);
        assert_eq!(report.version_sequence[..3], ["v0", "v1", "v0"]);
        assert_eq!(report.version_changes, 999);
        assert_eq!(report.last_version.as_deref(), Some("v1"));
        assert_eq!(report.versions["v0"], 1000);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(parse_status_line("HTTP/1.0 503\r\n"), Ok(503));
        assert!(parse_status_line("SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line("HTTP/1.1 abc\r\n").is_err());
        assert!(parse_status_line("").is_err());
    }
}
