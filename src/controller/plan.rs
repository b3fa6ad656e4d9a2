//! The pure half of the controller: given the folded state, what the runtime was last seen
//! running and the time, decide what to do next. No I/O and no clock of its own; the shell
//! appends each action's event before carrying it out, then plans again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::events::{Event, GoneReason, Lifecycle, State};
use crate::runtime::InstanceId;

/// What the shell knows beyond the log: the runtime's last listing and its own work under way.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// False until the runtime has been listed once; nothing is judged lost or orphaned before.
    pub listed: bool,
    /// This app and environment's instances on the runtime, as last listed.
    pub runtime: Vec<Seen>,
    /// Instances with an effect under way, or started after the listing was taken: the
    /// listing cannot be trusted about them.
    pub busy: BTreeSet<String>,
    /// Runtime instances being stopped or removed.
    pub busy_ids: BTreeSet<InstanceId>,
    /// When this controller started (ms since the epoch). Health deadlines count from here at
    /// the earliest: time a controller was down is not held against a release.
    pub since_ms: u64,
}

/// One runtime instance as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: InstanceId,
    /// The `instance` label: the name the controller gave it.
    pub name: Option<String>,
    /// `Some((code, signal))` once its process is gone.
    pub exited: Option<(Option<i32>, Option<i32>)>,
    pub address: Option<SocketAddr>,
}

/// One decision. Most carry the event that announces them (`Action::event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Launch {
        service: String,
        release: u64,
        instance: String,
    },
    /// A launched instance the runtime runs though no start result was recorded.
    Adopt {
        instance: String,
        runtime_id: InstanceId,
        address: SocketAddr,
    },
    Exited {
        instance: String,
        runtime_id: InstanceId,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The runtime does not have the instance (any more).
    Forget {
        instance: String,
        reason: GoneReason,
    },
    Drain {
        instance: String,
        reason: String,
    },
    /// A draining instance whose stop is not under way (the controller restarted mid-drain).
    ResumeStop {
        instance: String,
    },
    RemoveOrphan {
        runtime_id: InstanceId,
    },
    Backoff {
        service: String,
        failures: u32,
        delay_ms: u64,
        until_ms: u64,
    },
    Succeed {
        service: String,
        release: u64,
    },
    RollBack {
        service: String,
        from: u64,
        to: Option<u64>,
        reason: String,
    },
}

impl Action {
    /// The event that records this decision, appended before the effect.
    pub fn event(&self) -> Option<Event> {
        Some(match self.clone() {
            Action::Launch {
                service,
                release,
                instance,
            } => Event::InstanceLaunched {
                service,
                release,
                instance,
            },
            Action::Adopt {
                instance,
                runtime_id,
                address,
            } => Event::InstanceStarted {
                instance,
                runtime_id,
                address,
            },
            Action::Exited {
                instance,
                code,
                signal,
                ..
            } => Event::InstanceExited {
                instance,
                code,
                signal,
            },
            Action::Forget { instance, reason } => Event::InstanceGone { instance, reason },
            Action::Drain { instance, reason } => Event::InstanceDraining { instance, reason },
            // The drain was recorded when it was decided; this only finishes it.
            Action::ResumeStop { .. } => return None,
            Action::RemoveOrphan { runtime_id } => Event::OrphanRemoved { runtime_id },
            Action::Backoff {
                service,
                failures,
                delay_ms,
                until_ms,
            } => Event::CrashLoopBackoff {
                service,
                failures,
                delay_ms,
                until_ms,
            },
            Action::Succeed { service, release } => Event::DeploySucceeded { service, release },
            Action::RollBack {
                service,
                from,
                to,
                reason,
            } => Event::DeployRolledBack {
                service,
                from,
                to,
                reason,
            },
        })
    }
}

/// A deploy whose new instances failed this many times rolls back before its deadline.
pub const MAX_DEPLOY_FAILURES: u32 = 3;

/// How long launches wait after `failures` consecutive failed instances: the first
/// replacement is immediate, then 0.5 s doubling up to 30 s.
pub fn backoff_delay(failures: u32) -> Duration {
    if failures < 2 {
        return Duration::ZERO;
    }
    let exponent = (failures - 2).min(16);
    Duration::from_millis(500u64.saturating_mul(1 << exponent)).min(Duration::from_secs(30))
}

pub fn plan(state: &State, observed: &Observed, now_ms: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    // Instances the actions so far have taken out of the running.
    let mut gone: BTreeSet<&str> = BTreeSet::new();

    if observed.listed {
        let by_id: BTreeMap<&InstanceId, &Seen> =
            observed.runtime.iter().map(|s| (&s.id, s)).collect();
        let by_name: BTreeMap<&str, &Seen> = observed
            .runtime
            .iter()
            .filter_map(|s| Some((s.name.as_deref()?, s)))
            .collect();
        for instance in state.instances.values() {
            let name = instance.name.as_str();
            if observed.busy.contains(name) {
                continue;
            }
            let draining = instance.lifecycle == Lifecycle::Draining;
            let seen = match &instance.runtime_id {
                Some(id) => by_id.get(id).copied(),
                None => by_name.get(name).copied(),
            };
            match seen {
                None => {
                    gone.insert(name);
                    actions.push(Action::Forget {
                        instance: name.to_owned(),
                        reason: if draining {
                            GoneReason::Stopped
                        } else {
                            GoneReason::Lost
                        },
                    });
                }
                Some(_) if draining => actions.push(Action::ResumeStop {
                    instance: name.to_owned(),
                }),
                Some(seen) => match (seen.exited, instance.runtime_id.is_none(), seen.address) {
                    (Some((code, signal)), _, _) => {
                        gone.insert(name);
                        actions.push(Action::Exited {
                            instance: name.to_owned(),
                            runtime_id: seen.id.clone(),
                            code,
                            signal,
                        });
                    }
                    (None, true, Some(address)) => actions.push(Action::Adopt {
                        instance: name.to_owned(),
                        runtime_id: seen.id.clone(),
                        address,
                    }),
                    (None, true, None) => {
                        // Running but unreachable: nothing can route to it, so stop it.
                        actions.push(Action::RemoveOrphan {
                            runtime_id: seen.id.clone(),
                        });
                        gone.insert(name);
                        actions.push(Action::Forget {
                            instance: name.to_owned(),
                            reason: GoneReason::Lost,
                        });
                    }
                    (None, false, _) => {}
                },
            }
        }
        for seen in &observed.runtime {
            if observed.busy_ids.contains(&seen.id) {
                continue;
            }
            let known = seen
                .name
                .as_deref()
                .and_then(|name| state.instances.get(name))
                .is_some_and(|i| i.runtime_id.as_ref().is_none_or(|id| *id == seen.id));
            if !known {
                actions.push(Action::RemoveOrphan {
                    runtime_id: seen.id.clone(),
                });
            }
        }
    }

    let mut launched = state.launched;
    for instance in state.instances.values() {
        let wanted = state.services.get(&instance.service).and_then(|s| s.wanted);
        if wanted.is_none()
            && instance.lifecycle != Lifecycle::Draining
            && !gone.contains(instance.name.as_str())
        {
            actions.push(Action::Drain {
                instance: instance.name.clone(),
                reason: format!("service {} is removed", instance.service),
            });
        }
    }
    for (service, service_state) in &state.services {
        let Some(wanted) = service_state.wanted else {
            continue;
        };
        let Some(release) = state.releases.get(&wanted) else {
            continue;
        };
        let config = &release.config;
        let desired = state
            .scale(service)
            .map_or(config.instances, |s| s.instances);
        let live: Vec<_> = state
            .instances_of(service)
            .filter(|i| !gone.contains(i.name.as_str()))
            .collect();
        let mut new_count = 0u32;
        let mut new_healthy = 0u32;
        // New instances, not yet healthy ones first: the order surplus ones are drained in.
        let mut new_names: Vec<(bool, String)> = Vec::new();
        let mut old_healthy = Vec::new();
        let mut old_live = 0u32;
        for instance in &live {
            let draining = instance.lifecycle == Lifecycle::Draining;
            if instance.release != wanted {
                old_live += 1;
            }
            if draining {
                continue;
            }
            let drain = |reason: String| Action::Drain {
                instance: instance.name.clone(),
                reason,
            };
            match (instance.release == wanted, instance.lifecycle) {
                (true, Lifecycle::Healthy) => {
                    new_count += 1;
                    new_healthy += 1;
                    new_names.push((true, instance.name.clone()));
                }
                (true, Lifecycle::Unhealthy) => actions.push(drain(format!(
                    "unhealthy: {}",
                    instance
                        .detail
                        .as_deref()
                        .unwrap_or("failed its health check")
                ))),
                (true, Lifecycle::Starting)
                    if now_ms
                        >= instance.launched_at_ms.max(observed.since_ms)
                            + config.health_deadline.as_millis() as u64 =>
                {
                    actions.push(drain(format!(
                        "not healthy within {}",
                        humantime::format_duration(config.health_deadline)
                    )))
                }
                (true, Lifecycle::Starting) => {
                    new_count += 1;
                    new_names.push((false, instance.name.clone()));
                }
                (false, Lifecycle::Healthy) => old_healthy.push(instance.name.clone()),
                (false, Lifecycle::Starting | Lifecycle::Unhealthy) => {
                    actions.push(drain(format!("release {wanted} is wanted")))
                }
                (_, Lifecycle::Draining) => unreachable!("draining instances are skipped above"),
            }
        }

        if let Some(deploy) = service_state.deploy.as_ref().filter(|d| d.to == wanted) {
            let deadline = deploy.started_at_ms.max(observed.since_ms)
                + config.health_deadline.as_millis() as u64;
            let failure = service_state
                .last_failure
                .as_deref()
                .map(|f| format!(" (last: {f})"))
                .unwrap_or_default();
            let reason = if deploy.failures >= MAX_DEPLOY_FAILURES {
                Some(format!(
                    "instances of release {wanted} failed {} times{failure}",
                    deploy.failures
                ))
            } else if now_ms >= deadline && new_healthy < desired {
                Some(format!(
                    "{new_healthy} of {desired} instances of release {wanted} healthy within {}{failure}",
                    humantime::format_duration(config.health_deadline)
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                actions.push(Action::RollBack {
                    service: service.clone(),
                    from: wanted,
                    to: deploy.from,
                    reason,
                });
                continue;
            }
            if new_healthy >= desired && old_live == 0 {
                actions.push(Action::Succeed {
                    service: service.clone(),
                    release: wanted,
                });
            }
        }

        // Scaled down: drain the surplus, instances that are not serving yet first.
        if new_count > desired {
            new_names.sort();
            for (healthy, name) in new_names.iter().take((new_count - desired) as usize) {
                actions.push(Action::Drain {
                    instance: name.clone(),
                    reason: format!("{service} scaled to {desired}"),
                });
                new_count -= 1;
                if *healthy {
                    new_healthy -= 1;
                }
            }
        }

        // Drain old instances while enough stay available; all of them once the new release
        // is fully healthy.
        let min_available = desired.saturating_sub(config.max_unavailable);
        let available = new_healthy + old_healthy.len() as u32;
        let drains = if new_healthy >= desired {
            old_healthy.len() as u32
        } else {
            available
                .saturating_sub(min_available)
                .min(old_healthy.len() as u32)
        };
        for name in old_healthy.iter().take(drains as usize) {
            actions.push(Action::Drain {
                instance: name.clone(),
                reason: format!("replaced by release {wanted}"),
            });
        }

        // Launch new instances within the surge allowance.
        let surge = if config.max_surge == 0 && config.max_unavailable == 0 {
            1
        } else {
            config.max_surge
        };
        let alive = new_count + old_healthy.len() as u32 - drains;
        let launches = desired
            .saturating_sub(new_count)
            .min((desired + surge).saturating_sub(alive));
        if launches == 0 {
            continue;
        }
        let delay = backoff_delay(service_state.failures);
        let until_ms = service_state.last_failure_at_ms + delay.as_millis() as u64;
        if now_ms < until_ms {
            if service_state.backoff.as_ref().map(|b| b.until_ms) != Some(until_ms) {
                actions.push(Action::Backoff {
                    service: service.clone(),
                    failures: service_state.failures,
                    delay_ms: delay.as_millis() as u64,
                    until_ms,
                });
            }
            continue;
        }
        for _ in 0..launches {
            launched += 1;
            actions.push(Action::Launch {
                service: service.clone(),
                release: wanted,
                instance: format!("{service}-{wanted}-{launched}"),
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;
    use crate::events::Envelope;
    use crate::events::{DeployReason, ServiceConfig, fold};
    use crate::store::Digest;

    /// A tiny script for building a state: each step is one event at `at` seconds.
    #[derive(Clone)]
    enum Step {
        Release(u64, ServiceConfig),
        Deploy(Option<u64>, u64),
        Instance(&'static str, u64, Lifecycle),
        Ev(Event),
    }
    use Step::*;

    fn state(steps: Vec<(u64, Step)>) -> State {
        let mut events = Vec::new();
        for (at, step) in steps {
            let mut push = |e| events.push((at, e));
            match step {
                Release(number, config) => push(Event::ReleaseCreated {
                    service: "web".into(),
                    number,
                    image: Digest::of(b"x"),
                    config_digest: format!("c{number}"),
                    config,
                }),
                Deploy(from, to) => push(Event::DeployStarted {
                    service: "web".into(),
                    from,
                    to,
                    reason: DeployReason::Deploy,
                }),
                Instance(name, release, lifecycle) => {
                    push(Event::InstanceLaunched {
                        service: "web".into(),
                        release,
                        instance: name.into(),
                    });
                    push(Event::InstanceStarted {
                        instance: name.into(),
                        runtime_id: InstanceId(format!("rt-{name}")),
                        address: SocketAddr::from(([127, 0, 0, 1], 1)),
                    });
                    match lifecycle {
                        Lifecycle::Starting => {}
                        Lifecycle::Healthy => push(Event::InstanceHealthy {
                            instance: name.into(),
                        }),
                        Lifecycle::Unhealthy => push(Event::InstanceUnhealthy {
                            instance: name.into(),
                            detail: "status 503".into(),
                        }),
                        Lifecycle::Draining => push(Event::InstanceDraining {
                            instance: name.into(),
                            reason: "test".into(),
                        }),
                    }
                }
                Ev(e) => push(e),
            }
        }
        events
            .into_iter()
            .enumerate()
            .fold(State::default(), |s, (i, (at, payload))| {
                fold(
                    s,
                    &Envelope {
                        seq: i as u64 + 1,
                        at_ms: at * 1000,
                        actor: "test".into(),
                        version: 1,
                        payload,
                    },
                )
            })
    }

    /// Every instance in the state is on the runtime and running, unless `observed` says more.
    fn running(state: &State) -> Observed {
        Observed {
            listed: true,
            runtime: state
                .instances
                .values()
                .map(|i| Seen {
                    id: InstanceId(format!("rt-{}", i.name)),
                    name: Some(i.name.clone()),
                    exited: None,
                    address: i.address,
                })
                .collect(),
            ..Observed::default()
        }
    }

    fn check(state: &State, observed: &Observed, now_s: u64, expected: Expect) {
        let actions = plan(state, observed, now_s * 1000);
        let text: String = actions.iter().map(|a| format!("{a:?}\n")).collect();
        expected.assert_eq(&text);
    }

    #[test]
    fn first_deploy_launches_up_to_the_desired_count() {
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(3, 1, 0))),
            (1, Deploy(None, 1)),
        ]);
        check(
            &s,
            &running(&s),
            2,
            expect![[r#"
                Launch { service: "web", release: 1, instance: "web-1-1" }
                Launch { service: "web", release: 1, instance: "web-1-2" }
                Launch { service: "web", release: 1, instance: "web-1-3" }
            "#]],
        );
    }

    #[test]
    fn healthy_service_needs_nothing_and_a_finished_deploy_succeeds() {
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(2, 1, 0))),
            (1, Deploy(None, 1)),
            (2, Instance("a", 1, Lifecycle::Healthy)),
            (2, Instance("b", 1, Lifecycle::Healthy)),
        ]);
        check(
            &s,
            &running(&s),
            3,
            expect![[r#"
                Succeed { service: "web", release: 1 }
            "#]],
        );
    }

    fn rolling(surge: u32, unavailable: u32, new: &[(&'static str, Lifecycle)]) -> State {
        let mut steps = vec![
            (1, Release(1, ServiceConfig::test(4, surge, unavailable))),
            (1, Deploy(None, 1)),
            (1, Instance("o1", 1, Lifecycle::Healthy)),
            (1, Instance("o2", 1, Lifecycle::Healthy)),
            (1, Instance("o3", 1, Lifecycle::Healthy)),
            (1, Instance("o4", 1, Lifecycle::Healthy)),
            (
                1,
                Ev(Event::DeploySucceeded {
                    service: "web".into(),
                    release: 1,
                }),
            ),
            (10, Release(2, ServiceConfig::test(4, surge, unavailable))),
            (10, Deploy(Some(1), 2)),
        ];
        for (name, lifecycle) in new {
            steps.push((11, Instance(name, 2, *lifecycle)));
        }
        state(steps)
    }

    #[test]
    fn rolling_deploy_surges_first_and_drains_only_after_a_new_instance_is_healthy() {
        let s = rolling(1, 0, &[]);
        check(
            &s,
            &running(&s),
            11,
            expect![[r#"
                Launch { service: "web", release: 2, instance: "web-2-5" }
            "#]],
        );
        let s = rolling(1, 0, &[("n1", Lifecycle::Starting)]);
        check(&s, &running(&s), 11, expect![""]);
        let s = rolling(1, 0, &[("n1", Lifecycle::Healthy)]);
        check(
            &s,
            &running(&s),
            11,
            expect![[r#"
                Drain { instance: "o1", reason: "replaced by release 2" }
                Launch { service: "web", release: 2, instance: "web-2-6" }
            "#]],
        );
    }

    #[test]
    fn max_surge_and_max_unavailable_widen_the_step() {
        let s = rolling(2, 0, &[]);
        check(
            &s,
            &running(&s),
            11,
            expect![[r#"
                Launch { service: "web", release: 2, instance: "web-2-5" }
                Launch { service: "web", release: 2, instance: "web-2-6" }
            "#]],
        );
        let s = rolling(0, 1, &[]);
        check(
            &s,
            &running(&s),
            11,
            expect![[r#"
                Drain { instance: "o1", reason: "replaced by release 2" }
                Launch { service: "web", release: 2, instance: "web-2-5" }
            "#]],
        );
    }

    #[test]
    fn full_new_release_drains_every_old_instance_and_then_succeeds() {
        let all = [
            ("n1", Lifecycle::Healthy),
            ("n2", Lifecycle::Healthy),
            ("n3", Lifecycle::Healthy),
            ("n4", Lifecycle::Healthy),
        ];
        let s = rolling(1, 0, &all);
        check(
            &s,
            &running(&s),
            12,
            expect![[r#"
                Drain { instance: "o1", reason: "replaced by release 2" }
                Drain { instance: "o2", reason: "replaced by release 2" }
                Drain { instance: "o3", reason: "replaced by release 2" }
                Drain { instance: "o4", reason: "replaced by release 2" }
            "#]],
        );
        let mut steps = vec![
            (1, Release(1, ServiceConfig::test(1, 1, 0))),
            (1, Deploy(None, 1)),
            (1, Instance("o1", 1, Lifecycle::Draining)),
            (10, Release(2, ServiceConfig::test(1, 1, 0))),
            (10, Deploy(Some(1), 2)),
            (11, Instance("n1", 2, Lifecycle::Healthy)),
        ];
        let s = state(steps.clone());
        let mut busy = running(&s);
        busy.busy.insert("o1".into());
        check(&s, &busy, 12, expect![""]);
        steps.push((
            12,
            Ev(Event::InstanceGone {
                instance: "o1".into(),
                reason: GoneReason::Stopped,
            }),
        ));
        let s = state(steps);
        check(
            &s,
            &running(&s),
            12,
            expect![[r#"
                Succeed { service: "web", release: 2 }
            "#]],
        );
    }

    #[test]
    fn a_release_that_never_gets_healthy_rolls_back_at_its_deadline() {
        let s = rolling(1, 0, &[("n1", Lifecycle::Starting)]);
        check(&s, &running(&s), 39, expect![""]);
        check(
            &s,
            &running(&s),
            40,
            expect![[r#"
                RollBack { service: "web", from: 2, to: Some(1), reason: "0 of 4 instances of release 2 healthy within 30s" }
            "#]],
        );
    }

    #[test]
    fn time_the_controller_was_down_does_not_count_against_the_deadline() {
        let s = rolling(1, 0, &[("n1", Lifecycle::Starting)]);
        let mut observed = running(&s);
        observed.since_ms = 35_000;
        check(&s, &observed, 64, expect![""]);
        check(
            &s,
            &observed,
            65,
            expect![[r#"
                Drain { instance: "n1", reason: "not healthy within 30s" }
                RollBack { service: "web", from: 2, to: Some(1), reason: "0 of 4 instances of release 2 healthy within 30s" }
            "#]],
        );
    }

    #[test]
    fn a_release_whose_instances_keep_failing_rolls_back_early() {
        let mut steps = vec![
            (1, Release(1, ServiceConfig::test(1, 1, 0))),
            (1, Deploy(None, 1)),
            (1, Instance("o1", 1, Lifecycle::Healthy)),
            (10, Release(2, ServiceConfig::test(1, 1, 0))),
            (10, Deploy(Some(1), 2)),
        ];
        for name in ["n1", "n2", "n3"] {
            steps.push((11, Instance(name, 2, Lifecycle::Starting)));
            steps.push((
                11,
                Ev(Event::InstanceExited {
                    instance: name.into(),
                    code: Some(3),
                    signal: None,
                }),
            ));
        }
        let s = state(steps);
        check(
            &s,
            &running(&s),
            12,
            expect![[r#"
                RollBack { service: "web", from: 2, to: Some(1), reason: "instances of release 2 failed 3 times (last: instance n3 exited (code 3))" }
            "#]],
        );
    }

    #[test]
    fn after_a_rollback_the_unwanted_new_instances_are_drained() {
        let mut s = rolling(1, 0, &[("n1", Lifecycle::Starting)]);
        s = fold(
            s,
            &Envelope {
                seq: 99,
                at_ms: 40_000,
                actor: "t".into(),
                version: 1,
                payload: Event::DeployRolledBack {
                    service: "web".into(),
                    from: 2,
                    to: Some(1),
                    reason: "x".into(),
                },
            },
        );
        check(
            &s,
            &running(&s),
            41,
            expect![[r#"
                Drain { instance: "n1", reason: "release 1 is wanted" }
            "#]],
        );
    }

    #[test]
    fn crashed_and_unhealthy_instances_are_replaced_with_backoff() {
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(2, 1, 0))),
            (1, Deploy(None, 1)),
            (1, Instance("a", 1, Lifecycle::Healthy)),
            (1, Instance("b", 1, Lifecycle::Healthy)),
        ]);
        let mut observed = running(&s);
        observed.runtime[0].exited = Some((None, Some(9)));
        check(
            &s,
            &observed,
            5,
            expect![[r#"
                Exited { instance: "a", runtime_id: InstanceId("rt-a"), code: None, signal: Some(9) }
                Launch { service: "web", release: 1, instance: "web-1-3" }
            "#]],
        );
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(1, 1, 0))),
            (1, Deploy(None, 1)),
            (1, Instance("a", 1, Lifecycle::Unhealthy)),
            (2, Instance("b", 1, Lifecycle::Unhealthy)),
        ]);
        // Two failures in a row: the next launch waits half a second after the last one.
        check(
            &s,
            &running(&s),
            2,
            expect![[r#"
                Drain { instance: "a", reason: "unhealthy: status 503" }
                Drain { instance: "b", reason: "unhealthy: status 503" }
                Backoff { service: "web", failures: 2, delay_ms: 500, until_ms: 2500 }
            "#]],
        );
        check(
            &s,
            &running(&s),
            3,
            expect![[r#"
                Drain { instance: "a", reason: "unhealthy: status 503" }
                Drain { instance: "b", reason: "unhealthy: status 503" }
                Launch { service: "web", release: 1, instance: "web-1-3" }
            "#]],
        );
        assert_eq!(backoff_delay(1), Duration::ZERO);
        assert_eq!(backoff_delay(4), Duration::from_secs(2));
        assert_eq!(backoff_delay(40), Duration::from_secs(30));
    }

    #[test]
    fn restart_reconciles_from_the_runtime_listing() {
        // The log says: a launched (no start recorded), b started, c draining, d started.
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(3, 1, 0))),
            (1, Deploy(None, 1)),
            (
                1,
                Ev(Event::InstanceLaunched {
                    service: "web".into(),
                    release: 1,
                    instance: "a".into(),
                }),
            ),
            (1, Instance("b", 1, Lifecycle::Healthy)),
            (1, Instance("c", 1, Lifecycle::Draining)),
            (1, Instance("d", 1, Lifecycle::Healthy)),
        ]);
        let seen = |id: &str, name: Option<&str>| Seen {
            id: InstanceId(id.into()),
            name: name.map(str::to_owned),
            exited: None,
            address: Some(SocketAddr::from(([127, 0, 0, 1], 7))),
        };
        // The runtime runs a (unrecorded start), b, c, and a stranger; d is missing.
        let observed = Observed {
            listed: true,
            runtime: vec![
                seen("rt-a", Some("a")),
                seen("rt-b", Some("b")),
                seen("rt-c", Some("c")),
                seen("rt-x", Some("x")),
                seen("rt-y", None),
            ],
            ..Observed::default()
        };
        check(
            &s,
            &observed,
            2,
            expect![[r#"
                Adopt { instance: "a", runtime_id: InstanceId("rt-a"), address: 127.0.0.1:7 }
                ResumeStop { instance: "c" }
                Forget { instance: "d", reason: Lost }
                RemoveOrphan { runtime_id: InstanceId("rt-x") }
                RemoveOrphan { runtime_id: InstanceId("rt-y") }
                Launch { service: "web", release: 1, instance: "web-1-5" }
            "#]],
        );
        // Before the first listing nothing is judged.
        check(&s, &Observed::default(), 2, expect![""]);
    }

    #[test]
    fn scaling_down_drains_the_surplus_not_yet_serving_first() {
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(3, 1, 0))),
            (1, Deploy(None, 1)),
            (1, Instance("a", 1, Lifecycle::Healthy)),
            (1, Instance("b", 1, Lifecycle::Starting)),
            (1, Instance("c", 1, Lifecycle::Healthy)),
            (
                2,
                Ev(Event::ServiceScaled {
                    service: "web".into(),
                    instances: 1,
                    route: None,
                }),
            ),
        ]);
        check(
            &s,
            &running(&s),
            3,
            expect![[r#"
                Succeed { service: "web", release: 1 }
                Drain { instance: "b", reason: "web scaled to 1" }
                Drain { instance: "a", reason: "web scaled to 1" }
            "#]],
        );
    }

    #[test]
    fn removed_service_drains_everything() {
        let s = state(vec![
            (1, Release(1, ServiceConfig::test(1, 1, 0))),
            (1, Deploy(None, 1)),
            (1, Instance("a", 1, Lifecycle::Healthy)),
            (
                2,
                Ev(Event::ServiceRemoved {
                    service: "web".into(),
                }),
            ),
        ]);
        check(
            &s,
            &running(&s),
            3,
            expect![[r#"
                Drain { instance: "a", reason: "service web is removed" }
            "#]],
        );
    }
}
