//! An instance's state on disk (`$GRAVEN_HOME/instances/<id>/state.json`), replaced
//! atomically under a lock so the shim, `stop` and `exec` never lose each other's changes,
//! and the check that a recorded process is still the same process.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cgroup::Cgroups;
use crate::runtime::{InstanceId, InstanceStatus, RuntimeError};
use crate::sandbox::{Options, SandboxSpec};
use crate::store::Digest;

pub const STATE: &str = "state.json";
/// The log of an instance started by a graven from before the log store, and the one
/// before it, once rotated: kept within the store's age by gc.
pub const LOG: &str = "log";
pub const LOG_BEFORE: &str = "log.1";
/// A file the shim holds open for writing as long as it lives: how an instance whose
/// directory was deleted is still found (`orphans`), its output being in the log store.
pub const HELD: &str = "shim.held";
/// The empty directory in the home (one for all its instances) on which each sandbox mounts
/// its scratch tmpfs, inside its own mount namespace where no other sees it: a start makes
/// no directory for it on the host's filesystem (a mkdir there cost 0.04–0.4 ms of a start).
pub const SCRATCH: &str = "scratch";
const LOCK: &str = "state.lock";

/// A process as recorded: its PID and its start time (clock ticks after boot, from
/// /proc/<pid>/stat), so a reused PID is never taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    pub start: u64,
}

impl Proc {
    pub fn of(pid: u32) -> Option<Proc> {
        let (start, zombie) = stat(pid)?;
        (!zombie).then_some(Proc { pid, start })
    }

    /// True while the very same process runs (not a zombie, not a reused PID).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((start, false)) if start == self.start)
    }
}

/// The start time and whether the process is a zombie.
fn stat(pid: u32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(u64, bool)> {
    // The command name may hold spaces and parentheses; the fields follow the last ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub id: InstanceId,
    pub image: Digest,
    pub labels: BTreeMap<String, String>,
    pub status: InstanceStatus,
    pub address: SocketAddr,
    pub started_at_ms: u64,
    pub tainted: bool,
    pub warnings: Vec<String>,
    pub stop_signal: i32,
    /// The graven process that is creating the instance (alive: the start is in progress).
    pub creator: Option<Proc>,
    /// The shim, which passes the signals it gets on to the workload.
    pub shim: Option<Proc>,
    /// The workload, PID 1 of its namespace.
    pub workload: Option<Proc>,
    pub cgroups: Cgroups,
    pub uid: u32,
    pub gid: u32,
    pub env: Vec<String>,
    pub cwd: String,
    /// Its address on graven's bridge, when it has a network of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<super::net::Attached>,
    /// The named volumes it binds (`graven volumes` says who holds what).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Its user-mode network (rootless), and the pasta process that carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_network: Option<super::usernet::UserNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasta: Option<Proc>,
    /// Where running a program that is not the image's is not drift (`InstanceSpec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_exec: Vec<String>,
    /// What a drift check found: the instance must be replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<crate::runtime::Drift>,
}

impl State {
    /// The status as observed now: a recorded process that is gone makes the instance
    /// exited, whatever the file says.
    pub fn observed_status(&self) -> InstanceStatus {
        if self.status.is_exited() {
            return self.status;
        }
        let gone = InstanceStatus::Exited {
            code: None,
            signal: None,
        };
        match (self.workload, self.shim, self.creator) {
            (Some(workload), _, _) if workload.alive() => self.status,
            (Some(_), _, _) => gone,
            (None, Some(shim), _) if shim.alive() => self.status,
            (None, None, Some(creator)) if creator.alive() => self.status,
            _ => gone,
        }
    }
}

/// What the shim is told to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimRequest {
    pub spec: SandboxSpec,
    pub options: Options,
    pub log: LogTarget,
    /// The named volumes whose locks the shim takes before the workload starts.
    #[serde(default)]
    pub volume_locks: Vec<super::volume_lock::Claim>,
}

/// Where the shim's workload writes its output: its source in the log store, and how the
/// shim keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogTarget {
    pub dir: PathBuf,
    pub meta: crate::logs::Meta,
    /// How often the shim syncs the source to disk.
    pub sync_ms: u64,
    /// The service's retention, which the shim enforces on its group now and then.
    pub max_bytes: u64,
    pub max_age_s: u64,
}

impl LogTarget {
    pub fn policy(&self) -> crate::logs::retention::Policy {
        crate::logs::retention::Policy {
            max_bytes: self.max_bytes,
            max_age: std::time::Duration::from_secs(self.max_age_s),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Other {
        context: format!("instance state {}", path.display()),
        source,
    }
}

pub fn load(dir: &Path) -> Result<State, RuntimeError> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| io(&path)(std::io::Error::other(e)))
}

pub fn save(dir: &Path, state: &State) -> Result<(), RuntimeError> {
    let bytes = serde_json::to_vec_pretty(state).expect("state always serializes");
    replace(&dir.join(STATE), &bytes)
}

/// Replaces `path` atomically (temp file and rename) without fsync. Instance files only
/// matter while the instance's processes live, and a machine crash ends those too; a write
/// lost that way can never show a dead instance as running, because every observation
/// checks the recorded process. Skipping the fsync keeps starting an instance fast.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.persist(path).map_err(|e| io(path)(e.error))?;
    Ok(())
}

/// Takes the instance's lock, which every change of its state holds: held until the file
/// returned is dropped. Fails when the instance's directory is gone.
pub fn lock(dir: &Path) -> Result<File, RuntimeError> {
    let lock_path: PathBuf = dir.join(LOCK);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(&lock_path)(e.into()))?;
    Ok(lock)
}

/// Reads, changes and writes the state under the instance's lock.
pub fn update<T>(dir: &Path, change: impl FnOnce(&mut State) -> T) -> Result<T, RuntimeError> {
    let _lock = lock(dir)?;
    let mut state = load(dir)?;
    let out = change(&mut state);
    save(dir, &state)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let line =
            "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 1000 10";
        assert_eq!(parse_stat(line), Some((12345, false)));
        let zombie = "43 (x) Z 1 43 43 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0";
        assert_eq!(parse_stat(zombie), Some((777, true)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = Proc::of(std::process::id()).unwrap();
        assert!(me.alive());
        let reused = Proc {
            start: me.start + 1,
            ..me
        };
        assert!(!reused.alive());
    }
}
