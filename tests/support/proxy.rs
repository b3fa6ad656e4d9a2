//! Test backends and a client for the proxy tests. Backends are small hyper servers (or raw
//! TCP ones that misbehave on purpose) on 127.0.0.1:0, stopped when dropped.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use graven::proxy::{Backend, Route, RouteOptions};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A hyper backend. `/` answers its name; `/slow` waits until `open_gate`; `/hang` never
/// answers; `/echo` streams the request body back; `/healthz` follows `set_healthy`. Every
/// answer names the backend in `x-backend` and echoes the forwarding headers it got.
pub struct TestBackend {
    pub name: String,
    pub address: SocketAddr,
    state: Arc<BackendState>,
    task: JoinHandle<()>,
}

struct BackendState {
    name: String,
    hits: AtomicUsize,
    health_hits: AtomicUsize,
    connections: AtomicUsize,
    open: AtomicUsize,
    healthy: AtomicBool,
    gate: watch::Sender<bool>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a backend");
        let address = listener.local_addr().expect("backend address");
        let state = Arc::new(BackendState {
            name: name.to_owned(),
            hits: AtomicUsize::new(0),
            health_hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            gate: watch::Sender::new(false),
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                shared.open.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn({
                        let state = Arc::clone(&state);
                        move |request| {
                            let state = Arc::clone(&state);
                            async move { Ok::<_, Infallible>(answer(&state, request).await) }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    state.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        TestBackend {
            name: name.to_owned(),
            address,
            state,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn health_hits(&self) -> usize {
        self.state.health_hits.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Connections currently open to this backend.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Lets every `/slow` request, waiting or future, answer.
    pub fn open_gate(&self) {
        self.state.gate.send_replace(true);
    }

    pub fn backend(&self, release: u64) -> Backend {
        backend(&self.name, release, self.address)
    }
}

async fn answer(state: &BackendState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    if path == "/healthz" {
        state.health_hits.fetch_add(1, Ordering::SeqCst);
        let status = if state.healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut response = Response::builder().header("x-backend", state.name.as_str());
    for name in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "connection",
        "x-secret",
    ] {
        if let Some(value) = request.headers().get(name) {
            response = response.header(format!("x-seen-{name}"), value);
        }
    }
    let body = match path.as_str() {
        "/slow" => {
            let mut gate = state.gate.subscribe();
            let _ = gate.wait_for(|open| *open).await;
            Bytes::from(state.name.clone())
        }
        "/hang" => std::future::pending().await,
        "/echo" => request
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default(),
        _ => Bytes::from(state.name.clone()),
    };
    response.body(Full::new(body)).unwrap()
}

/// A backend on raw TCP that misbehaves on purpose, one handler run per connection.
pub struct RawBackend {
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    /// Reads the request head and then writes `reply` (which may be nothing, or not HTTP at
    /// all) and closes the connection.
    pub async fn start(reply: &'static [u8]) -> RawBackend {
        RawBackend::serve(async move |mut stream| {
            if read_head(&mut stream).await.is_some() {
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
            }
        })
        .await
    }

    /// Answers the first request on each connection (keeping it alive) and closes the
    /// connection without answering when a second request arrives on it: an instance whose
    /// keep-alive timeout races with a request on an idle connection.
    pub async fn one_answer_per_connection() -> RawBackend {
        RawBackend::serve(async |mut stream| {
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst";
            if read_head(&mut stream).await.is_some() && stream.write_all(reply).await.is_ok() {
                let _ = read_head(&mut stream).await;
            }
        })
        .await
    }

    /// Runs `handle` for each connection.
    pub async fn serve<F>(handle: impl Fn(TcpStream) -> F + Send + 'static) -> RawBackend
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a raw backend");
        let address = listener.local_addr().expect("raw backend address");
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(handle(stream));
            }
        });
        RawBackend { address, task }
    }
}

/// Reads up to the end of a request head and returns what was read (with whatever of the
/// body came along); None when the connection ends first.
pub async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
    Some(head)
}

/// An address nothing listens on: bound once to get a free port, then closed.
pub async fn refusing_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

pub fn backend(instance: &str, release: u64, address: SocketAddr) -> Backend {
    Backend {
        instance: instance.to_owned(),
        release,
        address,
        healthy: true,
        enabled: true,
    }
}

/// A route on 127.0.0.1:0 with the given changes to the default options.
pub async fn route(configure: impl FnOnce(&mut RouteOptions)) -> Route {
    let mut options = RouteOptions::new("127.0.0.1:0".parse().unwrap());
    configure(&mut options);
    Route::bind(options).await.expect("bind the route")
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client speaking cleartext prior knowledge (h2c).
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub version: http::Version,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |value| value.to_str().unwrap_or(""))
    }
}

pub async fn send(
    client: &TestClient,
    method: Method,
    address: SocketAddr,
    path: &str,
    body: Bytes,
) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .body(Full::new(body))
        .unwrap();
    let response = client.request(request).await.expect("the proxy answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(client: &TestClient, address: SocketAddr, path: &str) -> Answer {
    send(client, Method::GET, address, path, Bytes::new()).await
}

/// Polls `condition` every few milliseconds until it holds or `deadline` passes.
pub async fn eventually(deadline: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
