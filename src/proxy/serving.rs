//! What both kinds of route share about serving: the route's threads, each with a
//! single-threaded runtime, one listener whose acceptor (on the first thread) hands each
//! connection to the thread with the fewest open, stopped by `shutdown` or on drop (the
//! address freed before drop returns), and the count of client connections against the
//! route's cap and the process's descriptor budget.
//!
//! Why one acceptor rather than one SO_REUSEPORT listener per thread: the kernel drops the
//! connections waiting in a listener's accept queue when that listener closes (unless the
//! `net.ipv4.tcp_migrate_req` sysctl is on), so a route that changes its thread count would
//! lose some; and hashing spreads connections by address, not by how busy a thread is. One
//! listener has one queue, which a successor route can take over whole (`Takeover`); the
//! hand-off costs two `epoll_ctl` calls and a wake-up per connection, not per request
//! (bench/proxy-listeners.sh measures what the kernel drops).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{Notify, oneshot};

use super::backends::BackendSet;
use super::limits::{Slot, budget};
use super::metrics::UnroutedCounters;
use super::upstream::{Latch, choose};
use super::{ProxyError, RouteMetrics};

/// A bound listener and the runtimes of the route's threads, not serving yet; the listener
/// is registered with the first one's.
pub(crate) struct Bound {
    pub(crate) runtimes: Vec<Runtime>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) listener: TcpListener,
    /// The listening socket again, for a successor route to take over (see `Takeover`).
    takeover: OwnedFd,
}

/// A route's listening socket, for a successor route that serves the same address with
/// other options (a new thread count): both accept from the one queue until the old route
/// stops, so no connection waiting in it is lost.
#[derive(Debug)]
pub struct Takeover {
    socket: OwnedFd,
}

/// Builds `threads` single-threaded runtimes and binds `address` (or takes `from`'s socket
/// over). A route serves on threads of its own, whatever runtime the caller uses, each
/// connection wholly on one of them: a connection's two sides and its timers then never
/// wake each other across threads (that costs CPU and latency per request).
pub(crate) fn bind(
    address: SocketAddr,
    threads: usize,
    from: Option<&Takeover>,
) -> Result<Bound, ProxyError> {
    let bind_error = |source| ProxyError::Bind { address, source };
    let mut runtimes = Vec::with_capacity(threads.max(1));
    for _ in 0..threads.max(1) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match runtime {
            Ok(runtime) => runtimes.push(runtime),
            Err(source) => {
                stop_runtimes(runtimes);
                return Err(bind_error(source));
            }
        }
    }
    let listening = {
        // The listener registers with the route's first runtime, not the caller's.
        let _entered = runtimes[0].enter();
        let listener = match from {
            Some(from) => adopt(from),
            None => listen(address),
        };
        listener.and_then(|listener| {
            let takeover = listener.as_fd().try_clone_to_owned()?;
            Ok((listener.local_addr()?, listener, takeover))
        })
    };
    match listening {
        Ok((local_addr, listener, takeover)) => Ok(Bound {
            runtimes,
            local_addr,
            listener,
            takeover,
        }),
        Err(source) => {
            stop_runtimes(runtimes);
            Err(bind_error(source))
        }
    }
}

/// Dropping a runtime blocks, which an async caller must not do.
fn stop_runtimes(runtimes: Vec<Runtime>) {
    for runtime in runtimes {
        runtime.shutdown_background();
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

/// The predecessor's listening socket, registered anew with this route's runtime.
fn adopt(from: &Takeover) -> std::io::Result<TcpListener> {
    let socket = std::net::TcpListener::from(from.socket.try_clone()?);
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket)
}

/// Given to the serving future: when to stop accepting, and where to say the listener is
/// closed (its address free again).
pub(crate) struct Stop {
    pub(crate) requested: oneshot::Receiver<()>,
    pub(crate) unbound: std::sync::mpsc::Sender<()>,
}

/// The route's serving threads, seen from the route.
#[derive(Debug)]
pub(crate) struct Serving {
    stop: Option<oneshot::Sender<()>>,
    /// Fires when the acceptor has stopped listening.
    listener_closed: Mutex<std::sync::mpsc::Receiver<()>>,
    /// The listening socket's second descriptor, closed with the listener (so that the
    /// address is free once both are), lent to a successor by `takeover`.
    takeover: Mutex<Option<Takeover>>,
    /// Each fires when its thread has ended (the first once every connection is closed).
    done: Vec<oneshot::Receiver<()>>,
}

thread_local! {
    /// Which of its route's threads this is (0 on any other thread).
    static THREAD: Cell<usize> = const { Cell::new(0) };
}

/// The index of the route thread running the caller, for per-thread state (idle pools).
pub(crate) fn thread_index() -> usize {
    THREAD.with(Cell::get)
}

impl Serving {
    /// Runs `serve` on the route's first thread until it returns, and the other runtimes on
    /// threads of their own until then (they run the connections `Workers` hands them);
    /// `serve` must send on `Stop::unbound` once it has dropped its listener. The threads
    /// are named `name`.
    pub(crate) fn spawn<F, Fut>(
        bound: Bound,
        name: &str,
        address: SocketAddr,
        serve: F,
    ) -> Result<Serving, ProxyError>
    where
        F: FnOnce(Stop, TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let Bound {
            runtimes,
            listener,
            takeover,
            ..
        } = bound;
        let (stop, requested) = oneshot::channel();
        let (unbound, listener_closed) = std::sync::mpsc::channel();
        let finished = Arc::new(Latch::default());
        let mut done = Vec::with_capacity(runtimes.len());
        let mut serve = Some((serve, listener, Stop { requested, unbound }));
        for (index, runtime) in runtimes.into_iter().enumerate() {
            let (ended, ended_receiver) = oneshot::channel();
            done.push(ended_receiver);
            let first = serve.take();
            let first_done = Arc::clone(&finished);
            let spawned = std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    THREAD.with(|thread| thread.set(index));
                    match first {
                        Some((serve, listener, stop)) => {
                            runtime.block_on(serve(stop, listener));
                            first_done.set();
                        }
                        None => runtime.block_on(first_done.wait()),
                    }
                    drop(runtime);
                    let _ = ended.send(());
                });
            if let Err(source) = spawned {
                // The threads started already end once the first one has: it is dropped
                // with its closure when spawning it failed, or sees its stop dropped below.
                finished.set();
                return Err(ProxyError::Bind { address, source });
            }
        }
        Ok(Serving {
            stop: Some(stop),
            listener_closed: Mutex::new(listener_closed),
            takeover: Mutex::new(Some(Takeover { socket: takeover })),
            done,
        })
    }

    /// The listening socket, for a successor route to take over; None once stopping.
    pub(crate) fn takeover(&self) -> Option<Takeover> {
        let takeover = self.takeover.lock().unwrap_or_else(PoisonError::into_inner);
        let socket = takeover.as_ref()?.socket.try_clone().ok()?;
        Some(Takeover { socket })
    }

    /// Asks the acceptor to stop; the serving future goes on with what follows.
    pub(crate) fn stop_accepting(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.close_takeover();
    }

    /// Asks the threads to stop and waits until they have ended.
    pub(crate) async fn shutdown(&mut self) {
        self.stop_accepting();
        for done in self.done.drain(..) {
            let _ = done.await;
        }
    }

    fn close_takeover(&self) {
        self.takeover
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

impl Drop for Serving {
    /// A route dropped without `shutdown` finishes its connections in the background, but
    /// frees its address before returning, so that a successor can bind it at once. That
    /// wait is the acceptor noticing the stop: microseconds, bounded anyway.
    fn drop(&mut self) {
        self.close_takeover();
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

/// The route's threads as the acceptor sees them: where each connection goes.
#[derive(Debug)]
pub(crate) struct Workers {
    handles: Vec<Handle>,
    /// Client connections each thread is serving now.
    open: Vec<AtomicUsize>,
    /// Client connections each thread has been given since the route started.
    accepted: Vec<AtomicU64>,
    /// Where the next scan for the least busy thread starts (round-robin among equals).
    next: AtomicUsize,
}

impl Workers {
    pub(crate) fn new(bound: &Bound) -> Arc<Workers> {
        let count = bound.runtimes.len();
        Arc::new(Workers {
            handles: bound
                .runtimes
                .iter()
                .map(|runtime| runtime.handle().clone())
                .collect(),
            open: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            accepted: (0..count).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// How many threads the route serves on.
    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Client connections each thread has been given.
    pub(crate) fn accepted(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `serve` for a connection the acceptor (on the first thread) took, on the thread
    /// with the fewest open connections. Another thread gets the socket itself, to register
    /// with its own runtime: its readiness then wakes that thread alone.
    pub(crate) fn dispatch<F, Fut>(self: &Arc<Workers>, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let index = choose(self.count(), start, |index| {
            Some(self.open[index].load(Ordering::Relaxed))
        })
        .unwrap_or(0);
        self.open[index].fetch_add(1, Ordering::Relaxed);
        self.accepted[index].fetch_add(1, Ordering::Relaxed);
        let on_thread = OnThread {
            workers: Arc::clone(self),
            index,
        };
        if index == thread_index() {
            tokio::spawn(async move {
                serve(stream).await;
                drop(on_thread);
            });
            return;
        }
        // Not registered with the acceptor's runtime any more; still non-blocking.
        let Ok(stream) = stream.into_std() else {
            return;
        };
        self.handles[index].spawn(async move {
            if let Ok(stream) = TcpStream::from_std(stream) {
                serve(stream).await;
            }
            drop(on_thread);
        });
    }
}

/// A connection counted on the thread serving it, until dropped.
struct OnThread {
    workers: Arc<Workers>,
    index: usize,
}

impl Drop for OnThread {
    fn drop(&mut self) {
        self.workers.open[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy of a route's counters.
pub(crate) fn metrics(
    backends: &BackendSet,
    unrouted: &UnroutedCounters,
    connections: &Connections,
    workers: &Workers,
) -> RouteMetrics {
    let mut metrics = unrouted.metrics(backends.route(), backends.release_metrics());
    metrics.connections = connections.count() as u64;
    metrics.refused = connections.refused();
    metrics.accepted_by_thread = workers.accepted();
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
