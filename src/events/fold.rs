//! The fold: state is what the events say, and nothing else. Pure: no I/O and no clock (times
//! come from the envelopes), so replaying the same log always gives the same state, and an
//! envelope at or below the sequence already folded is skipped, so folding one twice is
//! harmless.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{
    ChaosOutcome, CondemnReason, DeployReason, DrainReason, Envelope, Event, GoneReason,
    InstanceName, ReleaseNumber, RollbackReason, RuntimeId, ServiceConfig, ServiceName, Source,
};
use crate::store::Digest;

/// How many deploy records the state keeps: enough for every rollback's "what did the
/// current release replace" and for `status`; the log keeps every one, so the state (and
/// its snapshots) stay bounded however many deploys there were.
pub const DEPLOY_RECORDS: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The sequence number of the last event folded in.
    pub seq: u64,
    /// Every release ever created, by number; never edited.
    pub releases: BTreeMap<ReleaseNumber, Release>,
    pub services: BTreeMap<ServiceName, ServiceState>,
    /// Instances that are not gone, by the name the controller gave them.
    pub instances: BTreeMap<InstanceName, InstanceState>,
    /// How many instances were ever launched; the controller numbers new ones from it.
    pub launched: u64,
    /// The last `DEPLOY_RECORDS` deploys and rollbacks, oldest first (the log has them all).
    pub deploys: Vec<DeployRecord>,
    /// The last sequence number a recovered log lost (0: none). Numbers of releases and
    /// instances go on after it, since a lost one may have used any number up to it.
    pub lost_through: u64,
    /// Planned failures (`[chaos]`, experiments).
    #[serde(default)]
    pub chaos: ChaosState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub number: ReleaseNumber,
    pub service: ServiceName,
    pub image: Digest,
    pub config_digest: String,
    pub config: ServiceConfig,
    pub created_at_ms: u64,
    /// Who made it: the actor of the event that created it.
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Set when a rollout towards it was rolled back: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<RollbackReason>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The release that should run; `None` once the service is removed.
    pub wanted: Option<ReleaseNumber>,
    pub deploy: Option<Deploy>,
    /// Instances of the wanted release that failed since one was last healthy.
    pub failures: u32,
    pub last_failure_at_ms: u64,
    pub last_failure: Option<String>,
    pub backoff: Option<Backoff>,
    /// Instance count and route when they differ from the wanted release's config.
    pub scale: Option<Scale>,
    /// The instances that take new requests, with their weights, as last decided.
    pub traffic: BTreeMap<InstanceName, u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scale {
    pub instances: u32,
    pub route: Option<SocketAddr>,
}

/// A rollout in progress towards the wanted release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub from: Option<ReleaseNumber>,
    pub to: ReleaseNumber,
    pub reason: DeployReason,
    pub started_at_ms: u64,
    /// Instances of `to` that failed during this rollout.
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub failures: u32,
    pub delay_ms: u64,
    pub until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub service: ServiceName,
    pub from: Option<ReleaseNumber>,
    pub to: ReleaseNumber,
    pub reason: DeployReason,
    pub started_at_ms: u64,
    /// Who started it.
    pub by: String,
    pub outcome: Option<DeployOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DeployOutcome {
    Succeeded {
        at_ms: u64,
    },
    RolledBack {
        at_ms: u64,
        reason: RollbackReason,
    },
    /// A newer deploy of the same service began before this one ended.
    Superseded {
        at_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    pub name: InstanceName,
    pub service: ServiceName,
    pub release: ReleaseNumber,
    pub lifecycle: Lifecycle,
    /// Known once the runtime started it.
    pub runtime_id: Option<RuntimeId>,
    pub address: Option<SocketAddr>,
    pub launched_at_ms: u64,
    /// What the last health check said when it failed.
    pub detail: Option<String>,
    /// Why it is being drained, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainReason>,
    /// Set once it must be replaced; it serves until its replacement does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condemned: Option<CondemnReason>,
}

/// An instance's life as the controller sees it. `Gone` instances leave the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Launched; not yet healthy (no address until the runtime started it).
    Starting,
    Healthy,
    Unhealthy,
    Draining,
}

impl State {
    /// The next release number in this environment.
    pub fn next_release(&self) -> ReleaseNumber {
        let newest = self.releases.keys().next_back().map_or(0, |n| n.0);
        ReleaseNumber(newest.max(self.lost_through) + 1)
    }

    /// How many instances of the service should run, and on which route.
    pub fn scale(&self, service: &str) -> Option<Scale> {
        let state = self.services.get(service)?;
        let release = self.releases.get(&state.wanted?)?;
        Some(state.scale.unwrap_or(Scale {
            instances: release.config.instances,
            route: release.config.route,
        }))
    }

    /// Services that want a release: deployed and not removed since.
    pub fn wanted_services(&self) -> impl Iterator<Item = &ServiceName> {
        self.services
            .iter()
            .filter(|(_, s)| s.wanted.is_some())
            .map(|(name, _)| name)
    }

    pub fn wanted_release(&self, service: &str) -> Option<&Release> {
        let wanted = self.services.get(service)?.wanted?;
        self.releases.get(&wanted)
    }

    /// Releases of one service, oldest first.
    pub fn releases_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl DoubleEndedIterator<Item = &'a Release> + 'a {
        self.releases.values().filter(move |r| r.service == service)
    }

    pub fn instances_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a InstanceState> + 'a {
        self.instances
            .values()
            .filter(move |i| i.service == service)
    }

    fn failed(&mut self, instance: &InstanceState, at_ms: u64, why: String) {
        let Some(service) = self.services.get_mut(&instance.service) else {
            return;
        };
        if service.wanted != Some(instance.release) || instance.lifecycle == Lifecycle::Draining {
            return;
        }
        service.failures += 1;
        service.last_failure_at_ms = at_ms;
        service.last_failure = Some(why);
        if let Some(deploy) = service.deploy.as_mut().filter(|d| d.to == instance.release) {
            deploy.failures += 1;
        }
    }

    fn end_deploy(&mut self, service: &str, outcome: DeployOutcome) {
        if let Some(record) = self
            .deploys
            .iter_mut()
            .rev()
            .find(|r| r.service == service && r.outcome.is_none())
        {
            record.outcome = Some(outcome);
        }
        if let Some(state) = self.services.get_mut(service) {
            state.deploy = None;
        }
    }

    /// Takes a gone instance out of the state and out of its service's traffic.
    fn remove_instance(&mut self, instance: &str) -> Option<InstanceState> {
        let removed = self.instances.remove(instance)?;
        if let Some(service) = self.services.get_mut(&removed.service) {
            service.traffic.remove(instance);
        }
        Some(removed)
    }
}

/// Applies one event to the state. An envelope at or below the sequence already folded
/// changes nothing, and events that name something the state does not know (an instance
/// already gone) change nothing, so replaying a log twice is harmless.
pub fn fold(mut state: State, envelope: &Envelope<Event>) -> State {
    if envelope.seq <= state.seq {
        return state;
    }
    let at = envelope.at_ms;
    state.seq = envelope.seq;
    match &envelope.payload {
        Event::ReleaseCreated {
            service,
            release,
            image,
            config_digest,
            config,
            source,
        } => {
            state.releases.insert(
                *release,
                Release {
                    number: *release,
                    service: service.clone(),
                    image: image.clone(),
                    config_digest: config_digest.clone(),
                    config: config.clone(),
                    created_at_ms: at,
                    created_by: envelope.actor.clone(),
                    source: source.clone(),
                    failed: None,
                },
            );
            state.services.entry(service.clone()).or_default();
        }
        Event::DeployStarted {
            service,
            from,
            to,
            reason,
        } => {
            state.end_deploy(service, DeployOutcome::Superseded { at_ms: at });
            // A deploy brings the count and route of its release; a rollback changes the
            // release only, so it keeps what runs now.
            let scale = match reason {
                DeployReason::Deploy => None,
                DeployReason::Rollback => state.scale(service),
            };
            let entry = state.services.entry(service.clone()).or_default();
            entry.scale = scale;
            entry.wanted = Some(*to);
            entry.deploy = Some(Deploy {
                from: *from,
                to: *to,
                reason: *reason,
                started_at_ms: at,
                failures: 0,
            });
            entry.failures = 0;
            entry.last_failure = None;
            entry.backoff = None;
            state.deploys.push(DeployRecord {
                service: service.clone(),
                from: *from,
                to: *to,
                reason: *reason,
                started_at_ms: at,
                by: envelope.actor.clone(),
                outcome: None,
            });
            if state.deploys.len() > DEPLOY_RECORDS {
                let surplus = state.deploys.len() - DEPLOY_RECORDS;
                state.deploys.drain(..surplus);
            }
        }
        Event::DeploySucceeded { service, .. } => {
            state.end_deploy(service, DeployOutcome::Succeeded { at_ms: at });
        }
        Event::DeployRolledBack {
            service,
            from,
            to,
            reason,
        } => {
            state.end_deploy(
                service,
                DeployOutcome::RolledBack {
                    at_ms: at,
                    reason: reason.clone(),
                },
            );
            if let Some(release) = state.releases.get_mut(from) {
                release.failed = Some(reason.clone());
            }
            let entry = state.services.entry(service.clone()).or_default();
            entry.wanted = *to;
            entry.failures = 0;
            entry.backoff = None;
        }
        Event::InstanceLaunched {
            service,
            release,
            instance,
        } => {
            state.launched += 1;
            state.instances.insert(
                instance.clone(),
                InstanceState {
                    name: instance.clone(),
                    service: service.clone(),
                    release: *release,
                    lifecycle: Lifecycle::Starting,
                    runtime_id: None,
                    address: None,
                    launched_at_ms: at,
                    detail: None,
                    drain: None,
                    condemned: None,
                },
            );
        }
        Event::InstanceStarted {
            instance,
            runtime_id,
            address,
        } => {
            if let Some(i) = state.instances.get_mut(instance) {
                i.runtime_id = Some(runtime_id.clone());
                i.address = Some(*address);
            }
        }
        Event::InstanceHealthy { instance } => {
            if let Some(i) = state.instances.get_mut(instance)
                && i.lifecycle != Lifecycle::Draining
            {
                i.lifecycle = Lifecycle::Healthy;
                i.detail = None;
                let (service, release) = (i.service.clone(), i.release);
                if let Some(s) = state.services.get_mut(&service)
                    && s.wanted == Some(release)
                {
                    s.failures = 0;
                    s.backoff = None;
                }
            }
        }
        Event::InstanceUnhealthy { instance, detail } => {
            if let Some(i) = state.instances.get(instance).cloned()
                && i.lifecycle != Lifecycle::Draining
            {
                state.failed(&i, at, format!("instance {instance} unhealthy: {detail}"));
                let i = state.instances.get_mut(instance).expect("just read");
                i.lifecycle = Lifecycle::Unhealthy;
                i.detail = Some(detail.clone());
            }
        }
        Event::InstanceCondemned { instance, reason } => {
            if let Some(i) = state.instances.get_mut(instance) {
                i.condemned = Some(reason.clone());
            }
        }
        Event::InstanceDraining { instance, reason } => {
            if let Some(i) = state.instances.get_mut(instance) {
                i.lifecycle = Lifecycle::Draining;
                i.drain = Some(reason.clone());
                let service = i.service.clone();
                if let Some(s) = state.services.get_mut(&service) {
                    s.traffic.remove(instance);
                }
            }
        }
        Event::InstanceExited {
            instance,
            code,
            signal,
        } => {
            if let Some(i) = state.remove_instance(instance) {
                let why = format!(
                    "instance {instance} exited ({})",
                    super::exit_text(*code, *signal)
                );
                state.failed(&i, at, why);
            }
        }
        Event::InstanceGone { instance, reason } => {
            if let Some(i) = state.remove_instance(instance)
                && let GoneReason::StartFailed { error } = reason
            {
                state.failed(
                    &i,
                    at,
                    format!("instance {instance} did not start: {error}"),
                );
            }
        }
        Event::TrafficChanged { service, routed } => {
            if let Some(s) = state.services.get_mut(service) {
                s.traffic = routed.clone();
            }
        }
        Event::OrphanRemoved { .. } => {}
        Event::CrashLoopBackoff {
            service,
            failures,
            delay_ms,
            until_ms,
        } => {
            if let Some(s) = state.services.get_mut(service) {
                s.backoff = Some(Backoff {
                    failures: *failures,
                    delay_ms: *delay_ms,
                    until_ms: *until_ms,
                });
            }
        }
        Event::ServiceScaled {
            service,
            instances,
            route,
        } => {
            if let Some(s) = state.services.get_mut(service) {
                s.scale = Some(Scale {
                    instances: *instances,
                    route: *route,
                });
            }
        }
        Event::ServiceRemoved { service } => {
            state.end_deploy(service, DeployOutcome::Superseded { at_ms: at });
            if let Some(s) = state.services.get_mut(service) {
                s.wanted = None;
                s.failures = 0;
                s.backoff = None;
                s.scale = None;
            }
        }
        Event::HistoryLost { lost_through, .. } => {
            state.lost_through = state.lost_through.max(*lost_through);
            state.launched = state.launched.max(*lost_through);
        }
        Event::LogUnwritable { .. } => {}
        Event::ChaosConfigured { config } => state.chaos.config.clone_from(config),
        Event::ChaosStarted {
            experiment,
            service,
            instance,
            action,
            duration,
            leashed,
            scheduled,
            ..
        } => {
            let chaos = &mut state.chaos;
            chaos.experiments = chaos.experiments.max(*experiment);
            if *scheduled {
                chaos.last_scheduled_ms = at;
            }
            // A leashed experiment did nothing: nothing runs.
            if !*leashed {
                chaos.running = Some(RunningExperiment {
                    experiment: *experiment,
                    service: service.clone(),
                    instance: instance.clone(),
                    action: action.clone(),
                    started_at_ms: at,
                    until_ms: at.saturating_add(duration.as_millis() as u64),
                });
            }
        }
        Event::ChaosEnded {
            experiment,
            outcome,
            ..
        } => {
            let chaos = &mut state.chaos;
            if chaos.running.as_ref().map(|r| r.experiment) == Some(*experiment) {
                chaos.running = None;
            }
            if let ChaosOutcome::Aborted {
                paused_until_ms, ..
            } = outcome
            {
                chaos.paused_until_ms = chaos.paused_until_ms.max(*paused_until_ms);
            }
        }
    }
    state
}

/// Planned failures as the log says: the config, the experiment running, the pause after an
/// abort.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosState {
    pub config: Option<crate::chaos::ChaosConfig>,
    /// The number of the last experiment (the next is one more).
    pub experiments: u64,
    pub running: Option<RunningExperiment>,
    /// When the last scheduled experiment started (ms since the epoch; 0: never).
    pub last_scheduled_ms: u64,
    /// No scheduled experiment before this (an abort's cool-down).
    pub paused_until_ms: u64,
}

/// The experiment under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningExperiment {
    pub experiment: u64,
    pub service: ServiceName,
    pub instance: Option<InstanceName>,
    pub action: crate::chaos::Action,
    pub started_at_ms: u64,
    pub until_ms: u64,
}

/// Folds a whole sequence from the empty state.
pub fn replay<'a>(envelopes: impl IntoIterator<Item = &'a Envelope<Event>>) -> State {
    envelopes.into_iter().fold(State::default(), fold)
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn config(version: &str) -> ServiceConfig {
        ServiceConfig {
            env: [("VERSION".to_owned(), version.to_owned())].into(),
            ..ServiceConfig::test(2, 1, 0)
        }
    }

    fn release(number: u64, version: &str) -> Event {
        Event::ReleaseCreated {
            service: "web".into(),
            release: ReleaseNumber(number),
            image: Digest::of(b"hello"),
            config_digest: format!("cfg-{version}"),
            config: config(version),
            source: None,
        }
    }

    fn deploy(from: Option<u64>, to: u64) -> Event {
        Event::DeployStarted {
            service: "web".into(),
            from: from.map(ReleaseNumber),
            to: ReleaseNumber(to),
            reason: DeployReason::Deploy,
        }
    }

    fn launched(instance: &str, release: u64) -> Event {
        Event::InstanceLaunched {
            service: "web".into(),
            release: ReleaseNumber(release),
            instance: instance.into(),
        }
    }

    fn started(instance: &str, port: u16) -> Event {
        Event::InstanceStarted {
            instance: instance.into(),
            runtime_id: RuntimeId(format!("rt-{instance}")),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn healthy(instance: &str) -> Event {
        Event::InstanceHealthy {
            instance: instance.into(),
        }
    }

    /// Replays `events` (one per second of log time) and renders the parts of the state a
    /// reader cares about, one line each.
    fn check(events: Vec<Event>, expected: Expect) {
        let envelopes: Vec<Envelope<Event>> = events
            .into_iter()
            .enumerate()
            .map(|(i, payload)| Envelope {
                seq: i as u64 + 1,
                at_ms: (i as u64 + 1) * 1000,
                actor: "test".into(),
                version: 1,
                payload,
            })
            .collect();
        let state = replay(&envelopes);
        // Folding any envelope again, at or below the folded sequence, changes nothing.
        let again = envelopes.iter().fold(state.clone(), fold);
        assert_eq!(again, state, "replay is idempotent");
        if let Some(middle) = envelopes.get(envelopes.len() / 2) {
            assert_eq!(
                fold(state.clone(), middle),
                state,
                "an old envelope is skipped"
            );
        }
        let mut out = String::new();
        out += &format!(
            "releases: {:?}\n",
            state.releases.keys().collect::<Vec<_>>()
        );
        for (name, s) in &state.services {
            out += &format!(
                "service {name}: wanted={:?} deploy={:?} failures={} backoff={:?}\n",
                s.wanted,
                s.deploy.as_ref().map(|d| (d.from, d.to, d.failures)),
                s.failures,
                s.backoff.as_ref().map(|b| b.until_ms),
            );
        }
        for i in state.instances.values() {
            out += &format!(
                "instance {}: release={} {:?} addr={:?} detail={:?}\n",
                i.name, i.release, i.lifecycle, i.address, i.detail
            );
        }
        for d in &state.deploys {
            out += &format!("deploy {:?}->{} {:?}\n", d.from, d.to, d.outcome);
        }
        expected.assert_eq(&out);
    }

    #[test]
    fn empty_log_is_empty_state() {
        check(
            vec![],
            expect![[r#"
            releases: []
        "#]],
        );
    }

    #[test]
    fn first_deploy_brings_instances_to_healthy() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                launched("web-1", 1),
                started("web-1", 9001),
                healthy("web-1"),
                launched("web-2", 1),
                started("web-2", 9002),
                healthy("web-2"),
                Event::DeploySucceeded {
                    service: "web".into(),
                    release: ReleaseNumber(1),
                },
            ],
            expect![[r#"
                releases: [1]
                service web: wanted=Some(1) deploy=None failures=0 backoff=None
                instance web-1: release=1 Healthy addr=Some(127.0.0.1:9001) detail=None
                instance web-2: release=1 Healthy addr=Some(127.0.0.1:9002) detail=None
                deploy None->1 Some(Succeeded { at_ms: 9000 })
            "#]],
        );
    }

    #[test]
    fn rolling_deploy_drains_old_and_forgets_gone() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                launched("web-1", 1),
                started("web-1", 9001),
                healthy("web-1"),
                release(2, "v2"),
                deploy(Some(1), 2),
                launched("web-2", 2),
                started("web-2", 9002),
                healthy("web-2"),
                Event::InstanceDraining {
                    instance: "web-1".into(),
                    reason: DrainReason::Recorded {
                        text: "replaced by release 2".into(),
                    },
                },
            ],
            expect![[r#"
                releases: [1, 2]
                service web: wanted=Some(2) deploy=Some((Some(1), 2, 0)) failures=0 backoff=None
                instance web-1: release=1 Draining addr=Some(127.0.0.1:9001) detail=None
                instance web-2: release=2 Healthy addr=Some(127.0.0.1:9002) detail=None
                deploy None->1 Some(Superseded { at_ms: 7000 })
                deploy Some(1)->2 None
            "#]],
        );
    }

    #[test]
    fn gone_instance_leaves_the_state() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                launched("web-1", 1),
                started("web-1", 9001),
                Event::InstanceDraining {
                    instance: "web-1".into(),
                    reason: DrainReason::Recorded {
                        text: "shutdown".into(),
                    },
                },
                Event::InstanceGone {
                    instance: "web-1".into(),
                    reason: GoneReason::Stopped,
                },
            ],
            expect![[r#"
                releases: [1]
                service web: wanted=Some(1) deploy=Some((None, 1, 0)) failures=0 backoff=None
                deploy None->1 None
            "#]],
        );
    }

    #[test]
    fn failures_of_the_wanted_release_count_until_one_is_healthy() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                launched("web-1", 1),
                started("web-1", 9001),
                Event::InstanceExited {
                    instance: "web-1".into(),
                    code: Some(1),
                    signal: None,
                },
                launched("web-2", 1),
                Event::InstanceGone {
                    instance: "web-2".into(),
                    reason: GoneReason::StartFailed {
                        error: "no such image".into(),
                    },
                },
                Event::CrashLoopBackoff {
                    service: "web".into(),
                    failures: 2,
                    delay_ms: 1000,
                    until_ms: 8000,
                },
                launched("web-3", 1),
                started("web-3", 9003),
            ],
            expect![[r#"
                releases: [1]
                service web: wanted=Some(1) deploy=Some((None, 1, 2)) failures=2 backoff=Some(8000)
                instance web-3: release=1 Starting addr=Some(127.0.0.1:9003) detail=None
                deploy None->1 None
            "#]],
        );
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                launched("web-1", 1),
                Event::InstanceUnhealthy {
                    instance: "web-1".into(),
                    detail: "503".into(),
                },
                launched("web-2", 1),
                healthy("web-2"),
            ],
            expect![[r#"
                releases: [1]
                service web: wanted=Some(1) deploy=Some((None, 1, 1)) failures=0 backoff=None
                instance web-1: release=1 Unhealthy addr=None detail=Some("503")
                instance web-2: release=1 Healthy addr=None detail=None
                deploy None->1 None
            "#]],
        );
    }

    #[test]
    fn failures_of_other_releases_and_drained_instances_do_not_count() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                launched("web-1", 1),
                release(2, "v2"),
                deploy(Some(1), 2),
                Event::InstanceExited {
                    instance: "web-1".into(),
                    code: None,
                    signal: Some(9),
                },
                launched("web-2", 2),
                Event::InstanceDraining {
                    instance: "web-2".into(),
                    reason: DrainReason::Recorded { text: "x".into() },
                },
                Event::InstanceExited {
                    instance: "web-2".into(),
                    code: Some(0),
                    signal: None,
                },
            ],
            expect![[r#"
                releases: [1, 2]
                service web: wanted=Some(2) deploy=Some((Some(1), 2, 0)) failures=0 backoff=None
                deploy None->1 Some(Superseded { at_ms: 5000 })
                deploy Some(1)->2 None
            "#]],
        );
    }

    #[test]
    fn rollback_restores_the_wanted_release_and_says_why() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                Event::DeploySucceeded {
                    service: "web".into(),
                    release: ReleaseNumber(1),
                },
                release(2, "bad"),
                deploy(Some(1), 2),
                launched("web-1", 2),
                Event::InstanceUnhealthy {
                    instance: "web-1".into(),
                    detail: "503".into(),
                },
                Event::DeployRolledBack {
                    service: "web".into(),
                    from: ReleaseNumber(2),
                    to: Some(ReleaseNumber(1)),
                    reason: RollbackReason::Recorded {
                        text: "not healthy within 30s".into(),
                    },
                },
            ],
            expect![[r#"
                releases: [1, 2]
                service web: wanted=Some(1) deploy=None failures=0 backoff=None
                instance web-1: release=2 Unhealthy addr=None detail=Some("503")
                deploy None->1 Some(Succeeded { at_ms: 3000 })
                deploy Some(1)->2 Some(RolledBack { at_ms: 8000, reason: Recorded { text: "not healthy within 30s" } })
            "#]],
        );
    }

    #[test]
    fn service_removed_wants_nothing_and_unknown_instances_are_ignored() {
        check(
            vec![
                release(1, "v1"),
                deploy(None, 1),
                healthy("nobody"),
                Event::InstanceGone {
                    instance: "nobody".into(),
                    reason: GoneReason::Lost,
                },
                Event::ServiceRemoved {
                    service: "web".into(),
                },
            ],
            expect![[r#"
                releases: [1]
                service web: wanted=None deploy=None failures=0 backoff=None
                deploy None->1 Some(Superseded { at_ms: 5000 })
            "#]],
        );
    }

    #[test]
    fn scale_overrides_the_release_until_the_next_deploy_but_survives_a_rollback() {
        let at = |seq: u64, payload: Event| Envelope {
            seq,
            at_ms: seq,
            actor: "t".into(),
            version: 1,
            payload,
        };
        let scaled = Event::ServiceScaled {
            service: "web".into(),
            instances: 5,
            route: None,
        };
        let mut state = replay(&[
            at(1, release(1, "v1")),
            at(2, deploy(None, 1)),
            at(3, scaled),
        ]);
        assert_eq!(state.scale("web").map(|s| s.instances), Some(5));
        state = fold(state, &at(4, release(2, "v2")));
        let rollback = Event::DeployStarted {
            service: "web".into(),
            from: Some(ReleaseNumber(1)),
            to: ReleaseNumber(2),
            reason: DeployReason::Rollback,
        };
        state = fold(state, &at(5, rollback));
        assert_eq!(state.scale("web").map(|s| s.instances), Some(5));
        state = fold(state, &at(6, deploy(Some(2), 1)));
        assert_eq!(state.scale("web").map(|s| s.instances), Some(2));
    }

    #[test]
    fn next_release_numbers_per_environment() {
        let mut state = State::default();
        assert_eq!(state.next_release(), ReleaseNumber(1));
        state = fold(
            state,
            &Envelope {
                seq: 1,
                at_ms: 1,
                actor: "t".into(),
                version: 1,
                payload: release(7, "v"),
            },
        );
        assert_eq!(state.next_release(), ReleaseNumber(8));
    }

    #[test]
    fn numbers_go_on_after_lost_history() {
        let envelope = |seq, payload| Envelope {
            seq,
            at_ms: 1,
            actor: "t".into(),
            version: 1,
            payload,
        };
        let mut state = fold(State::default(), &envelope(1, release(1, "v")));
        state.launched = 1;
        // Events 2 to 9 are lost: they may have created releases and instances up to 9.
        let lost = Event::HistoryLost {
            kept_through: 1,
            lost_through: 9,
        };
        state = fold(state, &envelope(10, lost));
        assert_eq!(state.next_release(), ReleaseNumber(10));
        assert_eq!(state.launched, 9);
        state = fold(state, &envelope(11, release(10, "w")));
        assert_eq!(state.next_release(), ReleaseNumber(11));
    }
}
