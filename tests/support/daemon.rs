//! Helpers for tests of the control plane: service configs and releases, a free port for a
//! route, one request that says which version answered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use graven::controller::{ControllerHandle, DeployOrder, ServiceRelease};
use graven::events::{DeployOutcome, HealthConfig, ServiceConfig, Strategy};
use graven::store::Digest;

/// A controller's options on the in-memory runtime `fake`, with its log at `log`, ticking fast:
/// what the controller tests share (set a field on the result for more).
pub fn fake_options(
    fake: &graven::runtime::FakeRuntime,
    log: &std::path::Path,
) -> graven::controller::ControllerOptions {
    graven::controller::ControllerOptions {
        app: "hello".to_owned(),
        environment: "test".to_owned(),
        log: log.to_owned(),
        runtime: graven::runtime::AnyRuntime::Fake(fake.clone()),
        tick: Duration::from_millis(50),
        resync: Duration::from_secs(2),
        secrets: None,
        app_events: None,
        dns: None,
    }
}

/// A controller on the in-memory runtime `fake` with its log at `log` (`fake_options`).
pub fn fake_controller(
    fake: &graven::runtime::FakeRuntime,
    log: &std::path::Path,
) -> ControllerHandle {
    graven::controller::spawn(fake_options(fake, log)).unwrap()
}

/// A fast-checking service config behind `route`, with `env` for the instances.
pub fn config(instances: u32, route: SocketAddr, env: &[(&str, &str)]) -> ServiceConfig {
    ServiceConfig {
        instances,
        port: 8080,
        route: Some(route),
        route_kind: Default::default(),
        route_threads: None,
        srv_name: None,
        command: None,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: Default::default(),
        health: HealthConfig {
            path: "/healthz".to_owned(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            healthy_after: 1,
            unhealthy_after: 2,
            kind: Default::default(),
            command: Vec::new(),
            start_period: Duration::ZERO,
            from_image: false,
            events_caught_up: false,
        },
        strategy: Strategy::Rolling {
            max_surge: 1,
            max_unavailable: 0,
        },
        // A rollout must outlast a loaded machine; a test of a release that never gets
        // healthy sets a short one for it.
        health_deadline: Duration::from_secs(30),
        stop_grace: Duration::from_secs(2),
        volumes: vec![],
        limits: Default::default(),
        keep_releases: 10,
        host_network: false,
        outbound: true,
        entrypoint: None,
        user: None,
        tmpfs: Default::default(),
        drift: Default::default(),
        phoenix: None,
    }
}

pub fn release(config: ServiceConfig) -> ServiceRelease {
    ServiceRelease {
        service: "web".into(),
        image: Digest::of(b"hello image"),
        config,
    }
}

/// A deploy of `services` as a test asks for it: no source directory, no resume.
pub fn order(services: Vec<ServiceRelease>) -> DeployOrder {
    DeployOrder {
        services,
        source: None,
        resume: false,
        chaos: None,
    }
}

/// A port that was free a moment ago, for a route that must keep its address across restarts.
/// Taken below the kernel's ephemeral range: a port from that range (what binding port 0
/// gives) may be taken as the local port of any test's outgoing connection before the
/// route binds it, which CI saw once ("Address already in use"). Tried in a random order, so
/// tests running side by side rarely try the same one.
pub fn free_port() -> SocketAddr {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let first = 10_000u16.min(low / 2);
    let span = u64::from(low - first);
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for step in 0..span {
        let port = first + ((start + step * 7919) % span) as u16;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().unwrap();
        }
    }
    panic!("no free port below the ephemeral range ({first}..{low})");
}

/// One `GET /` on a fresh connection: the whole response, head and body.
pub fn get_root(route: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(route).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    Ok(response)
}

/// One `GET /` on a fresh connection; the version that answered.
pub fn version(route: SocketAddr) -> Result<String, String> {
    let response = get_root(route)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(response.lines().next().unwrap_or("").to_owned());
    }
    response
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-hello-version")
                .then(|| value.trim().to_owned())
        })
        .ok_or_else(|| "no version header".to_owned())
}

/// Waits (bounded) until the last deploy of `web` has an outcome, and returns it.
pub async fn outcome(controller: &ControllerHandle) -> DeployOutcome {
    let snapshot = tokio::time::timeout(
        Duration::from_secs(60),
        controller.wait_for(|s| s.state.deploys.last().is_some_and(|d| d.outcome.is_some())),
    )
    .await
    .expect("the deploy ends within 60s");
    snapshot
        .state
        .deploys
        .last()
        .unwrap()
        .outcome
        .clone()
        .unwrap()
}

/// A `graven up` child process, killed by its PID when dropped (also when a test fails).
pub struct Up {
    child: Option<std::process::Child>,
    pub home: std::path::PathBuf,
    stderr: Lines,
    /// What it printed on stdout (the rollout's outcome, a rollback's reason).
    stdout: Lines,
}

type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Collects the lines of `pipe` into a buffer, on a thread of its own.
fn collect_lines(pipe: impl std::io::Read + Send + 'static) -> Lines {
    let buffer = Lines::default();
    let lines = buffer.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    buffer
}

impl Up {
    /// Starts `graven up dir` with `GRAVEN_HOME=home` and the runtime `GRAVEN_RUNTIME` names
    /// (the in-process fake unless the test says otherwise); returns once it serves.
    pub fn start(home: &std::path::Path, dir: &std::path::Path, runtime: &str) -> Up {
        Up::start_with(home, dir, runtime, |_| {})
    }

    /// `start`, with `prepare` called on the command first (to hand it files, say).
    pub fn start_with(
        home: &std::path::Path,
        dir: &std::path::Path,
        runtime: &str,
        prepare: impl FnOnce(&mut std::process::Command),
    ) -> Up {
        Up::spawn(
            home,
            &["up".as_ref(), dir.as_os_str()],
            runtime,
            "graven: serving",
            prepare,
        )
    }

    /// Starts `graven up dir` as `start` does, for a project whose first rollout must not
    /// succeed; returns once `up` says so.
    pub fn start_unsuccessful(home: &std::path::Path, dir: &std::path::Path, runtime: &str) -> Up {
        Up::spawn(
            home,
            &["up".as_ref(), dir.as_os_str()],
            runtime,
            "did not succeed",
            |_| {},
        )
    }

    /// Starts `graven daemon` (no project); returns once its socket listens.
    pub fn daemon(home: &std::path::Path, runtime: &str) -> Up {
        Up::daemon_with(home, runtime, |_| {})
    }

    /// `daemon`, with `prepare` called on the command first.
    pub fn daemon_with(
        home: &std::path::Path,
        runtime: &str,
        prepare: impl FnOnce(&mut std::process::Command),
    ) -> Up {
        Up::spawn(
            home,
            &["daemon".as_ref()],
            runtime,
            "graven: daemon listening",
            prepare,
        )
    }

    fn spawn(
        home: &std::path::Path,
        args: &[&std::ffi::OsStr],
        runtime: &str,
        ready: &str,
        prepare: impl FnOnce(&mut std::process::Command),
    ) -> Up {
        let mut command = super::graven(home);
        prepare(&mut command);
        let mut child = command
            .args(args)
            .env("GRAVEN_RUNTIME", runtime)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("graven up starts");
        let stderr = collect_lines(child.stderr.take().expect("piped"));
        let stdout = collect_lines(child.stdout.take().expect("piped"));
        let mut up = Up {
            child: Some(child),
            home: home.to_owned(),
            stderr,
            stdout,
        };
        // `up` bakes the project first: a Debian base imported by several tests at once on a
        // loaded machine has taken more than a minute.
        up.wait_for_line(ready, Duration::from_secs(120));
        up
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// What it printed on both streams, stdout first.
    fn said(&self) -> String {
        format!("{}\n--- stderr:\n{}", self.stdout(), self.stderr())
    }

    /// Waits for a line of its stderr containing `text`; fails if it exits first, or says its
    /// first rollout did not succeed (a test waiting for it to serve would only find a route
    /// with nothing behind it).
    /// `up`'s stdout once it holds `text`. Its stdout and stderr are read by a thread each,
    /// so what it wrote to stdout before a line on stderr that a test waited for may not have
    /// been read yet.
    pub fn stdout_with(&self, text: &str) -> String {
        let seen = super::try_wait_for(super::LEAST_WAIT, || {
            let stdout = self.stdout();
            stdout.contains(text).then_some(stdout)
        });
        seen.unwrap_or_else(|| {
            panic!(
                "graven up did not write {text:?} to stdout within {:?}; it said:\n{}",
                super::LEAST_WAIT,
                self.said()
            )
        })
    }

    pub fn wait_for_line(&mut self, text: &str, deadline: Duration) {
        let deadline = deadline.max(super::LEAST_WAIT);
        let stderr = self.stderr.clone();
        let child = self.child.as_mut().expect("running");
        let seen = super::try_wait_for(deadline, || {
            let lines = stderr.lock().unwrap();
            if lines.iter().any(|l| l.contains(text)) {
                return Some(Ok(()));
            }
            if lines.iter().any(|l| l.contains("did not succeed")) {
                return Some(Err("said its rollout did not succeed".to_owned()));
            }
            drop(lines);
            match child.try_wait() {
                Ok(Some(status)) => Some(Err(format!("exited ({status})"))),
                _ => None,
            }
        });
        match seen {
            Some(Ok(())) => {}
            Some(Err(what)) => panic!(
                "graven up {what} before {text:?}; it said:\n{}",
                self.said()
            ),
            None => panic!(
                "timed out after {deadline:?} waiting for graven up to say {text:?}; it said:\n{}",
                self.said()
            ),
        }
    }

    /// Sends `signal` and waits (bounded) for the process to end.
    pub fn signal(&mut self, signal: i32, deadline: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped yet, so
        // the PID cannot have been reused.
        unsafe { libc::kill(child.id() as i32, signal) };
        super::wait_for(deadline, "graven up to exit", || child.try_wait().unwrap())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // After `signal` the test has killed this controller itself, to restart another on
        // the same home: that one now owns the instances, so nothing is cleaned up here.
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        // Instances outlive the graven that started them, by design: killing the controller
        // leaves them running. A test must not, so whatever is left in its home goes too,
        // and the daemon's address on the bridge with it (a sweep would free it only once the
        // home is gone).
        remove_instances(&self.home);
        graven::runtime::local::net::release_daemon_address(&self.home);
    }
}

/// Stops (at once) and removes every local instance under `home`, through the runtime.
pub fn remove_instances(home: &std::path::Path) {
    use graven::runtime::Runtime as _;
    if !home.join("instances").is_dir() {
        return;
    }
    let Ok(runtime) = graven::runtime::local::LocalRuntime::open(home) else {
        return;
    };
    let Ok(tokio) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    // A start the killed controller had under way has no state yet, so a listing skips it,
    // and its shim runs on: it is listed once its state is written, a moment later (seconds
    // on a loaded machine). So the home is listed again until a listing a little after the
    // last removal is empty.
    tokio.block_on(async {
        for _ in 0..100 {
            let listed = runtime.list().await.unwrap_or_default();
            for instance in &listed {
                let _ = runtime.stop(&instance.id, Duration::ZERO).await;
                let _ = runtime.remove(&instance.id).await;
            }
            if listed.is_empty() && settled(home) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Whether no start is under way in `home`: every instance directory left has a state.
fn settled(home: &std::path::Path) -> bool {
    std::fs::read_dir(home.join("instances")).map_or(true, |entries| {
        entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .all(|e| e.path().join("state.json").exists())
    })
}

/// Runs a graven command to completion: (success, stdout, stderr).
pub fn run(home: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = super::graven(home)
        .args(args)
        .output()
        .expect("graven runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a graven command that must succeed (else fails the test with its stderr): (stdout,
/// stderr).
pub fn run_ok(home: &std::path::Path, args: &[&str]) -> (String, String) {
    let output = super::succeed(super::graven(home).args(args));
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `future` to completion on a runtime of its own, for a test that is not async.
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The instances of app `demo` on the local runtime under `home`, exited ones included.
pub fn demo_instances(home: &std::path::Path) -> Vec<graven::runtime::Instance> {
    use graven::runtime::Runtime as _;
    let local = graven::runtime::LocalRuntime::open(home).unwrap();
    block_on(local.list())
        .unwrap()
        .into_iter()
        .filter(|i| i.labels.get("app").map(String::as_str) == Some("demo"))
        .collect()
}

/// Sends one `GET /` after another to `route` for `during`; the version each got (or why
/// it failed).
pub fn versions_during(route: SocketAddr, during: Duration) -> Vec<Result<String, String>> {
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + during;
    while std::time::Instant::now() < end {
        seen.push(version(route));
    }
    seen
}

/// The runtime integration tests run instances on: `GRAVEN_TEST_RUNTIME`, else `local`.
pub fn test_runtime() -> String {
    std::env::var("GRAVEN_TEST_RUNTIME").unwrap_or_else(|_| "local".to_owned())
}

/// A scratch dir holding a graven home and the example as a project at `VERSION = "v1"`, with
/// `instances` of it behind a free route: (the dir, which must be kept, home, project, route).
pub fn v1_project(
    instances: u32,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    SocketAddr,
) {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    hello_project(&dir, route, instances, r#"VERSION = "v1""#, "");
    (temp, home, dir, route)
}

/// Writes the example as a project (its Containerfile and static binary in `dist/`), with
/// `graven.toml` as `write_project` makes it.
pub fn hello_project(
    dir: &std::path::Path,
    route: SocketAddr,
    instances: u32,
    env: &str,
    extra: &str,
) {
    write_project(dir, route, instances, env, extra);
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::copy(super::hello_binary(), dir.join("dist/hello")).unwrap();
    std::fs::copy(
        super::workspace().join("examples/hello/Containerfile"),
        dir.join("Containerfile"),
    )
    .unwrap();
}

/// The `health_deadline` of `write_project`'s deploys: the time a whole rollout has, from the
/// deploy's start, until every new instance is healthy. Generous, as a slow machine must make
/// a rollout slower, never roll it back: under load a 4-instance deploy given 3 s rolled
/// back. A test that deploys a release that never gets healthy on purpose shortens it for
/// that release (`set_health_deadline`), else its rollback waits the whole deadline.
pub const HEALTH_DEADLINE: &str = "60s";

/// Sets the first `health_deadline` of the project's `graven.toml` in `dir` (the first
/// service's, as `write_project` writes it) to `deadline`, say `"3s"`.
pub fn set_health_deadline(dir: &std::path::Path, deadline: &str) {
    let path = dir.join("graven.toml");
    let toml = std::fs::read_to_string(&path).unwrap();
    let key = r#"health_deadline = ""#;
    let start = toml
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {toml}"))
        + key.len();
    let end = start + toml[start..].find('"').expect("a closing quote");
    std::fs::write(
        path,
        format!("{}{deadline}{}", &toml[..start], &toml[end..]),
    )
    .unwrap();
}

/// Writes a project: `graven.toml` for app `demo` with one service `web` behind `route`,
/// `instances` of it with `env`, and an empty `FROM scratch` Containerfile.
pub fn write_project(
    dir: &std::path::Path,
    route: SocketAddr,
    instances: u32,
    env: &str,
    extra: &str,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Containerfile"), "FROM scratch\n").unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "demo"

[services.web]
instances = {instances}
port = 8080
route = "{route}"
env = {{ {env} }}
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "{HEALTH_DEADLINE}" }}
stop_grace = "2s"
{extra}
"#
        ),
    )
    .unwrap();
}

/// Stops and removes every instance under a home when dropped: for a test that kills or
/// signals graven itself, so a failed assertion leaves nothing running.
pub struct RemoveInstancesOnDrop(pub std::path::PathBuf);

impl Drop for RemoveInstancesOnDrop {
    fn drop(&mut self) {
        remove_instances(&self.0);
    }
}

/// A process as an instance's state records it: PID and start time (clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub pid: u32,
    pub start: u64,
}

impl Recorded {
    /// Whether that very process still runs (not a zombie, not a reused PID), read from /proc.
    pub fn alive(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some((_, rest)) = text.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
        !zombie && fields.get(19).and_then(|s| s.parse().ok()) == Some(self.start)
    }
}

/// The processes every instance's `state.json` under `home` records: for each instance its
/// shim, then its workload.
pub fn recorded_processes(home: &std::path::Path) -> Vec<Recorded> {
    let mut found = Vec::new();
    let Ok(dirs) = std::fs::read_dir(home.join("instances")) else {
        return found;
    };
    for dir in dirs.flatten() {
        let Ok(text) = std::fs::read_to_string(dir.path().join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        for key in ["shim", "workload"] {
            let process = &state[key];
            if let (Some(pid), Some(start)) = (process["pid"].as_u64(), process["start"].as_u64()) {
                found.push(Recorded {
                    pid: pid as u32,
                    start,
                });
            }
        }
    }
    found
}
