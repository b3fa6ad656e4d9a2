//! A Docker Swarm of the test's own: three dockerd engines, each in a network namespace of its
//! own (`ip netns add`) joined by a veth pair to a bridge the test makes (`docker::make_bridge`,
//! a free /24 whose `.1` is the host's), each engine with its data root, exec root, pidfile
//! and unix socket in a temp dir and no iptables rules, as `docker::Dockerd`'s. Node 1 runs
//! `swarm init` with a 1 s dispatcher heartbeat (a lost node is seen in seconds) and the two
//! others join it as workers. Each engine is stopped by its own PID; the namespaces, veths and
//! bridge are deleted by the names this test made.
//!
//! `ip netns exec` mounts a fresh `/sys` for the namespace, which hides the host's cgroup
//! hierarchies under `/sys/fs/cgroup`: dockerd refuses to start without them ("Devices cgroup
//! isn't mounted"). The engine is started through a small shell that mounts the host's
//! hierarchies again (as `/proc/self/mountinfo` lists them) in the private mount namespace
//! `ip netns exec` made, then execs dockerd, so the child's PID is the engine's.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::docker::DOCKER;

const DOCKERD: &str = "/usr/sbin/dockerd";

/// Mounts the cgroup hierarchies `$CGROUP_MOUNTS` lists (`POINT TYPE OPTIONS` a line) under
/// the fresh `/sys`, then execs its arguments.
const CGROUP_SHELL: &str = r#"set -e
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
printf '%s\n' "$CGROUP_MOUNTS" | while read -r point type opts; do
  [ -n "$point" ] || continue
  mkdir -p "$point"
  mount -t "$type" -o "$opts" "$type" "$point"
done
exec "$@"
"#;

/// Swarms made by this test process so far, for unique names.
static SWARMS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub struct Node {
    dir: tempfile::TempDir,
    child: Child,
    netns: String,
    veth: String,
    address: Ipv4Addr,
    stopped: bool,
    /// The containers that ran when the engine was killed (`crash_node`): they outlive it,
    /// and are ended by their processes at teardown.
    orphans: Vec<String>,
}

pub struct Swarm {
    nodes: Vec<Node>,
    bridge: String,
}

/// The host's cgroup mounts under /sys/fs/cgroup, as `POINT TYPE OPTIONS` lines.
fn cgroup_mounts() -> String {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut lines = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (point, kind) = (fields[4], fields.get(dash + 1).copied().unwrap_or(""));
        let options = fields.get(dash + 3).copied().unwrap_or("rw");
        if (kind == "cgroup" || kind == "cgroup2") && point.starts_with("/sys/fs/cgroup") {
            // The unified hierarchy mounted at /sys/fs/cgroup itself (a cgroup v2 host)
            // replaces the tmpfs the shell mounts.
            lines.push(format!("{point} {kind} {options}"));
        }
    }
    lines.join("\n")
}

/// The bridge's address (its `.1`).
fn bridge_address(bridge: &str) -> Ipv4Addr {
    let out = super::succeed(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", bridge]));
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .expect("the bridge has an address");
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// dockerd in namespace `netns` with its data root, exec root, pidfile, socket and log
/// under `dir` (the same ones again for a restart: its Swarm state is kept there).
fn spawn_engine(dir: &Path, netns: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("log"))
        .unwrap();
    Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            CGROUP_SHELL,
            "sh",
            DOCKERD,
        ])
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .arg("-H")
        .arg(format!("unix://{}", dir.join("docker.sock").display()))
        .args(["--iptables=false", "--ip6tables=false"])
        .env("CGROUP_MOUNTS", cgroup_mounts())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start dockerd in its namespace")
}

impl Node {
    /// The engine's address, as graven.toml's `docker_host` writes it.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// The node's address on the test's bridge (the Swarm's advertised address).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The engine's own PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `docker` command talking to this node's engine.
    pub fn docker(&self) -> Command {
        let mut command = Command::new(DOCKER);
        command
            .env("DOCKER_HOST", self.host())
            .env("DOCKER_CONFIG", self.dir.path().join("config"));
        command
    }

    /// Runs `docker ARGS` on this node, panicking with its output when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        super::succeed(self.docker().args(args))
    }

    /// The lines `docker ARGS` prints.
    pub fn lines(&self, args: &[&str]) -> Vec<String> {
        String::from_utf8_lossy(&self.run(args).stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn start(
        bridge: &str,
        netns: String,
        veth: String,
        address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Node {
        let peer = format!("{veth}p");
        super::succeed(Command::new("ip").args(["netns", "add", &netns]));
        super::succeed(
            Command::new("ip").args(["link", "add", &veth, "type", "veth", "peer", "name", &peer]),
        );
        super::succeed(Command::new("ip").args(["link", "set", &veth, "master", bridge, "up"]));
        super::succeed(Command::new("ip").args(["link", "set", &peer, "netns", &netns]));
        let inside = |args: &[&str]| {
            super::succeed(
                Command::new("ip")
                    .args(["netns", "exec", &netns])
                    .args(args),
            );
        };
        inside(&["ip", "addr", "add", &format!("{address}/24"), "dev", &peer]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["ip", "route", "add", "default", "via", &gateway.to_string()]);
        let dir = tempfile::Builder::new()
            .prefix("graven-swarm-")
            .tempdir()
            .unwrap();
        let child = spawn_engine(dir.path(), &netns);
        let node = Node {
            dir,
            child,
            netns,
            veth,
            address,
            stopped: false,
            orphans: Vec::new(),
        };
        node.wait_answers();
        node
    }

    /// Waits (60 s at most) until the engine answers.
    fn wait_answers(&self) {
        let answered = super::try_wait_for(Duration::from_secs(60), || {
            let out = self.docker().arg("info").output().ok()?;
            out.status.success().then_some(())
        });
        if answered.is_none() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            panic!(
                "dockerd in {} did not answer within 60 s:\n{log}",
                self.netns
            );
        }
    }

    /// SIGKILL to the engine's own PID: a crash. Its containers run on, cut off from the
    /// Swarm; they are ended at teardown (`end_orphans`).
    fn crash(&mut self) {
        self.orphans = self.lines(&["ps", "-q", "--no-trunc"]);
        self.stopped = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL to what a crashed engine left: the processes in the node's namespace (its
    /// containerd and shims), and those in the cgroups of the containers it ran.
    fn end_orphans(&self) {
        if self.orphans.is_empty() {
            return;
        }
        let mut pids: Vec<i32> = Vec::new();
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
            if self.orphans.iter().any(|id| cgroup.contains(id.as_str())) {
                pids.push(pid);
            }
        }
        for pid in pids {
            // SAFETY: kill(2) on a process of this test's node: in its namespace, or in a
            // cgroup named by one of the container ids its engine listed.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// SIGTERM to the engine's own PID, 30 s to stop, then SIGKILL.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // SAFETY: kill(2) with a PID this struct spawned and has not reaped; SIGCONT in
        // case a test froze it (`Swarm::freeze_node`) and failed before it thawed it.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
        let stopped = super::try_wait_for(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten()
        });
        if stopped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Swarm {
    /// Three engines in namespaces of their own, one Swarm: node 0 its manager, nodes 1 and
    /// 2 workers; returns once the manager sees all three ready.
    pub fn start() -> Swarm {
        Swarm::with_nodes(3)
    }

    /// A Swarm of `count` nodes (the manager alone for 1), as `start`'s.
    pub fn with_nodes(count: u8) -> Swarm {
        assert!(
            Path::new(DOCKERD).exists() && Path::new(DOCKER).exists(),
            "docker.io is missing: scripts/test installs it"
        );
        let bridge = super::docker::make_bridge();
        let gateway = bridge_address(&bridge);
        let n = SWARMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut swarm = Swarm {
            nodes: Vec::new(),
            bridge,
        };
        for i in 0..count {
            let tag = format!("gsw{:x}x{n:x}n{i}", std::process::id());
            assert!(tag.len() <= 14, "veth name {tag} too long");
            let [a, b, c, _] = gateway.octets();
            let address = Ipv4Addr::new(a, b, c, 2 + i);
            let node = Node::start(&swarm.bridge, tag.clone(), tag, address, gateway);
            swarm.nodes.push(node);
        }
        let manager = &swarm.nodes[0];
        manager.run(&[
            "swarm",
            "init",
            "--advertise-addr",
            &manager.address.to_string(),
            "--dispatcher-heartbeat",
            "1s",
        ]);
        let token = manager
            .lines(&["swarm", "join-token", "-q", "worker"])
            .remove(0);
        let join = format!("{}:2377", manager.address);
        for worker in &swarm.nodes[1..] {
            worker.run(&[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &worker.address.to_string(),
                &join,
            ]);
        }
        swarm.wait_all_ready();
        swarm
    }

    /// Waits (60 s at most) until the manager sees every node ready.
    pub fn wait_all_ready(&self) {
        super::wait_for(Duration::from_secs(60), "every node ready", || {
            let ready = self
                .manager()
                .lines(&["node", "ls", "--format", "{{.Status}}"])
                .iter()
                .filter(|s| *s == "Ready")
                .count();
            (ready == self.nodes.len()).then_some(())
        });
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn manager(&self) -> &Node {
        &self.nodes[0]
    }

    /// Every node's engine address, as `swarm_engines` lists them.
    pub fn engines(&self) -> Vec<String> {
        self.nodes.iter().map(Node::host).collect()
    }

    /// Stops node `i`'s engine by its PID (a lost node, for the Swarm).
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Stops node `i`'s engine by its PID and starts it again on the same data root (it
    /// comes back in the Swarm as the same node); returns once it answers.
    pub fn restart_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.stop();
        node.child = spawn_engine(node.dir.path(), &node.netns);
        node.stopped = false;
        node.wait_answers();
    }

    /// SIGSTOP (`frozen`) or SIGCONT to node `i`'s engine's own PID: an engine that takes
    /// requests and never answers them, while its containers run on.
    pub fn freeze_node(&self, i: usize, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) with a PID this struct spawned and has not reaped.
        unsafe { libc::kill(self.nodes[i].child.id() as i32, signal) };
    }

    /// Kills node `i`'s engine by its PID (SIGKILL: a crashed node, whose containers run on
    /// without it).
    pub fn crash_node(&mut self, i: usize) {
        self.nodes[i].crash();
    }

    /// The running containers on each node whose engine runs.
    pub fn running_per_node(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| !n.stopped)
            .map(|n| n.lines(&["ps", "-q"]).len())
            .collect()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        // Workers first, so the manager is not left waiting on them.
        for node in self.nodes.iter_mut().rev() {
            node.stop();
            node.end_orphans();
            let _ = Command::new("ip")
                .args(["netns", "del", &node.netns])
                .status();
            // Usually gone with its namespace's end of the pair.
            let _ = Command::new("ip")
                .args(["link", "del", &node.veth])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
