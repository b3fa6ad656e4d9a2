//! Drift through the controller, against the in-memory fake runtime (which lets a test plant
//! what a drift check finds) and the real proxy: a drifted instance is condemned with its
//! evidence and replaced surge-first with no failed request; an instance with no drift is
//! never condemned over many checks; the condemn reasons are written as their golden files
//! say (they are part of every user's event log).

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use graven::controller::ControllerHandle;
use graven::events::{CondemnReason, DrainReason, Event, FileChange, Lifecycle};
use graven::runtime::{Drift, FakeRuntime, InstanceId, Runtime};
use support::daemon::{config, free_port, order, outcome, release};

fn start(fake: &FakeRuntime, log: &std::path::Path) -> ControllerHandle {
    support::daemon::fake_controller(fake, log)
}

async fn deploy(controller: &ControllerHandle, route: std::net::SocketAddr) {
    let mut config = config(2, route, &[("VERSION", "v1")]);
    config.drift.interval = Some(Duration::from_millis(100));
    controller
        .deploy(order(vec![release(config)]), "test")
        .await
        .unwrap();
    outcome(controller).await;
}

/// Waits (bounded) for `condition` without blocking a worker thread: a blocked worker can
/// hold the controller's task where no other worker steals it.
async fn wait_until(mut condition: impl FnMut() -> bool, what: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect(what);
}

fn healthy(snapshot: &graven::controller::Snapshot) -> usize {
    snapshot
        .state
        .instances
        .values()
        .filter(|i| i.lifecycle == Lifecycle::Healthy)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_instance_is_condemned_with_its_evidence_and_replaced_before_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let route = free_port();
    deploy(&controller, route).await;
    let load = support::load::Load::start(route, 4);
    wait_until(|| load.snapshot().total > 50, "load running").await;
    let plants = [
        Drift::RootChanged {
            path: "/etc/app.conf".into(),
            change: graven::runtime::FileChange::Content,
            expected: Some("sha256:aa (12 bytes)".into()),
            found: Some("sha256:bb (12 bytes)".into()),
        },
        Drift::ForeignProgram {
            pid: 4242,
            exe: "/tmp/sleeper".into(),
            cmdline: "/tmp/sleeper 600".into(),
        },
    ];
    let mut victims = Vec::new();
    for plant in plants {
        // A serving instance: two healthy and nothing draining.
        let settled = tokio::time::timeout(
            Duration::from_secs(30),
            controller.wait_for(|snap| healthy(snap) == 2 && snap.state.instances.len() == 2),
        )
        .await
        .expect("two healthy instances");
        let victim = settled
            .state
            .instances
            .values()
            .find_map(|i| i.runtime_id.as_ref())
            .map(|id| InstanceId(id.as_str().to_owned()))
            .unwrap();
        fake.plant_drift(&victim, plant).unwrap();
        let gone = victim.clone();
        let replaced = tokio::time::timeout(
            Duration::from_secs(30),
            controller.wait_for(move |snap| {
                healthy(snap) == 2
                    && snap.state.instances.len() == 2
                    && snap
                        .state
                        .instances
                        .values()
                        .all(|i| i.runtime_id.as_ref().map(|r| r.as_str()) != Some(&gone.0))
            }),
        )
        .await;
        if replaced.is_err() {
            let snap = controller.snapshot();
            panic!(
                "the drifted instance {victim} is not replaced: {:#?}\n{:#?}",
                snap.state.instances,
                fake.list().await
            )
        }
        victims.push(victim);
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "clients saw errors: {:?}",
        report.failures
    );
    // The log holds the evidence, and each replacement was launched before its condemned
    // instance drained.
    let history = controller.history(0).await.unwrap();
    let reasons: Vec<&CondemnReason> = history
        .iter()
        .filter_map(|e| match &e.payload {
            Event::InstanceCondemned { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            &CondemnReason::RootChanged {
                path: "/etc/app.conf".into(),
                change: FileChange::Content,
                expected: Some("sha256:aa (12 bytes)".into()),
                found: Some("sha256:bb (12 bytes)".into()),
            },
            &CondemnReason::ForeignProgram {
                pid: 4242,
                exe: "/tmp/sleeper".into(),
                cmdline: "/tmp/sleeper 600".into(),
            },
        ]
    );
    for (condemned, _) in history
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.payload, Event::InstanceCondemned { .. }))
    {
        let drained = history[condemned..]
            .iter()
            .position(|e| {
                matches!(
                    e.payload,
                    Event::InstanceDraining {
                        reason: DrainReason::Condemned { .. },
                        ..
                    }
                )
            })
            .expect("the condemned instance drains")
            + condemned;
        assert!(
            history[condemned..drained]
                .iter()
                .any(|e| matches!(e.payload, Event::InstanceLaunched { .. })),
            "a replacement was launched before the drain"
        );
    }
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_drift_nothing_is_condemned_over_many_checks() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let controller = start(&fake, &dir.path().join("events.db"));
    let route = free_port();
    deploy(&controller, route).await;
    let ids: BTreeSet<InstanceId> = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    // The fake counts the checks it is asked for: many run, and none finds anything.
    let checks = || fake.drift_checks();
    let before = checks();
    wait_until(|| checks() >= before + 20, "20 drift checks").await;
    let history = controller.history(0).await.unwrap();
    assert!(
        !history
            .iter()
            .any(|e| matches!(e.payload, Event::InstanceCondemned { .. })),
        "condemned without drift"
    );
    let now: BTreeSet<InstanceId> = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(now, ids);
    controller.shutdown().await;
}

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/events/v2/condemn_reasons")
}

/// Each drift (and age) reason as the log writes it inside `instance_condemned` (the kind's own
/// golden file holds the first vocabulary's `tainted`); `UPDATE_EXPECT=1` rewrites them.
#[test]
fn condemn_reasons_are_written_as_their_golden_files_say() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let examples = [
        (
            "root_changed",
            CondemnReason::RootChanged {
                path: "/usr/bin/app".into(),
                change: FileChange::Content,
                expected: Some("sha256:5891b5b5 (9 bytes)".into()),
                found: Some("sha256:4ae7c3b6 (9 bytes)".into()),
            },
        ),
        (
            "root_changed_added",
            CondemnReason::RootChanged {
                path: "/etc/cron.d/x".into(),
                change: FileChange::Added,
                expected: None,
                found: Some("file 0644 0:0".into()),
            },
        ),
        (
            "foreign_program",
            CondemnReason::ForeignProgram {
                pid: 4242,
                exe: "/tmp/miner".into(),
                cmdline: "/tmp/miner --pool x".into(),
            },
        ),
        (
            "aged",
            CondemnReason::Aged {
                age: Duration::from_millis(86_412_345),
                max_age: Duration::from_secs(86_400),
            },
        ),
    ];
    let mut stale = Vec::new();
    for (name, reason) in examples {
        let event = Event::InstanceCondemned {
            instance: "web-2-7".into(),
            reason,
        };
        let json = serde_json::to_string_pretty(&event).unwrap() + "\n";
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event, "{name} round trip");
        let path = data().join(format!("{name}.json"));
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &json).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(json.as_str()) {
            stale.push(format!("{}:\n{json}", path.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "stale golden files:\n{}",
        stale.join("\n")
    );
}
