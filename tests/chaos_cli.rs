//! `graven chaos run` and `graven chaos report` as users meet them: the real binary, the
//! local runtime and the example's image. A graceful stop asked for under keep-alive load
//! fails no request and the instance is replaced; a kill -9 ends the instance's process and
//! it is replaced; an exempt service is refused by name; the report says what each
//! experiment did and what users saw; a schedule stops instances at its rate under load
//! with no failed request and never touches an exempt service.

mod support;

use std::time::Duration;

use support::daemon::{Up, demo_instances, run, run_ok, v1_project};
use support::load::Load;

fn running(home: &std::path::Path) -> Vec<graven::runtime::Instance> {
    demo_instances(home)
        .into_iter()
        .filter(|i| !i.status.is_exited())
        .collect()
}

fn healthy(home: &std::path::Path) -> usize {
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
                .filter(|i| i["lifecycle"] == "healthy")
                .count()
        })
        .unwrap_or(0)
}

/// The report's experiments, as `chaos report --json` gives them.
fn report(home: &std::path::Path) -> Vec<serde_json::Value> {
    let (stdout, _) = run_ok(home, &["chaos", "report", "--json"]);
    serde_json::from_str(&stdout).unwrap()
}

/// Waits until experiment `n` (1-based) has ended and three instances serve again.
fn wait_ended(home: &std::path::Path, n: usize) -> serde_json::Value {
    support::wait_for(
        Duration::from_secs(60),
        "the experiment to end, healed",
        || {
            let found = report(home);
            let ended = found
                .get(n - 1)
                .filter(|e| !e["outcome"].is_null())
                .cloned()?;
            (running(home).len() == 3 && healthy(home) == 3).then_some(ended)
        },
    )
}

#[test]
fn a_stop_and_a_kill_asked_for_through_the_binary_heal_and_are_reported() {
    let (_temp, home, dir, route) = v1_project(3);
    // One instance may be down at a time, and nothing is scheduled: only what is asked.
    let toml = std::fs::read_to_string(dir.join("graven.toml"))
        .unwrap()
        .replace("max_unavailable = 0", "max_unavailable = 1");
    std::fs::write(
        dir.join("graven.toml"),
        format!("{toml}\n[chaos]\nmean_between = \"1000h\"\nmin_between = \"0s\"\n"),
    )
    .unwrap();
    let _up = Up::start(&home, &dir, "local");
    support::wait_for(Duration::from_secs(30), "3 healthy instances", || {
        (running(&home).len() == 3 && healthy(&home) == 3).then_some(())
    });
    let load = Load::start(route, 8);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 100).then_some(())
    });

    let before = running(&home);
    let (stdout, _) = run_ok(
        &home,
        &["chaos", "run", "web", "--kind", "stop", "--for", "1s"],
    );
    assert!(
        stdout.contains("chaos experiment 1 started: graceful stop on instance web-"),
        "{stdout}"
    );
    let stop = wait_ended(&home, 1);
    assert_eq!(stop["action"]["kind"], "stop");
    assert_eq!(stop["outcome"]["how"], "completed", "{stop}");
    assert!(stop["seen"]["requests"].as_u64().unwrap() > 0, "{stop}");
    let stopped = stop["instance"].as_str().unwrap().to_owned();
    // The stopped instance is gone from the runtime, replaced by a new one.
    let after = running(&home);
    assert_eq!(after.len(), 3);
    let gone: Vec<_> = before
        .iter()
        .filter(|b| after.iter().all(|a| a.id != b.id))
        .collect();
    assert_eq!(gone.len(), 1, "exactly one instance replaced");
    assert_eq!(
        gone[0].labels.get("instance").map(String::as_str),
        Some(stopped.as_str())
    );
    let stop_load = load.stop();
    eprintln!("graceful stop: {stop_load:?}");
    assert_eq!(stop_load.failed, 0, "failures: {:?}", stop_load.failures);

    let (stdout, _) = run_ok(&home, &["chaos", "run", "--kind", "kill", "--for", "1s"]);
    assert!(
        stdout.contains("chaos experiment 2 started: kill -9"),
        "{stdout}"
    );
    let kill = wait_ended(&home, 2);
    assert_eq!(kill["action"]["kind"], "kill");
    let (history, _) = run_ok(&home, &["history"]);
    let killed = kill["instance"].as_str().unwrap();
    assert!(
        // The local runtime's kill ends the instance's shim and workload at once: the exit is
        // seen as the process vanishing.
        history.contains(&format!("instance {killed} exited (")),
        "{history}"
    );
    assert!(
        history.contains(&format!("instance {stopped} draining (chaos experiment 1)")),
        "{history}"
    );

    // The text report says what each did and what users saw.
    let (text, _) = run_ok(&home, &["chaos", "report"]);
    assert!(
        text.contains("#1 ") && text.contains("graceful stop on web-"),
        "{text}"
    );
    assert!(
        text.contains("#2 ") && text.contains("kill -9 on web-"),
        "{text}"
    );
    assert!(text.contains("users saw: "), "{text}");
    assert!(text.contains("completed"), "{text}");
}

#[test]
fn an_exempt_service_is_refused_by_name() {
    let (_temp, home, dir, _route) = v1_project(1);
    let toml = std::fs::read_to_string(dir.join("graven.toml")).unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!("{toml}\n[chaos]\nexempt = [\"web\"]\nmean_between = \"1000h\"\n"),
    )
    .unwrap();
    let _up = Up::start(&home, &dir, "fake");
    let (ok, _, stderr) = run(&home, &["chaos", "run", "web", "--kind", "latency"]);
    assert!(!ok);
    assert!(
        stderr.contains("no chaos experiment can start: latency of web: it is exempt"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&home, &["chaos", "run", "--kind", "boom"]);
    assert!(!ok);
    assert!(stderr.contains("\"boom\" is not a kind"), "{stderr}");
    let (stdout, _) = run_ok(&home, &["chaos", "report"]);
    assert_eq!(stdout.trim(), "no chaos experiment yet");
}

/// Instance ids of `service` that run now.
fn ids_of(home: &std::path::Path, service: &str) -> std::collections::BTreeSet<String> {
    running(home)
        .into_iter()
        .filter(|i| i.labels.get("service").map(String::as_str) == Some(service))
        .map(|i| i.id.to_string())
        .collect()
}

/// A schedule on the local runtime, under keep-alive load, over `web`'s 3 instances (one may
/// be down) beside an exempt `admin`: graceful stops start at the configured rate, fail no
/// request, and never touch `admin`.
///
/// The bounds: with `min_between = 2s` and `mean_between = 3s` the gaps are 2 s plus an
/// exponential draw of mean 1 s, so a 30 s window holds about 10 starts (standard deviation
/// about 1); no schedule that keeps `min_between` can fit more than 16. A due start is
/// skipped while the previous stop's replacement is not yet healthy, so the lower bound, 4,
/// leaves room for a loaded machine's slow replacements while still failing a schedule that
/// does not run. The exact Poisson rate is `chaos_schedule`'s test, on the fake runtime.
#[test]
fn a_schedule_stops_instances_at_its_rate_fails_no_request_and_spares_the_exempt() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let (route, admin_route) = (support::daemon::free_port(), support::daemon::free_port());
    support::daemon::hello_project(
        &dir,
        route,
        3,
        r#"VERSION = "v1""#,
        &format!(
            r#"
[services.admin]
instances = 2
port = 8080
route = "{admin_route}"
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 1, health_deadline = "60s" }}
stop_grace = "2s"

[chaos]
mean_between = "3s"
min_between = "2s"
kinds = ["stop"]
duration = "500ms"
exempt = ["admin"]
seed = 16
"#
        ),
    );
    let toml = std::fs::read_to_string(dir.join("graven.toml"))
        .unwrap()
        .replacen("max_unavailable = 0", "max_unavailable = 1", 1);
    std::fs::write(dir.join("graven.toml"), toml).unwrap();
    let _up = Up::start(&home, &dir, "local");
    support::wait_for(Duration::from_secs(60), "5 healthy instances", || {
        (running(&home).len() == 5 && healthy(&home) == 5).then_some(())
    });
    let admin = ids_of(&home, "admin");
    assert_eq!(admin.len(), 2);
    let load = Load::start(route, 8);
    support::wait_for(Duration::from_secs(10), "load running", || {
        (load.snapshot().total > 100).then_some(())
    });

    let window = Duration::from_secs(30);
    let from_ms = graven_now_ms();
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        assert_eq!(
            ids_of(&home, "admin"),
            admin,
            "the exempt service was touched"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let to_ms = graven_now_ms();
    // Let the last stop's replacement become healthy before the load ends.
    support::wait_for(Duration::from_secs(60), "web healed", || {
        let experiments = report(&home);
        let ended = experiments.iter().all(|e| !e["outcome"].is_null());
        (ended && running(&home).len() == 5 && healthy(&home) == 5).then_some(())
    });
    let seen = load.stop();
    eprintln!("load over the schedule: {seen:?}");

    let experiments = report(&home);
    let in_window: Vec<&serde_json::Value> = experiments
        .iter()
        .filter(|e| (from_ms..to_ms).contains(&e["started_at_ms"].as_u64().unwrap()))
        .collect();
    let starts: Vec<u64> = in_window
        .iter()
        .map(|e| e["started_at_ms"].as_u64().unwrap())
        .collect();
    eprintln!(
        "{} scheduled stops in {window:?}, at {starts:?}",
        starts.len()
    );
    assert!(
        (4..=16).contains(&starts.len()),
        "{} starts in {window:?}: {experiments:#?}",
        starts.len()
    );
    for experiment in &experiments {
        assert_eq!(experiment["scheduled"], true, "{experiment}");
        assert_eq!(experiment["service"], "web", "{experiment}");
        assert_eq!(experiment["action"]["kind"], "stop", "{experiment}");
        assert_eq!(experiment["outcome"]["how"], "completed", "{experiment}");
    }
    assert_eq!(seen.failed, 0, "failures: {:?}", seen.failures);
    assert!(seen.total > 1000, "the load ran: {seen:?}");
    assert_eq!(ids_of(&home, "admin"), admin);
    // The stops were drains, recorded as the experiments' own.
    let (history, _) = run_ok(&home, &["history"]);
    assert!(history.contains("draining (chaos experiment"), "{history}");
}

fn graven_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
