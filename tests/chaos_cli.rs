//! `graven chaos run` and `graven chaos report` as users meet them: the real binary, the
//! local runtime and the example's image. A graceful stop asked for under keep-alive load
//! fails no request and the instance is replaced; a kill -9 ends the instance's process and
//! it is replaced; an exempt service is refused by name; the report says what each
//! experiment did and what users saw.

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
