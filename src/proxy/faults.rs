//! Faults an HTTP route injects for a planned failure: added latency, an error status, or a
//! connection closed without an answer, each for a share of requests until a deadline.
//! Whoever owns the route (the controller) sets and clears them; the proxy knows nothing of
//! why.
//!
//! The hot path pays one relaxed atomic load when no fault is set: the fault itself sits
//! behind an `ArcSwapOption` that is read only while the flag says one is set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

pub use crate::chaos::PPM;

/// The header a fault's answer (or a delayed request's answer) carries, naming the fault:
/// what graven did is never mistaken for what the service did.
pub const FAULT_HEADER: &str = "x-graven-fault";

/// What a fault does to a request it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Forwarded after this delay.
    Latency(Duration),
    /// Answered with this status by the route, never forwarded.
    Error(u16),
    /// Its connection is closed without an answer.
    Reset,
}

/// A fault as set on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub effect: Effect,
    /// Of the requests, how many per million it hits.
    pub share_ppm: u32,
    /// No request is hit after this, whether or not the fault was cleared.
    pub until: Instant,
}

/// Requests faults hit, by effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedCounts {
    pub delayed: u64,
    pub errors: u64,
    pub resets: u64,
}

/// A route's fault slot and its counters.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    set: AtomicBool,
    fault: ArcSwapOption<Fault>,
    delayed: AtomicU64,
    errors: AtomicU64,
    resets: AtomicU64,
}

impl Faults {
    pub(crate) fn set(&self, fault: Option<Fault>) {
        let set = fault.is_some();
        self.fault.store(fault.map(std::sync::Arc::new));
        self.set.store(set, Ordering::Release);
    }

    /// What, if anything, to do to the request about to be served.
    #[inline]
    pub(crate) fn draw(&self) -> Option<Effect> {
        if !self.set.load(Ordering::Relaxed) {
            return None;
        }
        self.draw_set()
    }

    #[cold]
    fn draw_set(&self) -> Option<Effect> {
        let guard = self.fault.load();
        let fault = guard.as_ref()?;
        if Instant::now() >= fault.until {
            self.expire(&guard);
            return None;
        }
        if fastrand::u32(..PPM) >= fault.share_ppm {
            return None;
        }
        let counter = match fault.effect {
            Effect::Latency(_) => &self.delayed,
            Effect::Error(_) => &self.errors,
            Effect::Reset => &self.resets,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(fault.effect)
    }

    /// Takes the expired fault `expired` off the hot path: the slot is emptied only if it
    /// still holds that fault, then the flag cleared, and set again if a fault was set
    /// meanwhile (`set` stores the fault before the flag, so one is never hidden).
    #[cold]
    fn expire(&self, expired: &arc_swap::Guard<Option<std::sync::Arc<Fault>>>) {
        let previous = self.fault.compare_and_swap(expired, None);
        let ptr = |f: &Option<std::sync::Arc<Fault>>| f.as_ref().map(std::sync::Arc::as_ptr);
        if ptr(&previous) != ptr(expired) {
            return;
        }
        self.set.store(false, Ordering::SeqCst);
        if self.fault.load().is_some() {
            self.set.store(true, Ordering::SeqCst);
        }
    }

    pub(crate) fn counts(&self) -> InjectedCounts {
        InjectedCounts {
            delayed: self.delayed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
        }
    }
}

/// The error a service function returns to make hyper close the connection without an
/// answer (a reset, as the client sees it).
#[derive(Debug, thiserror::Error)]
#[error("connection closed by an injected fault")]
pub struct InjectedReset;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_fault_draws_nothing_and_a_fault_hits_its_share_until_its_deadline() {
        let faults = Faults::default();
        assert_eq!(faults.draw(), None);
        let until = Instant::now() + Duration::from_secs(60);
        faults.set(Some(Fault {
            effect: Effect::Error(503),
            share_ppm: 250_000,
            until,
        }));
        let n = 40_000;
        let hits = (0..n).filter(|_| faults.draw().is_some()).count();
        // Binomial(40000, 0.25): sd ≈ 87; ±600 is about seven.
        assert!((9_400..10_600).contains(&hits), "{hits}");
        assert_eq!(faults.counts().errors, hits as u64);
        faults.set(Some(Fault {
            effect: Effect::Reset,
            share_ppm: PPM,
            until: Instant::now(),
        }));
        assert_eq!(faults.draw(), None, "past its deadline");
        faults.set(None);
        assert_eq!(faults.draw(), None);
    }
}

#[cfg(test)]
mod expiry {
    use super::*;

    /// A fault past its deadline leaves the hot path at once: its flag is cleared by the
    /// first request that finds it expired, not only when the controller clears it. A fault
    /// set since then is kept.
    #[test]
    fn an_expired_fault_clears_the_route_s_flag() {
        let faults = Faults::default();
        faults.set(Some(Fault {
            effect: Effect::Error(503),
            share_ppm: PPM,
            until: Instant::now(),
        }));
        assert_eq!(faults.draw(), None);
        assert!(
            !faults.set.load(Ordering::SeqCst),
            "the flag outlived the fault"
        );
        assert!(faults.fault.load().is_none());
        let live = Fault {
            effect: Effect::Reset,
            share_ppm: PPM,
            until: Instant::now() + Duration::from_secs(60),
        };
        faults.set(Some(live));
        assert_eq!(faults.draw(), Some(Effect::Reset));
        assert!(faults.set.load(Ordering::SeqCst));
    }
}
