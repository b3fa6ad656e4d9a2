//! The runtime owns instances: starting one disposable server from one image, observing it,
//! stopping it (signal, grace, kill) and removing it, on some backend.
//!
//! This file is the contract every backend shares (local now; docker, swarm and kubernetes
//! later): the `Runtime` trait, the `AnyRuntime` enum that dispatches over the fixed set of
//! backends, and the instance types. The runtime knows nothing of services, releases, routes
//! or deploys: those are the controller's words; here an instance carries opaque labels.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Digest;

pub mod docker;
#[cfg(feature = "dev-tools")]
pub mod fake;
pub mod local;
pub mod settings;
pub mod swarm;

pub use docker::DockerRuntime;
#[cfg(feature = "dev-tools")]
pub use fake::FakeRuntime;
pub use local::LocalRuntime;
pub use settings::TmpfsMount;
pub use swarm::SwarmRuntime;

/// A runtime-assigned instance name, unique on its runtime and stable across graven restarts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub String);

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.0)
    }
}

/// Everything a runtime needs to start one instance. The command, env and user default to
/// the image's config when absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub image: Digest,
    /// Replaces the image's CMD when set (the ENTRYPOINT stays, as with `docker run`).
    pub command: Option<Vec<String>>,
    /// Replaces the image's ENTRYPOINT when set, and clears its CMD unless `command` is set
    /// too (`settings::compose_command`); empty: no entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Added to (and overriding) the image's ENV.
    pub env: BTreeMap<String, String>,
    /// Added after `env`: values the workload gets but that nothing records (secrets).
    #[serde(skip)]
    pub secret_env: SecretEnv,
    /// The port the application listens on. Runtimes that share the host network (local)
    /// choose a free host port instead and pass it as `$PORT`; `Instance::address` says
    /// where the instance can be reached either way.
    pub port: Option<u16>,
    /// A fixed host port to use instead of a free one the runtime picks (`graven run
    /// --port`). Starting fails with `PortInUse` when it is taken.
    #[serde(default)]
    pub host_port: Option<u16>,
    pub volumes: Vec<VolumeMount>,
    /// Size-capped tmpfs mounts, writable paths on the read-only root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<TmpfsMount>,
    /// Replaces the image's USER when set.
    pub user: Option<String>,
    pub limits: Limits,
    /// Replaces the image's STOPSIGNAL (default SIGTERM) when set.
    pub stop_signal: Option<String>,
    /// How long `stop` waits after the stop signal before it kills.
    pub stop_grace: Duration,
    /// Opaque to the runtime; kept with the instance so a restarted graven can tell what it is.
    pub labels: BTreeMap<String, String>,
    /// The instance's network: its own (the default, where the runtime can make one) or the
    /// host's.
    #[serde(default)]
    pub network: NetworkMode,
    /// Whether an instance with a network of its own may open connections beyond it.
    #[serde(default = "outbound_default")]
    pub outbound: bool,
    /// Whether programs may run from /tmp, /dev/shm and tmpfs mounts (mounted `noexec`
    /// otherwise). Running one is drift all the same unless `allow_exec` names its path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec_tmp: bool,
    /// Absolute paths inside the instance under which running a program that is not the
    /// image's is not drift (a volume's tools, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_exec: Vec<String>,
    /// Graven's DNS server, for the instance's generated resolv.conf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<InstanceDns>,
}

/// What an instance's generated `/etc/resolv.conf` names first: graven's DNS server, where
/// the instance's network reaches it, and the search domain of its app and environment, where
/// a service's name alone resolves. A network the server cannot be reached from keeps the
/// image's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDns {
    /// For a network of its own: the daemon's address on the bridge, port 53.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameserver: Option<std::net::Ipv4Addr>,
    /// For `network = "host"`: the home's own loopback address, port 53 (`dns::host_address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<std::net::Ipv4Addr>,
    /// For a rootless instance's user-mode network: the port of the server's listener on the
    /// host's 127.0.0.1, which pasta forwards the instance's own 127.0.0.1:53 to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loopback_port: Option<u16>,
    /// The ports of its app and environment's routes on the host's loopback, which a rootless
    /// instance's 127.0.0.1 forwards to the host's as well (what its names answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<u16>,
    pub search: String,
}

fn outbound_default() -> bool {
    true
}

/// Which network an instance is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// A network of its own: its own loopback and address, listening on its own port.
    #[default]
    Private,
    /// The host's network, on a free port of the host's passed as `$PORT`.
    Host,
}

impl InstanceSpec {
    /// A spec that runs `image` as its config says, with default limits and a 10 s grace.
    pub fn new(image: Digest) -> InstanceSpec {
        InstanceSpec {
            image,
            command: None,
            entrypoint: None,
            env: BTreeMap::new(),
            secret_env: SecretEnv::default(),
            port: None,
            host_port: None,
            volumes: Vec::new(),
            tmpfs: Vec::new(),
            user: None,
            limits: Limits::default(),
            stop_signal: None,
            stop_grace: Duration::from_secs(10),
            labels: BTreeMap::new(),
            network: NetworkMode::Private,
            outbound: true,
            exec_tmp: false,
            allow_exec: Vec::new(),
            dns: None,
        }
    }

    /// Checks what can be checked without the image: volume names and paths, tmpfs paths
    /// and overlaps, an empty command. Every backend calls this first so bad input fails the
    /// same way everywhere.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        for volume in &self.volumes {
            volume.validate()?;
        }
        settings::check_mounts(&self.volumes, &self.tmpfs)?;
        if let Some(command) = &self.command
            && command.first().is_none_or(|c| c.is_empty())
        {
            return Err(RuntimeError::NoCommand {
                image: self.image.clone(),
            });
        }
        Ok(())
    }
}

/// Env variables whose values only the workload may see: a runtime hands them to the
/// workload alone and records each key with [`SecretEnv::REDACTED`] as its value wherever it
/// keeps or shows the instance's environment. Never serialized; `Debug` shows keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretEnv(pub BTreeMap<String, String>);

impl SecretEnv {
    /// What a secret's value is recorded and shown as.
    pub const REDACTED: &'static str = "<secret>";
}

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|key| (key, SecretEnv::REDACTED)))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// A named volume under graven's persistent volume directory.
    pub name: String,
    /// The absolute path inside the instance.
    pub path: String,
}

impl VolumeMount {
    /// Parses the CLI's `NAME:/path`.
    pub fn parse(text: &str) -> Result<VolumeMount, RuntimeError> {
        let (name, path) = text
            .split_once(':')
            .ok_or_else(|| RuntimeError::BadVolume {
                name: text.to_owned(),
                reason: "a volume is written NAME:/path".to_owned(),
            })?;
        let volume = VolumeMount {
            name: name.to_owned(),
            path: path.to_owned(),
        };
        volume.validate()?;
        Ok(volume)
    }

    /// A volume name is one plain path component, so it can never escape graven's volume
    /// directory; the mount path is absolute and has no `..`, so it stays inside the root.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |reason: &str| {
            Err(RuntimeError::BadVolume {
                name: self.name.clone(),
                reason: reason.to_owned(),
            })
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && !self.name.starts_with('.')
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return bad(
                "a volume name is 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'",
            );
        }
        if !self.path.starts_with('/') {
            return bad("the mount path must be absolute");
        }
        if self.path.split('/').any(|c| c == ".." || c == ".") {
            return bad("the mount path may not contain '.' or '..'");
        }
        if self.path.split('/').all(str::is_empty) {
            return bad("a volume cannot be mounted over /");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// The most processes and threads at once; `None`: [`DEFAULT_PIDS`]; 0: no limit.
    pub pids: Option<u64>,
    /// CPU in thousandths of a core (1500 = one and a half cores).
    pub cpu_millis: Option<u64>,
    /// Size cap of the instance's /tmp tmpfs, and of its /dev/shm (`None`: 64 MiB).
    pub tmp_bytes: Option<u64>,
    /// The most the logs of the instance's service (its log group) keep on disk in the log
    /// store, all its instances together; the oldest lines go first. `None`: 256 MiB. Left
    /// out of the JSON when unset, so releases recorded before it existed keep their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
    /// How long the service's log lines are kept, in seconds. `None`: 7 days. Left out of
    /// the JSON when unset, as `log_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_age_s: Option<u64>,
}

/// The process limit (processes and threads, the cgroup's `pids.max`) of an instance when
/// none is given, the same as a RUN step's (`sandbox::DEFAULT_PIDS` says why).
pub const DEFAULT_PIDS: u64 = crate::sandbox::DEFAULT_PIDS;

/// The log rotation size when none is given: 16 MiB, so at most about 32 MiB per instance.
pub const DEFAULT_LOG_BYTES: u64 = 16 << 20;

/// An instance's process-level state. The controller's lifecycle (starting, healthy,
/// draining, gone) is built on top of this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Its directory and sandbox exist; the process has not been confirmed running yet.
    Created,
    Running,
    /// The stop signal was sent; the grace period is running.
    Stopping,
    /// The process is gone. `code` for a normal exit, `signal` when it was killed; both
    /// absent when the process vanished while no graven was watching.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

impl InstanceStatus {
    /// The legal transitions. Anything may become `Exited`; nothing leaves it.
    pub fn can_become(self, next: InstanceStatus) -> bool {
        use InstanceStatus::*;
        match (self, next) {
            (Exited { .. }, _) => false,
            (_, Exited { .. }) => true,
            (Created, Running) | (Created, Stopping) | (Running, Stopping) => true,
            (Created, Created) | (Running, Running) | (Stopping, Stopping) => true,
            (Running, Created) | (Stopping, Created) | (Stopping, Running) => false,
        }
    }

    pub fn is_exited(self) -> bool {
        matches!(self, InstanceStatus::Exited { .. })
    }
}

/// What a runtime reports about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub image: Digest,
    pub labels: BTreeMap<String, String>,
    pub status: InstanceStatus,
    /// Where the instance's port is reachable from graven's host.
    pub address: Option<SocketAddr>,
    /// The host PID of the instance's first process, where the runtime has one.
    pub pid: Option<u32>,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Set by a break-glass exec: the instance was touched and must be replaced.
    pub tainted: bool,
    /// The file its stdout and stderr are captured to, where the runtime keeps one.
    pub log: Option<PathBuf>,
    /// What the runtime could not do as asked, said plainly (e.g. resource limits that this
    /// host cannot enforce).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Set by a drift check (`Runtime::check_drift`): how the instance differs from its
    /// image. Like `tainted`, it must be replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

/// How a running instance was found to differ from its image: the evidence of one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Drift {
    /// A file of the image's root (as unpacked on the host) is not as it was unpacked.
    RootChanged {
        /// The path inside the image.
        path: String,
        change: FileChange,
        /// What the manifest holds (a hash, mode, owner or kind); none for an added file.
        expected: Option<String>,
        /// What was found; none for a removed file.
        found: Option<String>,
    },
    /// A process runs a program that is not the image's file at its path.
    ForeignProgram {
        /// Its PID on the host.
        pid: u32,
        /// The program's path as the instance sees it (` (deleted)` when it was removed).
        exe: String,
        cmdline: String,
    },
}

/// What changed about one file of a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    Content,
    Mode,
    Owner,
    /// Its kind (a file became a directory, a symlink, ...).
    Kind,
    /// A symlink's target.
    Link,
    Added,
    Removed,
}

impl FileChange {
    pub fn as_str(self) -> &'static str {
        match self {
            FileChange::Content => "content",
            FileChange::Mode => "mode",
            FileChange::Owner => "owner",
            FileChange::Kind => "kind",
            FileChange::Link => "link",
            FileChange::Added => "added",
            FileChange::Removed => "removed",
        }
    }
}

/// How a drift check runs (`Runtime::check_drift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftCheck {
    /// The most bytes per second the check reads from roots.
    pub read_per_second: u64,
}

impl Default for DriftCheck {
    /// 64 MiB/s: a full check of a 1 GiB image takes 16 s and leaves the disk to the
    /// instances.
    fn default() -> DriftCheck {
        DriftCheck {
            read_per_second: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image {reference} is not in the store")]
    UnknownImage { reference: String },
    #[error("instance {id} does not exist")]
    UnknownInstance { id: InstanceId },
    #[error("instance {id} is {status:?}; it cannot be {action}")]
    WrongState {
        id: InstanceId,
        status: InstanceStatus,
        action: &'static str,
    },
    #[error("volume {name:?}: {reason}")]
    BadVolume { name: String, reason: String },
    #[error("tmpfs {path:?}: {reason}")]
    BadTmpfs { path: String, reason: String },
    #[error("port {port} is already in use")]
    PortInUse { port: u16 },
    #[error("user {user:?} does not exist in image {image}")]
    UnknownUser { user: String, image: Digest },
    #[error("user {user:?} of image {image} cannot be run as: {reason}")]
    BadUser {
        user: String,
        image: Digest,
        reason: String,
    },
    #[error("image {image} has no entrypoint or command to run")]
    NoCommand { image: Digest },
    #[error("image {image} has no {path} to run")]
    MissingEntrypoint { image: Digest, path: String },
    #[error("image {image} has no {path} to run as its health check")]
    MissingHealthCommand { image: Digest, path: String },
    #[error("instance {id} could not start: {message}")]
    Sandbox { id: InstanceId, message: String },
    #[error("the {runtime} runtime cannot {what}")]
    CannotExpress { runtime: &'static str, what: String },
    #[error("this machine cannot sandbox instances: {reason}")]
    Unsupported { reason: String },
    #[error("instance {id}: {source}")]
    Io {
        id: InstanceId,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{context}: {source}")]
    Other {
        context: String,
        source: std::io::Error,
    },
}

/// What a health probe run inside an instance (`Runtime::probe`) saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutput {
    /// The command's exit code; None when it was ended by a signal (the timeout's included).
    pub code: Option<i32>,
    /// Whether it was killed for outlasting its timeout.
    pub timed_out: bool,
    /// The last line of what it wrote (stdout and stderr together), at most
    /// `PROBE_LINE_BYTES` of it.
    pub last_line: String,
}

impl ProbeOutput {
    pub fn passed(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

impl std::fmt::Display for ProbeOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.timed_out, self.code) {
            (true, _) => f.write_str("timed out")?,
            (false, Some(code)) => write!(f, "exit {code}")?,
            (false, None) => f.write_str("killed")?,
        }
        if !self.last_line.is_empty() {
            write!(f, ": {}", self.last_line)?;
        }
        Ok(())
    }
}

/// How much of a probe's last line is kept: enough for an error message, never a flood.
pub const PROBE_LINE_BYTES: usize = 200;

/// The last line of a probe's output `tail` that is not blank, trimmed and at most
/// `PROBE_LINE_BYTES` long (cut at a character): `ProbeOutput::last_line` on every backend.
pub(crate) fn probe_last_line(tail: &[u8]) -> String {
    let text = String::from_utf8_lossy(tail);
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let mut end = line.len().min(PROBE_LINE_BYTES);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

/// A change of an instance that the runtime reports as it happens (`Runtime::changes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceChange {
    /// Its process ended (crashed, killed, or stopped).
    Exited { id: InstanceId },
    /// A drift check found it changed (`Instance::drift`).
    Drifted { id: InstanceId },
}

/// The port an instance with a network of its own listens on when nothing says another, on
/// every runtime.
pub const DEFAULT_PORT: u16 = 8080;

/// How many changes a watcher may fall behind before it is told it lagged (and lists).
pub const CHANGES_BUFFER: usize = 256;

/// The contract every backend implements and the conformance suite checks.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// The backend's name as the CLI and `graven.toml` spell it.
    fn name(&self) -> &'static str;
    /// Instance changes as they happen, so a controller reacts at once instead of listing
    /// all the time. A watch can miss nothing that matters only because `list` stays the
    /// truth: a watcher that lagged, or started after a change, lists to catch up.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<InstanceChange>;
    /// Makes an image ready to start instances from (unpack, load, pull). Idempotent.
    async fn prepare(&self, image: &Digest) -> Result<(), RuntimeError>;
    /// Starts one instance; on error nothing is left behind.
    async fn start(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError>;
    async fn inspect(&self, id: &InstanceId) -> Result<Instance, RuntimeError>;
    /// Every instance that exists on this runtime, including ones started before graven
    /// restarted. An instance whose process is gone is reported exited, never running.
    async fn list(&self) -> Result<Vec<Instance>, RuntimeError>;
    /// The stop signal, up to `grace`, then SIGKILL of the whole instance. Returns it exited.
    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<Instance, RuntimeError>;
    /// SIGKILL now, with no stop signal and no grace (chaos, negative controls).
    async fn kill(&self, id: &InstanceId) -> Result<(), RuntimeError>;
    /// Removes an exited instance and its state (never its volumes or its log).
    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError>;
    /// Runs `command` inside the running instance as its health probe: its namespaces, user,
    /// env and cgroups, as a break-glass exec, but the instance is not tainted (a probe is
    /// part of running it) and the command is killed once it outlasts `timeout`.
    async fn probe(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError>;
    /// Checks the running instances among `ids` for drift (their image's root against what
    /// was unpacked, their processes' programs against the image's); records what it finds
    /// on each instance (`Instance::drift`, from then on), and returns the new findings. A
    /// tampered root is replaced by a fresh one before this returns, so replacements never
    /// start on it.
    async fn check_drift(
        &self,
        ids: &[InstanceId],
        check: DriftCheck,
    ) -> Result<Vec<(InstanceId, Drift)>, RuntimeError>;
}

/// The fixed set of backends, dispatched by `match` so callers keep concrete (and `Send`)
/// futures.
#[derive(Debug, Clone)]
pub enum AnyRuntime {
    Local(LocalRuntime),
    Docker(DockerRuntime),
    Swarm(SwarmRuntime),
    /// The tests' in-memory backend; never in the shipped binary.
    #[cfg(feature = "dev-tools")]
    Fake(FakeRuntime),
}

macro_rules! dispatch {
    ($self:ident, $rt:ident => $call:expr) => {
        match $self {
            AnyRuntime::Local($rt) => $call,
            AnyRuntime::Docker($rt) => $call,
            AnyRuntime::Swarm($rt) => $call,
            #[cfg(feature = "dev-tools")]
            AnyRuntime::Fake($rt) => $call,
        }
    };
}

impl Runtime for AnyRuntime {
    fn name(&self) -> &'static str {
        dispatch!(self, rt => rt.name())
    }
    fn changes(&self) -> tokio::sync::broadcast::Receiver<InstanceChange> {
        dispatch!(self, rt => rt.changes())
    }
    async fn prepare(&self, image: &Digest) -> Result<(), RuntimeError> {
        dispatch!(self, rt => rt.prepare(image).await)
    }
    async fn start(&self, spec: InstanceSpec) -> Result<Instance, RuntimeError> {
        dispatch!(self, rt => rt.start(spec).await)
    }
    async fn inspect(&self, id: &InstanceId) -> Result<Instance, RuntimeError> {
        dispatch!(self, rt => rt.inspect(id).await)
    }
    async fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        dispatch!(self, rt => rt.list().await)
    }
    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<Instance, RuntimeError> {
        dispatch!(self, rt => rt.stop(id, grace).await)
    }
    async fn kill(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        dispatch!(self, rt => rt.kill(id).await)
    }
    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        dispatch!(self, rt => rt.remove(id).await)
    }
    async fn probe(
        &self,
        id: &InstanceId,
        command: &[String],
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError> {
        dispatch!(self, rt => rt.probe(id, command, timeout).await)
    }
    async fn check_drift(
        &self,
        ids: &[InstanceId],
        check: DriftCheck,
    ) -> Result<Vec<(InstanceId, Drift)>, RuntimeError> {
        dispatch!(self, rt => rt.check_drift(ids, check).await)
    }
}

/// Milliseconds since the Unix epoch, for `Instance::started_at_ms`.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_volume(text: &str, expected: Result<(&str, &str), &str>) {
        let got = VolumeMount::parse(text);
        match (got, expected) {
            (Ok(v), Ok((name, path))) => {
                assert_eq!((v.name.as_str(), v.path.as_str()), (name, path))
            }
            (Err(e), Err(fragment)) => {
                let message = e.to_string();
                assert!(message.contains(fragment), "{text:?}: {message}");
            }
            (got, expected) => panic!("{text:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn volume_specs() {
        check_volume("data:/var/data", Ok(("data", "/var/data")));
        check_volume("db-1.x:/d", Ok(("db-1.x", "/d")));
        check_volume("data", Err("NAME:/path"));
        check_volume("../etc:/x", Err("volume name"));
        check_volume("a/b:/x", Err("volume name"));
        check_volume(".hidden:/x", Err("volume name"));
        check_volume(":/x", Err("volume name"));
        check_volume("data:relative", Err("absolute"));
        check_volume("data:/a/../etc", Err("'..'"));
        check_volume("data:/", Err("over /"));
    }

    #[test]
    fn lifecycle_transitions() {
        use InstanceStatus::*;
        let exited = Exited {
            code: Some(0),
            signal: None,
        };
        let cases = [
            (Created, Running, true),
            (Running, Stopping, true),
            (Stopping, exited, true),
            (Running, exited, true),
            (Stopping, Running, false),
            (Running, Created, false),
            (exited, Running, false),
            (exited, exited, false),
        ];
        for (from, to, legal) in cases {
            assert_eq!(from.can_become(to), legal, "{from:?} -> {to:?}");
        }
    }
}
