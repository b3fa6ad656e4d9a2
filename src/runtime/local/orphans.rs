//! Orphans: instances whose directory under `$GRAVEN_HOME/instances` is gone while their
//! processes still run (someone ran `rm -rf` on it). Nothing else could find them: their
//! state, PIDs included, was in that directory. This module finds them by what the
//! directory's loss cannot erase — a shim holds its instance's `shim.held` open for
//! writing, and `/proc/<pid>/fd` still names that file — and stops them.
//!
//! It only ever signals a shim that writes a log under this home's `instances` directory
//! while that instance has no `state.json`, and that shim's children (the workload, PID 1 of
//! its namespace, whose end ends every process in it). Signals go through a pidfd opened
//! and then checked against the start time, so a reused PID is never hit.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::state::{HELD, LOG, LOG_BEFORE, Proc, STATE};

/// How often `list` looks for orphans: walking /proc costs a few milliseconds, and the
/// controller lists every 100 ms.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long an orphan's shim gets to end by itself once its workload was killed.
const SHIM_WAIT: Duration = Duration::from_secs(5);

/// One orphaned instance: its id (the directory's name) and its processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: String,
    pub shim: Proc,
    pub workloads: Vec<Proc>,
}

/// A process as /proc shows it.
struct Seen {
    pid: u32,
    ppid: u32,
    comm: String,
}

fn processes() -> Vec<Seen> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut seen = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": the name may hold anything, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        seen.push(Seen {
            pid,
            ppid,
            comm: stat[open + 1..close].to_owned(),
        });
    }
    seen
}

/// The instance whose log `pid` holds open for writing under `instances`, if any.
fn written_log(pid: u32, instances: &Path) -> Option<String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let target = PathBuf::from(target.strip_suffix(" (deleted)").unwrap_or(&target));
        let (Some(name), Some(dir)) = (target.file_name(), target.parent()) else {
            continue;
        };
        // `HELD`, or the log a shim of a graven from before the log store writes.
        if (name != HELD && name != LOG && name != LOG_BEFORE) || dir.parent() != Some(instances) {
            continue;
        }
        // A reader (`graven run` following the log) is no shim: only a writer is.
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let writes = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|flags| flags & (libc::O_WRONLY | libc::O_RDWR) as u32 != 0);
        let id = dir.file_name()?.to_str()?;
        if writes && !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Some(id.to_owned());
        }
    }
    None
}

/// The orphans under `instances` (the home's `instances` directory), or only the one with
/// id `only`.
pub fn find(instances: &Path, only: Option<&str>) -> Vec<Orphan> {
    let all = processes();
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut orphans = Vec::new();
    // Shims are graven processes ("graven", or "graven shim" once forked and named).
    for p in all.iter().filter(|p| p.comm.starts_with("graven")) {
        let Some(id) = written_log(p.pid, instances) else {
            continue;
        };
        if only.is_some_and(|o| o != id) || instances.join(&id).join(STATE).is_file() {
            continue;
        }
        let Some(shim) = Proc::of(p.pid) else {
            continue;
        };
        let workloads = children
            .get(&p.pid)
            .into_iter()
            .flatten()
            .filter_map(|&pid| Proc::of(pid))
            .collect();
        orphans.push(Orphan {
            id,
            shim,
            workloads,
        });
    }
    orphans
}

/// SIGKILL to `proc`, through a pidfd checked to be that very process.
fn kill(proc: Proc) {
    let Some(pid) = rustix::process::Pid::from_raw(proc.pid as i32) else {
        return;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        return;
    };
    // Checked after the pidfd is open: the fd is then known to be this process's.
    if proc.alive() {
        let _ = rustix::process::pidfd_send_signal(pidfd.as_fd(), rustix::process::Signal::KILL);
    }
}

/// Stops orphans: kills each one's workload (which ends its namespace), gives the shim a
/// moment to see it and end, then kills the shim if it has not. There is no grace: the
/// instance's stop signal and grace were in the directory that is gone.
pub fn stop(orphans: &[Orphan]) {
    for orphan in orphans {
        orphan.workloads.iter().copied().for_each(kill);
    }
    let deadline = Instant::now() + SHIM_WAIT;
    for orphan in orphans {
        while orphan.shim.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        kill(orphan.shim);
        // The shim would have removed the instance's cgroups as it recorded the exit, but
        // the record is gone with the directory.
        super::cgroup::of(&orphan.id).remove();
    }
}

/// Finds and stops the orphans under `instances`, at most once per `SWEEP_EVERY` for each
/// home in this process (the first call always looks).
pub fn sweep(instances: &Path) -> Vec<Orphan> {
    static LAST: Mutex<BTreeMap<PathBuf, Instant>> = Mutex::new(BTreeMap::new());
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last
            .get(instances)
            .is_some_and(|at| now.duration_since(*at) < SWEEP_EVERY)
        {
            return Vec::new();
        }
        last.insert(instances.to_owned(), now);
    }
    let orphans = find(instances, None);
    stop(&orphans);
    // The addresses and namespaces of instances whose directory went with them.
    super::net::sweep();
    super::cgroup::sweep();
    orphans
}
