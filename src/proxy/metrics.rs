//! RED counters per release: requests, errors by class, and a latency histogram with fixed
//! buckets. The hot path only does relaxed atomic increments; `RouteMetrics` is a copy taken
//! when someone asks (the controller's canary analysis, the API).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ErrorClass;

/// Upper bounds of the latency buckets, in microseconds (1-2-5 steps from 50 µs to 10 s);
/// a last, unbounded bucket holds everything slower.
pub const LATENCY_BOUNDS_US: [u64; 18] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The live counters of one release on one route.
#[derive(Debug)]
pub(crate) struct ReleaseCounters {
    release: u64,
    requests: AtomicU64,
    /// Answers from instances by status class: 1xx..5xx.
    responses: [AtomicU64; 5],
    /// Proxy-generated errors by class: client, upstream, graven.
    errors: [AtomicU64; 3],
    latency: [AtomicU64; BUCKETS],
    /// A TCP route's byte and connection counts; None on an HTTP route.
    tcp: Option<TcpCounters>,
}

/// What only a TCP route counts, per release.
#[derive(Debug, Default)]
pub(crate) struct TcpCounters {
    /// Bytes from clients to instances, and back.
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Connections open now.
    pub(crate) open: AtomicU64,
    /// Connections graven closed: still open at a drain's deadline or the route's shutdown.
    pub(crate) cut: AtomicU64,
}

impl ReleaseCounters {
    /// `tcp`: the release is served by a TCP route (see `TcpCounters`).
    pub(crate) fn new(release: u64, tcp: bool) -> ReleaseCounters {
        ReleaseCounters {
            release,
            requests: AtomicU64::new(0),
            responses: Default::default(),
            errors: Default::default(),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            tcp: tcp.then(TcpCounters::default),
        }
    }

    /// Records a connection that reached an instance of this release `elapsed` after it was
    /// accepted (TCP routes).
    pub(crate) fn connected(&self, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// A TCP route's counters (None on an HTTP route).
    pub(crate) fn tcp(&self) -> Option<&TcpCounters> {
        self.tcp.as_ref()
    }

    /// Records an answer from an instance that took `elapsed` to begin.
    pub(crate) fn response(&self, status: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records a request that ended in a proxy-generated error.
    pub(crate) fn error(&self, class: ErrorClass, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors[class_index(class)].fetch_add(1, Ordering::Relaxed);
        self.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ReleaseMetrics {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counts: Vec<u64> = self.latency.iter().map(load).collect();
        ReleaseMetrics {
            release: self.release,
            requests: load(&self.requests),
            responses: StatusCounts {
                informational: load(&self.responses[0]),
                success: load(&self.responses[1]),
                redirection: load(&self.responses[2]),
                client_error: load(&self.responses[3]),
                server_error: load(&self.responses[4]),
            },
            errors: error_counts(&self.errors),
            p50_us: quantile(&counts, 0.50),
            p99_us: quantile(&counts, 0.99),
            latency: LatencyHistogram {
                bounds_us: LATENCY_BOUNDS_US.to_vec(),
                counts,
            },
            tcp: self.tcp.as_ref().map(|tcp| TcpCounts {
                bytes_in: load(&tcp.bytes_in),
                bytes_out: load(&tcp.bytes_out),
                open: load(&tcp.open),
                cut: load(&tcp.cut),
            }),
        }
    }
}

/// Requests that never reached a release (no ready instance): graven's own errors.
#[derive(Debug, Default)]
pub(crate) struct UnroutedCounters {
    errors: [AtomicU64; 3],
    retries: AtomicU64,
}

impl UnroutedCounters {
    pub(crate) fn error(&self, class: ErrorClass) {
        self.errors[class_index(class)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn metrics(&self, route: SocketAddr, releases: Vec<ReleaseMetrics>) -> RouteMetrics {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RouteMetrics {
            route,
            releases,
            unrouted: error_counts(&self.errors),
            retries: load(&self.retries),
            connections: 0,
            refused: 0,
            accepted_by_thread: Vec::new(),
            injected: Default::default(),
        }
    }
}

/// Reads error counters indexed by `class_index`.
fn error_counts(errors: &[AtomicU64; 3]) -> ErrorCounts {
    let load = |class: ErrorClass| errors[class_index(class)].load(Ordering::Relaxed);
    ErrorCounts {
        client: load(ErrorClass::Client),
        upstream: load(ErrorClass::Upstream),
        graven: load(ErrorClass::Graven),
    }
}

fn class_index(class: ErrorClass) -> usize {
    match class {
        ErrorClass::Client => 0,
        ErrorClass::Upstream => 1,
        ErrorClass::Graven => 2,
    }
}

fn bucket(elapsed: Duration) -> usize {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_US.partition_point(|&bound| bound < micros)
}

/// Estimates a quantile from bucket counts by interpolating linearly inside the bucket it
/// falls in; the unbounded last bucket reports its lower bound. None when nothing was counted.
fn quantile(counts: &[u64], q: f64) -> Option<u64> {
    crate::histogram::quantile(&LATENCY_BOUNDS_US, counts, q)
}

/// A copy of one route's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteMetrics {
    pub route: SocketAddr,
    /// One entry per release that has been in the route's backend set, by release number.
    pub releases: Vec<ReleaseMetrics>,
    /// Errors for requests that never reached an instance (no ready instance, queue full).
    pub unrouted: ErrorCounts,
    /// Extra attempts made on another instance after a connection failure.
    pub retries: u64,
    /// Client connections open when the metrics were taken.
    #[serde(default)]
    pub connections: u64,
    /// Client connections refused because the route was at its connection limit.
    #[serde(default)]
    pub refused: u64,
    /// Client connections each of the route's threads has been given since it started
    /// (the acceptor hands each to the thread with the fewest open).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted_by_thread: Vec<u64>,
    /// Requests the route's faults hit (planned failures), by effect.
    #[serde(default)]
    pub injected: super::faults::InjectedCounts,
}

impl RouteMetrics {
    pub fn release(&self, release: u64) -> Option<&ReleaseMetrics> {
        self.releases
            .iter()
            .find(|metrics| metrics.release == release)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseMetrics {
    pub release: u64,
    /// Every request sent to an instance of this release: answers plus proxy errors.
    pub requests: u64,
    /// Answers the instances gave, by status class.
    pub responses: StatusCounts,
    /// Answers graven made up because the instance failed (or the client did).
    pub errors: ErrorCounts,
    /// Time from receiving the request to the start of the answer; on a TCP route, from
    /// accepting the connection to reaching an instance.
    pub latency: LatencyHistogram,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// A TCP route's counts (absent on an HTTP route, whose `requests` count requests; on a
    /// TCP route they count connections, and `responses` stay zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCounts>,
}

/// What a TCP route counts per release beyond connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpCounts {
    /// Bytes from clients to instances.
    pub bytes_in: u64,
    /// Bytes from instances to clients.
    pub bytes_out: u64,
    /// Connections open when the metrics were taken.
    pub open: u64,
    /// Connections graven closed: still open at a drain's deadline or the route's shutdown.
    pub cut: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub informational: u64,
    pub success: u64,
    pub redirection: u64,
    pub client_error: u64,
    pub server_error: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub client: u64,
    pub upstream: u64,
    pub graven: u64,
}

/// `counts[i]` requests took at most `bounds_us[i]` microseconds (and more than the bound
/// before); the last count has no upper bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bucket(micros: u64, expected: usize) {
        assert_eq!(
            bucket(Duration::from_micros(micros)),
            expected,
            "{micros} µs"
        );
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        check_bucket(0, 0);
        check_bucket(50, 0);
        check_bucket(51, 1);
        check_bucket(1_000, 4);
        check_bucket(20_000_000, 17);
        check_bucket(20_000_001, 18);
    }

    fn check_quantile(samples_us: &[u64], q: f64, expected: Option<u64>) {
        let counters = ReleaseCounters::new(1, false);
        for &micros in samples_us {
            counters.response(200, Duration::from_micros(micros));
        }
        assert_eq!(
            quantile(&counters.snapshot().latency.counts, q),
            expected,
            "{samples_us:?} q={q}"
        );
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        check_quantile(&[], 0.5, None);
        // Four samples in (200, 500]: the median is halfway through that bucket.
        check_quantile(&[300, 300, 300, 300], 0.5, Some(350));
        check_quantile(&[300, 300, 300, 300], 1.0, Some(500));
        // 99 fast answers and one slow: p50 stays fast, p99 stays in the fast bucket,
        // the maximum is in the slow one.
        let mut samples = vec![80; 99];
        samples.push(40_000);
        check_quantile(&samples, 0.5, Some(75));
        check_quantile(&samples, 0.99, Some(100));
        check_quantile(&samples, 1.0, Some(50_000));
        check_quantile(&[30_000_000], 0.5, Some(20_000_000));
    }

    #[test]
    fn counts_by_status_and_error_class() {
        let counters = ReleaseCounters::new(7, false);
        counters.response(200, Duration::ZERO);
        counters.response(404, Duration::ZERO);
        counters.response(503, Duration::ZERO);
        counters.error(ErrorClass::Upstream, Duration::ZERO);
        let metrics = counters.snapshot();
        assert_eq!(metrics.requests, 4);
        assert_eq!(
            metrics.responses,
            StatusCounts {
                success: 1,
                client_error: 1,
                server_error: 1,
                ..StatusCounts::default()
            }
        );
        assert_eq!(
            metrics.errors,
            ErrorCounts {
                upstream: 1,
                ..ErrorCounts::default()
            }
        );
    }
}
