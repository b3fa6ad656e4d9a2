//! The descriptor budget. A serving graven raises its soft `RLIMIT_NOFILE` to the hard limit
//! (and records the limit it started with, so that every graven process it starts puts that
//! one back before it runs a workload), then divides what it may open so that clients of a
//! route can never take the descriptors that health checks, the event log, the runtime and
//! the API need.
//!
//! The arithmetic, with `L` the soft limit once raised:
//! - `RESERVE` (256) descriptors are never handed to proxied connections: stdio, the async
//!   runtimes, listeners, event logs, the API socket and its clients, health probes, shims
//!   being started, and the refusals in progress (`REFUSING`);
//! - of the other `L - RESERVE`, half may be client connections (every route together) and
//!   half connections to instances (pooled ones included), since each proxied request holds
//!   one of each. With `ulimit -n 1024` that is 384 clients and 384 instance connections.
//!
//! A route's own cap (`RouteOptions::max_connections`) applies within that.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept out of the proxy's reach (see the module head).
pub const RESERVE: usize = 256;

/// Refused connections being answered at once; more are closed without an answer. Part of
/// `RESERVE`.
pub(crate) const REFUSING: usize = 32;

/// The fewest client (and instance) connections a tiny limit still allows.
const FLOOR: usize = 16;

/// The environment variable in which a serving graven records the soft limit it started
/// with; every graven process started under it puts that limit back first thing
/// (`restore_started_nofile`), so workloads and RUN steps never see the raised one (many
/// programs misbehave with a huge soft limit, e.g. by closing every possible descriptor).
pub const STARTED_NOFILE_ENV: &str = "GRAVEN_STARTED_NOFILE";

/// Raises the soft descriptor limit to the hard one and records the old soft limit in
/// `STARTED_NOFILE_ENV`. Called by the serving commands (`up`, `daemon`, `__proxy`) before
/// any thread exists. A failure leaves the limit as it was: the budget is then derived
/// from that one.
pub fn raise_nofile() {
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        // An unlimited soft limit needs no raise; an unlimited hard one cannot be a soft
        // limit for descriptors (Linux caps it at fs.nr_open), so raise to that instead.
        if let (Some(soft), None) = (limit.current, limit.maximum) {
            let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok());
            if let Some(ceiling) = ceiling.filter(|&ceiling| ceiling > soft) {
                set_soft(soft, ceiling, None);
            }
        }
        return;
    };
    if hard > soft {
        set_soft(soft, hard, Some(hard));
    }
}

fn set_soft(started: u64, soft: u64, hard: Option<u64>) {
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: hard,
        },
    );
    if raised.is_ok() && std::env::var_os(STARTED_NOFILE_ENV).is_none() {
        // SAFETY: called from `cli::main` before the async runtime or any other thread
        // exists, so nothing can read the environment concurrently.
        unsafe { std::env::set_var(STARTED_NOFILE_ENV, started.to_string()) };
    }
}

/// The soft limit this graven, or the serving graven it was started under, started with,
/// when `raise_nofile` raised it (see `STARTED_NOFILE_ENV`).
pub fn started_nofile() -> Option<u64> {
    std::env::var_os(STARTED_NOFILE_ENV)
        .and_then(|value| value.to_str().and_then(|text| text.parse::<u64>().ok()))
}

/// Puts back the soft limit a serving graven started with, when this process was started
/// under one (see `STARTED_NOFILE_ENV`). Called by `main` before the sandbox helper or the
/// shim takes over, so the workloads they start inherit the limit graven was given; and in
/// the child of any other program a serving graven starts (`up`'s build step). Only
/// getrlimit and setrlimit, so it is safe between fork and exec.
pub fn restore_started_nofile() {
    let Some(started) = started_nofile() else {
        return;
    };
    lower_nofile_to(started);
}

fn lower_nofile_to(started: u64) {
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|soft| soft > started) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(started),
                maximum: limit.maximum,
            },
        );
    }
}

/// A hook for `CommandExt::pre_exec` that gives a program a serving graven starts the soft
/// limit graven started with (read now, in the parent: reading the environment after fork is
/// not safe).
pub fn restore_in_child() -> Option<impl FnMut() -> std::io::Result<()> + Send + Sync + 'static> {
    let started = started_nofile()?;
    Some(move || {
        lower_nofile_to(started);
        Ok(())
    })
}

/// How many client connections and instance connections a soft limit of `soft` allows.
fn split(soft: u64) -> (usize, usize) {
    let usable = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(RESERVE);
    let clients = (usable / 2).max(FLOOR);
    let instances = (usable - usable / 2).max(FLOOR);
    (clients, instances)
}

/// The process's budget of proxied connections, derived from the soft limit on first use
/// (after `raise_nofile`).
#[derive(Debug)]
pub(crate) struct Budget {
    clients: Pool,
    instances: Pool,
    refusing: Pool,
}

#[derive(Debug)]
struct Pool {
    limit: usize,
    used: AtomicUsize,
}

/// One descriptor's place in the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(&'static Pool);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    const fn new(limit: usize) -> Pool {
        Pool {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    fn take(&'static self) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.limit).then_some(used + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }
}

pub(crate) fn budget() -> &'static Budget {
    static BUDGET: OnceLock<Budget> = OnceLock::new();
    BUDGET.get_or_init(|| {
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let (clients, instances) = split(soft);
        Budget {
            clients: Pool::new(clients),
            instances: Pool::new(instances),
            refusing: Pool::new(REFUSING),
        }
    })
}

impl Budget {
    /// A client connection's place, or None when every route together is at the limit.
    pub(crate) fn client(&'static self) -> Option<Slot> {
        self.clients.take()
    }

    /// A connection to an instance's place, or None when the budget for them is spent.
    pub(crate) fn instance(&'static self) -> Option<Slot> {
        self.instances.take()
    }

    /// A place to answer a refused connection, or None: then it is closed unanswered.
    pub(crate) fn refusal(&'static self) -> Option<Slot> {
        self.refusing.take()
    }

    pub(crate) fn client_limit(&self) -> usize {
        self.clients.limit
    }

    pub(crate) fn instance_limit(&self) -> usize {
        self.instances.limit
    }
}

/// How many times graven failed to open a socket for want of descriptors or buffers.
static EXHAUSTIONS: AtomicU64 = AtomicU64::new(0);

/// Whether an error from opening a socket means graven (or the machine) ran out of
/// descriptors or buffers: a failure of graven's, not evidence against the peer. Counts it
/// when so (see `exhaustions`).
pub fn exhausted(error: &std::io::Error) -> bool {
    let exhausted = matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if exhausted {
        EXHAUSTIONS.fetch_add(1, Ordering::Relaxed);
    }
    exhausted
}

/// The count of exhaustions so far: a health probe that timed out while it grew may have
/// been starved by graven itself, and says nothing about the instance. Under the budget
/// clients cannot cause one; anything else in the process still might.
pub fn exhaustions() -> u64 {
    EXHAUSTIONS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_and_the_rest_split_between_clients_and_instances() {
        assert_eq!(split(1024), (384, 384));
        assert_eq!(split(1025), (384, 385));
        assert_eq!(split(65536), (32640, 32640));
        // A limit below the reserve still serves a few connections.
        assert_eq!(split(64), (FLOOR, FLOOR));
        assert_eq!(split(u64::MAX).0, (usize::MAX - RESERVE) / 2);
    }
}
