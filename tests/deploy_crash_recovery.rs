//! Crash recovery: the controller (`graven up`, by its PID) is killed with SIGKILL at several
//! points of a deploy, found by watching the event log: right after the deploy started,
//! after a launch was recorded, after a new instance started, and mid-drain. After each
//! restart the state converges, no release is lost, and every instance on the runtime is one
//! the state accounts for (no orphans, nothing of an unwanted release).

mod support;

use std::time::Duration;

use graven::events::{Event, EventLog};
use support::daemon::{
    Up, demo_instances, hello_project, run, run_ok, test_runtime, v1_project, version,
};

/// The `graven status --json` of the only app.
fn status(home: &std::path::Path) -> serde_json::Value {
    let (stdout, _) = run_ok(home, &["status", "--json"]);
    let mut all: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    all.remove(0)
}

/// Waits until release `number` is wanted, no deploy is running, and exactly `count`
/// instances run, all of it and healthy.
fn converged(home: &std::path::Path, number: u64, count: usize) -> serde_json::Value {
    support::wait_for(Duration::from_secs(60), "the state to converge", || {
        let status = status(home);
        let web = &status["state"]["services"]["web"];
        let instances = status["state"]["instances"].as_object()?.clone();
        let ok = web["wanted"] == number
            && web["deploy"].is_null()
            && instances.len() == count
            && instances
                .values()
                .all(|i| i["release"] == number && i["lifecycle"] == "healthy");
        ok.then_some(status)
    })
}

/// On the local runtime, the instances of app `demo` that exist, by runtime id.
fn runtime_instances(home: &std::path::Path) -> Option<Vec<String>> {
    if test_runtime() != "local" {
        return None;
    }
    let mut ids: Vec<String> = demo_instances(home).into_iter().map(|i| i.id.0).collect();
    ids.sort();
    Some(ids)
}

#[test]
fn sigkill_at_any_point_of_a_deploy_recovers_to_a_consistent_state() {
    let (_temp, home, dir, route) = v1_project(2);
    let mut up = Up::start(&home, &dir, &test_runtime());
    converged(&home, 1, 2);
    let log_path = graven::api::log_path(&home, "demo", "local");

    type Point = fn(&Event, u64) -> bool;
    let points: [(&str, Point); 4] = [
        (
            "the deploy started",
            |e, n| matches!(e, Event::DeployStarted { to, .. } if *to == n),
        ),
        (
            "a launch was recorded",
            |e, n| matches!(e, Event::InstanceLaunched { release, .. } if *release == n),
        ),
        ("a new instance started", |e, _| {
            matches!(e, Event::InstanceStarted { .. })
        }),
        ("an old instance is draining", |e, _| {
            matches!(e, Event::InstanceDraining { .. })
        }),
    ];
    for (number, (point, reached)) in (2u64..).zip(points) {
        let seen = EventLog::open(&log_path).unwrap().last_seq().unwrap();
        hello_project(&dir, route, 2, &format!(r#"VERSION = "v{number}""#), "");
        let mut deploy = support::graven(&home)
            .args(["deploy", dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let log = EventLog::open(&log_path).unwrap();
        support::wait_for(Duration::from_secs(30), point, || {
            let events = log.read_after::<Event>(seen).unwrap();
            events
                .iter()
                .any(|e| reached(&e.payload, number))
                .then_some(())
        });
        let killed = up.signal(libc::SIGKILL, Duration::from_secs(10));
        assert!(!killed.success());
        let _ = deploy.kill();
        let _ = deploy.wait();

        // Restart: `up` replays the log, reconciles from nothing and carries on with the
        // same project, whose release already exists.
        up = Up::start(&home, &dir, &test_runtime());
        let status = converged(&home, number, 2);
        assert_eq!(
            status["state"]["releases"].as_object().unwrap().len() as u64,
            number,
            "no release lost after a kill when {point}"
        );
        assert_eq!(
            version(route).as_deref(),
            Ok(format!("v{number}").as_str()),
            "after a kill when {point}"
        );
        if runtime_instances(&home).is_some() {
            // Give stops of drained and orphaned instances their bounded time.
            let wanted: Vec<String> = support::wait_for(
                Duration::from_secs(30),
                "the runtime to hold only wanted instances",
                || {
                    let status = self::status(&home);
                    let mut ids: Vec<String> = status["state"]["instances"]
                        .as_object()?
                        .values()
                        .filter_map(|i| i["runtime_id"].as_str().map(str::to_owned))
                        .collect();
                    ids.sort();
                    (runtime_instances(&home)? == ids).then_some(ids)
                },
            );
            assert_eq!(wanted.len(), 2, "when {point}");
        }
    }
    let (_, history, _) = run(&home, &["history"]);
    assert!(history.contains("release 5 of web created"), "{history}");
    let status = up.signal(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success());
    if let Some(left) = runtime_instances(&home) {
        assert!(left.is_empty(), "shutdown stops everything: {left:?}");
    }
}
