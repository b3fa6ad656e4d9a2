//! One route: a listener that forwards each request to a ready instance of the current
//! backend snapshot, holding requests while none is ready and retrying idempotent ones that
//! could not reach an instance.
//!
//! Each route serves on threads of its own (`RouteOptions::threads`), each with a
//! single-threaded runtime and each connection wholly on one of them (`serving`); the API
//! (bind, set_backends, drain, metrics, shutdown) is called from the controller's runtime
//! and talks to them through the snapshot, atomics, Notify and watch, which work across
//! runtimes. Everything the threads share (the snapshot, in-flight and held counts, the
//! counters, the connection count) is one atomic value per fact, so it stays exact whatever
//! thread a request is on.
//!
//! The hot path loads the snapshot with one arc-swap load, picks the least busy ready
//! instance, takes a pooled keep-alive connection and streams both bodies. It allocates no
//! snapshot, takes no lock but the pool's (held for one push or pop) and each connection's
//! held writes' (`batched`: its own thread's, uncontended), and logs nothing. Writes to the
//! client and to the instance go out with the route thread's batch (`batched`).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::time::Sleep;

use super::backends::BackendSet;
use super::batched::Batched;
use super::body::ProxyBody;
use super::faults::{Effect, FAULT_HEADER, Fault, Faults, InjectedReset};
use super::http1::{ExchangeError, Head, Upload};
use super::limits::budget;
use super::metrics::{ReleaseCounters, UnroutedCounters};
use super::serving::{self, Connections, Open, Serving, Stop, Takeover, Workers};
use super::upstream::{Instance, Lease};
use super::{Backend, ProxyError, RouteMetrics, RouteOptions};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_GRAVEN_ERROR: HeaderName = HeaderName::from_static("x-graven-error");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The answer's head and a small body are copied into one buffer and written to the client
/// with one plain write: fewer instructions on both sides of the system call than a vectored
/// write of the parts (measured with `perf stat` under bench/proxy.sh's load). The request
/// to the instance goes out the same way (`http1`).
const WRITEV: bool = false;

/// One listener serving one stable address.
#[derive(Debug)]
pub struct Route {
    shared: Arc<Shared>,
    serving: Serving,
}

/// What the route's tasks share.
#[derive(Debug)]
struct Shared {
    options: RouteOptions,
    local_addr: SocketAddr,
    backends: BackendSet,
    unrouted: UnroutedCounters,
    connections: Arc<Connections>,
    workers: Arc<Workers>,
    /// What connections' request times are counted from (see `Activity`).
    epoch: Instant,
    /// How connections are served (HTTP/1.1 and HTTP/2, with the route's timeouts).
    server: auto::Builder<TokioExecutor>,
    /// Open connections, asked to close when the route shuts down.
    closing: Arc<Closing>,
    /// A planned failure's fault, when one is set (`set_fault`).
    faults: Faults,
}

impl Route {
    /// Binds the listener and starts serving with no backends: requests are held until
    /// `set_backends` gives it a ready instance.
    pub async fn bind(options: RouteOptions) -> Result<Route, ProxyError> {
        Route::start(options, None)
    }

    /// Serves `previous`'s address with new options (another thread count), taking its
    /// listening socket over: until `previous` is shut down both routes accept from the one
    /// queue, so no connection waiting in it is lost. Binds afresh when `previous` is
    /// stopping already.
    pub async fn take_over(
        options: RouteOptions,
        previous: &Takeover,
    ) -> Result<Route, ProxyError> {
        Route::start(options, Some(previous))
    }

    fn start(options: RouteOptions, from: Option<&Takeover>) -> Result<Route, ProxyError> {
        let address = options.listen;
        // A malformed GRAVEN_ROUTE_* override fails the bind instead of being ignored.
        options.clone().apply_environment()?;
        let bound = serving::bind(address, options.threads, from)?;
        let local_addr = bound.local_addr;
        let workers = Workers::new(&bound);
        let backends = BackendSet::new(
            local_addr,
            false,
            options.hold_queue,
            options.hold_timeout,
            workers.count(),
        );
        let connections = Arc::new(Connections::new(options.max_connections));
        let server = server(&options);
        let shared = Arc::new(Shared {
            options,
            local_addr,
            backends,
            unrouted: UnroutedCounters::default(),
            connections,
            workers,
            epoch: Instant::now(),
            server,
            closing: Arc::new(Closing::default()),
            faults: Faults::default(),
        });
        let serving = Arc::clone(&shared);
        let serving = Serving::spawn(
            bound,
            "graven-route",
            address,
            move |stop, listener| async move {
                // accept owns the listener: when it returns, the address is free again
                // (unless a successor took it over).
                let Stop { requested, unbound } = stop;
                accept(listener, Arc::clone(&serving), requested).await;
                let _ = unbound.send(());
                serving.closing.close_all().await;
            },
        )?;
        Ok(Route { shared, serving })
    }

    /// The listening socket, for a successor with other options (`take_over`).
    pub fn takeover(&self) -> Option<Takeover> {
        self.serving.takeover()
    }

    /// How many threads the route serves on.
    pub fn threads(&self) -> usize {
        self.shared.workers.count()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Replaces the backend set atomically. Requests go to backends that are healthy and
    /// enabled; in-flight counts and pooled connections carry over by instance id; a
    /// removed instance's idle connections are closed and never reused.
    pub fn set_backends(&self, backends: Vec<Backend>) {
        self.shared.backends.set(backends);
    }

    pub fn backends(&self) -> Vec<Backend> {
        self.shared.backends.backends()
    }

    /// Marks the instance not enabled (if still present) and waits until its in-flight
    /// requests have finished or `timeout` passes; returns how many were still in flight at
    /// the end (0 = clean).
    pub async fn drain(&self, instance: &str, timeout: Duration) -> usize {
        self.shared.backends.drain(instance, timeout).await
    }

    pub fn in_flight(&self, instance: &str) -> usize {
        self.shared.backends.in_flight(instance)
    }

    /// Requests waiting for a ready instance right now.
    pub fn held(&self) -> usize {
        self.shared.backends.held()
    }

    pub fn metrics(&self) -> RouteMetrics {
        let shared = &self.shared;
        let mut metrics = serving::metrics(
            &shared.backends,
            &shared.unrouted,
            &shared.connections,
            &shared.workers,
        );
        metrics.injected = shared.faults.counts();
        metrics
    }

    /// Sets (or, with None, clears) the fault the route injects into a share of requests.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.faults.set(fault);
    }

    /// Client connections open on this route now.
    pub fn connections(&self) -> usize {
        self.shared.connections.count()
    }

    /// Stops accepting, lets every connection finish the request it is serving, then closes.
    pub async fn shutdown(mut self) {
        self.serving.shutdown().await;
    }
}

impl Shared {
    /// Serves one request, unless a fault hits it.
    async fn serve_request(
        self: Arc<Self>,
        request: Request<Incoming>,
        client_ip: HeaderValue,
        start: Instant,
    ) -> Result<Response<ProxyBody>, InjectedReset> {
        // One call of `handle` whatever the fault: each await of it would hold space of its
        // own in this future, which is moved whole into the connection's task per request.
        let (start, delayed) = match self.faults.draw() {
            None => (start, false),
            Some(Effect::Reset) => return Err(InjectedReset),
            Some(Effect::Error(status)) => {
                let status = http::StatusCode::from_u16(status)
                    .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
                let mut response = Response::new(ProxyBody::full("injected fault"));
                *response.status_mut() = status;
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                headers.insert(FAULT_HEADER, HeaderValue::from_static("error"));
                return Ok(response);
            }
            Some(Effect::Latency(delay)) => {
                tokio::time::sleep(delay).await;
                // Timed from here: the route's latency figures are the service's own.
                (Instant::now(), true)
            }
        };
        let mut response = self.handle(request, client_ip, start).await;
        if delayed {
            response
                .headers_mut()
                .insert(FAULT_HEADER, HeaderValue::from_static("latency"));
        }
        Ok(response)
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        client_ip: HeaderValue,
        start: Instant,
    ) -> Response<ProxyBody> {
        match self.forward(request, client_ip, start).await {
            Ok(response) => response,
            Err((error, counters)) => {
                let class = error.class();
                match counters {
                    Some(counters) => counters.error(class, start.elapsed()),
                    None => self.unrouted.error(class),
                }
                error_response(&error)
            }
        }
    }

    /// Sends the request to an instance and returns its answer, or the error to answer with
    /// and the release it is counted against (None when no instance was reached).
    async fn forward(
        &self,
        request: Request<Incoming>,
        client_ip: HeaderValue,
        start: Instant,
    ) -> Result<Response<ProxyBody>, (ProxyError, Option<Arc<ReleaseCounters>>)> {
        let (mut parts, body) = request.into_parts();
        let idempotent = is_idempotent(&parts.method);
        prepare_request(&mut parts, client_ip);
        let mut upload = Upload::new(&parts, body);
        // When the request goes out: the answer timer starts then, not while it was held.
        let (mut lease, mut sent_at) = match self.backends.try_acquire(&[]) {
            Some(lease) => (lease, start),
            None => (
                Box::pin(self.backends.hold())
                    .await
                    .map_err(|error| (error, None))?,
                Instant::now(),
            ),
        };
        // Instances that failed this request (refused the connection or closed it before
        // answering); a retry never goes back to one. Allocated only when one does.
        let mut failed_on: Vec<Arc<Instance>> = Vec::new();
        let mut attempt = 0;
        // Re-sends after a stale pooled connection; they do not use up `retries`, but are
        // capped so a backend that keeps closing reused connections cannot loop a request.
        let mut stale_resends = 0;
        loop {
            let mut stale = false;
            let error = match lease
                .connect(self.options.connect_timeout, self.local_addr)
                .await
            {
                Err(error) => {
                    failed_on.push(Arc::clone(lease.instance()));
                    error
                }
                Ok(()) => {
                    let deadline = sent_at + self.options.response_timeout;
                    let exchanged = lease
                        .connection()
                        .exchange(&parts, &mut upload, deadline)
                        .await;
                    let failure = match exchanged {
                        Ok(head) => return Ok(respond(head, upload, lease, start)),
                        Err(failure) => failure,
                    };
                    lease.discard_connection();
                    let instance = lease.instance();
                    let counters = Some(Arc::clone(&instance.counters));
                    match failure {
                        ExchangeError::Timeout => {
                            let error = ProxyError::UpstreamTimeout {
                                instance: instance.id.clone(),
                                address: instance.address,
                                after: self.options.response_timeout,
                            };
                            return Err((error, counters));
                        }
                        ExchangeError::Client(source) => {
                            return Err((ProxyError::Client { source }, counters));
                        }
                        ExchangeError::Invalid(source) => {
                            let error = ProxyError::Upstream {
                                instance: instance.id.clone(),
                                address: instance.address,
                                source,
                            };
                            return Err((error, counters));
                        }
                        ExchangeError::Closed(source) => {
                            // Nothing of the body was taken yet, so all of the request can
                            // be sent again (the route only does for idempotent methods).
                            let repeatable = !upload.started();
                            let error = ProxyError::Closed {
                                instance: instance.id.clone(),
                                address: instance.address,
                                repeatable,
                                source,
                            };
                            if !repeatable {
                                return Err((error, counters));
                            }
                            if lease.reused() && stale_resends < MAX_STALE_RESENDS {
                                stale = true;
                            } else {
                                failed_on.push(Arc::clone(instance));
                            }
                            error
                        }
                    }
                }
            };
            let counters = Arc::clone(&lease.instance().counters);
            drop(lease);
            if !(idempotent && error.retry_safe() && (stale || attempt < self.options.retries)) {
                return Err((error, Some(counters)));
            }
            let Some(next) = self.backends.try_acquire(&failed_on) else {
                return Err((error, Some(counters)));
            };
            if stale {
                stale_resends += 1;
            } else {
                attempt += 1;
            }
            self.unrouted.retry();
            lease = next;
            sent_at = Instant::now();
        }
    }
}

/// How many times one request may be re-sent after a reused connection closed under it.
const MAX_STALE_RESENDS: u32 = 4;

/// How a route serves its client connections: HTTP/1.1 and HTTP/2 with its timeouts.
fn server(options: &RouteOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1.1 head timer runs from when it starts waiting for a head, the idle wait
    // between requests included: it bounds a head that trickles in after the first request.
    // The first request's head and idle connections are `Watched`'s business.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout.max(options.idle_timeout))
        .writev(WRITEV);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Accepts until asked to stop, handing each connection within the caps to a route thread.
async fn accept(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let limit = shared.options.max_connections.min(budget().client_limit());
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    super::limits::exhausted(&error);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(open) = shared.connections.open() else {
            refuse(&shared, stream, limit);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Counted live from here, so that a shutdown waits for a connection still on its way
        // to another thread.
        let live = Live::new(&shared.closing);
        let serving = Arc::clone(&shared);
        shared.workers.dispatch(stream, move |stream| {
            serving.serve(stream, peer, open, live)
        });
    }
}

impl Shared {
    /// Serves one client connection on the calling route thread until it closes.
    async fn serve(self: Arc<Shared>, stream: TcpStream, peer: SocketAddr, open: Open, live: Live) {
        let client_ip = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value");
        let activity = Arc::new(Activity::default());
        let service = {
            let shared = Arc::clone(&self);
            let activity = Arc::clone(&activity);
            service_fn(move |request| {
                let shared = Arc::clone(&shared);
                let client_ip = client_ip.clone();
                let start = Instant::now();
                activity.request_began(start.saturating_duration_since(shared.epoch));
                shared.serve_request(request, client_ip, start)
            })
        };
        let connection = self
            .server
            .serve_connection(TokioIo::new(Batched::new(stream)), service)
            .into_owned();
        let connection = Watched::new(connection, live, open, activity, &self);
        // A client that goes away mid-request is its own business; nothing to report.
        let _ = connection.await;
    }
}

/// How long a refused connection is kept to read what its client already sent: closing a
/// socket with unread data sends a reset, which can destroy the answer before it is read.
const REFUSAL_LINGER: Duration = Duration::from_millis(250);

/// Answers a connection beyond the limit with 503 and `Connection: close`, without reading
/// its request, and closes it. When too many refusals are under way already (`limits::
/// REFUSING`), the connection is closed unanswered: a refusal must not cost more
/// descriptors than the reserve holds.
fn refuse(shared: &Shared, mut stream: TcpStream, limit: usize) {
    let Some(slot) = budget().refusal() else {
        return;
    };
    let error = ProxyError::ConnectionLimit {
        route: shared.local_addr,
        limit,
    };
    let body = format!("graven: {error}\n");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         x-graven-error: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        error.class().as_str(),
        body.len(),
    );
    tokio::spawn(async move {
        let _slot = slot;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    });
}

/// When the last request on a connection began, for its idle timer: milliseconds since the
/// route's epoch, plus one (zero means none yet). One relaxed store per request.
#[derive(Debug, Default)]
struct Activity {
    last_request: AtomicU64,
}

impl Activity {
    fn request_began(&self, since_epoch: Duration) {
        let millis = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX - 1);
        self.last_request.store(millis + 1, Ordering::Relaxed);
    }

    fn last_request(&self) -> Option<Duration> {
        match self.last_request.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(Duration::from_millis(millis - 1)),
        }
    }
}

/// Asks every open connection to finish the request it is serving and close, and waits for
/// them. A connection registers its task's waker once, so the per-poll cost of listening
/// for shutdown is one atomic load (a watch channel would be polled on every wake-up).
#[derive(Debug, Default)]
struct Closing {
    requested: AtomicBool,
    /// Connections accepted and not yet finished, whether or not polled yet.
    live: AtomicUsize,
    /// The wakers of the connections' tasks, registered on their first poll.
    wakers: Mutex<HashMap<u64, Waker>>,
    next_id: AtomicU64,
    all_closed: Notify,
}

impl Closing {
    async fn close_all(&self) {
        self.requested.store(true, Ordering::SeqCst);
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            for waker in self
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                waker.wake_by_ref();
            }
            closed.await;
        }
    }
}

/// A connection counted in `Closing::live` until dropped, from its accept on.
struct Live(Arc<Closing>);

impl Live {
    fn new(closing: &Arc<Closing>) -> Live {
        closing.live.fetch_add(1, Ordering::SeqCst);
        Live(Arc::clone(closing))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// How long a connection of a route that is shutting down must have been quiet (no request
/// begun) to be closed between requests. One that is busier is closed after the answer to
/// its next request (which then says `Connection: close`): closing it between two requests
/// would race the next one, which its client may be sending already.
const CLOSE_QUIET: Duration = Duration::from_secs(1);

/// A server connection that closes gracefully when its route shuts down, is closed if no
/// whole request head came within `header_timeout` of its accept, and closes gracefully
/// once no request began for `idle_timeout` (HTTP/1.1 after the answer in progress, HTTP/2
/// with GOAWAY, letting open streams finish).
struct Watched<C> {
    connection: Pin<Box<C>>,
    live: Live,
    id: u64,
    registered: bool,
    shutting_down: bool,
    activity: Arc<Activity>,
    /// Fires at the header deadline, then at each idle deadline.
    timer: Pin<Box<Sleep>>,
    /// No request has begun yet, as far as the timer knows: it is set for the header
    /// deadline.
    awaiting_first: bool,
    /// When the route asked it to close (since the route's epoch), and the timer for
    /// `CLOSE_QUIET`: set once it does.
    closing: Option<(Duration, Pin<Box<Sleep>>)>,
    shared: Arc<Shared>,
    _open: Open,
}

impl<C: GracefulConnection> Watched<C> {
    fn new(
        connection: C,
        live: Live,
        open: Open,
        activity: Arc<Activity>,
        shared: &Arc<Shared>,
    ) -> Watched<C> {
        let id = live.0.next_id.fetch_add(1, Ordering::Relaxed);
        let timer = Box::pin(tokio::time::sleep(shared.options.header_timeout));
        Watched {
            connection: Box::pin(connection),
            live,
            id,
            registered: false,
            shutting_down: false,
            activity,
            timer,
            awaiting_first: true,
            closing: None,
            shared: Arc::clone(shared),
            _open: open,
        }
    }

    /// Checks the timer; when it fired early for the idle deadline (a request began since
    /// it was armed), re-arms it for the new one.
    fn idleness(&mut self, cx: &mut Context<'_>) -> Idleness {
        if self.awaiting_first
            && let Some(first) = self.activity.last_request()
        {
            // The first request began: from now on the idle deadline counts. Later requests
            // only move it later, which is found when the timer fires (see below), so no
            // request pays for a timer reset.
            self.awaiting_first = false;
            let shared = &self.shared;
            let deadline = shared.epoch + first + shared.options.idle_timeout;
            self.timer.as_mut().reset(deadline.into());
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Idleness::Busy;
        }
        let shared = &self.shared;
        let Some(last) = self.activity.last_request() else {
            return Idleness::NeverAsked;
        };
        let deadline = shared.epoch + last + shared.options.idle_timeout;
        if Instant::now() >= deadline {
            return Idleness::Idle;
        }
        self.timer.as_mut().reset(deadline.into());
        // Polled once so that the new deadline wakes this task.
        let _ = self.timer.as_mut().poll(cx);
        Idleness::Busy
    }
}

impl<C> Watched<C> {
    /// Whether the connection may close now that its route is shutting down: once a request
    /// began since (it is in progress, and its answer will say `Connection: close`), or once
    /// none began for `CLOSE_QUIET`. One that never had a request waits for its first:
    /// closing it would drop a request its client already sent (hyper cannot shut down
    /// gracefully before it knows the protocol, and closing a socket with unread data
    /// resets it); the header timeout bounds that wait.
    fn may_close(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(last) = self.activity.last_request() else {
            return false;
        };
        let epoch = self.shared.epoch;
        let now = Instant::now();
        let quiet_until = epoch + last + CLOSE_QUIET;
        let (asked, timer) = self.closing.get_or_insert_with(|| {
            let asked = now.saturating_duration_since(epoch);
            (
                asked,
                Box::pin(tokio::time::sleep_until(quiet_until.into())),
            )
        });
        if last > *asked || now >= quiet_until {
            return true;
        }
        timer.as_mut().reset(quiet_until.into());
        timer.as_mut().poll(cx).is_ready()
    }
}

enum Idleness {
    /// A request began within the idle timeout, or the header timeout has not passed.
    Busy,
    /// No whole request head within the header timeout: nothing is in flight.
    NeverAsked,
    /// No request began within the idle timeout.
    Idle,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = Result<(), C::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.shutting_down {
            if !this.registered {
                // A task's waker stays the same across its polls, so once is enough; the
                // flag is read after registering, so a shutdown in between still wakes us.
                this.live
                    .0
                    .wakers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(this.id, cx.waker().clone());
                this.registered = true;
            }
            let close = this.live.0.requested.load(Ordering::SeqCst) && this.may_close(cx);
            match (close, this.idleness(cx)) {
                (true, _) | (false, Idleness::Idle) => {
                    this.connection.as_mut().graceful_shutdown();
                    this.shutting_down = true;
                }
                // Nothing to finish: the connection is dropped, which closes it.
                (false, Idleness::NeverAsked) => return Poll::Ready(Ok(())),
                (false, Idleness::Busy) => {}
            }
        }
        this.connection.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        // `live` is dropped after this, so the connection counts until it is unregistered.
        if self.registered {
            let mut wakers = self
                .live
                .0
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            wakers.remove(&self.id);
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Turns the client's request head into the one the instance gets: origin-form target, a
/// Host header, no hop-by-hop headers, X-Forwarded-For/-Proto, HTTP/1.1.
fn prepare_request(parts: &mut Parts, client_ip: HeaderValue) {
    if parts.uri.authority().is_some() {
        // HTTP/2 (and absolute-form HTTP/1.1) carry the host in the target, instances get
        // it in Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
    }
    strip_hop_by_hop(&mut parts.headers);
    let forwarded = match parts.headers.get(&X_FORWARDED_FOR) {
        None => client_ip,
        Some(earlier) => {
            let mut joined = earlier.as_bytes().to_vec();
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or(client_ip)
        }
    };
    parts.headers.insert(X_FORWARDED_FOR.clone(), forwarded);
    parts
        .headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    parts.version = Version::HTTP_11;
}

/// Removes the headers that belong to one connection, not to the message (RFC 9110 7.6.1),
/// including any the Connection header names. One pass over the names finds which are
/// present; most messages carry none, or only `Connection: keep-alive`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(index) = HOP_BY_HOP.iter().position(|hop| *hop == name) {
            present |= 1 << index;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Only names other than the usual close / keep-alive tokens need a lookup; collecting
        // none allocates nothing.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.eq_ignore_ascii_case("close") && !token.eq_ignore_ascii_case("keep-alive")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(*name);
        }
    }
}

/// Connection first: `strip_hop_by_hop` reads bit 0 as "a Connection header is present".
static HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
];

fn respond(head: Head, upload: Upload, lease: Lease, start: Instant) -> Response<ProxyBody> {
    lease
        .instance()
        .counters
        .response(head.status.as_u16(), start.elapsed());
    let Head {
        status,
        mut headers,
        decoder,
        keep_alive,
    } = head;
    strip_hop_by_hop(&mut headers);
    let spoiled = !keep_alive || upload.broken();
    let upload = (!upload.finished() && !upload.broken()).then_some(upload);
    let mut response = Response::new(ProxyBody::Upstream {
        lease,
        decoder,
        upload,
        spoiled,
    });
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let status = error.status();
    let mut response = Response::new(ProxyBody::full(
        status.canonical_reason().unwrap_or("proxy error"),
    ));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        X_GRAVEN_ERROR.clone(),
        HeaderValue::from_static(error.class().as_str()),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders the head the instance would get for a client request head.
    fn check(uri: &str, headers: &[(&str, &str)], expected: expect_test::Expect) {
        let mut request = Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        prepare_request(&mut parts, HeaderValue::from_static("10.0.0.9"));
        let mut rendered = format!("{} {:?}\n", parts.uri, parts.version);
        let mut lines: Vec<String> = parts
            .headers
            .iter()
            .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
            .collect();
        lines.sort();
        rendered.push_str(&lines.join("\n"));
        expected.assert_eq(&rendered);
    }

    #[test]
    fn request_heads_lose_hop_by_hop_headers_and_gain_forwarding() {
        check(
            "/a?b=1",
            &[
                ("host", "example.test"),
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("transfer-encoding", "chunked"),
                ("accept", "*/*"),
            ],
            expect_test::expect![[r#"
                /a?b=1 HTTP/1.1
                accept: */*
                host: example.test
                x-forwarded-for: 10.0.0.9
                x-forwarded-proto: http"#]],
        );
    }

    #[test]
    fn absolute_targets_become_origin_form_with_host() {
        check(
            "http://example.test:8000/path",
            &[("x-forwarded-for", "192.0.2.1")],
            expect_test::expect![[r#"
                /path HTTP/1.1
                host: example.test:8000
                x-forwarded-for: 192.0.2.1, 10.0.0.9
                x-forwarded-proto: http"#]],
        );
    }

    #[test]
    fn only_safe_and_idempotent_methods_repeat() {
        let repeatable: Vec<&str> = [
            "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH",
        ]
        .into_iter()
        .filter(|method| is_idempotent(&Method::from_bytes(method.as_bytes()).unwrap()))
        .collect();
        assert_eq!(
            repeatable,
            ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]
        );
    }
}
