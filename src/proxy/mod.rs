//! The proxy owns the identity layer: one listener per route (HTTP, or TCP at layer 4),
//! served on as many threads as the route is given,
//! balancing over the instances it is given, active health checks, draining, holding and
//! retries, and per-release counters. It knows nothing of deploys, releases' meaning or the
//! event log: the controller hands it snapshots of backends and reads its health changes.
//!
//! Division of labour with the controller: `health::HealthMonitor` probes one instance and
//! reports flips (after N consecutive results); the controller records each flip as an event
//! and then hands the route a new snapshot of `Backend`s. The route balances over backends
//! that are both `healthy` and `enabled` (two separate facts).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod backends;
mod batched;
mod body;
mod error;
pub mod faults;
pub mod health;
mod http1;
pub mod limits;
mod metrics;
mod route;
mod serving;
mod tcp;
mod upstream;

pub use error::{ErrorClass, ProxyError};
pub use health::{Health, HealthChange, HealthMonitor, ProbeFailure};
pub use http1::UpstreamError;
pub use metrics::{
    ErrorCounts, LatencyHistogram, ReleaseMetrics, RouteMetrics, StatusCounts, TcpCounts,
};
pub use route::Route;
pub use serving::Takeover;
pub use tcp::TcpRoute;

/// A route of either kind, as its owner holds it.
#[derive(Debug)]
pub enum AnyRoute {
    Http(Route),
    Tcp(TcpRoute),
}

impl AnyRoute {
    /// Binds an HTTP route, or a TCP one when `tcp`.
    pub async fn bind(options: RouteOptions, tcp: bool) -> Result<AnyRoute, ProxyError> {
        Ok(if tcp {
            AnyRoute::Tcp(TcpRoute::bind(options).await?)
        } else {
            AnyRoute::Http(Route::bind(options).await?)
        })
    }

    /// Binds a route of the kind `tcp` says on `previous`'s listening socket, with new
    /// options (another thread count): no connection waiting to be accepted is lost. Binds
    /// afresh when `previous` is stopping already.
    pub async fn take_over(
        options: RouteOptions,
        tcp: bool,
        previous: &AnyRoute,
    ) -> Result<AnyRoute, ProxyError> {
        let takeover = match previous {
            AnyRoute::Http(route) => route.takeover(),
            AnyRoute::Tcp(route) => route.takeover(),
        };
        let Some(takeover) = takeover else {
            return AnyRoute::bind(options, tcp).await;
        };
        Ok(if tcp {
            AnyRoute::Tcp(TcpRoute::take_over(options, &takeover).await?)
        } else {
            AnyRoute::Http(Route::take_over(options, &takeover).await?)
        })
    }

    /// How many threads the route serves on.
    pub fn threads(&self) -> usize {
        match self {
            AnyRoute::Http(route) => route.threads(),
            AnyRoute::Tcp(route) => route.threads(),
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, AnyRoute::Tcp(_))
    }

    pub fn local_addr(&self) -> SocketAddr {
        match self {
            AnyRoute::Http(route) => route.local_addr(),
            AnyRoute::Tcp(route) => route.local_addr(),
        }
    }

    pub fn set_backends(&self, backends: Vec<Backend>) {
        match self {
            AnyRoute::Http(route) => route.set_backends(backends),
            AnyRoute::Tcp(route) => route.set_backends(backends),
        }
    }

    /// Waits until the instance's requests (HTTP) or connections (TCP) have finished, or
    /// `timeout` passes; a TCP route then closes the connections left.
    pub async fn drain(&self, instance: &str, timeout: Duration) -> usize {
        match self {
            AnyRoute::Http(route) => route.drain(instance, timeout).await,
            AnyRoute::Tcp(route) => route.drain(instance, timeout).await,
        }
    }

    pub fn metrics(&self) -> RouteMetrics {
        match self {
            AnyRoute::Http(route) => route.metrics(),
            AnyRoute::Tcp(route) => route.metrics(),
        }
    }

    /// Sets or clears an HTTP route's fault; false on a TCP route, which takes none.
    pub fn set_fault(&self, fault: Option<faults::Fault>) -> bool {
        match self {
            AnyRoute::Http(route) => {
                route.set_fault(fault);
                true
            }
            AnyRoute::Tcp(_) => false,
        }
    }

    pub async fn shutdown(self) {
        match self {
            AnyRoute::Http(route) => route.shutdown().await,
            AnyRoute::Tcp(route) => route.shutdown().await,
        }
    }

    /// Stops accepting and closes once the connections are done: an HTTP route after the
    /// request each is serving (as `shutdown`), a TCP route once they end or `grace` passes.
    /// For a route whose successor took its listener over (`take_over`).
    pub async fn retire(self, grace: Duration) {
        match self {
            AnyRoute::Http(route) => route.shutdown().await,
            AnyRoute::Tcp(route) => route.retire(grace).await,
        }
    }
}

/// An active health check, as `graven.toml`'s `health` table describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What a probe does; `path` is only the `http` kind's.
    pub kind: HealthKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes before an instance counts as healthy.
    pub healthy_after: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    pub unhealthy_after: u32,
    /// How much longer than the deploy's health deadline a new instance has to become
    /// healthy (Docker's start period: a slow start is not a failure).
    pub start_period: Duration,
}

/// What a health probe does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthKind {
    /// A GET of the path on a fresh connection: 2xx or 3xx passes.
    Http,
    /// A TCP connect to the instance's address passes.
    Tcp,
    /// A command run inside the instance (by the runtime, never the proxy): exit 0 passes.
    /// A shell string is `["/bin/sh", "-c", TEXT]` here.
    Exec { command: Vec<String> },
    /// No probe: the instance passes while its process runs.
    None,
}

impl HealthKind {
    /// The kind as graven.toml and the event log spell it.
    pub fn name(&self) -> &'static str {
        match self {
            HealthKind::Http => "http",
            HealthKind::Tcp => "tcp",
            HealthKind::Exec { .. } => "exec",
            HealthKind::None => "none",
        }
    }

    /// The `exec` kind's command; empty for the others.
    pub fn command(&self) -> &[String] {
        match self {
            HealthKind::Exec { command } => command,
            HealthKind::Http | HealthKind::Tcp | HealthKind::None => &[],
        }
    }
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
    /// Threads the route serves on (at least one); each client connection is served wholly
    /// by one of them.
    pub threads: usize,
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
    /// A client connection that has not sent a whole first request head this long after it
    /// was accepted is closed.
    pub header_timeout: Duration,
    /// A client connection on which no request began for this long is closed (HTTP/1.1:
    /// after the answer in progress, if any; HTTP/2: with GOAWAY, open streams finish).
    pub idle_timeout: Duration,
    /// Client connections open at once; more are refused (503, `Connection: close`). The
    /// process's descriptor budget (`limits`) may allow fewer.
    pub max_connections: usize,
}

/// Environment variables that override `RouteOptions`' defaults for every route of the
/// process (docs/proxy.md): the operator's knob, and how tests shorten the timeouts.
pub const HEADER_TIMEOUT_ENV: &str = "GRAVEN_ROUTE_HEADER_TIMEOUT";
pub const IDLE_TIMEOUT_ENV: &str = "GRAVEN_ROUTE_IDLE_TIMEOUT";
pub const MAX_CONNECTIONS_ENV: &str = "GRAVEN_ROUTE_MAX_CONNECTIONS";

impl RouteOptions {
    /// The defaults, with the `GRAVEN_ROUTE_*` overrides applied (a malformed one is
    /// ignored here and refused by `Route::bind`).
    ///
    /// Why these defaults: a header timeout of 10 s is HAProxy's recommended
    /// `timeout http-request` (nginx's `client_header_timeout` is 60 s, hyper's own 30 s);
    /// an idle timeout of 60 s is an AWS load balancer's, a little under nginx's
    /// `keepalive_timeout` of 75 s, and well under Envoy's one hour, which assumes a
    /// connection limit far above one machine's. 4096 connections per route is far more
    /// than legitimate clients of one service open (a browser opens 6 per host), and bounds
    /// the memory idle connections take (some 16 KiB each) to about 64 MiB per route.
    pub fn new(listen: SocketAddr) -> RouteOptions {
        let mut options = RouteOptions {
            listen,
            threads: default_threads(),
            hold_queue: 1024,
            hold_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            retries: 2,
            response_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        };
        let _ = options.apply_environment();
        options
    }

    /// Applies the `GRAVEN_ROUTE_*` overrides that are set; fails on the first malformed one.
    pub(crate) fn apply_environment(&mut self) -> Result<(), ProxyError> {
        if let Some(value) = setting(HEADER_TIMEOUT_ENV, humantime::parse_duration)? {
            self.header_timeout = value;
        }
        if let Some(value) = setting(IDLE_TIMEOUT_ENV, humantime::parse_duration)? {
            self.idle_timeout = value;
        }
        if let Some(value) = setting(MAX_CONNECTIONS_ENV, str::parse::<usize>)? {
            self.max_connections = value;
        }
        Ok(())
    }
}

/// A route's threads unless told otherwise: one per core the process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Reads one override: None when unset, the error naming it when malformed.
fn setting<T, E: std::fmt::Display>(
    name: &'static str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, ProxyError> {
    let Some(value) = std::env::var_os(name) else {
        return Ok(None);
    };
    let text = value.to_string_lossy().into_owned();
    parse(text.trim())
        .map(Some)
        .map_err(|error| ProxyError::Setting {
            name,
            value: text,
            reason: error.to_string(),
        })
}
