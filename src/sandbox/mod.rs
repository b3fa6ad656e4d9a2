//! The sandbox owns the one place graven forks and enters namespaces: the graven binary
//! re-executed as a small single-threaded helper (`graven __sandbox`) that unshares, mounts,
//! pivots root, drops privileges and execs the workload.
//!
//! It is used by the local runtime for instances and by bake for RUN steps, so both run in
//! the same kind of sandbox. It never runs inside the multi-threaded async process, and it
//! knows nothing of images, services or the store: it is handed a root directory.

use std::path::PathBuf;

/// The argv[1] that makes the graven binary act as the sandbox helper.
pub const HELPER_ARG: &str = "__sandbox";

/// One process to run in a fresh sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxSpec {
    /// The directory that becomes `/`.
    pub rootfs: PathBuf,
    /// False for instances (read-only root); true for bake RUN steps, which write the layer.
    pub writable_root: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    /// Extra bind mounts (volumes), source on the host, target inside the root.
    pub binds: Vec<Bind>,
    /// Size cap of the tmpfs mounted at /tmp.
    pub tmp_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

/// When this process was started as the sandbox helper, runs it and never returns.
pub fn enter_if_helper() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == HELPER_ARG)
    {
        eprintln!("graven: the sandbox helper is not built yet");
        std::process::exit(127);
    }
}
