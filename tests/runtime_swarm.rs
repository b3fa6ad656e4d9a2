//! The Swarm runtime as users run it: `graven up` of the example with `runtime = "swarm"` in
//! its environment, on a three-node Swarm of the test's own (three engines in network
//! namespaces of their own on a bridge the test makes, `support::swarm`). Three deploys under
//! keep-alive load fail no request, with tasks on more than one node; a release that never
//! gets healthy rolls back by itself; a worker's engine stopped (by its PID) loses no
//! idempotent request, and the service is back to its instance count on the nodes left. A
//! worker's engine killed (a crash: its tasks run on, cut off) is a lost node once the Swarm
//! sees it down: its instances count as exited and are replaced on the nodes left.

mod support;

use std::path::Path;
use std::time::Duration;

use support::daemon::{Up, hello_project, run, run_ok, version};
use support::load::Load;
use support::swarm::Swarm;

const CONNECTIONS: usize = 8;
const INSTANCES: u32 = 3;

/// The example's project with `env`, its environment on `swarm`.
fn project(dir: &Path, route: std::net::SocketAddr, swarm: &Swarm, env: &str) {
    // A release that must serve gets two minutes; one that never gets healthy
    // (HEALTHY = 0) is rolled back at its deadline, kept shorter.
    let deadline = if env.contains(r#"HEALTHY = "0""#) {
        "30s"
    } else {
        "120s"
    };
    // A task takes Swarm a second or more to place and start: the health deadline is longer
    // than the local runtime's.
    let engines: Vec<String> = swarm.engines().iter().map(|e| format!("{e:?}")).collect();
    let extra = format!(
        "[environments.local]\nruntime = \"swarm\"\ndocker_host = \"{}\"\n\
         swarm_engines = [{}]\n[environments.local.services.web]\n\
         deploy = {{ strategy = \"rolling\", max_surge = 1, max_unavailable = 0, \
         health_deadline = \"{deadline}\" }}\n",
        swarm.manager().host(),
        engines.join(", ")
    );
    hello_project(dir, route, INSTANCES, env, &extra);
}

/// The running instances' versions as the engines run them (each task's env), on the nodes
/// whose engine runs.
fn running_versions(swarm: &Swarm) -> Vec<String> {
    let mut versions = Vec::new();
    for node in swarm.nodes() {
        let Ok(out) = node.docker().args(["ps", "-q"]).output() else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let env = node
                .docker()
                .args(["inspect", "--format", "{{.Config.Env}}", id])
                .output()
                .unwrap();
            let env = String::from_utf8_lossy(&env.stdout);
            if let Some(v) = env
                .split([' ', '[', ']'])
                .find_map(|kv| kv.strip_prefix("VERSION="))
            {
                versions.push(v.to_owned());
            }
        }
    }
    versions
}

#[test]
fn the_example_deploys_across_a_three_node_swarm_and_survives_a_lost_node() {
    let mut swarm = Swarm::start();
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = support::daemon::free_port();
    project(&dir, route, &swarm, r#"VERSION = "v1""#);
    let up = Up::start(&home, &dir, "local");
    let first = version(route);
    assert_eq!(
        first.as_deref(),
        Ok("v1"),
        "{}\n{}",
        up.stderr(),
        String::from_utf8_lossy(&swarm.manager().run(&["service", "ls"]).stdout)
    );
    support::wait_for(Duration::from_secs(60), "3 tasks of v1", || {
        (running_versions(&swarm) == ["v1"; 3]).then_some(())
    });

    // Three deploys under keep-alive load: no failed request, and each switch is seen.
    let load = Load::start(route, CONNECTIONS);
    let count = |v: &str| load.snapshot().versions.get(v).copied().unwrap_or(0);
    for version in ["v2", "v3", "v4"] {
        project(&dir, route, &swarm, &format!(r#"VERSION = "{version}""#));
        run_ok(&home, &["deploy", dir.to_str().unwrap()]);
        let seen = count(version);
        support::wait_for(Duration::from_secs(30), "the new release answers", || {
            (count(version) > seen + 100).then_some(())
        });
    }
    let report = load.stop();
    eprintln!("three deploys on swarm: {report:?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.last_version.as_deref(), Some("v4"));
    support::wait_for(Duration::from_secs(60), "v4's tasks alone", || {
        let versions = running_versions(&swarm);
        (versions == ["v4"; 3]).then_some(())
    });
    // Swarm placed the tasks: on more than one node.
    let per_node = swarm.running_per_node();
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() > 1,
        "every task on one node: {per_node:?}"
    );

    // The lock-down, as a node's engine reports it for a task's container.
    let (node, container) = swarm
        .nodes()
        .iter()
        .find_map(|n| Some((n, n.lines(&["ps", "-q"]).into_iter().next()?)))
        .unwrap();
    let inspect = |format: &str| {
        let out = node.run(&["inspect", "--format", format, &container]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(inspect("{{.HostConfig.ReadonlyRootfs}}"), "true");
    assert_eq!(inspect("{{.HostConfig.CapDrop}}"), "[ALL]");
    let tmp =
        inspect(r#"{{range .HostConfig.Mounts}}{{if eq .Target "/tmp"}}{{.Type}}{{end}}{{end}}"#);
    assert_eq!(tmp, "tmpfs");
    // The image is the engine's id of graven's image, never a registry's reference.
    assert!(inspect("{{.Config.Image}}").starts_with("sha256:"));

    // The instances' output is in graven's log store (the services' logs).
    support::wait_for(Duration::from_secs(30), "the logs of v4", || {
        let (_, stdout, _) = run(&home, &["logs", "--app", "demo"]);
        stdout.contains("hello v4 listening").then_some(())
    });

    // A bad release (never healthy) rolls back by itself; v4 serves on.
    project(&dir, route, &swarm, r#"VERSION = "v5", HEALTHY = "0""#);
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("rolled back"), "{stdout}");
    assert_eq!(version(route).as_deref(), Ok("v4"));
    support::wait_for(Duration::from_secs(60), "v5's tasks gone", || {
        (running_versions(&swarm) == ["v4"; 3]).then_some(())
    });

    // A worker with a task loses its engine: no idempotent request fails (the proxy retries
    // GETs on another instance), and the service is back to three instances on the rest.
    let worker = (1..3)
        .find(|&i| !swarm.nodes()[i].lines(&["ps", "-q"]).is_empty())
        .expect("a worker runs a task");
    let load = Load::start(route, CONNECTIONS);
    swarm.stop_node(worker);
    support::wait_for(Duration::from_secs(90), "three instances again", || {
        (running_versions(&swarm) == ["v4"; 3]).then_some(())
    });
    // And they answer: more requests go through after the replacement.
    let served = load.snapshot().versions.get("v4").copied().unwrap_or(0);
    support::wait_for(Duration::from_secs(20), "requests after the loss", || {
        let now = load.snapshot().versions.get("v4").copied().unwrap_or(0);
        (now > served + 100).then_some(())
    });
    let report = load.stop();
    eprintln!("a lost node: {report:?}");
    assert_eq!(
        report.failed,
        0,
        "failures: {:?}\n{}",
        report.failures,
        up.stderr()
    );
    let report = run_ok(&home, &["status", "--json"]).0;
    assert!(report.contains("\"web\""), "{report}");
    drop(up);
}

/// A crashed worker (its engine SIGKILLed): the manager marks the node down and its tasks
/// unreachable, and graven replaces them on the nodes left, with no failed request meanwhile
/// (the cut-off tasks still answer until they are replaced, as they would behind a node
/// whose engine alone died).
#[test]
fn a_crashed_worker_s_instances_are_replaced_on_the_nodes_left() {
    let mut swarm = Swarm::start();
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = support::daemon::free_port();
    project(&dir, route, &swarm, r#"VERSION = "v1""#);
    let up = Up::start(&home, &dir, "local");
    support::wait_for(Duration::from_secs(60), "3 tasks of v1", || {
        (running_versions(&swarm) == ["v1"; 3]).then_some(())
    });
    let worker = (1..3)
        .max_by_key(|&i| swarm.nodes()[i].lines(&["ps", "-q"]).len())
        .unwrap();
    let lost = swarm.nodes()[worker].lines(&["ps", "-q"]).len();
    assert!(
        lost > 0,
        "no task on a worker: {:?}",
        swarm.running_per_node()
    );
    let load = Load::start(route, CONNECTIONS);
    swarm.crash_node(worker);
    // The crashed node's tasks are not counted: three again means graven replaced them.
    support::wait_for(
        Duration::from_secs(90),
        "three instances on the nodes left",
        || (running_versions(&swarm) == ["v1"; 3]).then_some(()),
    );
    // The lost instances are exited for graven (their node is down), so they are removed:
    // the manager keeps three services, no instance stuck stopping on a node that is gone.
    support::wait_for(
        Duration::from_secs(60),
        "the lost instances' services removed",
        || {
            let services = swarm.manager().lines(&["service", "ls", "-q"]);
            (services.len() == 3).then_some(())
        },
    );
    let served = load.snapshot().versions.get("v1").copied().unwrap_or(0);
    support::wait_for(Duration::from_secs(20), "requests after the loss", || {
        let now = load.snapshot().versions.get("v1").copied().unwrap_or(0);
        (now > served + 100).then_some(())
    });
    let report = load.stop();
    eprintln!("a crashed node: {report:?}");
    assert_eq!(
        report.failed,
        0,
        "failures: {:?}\n{}",
        report.failures,
        up.stderr()
    );
    drop(up);
}

/// A node's engine is followed again after it restarts: with the manager's engine frozen (it
/// takes requests and answers none, so the manager's tasks cannot say anything), a task's
/// container killed on a worker whose engine restarted is reported exited all the same, by
/// that worker's event stream alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_s_events_are_followed_again() {
    use graven::runtime::{InstanceChange, Runtime, SwarmRuntime};

    let mut swarm = Swarm::with_nodes(2);
    let home = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(home.path());
    let runtime =
        SwarmRuntime::open(home.path(), &swarm.manager().host(), &swarm.engines()).unwrap();
    let mut changes = runtime.changes();
    start_on_worker(&runtime, &image, &swarm).await;

    // The worker's engine restarts (its containers end with it) and is back in the Swarm.
    swarm.restart_node(1);
    swarm.wait_all_ready();
    let (id, container) = start_on_worker(&runtime, &image, &swarm).await;
    while changes.try_recv().is_ok() {}

    swarm.freeze_node(0, true);
    swarm.nodes()[1].run(&["kill", &container]);
    let exited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match changes.recv().await {
                Ok(InstanceChange::Exited { id: exited }) if exited == id => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(error) => panic!("{error}"),
            }
        }
    })
    .await;
    swarm.freeze_node(0, false);
    assert!(
        exited.is_ok(),
        "the restarted worker's event stream did not report {id} exited"
    );
}

/// Starts instances until one runs on the worker (Swarm spreads them over both nodes):
/// its id and its container there.
async fn start_on_worker(
    runtime: &graven::runtime::SwarmRuntime,
    image: &graven::store::Digest,
    swarm: &Swarm,
) -> (graven::runtime::InstanceId, String) {
    use graven::runtime::{InstanceSpec, Runtime};
    let on_worker = || swarm.nodes()[1].lines(&["ps", "-q", "--no-trunc"]);
    let before = on_worker();
    for _ in 0..4 {
        let instance = runtime
            .start(InstanceSpec::new(image.clone()))
            .await
            .unwrap();
        let now = on_worker();
        if let Some(container) = now.into_iter().find(|c| !before.contains(c)) {
            return (instance.id, container);
        }
    }
    panic!("no instance on the worker: {:?}", swarm.running_per_node());
}
