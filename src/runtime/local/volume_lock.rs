//! The lock that makes a named volume owned by at most one live instance, ever: whatever
//! the controller, a restarted graven or a hand `graven run` asks, a second workload never
//! starts on a volume another one still uses.
//!
//! Each volume has a lock file beside it (`volumes/.lock-<name>`, 0600). The instance's shim
//! takes an exclusive open-file-description lock on it (`F_OFD_SETLK`) before it launches the
//! workload and holds it until the workload is gone; the descriptor is close-on-exec, so the
//! workload never holds it. OFD locks rather than `flock`: both belong to the open file and
//! go with the shim, but only OFD locks can be tested without being taken (`F_OFD_GETLK`), so
//! `graven volumes` looking never makes a start fail.
//!
//! The shim can die first (kill -9): its workload dies with it (PDEATHSIG), but not at the
//! same instant. So the file records its holder (instance, shim and workload with their start
//! times), and the next taker, once it has the lock, waits on the recorded workload through a
//! pidfd until it is really gone, or refuses when it does not end in time.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::state::Proc;
use crate::runtime::InstanceId;

/// How long a start waits for the workload of a dead shim to end before it refuses: its
/// PDEATHSIG is a SIGKILL, so this is only ever reached by a process the kernel cannot end.
pub const WAIT_FOR_GONE: Duration = Duration::from_secs(10);

/// The environment variable that turns the lock off, for the test that shows what it
/// prevents. Only a build with the test tools (`dev-tools`) honours it.
pub const NO_LOCK_ENV: &str = "GRAVEN_TEST_NO_VOLUME_LOCK";

/// What the shim is asked to lock: one named volume, for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub volume: String,
    /// The volume's lock file.
    pub path: PathBuf,
    pub id: InstanceId,
    /// The controller's name for the instance, when it has one.
    pub instance: Option<String>,
}

/// Who holds (or last held) a volume, as its lock file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub id: InstanceId,
    pub instance: Option<String>,
    pub shim: Option<Proc>,
    pub workload: Option<Proc>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.instance, self.id.0.is_empty()) {
            (Some(name), true) => write!(f, "{name}")?,
            (Some(name), false) => write!(f, "instance {name} ({})", self.id)?,
            (None, _) => write!(f, "instance {}", self.id)?,
        }
        if let Some(workload) = self.workload {
            write!(f, ", workload pid {}", workload.pid)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("volume {volume:?} is in use by {holder}")]
    Held { volume: String, holder: String },
    #[error(
        "volume {volume:?} is still used by {holder}: its supervisor is gone but its workload \
         did not end within {waited:?}"
    )]
    StillRunning {
        volume: String,
        holder: String,
        waited: Duration,
    },
    #[error("volume {volume:?}: locking {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The lock file of the volume `name` under `home`.
pub fn path(home: &Path, name: &str) -> PathBuf {
    home.join("volumes").join(format!(".lock-{name}"))
}

/// True when a build with the test tools was told to take no lock (the negative control).
pub fn disabled() -> bool {
    cfg!(feature = "dev-tools") && std::env::var_os(NO_LOCK_ENV).is_some()
}

/// A volume's lock, held while this lives.
#[derive(Debug)]
pub struct Held {
    file: File,
    holder: Holder,
}

impl Held {
    /// Records the workload now using the volume, for a taker after a dead shim to wait on.
    pub fn record_workload(&mut self, workload: Option<Proc>) {
        self.holder.workload = workload;
        let _ = write_holder(&mut self.file, &self.holder);
    }
}

/// Takes the volume's lock for `holder`, or says who has it. When the previous holder's
/// workload outlived its shim, waits up to `wait` for it to end, then refuses.
pub fn take(volume: &str, path: &Path, holder: Holder, wait: Duration) -> Result<Held, LockError> {
    let io = |source: std::io::Error| LockError::Io {
        volume: volume.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let deadline = Instant::now() + wait;
    while !ofd_lock(&file, libc::F_OFD_SETLK, libc::F_WRLCK).map_err(io)? {
        let previous = read_holder(&mut file);
        // A holder whose workload has ended is a shim about to let go (its instance already
        // looks exited to a stop): worth the wait. Any other holder is refused at once.
        let ending = previous
            .as_ref()
            .and_then(|h| h.workload)
            .is_some_and(|w| !w.alive());
        if !ending || Instant::now() >= deadline {
            let holder = previous.map_or_else(|| "another instance".to_owned(), |h| h.to_string());
            return Err(LockError::Held {
                volume: volume.to_owned(),
                holder,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(previous) = read_holder(&mut file)
        && let Some(workload) = previous.workload
        && !wait_gone(workload, wait)
    {
        return Err(LockError::StillRunning {
            volume: volume.to_owned(),
            holder: previous.to_string(),
            waited: wait,
        });
    }
    write_holder(&mut file, &holder).map_err(io)?;
    Ok(Held { file, holder })
}

/// Who holds the volume's lock now, or whose workload still runs on it after its shim died;
/// `None` when the volume is free. Looks without taking anything.
pub fn holder(path: &Path) -> Option<Holder> {
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let locked = !ofd_lock(&file, libc::F_OFD_GETLK, libc::F_WRLCK).unwrap_or(true);
    let recorded = read_holder(&mut file);
    match recorded {
        Some(holder) if locked || holder.workload.is_some_and(|w| w.alive()) => Some(holder),
        None if locked => Some(Holder {
            id: InstanceId(String::new()),
            instance: Some("a starting instance".to_owned()),
            shim: None,
            workload: None,
        }),
        _ => None,
    }
}

/// `F_OFD_SETLK` (takes) or `F_OFD_GETLK` (tests) a lock of `kind` on the whole file: true
/// when it is (or could be) placed, false when another open file holds a conflicting one.
fn ofd_lock(file: &File, command: i32, kind: i32) -> std::io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on a descriptor this File owns, with a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &mut lock) };
    if rc == 0 {
        return Ok(command != libc::F_OFD_GETLK || lock.l_type == libc::F_UNLCK as libc::c_short);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(error),
    }
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = Vec::new();
    file.seek(std::io::SeekFrom::Start(0)).ok()?;
    file.take(64 * 1024).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_holder(file: &mut File, holder: &Holder) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(holder).expect("a holder serializes");
    file.set_len(0)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    file.write_all(&bytes)
}

/// Waits until `proc` has ended (true), at most `wait`. A pidfd, checked to be that very
/// process once open, says when it exits; as PID 1 of its namespace it exits only once
/// every process in the namespace has.
fn wait_gone(proc: Proc, wait: Duration) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(proc.pid as i32) else {
        return true;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) else {
        // No such process: it is gone already.
        return true;
    };
    let deadline = Instant::now() + wait;
    while proc.alive() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut poll = libc::pollfd {
            fd: pidfd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call, over a pidfd we own.
        unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as i32 + 1) };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(id: &str) -> Holder {
        Holder {
            id: InstanceId(id.to_owned()),
            instance: Some(format!("web-{id}")),
            shim: Proc::of(std::process::id()),
            workload: None,
        }
    }

    /// A fork in another test thread shares every open file of this process until its child
    /// execs, and the OFD locks on them with it: a lock a test let go of can look held for a
    /// moment (CI saw it under load). Tries `attempt` until it gives what `settled` accepts,
    /// for up to 10 s, and returns the last try.
    fn past_forks<T>(mut attempt: impl FnMut() -> T, settled: impl Fn(&T) -> bool) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = attempt();
            if settled(&got) || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_second_taker_is_refused_with_the_holder_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock-data");
        assert_eq!(holder(&path), None);
        let first = take("data", &path, me("a"), Duration::ZERO).unwrap();
        let error = take("data", &path, me("b"), Duration::ZERO).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("\"data\"") && message.contains("web-a"),
            "{message}"
        );
        assert_eq!(holder(&path).map(|h| h.id.0), Some("a".to_owned()));
        // Looking did not take it: the holder still has it, and after it a taker gets it.
        assert!(take("data", &path, me("c"), Duration::ZERO).is_err());
        drop(first);
        assert_eq!(past_forks(|| holder(&path), Option::is_none), None);
        past_forks(
            || take("data", &path, me("d"), Duration::ZERO),
            Result::is_ok,
        )
        .unwrap();
    }

    #[test]
    fn a_recorded_workload_that_outlived_its_holder_keeps_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock-data");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut first = take("data", &path, me("a"), Duration::ZERO).unwrap();
        first.record_workload(Proc::of(child.id()));
        // The holder's shim is gone (the lock with it); its workload is not.
        drop(first);
        assert_eq!(holder(&path).map(|h| h.id.0), Some("a".to_owned()));
        let error = past_forks(
            || take("data", &path, me("b"), Duration::from_millis(200)),
            |taken| matches!(taken, Err(LockError::StillRunning { .. })),
        )
        .unwrap_err();
        assert!(matches!(error, LockError::StillRunning { .. }), "{error}");
        let pid = child.id();
        let waiter = std::thread::spawn(move || {
            past_forks(
                || take("data", &path, me("c"), Duration::from_secs(20)),
                Result::is_ok,
            )
            .map(|held| held.holder)
        });
        // SAFETY: kill of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        child.wait().unwrap();
        assert_eq!(waiter.join().unwrap().unwrap().id.0, "c");
    }
}
