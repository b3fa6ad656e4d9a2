//! The Docker runtime as users run it: `graven up` of the example with `runtime = "docker"` in
//! its environment, on a dockerd of the test's own (a bridge of its own, stopped by its PID).
//! Two deploys under keep-alive load fail no request; the instances' output reaches `graven
//! logs`; a release that never gets healthy rolls back; the lock-down is the engine's word
//! (`docker inspect`) and holds inside (a write to `/` fails, a privileged exec cannot
//! start, `docker cp` is refused), and those execs taint the instance, which is replaced; a
//! file written into a container's root (its upper dir, on the host) condemns it; the same
//! image started by `docker run` answers the same.

mod support;

use std::path::Path;
use std::time::Duration;

use support::daemon::{Up, hello_project, run, run_ok, version};
use support::docker::Dockerd;
use support::load::Load;

const CONNECTIONS: usize = 8;

/// The example's project with `env`, on `engine`, with busybox in the image (a shell for
/// the lock-down's and drift's `docker exec`) and a drift check every 300 ms.
fn project(dir: &Path, route: std::net::SocketAddr, engine: &Dockerd, env: &str) {
    // A release that must serve gets a minute; one that never gets healthy (HEALTHY = 0)
    // is rolled back at its deadline, kept short.
    let deadline = if env.contains(r#"HEALTHY = "0""#) {
        "15s"
    } else {
        "60s"
    };
    // A container takes the engine hundreds of milliseconds to start where a local instance
    // takes tens: the rollout's health deadline is the environment's, longer.
    let extra = format!(
        "drift = {{ interval = \"300ms\" }}\n\n[environments.local]\nruntime = \"docker\"\n\
         docker_host = \"{}\"\n[environments.local.services.web]\n\
         deploy = {{ strategy = \"rolling\", max_surge = 1, max_unavailable = 0, \
         health_deadline = \"{deadline}\" }}\n",
        engine.host()
    );
    hello_project(dir, route, 2, env, &extra);
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    let mut containerfile = std::fs::read_to_string(dir.join("Containerfile")).unwrap();
    containerfile.push_str("COPY busybox /busybox\n");
    std::fs::write(dir.join("Containerfile"), containerfile).unwrap();
}

/// The names of the running containers graven started on `engine`.
fn containers(engine: &Dockerd) -> Vec<String> {
    let out = engine.run(&[
        "ps",
        "--filter",
        "label=graven.instance",
        "--format",
        "{{.Names}}",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn inspect(engine: &Dockerd, name: &str, format: &str) -> String {
    let out = engine.run(&["inspect", "--format", format, name]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_example_deploys_on_docker_under_load_and_keeps_graven_s_guarantees() {
    let engine = Dockerd::start_with_bridge();
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = support::daemon::free_port();
    project(&dir, route, &engine, r#"VERSION = "v1""#);
    let up = Up::start(&home, &dir, "local");
    assert_eq!(version(route).as_deref(), Ok("v1"));
    support::wait_for(Duration::from_secs(30), "2 containers", || {
        (containers(&engine).len() == 2).then_some(())
    });

    // Two deploys under keep-alive load: no failed request, and each switch is seen.
    let load = Load::start(route, CONNECTIONS);
    let count = |v: &str| load.snapshot().versions.get(v).copied().unwrap_or(0);
    for version in ["v2", "v3"] {
        project(&dir, route, &engine, &format!(r#"VERSION = "{version}""#));
        run_ok(&home, &["deploy", dir.to_str().unwrap()]);
        let seen = count(version);
        support::wait_for(Duration::from_secs(20), "the new release answers", || {
            (count(version) > seen + 100).then_some(())
        });
    }
    let report = load.stop();
    eprintln!("two deploys on docker: {report:?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.last_version.as_deref(), Some("v3"));
    support::wait_for(Duration::from_secs(20), "old containers gone", || {
        (containers(&engine).len() == 2).then_some(())
    });

    // The instances' output is in graven's log store.
    support::wait_for(Duration::from_secs(20), "the logs of v3", || {
        let (_, stdout, _) = run(&home, &["logs", "--app", "demo"]);
        stdout.contains("hello v3 listening").then_some(())
    });

    // The lock-down, as the engine reports it and as it holds inside.
    let name = containers(&engine).remove(0);
    assert_eq!(
        inspect(&engine, &name, "{{.HostConfig.ReadonlyRootfs}}"),
        "true"
    );
    assert_eq!(inspect(&engine, &name, "{{.HostConfig.CapDrop}}"), "[ALL]");
    assert!(
        inspect(&engine, &name, "{{.HostConfig.SecurityOpt}}").contains("no-new-privileges"),
        "{}",
        inspect(&engine, &name, "{{.HostConfig.SecurityOpt}}")
    );
    let write = engine
        .docker()
        .args(["exec", &name, "/busybox", "touch", "/written"])
        .output()
        .unwrap();
    assert!(!write.status.success(), "a write to / succeeded");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );
    // The negative control: /tmp, a tmpfs, takes the same write.
    engine.run(&["exec", &name, "/busybox", "touch", "/tmp/written"]);
    // No way in through the engine writes the root either: a privileged exec cannot raise
    // its capabilities (no new privileges), `docker cp` is refused on a read-only root.
    let privileged = engine
        .docker()
        .args(["exec", "--privileged", "-u", "0", &name, "/busybox", "id"])
        .output()
        .unwrap();
    assert!(!privileged.status.success(), "a privileged exec ran");
    let file = temp.path().join("planted");
    std::fs::write(&file, "tampered\n").unwrap();
    let copied = engine
        .docker()
        .arg("cp")
        .arg(&file)
        .arg(format!("{name}:/tampered"))
        .output()
        .unwrap();
    assert!(
        !copied.status.success(),
        "docker cp wrote the read-only root"
    );
    // Those execs were a break-glass: the instance is tainted and replaced.
    support::wait_for(
        Duration::from_secs(30),
        "the exec'd container replaced",
        || {
            let now = containers(&engine);
            (!now.contains(&name) && now.len() == 2).then_some(())
        },
    );

    // A bad release (never healthy) rolls back by itself; v3 serves on.
    project(&dir, route, &engine, r#"VERSION = "v4", HEALTHY = "0""#);
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("rolled back"), "{stdout}");
    assert_eq!(version(route).as_deref(), Ok("v3"));

    // Once the bad release's containers are gone: two of v3's.
    let before = support::wait_for(Duration::from_secs(30), "v3's containers alone", || {
        let now = containers(&engine);
        // A container may go between the listing and the inspect: then not yet.
        let v3 = |name: &String| {
            let out = engine
                .docker()
                .args(["inspect", "--format", "{{.Config.Env}}", name])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("VERSION=v3")
        };
        (now.len() == 2 && now.iter().all(v3)).then_some(now)
    });
    // Drift: no way in through the engine writes the root (above), but someone with root on
    // the engine's host can: a file written into a container's upper dir condemns and
    // replaces it.
    let victim = before[0].clone();
    let upper = inspect(&engine, &victim, "{{.GraphDriver.Data.UpperDir}}");
    std::fs::write(Path::new(&upper).join("planted"), "tampered\n").unwrap();
    let replaced = support::try_wait_for(Duration::from_secs(30), || {
        let now = containers(&engine);
        (!now.contains(&victim) && now.len() == 2).then_some(())
    });
    assert!(
        replaced.is_some(),
        "the tampered container was not replaced; its diff: {}; drift: {}; status: {}\n{}",
        String::from_utf8_lossy(&engine.run(&["diff", &victim]).stdout),
        run(&home, &["drift", "--json"]).1,
        run(&home, &["status", "--json"]).1,
        up.stderr()
    );
    let (report, _) = run_ok(&home, &["drift", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let reasons: Vec<&serde_json::Value> = report["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["reason"])
        .collect();
    assert!(
        reasons.iter().any(|r| r["why"] == "root_changed"
            && r["path"] == "/planted"
            && r["change"] == "added"),
        "{reasons:?}"
    );
    assert_eq!(version(route).as_deref(), Ok("v3"));

    // The same image under plain `docker run` answers the same.
    let image = inspect(&engine, &before[1], "{{.Config.Image}}");
    let plain = engine.run(&["run", "-d", "-e", "VERSION=v3", &image]);
    let plain = String::from_utf8_lossy(&plain.stdout).trim().to_owned();
    let address = inspect(
        &engine,
        &plain,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    let address: std::net::SocketAddr = format!("{address}:8080").parse().unwrap();
    let answered = support::wait_for(Duration::from_secs(10), "docker run answers", || {
        support::runtime::get(address, "/").filter(|r| r.status == 200)
    });
    assert_eq!(answered.headers["x-hello-version"], "v3");
    let through_graven = support::runtime::get(route, "/").unwrap();
    assert_eq!(answered.body, through_graven.body);
}

/// The runtime's own drift check against a file planted in a container's upper dir: found
/// with its path and kind, recorded on the instance, reported as a change; an untouched
/// instance beside it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_planted_in_a_container_s_root_is_drift_with_its_evidence() {
    use graven::runtime::{
        AnyRuntime, DockerRuntime, Drift, DriftCheck, FileChange, InstanceSpec, Runtime,
    };
    let engine = Dockerd::start_with_bridge();
    let home = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(home.path());
    let runtime = AnyRuntime::Docker(DockerRuntime::open(home.path(), &engine.host()).unwrap());
    let tampered = runtime
        .start(InstanceSpec::new(image.clone()))
        .await
        .unwrap();
    let untouched = runtime.start(InstanceSpec::new(image)).await.unwrap();
    let upper = inspect(
        &engine,
        &format!("graven-{}", tampered.id),
        "{{.GraphDriver.Data.UpperDir}}",
    );
    std::fs::write(Path::new(&upper).join("planted"), "x").unwrap();
    let mut changes = runtime.changes();
    let ids = [tampered.id.clone(), untouched.id.clone()];
    let found = runtime
        .check_drift(&ids, DriftCheck::default())
        .await
        .unwrap();
    let expected = Drift::RootChanged {
        path: "/planted".to_owned(),
        change: FileChange::Added,
        expected: None,
        found: Some("docker diff: A".to_owned()),
    };
    assert_eq!(found, vec![(tampered.id.clone(), expected.clone())]);
    assert_eq!(
        runtime.inspect(&tampered.id).await.unwrap().drift,
        Some(expected)
    );
    assert_eq!(runtime.inspect(&untouched.id).await.unwrap().drift, None);
    let change = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        change,
        graven::runtime::InstanceChange::Drifted {
            id: tampered.id.clone()
        }
    );
    // Found once: a second check reports nothing new.
    assert_eq!(
        runtime
            .check_drift(&ids, DriftCheck::default())
            .await
            .unwrap(),
        vec![]
    );
    for id in ids {
        runtime.kill(&id).await.unwrap();
    }
}

/// A break-glass `docker exec` taints the instance (the engine's `exec_start` event, seen by
/// the watch); graven's own health probe, also an exec, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_exec_taints_the_instance_and_a_probe_does_not() {
    use graven::runtime::{AnyRuntime, DockerRuntime, InstanceSpec, Runtime};
    let engine = Dockerd::start_with_bridge();
    let home = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(home.path());
    let runtime = AnyRuntime::Docker(DockerRuntime::open(home.path(), &engine.host()).unwrap());
    // The watch runs from the first subscriber on.
    let _changes = runtime.changes();
    let instance = runtime.start(InstanceSpec::new(image)).await.unwrap();
    let probe = ["/hello".to_owned()];
    runtime
        .probe(&instance.id, &probe, Duration::from_secs(5))
        .await
        .unwrap();
    let name = format!("graven-{}", instance.id);
    // The probe's own event has arrived once a later exec's has: then it did not taint.
    engine
        .docker()
        .args(["exec", &name, "/hello"])
        .output()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if runtime.inspect(&instance.id).await.unwrap().tainted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a docker exec did not taint the instance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The negative control: a second instance only probed stays untainted, its probe's
    // event seen before a foreign exec into the first.
    let other = runtime
        .start(InstanceSpec::new(instance.image.clone()))
        .await
        .unwrap();
    runtime
        .probe(&other.id, &probe, Duration::from_secs(5))
        .await
        .unwrap();
    let mut changes = runtime.changes();
    engine.run(&["kill", &name]);
    // The kill's `die` follows the probe's `exec_start` on the one event stream.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(change) = changes.recv().await {
            if change
                == (graven::runtime::InstanceChange::Exited {
                    id: instance.id.clone(),
                })
            {
                return;
            }
        }
    })
    .await
    .expect("the kill is reported");
    assert!(!runtime.inspect(&other.id).await.unwrap().tainted);
    runtime.kill(&other.id).await.unwrap();
}
