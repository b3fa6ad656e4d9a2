//! A Docker engine of the test's own: dockerd with its data, exec root, pidfile and unix socket
//! in a temp dir, no iptables rules, waited for with a deadline and stopped by its own PID.
//! `start` gives it no bridge (builds use the host network, as `docker build
//! --network=host`); `start_with_bridge` gives it a bridge of its own, made by the test (a
//! name and a free /24 of 10.215.0.0/16 nothing else routes), so its containers get
//! addresses graven reaches from the host, and deleted by that name after the engine stops.
//! The client is Debian's docker.io (`/usr/bin/docker`, 20.10, BuildKit built in), whatever
//! else is on the PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";

pub struct Dockerd {
    dir: tempfile::TempDir,
    child: Child,
    /// The bridge this test made for the engine, deleted by name when it stops.
    bridge: Option<String>,
}

/// Bridges made by this test process so far, for unique names.
static BRIDGES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// One bridge made at a time in this process, so two never pick the same free /24.
static BRIDGE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Makes a bridge with the first free /24 of 10.215.0.0/16 (one no route of the host's
/// covers), up, its address `.1`; returns its name (the Swarm harness's too).
pub fn make_bridge() -> String {
    let _held = BRIDGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let n = BRIDGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("gvd{:x}x{n:x}", std::process::id());
    assert!(name.len() <= 15, "bridge name {name} too long");
    super::succeed(Command::new("ip").args(["link", "add", &name, "type", "bridge"]));
    let start = (std::process::id() as usize + n as usize * 7) % 250;
    for step in 0..250 {
        let third = (start + step) % 250 + 1;
        let routes = super::succeed(Command::new("ip").args([
            "-4",
            "route",
            "show",
            "match",
            &format!("10.215.{third}.1"),
        ]));
        let taken = String::from_utf8_lossy(&routes.stdout)
            .lines()
            .any(|l| !l.starts_with("default"));
        if taken {
            continue;
        }
        let added = Command::new("ip")
            .args(["addr", "add", &format!("10.215.{third}.1/24"), "dev", &name])
            .status()
            .unwrap();
        if added.success() {
            super::succeed(Command::new("ip").args(["link", "set", &name, "up"]));
            return name;
        }
    }
    let _ = Command::new("ip").args(["link", "del", &name]).status();
    panic!("no free /24 in 10.215.0.0/16 for a test bridge");
}

impl Dockerd {
    /// Starts the engine; panics with its log when it does not answer within 60 s.
    pub fn start() -> Dockerd {
        Dockerd::start_with(None)
    }

    /// Starts the engine on a bridge of its own, which this test makes and deletes.
    pub fn start_with_bridge() -> Dockerd {
        Dockerd::start_with(Some(make_bridge()))
    }

    /// The engine's address, as graven.toml's `docker_host` writes it.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// The engine's own PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start_with(bridge: Option<String>) -> Dockerd {
        assert!(
            Path::new(DOCKERD).exists() && Path::new(DOCKER).exists(),
            "docker.io is missing: scripts/test installs it"
        );
        let dir = tempfile::Builder::new()
            .prefix("graven-dockerd-")
            .tempdir()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(DOCKERD)
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!(
                "unix://{}",
                dir.path().join("docker.sock").display()
            ))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ])
            .arg(format!("--bridge={}", bridge.as_deref().unwrap_or("none")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let engine = Dockerd { dir, child, bridge };
        let answered = super::try_wait_for(Duration::from_secs(60), || {
            let out = engine.docker().arg("info").output().ok()?;
            out.status.success().then_some(())
        });
        if answered.is_none() {
            let log = std::fs::read_to_string(engine.dir.path().join("log")).unwrap_or_default();
            panic!("dockerd did not answer within 60 s:\n{log}");
        }
        engine
    }

    /// A `docker` command talking to this engine, BuildKit on.
    pub fn docker(&self) -> Command {
        let mut command = Command::new(DOCKER);
        command
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.dir.path().join("docker.sock").display()),
            )
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", self.dir.path().join("config"));
        command
    }

    /// Runs `docker ARGS`, panicking with its output when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        super::succeed(self.docker().args(args))
    }

    /// `docker save` of `image` into a docker-archive in the engine's dir.
    pub fn save(&self, image: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("{}.tar", image.replace(['/', ':'], "_")));
        self.run(&["save", "-o", path.to_str().unwrap(), image]);
        path
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM to this engine's own PID, 30 s to stop, then SIGKILL.
        // SAFETY: kill(2) with a PID this struct spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let stopped = super::try_wait_for(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten()
        });
        if stopped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // What the engine left mounted under its dir (netns files, overlay mounts) would keep
        // the temp dir from going away.
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").args(["-l", point]).status();
        }
        if let Some(bridge) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", bridge]).status();
        }
    }
}
