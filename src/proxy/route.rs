//! One route: a listener that forwards each request to a ready instance of the current
//! backend snapshot, holding requests while none is ready and retrying idempotent ones that
//! could not reach an instance.
//!
//! Each route serves on its own thread with a single-threaded runtime; the API (bind,
//! set_backends, drain, metrics, shutdown) is called from the controller's runtime and talks
//! to it through the snapshot, atomics, Notify and watch, which work across runtimes.
//!
//! The hot path loads the snapshot with one arc-swap load, picks the least busy ready
//! instance, takes a pooled keep-alive connection and streams both bodies. It allocates no
//! snapshot, takes no lock but the pool's (held for one push or pop) and logs nothing.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Sleep;

use super::body::{ForwardBody, ProxyBody};
use super::limits::{Slot, budget};
use super::metrics::{ReleaseCounters, UnroutedCounters};
use super::upstream::{Instance, Lease, choose};
use super::{Backend, ProxyError, RouteMetrics, RouteOptions};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_GRAVEN_ERROR: HeaderName = HeaderName::from_static("x-graven-error");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Heads and small bodies are copied into one buffer and written with one plain write:
/// fewer instructions on both sides of the system call than a vectored write of the parts
/// (measured with `perf stat` under bench/proxy.sh's load).
const WRITEV: bool = false;

/// One listener serving one stable address.
#[derive(Debug)]
pub struct Route {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    /// Fires when the route's thread has stopped listening.
    listener_closed: Mutex<std::sync::mpsc::Receiver<()>>,
    /// Fires when the route's thread has closed every connection and ended.
    done: Option<oneshot::Receiver<()>>,
}

/// What the route's tasks share.
#[derive(Debug)]
struct Shared {
    options: RouteOptions,
    local_addr: SocketAddr,
    snapshot: ArcSwap<Snapshot>,
    /// Bumped on every snapshot swap; held requests wait on it.
    changed: watch::Sender<u64>,
    /// Where the next scan for a ready instance starts (round-robin among equals).
    next: AtomicUsize,
    /// Requests currently held for want of a ready instance.
    held: AtomicUsize,
    /// The instances by id, across snapshots; touched by set_backends, drain and metrics only.
    registry: Mutex<Registry>,
    client: hyper::client::conn::http1::Builder,
    unrouted: UnroutedCounters,
    /// Client connections open now, and refused for the connection limit since the start.
    connections: AtomicUsize,
    refused: AtomicU64,
    /// What connections' request times are counted from (see `Activity`).
    epoch: Instant,
}

/// An immutable backend set, swapped whole.
#[derive(Debug, Default)]
struct Snapshot {
    backends: Vec<Backend>,
    /// The instances that are healthy and enabled, in backend order.
    ready: Vec<Arc<Instance>>,
}

#[derive(Debug, Default)]
struct Registry {
    instances: HashMap<String, Arc<Instance>>,
    /// Removed instances some request may still hold, so drain and in_flight can see them.
    retired: Vec<Weak<Instance>>,
    releases: BTreeMap<u64, Arc<ReleaseCounters>>,
}

impl Route {
    /// Binds the listener and starts serving with no backends: requests are held until
    /// `set_backends` gives it a ready instance.
    pub async fn bind(options: RouteOptions) -> Result<Route, ProxyError> {
        let address = options.listen;
        // A malformed GRAVEN_ROUTE_* override fails the bind instead of being ignored.
        options.clone().apply_environment()?;
        let bind_error = |source| ProxyError::Bind { address, source };
        // The route serves on its own thread with a single-threaded runtime, whatever runtime
        // the caller uses: a request's server side, its upstream connection and its timers
        // then never wake each other across threads (that costs CPU and latency per request).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(bind_error)?;
        let listening = {
            // The listener registers with the route's runtime, not the caller's.
            let _entered = runtime.enter();
            listen(address).and_then(|listener| Ok((listener.local_addr()?, listener)))
        };
        let (local_addr, listener) = match listening {
            Ok(listening) => listening,
            Err(source) => {
                // Dropping a runtime blocks, which an async caller must not do.
                runtime.shutdown_background();
                return Err(bind_error(source));
            }
        };
        let mut client = hyper::client::conn::http1::Builder::new();
        client.max_buf_size(256 * 1024).writev(WRITEV);
        let shared = Arc::new(Shared {
            options,
            local_addr,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            changed: watch::Sender::new(0),
            next: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            registry: Mutex::new(Registry::default()),
            client,
            unrouted: UnroutedCounters::default(),
            connections: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let (stop, stopped) = oneshot::channel();
        let (finished, done) = oneshot::channel();
        let (unbound, listener_closed) = std::sync::mpsc::channel();
        let serving = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("graven-route".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    // accept owns the listener: when it returns, the address is free again.
                    let closing = accept(listener, serving, stopped).await;
                    let _ = unbound.send(());
                    closing.close_all().await;
                });
                let _ = finished.send(());
            })
            .map_err(bind_error)?;
        Ok(Route {
            shared,
            stop: Some(stop),
            listener_closed: Mutex::new(listener_closed),
            done: Some(done),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Replaces the backend set atomically. Requests go to backends that are healthy and
    /// enabled; in-flight counts and pooled connections carry over by instance id; a
    /// removed instance's idle connections are closed and never reused.
    pub fn set_backends(&self, backends: Vec<Backend>) {
        let mut registry = self.shared.registry();
        self.shared.install(&mut registry, backends);
    }

    pub fn backends(&self) -> Vec<Backend> {
        self.shared.snapshot.load().backends.clone()
    }

    /// Marks the instance not enabled (if still present) and waits until its in-flight
    /// requests have finished or `timeout` passes; returns how many were still in flight at
    /// the end (0 = clean).
    pub async fn drain(&self, instance: &str, timeout: Duration) -> usize {
        let targets: Vec<Arc<Instance>> = {
            let mut registry = self.shared.registry();
            if registry.instances.contains_key(instance) {
                let mut backends = self.shared.snapshot.load().backends.clone();
                for backend in backends
                    .iter_mut()
                    .filter(|backend| backend.instance == instance)
                {
                    backend.enabled = false;
                }
                self.shared.install(&mut registry, backends);
            }
            registry.matching(instance).collect()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut left = 0;
        for target in targets {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            left += target.wait_drained(remaining).await;
        }
        left
    }

    pub fn in_flight(&self, instance: &str) -> usize {
        self.shared
            .registry()
            .matching(instance)
            .map(|target| target.in_flight())
            .sum()
    }

    /// Requests waiting for a ready instance right now.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    pub fn metrics(&self) -> RouteMetrics {
        let releases = self
            .shared
            .registry()
            .releases
            .values()
            .map(|counters| counters.snapshot())
            .collect();
        let mut metrics = self
            .shared
            .unrouted
            .metrics(self.shared.local_addr, releases);
        metrics.connections = self.shared.connections.load(Ordering::Relaxed) as u64;
        metrics.refused = self.shared.refused.load(Ordering::Relaxed);
        metrics
    }

    /// Client connections open on this route now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets every connection finish the request it is serving, then closes.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for Route {
    /// A route dropped without `shutdown` lets its connections finish in the background, but
    /// frees its address before returning, so that a successor can bind it at once. That
    /// wait is the route thread noticing the stop: microseconds, bounded anyway.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take()
            && stop.send(()).is_ok()
        {
            let listener_closed = self
                .listener_closed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let _ = listener_closed.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// A listening socket with the backlog and address reuse a busy route wants (what
/// `TcpListener::bind` does, but without needing to be async).
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

impl Registry {
    fn matching<'a>(&'a self, id: &'a str) -> impl Iterator<Item = Arc<Instance>> + 'a {
        let current = self.instances.get(id).cloned();
        let retired = self
            .retired
            .iter()
            .filter_map(Weak::upgrade)
            .filter(move |old| old.id == id);
        current.into_iter().chain(retired)
    }
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Swaps in a new snapshot. Instances that become routable are flagged before the swap
    /// (a request that finds them in the new snapshot must be able to lease them); those that
    /// stop being routable are flagged after it, so that a drain that follows sees every
    /// request that could still pick them from the older snapshot.
    fn install(&self, registry: &mut Registry, backends: Vec<Backend>) {
        let mut instances = HashMap::with_capacity(backends.len());
        let mut ready = Vec::new();
        let mut unroutable = Vec::new();
        for backend in &backends {
            if instances.contains_key(&backend.instance) {
                continue;
            }
            let instance = match registry.instances.remove(&backend.instance) {
                Some(existing)
                    if existing.address == backend.address
                        && existing.release == backend.release =>
                {
                    existing
                }
                replaced => {
                    if let Some(old) = replaced {
                        old.retire();
                        registry.retired.push(Arc::downgrade(&old));
                    }
                    let counters = registry
                        .releases
                        .entry(backend.release)
                        .or_insert_with(|| Arc::new(ReleaseCounters::new(backend.release)));
                    Arc::new(Instance::new(
                        backend.instance.clone(),
                        backend.release,
                        backend.address,
                        Arc::clone(counters),
                    ))
                }
            };
            if backend.healthy && backend.enabled {
                instance.set_routable(true);
                ready.push(Arc::clone(&instance));
            } else {
                unroutable.push(Arc::clone(&instance));
            }
            instances.insert(backend.instance.clone(), instance);
        }
        self.snapshot.store(Arc::new(Snapshot { backends, ready }));
        for instance in unroutable {
            instance.set_routable(false);
        }
        for (_, removed) in registry.instances.drain() {
            removed.retire();
            registry.retired.push(Arc::downgrade(&removed));
        }
        registry.retired.retain(|old| old.strong_count() > 0);
        registry.instances = instances;
        self.changed.send_modify(|version| *version += 1);
    }

    /// Leases the least busy ready instance not in `tried`, without waiting.
    fn try_acquire(&self, tried: &[Arc<Instance>]) -> Option<Lease> {
        let snapshot = self.snapshot.load();
        let ready = &snapshot.ready;
        loop {
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let index = choose(ready.len(), start, |index| {
                let instance = &ready[index];
                let usable = instance.is_routable()
                    && !tried.iter().any(|other| Arc::ptr_eq(other, instance));
                usable.then(|| instance.load())
            })?;
            // A lease fails only when a drain raced with this request; the instance is no
            // longer routable, so the next scan skips it.
            if let Some(lease) = ready[index].lease() {
                return Some(lease);
            }
        }
    }

    /// Holds a request that found no ready instance (bounded queue, bounded wait) until one
    /// is ready, and leases it.
    async fn hold(&self) -> Result<Lease, ProxyError> {
        let waiting = self.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.held);
        if waiting >= self.options.hold_queue {
            return Err(ProxyError::HoldQueueFull {
                route: self.local_addr,
                limit: self.options.hold_queue,
            });
        }
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.options.hold_timeout;
        loop {
            if let Some(lease) = self.try_acquire(&[]) {
                return Ok(lease);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(ProxyError::HoldTimeout {
                        route: self.local_addr,
                        waited: self.options.hold_timeout,
                    });
                }
            }
        }
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
        let mut body = ForwardBody::Client(body);
        // When the request goes out: the answer timer starts then, not while it was held.
        let (mut lease, mut sent_at) = match self.try_acquire(&[]) {
            Some(lease) => (lease, start),
            None => (
                self.hold().await.map_err(|error| (error, None))?,
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
                .connect(&self.client, self.options.connect_timeout, self.local_addr)
                .await
            {
                Err(error) => {
                    failed_on.push(Arc::clone(lease.instance()));
                    error
                }
                Ok(()) => {
                    // The instance may close the connection before answering (a pooled
                    // connection's idle timeout, a crash); an idempotent request without a
                    // body can then be sent again from this copy of its head.
                    let copy = (idempotent && body.is_end_stream()).then(|| {
                        (
                            parts.method.clone(),
                            parts.uri.clone(),
                            parts.headers.clone(),
                        )
                    });
                    let request = Request::from_parts(parts, body);
                    let (sender, timer) =
                        lease.sender_with_timer(sent_at + self.options.response_timeout);
                    let sent = tokio::select! {
                        biased;
                        sent = sender.try_send_request(request) => Ok(sent),
                        () = timer => Err(()),
                    };
                    match sent {
                        Ok(Ok(response)) => return Ok(respond(response, lease, start)),
                        Err(_) => {
                            lease.discard_connection();
                            let instance = lease.instance();
                            let error = ProxyError::UpstreamTimeout {
                                instance: instance.id.clone(),
                                address: instance.address,
                                after: self.options.response_timeout,
                            };
                            return Err((error, Some(Arc::clone(&instance.counters))));
                        }
                        Ok(Err(mut failed)) => {
                            lease.discard_connection();
                            let instance = lease.instance();
                            let unsent = failed.take_message();
                            let source = failed.into_error();
                            let counters = Some(Arc::clone(&instance.counters));
                            if source.is_user() {
                                return Err((ProxyError::Client { source }, counters));
                            }
                            if source.is_parse() || source.is_parse_status() {
                                let error = ProxyError::Upstream {
                                    instance: instance.id.clone(),
                                    address: instance.address,
                                    source,
                                };
                                return Err((error, counters));
                            }
                            let repeatable = unsent.is_some() || copy.is_some();
                            let error = ProxyError::Closed {
                                instance: instance.id.clone(),
                                address: instance.address,
                                repeatable,
                                source,
                            };
                            if lease.reused() && stale_resends < MAX_STALE_RESENDS {
                                stale = true;
                            } else {
                                failed_on.push(Arc::clone(instance));
                            }
                            match (unsent, copy) {
                                (Some(request), _) => (parts, body) = request.into_parts(),
                                (None, Some((method, uri, headers))) => {
                                    (parts, body) = rebuild(method, uri, headers);
                                }
                                (None, None) => return Err((error, counters)),
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
            let Some(next) = self.try_acquire(&failed_on) else {
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

/// Decrements the held-request count when a held request stops waiting.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) -> Arc<Closing> {
    let closing = Arc::new(Closing::default());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1.1 head timer runs from when it starts waiting for a head, the idle wait
    // between requests included: it bounds a head that trickles in after the first request.
    // The first request's head and idle connections are `Watched`'s business.
    let options = &shared.options;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout.max(options.idle_timeout))
        .writev(WRITEV);
    builder.http2().timer(TokioTimer::new());
    let limit = options.max_connections.min(budget().client_limit());
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
        let Some(open) = Open::new(&shared) else {
            refuse(&shared, stream, limit);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client_ip = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value");
        let activity = Arc::new(Activity::default());
        let service = {
            let shared = Arc::clone(&shared);
            let activity = Arc::clone(&activity);
            service_fn(move |request| {
                let shared = Arc::clone(&shared);
                let client_ip = client_ip.clone();
                let start = Instant::now();
                activity.request_began(start.saturating_duration_since(shared.epoch));
                async move { Ok::<_, Infallible>(shared.handle(request, client_ip, start).await) }
            })
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = Watched::new(connection, &closing, open, activity);
        tokio::spawn(async move {
            // A client that goes away mid-request is its own business; nothing to report.
            let _ = connection.await;
        });
    }
    closing
}

/// A client connection's place: counted on its route and in the process's descriptor
/// budget until dropped.
struct Open {
    shared: Arc<Shared>,
    _slot: Slot,
}

impl Open {
    /// None when the route is at its `max_connections` or the process's budget for client
    /// connections is spent.
    fn new(shared: &Arc<Shared>) -> Option<Open> {
        let open = shared.connections.fetch_add(1, Ordering::SeqCst);
        let slot = (open < shared.options.max_connections)
            .then(|| budget().client())
            .flatten();
        match slot {
            Some(slot) => Some(Open {
                shared: Arc::clone(shared),
                _slot: slot,
            }),
            None => {
                shared.connections.fetch_sub(1, Ordering::SeqCst);
                None
            }
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::SeqCst);
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
    shared.refused.fetch_add(1, Ordering::Relaxed);
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

/// A server connection that closes gracefully when its route shuts down, is closed if no
/// whole request head came within `header_timeout` of its accept, and closes gracefully
/// once no request began for `idle_timeout` (HTTP/1.1 after the answer in progress, HTTP/2
/// with GOAWAY, letting open streams finish).
struct Watched<C> {
    connection: Pin<Box<C>>,
    closing: Arc<Closing>,
    id: u64,
    registered: bool,
    shutting_down: bool,
    activity: Arc<Activity>,
    /// Fires at the header deadline, then at each idle deadline.
    timer: Pin<Box<Sleep>>,
    /// No request has begun yet, as far as the timer knows: it is set for the header
    /// deadline.
    awaiting_first: bool,
    open: Open,
}

impl<C: GracefulConnection> Watched<C> {
    fn new(
        connection: C,
        closing: &Arc<Closing>,
        open: Open,
        activity: Arc<Activity>,
    ) -> Watched<C> {
        closing.live.fetch_add(1, Ordering::SeqCst);
        let timer = Box::pin(tokio::time::sleep(open.shared.options.header_timeout));
        Watched {
            connection: Box::pin(connection),
            closing: Arc::clone(closing),
            id: closing.next_id.fetch_add(1, Ordering::Relaxed),
            registered: false,
            shutting_down: false,
            activity,
            timer,
            awaiting_first: true,
            open,
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
            let shared = &self.open.shared;
            let deadline = shared.epoch + first + shared.options.idle_timeout;
            self.timer.as_mut().reset(deadline.into());
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Idleness::Busy;
        }
        let shared = &self.open.shared;
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
                this.closing
                    .wakers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(this.id, cx.waker().clone());
                this.registered = true;
            }
            if this.closing.requested.load(Ordering::SeqCst) {
                this.connection.as_mut().graceful_shutdown();
                this.shutting_down = true;
            } else {
                match this.idleness(cx) {
                    Idleness::Busy => {}
                    // Nothing to finish: the connection is dropped, which closes it.
                    Idleness::NeverAsked => return Poll::Ready(Ok(())),
                    Idleness::Idle => {
                        this.connection.as_mut().graceful_shutdown();
                        this.shutting_down = true;
                    }
                }
            }
        }
        this.connection.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.registered {
            let mut wakers = self
                .closing
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            wakers.remove(&self.id);
        }
        if self.closing.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.closing.all_closed.notify_waiters();
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

/// A copy of a body-less request, to send again.
fn rebuild(method: Method, uri: Uri, headers: HeaderMap) -> (Parts, ForwardBody) {
    let mut request = Request::new(ForwardBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request.into_parts()
}

fn respond(response: Response<Incoming>, lease: Lease, start: Instant) -> Response<ProxyBody> {
    lease
        .instance()
        .counters
        .response(response.status().as_u16(), start.elapsed());
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        ProxyBody::Upstream {
            body,
            lease,
            done: false,
        },
    )
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
