//! A TCP route: an L4 listener that joins each client connection to a ready instance of the
//! current backend snapshot, byte for byte, with the HTTP route's promises where they apply:
//! balancing over healthy instances (fewest open connections), holding new connections while
//! none is ready, a connection that could not reach an instance tried on another (nothing was
//! sent, so that is always safe), draining that lets open connections finish up to a
//! deadline, and per-release counters (connections, bytes, time to reach an instance).
//!
//! Like the HTTP route it serves on threads of its own, each connection wholly on one. There
//! are no header or idle timeouts: a database session may be silent for hours, and only its
//! client and server know when it is over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::backends::BackendSet;
use super::metrics::{TcpCounters, UnroutedCounters};
use super::serving::{self, Connections, Serving, Takeover, Workers};
use super::upstream::{Instance, Latch, instance_slot};
use super::{Backend, ErrorClass, ProxyError, RouteMetrics, RouteOptions};

/// Bytes read at once in each direction of a connection (HAProxy's default `tune.bufsize`
/// is 16 KiB; a larger buffer means fewer system calls per megabyte and more memory per idle
/// connection).
const BUFFER: usize = 64 * 1024;

/// How long `shutdown` waits for cut connections to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// One listener serving one stable address, at layer 4.
#[derive(Debug)]
pub struct TcpRoute {
    shared: Arc<Shared>,
    serving: Serving,
}

#[derive(Debug)]
struct Shared {
    options: RouteOptions,
    local_addr: SocketAddr,
    backends: BackendSet,
    unrouted: UnroutedCounters,
    connections: Arc<Connections>,
    workers: Arc<Workers>,
    /// Set when the route shuts down: every open connection is closed.
    closing: Latch,
    /// Set when the route may close its connections, once it has stopped accepting: at
    /// once on `shutdown` and drop, after a grace on `retire`.
    close_now: Latch,
}

impl TcpRoute {
    /// Binds the listener and starts serving with no backends: connections are held until
    /// `set_backends` gives it a ready instance.
    pub async fn bind(options: RouteOptions) -> Result<TcpRoute, ProxyError> {
        TcpRoute::start(options, None)
    }

    /// Serves `previous`'s address with new options, taking its listening socket over (see
    /// `Route::take_over`).
    pub async fn take_over(
        options: RouteOptions,
        previous: &Takeover,
    ) -> Result<TcpRoute, ProxyError> {
        TcpRoute::start(options, Some(previous))
    }

    fn start(options: RouteOptions, from: Option<&Takeover>) -> Result<TcpRoute, ProxyError> {
        let address = options.listen;
        options.clone().apply_environment()?;
        let bound = serving::bind(address, options.threads, from)?;
        let local_addr = bound.local_addr;
        let workers = Workers::new(&bound);
        let backends = BackendSet::new(
            local_addr,
            true,
            options.hold_queue,
            options.hold_timeout,
            workers.count(),
        );
        let connections = Arc::new(Connections::new(options.max_connections));
        let shared = Arc::new(Shared {
            options,
            local_addr,
            backends,
            unrouted: UnroutedCounters::default(),
            connections,
            workers,
            closing: Latch::default(),
            close_now: Latch::default(),
        });
        let serving = Arc::clone(&shared);
        let serving = Serving::spawn(
            bound,
            "graven-tcp-route",
            address,
            move |stop, listener| async move {
                accept(listener, Arc::clone(&serving), stop.requested).await;
                let _ = stop.unbound.send(());
                serving.close_now.wait().await;
                serving.closing.set();
                serving.connections.all_closed(CLOSE_WAIT).await;
            },
        )
        // A route that could not start all its threads has none to wait for.
        .inspect_err(|_| shared.close_now.set())?;
        Ok(TcpRoute { shared, serving })
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

    /// Replaces the backend set atomically. New connections go to backends that are healthy
    /// and enabled; open ones stay where they are until they end or are drained.
    pub fn set_backends(&self, backends: Vec<Backend>) {
        self.shared.backends.set(backends);
    }

    pub fn backends(&self) -> Vec<Backend> {
        self.shared.backends.backends()
    }

    /// Marks the instance not enabled (if still present) and waits until its connections
    /// have ended or `timeout` passes; the ones still open then are closed. Returns how many
    /// were closed that way (0 = clean).
    pub async fn drain(&self, instance: &str, timeout: Duration) -> usize {
        let left = self.shared.backends.drain(instance, timeout).await;
        if left > 0 {
            for target in self.shared.backends.matching(instance) {
                target.cut.set();
            }
        }
        left
    }

    /// Connections open to the instance now.
    pub fn in_flight(&self, instance: &str) -> usize {
        self.shared.backends.in_flight(instance)
    }

    /// Connections waiting for a ready instance right now.
    pub fn held(&self) -> usize {
        self.shared.backends.held()
    }

    pub fn metrics(&self) -> RouteMetrics {
        let shared = &self.shared;
        serving::metrics(
            &shared.backends,
            &shared.unrouted,
            &shared.connections,
            &shared.workers,
        )
    }

    /// Client connections open on this route now.
    pub fn connections(&self) -> usize {
        self.shared.connections.count()
    }

    /// Stops accepting and closes every connection (drain first what must finish).
    pub async fn shutdown(mut self) {
        self.shared.close_now.set();
        self.serving.shutdown().await;
    }

    /// Stops accepting, lets open connections end on their own for up to `grace`, then
    /// closes the rest: how a route hands over to a successor that took its listener over.
    pub async fn retire(mut self, grace: Duration) {
        self.serving.stop_accepting();
        self.shared.connections.all_closed(grace).await;
        self.shared.close_now.set();
        self.serving.shutdown().await;
    }
}

impl Drop for TcpRoute {
    fn drop(&mut self) {
        self.shared.close_now.set();
    }
}

impl Shared {
    /// Joins one client connection to an instance until either side is done, the instance
    /// is cut at a drain's deadline or the route shuts down.
    async fn serve(&self, client: TcpStream, accepted: Instant) {
        let mut tried: Vec<Arc<Instance>> = Vec::new();
        let mut attempt = 0;
        let (lease, upstream, _slot) = loop {
            let lease = match self.backends.try_acquire(&tried) {
                Some(lease) => lease,
                None if tried.is_empty() => match self.backends.hold().await {
                    Ok(lease) => lease,
                    Err(error) => {
                        self.unrouted.error(error.class());
                        return;
                    }
                },
                // No other instance to try: the failure is counted against the one that
                // failed (below), not as unrouted.
                None => return,
            };
            let instance = Arc::clone(lease.instance());
            let connected = match instance_slot(self.local_addr) {
                Ok(slot) => instance
                    .open_stream(self.options.connect_timeout)
                    .await
                    .map(|stream| (stream, slot)),
                Err(error) => Err(error),
            };
            match connected {
                Ok((upstream, slot)) => break (lease, upstream, slot),
                Err(error) => {
                    instance.counters.error(error.class(), accepted.elapsed());
                    drop(lease);
                    tried.push(instance);
                    if attempt >= self.options.retries {
                        return;
                    }
                    attempt += 1;
                    self.unrouted.retry();
                }
            }
        };
        let instance = lease.instance();
        instance.counters.connected(accepted.elapsed());
        let counters = instance
            .counters
            .tcp()
            .expect("a TCP route's releases count bytes");
        counters.open.fetch_add(1, Ordering::Relaxed);
        let ended = tokio::select! {
            biased;
            () = self.closing.wait() => false,
            () = instance.cut.wait() => false,
            _ = join(client, upstream, counters) => true,
        };
        if !ended {
            counters.cut.fetch_add(1, Ordering::Relaxed);
        }
        counters.open.fetch_sub(1, Ordering::Relaxed);
        drop(lease);
    }
}

/// Copies both ways until both directions have ended (each end's EOF passed on as a
/// half-close) or either fails; then both sockets are closed.
async fn join(
    mut client: TcpStream,
    mut upstream: TcpStream,
    counters: &TcpCounters,
) -> std::io::Result<()> {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    tokio::try_join!(
        pump(client_read, upstream_write, &counters.bytes_in),
        pump(upstream_read, client_write, &counters.bytes_out),
    )?;
    Ok(())
}

/// One direction: read, write it all, count; at EOF shut the other side's writing down.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    counted: &AtomicU64,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..read]).await?;
        counted.fetch_add(read as u64, Ordering::Relaxed);
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        let (stream, _peer) = tokio::select! {
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
        let accepted = Instant::now();
        let Some(open) = shared.connections.open() else {
            // Beyond the limit: closed at once (a TCP client sees the connection end).
            shared.unrouted.error(ErrorClass::Graven);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serving = Arc::clone(&shared);
        shared.workers.dispatch(stream, move |stream| async move {
            serving.serve(stream, accepted).await;
            drop(open);
        });
    }
}
