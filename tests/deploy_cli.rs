//! The daemon and CLI end to end: `graven up` in a project, `deploy`, `rollback`, `status`,
//! `releases`, `history`, `down` over the API socket, and bad input that must leave the
//! running release serving untouched. Instances of the example run on the runtime
//! `GRAVEN_TEST_RUNTIME` names (default `local`; `fake` runs them inside the daemon).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::daemon::{
    Up, hello_project, run, run_ok, test_runtime, v1_project, version, versions_during,
};

#[test]
fn up_deploy_rollback_history_and_ctrl_c() {
    let (_temp, home, dir, route) = v1_project(2);
    let mut up = Up::start(&home, &dir, &test_runtime());
    assert_eq!(version(route).as_deref(), Ok("v1"));

    // The API socket is owner-only, in an owner-only directory.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home.join("graven.sock")), 0o600);
    assert_eq!(mode(&home), 0o700);

    hello_project(&dir, route, 2, r#"VERSION = "v2""#, "");
    let (stdout, stderr) = run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(stdout.contains("release 2 is serving"), "{stdout}");
    assert!(
        stderr.contains("instance web-2-"),
        "progress is shown: {stderr}"
    );
    assert_eq!(version(route).as_deref(), Ok("v2"));

    let (stdout, _) = run_ok(&home, &["rollback", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["outcomes"][0]["release"], 1);
    assert_eq!(report["outcomes"][0]["outcome"], "succeeded");
    assert_eq!(version(route).as_deref(), Ok("v1"));

    let (stdout, _) = run_ok(&home, &["releases", "--json"]);
    let releases: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(releases.len(), 2, "a rollback makes no release");

    let (stdout, _) = run_ok(&home, &["status", "--json"]);
    let status: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status[0]["state"]["services"]["web"]["wanted"], 1);
    assert_eq!(
        status[0]["state"]["instances"].as_object().unwrap().len(),
        2
    );

    let (stdout, _) = run_ok(&home, &["history"]);
    for expected in [
        "release 1 of web created",
        "release 2 of web created",
        "rollback of web started: release 2 -> 1",
        "draining (replaced by release 1)",
        "deploy of web succeeded: release 1 serves",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }

    // Down drains every instance; the releases and the history stay.
    let (stdout, _) = run_ok(&home, &["down"]);
    assert!(stdout.contains("every service is down"), "{stdout}");
    let (_, stdout, _) = run(&home, &["status", "--json"]);
    let status: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert!(
        status[0]["state"]["instances"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    assert!(status[0]["state"]["services"]["web"]["wanted"].is_null());
    let (_, history, _) = run(&home, &["history"]);
    assert!(history.contains("service web removed"), "{history}");

    // Ctrl-C drains and stops every instance and exits cleanly.
    let status = up.signal(libc::SIGINT, Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", up.stderr());
    assert!(up.stderr().contains("draining and stopping"));
    assert!(!home.join("graven.sock").exists());
    assert!(version(route).is_err(), "the route is closed");
    // With no control plane, status reads the log: the app is there, its service gone.
    let (ok, stdout, stderr) = run(&home, &["status"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("no control plane runs"), "{stderr}");
    assert!(stdout.contains("demo/local"), "{stdout}");
    assert!(!stdout.contains("service web"), "{stdout}");
    let (ok, _, stderr) = run(&home, &["status", "--app", "nope"]);
    assert!(!ok, "an unknown app is an error");
    assert!(
        stderr.contains("nothing is deployed for app \"nope\""),
        "{stderr}"
    );
}

#[test]
fn bad_input_leaves_the_running_release_serving() {
    let (_temp, home, dir, route) = v1_project(2);
    let _up = Up::start(&home, &dir, &test_runtime());
    let dir_arg = dir.to_str().unwrap();
    let releases = || {
        let (_, stdout, _) = run(&home, &["releases", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
            .unwrap()
            .len()
    };

    // A typo in graven.toml: every problem, with line and field; nothing deployed.
    hello_project(&dir, route, 2, r#"VERSION = "v2""#, "stop_grase = \"1s\"");
    let (ok, _, stderr) = run(&home, &["deploy", dir_arg]);
    assert!(!ok);
    assert!(stderr.contains("stop_grase"), "{stderr}");
    assert_eq!(releases(), 1);

    // A route another process holds.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    hello_project(&dir, taken, 2, r#"VERSION = "v2""#, "");
    let (ok, _, stderr) = run(&home, &["deploy", dir_arg]);
    assert!(!ok);
    assert!(stderr.contains(&format!("route {taken}")), "{stderr}");
    assert!(stderr.contains("cannot be bound"), "{stderr}");
    assert_eq!(releases(), 1);
    drop(holder);

    // A bake failure.
    hello_project(&dir, route, 2, r#"VERSION = "v2""#, "");
    std::fs::write(dir.join("Containerfile"), "FROM scratch\nFROBNICATE now\n").unwrap();
    let (ok, _, stderr) = run(&home, &["deploy", dir_arg]);
    assert!(!ok);
    assert!(
        stderr.contains("FROBNICATE") || stderr.contains("Containerfile"),
        "{stderr}"
    );
    assert_eq!(releases(), 1);
    hello_project(&dir, route, 2, r#"VERSION = "v2""#, "");

    // Unknown service and unknown release.
    let (ok, _, stderr) = run(&home, &["rollback", "--service", "nope"]);
    assert!(!ok);
    assert!(stderr.contains("unknown service \"nope\""), "{stderr}");
    let (ok, _, stderr) = run(&home, &["rollback", "--to", "9"]);
    assert!(!ok);
    assert!(stderr.contains("no release 9"), "{stderr}");

    // A release whose health check fails: never routed, rolled back, says why. (It never
    // gets healthy, so it is rolled back at its deadline: a short one, for it alone.)
    hello_project(&dir, route, 2, r#"VERSION = "bad", HEALTHY = "0""#, "");
    support::daemon::set_health_deadline(&dir, "3s");
    let watcher = std::thread::spawn(move || versions_during(route, Duration::from_secs(4)));
    let (ok, stdout, stderr) = run(&home, &["deploy", dir_arg]);
    assert!(
        !ok,
        "a rolled back deploy exits non-zero: {stdout}\n{stderr}"
    );
    assert!(stdout.contains("rolled back"), "{stdout}");
    let seen = watcher.join().unwrap();
    assert!(
        seen.iter().all(|v| v.as_deref() == Ok("v1")),
        "only v1 served: {:?}",
        seen.iter()
            .filter(|v| v.as_deref() != Ok("v1"))
            .collect::<Vec<_>>()
    );
    let (_, history, _) = run(&home, &["history"]);
    assert!(
        history.contains("rolled back from release 2 to 1: 0 of 2 instances healthy within 3s"),
        "{history}"
    );
    assert_eq!(version(route).as_deref(), Ok("v1"));
}

#[test]
fn up_whose_first_rollout_rolls_back_says_so_instead_of_serving_and_exits_1() {
    let (_temp, home, dir, route) = v1_project(1);
    hello_project(&dir, route, 1, r#"VERSION = "bad", HEALTHY = "0""#, "");
    support::daemon::set_health_deadline(&dir, "2s");
    let mut up = Up::start_unsuccessful(&home, &dir, &test_runtime());
    up.stdout_with("web: release 1 rolled back");
    assert!(!up.stderr().contains("graven: serving"), "{}", up.stderr());
    // It keeps running, to be looked at: the API answers and says what happened.
    let (_, history, _) = run(&home, &["history"]);
    assert!(
        history.contains("deploy of web release 1 failed: 0 of 1 instances healthy within 2s"),
        "{history}"
    );
    let status = up.signal(libc::SIGTERM, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{status}\n{}", up.stderr());
}

#[test]
fn the_daemon_takes_deploys_from_a_project_and_stops_on_sigterm() {
    let (_temp, home, dir, route) = v1_project(1);
    let mut daemon = Up::daemon(&home, &test_runtime());
    let (stdout, _) = run_ok(&home, &["status"]);
    assert!(stdout.contains("nothing is deployed"), "{stdout}");
    let (stdout, _) = run_ok(&home, &["deploy", dir.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["app"], "demo");
    assert_eq!(report["routes"]["web"], format!("http://{route}"));
    assert_eq!(version(route).as_deref(), Ok("v1"));
    // A second control plane on the same home is refused.
    let (ok, _, stderr) = run(&home, &["daemon"]);
    assert!(!ok);
    assert!(
        stderr.contains("a control plane already runs on"),
        "{stderr}"
    );
    let status = daemon.signal(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", daemon.stderr());
    assert!(version(route).is_err());
}
