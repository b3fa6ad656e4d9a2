//! Vocabulary 1 of the event log, frozen: what graven wrote before the vocabulary became
//! typed (envelope version 1). Never written any more; every version-1 payload is read into
//! these types and upcast to today's `Event` as it is read. The log itself is never
//! rewritten: its rows keep the bytes and checksums they were appended with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{
    DeployReason, DrainReason, GoneReason, HealthConfig, LimitsConfig, ReleaseNumber,
    RollbackReason, ServiceConfig, Strategy, VolumeConfig,
};
use crate::store::Digest;

// Read once per row and upcast at once; boxing the config would only make matching noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Event {
    ReleaseCreated {
        service: String,
        number: u64,
        image: Digest,
        config_digest: String,
        config: Config,
    },
    DeployStarted {
        service: String,
        from: Option<u64>,
        to: u64,
        reason: DeployReason,
    },
    DeploySucceeded {
        service: String,
        release: u64,
    },
    DeployRolledBack {
        service: String,
        from: u64,
        to: Option<u64>,
        reason: String,
    },
    InstanceLaunched {
        service: String,
        release: u64,
        instance: String,
    },
    InstanceStarted {
        instance: String,
        runtime_id: String,
        address: SocketAddr,
    },
    InstanceHealthy {
        instance: String,
    },
    InstanceUnhealthy {
        instance: String,
        detail: String,
    },
    InstanceDraining {
        instance: String,
        reason: String,
    },
    InstanceExited {
        instance: String,
        code: Option<i32>,
        signal: Option<i32>,
    },
    InstanceGone {
        instance: String,
        reason: GoneReason,
    },
    OrphanRemoved {
        runtime_id: String,
    },
    CrashLoopBackoff {
        service: String,
        failures: u32,
        delay_ms: u64,
        until_ms: u64,
    },
    ServiceScaled {
        service: String,
        instances: u32,
        route: Option<SocketAddr>,
    },
    ServiceRemoved {
        service: String,
    },
    HistoryLost {
        kept_through: u64,
        lost_through: u64,
    },
    LogUnwritable {
        since_ms: u64,
        error: String,
    },
}

/// A release's config in vocabulary 1: the rolling settings flat, no strategy named (rolling
/// was the only one).
#[derive(Debug, Deserialize)]
pub(super) struct Config {
    instances: u32,
    port: u16,
    route: Option<SocketAddr>,
    command: Option<Vec<String>>,
    env: BTreeMap<String, String>,
    health: HealthConfig,
    max_surge: u32,
    max_unavailable: u32,
    health_deadline: Duration,
    stop_grace: Duration,
    volumes: Vec<VolumeConfig>,
    limits: LimitsConfig,
}

/// Today's event for a vocabulary-1 one. Reasons that were only words stay words
/// (`Recorded`), except the drain reasons graven 1 wrote in fixed forms, which are read back
/// into their kinds.
pub(super) fn upcast(event: Event) -> super::Event {
    use super::Event as V2;
    match event {
        Event::ReleaseCreated {
            service,
            number,
            image,
            config_digest,
            config,
        } => V2::ReleaseCreated {
            service: service.into(),
            release: number.into(),
            image,
            config_digest,
            config: ServiceConfig {
                instances: config.instances,
                port: config.port,
                route: config.route,
                route_kind: Default::default(),
                route_threads: None,
                srv_name: None,
                command: config.command,
                env: config.env,
                secrets: BTreeMap::new(),
                health: config.health,
                strategy: Strategy::Rolling {
                    max_surge: config.max_surge,
                    max_unavailable: config.max_unavailable,
                },
                health_deadline: config.health_deadline,
                stop_grace: config.stop_grace,
                volumes: config.volumes,
                limits: config.limits,
                keep_releases: crate::spec::DEFAULT_KEEP_RELEASES,
                host_network: false,
                outbound: true,
                entrypoint: None,
                user: None,
                tmpfs: Default::default(),
                drift: Default::default(),
                phoenix: None,
            },
            source: None,
        },
        Event::DeployStarted {
            service,
            from,
            to,
            reason,
        } => V2::DeployStarted {
            service: service.into(),
            from: from.map(ReleaseNumber),
            to: to.into(),
            reason,
        },
        Event::DeploySucceeded { service, release } => V2::DeploySucceeded {
            service: service.into(),
            release: release.into(),
        },
        Event::DeployRolledBack {
            service,
            from,
            to,
            reason,
        } => V2::DeployRolledBack {
            service: service.into(),
            from: from.into(),
            to: to.map(ReleaseNumber),
            reason: RollbackReason::Recorded { text: reason },
        },
        Event::InstanceLaunched {
            service,
            release,
            instance,
        } => V2::InstanceLaunched {
            service: service.into(),
            release: release.into(),
            instance: instance.into(),
        },
        Event::InstanceStarted {
            instance,
            runtime_id,
            address,
        } => V2::InstanceStarted {
            instance: instance.into(),
            runtime_id: runtime_id.into(),
            address,
        },
        Event::InstanceHealthy { instance } => V2::InstanceHealthy {
            instance: instance.into(),
        },
        Event::InstanceUnhealthy { instance, detail } => V2::InstanceUnhealthy {
            instance: instance.into(),
            detail,
        },
        Event::InstanceDraining { instance, reason } => V2::InstanceDraining {
            instance: instance.into(),
            reason: drain_reason(reason),
        },
        Event::InstanceExited {
            instance,
            code,
            signal,
        } => V2::InstanceExited {
            instance: instance.into(),
            code,
            signal,
        },
        Event::InstanceGone { instance, reason } => V2::InstanceGone {
            instance: instance.into(),
            reason,
        },
        Event::OrphanRemoved { runtime_id } => V2::OrphanRemoved {
            runtime_id: runtime_id.into(),
        },
        Event::CrashLoopBackoff {
            service,
            failures,
            delay_ms,
            until_ms,
        } => V2::CrashLoopBackoff {
            service: service.into(),
            failures,
            delay_ms,
            until_ms,
        },
        Event::ServiceScaled {
            service,
            instances,
            route,
        } => V2::ServiceScaled {
            service: service.into(),
            instances,
            route,
        },
        Event::ServiceRemoved { service } => V2::ServiceRemoved {
            service: service.into(),
        },
        Event::HistoryLost {
            kept_through,
            lost_through,
        } => V2::HistoryLost {
            kept_through,
            lost_through,
        },
        Event::LogUnwritable { since_ms, error } => V2::LogUnwritable { since_ms, error },
    }
}

/// The drain reasons graven 1 wrote, back in their kinds; any other text is kept as it was.
fn drain_reason(text: String) -> DrainReason {
    let number = |rest: &str| rest.parse::<u64>().ok().map(ReleaseNumber);
    if let Some(by) = text.strip_prefix("replaced by release ").and_then(number) {
        return DrainReason::Replaced { by };
    }
    if let Some(wanted) = text
        .strip_prefix("release ")
        .and_then(|rest| rest.strip_suffix(" is wanted"))
        .and_then(number)
    {
        return DrainReason::NotWanted { wanted };
    }
    if let Some(deadline) = text
        .strip_prefix("not healthy within ")
        .and_then(|rest| humantime::parse_duration(rest).ok())
    {
        return DrainReason::NotHealthyInTime { deadline };
    }
    if let Some(detail) = text.strip_prefix("unhealthy: ") {
        return DrainReason::Unhealthy {
            detail: Some(detail.to_owned()),
        };
    }
    if text == "shutdown" {
        return DrainReason::Shutdown;
    }
    if let Some(to) = text
        .rsplit_once(" scaled to ")
        .and_then(|(_, to)| to.parse().ok())
    {
        return DrainReason::ScaledDown { to };
    }
    if text.starts_with("service ") && text.ends_with(" is removed") {
        return DrainReason::ServiceRemoved;
    }
    DrainReason::Recorded { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graven_1_drain_reasons_are_read_back_into_their_kinds() {
        let cases = [
            (
                "replaced by release 2",
                DrainReason::Replaced {
                    by: ReleaseNumber(2),
                },
            ),
            (
                "release 3 is wanted",
                DrainReason::NotWanted {
                    wanted: ReleaseNumber(3),
                },
            ),
            (
                "not healthy within 30s",
                DrainReason::NotHealthyInTime {
                    deadline: Duration::from_secs(30),
                },
            ),
            (
                "unhealthy: 503",
                DrainReason::Unhealthy {
                    detail: Some("503".into()),
                },
            ),
            ("shutdown", DrainReason::Shutdown),
            ("web scaled to 2", DrainReason::ScaledDown { to: 2 }),
            ("service web is removed", DrainReason::ServiceRemoved),
            (
                "something else",
                DrainReason::Recorded {
                    text: "something else".into(),
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(drain_reason(text.to_owned()), expected, "{text}");
        }
    }
}
