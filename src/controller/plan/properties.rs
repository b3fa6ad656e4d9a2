//! Properties of the planner over random histories (proptest): a simulated runtime carries out
//! each round's actions while random health flips, crashes, deploys and the passing of time
//! happen in between, and after every round the invariants hold:
//! - a planned drain (replaced, condemned, scaled down) never takes the instances that take
//!   traffic below `instances - max_unavailable`, or below what they were if already fewer;
//! - traffic never goes to an instance that is draining or gone, and no instance is drained
//!   while the round's own traffic decision still routes it;
//! - every launched instance is in the state under a name never used before, and the state's
//!   launch count is the number of launches;
//! - for a stop-first (stateful) service, whose stops take time here: never two instances
//!   alive at once, whatever their state (starting, healthy, unhealthy, draining), in the log
//!   or on the runtime, and an old instance is drained only once the new image is prepared;
//! - a condemned instance of a service that may surge is drained only once the instances
//!   taking traffic without it are as many as before, or the desired count;
//! - phoenix: nothing is condemned for age outside the window or during a rollout, and never
//!   more than `max_at_once` aged instances are in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::{Action, Observed, Seen, plan};
use crate::events::{
    CondemnReason, DeployReason, DrainReason, Envelope, Event, GoneReason, InstanceName, Lifecycle,
    RuntimeId, ServiceConfig, State, fold,
};
use crate::store::Digest;

#[derive(Debug, Clone)]
enum Op {
    Healthy(usize),
    Unhealthy(usize),
    Exit(usize),
    Taint(usize),
    Advance(u64),
    Deploy,
    Scale(u32),
    /// The stops under way finish (a stop-first service's sim stops slowly).
    StopsDone,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<usize>().prop_map(Op::Healthy),
        1 => any::<usize>().prop_map(Op::Unhealthy),
        1 => any::<usize>().prop_map(Op::Exit),
        1 => any::<usize>().prop_map(Op::Taint),
        2 => (100u64..40_000).prop_map(Op::Advance),
        1 => Just(Op::Deploy),
        1 => (1u32..6).prop_map(Op::Scale),
        2 => Just(Op::StopsDone),
    ]
}

struct Sim {
    state: State,
    now_ms: u64,
    /// The simulated runtime: what runs, by runtime id, and whether it exited or was touched.
    runtime: BTreeMap<RuntimeId, (InstanceName, bool, bool)>,
    names: BTreeSet<InstanceName>,
    launches: u64,
    config: ServiceConfig,
    /// Stop-first: drains finish only at `StopsDone`, and the invariants are the stateful ones.
    stateful: bool,
    stopping: BTreeSet<InstanceName>,
    prepared: BTreeSet<Digest>,
}

impl Sim {
    fn record(&mut self, event: Event) {
        let envelope = Envelope {
            seq: self.state.seq + 1,
            at_ms: self.now_ms,
            actor: "test".into(),
            version: 2,
            payload: event,
        };
        self.state = fold(std::mem::take(&mut self.state), &envelope);
    }

    fn deploy(&mut self) {
        let number = self.state.next_release();
        let mut config = self.config.clone();
        config.env.insert("N".into(), number.to_string());
        let from = self.state.services.get("web").and_then(|s| s.wanted);
        self.record(Event::ReleaseCreated {
            service: "web".into(),
            release: number,
            // Each release its own image, so each stop-first replacement prepares anew.
            image: Digest::of(number.to_string().as_bytes()),
            config_digest: config.digest().to_string(),
            config,
            source: None,
        });
        self.record(Event::DeployStarted {
            service: "web".into(),
            from,
            to: number,
            reason: DeployReason::Deploy,
        });
    }

    /// The live instance `index` picks, if any.
    fn pick(&self, index: usize) -> Option<InstanceName> {
        let live: Vec<&InstanceName> = self
            .state
            .instances
            .values()
            .filter(|i| i.lifecycle != Lifecycle::Draining)
            .map(|i| &i.name)
            .collect();
        (!live.is_empty()).then(|| live[index % live.len()].clone())
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Healthy(i) => {
                if let Some(name) = self.pick(i)
                    && self.state.instances[&name].address.is_some()
                {
                    self.record(Event::InstanceHealthy { instance: name });
                }
            }
            Op::Unhealthy(i) => {
                if let Some(name) = self.pick(i)
                    && self.state.instances[&name].address.is_some()
                {
                    self.record(Event::InstanceUnhealthy {
                        instance: name,
                        detail: "503".into(),
                    });
                }
            }
            Op::Exit(i) | Op::Taint(i) => {
                let exit = matches!(op, Op::Exit(_));
                if let Some(name) = self.pick(i)
                    && let Some((_, exited, tainted)) =
                        self.runtime.values_mut().find(|(n, _, _)| *n == name)
                {
                    if exit {
                        *exited = true;
                    } else {
                        *tainted = true;
                    }
                }
            }
            Op::Advance(ms) => self.now_ms += ms,
            Op::Deploy => self.deploy(),
            Op::Scale(_) if self.stateful => {}
            Op::StopsDone => {
                for instance in std::mem::take(&mut self.stopping) {
                    self.runtime.retain(|_, (n, _, _)| *n != instance);
                    self.record(Event::InstanceGone {
                        instance,
                        reason: GoneReason::Stopped,
                    });
                }
            }
            Op::Scale(n) => {
                let route = None;
                self.record(Event::ServiceScaled {
                    service: "web".into(),
                    instances: n,
                    route,
                });
            }
        }
    }

    fn observed(&self) -> Observed {
        Observed {
            listed: true,
            runtime: self
                .runtime
                .iter()
                .map(|(id, (name, exited, tainted))| Seen {
                    id: id.clone(),
                    name: Some(name.clone()),
                    exited: exited.then_some((Some(1), None)),
                    address: Some(SocketAddr::from(([127, 0, 0, 1], 9))),
                    tainted: *tainted,
                    drift: None,
                })
                .collect(),
            busy: self.stopping.clone(),
            prepared: self.prepared.clone(),
            ..Observed::default()
        }
    }

    /// Stop-first: at most one instance of the service alive, in the log and on the runtime.
    fn check_alone(&self, actions: &[Action]) -> Result<(), TestCaseError> {
        if !self.stateful {
            return Ok(());
        }
        let alive: Vec<_> = self.state.instances.keys().collect();
        prop_assert!(
            alive.len() <= 1,
            "alive at once: {alive:?} after {actions:?}"
        );
        let running = self
            .runtime
            .values()
            .filter(|(_, exited, _)| !exited)
            .count();
        prop_assert!(running <= 1, "running at once: {:?}", self.runtime);
        Ok(())
    }

    /// The instances that take traffic: routed by the last decision and healthy now.
    fn routed(&self) -> usize {
        self.state.services.get("web").map_or(0, |s| {
            s.traffic
                .keys()
                .filter(|name| {
                    self.state
                        .instances
                        .get(*name)
                        .is_some_and(|i| i.lifecycle == Lifecycle::Healthy)
                })
                .count()
        })
    }

    /// One planning round, carried out as the shell would; checks the invariants.
    fn round(&mut self) -> Result<bool, TestCaseError> {
        let actions = plan(&self.state, &self.observed(), self.now_ms);
        let routed_before = self.routed();
        let desired = self.state.scale("web").map_or(0, |s| s.instances);
        let max_unavailable =
            self.state
                .wanted_release("web")
                .map_or(0, |r| match r.config.strategy {
                    crate::events::Strategy::Rolling {
                        max_unavailable, ..
                    } => max_unavailable,
                    // Stop-first takes everything down on purpose.
                    crate::events::Strategy::Recreate => desired,
                });
        let mut planned_drain = false;
        // Nothing is drained that the round's traffic decision still routes: an instance that
        // takes traffic is taken out by a route decision before its drain.
        let traffic_before = self
            .state
            .services
            .get("web")
            .map(|s| s.traffic.clone())
            .unwrap_or_default();
        let mut routed_now = traffic_before.clone();
        let phoenix = self
            .state
            .wanted_release("web")
            .and_then(|r| r.config.phoenix.clone());
        for action in &actions {
            if let Action::Condemn {
                reason: CondemnReason::Aged { .. },
                instance,
            } = action
            {
                let phoenix = phoenix.as_ref();
                prop_assert!(phoenix.is_some(), "{instance} aged without a phoenix table");
                prop_assert!(
                    self.state.services["web"].deploy.is_none(),
                    "{instance} recycled during a rollout: {actions:?}"
                );
                if let Some(window) = phoenix.and_then(|p| p.window.as_ref()) {
                    let minute = (self.now_ms / 60_000 % 1440) as u16;
                    prop_assert!(
                        window.contains(minute),
                        "{instance} recycled at minute {minute}, outside {window}"
                    );
                }
            }
        }
        let only_condemned_drains = actions.iter().any(|a| matches!(a, Action::Drain { .. }))
            && actions.iter().all(|a| match a {
                Action::Drain { reason, .. } => matches!(reason, DrainReason::Condemned { .. }),
                _ => true,
            });
        for action in &actions {
            match action {
                Action::Route { routed, .. } => routed_now = routed.clone(),
                Action::Drain { instance, .. } => {
                    prop_assert!(
                        !routed_now.contains_key(instance),
                        "{instance} is drained while the plan still routes it: {actions:?}"
                    );
                    // A replacement's image is ready before the instance it replaces goes.
                    let wanted = self.state.wanted_release("web").map(|r| &r.image);
                    let replaced = self.state.instances.get(instance).is_some_and(|i| {
                        Some(i.release) != self.state.services["web"].wanted
                            && i.lifecycle == Lifecycle::Healthy
                    });
                    if self.stateful
                        && replaced
                        && let Some(image) = wanted
                    {
                        prop_assert!(
                            self.prepared.contains(image),
                            "{instance} drained before {image} was prepared: {actions:?}"
                        );
                    }
                }
                _ => {}
            }
        }
        for action in &actions {
            if let Some(event) = action.event() {
                self.record(event);
            }
            match action {
                Action::Launch { instance, .. } => {
                    prop_assert!(
                        self.names.insert(instance.clone()),
                        "{instance} was launched twice"
                    );
                    self.launches += 1;
                    prop_assert!(self.state.instances.contains_key(instance));
                    // The runtime starts it at once.
                    let id = RuntimeId(format!("rt-{instance}"));
                    self.runtime
                        .insert(id.clone(), (instance.clone(), false, false));
                    self.record(Event::InstanceStarted {
                        instance: instance.clone(),
                        runtime_id: id,
                        address: SocketAddr::from(([127, 0, 0, 1], 9)),
                    });
                }
                Action::Drain { instance, reason } => {
                    if matches!(
                        reason,
                        DrainReason::Replaced { .. }
                            | DrainReason::Condemned { .. }
                            | DrainReason::ScaledDown { .. }
                    ) {
                        planned_drain = true;
                    }
                    if self.stateful {
                        self.stopping.insert(instance.clone());
                    } else {
                        self.runtime.retain(|_, (n, _, _)| n != instance);
                        self.record(Event::InstanceGone {
                            instance: instance.clone(),
                            reason: GoneReason::Stopped,
                        });
                    }
                }
                Action::Prepare { release, .. } => {
                    let image = self.state.releases[release].image.clone();
                    self.prepared.insert(image);
                }
                Action::Exited { runtime_id, .. } | Action::RemoveOrphan { runtime_id } => {
                    self.runtime.remove(runtime_id);
                }
                _ => {}
            }
            self.check_alone(&actions)?;
        }
        // Traffic never goes to what is draining or gone.
        if let Some(service) = self.state.services.get("web") {
            for name in service.traffic.keys() {
                let instance = self.state.instances.get(name);
                prop_assert!(
                    instance.is_some_and(|i| i.lifecycle == Lifecycle::Healthy),
                    "{name} takes traffic but is {:?}",
                    instance.map(|i| i.lifecycle)
                );
            }
        }
        if planned_drain {
            let floor = routed_before.min(desired.saturating_sub(max_unavailable) as usize);
            prop_assert!(
                self.routed() >= floor,
                "planned drains left {} routed of {routed_before} (floor {floor}): {actions:?}",
                self.routed()
            );
        }
        let may_surge = self.state.wanted_release("web").is_some_and(|r| {
            matches!(r.config.strategy, crate::events::Strategy::Rolling { max_surge, .. } if max_surge > 0)
        });
        if only_condemned_drains && may_surge && !self.stateful {
            let floor = routed_before.min(desired as usize);
            prop_assert!(
                self.routed() >= floor,
                "condemned drains left {} routed of {routed_before} (desired {desired}): {actions:?}",
                self.routed()
            );
        }
        if let Some(phoenix) = &phoenix {
            let aged = self
                .state
                .instances
                .values()
                .filter(|i| matches!(i.condemned, Some(CondemnReason::Aged { .. })))
                .count();
            prop_assert!(
                aged <= phoenix.max_at_once as usize,
                "{aged} aged instances in flight, max_at_once {}",
                phoenix.max_at_once
            );
        }
        prop_assert_eq!(self.state.launched, self.launches);
        Ok(!actions.is_empty())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_rolling_planner_keeps_its_invariants(
        instances in 1u32..5,
        max_surge in 0u32..3,
        max_unavailable in 0u32..3,
        start_period in 0u64..20,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut config = ServiceConfig::test(instances, max_surge, max_unavailable);
        config.health_deadline = Duration::from_secs(30);
        // A start period lengthens the time new instances have to become healthy.
        config.health.start_period = Duration::from_secs(start_period);
        let mut sim = Sim {
            state: State::default(),
            now_ms: 1_000,
            runtime: BTreeMap::new(),
            names: BTreeSet::new(),
            launches: 0,
            config,
            stateful: false,
            stopping: BTreeSet::new(),
            prepared: BTreeSet::new(),
        };
        sim.deploy();
        for op in ops {
            sim.apply(op);
            // Rounds until the planner has nothing more to do right now (bounded: back-offs
            // and deadlines wait for time to pass).
            for _ in 0..8 {
                if !sim.round()? {
                    break;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_stop_first_planner_never_runs_two_instances_of_a_stateful_service(
        start_period in 0u64..20,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut config = ServiceConfig::test(1, 0, 1);
        config.strategy = crate::events::Strategy::Recreate;
        config.health_deadline = Duration::from_secs(30);
        config.health.start_period = Duration::from_secs(start_period);
        let mut sim = Sim {
            state: State::default(),
            now_ms: 1_000,
            runtime: BTreeMap::new(),
            names: BTreeSet::new(),
            launches: 0,
            config,
            stateful: true,
            stopping: BTreeSet::new(),
            prepared: BTreeSet::new(),
        };
        sim.deploy();
        for op in ops {
            sim.apply(op);
            for _ in 0..8 {
                if !sim.round()? {
                    break;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn phoenix_recycles_only_inside_its_window_and_within_its_budget(
        instances in 1u32..5,
        max_surge in 0u32..3,
        max_unavailable in 0u32..3,
        max_age_s in 1u64..120,
        jitter_s in 0u64..60,
        max_at_once in 1u32..3,
        window in proptest::option::of((0u16..60, 1u16..60)),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut config = ServiceConfig::test(instances, max_surge, max_unavailable);
        config.health_deadline = Duration::from_secs(30);
        config.phoenix = Some(crate::events::PhoenixConfig {
            max_age: Duration::from_secs(max_age_s),
            jitter: Duration::from_secs(jitter_s),
            // Minutes of the sim's first hour (it starts at midnight UTC), some wrapping.
            window: window.map(|(start, length)| crate::events::Window {
                start_minute: start,
                end_minute: (start + length) % 60,
                offset_minutes: 0,
                zone: None,
            }).filter(|w| w.start_minute != w.end_minute),
            max_at_once,
            stop_first: false,
        });
        let mut sim = Sim {
            state: State::default(),
            now_ms: 1_000,
            runtime: BTreeMap::new(),
            names: BTreeSet::new(),
            launches: 0,
            config,
            stateful: false,
            stopping: BTreeSet::new(),
            prepared: BTreeSet::new(),
        };
        sim.deploy();
        for op in ops {
            sim.apply(op);
            for _ in 0..8 {
                if !sim.round()? {
                    break;
                }
            }
        }
    }
}
