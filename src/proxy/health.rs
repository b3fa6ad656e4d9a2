//! Active health checks: one monitor per instance probes it (a GET of its health path over
//! HTTP/1.1, a TCP connect, or a probe its caller gives: an exec or a process check, which
//! only the runtime can make) and reports a flip only after N consecutive results, so one
//! slow answer does not unroute an instance and one lucky answer does not route a broken
//! one. The counting is a pure state machine (`HealthCounter`) shared by every kind; the
//! monitor is the thin shell that probes on a timer.
//!
//! A probe that fails because graven itself is out of descriptors or buffers (or times out
//! while graven failed for want of them elsewhere) says nothing about the instance: the round
//! is skipped, neither a pass nor a failure, so that a client exhausting graven can never
//! make the controller see a healthy instance flip and replace it.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use super::limits;
use super::{HealthCheck, HealthKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not yet seen healthy_after consecutive passes since it started.
    Unknown,
    Healthy,
    Unhealthy,
}

/// A flip of one instance's health, with what the last probe saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChange {
    pub instance: String,
    pub health: Health,
    pub detail: String,
}

/// Counts consecutive probe results and decides when health flips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCounter {
    health: Health,
    passes: u32,
    failures: u32,
}

impl Default for HealthCounter {
    fn default() -> HealthCounter {
        HealthCounter {
            health: Health::Unknown,
            passes: 0,
            failures: 0,
        }
    }
}

impl HealthCounter {
    /// A counter that resumes from a health already known (an instance a restarted
    /// controller adopts as healthy must still be caught when it stops answering).
    pub fn starting_at(health: Health) -> HealthCounter {
        HealthCounter {
            health,
            ..HealthCounter::default()
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one probe result; returns the new health when it flips. An instance that was
    /// never healthy stays Unknown however often it fails: it is not routed either way, and
    /// "unhealthy" is kept for one that was serving and stopped.
    pub fn observe(&mut self, passed: bool, check: &HealthCheck) -> Option<Health> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if self.health != Health::Healthy && self.passes >= check.healthy_after.max(1) {
                self.health = Health::Healthy;
                return Some(Health::Healthy);
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.health == Health::Healthy && self.failures >= check.unhealthy_after.max(1) {
                self.health = Health::Unhealthy;
                return Some(Health::Unhealthy);
            }
        }
        None
    }
}

/// Probes one instance until dropped.
#[derive(Debug)]
pub struct HealthMonitor {
    task: JoinHandle<()>,
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthMonitor {
    /// Starts probing; sends a HealthChange on every flip, after healthy_after consecutive
    /// passes (Unknown/Unhealthy -> Healthy) or unhealthy_after consecutive failures
    /// (Healthy -> Unhealthy). A never-healthy instance stays Unknown. Stops when dropped.
    /// Must be called inside a Tokio runtime.
    pub fn spawn(
        instance: String,
        address: SocketAddr,
        check: HealthCheck,
        changes: UnboundedSender<HealthChange>,
    ) -> HealthMonitor {
        HealthMonitor::spawn_from(instance, address, check, Health::Unknown, changes)
    }

    /// Like `spawn`, for an instance whose health is already known: only a change from
    /// `initial` is reported. Probes `address` as the check's kind says: `http` and `tcp`
    /// connect; the kinds that need the runtime (`exec`, `none`) are the caller's, through
    /// `spawn_probing`: here they are never made (skipped, as graven's own failure).
    pub fn spawn_from(
        instance: String,
        address: SocketAddr,
        check: HealthCheck,
        initial: Health,
        changes: UnboundedSender<HealthChange>,
    ) -> HealthMonitor {
        let probe = network_probe(address, &check);
        HealthMonitor::spawn_probing(instance, check, initial, changes, probe)
    }

    /// Like `spawn_from`, with the probe given: each call makes one probe, which must end
    /// within about the check's timeout on its own (the monitor does not cut it short: a
    /// probe that runs a process must reap it). An `Ok` passes and says what it saw.
    pub fn spawn_probing<P, F>(
        instance: String,
        check: HealthCheck,
        initial: Health,
        changes: UnboundedSender<HealthChange>,
        mut probe: P,
    ) -> HealthMonitor
    where
        P: FnMut() -> F + Send + 'static,
        F: Future<Output = Result<String, ProbeFailure>> + Send + 'static,
    {
        let task = tokio::spawn(async move {
            let mut counter = HealthCounter::starting_at(initial);
            // Whether the last round was skipped for graven's own exhaustion (logged once).
            let mut skipping = false;
            // A zero interval would make tokio's interval panic; probe back to back instead.
            let period = check.interval.max(std::time::Duration::from_millis(1));
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let result = probe().await;
                let passed = match &result {
                    Ok(_) => true,
                    Err(ProbeFailure::Instance(_)) => false,
                    Err(ProbeFailure::Graven(why)) => {
                        if !skipping {
                            // Not `eprintln!`: a closed stderr must not end the monitor.
                            use std::io::Write as _;
                            let _ = writeln!(
                                std::io::stderr(),
                                "graven: health checks of instance {instance} are skipped \
                                 until graven can make them again: {why}"
                            );
                            skipping = true;
                        }
                        continue;
                    }
                };
                skipping = false;
                if let Some(health) = counter.observe(passed, &check) {
                    let detail = match result {
                        Ok(answer) => answer,
                        Err(ProbeFailure::Instance(error) | ProbeFailure::Graven(error)) => error,
                    };
                    let change = HealthChange {
                        instance: instance.clone(),
                        health,
                        detail,
                    };
                    if changes.send(change).is_err() {
                        return;
                    }
                }
            }
        });
        HealthMonitor { task }
    }
}

/// Why a probe did not pass: the instance's doing, or graven's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    /// What the instance answered, or that it did not: counts as a failure.
    Instance(String),
    /// graven could not make the probe (no descriptor, no buffer): not evidence.
    Graven(String),
}

/// The probe of an `http` or `tcp` check on `address`, bounded by the check's timeout; the
/// answer as it is shown (`/healthz 200`, `connected`).
fn network_probe(
    address: SocketAddr,
    check: &HealthCheck,
) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = Result<String, ProbeFailure>> + Send>>
+ Send
+ 'static {
    let kind = check.kind.clone();
    let path = check.path.clone();
    let timeout = check.timeout;
    move || {
        let kind = kind.clone();
        let path = path.clone();
        Box::pin(async move {
            let exhaustions = limits::exhaustions();
            let probed = async {
                match kind {
                    HealthKind::Http => http_probe(address, &path)
                        .await
                        .map(|status| format!("{path} {status}")),
                    HealthKind::Tcp => tcp_probe(address).await,
                    HealthKind::Exec { .. } | HealthKind::None => Err(ProbeFailure::Graven(
                        format!("a {kind:?} check is not made by connecting"),
                    )),
                }
            };
            let result = match tokio::time::timeout(timeout, probed).await {
                Ok(result) => result,
                // graven itself ran out of descriptors meanwhile: the wait may be its own.
                Err(_) if limits::exhaustions() != exhaustions => Err(ProbeFailure::Graven(
                    format!("no answer within {timeout:?} while graven was out of descriptors"),
                )),
                Err(_) => Err(ProbeFailure::Instance(format!(
                    "no answer within {timeout:?}"
                ))),
            };
            // An http failure names the path, as the answer does.
            result.map_err(|failure| match (&kind, failure) {
                (HealthKind::Http, ProbeFailure::Instance(e)) => {
                    ProbeFailure::Instance(format!("{path}: {e}"))
                }
                (HealthKind::Http, ProbeFailure::Graven(e)) => {
                    ProbeFailure::Graven(format!("{path}: {e}"))
                }
                (_, failure) => failure,
            })
        })
    }
}

/// A connect, which says nothing of the protocol: for a server that does not speak HTTP (a
/// database answers an HTTP probe with an error of its own). The connection is closed at once.
async fn tcp_probe(address: SocketAddr) -> Result<String, ProbeFailure> {
    match TcpStream::connect(address).await {
        Ok(_) => Ok("connected".to_owned()),
        Err(error) if limits::exhausted(&error) => Err(ProbeFailure::Graven(error.to_string())),
        Err(error) => Err(ProbeFailure::Instance(format!("connect: {error}"))),
    }
}

/// One probe on a fresh connection (a pooled one could hide a listener that is gone):
/// a 2xx or 3xx answer passes. Returns the status, or why it failed.
async fn http_probe(address: SocketAddr, path: &str) -> Result<u16, ProbeFailure> {
    let instance = |error: &dyn std::fmt::Display| ProbeFailure::Instance(error.to_string());
    let stream = TcpStream::connect(address).await.map_err(|error| {
        if limits::exhausted(&error) {
            ProbeFailure::Graven(error.to_string())
        } else {
            instance(&error)
        }
    })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| instance(&error))?;
    let connection = tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, address.to_string())
        .header(header::USER_AGENT, "graven-health")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|error| instance(&error))?;
    let result = sender.send_request(request).await;
    connection.abort();
    let status = result.map_err(|error| instance(&error))?.status();
    if status.is_success() || status.is_redirection() {
        Ok(status.as_u16())
    } else {
        Err(ProbeFailure::Instance(format!("answered {status}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check_after(healthy_after: u32, unhealthy_after: u32) -> HealthCheck {
        HealthCheck {
            kind: HealthKind::Http,
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_after,
            unhealthy_after,
            start_period: Duration::ZERO,
        }
    }

    /// Feeds a sequence of results ('+' pass, '-' fail) and renders the health after each,
    /// upper case where it flipped.
    fn check(healthy_after: u32, unhealthy_after: u32, results: &str, expected: &str) {
        check_from(
            Health::Unknown,
            healthy_after,
            unhealthy_after,
            results,
            expected,
        );
    }

    fn check_from(
        initial: Health,
        healthy_after: u32,
        unhealthy_after: u32,
        results: &str,
        expected: &str,
    ) {
        let check = check_after(healthy_after, unhealthy_after);
        let mut counter = HealthCounter::starting_at(initial);
        let rendered: Vec<String> = results
            .chars()
            .map(|result| {
                let flipped = counter.observe(result == '+', &check);
                let name = match counter.health() {
                    Health::Unknown => "unknown",
                    Health::Healthy => "healthy",
                    Health::Unhealthy => "unhealthy",
                };
                if flipped.is_some() {
                    name.to_uppercase()
                } else {
                    name.to_owned()
                }
            })
            .collect();
        assert_eq!(rendered.join(" "), expected, "{results}");
    }

    #[test]
    fn flips_only_after_consecutive_results() {
        check(2, 3, "+", "unknown");
        check(2, 3, "++", "unknown HEALTHY");
        check(2, 3, "+-+", "unknown unknown unknown");
        check(2, 3, "++---", "unknown HEALTHY healthy healthy UNHEALTHY");
        check(
            2,
            3,
            "++--+--",
            "unknown HEALTHY healthy healthy healthy healthy healthy",
        );
        check(
            2,
            3,
            "++---+",
            "unknown HEALTHY healthy healthy UNHEALTHY unhealthy",
        );
        check(
            2,
            3,
            "++---++",
            "unknown HEALTHY healthy healthy UNHEALTHY unhealthy HEALTHY",
        );
        check(1, 1, "+-+", "HEALTHY UNHEALTHY HEALTHY");
    }

    #[test]
    fn a_counter_resumed_as_healthy_still_flips_to_unhealthy() {
        check_from(Health::Healthy, 2, 3, "---", "healthy healthy UNHEALTHY");
        check_from(Health::Healthy, 2, 3, "+", "healthy");
        check_from(Health::Unhealthy, 2, 3, "++", "unhealthy HEALTHY");
    }

    #[test]
    fn never_healthy_stays_unknown() {
        check(
            2,
            3,
            "------",
            "unknown unknown unknown unknown unknown unknown",
        );
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        check(0, 0, "+-", "HEALTHY UNHEALTHY");
    }
}
