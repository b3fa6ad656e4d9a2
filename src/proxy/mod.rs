//! The proxy owns the identity layer: one HTTP listener per route, balancing over the
//! instances it is given, active health checks, draining, request holding and retries, and
//! per-release counters. It knows nothing of deploys, releases' meaning or the event log:
//! the controller hands it snapshots of backends and reads its health changes.
//!
//! Division of labour with the controller: `health::HealthMonitor` probes one instance and
//! reports flips (after N consecutive results); the controller records each flip as an event
//! and then hands the route a new snapshot of `Backend`s. The route balances over backends
//! that are both `healthy` and `enabled` (two separate facts).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod body;
mod error;
pub mod health;
mod metrics;
mod route;
mod upstream;

pub use error::{ErrorClass, ProxyError};
pub use health::{Health, HealthChange, HealthMonitor};
pub use metrics::{ErrorCounts, LatencyHistogram, ReleaseMetrics, RouteMetrics, StatusCounts};
pub use route::Route;

/// An active health check, as `graven.toml`'s `health` table describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes before an instance counts as healthy.
    pub healthy_after: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    pub unhealthy_after: u32,
}

/// One instance as the route sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub instance: String,
    pub release: u64,
    pub address: SocketAddr,
    pub healthy: bool,
    /// False for an instance being drained or kept warm but unrouted.
    pub enabled: bool,
}

/// How a route listens and treats requests while no instance is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteOptions {
    pub listen: SocketAddr,
    /// At most this many requests wait for a ready instance; more are answered 503 at once.
    pub hold_queue: usize,
    /// A held request waits at most this long, then is answered 503.
    pub hold_timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra attempts, on other instances, for idempotent requests that failed to connect.
    pub retries: u32,
    /// An instance that has not begun its answer this long after the request was sent is
    /// given up on, and the client gets 504.
    pub response_timeout: Duration,
}

impl RouteOptions {
    pub fn new(listen: SocketAddr) -> RouteOptions {
        RouteOptions {
            listen,
            hold_queue: 1024,
            hold_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            retries: 2,
            response_timeout: Duration::from_secs(60),
        }
    }
}
