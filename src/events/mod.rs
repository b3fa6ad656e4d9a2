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

use crate::store::Digest;

pub mod fold;
mod ids;
mod log;
pub mod snapshot;
mod v1;

pub use ids::{InstanceName, ReleaseNumber, RuntimeId, ServiceName};
pub use log::{
    ENVELOPE_VERSION, Envelope, EventKind, EventLog, EventLogError, Loss, RawRow, SCHEMA_VERSION,
    checksum, decode_envelope, decode_event,
};

pub use fold::{
    Backoff, ChaosState, Deploy, DeployOutcome, DeployRecord, InstanceState, Lifecycle, Release,
    RunningExperiment, Scale, ServiceState, State, fold, replay,
};

/// The actor the controller appends its own decisions as. A decision a command asked for
/// (a deploy, a rollback, a down) carries the command's actor: the user and host that ran it.
pub const CONTROLLER: &str = "controller";

/// One fact in the event log. The set is closed: a new kind of fact is a new variant, and the
/// fold must say what it means. Version 2 of the vocabulary (`ENVELOPE_VERSION`); version 1
/// payloads are read through `v1::upcast`, never rewritten.
// Events are few and short-lived; boxing the release config would only make matching noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A new release of a service: its image and resolved config, numbered per environment.
    ReleaseCreated {
        service: ServiceName,
        release: ReleaseNumber,
        image: Digest,
        config_digest: String,
        config: ServiceConfig,
        /// Where the deploy that made it came from, when a project directory did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<Source>,
    },
    /// The service's wanted release changes to `to`; the rollout towards it begins.
    DeployStarted {
        service: ServiceName,
        from: Option<ReleaseNumber>,
        to: ReleaseNumber,
        reason: DeployReason,
    },
    /// Every instance of the service runs the wanted release, healthy; no other remains.
    DeploySucceeded {
        service: ServiceName,
        release: ReleaseNumber,
    },
    /// The rollout towards `from` failed; the wanted release goes back to `to`.
    DeployRolledBack {
        service: ServiceName,
        from: ReleaseNumber,
        to: Option<ReleaseNumber>,
        reason: RollbackReason,
    },
    /// The controller decided to start an instance; announced before the runtime is asked.
    InstanceLaunched {
        service: ServiceName,
        release: ReleaseNumber,
        instance: InstanceName,
    },
    /// The runtime started (or, after a restart, still runs) the instance at `address`.
    InstanceStarted {
        instance: InstanceName,
        runtime_id: RuntimeId,
        address: SocketAddr,
    },
    InstanceHealthy {
        instance: InstanceName,
    },
    InstanceUnhealthy {
        instance: InstanceName,
        detail: String,
    },
    /// The instance must be replaced (it was touched, or it drifted): a replacement is
    /// started and healthy first, then it is drained like an instance of an old release.
    InstanceCondemned {
        instance: InstanceName,
        reason: CondemnReason,
    },
    /// The instance gets no new requests; it is stopped once its requests finish.
    InstanceDraining {
        instance: InstanceName,
        reason: DrainReason,
    },
    /// The instance's process ended without being asked to.
    InstanceExited {
        instance: InstanceName,
        code: Option<i32>,
        signal: Option<i32>,
    },
    InstanceGone {
        instance: InstanceName,
        reason: GoneReason,
    },
    /// Which instances of the service take new requests, and with what weight. Decided by
    /// the planner and recorded like every other decision: routes follow this, nothing else.
    TrafficChanged {
        service: ServiceName,
        routed: BTreeMap<InstanceName, u32>,
    },
    /// An instance on the runtime that the log does not want (left by a killed controller).
    OrphanRemoved {
        runtime_id: RuntimeId,
    },
    /// Launches of the service wait until `until_ms` after `failures` failed instances.
    CrashLoopBackoff {
        service: ServiceName,
        failures: u32,
        delay_ms: u64,
        until_ms: u64,
    },
    /// The service's instance count or route changed without a new release (neither is part
    /// of a release's config digest).
    ServiceScaled {
        service: ServiceName,
        instances: u32,
        route: Option<SocketAddr>,
    },
    /// The service is no longer wanted at all (`graven down`, or gone from graven.toml).
    ServiceRemoved {
        service: ServiceName,
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
    /// `[chaos]` of this environment as a deploy brought it (none: no planned failures).
    ChaosConfigured {
        config: Option<crate::chaos::ChaosConfig>,
    },
    /// A planned failure begins (or, leashed, would have begun: nothing is done). Announced
    /// before its effect, like every decision.
    ChaosStarted {
        experiment: u64,
        service: ServiceName,
        /// The instance a stop or kill is for; none for a fault at the route.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<InstanceName>,
        action: crate::chaos::Action,
        duration: Duration,
        leashed: bool,
        /// Drawn by the schedule, or asked for (`graven chaos run`; the actor says who).
        scheduled: bool,
        /// What users saw before it (the outage checker's baseline).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        baseline: Option<crate::chaos::Seen>,
    },
    /// A planned failure ended: what users saw while it ran, and whether it was aborted.
    ChaosEnded {
        experiment: u64,
        outcome: ChaosOutcome,
        seen: crate::chaos::Seen,
    },
}

/// Every kind name, in declaration order: what `EventKind::kind` returns and the serde tag.
pub const KINDS: &[&str] = &[
    "release_created",
    "deploy_started",
    "deploy_succeeded",
    "deploy_rolled_back",
    "instance_launched",
    "instance_started",
    "instance_healthy",
    "instance_unhealthy",
    "instance_condemned",
    "instance_draining",
    "instance_exited",
    "instance_gone",
    "traffic_changed",
    "orphan_removed",
    "crash_loop_backoff",
    "service_scaled",
    "service_removed",
    "history_lost",
    "log_unwritable",
    "chaos_configured",
    "chaos_started",
    "chaos_ended",
];

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
            Event::InstanceCondemned { .. } => "instance_condemned",
            Event::InstanceDraining { .. } => "instance_draining",
            Event::InstanceExited { .. } => "instance_exited",
            Event::InstanceGone { .. } => "instance_gone",
            Event::TrafficChanged { .. } => "traffic_changed",
            Event::OrphanRemoved { .. } => "orphan_removed",
            Event::CrashLoopBackoff { .. } => "crash_loop_backoff",
            Event::ServiceScaled { .. } => "service_scaled",
            Event::ServiceRemoved { .. } => "service_removed",
            Event::HistoryLost { .. } => "history_lost",
            Event::LogUnwritable { .. } => "log_unwritable",
            Event::ChaosConfigured { .. } => "chaos_configured",
            Event::ChaosStarted { .. } => "chaos_started",
            Event::ChaosEnded { .. } => "chaos_ended",
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

    fn decode(version: u32, payload: &str) -> Result<Event, serde_json::Error> {
        match version {
            1 => serde_json::from_str::<v1::Event>(payload).map(v1::upcast),
            _ => serde_json::from_str(payload),
        }
    }
}

impl Event {
    /// One line for `graven history` and deploy progress.
    pub fn describe(&self) -> String {
        match self {
            Event::ReleaseCreated {
                service,
                release,
                image,
                ..
            } => format!(
                "release {release} of {service} created (image {})",
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
            Event::InstanceCondemned { instance, reason } => {
                format!("instance {instance} condemned ({reason}); it is replaced")
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
            Event::TrafficChanged { service, routed } => {
                if routed.is_empty() {
                    format!("{service} routes to no instance")
                } else {
                    let names: Vec<String> = routed
                        .iter()
                        .map(|(name, weight)| match weight {
                            1 => name.to_string(),
                            w => format!("{name} (weight {w})"),
                        })
                        .collect();
                    format!("{service} routes to {}", names.join(", "))
                }
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
            Event::ChaosConfigured { config: None } => "planned failures off".to_owned(),
            Event::ChaosConfigured { config: Some(c) } => format!(
                "planned failures every {} on average ({}){}",
                humantime::format_duration(c.mean_between),
                c.kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if c.leashed { ", leashed" } else { "" }
            ),
            Event::ChaosStarted {
                experiment,
                service,
                instance,
                action,
                duration,
                leashed,
                ..
            } => {
                let target = match instance {
                    Some(instance) => format!("instance {instance} of {service}"),
                    None => format!("the route of {service}"),
                };
                let verb = if *leashed {
                    "leashed, would have done"
                } else {
                    "started"
                };
                format!(
                    "chaos experiment {experiment} {verb}: {action} on {target} for {}",
                    humantime::format_duration(*duration)
                )
            }
            Event::ChaosEnded {
                experiment,
                outcome,
                seen,
            } => format!(
                "chaos experiment {experiment} {outcome}: {} requests, {} failed, {} injected, \
                 p50 {}, p99 {}",
                seen.requests,
                seen.errors,
                seen.injected,
                humantime::format_duration(Duration::from_micros(seen.p50_us)),
                humantime::format_duration(Duration::from_micros(seen.p99_us))
            ),
        }
    }
}

/// How a chaos experiment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum ChaosOutcome {
    /// It ran its whole duration.
    Completed,
    /// The outage checker found the steady state broken: faults were removed, and no
    /// scheduled experiment starts before `paused_until_ms`.
    Aborted {
        broken: crate::chaos::Broken,
        paused_until_ms: u64,
    },
    /// Cut short for another reason (a deploy of the service began, the controller
    /// restarted, the service went away).
    Interrupted { why: String },
}

impl std::fmt::Display for ChaosOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChaosOutcome::Completed => f.write_str("completed"),
            ChaosOutcome::Aborted { broken, .. } => write!(f, "aborted ({broken})"),
            ChaosOutcome::Interrupted { why } => write!(f, "interrupted ({why})"),
        }
    }
}

/// Where a release's inputs came from: the project directory a deploy was made from, on
/// which host. `graven up` compares the working tree with the newest release made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub host: String,
    pub dir: String,
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

/// Why a rollout was abandoned for the release before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum RollbackReason {
    /// Fewer than `desired` instances of the release were healthy at its deadline.
    NotHealthyInTime {
        healthy: u32,
        desired: u32,
        deadline: Duration,
        last_failure: Option<String>,
    },
    /// Its instances failed this many times before the deadline.
    TooManyFailures {
        failures: u32,
        last_failure: Option<String>,
    },
    /// Written by a graven whose log said why in words only (vocabulary 1).
    Recorded { text: String },
}

impl std::fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = |f: &mut std::fmt::Formatter<'_>, last: &Option<String>| match last {
            Some(last) => write!(f, " (last: {last})"),
            None => Ok(()),
        };
        match self {
            RollbackReason::NotHealthyInTime {
                healthy,
                desired,
                deadline,
                last_failure,
            } => {
                write!(
                    f,
                    "{healthy} of {desired} instances healthy within {}",
                    humantime::format_duration(*deadline)
                )?;
                last(f, last_failure)
            }
            RollbackReason::TooManyFailures {
                failures,
                last_failure,
            } => {
                write!(f, "its instances failed {failures} times")?;
                last(f, last_failure)
            }
            RollbackReason::Recorded { text } => f.write_str(text),
        }
    }
}

/// Why an instance is condemned to be replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum CondemnReason {
    /// Someone ran a command inside it (`graven exec`): it may differ from its image.
    Tainted,
    /// A file of its image's root was changed on the host (drift): the evidence of the
    /// first change the check found.
    RootChanged {
        path: String,
        change: FileChange,
        /// What the image has (a hash, mode, owner or kind); none for an added file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected: Option<String>,
        /// What was found; none for a removed file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        found: Option<String>,
    },
    /// One of its processes ran a program that is not its image's (drift).
    ForeignProgram {
        /// The process's PID on the host.
        pid: u32,
        /// The program's path inside the instance.
        exe: String,
        cmdline: String,
    },
    /// It reached its service's `max_age` (phoenix): recycled, not suspected of anything.
    Aged {
        /// How long it had lived when condemned.
        age: Duration,
        max_age: Duration,
    },
}

/// What changed about one file of an image's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    Content,
    Mode,
    Owner,
    Kind,
    Link,
    Added,
    Removed,
}

impl FileChange {
    pub fn as_str(self) -> &'static str {
        match self {
            FileChange::Content => "content",
            FileChange::Mode => "mode",
            FileChange::Owner => "owner",
            FileChange::Kind => "kind",
            FileChange::Link => "link",
            FileChange::Added => "added",
            FileChange::Removed => "removed",
        }
    }
}

impl CondemnReason {
    /// Whether it was condemned for drift (its root or its programs), not an exec.
    pub fn is_drift(&self) -> bool {
        match self {
            CondemnReason::Tainted | CondemnReason::Aged { .. } => false,
            CondemnReason::RootChanged { .. } | CondemnReason::ForeignProgram { .. } => true,
        }
    }
}

impl std::fmt::Display for CondemnReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CondemnReason::Tainted => f.write_str("a command was run inside it"),
            CondemnReason::RootChanged {
                path,
                change,
                expected,
                found,
            } => {
                write!(f, "its image's file {path} changed ({})", change.as_str())?;
                match (expected, found) {
                    (Some(expected), Some(found)) => {
                        write!(f, ": expected {expected}, found {found}")
                    }
                    (None, Some(found)) => write!(f, ": found {found}"),
                    (Some(expected), None) => write!(f, ": expected {expected}"),
                    (None, None) => Ok(()),
                }
            }
            CondemnReason::ForeignProgram { pid, exe, cmdline } => write!(
                f,
                "process {pid} runs {exe}, which is not in its image ({cmdline})"
            ),
            CondemnReason::Aged { age, max_age } => write!(
                f,
                "it is {} old, past its max_age of {}",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(*max_age)
            ),
        }
    }
}

/// Why an instance is drained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum DrainReason {
    /// An instance of the wanted release took its place.
    Replaced { by: ReleaseNumber },
    /// It is of a release that is no longer wanted and never served (starting or unhealthy).
    NotWanted { wanted: ReleaseNumber },
    /// It turned unhealthy after it had been healthy.
    Unhealthy { detail: Option<String> },
    /// It was not healthy within the deadline after its launch.
    NotHealthyInTime { deadline: Duration },
    /// The service was scaled down to `to` instances.
    ScaledDown { to: u32 },
    /// The service was removed.
    ServiceRemoved,
    /// The control plane is stopping.
    Shutdown,
    /// It was condemned and a replacement serves.
    Condemned { reason: CondemnReason },
    /// A chaos experiment stops it gracefully; self-healing replaces it.
    Chaos { experiment: u64 },
    /// Written by a graven whose log said why in words only (vocabulary 1).
    Recorded { text: String },
}

impl std::fmt::Display for DrainReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrainReason::Replaced { by } => write!(f, "replaced by release {by}"),
            DrainReason::NotWanted { wanted } => write!(f, "release {wanted} is wanted"),
            DrainReason::Unhealthy { detail } => write!(
                f,
                "unhealthy: {}",
                detail.as_deref().unwrap_or("failed its health check")
            ),
            DrainReason::NotHealthyInTime { deadline } => write!(
                f,
                "not healthy within {}",
                humantime::format_duration(*deadline)
            ),
            DrainReason::ScaledDown { to } => write!(f, "scaled to {to}"),
            DrainReason::ServiceRemoved => f.write_str("service removed"),
            DrainReason::Shutdown => f.write_str("shutdown"),
            DrainReason::Condemned { reason } => write!(f, "condemned: {reason}"),
            DrainReason::Chaos { experiment } => write!(f, "chaos experiment {experiment}"),
            DrainReason::Recorded { text } => f.write_str(text),
        }
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
/// with and everything the controller needs to run the service, for one environment. Its
/// types are the log's own (not the proxy's or the runtime's), so moving code never moves
/// the log's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub instances: u32,
    /// The port the service listens on; 0 when it has none (a worker).
    pub port: u16,
    pub route: Option<SocketAddr>,
    /// What the route speaks; left out when HTTP (every release before TCP routes).
    #[serde(default, skip_serializing_if = "RouteKind::is_http")]
    pub route_kind: RouteKind,
    /// Threads the route serves on; None (left out): one per core of the machine serving it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_threads: Option<u32>,
    /// The service name of the route's SRV record (`[services.NAME] srv_name`); None (left
    /// out): `http` for an HTTP route, the service's own name for a TCP one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srv_name: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Env variables whose value is a secret, by the name and version the release pins;
    /// the value itself is never in the log. Left out when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretRef>,
    pub health: HealthConfig,
    /// How a new release replaces the old one, with the strategy's own settings.
    pub strategy: Strategy,
    /// New instances must be healthy within this long, or the deploy rolls back.
    pub health_deadline: Duration,
    pub stop_grace: Duration,
    pub volumes: Vec<VolumeConfig>,
    pub limits: LimitsConfig,
    /// Replaces the image's ENTRYPOINT (`command` replaces its CMD). Left out when unset,
    /// as are `user` and `tmpfs`, so a config without them serializes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's USER: `name[:group]` or `uid[:gid]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Size-capped tmpfs mounts: path inside the instance → bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tmpfs: BTreeMap<String, u64>,
    /// How many of the service's newest releases `graven gc` keeps the images of; logs
    /// written before the key existed read as the default.
    #[serde(default = "default_keep_releases")]
    pub keep_releases: u32,
    /// `network = "host"`. Left out when false, so configs without the key serialize and
    /// hash as before it existed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_network: bool,
    /// `outbound = false`; left out when true, for the same reason.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub outbound: bool,
    /// `[services.NAME.drift]`; left out when it is the default, for the same reason.
    #[serde(default, skip_serializing_if = "DriftConfig::is_default")]
    pub drift: DriftConfig,
    /// `[services.NAME.phoenix]`: instances are recycled past an age. Left out when absent,
    /// so configs without it serialize and hash as before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phoenix: Option<PhoenixConfig>,
}

/// How a service's instances are recycled once they reach an age (`[services.NAME.phoenix]`,
/// docs/phoenix.md): each is condemned at `launched + max_age + offset` (the offset in
/// `[0, jitter)`, taken from its name) and replaced surge-first like a drifted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoenixConfig {
    pub max_age: Duration,
    #[serde(default, skip_serializing_if = "Duration::is_zero")]
    pub jitter: Duration,
    /// When in the day recycles may start; none: at any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Recycles (and other replacements of condemned instances) in flight at once.
    pub max_at_once: u32,
    /// A stop-first service (stateful, or sharing a named volume) is recycled too: each
    /// recycle is a moment without the service. Left out when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stop_first: bool,
}

/// A daily span of wall-clock time, `start` inclusive and `end` exclusive, in minutes after
/// midnight; `end < start` wraps past midnight. `zone` is an IANA name; without one,
/// `offset_minutes` is local time minus UTC (0: UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start_minute: u16,
    pub end_minute: u16,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset_minutes: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl Window {
    /// Whether `minute` (after midnight, in the window's zone) is inside.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start_minute <= self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start_minute), hm(self.end_minute))?;
        match &self.zone {
            Some(zone) => write!(f, " {zone}"),
            None if self.offset_minutes == 0 => f.write_str(" UTC"),
            None => {
                let sign = if self.offset_minutes < 0 { '-' } else { '+' };
                let minutes = self.offset_minutes.unsigned_abs() as u16;
                write!(f, " {sign}{}", hm(minutes))
            }
        }
    }
}

/// How drift is watched for in a service's instances (`[services.NAME.drift]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftConfig {
    /// How often its instances are checked; `None`: `DriftConfig::DEFAULT_INTERVAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Programs may run from /tmp, /dev/shm and tmpfs mounts (they are `noexec` otherwise).
    #[serde(default, skip_serializing_if = "is_false")]
    pub exec_tmp: bool,
    /// Paths inside the instance from which running a program is not drift.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_exec: Vec<String>,
}

impl DriftConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

    fn is_default(&self) -> bool {
        *self == DriftConfig::default()
    }

    pub fn interval(&self) -> Duration {
        self.interval.unwrap_or(DriftConfig::DEFAULT_INTERVAL)
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

fn is_true(value: &bool) -> bool {
    *value
}

fn yes() -> bool {
    true
}

/// What a route speaks: HTTP (a reverse proxy) or TCP (bytes, at layer 4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    #[default]
    Http,
    Tcp,
}

impl RouteKind {
    fn is_http(&self) -> bool {
        *self == RouteKind::Http
    }
}

fn default_keep_releases() -> u32 {
    crate::spec::DEFAULT_KEEP_RELEASES
}

/// A rollout strategy and its settings. A new strategy is a new variant here and a planner
/// of its own (`controller::plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Strategy {
    /// Replace instances a few at a time: at most `instances + max_surge` exist, and at least
    /// `instances - max_unavailable` healthy ones remain.
    Rolling {
        max_surge: u32,
        max_unavailable: u32,
    },
    /// Stop-first: every instance of the old release is gone (its volumes let go) before one
    /// of the new release starts, whose image is prepared before the old one stops.
    Recreate,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Rolling { .. } => "rolling",
            Strategy::Recreate => "recreate",
        }
    }
}

/// The active health check of a service's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes before an instance counts as healthy.
    pub healthy_after: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    pub unhealthy_after: u32,
    /// What a probe does; left out when `http`, so configs written before the key existed
    /// read (and write) as they did.
    #[serde(default, skip_serializing_if = "HealthKind::is_http")]
    pub kind: HealthKind,
    /// The `exec` kind's command (a shell string as `["/bin/sh", "-c", TEXT]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// How much longer than the health deadline a new instance has to become healthy.
    #[serde(default, skip_serializing_if = "Duration::is_zero")]
    pub start_period: Duration,
    /// Set when the check is the image's HEALTHCHECK (graven.toml had no health table), so
    /// the log says where it came from.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_image: bool,
    /// `events_caught_up = true`: a new instance counts as healthy only once it has also
    /// read the app event log up to its last event as it stood when the instance started.
    /// Left out when false, so configs without it serialize and hash as before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub events_caught_up: bool,
}

/// What a health probe does (`HealthConfig::kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    Http,
    Tcp,
    Exec,
    None,
}

impl HealthKind {
    fn is_http(&self) -> bool {
        *self == HealthKind::Http
    }
}

impl ServiceConfig {
    /// How long after its launch a new instance may take to become healthy: the deploy's
    /// health deadline plus the check's start period.
    pub fn time_to_healthy(&self) -> Duration {
        self.health_deadline
            .saturating_add(self.health.start_period)
    }
}

/// A named volume mounted at an absolute path inside each instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub name: String,
    pub path: String,
}

/// Resource limits of each instance; `None` is the runtime's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsConfig {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub tmp_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_age_s: Option<u64>,
}

impl ServiceConfig {
    /// The digest of the config a release is made of: everything but the instance count and
    /// the route, which change without replacing instances. Durations count nanoseconds and
    /// the JSON's key order is fixed by the struct below, so the same config always hashes the
    /// same (and as it did when the spec computed it).
    pub fn digest(&self) -> Digest {
        #[derive(Serialize)]
        struct Canonical<'a> {
            version: u32,
            command: &'a Option<Vec<String>>,
            env: &'a BTreeMap<String, String>,
            // A secret counts by name and version, never its value: setting one again and
            // deploying makes a new release. Left out when empty, so a service without
            // secrets hashes as it did before they existed.
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            secrets: &'a BTreeMap<String, SecretRef>,
            port: u16,
            // Left out when HTTP, so a service hashes as it did before TCP routes existed.
            #[serde(skip_serializing_if = "RouteKind::is_http")]
            route_kind: RouteKind,
            // A new thread count rebinds the route, which only a release does; left out when
            // unset, so a config without it hashes as before.
            #[serde(skip_serializing_if = "Option::is_none")]
            route_threads: Option<u32>,
            // What DNS names the route by is the release's; left out when unset.
            #[serde(skip_serializing_if = "Option::is_none")]
            srv_name: &'a Option<String>,
            health: CanonicalHealth<'a>,
            limits: &'a LimitsConfig,
            volumes: &'a [VolumeConfig],
            stop_grace_ns: u64,
            deploy: CanonicalDeploy,
            // Only when not the default, so the digests of configs written before the keys
            // existed do not move.
            #[serde(skip_serializing_if = "is_false")]
            host_network: bool,
            #[serde(skip_serializing_if = "is_true")]
            outbound: bool,
            // Each left out when unset, so a config without them hashes as before.
            #[serde(skip_serializing_if = "Option::is_none")]
            entrypoint: &'a Option<Vec<String>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            user: &'a Option<String>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            tmpfs: &'a BTreeMap<String, u64>,
            #[serde(skip_serializing_if = "DriftConfig::is_default")]
            drift: &'a DriftConfig,
            #[serde(skip_serializing_if = "Option::is_none")]
            phoenix: &'a Option<PhoenixConfig>,
        }
        #[derive(Serialize)]
        struct CanonicalHealth<'a> {
            path: &'a str,
            interval_ns: u64,
            timeout_ns: u64,
            healthy_after: u32,
            unhealthy_after: u32,
            // The keys added with health kinds are left out at their defaults, so a config
            // written before they existed hashes as it did.
            #[serde(skip_serializing_if = "HealthKind::is_http")]
            kind: HealthKind,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            command: &'a [String],
            #[serde(skip_serializing_if = "is_zero")]
            start_period_ns: u64,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            from_image: bool,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            events_caught_up: bool,
        }
        fn is_zero(n: &u64) -> bool {
            *n == 0
        }
        #[derive(Serialize)]
        struct CanonicalDeploy {
            strategy: &'static str,
            max_surge: u32,
            max_unavailable: u32,
            health_deadline_ns: u64,
            // Only when not the default, so the digests of configs written before the key
            // existed do not move (which would redeploy every service).
            #[serde(skip_serializing_if = "is_default_keep")]
            keep_releases: u32,
        }
        fn is_default_keep(keep: &u32) -> bool {
            *keep == crate::spec::DEFAULT_KEEP_RELEASES
        }
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // A recreate release hashes with its name and zero settings: no rolling release's
        // digest moves.
        let (max_surge, max_unavailable) = match self.strategy {
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => (max_surge, max_unavailable),
            Strategy::Recreate => (0, 0),
        };
        let canonical = Canonical {
            version: 1,
            command: &self.command,
            env: &self.env,
            secrets: &self.secrets,
            port: self.port,
            route_kind: self.route_kind,
            route_threads: self.route_threads,
            srv_name: &self.srv_name,
            health: CanonicalHealth {
                path: &self.health.path,
                interval_ns: nanos(self.health.interval),
                timeout_ns: nanos(self.health.timeout),
                healthy_after: self.health.healthy_after,
                unhealthy_after: self.health.unhealthy_after,
                kind: self.health.kind,
                command: &self.health.command,
                start_period_ns: nanos(self.health.start_period),
                from_image: self.health.from_image,
                events_caught_up: self.health.events_caught_up,
            },
            limits: &self.limits,
            volumes: &self.volumes,
            stop_grace_ns: nanos(self.stop_grace),
            deploy: CanonicalDeploy {
                strategy: self.strategy.name(),
                max_surge,
                max_unavailable,
                health_deadline_ns: nanos(self.health_deadline),
                keep_releases: self.keep_releases,
            },
            host_network: self.host_network,
            outbound: self.outbound,
            entrypoint: &self.entrypoint,
            user: &self.user,
            tmpfs: &self.tmpfs,
            drift: &self.drift,
            phoenix: &self.phoenix,
        };
        let json = serde_json::to_vec(&canonical).expect("the canonical config serializes");
        Digest::of(&json)
    }
}

/// A secret as a release records it: its name in the app's environment and the version the
/// deploy found latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    pub name: String,
    pub version: u64,
}

impl From<&crate::spec::Service> for ServiceConfig {
    fn from(service: &crate::spec::Service) -> ServiceConfig {
        let health = &service.health;
        let limits = &service.limits;
        ServiceConfig {
            instances: service.instances,
            // 0 is a service with no port (a worker), or one whose port the deploy takes from
            // its image's EXPOSE (`deploy::prepare`).
            port: service.port.unwrap_or(0),
            route: service.route,
            route_kind: match service.route_kind {
                crate::spec::RouteKind::Http => RouteKind::Http,
                crate::spec::RouteKind::Tcp => RouteKind::Tcp,
            },
            route_threads: service.route_threads,
            srv_name: service.srv_name.clone(),
            command: service.command.clone(),
            env: service.env.clone(),
            // Pinned by the deploy, which reads the secret store (`deploy::prepare`).
            secrets: BTreeMap::new(),
            health: HealthConfig {
                path: health.path.clone(),
                interval: health.interval,
                timeout: health.timeout,
                healthy_after: health.healthy_after,
                unhealthy_after: health.unhealthy_after,
                // By name: the log's types name no proxy type.
                kind: match health.kind.name() {
                    "tcp" => HealthKind::Tcp,
                    "exec" => HealthKind::Exec,
                    "none" => HealthKind::None,
                    _ => HealthKind::Http,
                },
                command: health.kind.command().to_vec(),
                start_period: health.start_period,
                from_image: false,
                events_caught_up: service.events_caught_up,
            },
            strategy: match service.deploy.strategy {
                crate::spec::Strategy::Rolling => Strategy::Rolling {
                    max_surge: service.deploy.max_surge,
                    max_unavailable: service.deploy.max_unavailable,
                },
                crate::spec::Strategy::Recreate => Strategy::Recreate,
            },
            health_deadline: service.deploy.health_deadline,
            stop_grace: service.stop_grace,
            volumes: service
                .volumes
                .iter()
                .map(|v| VolumeConfig {
                    name: v.name.clone(),
                    path: v.path.clone(),
                })
                .collect(),
            drift: DriftConfig {
                interval: service.drift.interval,
                exec_tmp: service.drift.exec_tmp,
                allow_exec: service.drift.allow_exec.clone(),
            },
            phoenix: service.phoenix.as_ref().map(|p| PhoenixConfig {
                max_age: p.max_age,
                jitter: p.jitter,
                window: p.window.as_ref().map(|w| Window {
                    // Minutes of a day: at most 24 * 60.
                    start_minute: w.start as u16,
                    end_minute: w.end as u16,
                    offset_minutes: w.offset_minutes,
                    zone: w.zone.clone(),
                }),
                max_at_once: p.max_at_once,
                stop_first: p.stop_first,
            }),
            limits: LimitsConfig {
                memory_bytes: limits.memory_bytes,
                pids: limits.pids,
                cpu_millis: limits.cpu_millis,
                tmp_bytes: limits.tmp_bytes,
                log_bytes: limits.log_bytes,
                log_age_s: limits.log_age_s,
            },
            keep_releases: service.deploy.keep_releases,
            host_network: service.host_network,
            outbound: service.outbound,
            entrypoint: service.entrypoint.clone(),
            user: service.user.clone(),
            tmpfs: service
                .tmpfs
                .iter()
                .map(|t| (t.path.clone(), t.bytes))
                .collect(),
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
            route_kind: RouteKind::Http,
            route_threads: None,
            srv_name: None,
            command: None,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            health: HealthConfig {
                path: "/healthz".to_owned(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_after: 1,
                unhealthy_after: 2,
                kind: HealthKind::Http,
                command: Vec::new(),
                start_period: Duration::ZERO,
                from_image: false,
                events_caught_up: false,
            },
            strategy: Strategy::Rolling {
                max_surge,
                max_unavailable,
            },
            health_deadline: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            volumes: vec![],
            limits: Default::default(),
            keep_releases: 10,
            host_network: false,
            outbound: true,
            entrypoint: None,
            user: None,
            tmpfs: Default::default(),
            drift: DriftConfig::default(),
            phoenix: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use expect_test::expect;

    use super::*;
    use crate::spec::parse;

    trait ToConfig {
        fn to_config(&self) -> ServiceConfig;
    }

    impl ToConfig for crate::spec::Service {
        fn to_config(&self) -> ServiceConfig {
            ServiceConfig::from(self)
        }
    }

    #[test]
    fn route_threads_are_left_out_unless_set() {
        let plain = ServiceConfig::test(1, 1, 0);
        let threads = ServiceConfig {
            route_threads: Some(2),
            ..plain.clone()
        };
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("route_threads"), "{json}");
        assert_ne!(
            plain.digest(),
            threads.digest(),
            "a new thread count is a new release"
        );
        let back: ServiceConfig =
            serde_json::from_str(&serde_json::to_string(&threads).unwrap()).unwrap();
        assert_eq!(back, threads);
    }

    #[test]
    fn config_digest_changes_with_config_but_not_with_scale_or_route() {
        let base = r#"
    app = "a"
    [services.web]
    port = 8080
    route = ":8000"
    env = { A = "1" }
    [environments.big.services.web]
    instances = 10
    route = ":9000"
    [environments.changed.services.web]
    env = { A = "2" }
    [environments.slower.services.web]
    health = { interval = "2s" }
    "#;
        let digest = |environment: &str| {
            parse(base, Path::new("g"), Path::new("/app"), environment)
                .unwrap()
                .services["web"]
                .to_config()
                .digest()
        };
        assert_eq!(digest("local"), digest("local"));
        assert_eq!(digest("local"), digest("big"));
        assert_ne!(digest("local"), digest("changed"));
        assert_ne!(digest("local"), digest("slower"));
        assert_ne!(digest("changed"), digest("slower"));
        // Pinned so a change to the canonical form is a conscious one (it changes every release).
        expect!["sha256:947312954d1e617d55429db810af06e157cf6d88bd2c0d5a6ac328730d1c2c6d"]
            .assert_eq(digest("local").as_str());
    }

    #[test]
    fn a_secret_counts_in_the_config_digest_by_name_and_version() {
        let source = |reference: &str| {
            format!("app = \"a\"\n[services.web]\nport = 8080\nenv = {{ A = {reference} }}\n")
        };
        let digest = |reference: &str, version: u64| {
            let project = parse(
                &source(reference),
                Path::new("g"),
                Path::new("/app"),
                "local",
            );
            let service = &project.unwrap().services["web"];
            let mut config = ServiceConfig::from(service);
            config.secrets = service
                .secrets
                .iter()
                .map(|(variable, name)| {
                    let name = name.clone();
                    (variable.clone(), SecretRef { name, version })
                })
                .collect();
            config.digest()
        };
        let secret = r#"{ secret = "one" }"#;
        assert_eq!(digest(secret, 1), digest(secret, 1));
        assert_ne!(
            digest(secret, 1),
            digest(secret, 2),
            "a rotation is a new release"
        );
        assert_ne!(digest(secret, 1), digest(r#"{ secret = "two" }"#, 1));
        assert_ne!(digest(secret, 1), digest(r#""one""#, 1));
    }

    #[test]
    fn keep_releases_moves_the_digest_only_when_not_the_default() {
        let base = r#"
app = "a"
[services.web]
port = 8080
[environments.few.services.web]
deploy = { keep_releases = 3 }
[environments.ten.services.web]
deploy = { keep_releases = 10 }
"#;
        let digest = |environment: &str| {
            parse(base, Path::new("g"), Path::new("/app"), environment)
                .unwrap()
                .services["web"]
                .to_config()
                .digest()
        };
        // The digests of configs written before the key existed do not move.
        assert_eq!(digest("local"), digest("ten"));
        assert_ne!(digest("local"), digest("few"));
    }

    #[test]
    fn a_stateful_release_has_its_own_digest_and_reads_back() {
        let base = r#"
app = "a"
[services.db]
port = 5432
[environments.stateful.services.db]
stateful = true
[environments.recreate.services.db]
deploy = { strategy = "recreate" }
"#;
        let config = |environment: &str| {
            parse(base, Path::new("g"), Path::new("/app"), environment)
                .unwrap()
                .services["db"]
                .to_config()
        };
        let stateful = config("stateful");
        assert_eq!(stateful.strategy, Strategy::Recreate);
        assert_eq!(stateful.digest(), config("recreate").digest());
        assert_ne!(stateful.digest(), config("local").digest());
        let json = serde_json::to_value(&stateful).unwrap();
        assert_eq!(json["strategy"], serde_json::json!({ "kind": "recreate" }));
        let back: ServiceConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, stateful);
    }
}
