//! The planner's tables: states built from events, the plan each gives.
use expect_test::{Expect, expect};

use super::*;
use crate::events::Envelope;
use crate::events::{DeployReason, RuntimeId, ServiceConfig, fold};
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
                release: ReleaseNumber(number),
                image: Digest::of(b"x"),
                config_digest: format!("c{number}"),
                config,
                source: None,
            }),
            Deploy(from, to) => push(Event::DeployStarted {
                service: "web".into(),
                from: from.map(ReleaseNumber),
                to: ReleaseNumber(to),
                reason: DeployReason::Deploy,
            }),
            Instance(name, release, lifecycle) => {
                push(Event::InstanceLaunched {
                    service: "web".into(),
                    release: ReleaseNumber(release),
                    instance: name.into(),
                });
                push(Event::InstanceStarted {
                    instance: name.into(),
                    runtime_id: RuntimeId(format!("rt-{name}")),
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
                        reason: DrainReason::Recorded {
                            text: "test".into(),
                        },
                    }),
                }
            }
            Ev(e) => push(e),
        }
    }
    let state = events
        .into_iter()
        .enumerate()
        .fold(State::default(), |s, (i, (at, payload))| {
            fold(
                s,
                &Envelope {
                    seq: i as u64 + 1,
                    at_ms: at * 1000,
                    actor: "test".into(),
                    version: 2,
                    payload,
                },
            )
        });
    // The controller has routed what is healthy, as the planner decided in earlier rounds.
    let routes = super::traffic::decide(&state, &Default::default());
    routes.into_iter().fold(state, |s, route| {
        let envelope = Envelope {
            seq: s.seq + 1,
            at_ms: 0,
            actor: "test".into(),
            version: 2,
            payload: route.event().expect("a route is an event"),
        };
        fold(s, &envelope)
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
                id: RuntimeId(format!("rt-{}", i.name)),
                name: Some(i.name.clone()),
                exited: None,
                address: i.address,
                tainted: false,
                drift: None,
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
                release: ReleaseNumber(1),
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
            Route { service: "web", routed: {"n1": 1, "o2": 1, "o3": 1, "o4": 1} }
            Drain { instance: "o1", reason: Replaced { by: 2 } }
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
            Route { service: "web", routed: {"o2": 1, "o3": 1, "o4": 1} }
            Drain { instance: "o1", reason: Replaced { by: 2 } }
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
            Route { service: "web", routed: {"n1": 1, "n2": 1, "n3": 1, "n4": 1} }
            Drain { instance: "o1", reason: Replaced { by: 2 } }
            Drain { instance: "o2", reason: Replaced { by: 2 } }
            Drain { instance: "o3", reason: Replaced { by: 2 } }
            Drain { instance: "o4", reason: Replaced { by: 2 } }
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
            RollBack { service: "web", from: 2, to: Some(1), reason: NotHealthyInTime { healthy: 0, desired: 4, deadline: 30s, last_failure: None } }
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
            Drain { instance: "n1", reason: NotHealthyInTime { deadline: 30s } }
            RollBack { service: "web", from: 2, to: Some(1), reason: NotHealthyInTime { healthy: 0, desired: 4, deadline: 30s, last_failure: None } }
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
            RollBack { service: "web", from: 2, to: Some(1), reason: TooManyFailures { failures: 3, last_failure: Some("instance n3 exited (code 3)") } }
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
                from: ReleaseNumber(2),
                to: Some(ReleaseNumber(1)),
                reason: RollbackReason::Recorded { text: "x".into() },
            },
        },
    );
    check(
        &s,
        &running(&s),
        41,
        expect![[r#"
            Drain { instance: "n1", reason: NotWanted { wanted: 1 } }
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
            Route { service: "web", routed: {"b": 1} }
            Exited { instance: "a", runtime_id: "rt-a", code: None, signal: Some(9) }
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
            Drain { instance: "a", reason: Unhealthy { detail: Some("status 503") } }
            Drain { instance: "b", reason: Unhealthy { detail: Some("status 503") } }
            Backoff { service: "web", failures: 2, delay_ms: 500, until_ms: 2500 }
        "#]],
    );
    check(
        &s,
        &running(&s),
        3,
        expect![[r#"
            Drain { instance: "a", reason: Unhealthy { detail: Some("status 503") } }
            Drain { instance: "b", reason: Unhealthy { detail: Some("status 503") } }
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
                release: ReleaseNumber(1),
                instance: "a".into(),
            }),
        ),
        (1, Instance("b", 1, Lifecycle::Healthy)),
        (1, Instance("c", 1, Lifecycle::Draining)),
        (1, Instance("d", 1, Lifecycle::Healthy)),
    ]);
    let seen = |id: &str, name: Option<&str>| Seen {
        id: RuntimeId(id.into()),
        name: name.map(InstanceName::from),
        exited: None,
        address: Some(SocketAddr::from(([127, 0, 0, 1], 7))),
        tainted: false,
        drift: None,
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
            Route { service: "web", routed: {"b": 1} }
            Adopt { instance: "a", runtime_id: "rt-a", address: 127.0.0.1:7 }
            ResumeStop { instance: "c" }
            Forget { instance: "d", reason: Lost }
            RemoveOrphan { runtime_id: "rt-x" }
            RemoveOrphan { runtime_id: "rt-y" }
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
            Route { service: "web", routed: {"c": 1} }
            Succeed { service: "web", release: 1 }
            Drain { instance: "b", reason: ScaledDown { to: 1 } }
            Drain { instance: "a", reason: ScaledDown { to: 1 } }
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
            Route { service: "web", routed: {} }
            Drain { instance: "a", reason: ServiceRemoved }
        "#]],
    );
}

/// A service of three healthy instances launched at 1 s, their deploy done, with a phoenix
/// table; `more` are steps after.
fn aged(config: ServiceConfig, more: Vec<(u64, Step)>) -> State {
    let mut steps = vec![
        (1, Release(1, config)),
        (1, Deploy(None, 1)),
        (1, Instance("a", 1, Lifecycle::Healthy)),
        (1, Instance("b", 1, Lifecycle::Healthy)),
        (1, Instance("c", 1, Lifecycle::Healthy)),
        (
            1,
            Ev(Event::DeploySucceeded {
                service: "web".into(),
                release: ReleaseNumber(1),
            }),
        ),
    ];
    steps.extend(more);
    state(steps)
}

fn phoenix_config(
    max_age_s: u64,
    window: Option<crate::events::Window>,
) -> crate::events::PhoenixConfig {
    crate::events::PhoenixConfig {
        max_age: Duration::from_secs(max_age_s),
        jitter: Duration::ZERO,
        window,
        max_at_once: 1,
        stop_first: false,
    }
}

fn with_phoenix(
    instances: u32,
    surge: u32,
    unavailable: u32,
    phoenix: crate::events::PhoenixConfig,
) -> ServiceConfig {
    ServiceConfig {
        phoenix: Some(phoenix),
        ..ServiceConfig::test(instances, surge, unavailable)
    }
}

#[test]
fn an_instance_past_its_age_is_condemned_one_at_a_time_and_replaced_surge_first() {
    let s = aged(with_phoenix(3, 1, 0, phoenix_config(60, None)), vec![]);
    // Launched at 1 s with a max_age of 60 s: due at 61 s, not before.
    check(&s, &running(&s), 60, expect![""]);
    check(
        &s,
        &running(&s),
        61,
        expect![[r#"
            Condemn { instance: "a", reason: Aged { age: 60s, max_age: 60s } }
        "#]],
    );
    // Condemned: the replacement is launched beside it (no drain), and no other recycle
    // starts while it is in flight.
    let s = aged(
        with_phoenix(3, 1, 0, phoenix_config(60, None)),
        vec![(
            61,
            Ev(Event::InstanceCondemned {
                instance: "a".into(),
                reason: CondemnReason::Aged {
                    age: Duration::from_secs(60),
                    max_age: Duration::from_secs(60),
                },
            }),
        )],
    );
    check(
        &s,
        &running(&s),
        62,
        expect![[r#"
            Launch { service: "web", release: 1, instance: "web-1-4" }
        "#]],
    );
    // max_at_once = 2: two in flight, the third waits.
    let mut two = phoenix_config(60, None);
    two.max_at_once = 2;
    let s = aged(with_phoenix(3, 1, 0, two), vec![]);
    check(
        &s,
        &running(&s),
        61,
        expect![[r#"
            Condemn { instance: "a", reason: Aged { age: 60s, max_age: 60s } }
            Condemn { instance: "b", reason: Aged { age: 60s, max_age: 60s } }
        "#]],
    );
}

#[test]
fn a_condemned_instance_serves_until_its_replacement_does_even_with_max_unavailable() {
    // max_unavailable = 1 is a rollout's allowance to run short; a condemned instance of the
    // wanted release is not drained on it while the service may surge.
    let condemn = |name: &'static str| {
        Ev(Event::InstanceCondemned {
            instance: name.into(),
            reason: CondemnReason::Tainted,
        })
    };
    let s = aged(ServiceConfig::test(3, 1, 1), vec![(5, condemn("a"))]);
    check(
        &s,
        &running(&s),
        6,
        expect![[r#"
            Launch { service: "web", release: 1, instance: "web-1-4" }
        "#]],
    );
    let s = aged(
        ServiceConfig::test(3, 1, 1),
        vec![(5, condemn("a")), (6, Instance("d", 1, Lifecycle::Healthy))],
    );
    check(
        &s,
        &running(&s),
        7,
        expect![[r#"
            Route { service: "web", routed: {"b": 1, "c": 1, "d": 1} }
            Drain { instance: "a", reason: Condemned { reason: Tainted } }
        "#]],
    );
    // A service that may not surge has no other way: it runs short within its allowance.
    let s = aged(ServiceConfig::test(3, 0, 1), vec![(5, condemn("a"))]);
    check(
        &s,
        &running(&s),
        6,
        expect![[r#"
            Route { service: "web", routed: {"b": 1, "c": 1} }
            Drain { instance: "a", reason: Condemned { reason: Tainted } }
            Launch { service: "web", release: 1, instance: "web-1-4" }
        "#]],
    );
}

#[test]
fn aged_instances_are_recycled_only_inside_the_window_and_within_the_budget() {
    let window = |start: u16, end: u16, zone: Option<&str>| crate::events::Window {
        start_minute: start,
        end_minute: end,
        offset_minutes: 0,
        zone: zone.map(str::to_owned),
    };
    // 100 000 s after the epoch is 03:46:40 UTC, 04:46:40 in Paris (winter).
    let now = 100_000;
    let plan_at = |w: crate::events::Window, zones: &[&str]| {
        let s = aged(with_phoenix(3, 1, 0, phoenix_config(60, Some(w))), vec![]);
        let mut observed = running(&s);
        for zone in zones {
            observed
                .zones
                .insert((*zone).to_owned(), jiff::tz::TimeZone::get(zone).unwrap());
        }
        plan(&s, &observed, now * 1000).len()
    };
    assert_eq!(
        plan_at(window(3 * 60, 4 * 60, None), &[]),
        1,
        "03:00-04:00 UTC"
    );
    assert_eq!(
        plan_at(window(4 * 60, 5 * 60, None), &[]),
        0,
        "04:00-05:00 UTC"
    );
    assert_eq!(
        plan_at(window(23 * 60, 4 * 60, None), &[]),
        1,
        "wraps midnight"
    );
    assert_eq!(
        plan_at(window(23 * 60, 3 * 60, None), &[]),
        0,
        "wraps, ends before"
    );
    let paris = Some("Europe/Paris");
    assert_eq!(plan_at(window(4 * 60, 5 * 60, paris), &["Europe/Paris"]), 1);
    assert_eq!(plan_at(window(3 * 60, 4 * 60, paris), &["Europe/Paris"]), 0);
    // A zone the shell did not find: never open.
    assert_eq!(plan_at(window(4 * 60, 5 * 60, paris), &[]), 0);
    // A fixed offset: 04:46:40 at +01:00, 02:46:40 at -01:00.
    let offset = |start: u16, end: u16, minutes: i32| crate::events::Window {
        offset_minutes: minutes,
        ..window(start, end, None)
    };
    assert_eq!(plan_at(offset(4 * 60, 5 * 60, 60), &[]), 1, "+01:00");
    assert_eq!(plan_at(offset(3 * 60, 4 * 60, 60), &[]), 0, "+01:00");
    assert_eq!(plan_at(offset(2 * 60, 3 * 60, -60), &[]), 1, "-01:00");

    // A rollout under way: nothing is recycled meanwhile.
    let s = aged(
        with_phoenix(3, 1, 0, phoenix_config(60, None)),
        vec![
            (
                70,
                Release(2, with_phoenix(3, 1, 0, phoenix_config(60, None))),
            ),
            (70, Deploy(Some(1), 2)),
        ],
    );
    assert!(
        !plan(&s, &running(&s), 71_000)
            .iter()
            .any(|a| matches!(a, Action::Condemn { .. })),
    );
    // One instance unhealthy and no instance may be missing: the budget is spent.
    let s = aged(
        with_phoenix(3, 1, 0, phoenix_config(60, None)),
        vec![(
            30,
            Ev(Event::InstanceUnhealthy {
                instance: "c".into(),
                detail: "status 503".into(),
            }),
        )],
    );
    assert!(
        !plan(&s, &running(&s), 61_000)
            .iter()
            .any(|a| matches!(a, Action::Condemn { .. })),
    );
}

#[test]
fn a_stop_first_service_is_recycled_only_when_it_opts_in() {
    let stateful = |stop_first: bool| {
        let mut phoenix = phoenix_config(60, None);
        phoenix.stop_first = stop_first;
        ServiceConfig {
            strategy: crate::events::Strategy::Recreate,
            phoenix: Some(phoenix),
            ..ServiceConfig::test(1, 0, 0)
        }
    };
    let one = |config| {
        state(vec![
            (1, Release(1, config)),
            (1, Deploy(None, 1)),
            (1, Instance("a", 1, Lifecycle::Healthy)),
            (
                1,
                Ev(Event::DeploySucceeded {
                    service: "web".into(),
                    release: ReleaseNumber(1),
                }),
            ),
        ])
    };
    let s = one(stateful(false));
    check(&s, &running(&s), 1000, expect![""]);
    let s = one(stateful(true));
    check(
        &s,
        &running(&s),
        1000,
        expect![[r#"
            Condemn { instance: "a", reason: Aged { age: 999s, max_age: 60s } }
        "#]],
    );
}

#[test]
fn jitter_spreads_due_times_by_name_the_same_way_every_time() {
    let mut config = phoenix_config(60, None);
    config.jitter = Duration::from_secs(30);
    let offsets: Vec<u64> = ["web-1-1", "web-1-2", "web-1-3", "web-1-4"]
        .iter()
        .map(|name| phoenix::offset_ms(name, &config))
        .collect();
    assert!(offsets.iter().all(|o| *o < 30_000), "{offsets:?}");
    let distinct: BTreeSet<_> = offsets.iter().collect();
    assert_eq!(distinct.len(), offsets.len(), "{offsets:?}");
    assert_eq!(offsets[0], phoenix::offset_ms("web-1-1", &config));
    config.jitter = Duration::ZERO;
    assert_eq!(phoenix::offset_ms("web-1-1", &config), 0);
}
