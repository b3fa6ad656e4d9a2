//! Every kind of service, as users run them: the real binary, the local runtime, images
//! built from the Debian base and the example. A worker (no route, no port, health `none`)
//! deploys, is replaced when killed and rolls; a `tcp` check passes a server whose HTTP
//! check fails (the negative control) and rolls back one that does not listen; `exec` checks
//! pass and fail inside the instance without tainting it; the image's HEALTHCHECK is used
//! when graven.toml has no health table; bad health input is refused before anything starts.
//! A first release that rolls back leaves `status` saying so, and a failure of root's
//! missing capabilities comes with a hint.

mod support;

use std::path::Path;
use std::time::Duration;

use support::daemon::{Up, demo_instances, free_port, run, run_ok, version};

/// Writes a project: the example's binary in `dist/`, a Containerfile of `containerfile`
/// (which may `COPY dist/hello /hello`), and `graven.toml` of app `demo` with `services`.
fn project(dir: &Path, containerfile: &str, services: &str) {
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::copy(support::hello_binary(), dir.join("dist/hello")).unwrap();
    std::fs::write(dir.join("Containerfile"), containerfile).unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!("app = \"demo\"\n\n{services}"),
    )
    .unwrap();
}

/// The Debian base with the example in it as its CMD (which `command` replaces), and
/// `extra` after.
fn debian(extra: &str) -> String {
    format!(
        "FROM docker-archive:{}\nCOPY dist/hello /hello\nCMD [\"/hello\"]\n{extra}",
        support::debian_base().display()
    )
}

/// The example alone on an empty base, as examples/hello builds it.
fn scratch() -> String {
    std::fs::read_to_string(support::workspace().join("examples/hello/Containerfile")).unwrap()
}

/// `graven status --json` of the only app.
fn status(home: &Path) -> serde_json::Value {
    let (stdout, _) = run_ok(home, &["status", "--json"]);
    let status: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    status.into_iter().next().expect("one app")
}

/// The instances of `release` the controller counts healthy, by name.
fn healthy(home: &Path, release: u64) -> Vec<String> {
    let status = status(home);
    status["state"]["instances"]
        .as_object()
        .map(|instances| {
            instances
                .iter()
                .filter(|(_, i)| i["release"] == release && i["lifecycle"] == "healthy")
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded: the first start unpacks the Debian base) until release 1 has a healthy
/// instance.
fn wait_healthy(home: &Path) {
    support::wait_for(Duration::from_secs(90), "a healthy instance", || {
        (!healthy(home, 1).is_empty()).then_some(())
    });
}

/// The health check release `number` recorded.
fn recorded_health(home: &Path, number: u64) -> serde_json::Value {
    let status = status(home);
    let releases = status["state"]["releases"].as_object().unwrap();
    releases
        .values()
        .find(|r| r["number"] == number)
        .unwrap_or_else(|| panic!("no release {number} in {releases:?}"))["config"]["health"]
        .clone()
}

/// Asserts that a GET through `route` is answered by `want`; when it is not, says what the
/// control plane knew then (its status and the end of its history), so a failure on a loaded
/// machine can be told from a bug.
fn assert_serves(home: &Path, route: std::net::SocketAddr, want: &str) {
    let got = version(route);
    if got.as_deref() != Ok(want) {
        let (_, status, _) = run(home, &["status"]);
        let (_, history, _) = run(home, &["history"]);
        let tail: Vec<&str> = history.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "GET through {route} gave {got:?}, not {want:?}\nstatus:\n{status}\nhistory (end):\n{}",
            tail.join("\n")
        );
    }
}

/// The running local instances of app `demo`.
fn running(home: &Path) -> Vec<graven::runtime::Instance> {
    demo_instances(home)
        .into_iter()
        .filter(|i| !i.status.is_exited())
        .collect()
}

/// Deploy settings with a short health deadline, for the releases that must roll back (they
/// never get healthy, so the deadline is their wait). A release that must serve gets `SLOW`:
/// a slow machine must make its rollout slower, never roll it back (a first release rolled
/// back leaves `up` serving nothing, and the first GET after it gets no answer: what CI saw
/// once in the tcp test).
const DEPLOY: &str = r#"deploy = { max_surge = 1, max_unavailable = 0, health_deadline = "5s" }
stop_grace = "1s""#;
const SLOW: &str = r#"deploy = { max_surge = 1, max_unavailable = 0, health_deadline = "90s" }
stop_grace = "1s""#;

fn worker(version: &str) -> String {
    format!(
        r#"[services.worker]
command = ["/bin/sh", "-c", "echo working {version}; exec sleep 1000"]
{SLOW}
"#
    )
}

#[test]
fn a_worker_with_no_route_deploys_is_replaced_when_killed_and_rolls() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    // No route, no port, no health table: the kind is `none`.
    project(&dir, &debian(""), &worker("v1"));
    let _up = Up::start(&home, &dir, "local");
    let first = support::wait_for(Duration::from_secs(90), "a healthy worker", || {
        healthy(&home, 1).pop()
    });
    assert_eq!(recorded_health(&home, 1)["kind"], "none");

    let victim = running(&home).remove(0);
    let pid = victim.pid.expect("a local instance has a pid");
    // SAFETY: kill(2) of the instance's own process, whose PID its runtime just reported.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    support::wait_for(Duration::from_secs(30), "a replacement worker", || {
        let healthy = healthy(&home, 1);
        let ids: Vec<_> = running(&home).into_iter().map(|i| i.id).collect();
        (healthy.len() == 1 && healthy[0] != first && ids.len() == 1 && ids[0] != victim.id)
            .then_some(())
    });

    project(&dir, &debian(""), &worker("v2"));
    let (stdout, _) = run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!stdout.contains("rolled back"), "{stdout}");
    assert_eq!(healthy(&home, 2).len(), 1, "{stdout}");
    support::wait_for(Duration::from_secs(20), "the old worker gone", || {
        (running(&home).len() == 1).then_some(())
    });
}

fn tcp_web(
    route: std::net::SocketAddr,
    version: &str,
    env: &str,
    health: &str,
    deploy: &str,
) -> String {
    format!(
        r#"[services.web]
port = 8080
route = "{route}"
env = {{ VERSION = "{version}", {env} }}
health = {{ {health}, interval = "100ms", healthy_after = 1 }}
{deploy}
"#
    )
}

#[test]
fn a_tcp_check_passes_a_server_whose_http_check_fails() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    // HEALTHY=0: the example answers /healthz with 503, but it listens.
    let unhealthy = r#"HEALTHY = "0""#;
    project(
        &dir,
        &scratch(),
        &tcp_web(route, "v1", unhealthy, r#"kind = "tcp""#, SLOW),
    );
    let _up = Up::start(&home, &dir, "local");
    assert_serves(&home, route, "v1");
    assert_eq!(recorded_health(&home, 1)["kind"], "tcp");

    // Negative control: the same server with the http check never becomes healthy.
    project(
        &dir,
        &scratch(),
        &tcp_web(route, "v2", unhealthy, r#"kind = "http""#, DEPLOY),
    );
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok && stdout.contains("rolled back"), "{stdout}\n{stderr}");
    assert_serves(&home, route, "v1");

    // A tcp check of a server that does not listen on its address fails: rolled back.
    project(
        &dir,
        &scratch(),
        &tcp_web(
            route,
            "v3",
            r#"HOST = "127.0.0.2""#,
            r#"kind = "tcp""#,
            DEPLOY,
        ),
    );
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok && stdout.contains("rolled back"), "{stdout}\n{stderr}");
    assert_serves(&home, route, "v1");
}

fn exec_web(route: std::net::SocketAddr, version: &str, command: &str, deploy: &str) -> String {
    format!(
        r#"[services.web]
port = 8080
route = "{route}"
env = {{ VERSION = "{version}" }}
health = {{ command = {command}, interval = "100ms", timeout = "2s", healthy_after = 3 }}
{deploy}
"#
    )
}

#[test]
fn exec_checks_pass_and_fail_inside_the_instance_without_tainting_it() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    // Passes only inside the instance: the file is the image's, and $PORT the instance's.
    // It fails, saying so, once the test leaves a file in its volume.
    let inside = r#"["/bin/sh", "-c", "test -x /hello && test -n \"$PORT\" && if test -e /data/broken; then echo broken by the test; exit 1; fi"]"#;
    let volume = "volumes = { data = \"/data\" }\n";
    project(
        &dir,
        &debian(""),
        &(exec_web(route, "v1", inside, SLOW) + volume),
    );
    let _up = Up::start(&home, &dir, "local");
    wait_healthy(&home);
    assert_serves(&home, route, "v1");
    let health = recorded_health(&home, 1);
    assert_eq!(health["kind"], "exec");
    let serving = running(&home);
    assert_eq!(serving.len(), 1);
    assert!(!serving[0].tainted, "an exec probe tainted the instance");

    // A failing command (a string: through /bin/sh -c) never makes v2 healthy.
    project(
        &dir,
        &debian(""),
        &exec_web(route, "v2", r#""echo not ready; exit 3""#, DEPLOY),
    );
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok && stdout.contains("rolled back"), "{stdout}\n{stderr}");
    assert_serves(&home, route, "v1");
    // Seconds of probes later, the v1 instance is the same, untainted (a tainted one is
    // condemned and replaced).
    let still = support::wait_for(Duration::from_secs(20), "v2's instance stopped", || {
        Some(running(&home)).filter(|r| r.len() == 1)
    });
    assert_eq!(still[0].id, serving[0].id);
    assert!(!still[0].tainted, "an exec probe tainted the instance");

    // A failing check's answer is the exec's exit and its last line of output.
    std::fs::write(home.join("volumes/data/broken"), "").unwrap();
    support::wait_for(Duration::from_secs(30), "the instance unhealthy", || {
        let (_, history, _) = run(&home, &["history"]);
        history
            .contains("unhealthy: exit 1: broken by the test")
            .then_some(())
    });
}

#[test]
fn the_images_healthcheck_is_used_without_a_health_table() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    let web = |version: &str, deploy: &str| {
        format!(
            r#"[services.web]
port = 8080
route = "{route}"
env = {{ VERSION = "{version}" }}
{deploy}
"#
        )
    };
    // Docker runs `CMD-SHELL` through /bin/sh -c inside the container, every interval, and
    // counts the container healthy after one pass.
    project(
        &dir,
        &debian("HEALTHCHECK --interval=200ms --timeout=2s --retries=2 CMD test -x /hello\n"),
        &web("v1", SLOW),
    );
    let _up = Up::start(&home, &dir, "local");
    wait_healthy(&home);
    assert_serves(&home, route, "v1");
    let health = recorded_health(&home, 1);
    assert_eq!(health["kind"], "exec", "{health}");
    assert_eq!(health["from_image"], true, "{health}");
    assert_eq!(
        health["command"],
        serde_json::json!(["/bin/sh", "-c", "test -x /hello"]),
        "{health}"
    );
    assert_eq!(health["healthy_after"], 1, "{health}");
    assert_eq!(health["unhealthy_after"], 2, "{health}");

    // Docker's exec form: run as it is; this one fails, so v2 is rolled back.
    project(
        &dir,
        &debian("HEALTHCHECK --interval=200ms CMD [\"/bin/false\"]\n"),
        &web("v2", DEPLOY),
    );
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok && stdout.contains("rolled back"), "{stdout}\n{stderr}");
    assert_serves(&home, route, "v1");

    // A health table wins over the image's HEALTHCHECK (which would fail here).
    let with_table = format!(
        "{}health = {{ path = \"/healthz\", interval = \"100ms\" }}\n",
        web("v3", SLOW)
    );
    project(
        &dir,
        &debian("HEALTHCHECK --interval=200ms CMD [\"/bin/false\"]\n"),
        &with_table,
    );
    let (stdout, _) = run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!stdout.contains("rolled back"), "{stdout}");
    assert_serves(&home, route, "v3");
    assert_eq!(recorded_health(&home, 3).get("kind"), None);
}

#[test]
fn bad_health_input_is_refused_before_anything_starts() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    let up = |home: &Path| {
        let mut command = support::graven(home);
        command
            .args(["up", dir.to_str().unwrap()])
            .env("GRAVEN_RUNTIME", "local");
        let out = command.output().unwrap();
        assert!(!out.status.success(), "graven up succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // An exec command the image does not have: refused once the image is baked, before any
    // release is recorded or instance started.
    project(
        &dir,
        &debian(""),
        &exec_web(route, "v1", r#"["/usr/bin/pg_isready", "-q"]"#, DEPLOY),
    );
    let stderr = up(&home);
    assert!(
        stderr.contains("service web: image")
            && stderr.contains("has no /usr/bin/pg_isready to run as its health check"),
        "{stderr}"
    );
    assert!(demo_instances(&home).is_empty());
    // A name is looked up on the image's PATH, as the probe's exec will.
    project(
        &dir,
        &debian(""),
        &exec_web(route, "v1", r#"["pg_isready"]"#, DEPLOY),
    );
    let stderr = up(&home);
    assert!(stderr.contains("has no pg_isready to run"), "{stderr}");
    assert!(demo_instances(&home).is_empty());

    // An exec check with no command: graven.toml's problem.
    project(
        &dir,
        &debian(""),
        r#"[services.a]
health = { kind = "exec" }
"#,
    );
    let stderr = up(&home);
    assert!(
        stderr.contains("services.a.health.kind: an exec health check needs a command"),
        "{stderr}"
    );
    assert!(demo_instances(&home).is_empty());

    // A tcp check with no port, and an image that exposes none: the deploy's (a port may
    // come from the image's EXPOSE, so only the image can tell).
    project(
        &dir,
        &debian(""),
        r#"[services.b]
health = { kind = "tcp" }
"#,
    );
    let stderr = up(&home);
    assert!(
        stderr.contains("service b: no port: the image exposes none"),
        "{stderr}"
    );
    assert!(demo_instances(&home).is_empty());
}

#[test]
fn an_exec_probe_that_outlasts_its_timeout_is_killed_and_leaves_nothing() {
    use graven::runtime::{InstanceSpec, LocalRuntime, Runtime as _};
    graven::sandbox::set_helper_binary(support::graven_bin());
    let home = tempfile::tempdir().unwrap();
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.path().to_owned());
    let image = support::runtime::hello_image(home.path());
    let runtime = LocalRuntime::open(home.path()).unwrap();
    let mut spec = InstanceSpec::new(image);
    spec.env.insert("REUSE_PORT".to_owned(), "1".to_owned());
    let instance = support::daemon::block_on(runtime.start(spec)).unwrap();
    let address = instance.address.unwrap();
    support::wait_for(Duration::from_secs(10), "the instance listening", || {
        support::runtime::get(address, "/healthz")
    });
    // The example again, inside: with REUSE_PORT it binds beside the instance and serves
    // until it is killed.
    let command = ["/hello".to_owned()];
    let output = support::daemon::block_on(runtime.probe(
        &instance.id,
        &command,
        Duration::from_millis(500),
    ))
    .unwrap();
    assert!(output.timed_out, "{output:?}");
    assert_eq!(output.code, None, "{output:?}");
    assert!(output.last_line.contains("listening"), "{output:?}");
    assert_eq!(
        output.to_string(),
        format!("timed out: {}", output.last_line)
    );
    // Nothing of the probe is left: the instance's PID namespace holds its own process only.
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let theirs = namespace(&instance.pid.unwrap().to_string()).unwrap();
    support::wait_for(Duration::from_secs(10), "the probe gone", || {
        let inside = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter(|e| namespace(&e.file_name().to_string_lossy()) == Some(theirs.clone()))
            .count();
        (inside == 1).then_some(())
    });
    let seen = support::daemon::block_on(runtime.inspect(&instance.id)).unwrap();
    assert!(!seen.tainted && !seen.status.is_exited(), "{seen:?}");
}

#[test]
fn a_rolled_back_first_release_shows_in_status_and_eperm_as_root_gets_a_hint() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    // What many Docker images' entrypoints do as root: chown their data to their own user.
    // A long deadline: each release must roll back for its instances' failures (with their
    // lines), not for a slow first start.
    let worker = |script: &str| {
        format!("[services.worker]\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\n{SLOW}\n")
    };
    project(
        &dir,
        &debian(""),
        &worker("touch /tmp/data && chown 33 /tmp/data"),
    );
    let mut up = Up::start_unsuccessful(&home, &dir, "local");
    let out = up.stdout_with("root-in-an-instance");
    assert!(
        out.contains("worker: release 1 rolled back: its instances failed 3 times"),
        "{out}"
    );
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("an instance holds no capability"), "{out}");
    let (status, _) = run_ok(&home, &["status"]);
    assert!(
        status.contains("service worker: no release is wanted: release 1 was rolled back"),
        "{status}"
    );
    // A failure of another kind gets no such hint.
    project(&dir, &debian(""), &worker("echo no luck; exit 3"));
    let (_, out, _) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(
        out.contains("worker: release 2 rolled back: its instances failed 3 times"),
        "{out}"
    );
    assert!(out.contains("no luck"), "{out}");
    assert!(!out.contains("no capability"), "{out}");
    let (status, _) = run_ok(&home, &["status"]);
    assert!(
        status.contains("service worker: no release is wanted: release 2 was rolled back"),
        "{status}"
    );
    let stopped = up.signal(libc::SIGTERM, Duration::from_secs(30));
    assert_eq!(stopped.code(), Some(1), "{stopped}");
}
