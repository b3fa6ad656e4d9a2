//! The route's side of each instance: its in-flight count, whether it may take new requests,
//! and its pool of idle keep-alive connections. An `Instance` outlives snapshot swaps (it is
//! keyed by instance id), so counts and pooled connections carry over from one backend set
//! to the next, and a removed instance's connections are never handed out again. Each of the
//! route's threads has its own idle pool: a pooled connection is driven by the runtime that
//! opened it, so a request on another thread would wake that one for every read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::ProxyError;
use super::http1::Connection;
use super::limits::{Slot, budget};
use super::metrics::ReleaseCounters;
use super::serving::thread_index;

/// Idle connections kept per instance; more are closed when their answer ends.
const MAX_IDLE: usize = 512;

#[derive(Debug)]
pub(crate) struct Instance {
    pub(crate) id: String,
    pub(crate) release: u64,
    pub(crate) address: SocketAddr,
    /// healthy && enabled, mirrored from the snapshot so a request that picked this instance
    /// from an older snapshot sees a drain that raced with it (see `Instance::lease`).
    routable: AtomicBool,
    /// Removed from the backend set: its idle connections are closed, not reused.
    retired: AtomicBool,
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    drained: Notify,
    /// Set when a TCP route gives up draining the instance: its connections still open are
    /// closed.
    pub(crate) cut: Latch,
    /// Idle connections, one pool per route thread (`serving::thread_index`).
    idle: Box<[Mutex<Vec<Connection>>]>,
    pub(crate) counters: Arc<ReleaseCounters>,
}

impl Instance {
    pub(crate) fn new(
        id: String,
        release: u64,
        address: SocketAddr,
        counters: Arc<ReleaseCounters>,
        threads: usize,
    ) -> Instance {
        Instance {
            id,
            release,
            address,
            routable: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            cut: Latch::default(),
            idle: (0..threads.max(1)).map(|_| Mutex::default()).collect(),
            counters,
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The in-flight count as a balancing hint (no ordering needed).
    pub(crate) fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_routable(&self) -> bool {
        self.routable.load(Ordering::Relaxed)
    }

    pub(crate) fn set_routable(&self, routable: bool) {
        self.routable.store(routable, Ordering::SeqCst);
    }

    /// Takes the instance out of service for good: no new requests, no pooled connections.
    pub(crate) fn retire(&self) {
        self.set_routable(false);
        self.retired.store(true, Ordering::SeqCst);
        for pool in &self.idle {
            pool.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// Counts a request in flight, unless the instance stopped being routable since the
    /// caller's snapshot was taken. Together with `wait_drained` (which clears `routable`
    /// before reading `in_flight`, both sequentially consistent) this guarantees a drain
    /// either sees the request or the request sees the drain.
    pub(crate) fn lease(self: &Arc<Instance>) -> Option<Lease> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let lease = Lease {
            instance: Arc::clone(self),
            connection: None,
            reused: false,
        };
        if self.routable.load(Ordering::SeqCst) {
            Some(lease)
        } else {
            None
        }
    }

    /// Stops routing to this instance and waits until its in-flight requests are done or
    /// `timeout` passes; returns how many were still in flight.
    pub(crate) async fn wait_drained(&self, timeout: Duration) -> usize {
        self.set_routable(false);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let in_flight = self.in_flight();
            if in_flight == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return self.in_flight();
            }
        }
    }

    /// The calling route thread's idle pool.
    fn pool(&self) -> &Mutex<Vec<Connection>> {
        &self.idle[thread_index() % self.idle.len()]
    }

    fn take_idle(&self) -> Option<Connection> {
        self.pool()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn put_idle(&self, connection: Connection) {
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        let mut idle = self.pool().lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(connection);
        }
    }

    /// Opens a TCP connection to the instance, with TCP_NODELAY (small requests and answers
    /// must not wait for Nagle's algorithm).
    pub(crate) async fn open_stream(&self, timeout: Duration) -> Result<TcpStream, ProxyError> {
        match tokio::time::timeout(timeout, TcpStream::connect(self.address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(source)) => {
                // Counted for the health monitors' sake (see `limits::exhaustions`).
                super::limits::exhausted(&source);
                Err(ProxyError::Connect {
                    instance: self.id.clone(),
                    address: self.address,
                    source,
                })
            }
            Err(_) => Err(ProxyError::ConnectTimeout {
                instance: self.id.clone(),
                address: self.address,
                after: timeout,
            }),
        }
    }

    /// Opens a connection, which holds `slot` (its place in the descriptor budget) until
    /// its socket is closed.
    async fn connect(&self, timeout: Duration, slot: Slot) -> Result<Connection, ProxyError> {
        let stream = self.open_stream(timeout).await?;
        Ok(Connection::new(stream, slot))
    }
}

/// One request's claim on an instance: counted in flight until dropped, holding the
/// connection the request went out on.
#[derive(Debug)]
pub(crate) struct Lease {
    instance: Arc<Instance>,
    connection: Option<Connection>,
    /// The connection came from the idle pool rather than a fresh connect.
    reused: bool,
}

impl Lease {
    pub(crate) fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// Gets a connection: the most recently idle pooled one that is still open (the last
    /// used is the least likely to have been closed), or a new one.
    pub(crate) async fn connect(
        &mut self,
        timeout: Duration,
        route: SocketAddr,
    ) -> Result<(), ProxyError> {
        while let Some(mut connection) = self.instance.take_idle() {
            if connection.is_reusable() {
                self.connection = Some(connection);
                self.reused = true;
                return Ok(());
            }
        }
        let slot = instance_slot(route)?;
        // Boxed: a request that finds a pooled connection (most of them) would otherwise
        // carry the connect's space in every move.
        let connect = Box::pin(self.instance.connect(timeout, slot));
        self.connection = Some(connect.await?);
        self.reused = false;
        Ok(())
    }

    /// Whether the current connection came from the idle pool. A pooled connection that
    /// closes before answering may just have gone stale; a fresh one that does says the
    /// instance itself is failing.
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// The connection the request goes out on.
    pub(crate) fn connection(&mut self) -> &mut Connection {
        self.connection
            .as_mut()
            .expect("connect succeeded before sending")
    }

    /// Forgets the connection (it failed or its answer was cut short).
    pub(crate) fn discard_connection(&mut self) {
        self.connection = None;
    }

    /// Returns the connection to the pool once its answer was read to the end.
    pub(crate) fn release_connection(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.instance.put_idle(connection);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.instance.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.instance.drained.notify_waiters();
        }
    }
}

/// A place in the descriptor budget for one connection to an instance of `route`.
/// Connections to instances have their own share of the descriptors (`limits`), so that
/// neither they nor clients can take what health checks and the log need.
pub(crate) fn instance_slot(route: SocketAddr) -> Result<Slot, ProxyError> {
    let budget = budget();
    budget
        .instance()
        .ok_or(ProxyError::InstanceConnectionLimit {
            route,
            limit: budget.instance_limit(),
        })
}

/// A one-way flag that tasks can wait for: once set, it stays set.
#[derive(Debug, Default)]
pub(crate) struct Latch {
    set: AtomicBool,
    notify: Notify,
}

impl Latch {
    pub(crate) fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once `set` has been called (at once if it was already).
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.set.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// Picks, among `count` candidates, one with the fewest requests in flight; `load` gives a
/// candidate's count, or None to skip it. The scan starts at `start` so that candidates with
/// equal load take turns (round-robin when all are idle).
pub(crate) fn choose(
    count: usize,
    start: usize,
    mut load: impl FnMut(usize) -> Option<usize>,
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for offset in 0..count {
        let index = (start + offset) % count;
        if let Some(current) = load(index)
            && best.is_none_or(|(_, least)| current < least)
        {
            best = Some((index, current));
            if current == 0 {
                break;
            }
        }
    }
    best.map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `loads[i]` is candidate i's in-flight count, None when it is excluded.
    fn check(loads: &[Option<usize>], start: usize, expected: Option<usize>) {
        assert_eq!(
            choose(loads.len(), start, |index| loads[index]),
            expected,
            "{loads:?} from {start}"
        );
    }

    #[test]
    fn least_in_flight_with_rotation() {
        check(&[], 0, None);
        check(&[Some(0), Some(0), Some(0)], 0, Some(0));
        check(&[Some(0), Some(0), Some(0)], 1, Some(1));
        check(&[Some(0), Some(0), Some(0)], 5, Some(2));
        check(&[Some(3), Some(1), Some(2)], 0, Some(1));
        check(&[Some(3), Some(2), Some(2)], 0, Some(1));
        check(&[Some(3), Some(2), Some(2)], 2, Some(2));
        check(&[None, Some(5), None], 0, Some(1));
        check(&[None, None], 1, None);
    }

    #[test]
    fn rotation_spreads_idle_requests_evenly() {
        let mut picks = [0usize; 3];
        for start in 0..30 {
            let index = choose(3, start, |_| Some(0)).expect("a candidate");
            picks[index] += 1;
        }
        assert_eq!(picks, [10, 10, 10]);
    }
}
