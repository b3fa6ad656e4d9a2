//! What both kinds of route share about serving: a listener on a thread of its own with a
//! single-threaded runtime, stopped by `shutdown` or on drop (the address freed before drop
//! returns), and the count of client connections against the route's cap and the process's
//! descriptor budget.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, oneshot};

use super::backends::BackendSet;
use super::limits::{Slot, budget};
use super::metrics::UnroutedCounters;
use super::{ProxyError, RouteMetrics};

/// A bound listener and the runtime it is registered with, not serving yet.
pub(crate) struct Bound {
    pub(crate) runtime: Runtime,
    pub(crate) local_addr: SocketAddr,
    pub(crate) listener: TcpListener,
}

/// Binds `address` on a new single-threaded runtime. A route serves on its own thread with
/// it, whatever runtime the caller uses: a connection's two sides and its timers then never
/// wake each other across threads (that costs CPU and latency per request).
pub(crate) fn bind(address: SocketAddr) -> Result<Bound, ProxyError> {
    let bind_error = |source| ProxyError::Bind { address, source };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(bind_error)?;
    let listening = {
        // The listener registers with the route's runtime, not the caller's.
        let _entered = runtime.enter();
        listen(address).and_then(|listener| Ok((listener.local_addr()?, listener)))
    };
    match listening {
        Ok((local_addr, listener)) => Ok(Bound {
            runtime,
            local_addr,
            listener,
        }),
        Err(source) => {
            // Dropping a runtime blocks, which an async caller must not do.
            runtime.shutdown_background();
            Err(bind_error(source))
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

/// Given to the serving future: when to stop accepting, and where to say the listener is
/// closed (its address free again).
pub(crate) struct Stop {
    pub(crate) requested: oneshot::Receiver<()>,
    pub(crate) unbound: std::sync::mpsc::Sender<()>,
}

/// The route's serving thread, seen from the route.
#[derive(Debug)]
pub(crate) struct Serving {
    stop: Option<oneshot::Sender<()>>,
    /// Fires when the route's thread has stopped listening.
    listener_closed: Mutex<std::sync::mpsc::Receiver<()>>,
    /// Fires when the route's thread has closed every connection and ended.
    done: Option<oneshot::Receiver<()>>,
}

impl Serving {
    /// Runs `serve` on a thread named `name` on `runtime` until it returns; `serve` must send
    /// on `Stop::unbound` once it has dropped its listener.
    pub(crate) fn spawn<F, Fut>(
        runtime: Runtime,
        name: &str,
        address: SocketAddr,
        serve: F,
    ) -> Result<Serving, ProxyError>
    where
        F: FnOnce(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, requested) = oneshot::channel();
        let (finished, done) = oneshot::channel();
        let (unbound, listener_closed) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(serve(Stop { requested, unbound }));
                let _ = finished.send(());
            })
            .map_err(|source| ProxyError::Bind { address, source })?;
        Ok(Serving {
            stop: Some(stop),
            listener_closed: Mutex::new(listener_closed),
            done: Some(done),
        })
    }

    /// Asks the thread to stop and waits until it has ended.
    pub(crate) async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for Serving {
    /// A route dropped without `shutdown` finishes its connections in the background, but
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

/// A copy of a route's counters.
pub(crate) fn metrics(
    backends: &BackendSet,
    unrouted: &UnroutedCounters,
    connections: &Connections,
) -> RouteMetrics {
    let mut metrics = unrouted.metrics(backends.route(), backends.release_metrics());
    metrics.connections = connections.count() as u64;
    metrics.refused = connections.refused();
    metrics
}

/// A route's client connections: how many are open, how many were refused.
#[derive(Debug)]
pub(crate) struct Connections {
    /// The route's own cap (`RouteOptions::max_connections`).
    limit: usize,
    open: AtomicUsize,
    refused: AtomicU64,
    /// Woken when `open` drops to zero.
    all_closed: Notify,
}

impl Connections {
    pub(crate) fn new(limit: usize) -> Connections {
        Connections {
            limit,
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            all_closed: Notify::new(),
        }
    }

    /// A place for one more client connection; None (and counted as refused) when the route
    /// is at its cap or the process's budget for client connections is spent.
    pub(crate) fn open(self: &Arc<Connections>) -> Option<Open> {
        let open = self.open.fetch_add(1, Ordering::SeqCst);
        let slot = (open < self.limit).then(|| budget().client()).flatten();
        match slot {
            Some(slot) => Some(Open {
                connections: Arc::clone(self),
                _slot: slot,
            }),
            None => {
                self.open.fetch_sub(1, Ordering::SeqCst);
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Client connections open now.
    pub(crate) fn count(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Client connections refused since the route started.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Waits until no connection is open, or `timeout` passes.
    pub(crate) async fn all_closed(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.count() == 0 || tokio::time::timeout_at(deadline, closed).await.is_err() {
                return;
            }
        }
    }
}

/// A client connection's place: counted on its route and in the process's descriptor
/// budget until dropped.
#[derive(Debug)]
pub(crate) struct Open {
    connections: Arc<Connections>,
    _slot: Slot,
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.connections.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.connections.all_closed.notify_waiters();
        }
    }
}
