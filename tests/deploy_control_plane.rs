//! The control plane's daily workflow, as a user meets it through the binary: `graven up`
//! on a project that has releases resumes the release the log wants (a rollback stays
//! rolled back) and deploys the working tree only when it changed; a service's route closes
//! when the service goes; `status`, `releases` and `history` say who made what, and when.

mod support;

use std::time::Duration;

use support::daemon::{Up, hello_project, run_ok, v1_project, version};

fn wanted(home: &std::path::Path) -> Option<u64> {
    let (stdout, _) = run_ok(home, &["status", "--json"]);
    let snapshots: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    snapshots[0]["state"]["services"]["web"]["wanted"].as_u64()
}

fn release_count(home: &std::path::Path) -> usize {
    let (stdout, _) = run_ok(home, &["releases", "--json"]);
    serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
        .unwrap()
        .len()
}

#[test]
fn a_rollback_is_not_undone_by_up_again() {
    let (_temp, home, dir, route) = v1_project(1);
    let dir_arg = dir.to_str().unwrap();
    let mut up = Up::start(&home, &dir, "fake");
    hello_project(&dir, route, 1, r#"VERSION = "v2""#, "");
    run_ok(&home, &["deploy", dir_arg]);
    assert_eq!(version(route).as_deref(), Ok("v2"));
    run_ok(&home, &["rollback"]);
    assert_eq!(wanted(&home), Some(1));
    up.signal(libc::SIGINT, Duration::from_secs(30));

    // The working tree is still v2, which made release 2: up resumes release 1.
    let _up = Up::start(&home, &dir, "fake");
    assert_eq!(wanted(&home), Some(1), "the rollback stays");
    assert_eq!(release_count(&home), 2, "no new release");
    assert_eq!(version(route).as_deref(), Ok("v1"));
    drop(_up);

    // A changed working tree is deployed, and up says so.
    hello_project(&dir, route, 1, r#"VERSION = "v3""#, "");
    let mut up = Up::start(&home, &dir, "fake");
    assert_eq!(wanted(&home), Some(3));
    assert_eq!(version(route).as_deref(), Ok("v3"));
    up.signal(libc::SIGINT, Duration::from_secs(30));
}

#[test]
fn a_removed_service_closes_its_route_and_leaves_status() {
    let (_temp, home, dir, route) = v1_project(1);
    let api_route = support::daemon::free_port();
    let api = format!(
        r#"
[services.api]
instances = 1
port = 8080
route = "{api_route}"
env = {{ VERSION = "api" }}
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
"#
    );
    hello_project(&dir, route, 1, r#"VERSION = "v1""#, &api);
    let _up = Up::start(&home, &dir, "fake");
    assert_eq!(version(api_route).as_deref(), Ok("api"));

    // Gone from graven.toml, then deployed: its route stops listening.
    hello_project(&dir, route, 1, r#"VERSION = "v1""#, "");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    support::wait_for(Duration::from_secs(10), "the api route to close", || {
        std::net::TcpStream::connect(api_route)
            .is_err()
            .then_some(())
    });
    let (status, _) = run_ok(&home, &["status"]);
    assert!(!status.contains("service api"), "{status}");
    assert!(status.contains("service web"), "{status}");

    // `graven down`: every route closes.
    run_ok(&home, &["down"]);
    support::wait_for(Duration::from_secs(10), "the web route to close", || {
        std::net::TcpStream::connect(route).is_err().then_some(())
    });
    let (status, _) = run_ok(&home, &["status"]);
    assert!(!status.contains("service web"), "{status}");
}

#[test]
fn compact_stores_a_snapshot_that_folds_to_the_same_state() {
    let (_temp, home, dir, route) = v1_project(2);
    let mut up = Up::start(&home, &dir, "fake");
    hello_project(&dir, route, 2, r#"VERSION = "v2""#, "");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    run_ok(&home, &["rollback"]);
    up.signal(libc::SIGINT, Duration::from_secs(30));
    let state = |home: &std::path::Path| {
        let (stdout, _) = run_ok(home, &["status", "--json"]);
        let snapshots: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        snapshots[0]["state"].clone()
    };
    let folded = state(&home);
    let (stdout, _) = run_ok(&home, &["compact", "--json"]);
    let compacted: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(compacted[0]["snapshot_at"], folded["seq"], "{compacted}");
    assert_eq!(
        state(&home),
        folded,
        "the snapshot reads as the whole log folds"
    );
    // And the history stays whole.
    let (history, _) = run_ok(&home, &["history", "--json"]);
    let events: Vec<serde_json::Value> = serde_json::from_str(&history).unwrap();
    assert_eq!(events.len() as u64, folded["seq"].as_u64().unwrap());
}

#[test]
fn up_stopping_leaves_another_projects_instances_running() {
    let (temp, home, dir, _route) = v1_project(1);
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.clone());
    // A second project, app `other`, deployed to the control plane `up` runs.
    let other = temp.path().join("other");
    let other_route = support::daemon::free_port();
    hello_project(&other, other_route, 1, r#"VERSION = "other""#, "");
    let toml = std::fs::read_to_string(other.join("graven.toml")).unwrap();
    std::fs::write(
        other.join("graven.toml"),
        toml.replace(r#"app = "demo""#, r#"app = "other""#),
    )
    .unwrap();
    let mut up = Up::start(&home, &dir, "local");
    run_ok(&home, &["deploy", other.to_str().unwrap()]);
    let running = |app: &str| {
        use graven::runtime::Runtime as _;
        let local = graven::runtime::LocalRuntime::open(&home).unwrap();
        support::daemon::block_on(local.list())
            .unwrap()
            .into_iter()
            .filter(|i| i.labels.get("app").map(String::as_str) == Some(app))
            .filter(|i| !i.status.is_exited())
            .count()
    };
    assert_eq!(running("other"), 1);
    // Instance names are unique across the apps of a home: same service, same numbers.
    let (status, _) = run_ok(&home, &["status"]);
    assert!(status.contains("web-1-1.local.demo"), "{status}");
    assert!(status.contains("web-1-1.local.other"), "{status}");
    let status = up.signal(libc::SIGINT, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    assert_eq!(running("demo"), 0, "up drained its own project");
    assert_eq!(running("other"), 1, "and left the other one running");
    // The next control plane adopts it, and it serves. (Its controllers bind their routes
    // once they run, after the daemon says it listens: until then a connection is refused.)
    let mut daemon = Up::daemon(&home, "local");
    let answer = support::wait_for(Duration::from_secs(60), "the other route to answer", || {
        version(other_route).ok()
    });
    assert_eq!(answer, "other");
    // Stopped by its drain, not killed: it may be starting demo's instance again right now,
    // and a start cut off by a kill would leave a shim the cleanup cannot see yet.
    let status = daemon.signal(libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "{status}");
}

#[test]
fn graven_exec_condemns_the_instance_and_a_replacement_takes_its_place() {
    let (_temp, home, dir, route) = v1_project(1);
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.clone());
    let mut up = Up::start(&home, &dir, "local");
    let serving = || {
        let (stdout, _) = run_ok(&home, &["status", "--json"]);
        let snapshots: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let instances = snapshots[0]["state"]["instances"]
            .as_object()
            .unwrap()
            .clone();
        instances
            .values()
            .filter(|i| i["lifecycle"] == "healthy")
            .map(|i| i["runtime_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let first = serving();
    assert_eq!(first.len(), 1);
    // Break glass: the command runs inside (and fails: the port is the instance's own).
    let _ = support::daemon::run(&home, &["exec", &first[0], "--", "/hello"]);
    support::wait_for(
        Duration::from_secs(30),
        "a replacement serving alone",
        || {
            let now = serving();
            (now.len() == 1 && now[0] != first[0]).then_some(())
        },
    );
    let (history, _) = run_ok(&home, &["history"]);
    assert!(
        history.contains("condemned (a command was run inside it)"),
        "{history}"
    );
    assert_eq!(version(route).as_deref(), Ok("v1"));
    let status = up.signal(libc::SIGINT, Duration::from_secs(60));
    assert!(status.success(), "{status}");
}
