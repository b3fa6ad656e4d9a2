//! A route's backend set, shared by the HTTP and the TCP route: the snapshot of backends
//! swapped whole, the instances it names (kept by id across snapshots, so in-flight counts
//! carry over), the choice of the least busy ready instance, holding while none is ready, and
//! draining one instance.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::metrics::{ReleaseCounters, ReleaseMetrics};
use super::upstream::{Instance, Lease, choose};
use super::{Backend, ProxyError};

/// The backends of one route and who is using them.
#[derive(Debug)]
pub(crate) struct BackendSet {
    /// The route's address, for errors.
    route: SocketAddr,
    /// Served by a TCP route: its releases count bytes (`metrics::TcpCounters`).
    tcp: bool,
    /// At most this many callers hold at once; more fail at once.
    hold_queue: usize,
    /// A held caller waits at most this long.
    hold_timeout: Duration,
    /// The route's threads, each with its own idle pool per instance.
    threads: usize,
    snapshot: ArcSwap<Snapshot>,
    /// Bumped on every snapshot swap; held callers wait on it.
    changed: watch::Sender<u64>,
    /// Where the next scan for a ready instance starts (round-robin among equals).
    next: AtomicUsize,
    /// Callers currently held for want of a ready instance.
    held: AtomicUsize,
    /// The instances by id, across snapshots; touched by set, drain and metrics only.
    registry: Mutex<Registry>,
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
    /// Removed instances some caller may still hold, so drain and in_flight can see them.
    retired: Vec<Weak<Instance>>,
    releases: BTreeMap<u64, Arc<ReleaseCounters>>,
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

impl BackendSet {
    /// An empty set: every caller is held until `set` gives it a ready instance.
    pub(crate) fn new(
        route: SocketAddr,
        tcp: bool,
        hold_queue: usize,
        hold_timeout: Duration,
        threads: usize,
    ) -> BackendSet {
        BackendSet {
            route,
            tcp,
            hold_queue,
            hold_timeout,
            threads,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            changed: watch::Sender::new(0),
            next: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            registry: Mutex::new(Registry::default()),
        }
    }

    /// The route's address.
    pub(crate) fn route(&self) -> SocketAddr {
        self.route
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the backend set atomically; in-flight counts carry over by instance id.
    pub(crate) fn set(&self, backends: Vec<Backend>) {
        let mut registry = self.registry();
        self.install(&mut registry, backends);
    }

    pub(crate) fn backends(&self) -> Vec<Backend> {
        self.snapshot.load().backends.clone()
    }

    /// Callers waiting for a ready instance right now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The live instances and the retired ones some caller still holds, with this id.
    pub(crate) fn matching(&self, id: &str) -> Vec<Arc<Instance>> {
        self.registry().matching(id).collect()
    }

    pub(crate) fn in_flight(&self, instance: &str) -> usize {
        self.registry()
            .matching(instance)
            .map(|target| target.in_flight())
            .sum()
    }

    /// Every release's counters, in release order.
    pub(crate) fn release_metrics(&self) -> Vec<ReleaseMetrics> {
        self.registry()
            .releases
            .values()
            .map(|counters| counters.snapshot())
            .collect()
    }

    /// Marks the instance not enabled (if still present) and waits until its leases have
    /// ended or `timeout` passes; returns how many were still held at the end (0 = clean).
    pub(crate) async fn drain(&self, instance: &str, timeout: Duration) -> usize {
        let targets: Vec<Arc<Instance>> = {
            let mut registry = self.registry();
            if registry.instances.contains_key(instance) {
                let mut backends = self.snapshot.load().backends.clone();
                for backend in backends
                    .iter_mut()
                    .filter(|backend| backend.instance == instance)
                {
                    backend.enabled = false;
                }
                self.install(&mut registry, backends);
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

    /// Swaps in a new snapshot. Instances that become routable are flagged before the swap
    /// (a caller that finds them in the new snapshot must be able to lease them); those that
    /// stop being routable are flagged after it, so that a drain that follows sees every
    /// caller that could still pick them from the older snapshot.
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
                    let counters = registry.releases.entry(backend.release).or_insert_with(|| {
                        Arc::new(ReleaseCounters::new(backend.release, self.tcp))
                    });
                    Arc::new(Instance::new(
                        backend.instance.clone(),
                        backend.release,
                        backend.address,
                        Arc::clone(counters),
                        self.threads,
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
    pub(crate) fn try_acquire(&self, tried: &[Arc<Instance>]) -> Option<Lease> {
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
            // A lease fails only when a drain raced with this caller; the instance is no
            // longer routable, so the next scan skips it.
            if let Some(lease) = ready[index].lease() {
                return Some(lease);
            }
        }
    }

    /// Holds a caller that found no ready instance (bounded queue, bounded wait) until one is
    /// ready, and leases it.
    pub(crate) async fn hold(&self) -> Result<Lease, ProxyError> {
        let waiting = self.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.held);
        if waiting >= self.hold_queue {
            return Err(ProxyError::HoldQueueFull {
                route: self.route,
                limit: self.hold_queue,
            });
        }
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.hold_timeout;
        loop {
            if let Some(lease) = self.try_acquire(&[]) {
                return Ok(lease);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(ProxyError::HoldTimeout {
                        route: self.route,
                        waited: self.hold_timeout,
                    });
                }
            }
        }
    }
}

/// Decrements the held count when a held caller stops waiting.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
