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

/// A runtime-assigned instance name, unique on its runtime and stable across graven restarts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub String);

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything a runtime needs to start one instance. The command, env and user default to
/// the image's config when absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub image: Digest,
    /// Replaces the image's ENTRYPOINT + CMD when set.
    pub command: Option<Vec<String>>,
    /// Added to (and overriding) the image's ENV.
    pub env: BTreeMap<String, String>,
    /// The port the application listens on. Runtimes that share the host network (local)
    /// choose a free host port instead and pass it as `$PORT`; `Instance::address` says
    /// where the instance can be reached either way.
    pub port: Option<u16>,
    pub volumes: Vec<VolumeMount>,
    /// Replaces the image's USER when set.
    pub user: Option<String>,
    pub limits: Limits,
    /// Replaces the image's STOPSIGNAL (default SIGTERM) when set.
    pub stop_signal: Option<String>,
    /// How long `stop` waits after the stop signal before it kills.
    pub stop_grace: Duration,
    /// Opaque to the runtime; kept with the instance so a restarted graven can tell what it is.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// A named volume under graven's persistent volume directory.
    pub name: String,
    /// The absolute path inside the instance.
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU in thousandths of a core (1500 = one and a half cores).
    pub cpu_millis: Option<u64>,
    /// Size cap of the instance's /tmp tmpfs.
    pub tmp_bytes: Option<u64>,
}

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
    #[error("port {port} is already in use")]
    PortInUse { port: u16 },
    #[error("user {user:?} does not exist in image {image}")]
    UnknownUser { user: String, image: Digest },
    #[error("image {image} has no entrypoint or command to run")]
    NoCommand { image: Digest },
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

/// The contract every backend implements and the conformance suite checks.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// The backend's name as the CLI and `graven.toml` spell it.
    fn name(&self) -> &'static str;
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
}
