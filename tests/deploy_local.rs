//! The control plane as users run it: the real binary, the local runtime and the example's
//! image. Zero downtime across three deploys under keep-alive load (and its negative
//! control), self-healing after an instance's process is killed, and a release whose
//! instances crash at once.

mod support;

use std::time::Duration;

use graven::runtime::{LocalRuntime, Runtime};
use support::daemon::{
    Up, block_on, demo_instances, hello_project, run, run_ok, v1_project, version,
};
use support::load::Load;

const CONNECTIONS: usize = 8;

/// The running instances of app `demo` on the local runtime under `home`.
fn running(home: &std::path::Path) -> Vec<graven::runtime::Instance> {
    demo_instances(home)
        .into_iter()
        .filter(|i| !i.status.is_exited())
        .collect()
}

fn healthy_count(home: &std::path::Path, release: u64) -> usize {
    let (ok, stdout, _) = run(home, &["status", "--json"]);
    if !ok {
        return 0;
    }
    let status: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    status[0]["state"]["instances"]
        .as_object()
        .map(|instances| {
            instances
                .values()
                .filter(|i| i["release"] == release && i["lifecycle"] == "healthy")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn three_deploys_of_the_example_under_load_fail_no_request() {
    let (_temp, home, dir, route) = v1_project(4);
    let _up = Up::start(&home, &dir, "local");
    assert_eq!(version(route).as_deref(), Ok("v1"));
    support::wait_for(
        Duration::from_secs(20),
        "4 instances on the runtime",
        || (running(&home).len() == 4).then_some(()),
    );

    let load = Load::start(route, CONNECTIONS);
    let count = |v: &str| load.snapshot().versions.get(v).copied().unwrap_or(0);
    let mut previous = "v1".to_owned();
    for n in 2..=4 {
        let version = format!("v{n}");
        hello_project(&dir, route, 4, &format!(r#"VERSION = "{version}""#), "");
        run_ok(&home, &["deploy", dir.to_str().unwrap()]);
        let more_of_new = || {
            let seen = count(&version);
            support::wait_for(
                Duration::from_secs(20),
                "answers of the new release",
                || (count(&version) > seen + 100).then_some(()),
            );
        };
        more_of_new();
        let old_after = count(&previous);
        more_of_new();
        assert!(old_after > 0, "{previous} answered before the switch");
        assert_eq!(count(&previous), old_after, "{previous} still answers");
        previous = version;
    }
    let report = load.stop();
    eprintln!("three deploys: {report:?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.last_version.as_deref(), Some("v4"));
    assert_eq!(
        running(&home).len(),
        4,
        "old instances are stopped and removed"
    );

    // Negative control: the same load, every instance killed without draining.
    let load = Load::start(route, CONNECTIONS);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 100).then_some(())
    });
    let local = LocalRuntime::open(&home).unwrap();
    for instance in running(&home) {
        block_on(local.kill(&instance.id)).unwrap();
    }
    let served = |load: &Load| load.snapshot().versions.get("v4").copied().unwrap_or(0);
    let before = served(&load);
    support::wait_for(Duration::from_secs(30), "the service heals", || {
        (served(&load) > before + 100).then_some(())
    });
    let killed = load.stop();
    eprintln!("negative control: {killed:?}");
    assert!(killed.failed > 0, "a kill without drain fails requests");
}

#[test]
fn a_killed_instance_is_replaced_while_requests_keep_flowing() {
    let (_temp, home, dir, route) = v1_project(2);
    let _up = Up::start(&home, &dir, "local");
    let connections = 4;
    let load = Load::start(route, connections);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 100).then_some(())
    });
    let victim = running(&home).remove(0);
    let pid = victim.pid.expect("a local instance has a pid");
    // SAFETY: kill(2) of the instance's own process, whose PID its runtime just reported.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    support::wait_for(Duration::from_secs(20), "a healthy replacement", || {
        let ids: Vec<_> = running(&home).into_iter().map(|i| i.id).collect();
        (ids.len() == 2 && !ids.contains(&victim.id) && healthy_count(&home, 1) == 2).then_some(())
    });
    let before = load.snapshot().total;
    support::wait_for(Duration::from_secs(10), "requests after healing", || {
        (load.snapshot().total > before + 100).then_some(())
    });
    let report = load.stop();
    eprintln!("self-healing: {report:?}");
    // The load is GETs: a request the killed process was answering is re-sent by the proxy
    // to another instance (the connection closed before any answer), and new requests never
    // reach the dead process once it fails to connect. So no client sees an error.
    assert_eq!(
        report.failed, 0,
        "clients saw errors: {:?}",
        report.failures
    );
    let (_, history, _) = run(&home, &["history"]);
    assert!(history.contains("exited"), "{history}");
}

#[test]
fn a_release_whose_instances_crash_at_once_rolls_back_and_the_old_one_serves() {
    let (_temp, home, dir, route) = v1_project(2);
    let _up = Up::start(&home, &dir, "local");
    hello_project(
        &dir,
        route,
        2,
        r#"VERSION = "v2""#,
        r#"entrypoint = ["/no-such-program"]"#,
    );
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("rolled back"), "{stdout}");
    assert_eq!(version(route).as_deref(), Ok("v1"));
    assert_eq!(healthy_count(&home, 1), 2);
    let (_, history, _) = run(&home, &["history"]);
    assert!(
        history.contains("rolled back from release 2 to 1"),
        "{history}"
    );
}
