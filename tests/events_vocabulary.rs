//! The event log's vocabulary is a format users' logs keep for ever: one golden JSON file per
//! kind of event under `tests/data/events/v2/` pins how each is written (a change to one is a
//! change to every log, made on purpose: `UPDATE_EXPECT=1` rewrites them), every kind name is
//! its serde tag, and a log written by graven's first vocabulary (a fixture made by that
//! version) is read, upcast, into today's events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use graven::events::{
    CondemnReason, DeployOutcome, DeployReason, DrainReason, Event, EventKind, EventLog,
    GoneReason, KINDS, ReleaseNumber, RollbackReason, RuntimeId, ServiceConfig, Source, replay,
};
use graven::store::Digest;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/events")
}

/// One event of every kind, as a service's life writes them.
fn examples() -> Vec<Event> {
    let project = graven::spec::parse(
        &std::fs::read_to_string(data().join("../../../examples/hello/graven.toml")).unwrap(),
        std::path::Path::new("/project/graven.toml"),
        std::path::Path::new("/project"),
        "local",
    )
    .unwrap();
    let config = ServiceConfig::from(&project.services["web"]);
    let web = || "web".into();
    let instance = || "web-2-7".into();
    vec![
        Event::ReleaseCreated {
            service: web(),
            release: ReleaseNumber(2),
            image: Digest::of(b"image"),
            config_digest: config.digest().to_string(),
            config,
            source: Some(Source {
                host: "build-1".into(),
                dir: "/project".into(),
            }),
        },
        Event::DeployStarted {
            service: web(),
            from: Some(ReleaseNumber(1)),
            to: ReleaseNumber(2),
            reason: DeployReason::Deploy,
        },
        Event::DeploySucceeded {
            service: web(),
            release: ReleaseNumber(2),
        },
        Event::DeployRolledBack {
            service: web(),
            from: ReleaseNumber(2),
            to: Some(ReleaseNumber(1)),
            reason: RollbackReason::NotHealthyInTime {
                healthy: 1,
                desired: 2,
                deadline: Duration::from_secs(30),
                last_failure: Some("instance web-2-7 unhealthy: status 503".into()),
            },
        },
        Event::InstanceLaunched {
            service: web(),
            release: ReleaseNumber(2),
            instance: instance(),
        },
        Event::InstanceStarted {
            instance: instance(),
            runtime_id: RuntimeId::new("0f3a9c2e"),
            address: "127.0.0.1:40000".parse().unwrap(),
        },
        Event::InstanceHealthy {
            instance: instance(),
        },
        Event::InstanceUnhealthy {
            instance: instance(),
            detail: "status 503".into(),
        },
        Event::InstanceCondemned {
            instance: instance(),
            reason: CondemnReason::Tainted,
        },
        Event::InstanceDraining {
            instance: instance(),
            reason: DrainReason::Replaced {
                by: ReleaseNumber(3),
            },
        },
        Event::InstanceExited {
            instance: instance(),
            code: Some(1),
            signal: None,
        },
        Event::InstanceGone {
            instance: instance(),
            reason: GoneReason::StartFailed {
                error: "image sha256:… is not in the store".into(),
            },
        },
        Event::TrafficChanged {
            service: web(),
            routed: BTreeMap::from([(instance(), 1), ("web-2-8".into(), 1)]),
        },
        Event::OrphanRemoved {
            runtime_id: RuntimeId::new("77aa01"),
        },
        Event::CrashLoopBackoff {
            service: web(),
            failures: 3,
            delay_ms: 1000,
            until_ms: 1_700_000_001_000,
        },
        Event::ServiceScaled {
            service: web(),
            instances: 4,
            route: Some("127.0.0.1:8000".parse().unwrap()),
        },
        Event::ServiceRemoved { service: web() },
        Event::HistoryLost {
            kept_through: 12,
            lost_through: 17,
        },
        Event::LogUnwritable {
            since_ms: 1_700_000_000_000,
            error: "No space left on device (os error 28)".into(),
        },
        Event::ChaosConfigured {
            config: Some(graven::chaos::ChaosConfig {
                window: Some(graven::chaos::Window::parse("09:00-17:00 +01:00").unwrap()),
                exempt: vec!["db".into()],
                kinds: vec![graven::chaos::Kind::Stop, graven::chaos::Kind::Latency],
                seed: Some(7),
                ..Default::default()
            }),
        },
        Event::ChaosStarted {
            experiment: 4,
            service: web(),
            instance: Some(instance()),
            action: graven::chaos::Action::Stop,
            duration: Duration::from_secs(30),
            leashed: false,
            scheduled: true,
            baseline: Some(graven::chaos::Seen {
                requests: 5210,
                errors: 2,
                injected: 0,
                p50_us: 1_000,
                p99_us: 10_000,
            }),
        },
        Event::ChaosEnded {
            experiment: 4,
            outcome: graven::events::ChaosOutcome::Aborted {
                broken: graven::chaos::Broken::ErrorRate {
                    rate_ppm: 250_000,
                    baseline_ppm: 400,
                    requests: 812,
                },
                paused_until_ms: 1_700_001_800_000,
            },
            seen: graven::chaos::Seen {
                requests: 1630,
                errors: 201,
                injected: 0,
                p50_us: 1_000,
                p99_us: 20_000,
            },
        },
    ]
}

/// Names every variant: a new kind of event does not compile until it has an example.
fn covered(event: &Event) -> &'static str {
    match event {
        Event::ReleaseCreated { .. }
        | Event::DeployStarted { .. }
        | Event::DeploySucceeded { .. }
        | Event::DeployRolledBack { .. }
        | Event::InstanceLaunched { .. }
        | Event::InstanceStarted { .. }
        | Event::InstanceHealthy { .. }
        | Event::InstanceUnhealthy { .. }
        | Event::InstanceCondemned { .. }
        | Event::InstanceDraining { .. }
        | Event::InstanceExited { .. }
        | Event::InstanceGone { .. }
        | Event::TrafficChanged { .. }
        | Event::OrphanRemoved { .. }
        | Event::CrashLoopBackoff { .. }
        | Event::ServiceScaled { .. }
        | Event::ServiceRemoved { .. }
        | Event::HistoryLost { .. }
        | Event::LogUnwritable { .. }
        | Event::ChaosConfigured { .. }
        | Event::ChaosStarted { .. }
        | Event::ChaosEnded { .. } => event.kind(),
    }
}

#[test]
fn every_kind_is_written_as_its_golden_file_says() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut kinds = BTreeSet::new();
    let mut stale = Vec::new();
    for event in examples() {
        let kind = covered(&event);
        assert!(kinds.insert(kind), "two examples of {kind}");
        let json = serde_json::to_string_pretty(&event).unwrap() + "\n";
        // The kind stored beside each payload is its serde tag.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["kind"], kind, "the tag of {kind}");
        // And it reads back as itself.
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event, "{kind} round trip");
        let path = data().join("v2").join(format!("{kind}.json"));
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &json).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(json.as_str()) {
            stale.push(format!("{}:\n{json}", path.display()));
        }
    }
    assert_eq!(
        kinds,
        KINDS.iter().copied().collect::<BTreeSet<_>>(),
        "KINDS names every kind once"
    );
    assert!(
        stale.is_empty(),
        "events are no longer written as their golden files say (a change to every user's \
         log; UPDATE_EXPECT=1 rewrites them if it is meant):\n{}",
        stale.join("\n")
    );
}

#[test]
fn a_log_written_by_the_first_vocabulary_is_read_as_todays_events() {
    // Made by graven before vocabulary 2 (`graven daemon`, then deploy, change env, scale,
    // a deploy whose health check failed and rolled back, rollback, down).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    std::fs::copy(data().join("v1.db"), &path).unwrap();
    let log = EventLog::open(&path).unwrap();
    let envelopes = log.read_after::<Event>(0).unwrap();
    assert_eq!(envelopes.len(), 55);
    assert!(envelopes.iter().all(|e| e.version == 1));
    // Drain reasons graven 1 wrote in fixed words are read back into their kinds.
    let drains: Vec<&DrainReason> = envelopes
        .iter()
        .filter_map(|e| match &e.payload {
            Event::InstanceDraining { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(drains.len(), 9);
    assert!(
        drains
            .iter()
            .all(|r| !matches!(r, DrainReason::Recorded { .. })),
        "{drains:?}"
    );
    let state = replay(&envelopes);
    assert_eq!(
        state.releases.keys().map(|n| n.get()).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(state.instances.is_empty(), "down stopped every instance");
    assert_eq!(
        state.services["web"].wanted, None,
        "down removed the service"
    );
    let outcomes: Vec<&str> = state
        .deploys
        .iter()
        .map(|d| match d.outcome {
            Some(DeployOutcome::Succeeded { .. }) => "succeeded",
            Some(DeployOutcome::RolledBack { .. }) => "rolled back",
            Some(DeployOutcome::Superseded { .. }) => "superseded",
            None => "open",
        })
        .collect();
    assert_eq!(
        outcomes,
        ["succeeded", "succeeded", "rolled back", "succeeded"]
    );
    assert!(state.releases[&ReleaseNumber(3)].failed.is_some());
    assert!(
        state
            .releases
            .values()
            .all(|r| r.created_by == "controller")
    );
    // New events go after the old ones in the same log, in today's version.
    let next = log
        .append(
            "test",
            1,
            &Event::ServiceRemoved {
                service: "web".into(),
            },
        )
        .unwrap();
    assert_eq!(next.seq, 56);
    let again = log.read_after::<Event>(0).unwrap();
    assert_eq!(again.last().unwrap().version, 2);
    assert_eq!(again[..55], envelopes[..]);
}
