//! Events own the append-only event log (SQLite, WAL, durable before the effect) and the pure
//! fold that turns a sequence of events into the state the API shows.
//!
//! `Event` is the closed vocabulary of facts the controller records; `fold` is the only way
//! state is derived from them. Nothing here starts, stops or routes anything: the controller
//! decides and acts, and this module only says what was decided.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proxy::HealthCheck;
use crate::runtime::{InstanceId, Limits, VolumeMount};
use crate::store::Digest;

pub mod fold;
mod log;

pub use log::{
    ENVELOPE_VERSION, Envelope, EventKind, EventLog, EventLogError, Loss, RawRow, SCHEMA_VERSION,
    checksum, decode_envelope,
};

pub use fold::{
    Backoff, Deploy, DeployOutcome, DeployRecord, InstanceState, Lifecycle, Release, Scale,
    ServiceState, State, fold, replay,
};

/// The actor the controller appends its decisions as.
pub const CONTROLLER: &str = "controller";

/// One fact in the event log. The set is closed: a new kind of fact is a new variant, and the
/// fold must say what it means.
// Events are few and short-lived; boxing the release config would only make matching noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A new release of a service: its image and resolved config, numbered per environment.
    ReleaseCreated {
        service: String,
        number: u64,
        image: Digest,
        config_digest: String,
        config: ServiceConfig,
    },
    /// The service's wanted release changes to `to`; the rollout towards it begins.
    DeployStarted {
        service: String,
        from: Option<u64>,
        to: u64,
        reason: DeployReason,
    },
    /// Every instance of the service runs the wanted release, healthy; no other remains.
    DeploySucceeded {
        service: String,
        release: u64,
    },
    /// The rollout towards `from` failed; the wanted release goes back to `to`.
    DeployRolledBack {
        service: String,
        from: u64,
        to: Option<u64>,
        reason: String,
    },
    /// The controller decided to start an instance; announced before the runtime is asked.
    InstanceLaunched {
        service: String,
        release: u64,
        instance: String,
    },
    /// The runtime started (or, after a restart, still runs) the instance at `address`.
    InstanceStarted {
        instance: String,
        runtime_id: InstanceId,
        address: SocketAddr,
    },
    InstanceHealthy {
        instance: String,
    },
    InstanceUnhealthy {
        instance: String,
        detail: String,
    },
    /// The instance gets no new requests; it is stopped once its requests finish.
    InstanceDraining {
        instance: String,
        reason: String,
    },
    /// The instance's process ended without being asked to.
    InstanceExited {
        instance: String,
        code: Option<i32>,
        signal: Option<i32>,
    },
    InstanceGone {
        instance: String,
        reason: GoneReason,
    },
    /// An instance on the runtime that the log does not want (left by a killed controller).
    OrphanRemoved {
        runtime_id: InstanceId,
    },
    /// Launches of the service wait until `until_ms` after `failures` failed instances.
    CrashLoopBackoff {
        service: String,
        failures: u32,
        delay_ms: u64,
        until_ms: u64,
    },
    /// The service's instance count or route changed without a new release (neither is part
    /// of a release's config digest).
    ServiceScaled {
        service: String,
        instances: u32,
        route: Option<SocketAddr>,
    },
    /// The service is no longer wanted at all (`graven down`, or gone from graven.toml).
    ServiceRemoved {
        service: String,
    },
    /// The log's end was lost (a damaged or missing WAL): it kept events up to
    /// `kept_through`, its mark said `lost_through` had been appended. Appended by
    /// `graven recover` at `lost_through + 1`; release and instance numbers go on after
    /// `lost_through`, which no lost one can exceed (each was created by an event of its own).
    HistoryLost {
        kept_through: u64,
        lost_through: u64,
    },
    /// The log could not be written from `since_ms` until this event (the error is the last
    /// one seen); no decision was taken meanwhile, and routes served the last known state.
    LogUnwritable {
        since_ms: u64,
        error: String,
    },
}

impl EventKind for Event {
    fn kind(&self) -> &'static str {
        match self {
            Event::ReleaseCreated { .. } => "release_created",
            Event::DeployStarted { .. } => "deploy_started",
            Event::DeploySucceeded { .. } => "deploy_succeeded",
            Event::DeployRolledBack { .. } => "deploy_rolled_back",
            Event::InstanceLaunched { .. } => "instance_launched",
            Event::InstanceStarted { .. } => "instance_started",
            Event::InstanceHealthy { .. } => "instance_healthy",
            Event::InstanceUnhealthy { .. } => "instance_unhealthy",
            Event::InstanceDraining { .. } => "instance_draining",
            Event::InstanceExited { .. } => "instance_exited",
            Event::InstanceGone { .. } => "instance_gone",
            Event::OrphanRemoved { .. } => "orphan_removed",
            Event::CrashLoopBackoff { .. } => "crash_loop_backoff",
            Event::ServiceScaled { .. } => "service_scaled",
            Event::ServiceRemoved { .. } => "service_removed",
            Event::HistoryLost { .. } => "history_lost",
            Event::LogUnwritable { .. } => "log_unwritable",
        }
    }

    fn loss(&self) -> Option<Loss> {
        match self {
            Event::HistoryLost {
                kept_through,
                lost_through,
            } => Some(Loss {
                kept_through: *kept_through,
                lost_through: *lost_through,
            }),
            _ => None,
        }
    }
}

impl Event {
    /// One line for `graven history` and deploy progress.
    pub fn describe(&self) -> String {
        match self {
            Event::ReleaseCreated {
                service,
                number,
                image,
                ..
            } => format!(
                "release {number} of {service} created (image {})",
                image.short()
            ),
            Event::DeployStarted {
                service,
                from,
                to,
                reason,
            } => match from {
                Some(from) => format!("{reason} of {service} started: release {from} -> {to}"),
                None => format!("{reason} of {service} started: release {to}"),
            },
            Event::DeploySucceeded { service, release } => {
                format!("deploy of {service} succeeded: release {release} serves")
            }
            Event::DeployRolledBack {
                service,
                from,
                to,
                reason,
            } => match to {
                Some(to) => {
                    format!("deploy of {service} rolled back from release {from} to {to}: {reason}")
                }
                None => format!("deploy of {service} release {from} failed: {reason}"),
            },
            Event::InstanceLaunched {
                service,
                release,
                instance,
            } => format!("instance {instance} of {service} release {release} launched"),
            Event::InstanceStarted {
                instance, address, ..
            } => format!("instance {instance} started on {address}"),
            Event::InstanceHealthy { instance } => format!("instance {instance} healthy"),
            Event::InstanceUnhealthy { instance, detail } => {
                format!("instance {instance} unhealthy: {detail}")
            }
            Event::InstanceDraining { instance, reason } => {
                format!("instance {instance} draining ({reason})")
            }
            Event::InstanceExited {
                instance,
                code,
                signal,
            } => format!("instance {instance} exited ({})", exit_text(*code, *signal)),
            Event::InstanceGone { instance, reason } => {
                format!("instance {instance} gone ({reason})")
            }
            Event::OrphanRemoved { runtime_id } => {
                format!("orphan instance {runtime_id} removed")
            }
            Event::CrashLoopBackoff {
                service,
                failures,
                delay_ms,
                ..
            } => format!(
                "{service} is crash looping ({failures} failures); next launch in {}",
                humantime::format_duration(Duration::from_millis(*delay_ms))
            ),
            Event::ServiceScaled {
                service,
                instances,
                route,
            } => match route {
                Some(route) => format!("service {service} scaled to {instances} on {route}"),
                None => format!("service {service} scaled to {instances}"),
            },
            Event::ServiceRemoved { service } => format!("service {service} removed"),
            Event::HistoryLost {
                kept_through,
                lost_through,
            } => format!(
                "events {} to {lost_through} were lost from the log; numbering goes on after them",
                kept_through + 1
            ),
            Event::LogUnwritable { since_ms, error } => format!(
                "the event log could not be written from {} ({error}); no decision was taken \
                 meanwhile",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(*since_ms)
                )
            ),
        }
    }
}

/// How a process ended, in words.
pub fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "vanished".to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployReason {
    Deploy,
    Rollback,
}

impl std::fmt::Display for DeployReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeployReason::Deploy => "deploy",
            DeployReason::Rollback => "rollback",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum GoneReason {
    /// Drained and stopped on purpose.
    Stopped,
    /// The runtime could not start it.
    StartFailed { error: String },
    /// The runtime no longer knows it (a controller restart found it missing).
    Lost,
    /// Its process ended; the `InstanceExited` event before says how.
    Exited,
}

impl std::fmt::Display for GoneReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GoneReason::Stopped => f.write_str("stopped"),
            GoneReason::StartFailed { error } => write!(f, "start failed: {error}"),
            GoneReason::Lost => f.write_str("lost"),
            GoneReason::Exited => f.write_str("exited"),
        }
    }
}

/// A service's resolved config as a release records it: everything an instance is started
/// with and everything the controller needs to run the service, for one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub instances: u32,
    pub port: u16,
    pub route: Option<SocketAddr>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub health: HealthCheck,
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub health_deadline: Duration,
    pub stop_grace: Duration,
    pub volumes: Vec<VolumeMount>,
    pub limits: Limits,
    /// How many of the service's newest releases `graven gc` keeps the images of; logs
    /// written before the key existed read as the default.
    #[serde(default = "default_keep_releases")]
    pub keep_releases: u32,
}

fn default_keep_releases() -> u32 {
    crate::spec::DEFAULT_KEEP_RELEASES
}

impl From<&crate::spec::Service> for ServiceConfig {
    fn from(service: &crate::spec::Service) -> ServiceConfig {
        ServiceConfig {
            instances: service.instances,
            port: service.port,
            route: service.route,
            command: service.command.clone(),
            env: service.env.clone(),
            health: service.health.clone(),
            max_surge: service.deploy.max_surge,
            max_unavailable: service.deploy.max_unavailable,
            health_deadline: service.deploy.health_deadline,
            stop_grace: service.stop_grace,
            volumes: service.volumes.clone(),
            limits: service.limits.clone(),
            keep_releases: service.deploy.keep_releases,
        }
    }
}

/// The config unit tests start from: a plain service on port 8080, health checked at
/// `/healthz`, no env; tests change the fields they are about.
#[cfg(test)]
impl ServiceConfig {
    pub(crate) fn test(instances: u32, max_surge: u32, max_unavailable: u32) -> ServiceConfig {
        ServiceConfig {
            instances,
            port: 8080,
            route: None,
            command: None,
            env: BTreeMap::new(),
            health: HealthCheck {
                path: "/healthz".to_owned(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_after: 1,
                unhealthy_after: 2,
            },
            max_surge,
            max_unavailable,
            health_deadline: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            volumes: vec![],
            limits: Default::default(),
            keep_releases: 10,
        }
    }
}
