//! The control-plane lock: `$GRAVEN_HOME/control.lock`, flocked by `graven up` and `graven
//! daemon` before they bind or start anything and held for their whole life, so that two
//! control planes never run on one home (each would adopt the other's instances, and they
//! would fight over the routes and the socket). The kernel releases a flock when the last
//! descriptor of it closes, however its holder ends (`kill -9` included), so the lock is never
//! stale; the file is opened close-on-exec, so no process the holder starts keeps it.
//!
//! The file names its holder (PID and command) for the message a second one gets. Who holds
//! the lock is read from the kernel's list (`/proc/locks`), never by taking it, and `graven
//! daemon stop` signals the PID listed there through a pidfd opened before a last look, so it
//! never reaches a process that took over the number of one that ended. It knows nothing of
//! what the control plane does.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;

/// The lock's file name under `$GRAVEN_HOME`.
pub const LOCK: &str = "control.lock";

/// How long a reader waits for a holder that has just taken the lock to write its name.
const NAMING: Duration = Duration::from_secs(2);

pub fn lock_path(home: &Path) -> PathBuf {
    home.join(LOCK)
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "a control plane already runs on {} ({holder}): use `graven deploy` to deploy to it, \
         or stop it first (`graven daemon stop`)",
        home.display()
    )]
    Held { home: PathBuf, holder: Holder },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Who holds the lock: the PID the kernel lists as its holder, and the command it ran as
/// (when the file names that PID: a holder that has only just taken the lock may not have
/// written it yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(command) = &self.command {
            write!(f, ", {command}")?;
        }
        Ok(())
    }
}

/// The lock, held until this is dropped (or the process ends).
#[derive(Debug)]
pub struct ControlLock {
    _file: File,
}

impl ControlLock {
    /// Takes the lock of `home` for this process, recording its PID and `command`; fails at
    /// once, naming the holder, when another process holds it.
    pub fn acquire(home: &Path, command: &str) -> Result<ControlLock, LockError> {
        let path = lock_path(home);
        let mut file = open(&path)?;
        // A holder that lets go between the try and the look is tried again, a few times.
        let mut tries = 0;
        while !try_lock(&file, &path)? {
            tries += 1;
            match holder(home)? {
                Some(holder) => {
                    return Err(LockError::Held {
                        home: home.to_owned(),
                        holder,
                    });
                }
                None if tries < 5 => continue,
                None => {
                    return Err(LockError::Io {
                        path,
                        error: std::io::Error::from(std::io::ErrorKind::WouldBlock),
                    });
                }
            }
        }
        let name = format!("{}\n{command}\n", std::process::id());
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(name.as_bytes()));
        written.map_err(io(&path))?;
        Ok(ControlLock { _file: file })
    }
}

/// The holder of `home`'s lock, or `None` when no control plane runs there. Read from the
/// kernel's list of locks, never by taking the lock: a look must not make a control plane
/// starting at that moment fail.
pub fn holder(home: &Path) -> Result<Option<Holder>, LockError> {
    let path = lock_path(home);
    let deadline = Instant::now() + NAMING;
    loop {
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io(&path)(error)),
        };
        let meta = file.metadata().map_err(io(&path))?;
        let Some(&pid) = lockers(meta.dev(), meta.ino())?.first() else {
            return Ok(None);
        };
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io(&path))?;
        let command = parse(&text)
            .filter(|(named, _)| *named == pid)
            .map(|(_, command)| command);
        if command.is_some() || Instant::now() >= deadline {
            return Ok(Some(Holder { pid, command }));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to the process holding `home`'s lock; `None` when nobody holds it. The PID
/// is the one the kernel lists as the holder, looked up again after a pidfd of it is open, so
/// the signal never reaches a process that took over the number of one that ended. The pidfd
/// comes back with the holder: it becomes readable once that very process has ended.
pub fn signal_holder(
    home: &Path,
    signal: rustix::process::Signal,
) -> Result<Option<(Holder, std::os::fd::OwnedFd)>, LockError> {
    let path = lock_path(home);
    loop {
        let Some(holder) = holder(home)? else {
            return Ok(None);
        };
        let Some(pid) = rustix::process::Pid::from_raw(holder.pid as i32) else {
            // Listed as 0: the holder runs in a PID namespace this process cannot see.
            return Err(io(&path)(std::io::Error::other(format!(
                "the holder ({holder}) runs in another PID namespace"
            ))));
        };
        let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(pidfd) => pidfd,
            // It has just ended: look again.
            Err(rustix::io::Errno::SRCH) => continue,
            Err(error) => return Err(io(&path)(error.into())),
        };
        let meta = std::fs::metadata(&path).map_err(io(&path))?;
        if lockers(meta.dev(), meta.ino())?.contains(&holder.pid) {
            rustix::process::pidfd_send_signal(pidfd.as_fd(), signal)
                .map_err(|e| io(&path)(e.into()))?;
            return Ok(Some((holder, pidfd)));
        }
    }
}

/// The PIDs the kernel lists (`/proc/locks`) as holding a flock on the file `dev`, `ino`.
fn lockers(dev: u64, ino: u64) -> Result<Vec<u32>, LockError> {
    let device = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    let locks = Path::new("/proc/locks");
    let listed = std::fs::read_to_string(locks).map_err(io(locks))?;
    Ok(flock_holders(&listed, &device))
}

/// The PIDs `/proc/locks` text lists as holding a flock on `device` (`maj:min:inode`).
fn flock_holders(listed: &str, device: &str) -> Vec<u32> {
    listed
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; a waiter's line has "->"
            // after the number, and so is not a holder's.
            match fields.as_slice() {
                [_, "FLOCK", _, _, pid, on, ..] if *on == device => pid.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// Opens (creating, owner-only) the lock file, close-on-exec as std opens every file.
fn open(path: &Path) -> Result<File, LockError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    // A file made by an older graven, or under another umask, is made owner-only too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(path))?;
    Ok(file)
}

/// Tries to take the lock without waiting: `false` when another holds it.
fn try_lock(file: &File, path: &Path) -> Result<bool, LockError> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(error) => Err(io(path)(error.into())),
    }
}

/// `<pid>\n<command>\n`, as `acquire` writes it; `None` until it is whole.
fn parse(text: &str) -> Option<(u32, String)> {
    let (pid, rest) = text.split_once('\n')?;
    let command = rest.strip_suffix('\n')?;
    Some((pid.parse().ok()?, command.to_owned()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LockError + use<> {
    let path = path.to_owned();
    move |error| LockError::Io { path, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_until_it_lets_go() {
        let home = tempfile::tempdir().unwrap();
        let first = ControlLock::acquire(home.path(), "graven daemon").unwrap();
        let mode = std::fs::metadata(lock_path(home.path())).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        let me = std::process::id();
        let message = ControlLock::acquire(home.path(), "graven up")
            .unwrap_err()
            .to_string();
        let expected = format!(
            "a control plane already runs on {} (pid {me}, graven daemon)",
            home.path().display(),
        );
        assert!(message.starts_with(&expected), "{message}");
        let daemon = Holder {
            pid: me,
            command: Some("graven daemon".to_owned()),
        };
        assert_eq!(holder(home.path()).unwrap(), Some(daemon));
        drop(first);
        assert_eq!(holder(home.path()).unwrap(), None);
        let _second = ControlLock::acquire(home.path(), "graven up").unwrap();
        let up = Holder {
            pid: me,
            command: Some("graven up".to_owned()),
        };
        assert_eq!(holder(home.path()).unwrap(), Some(up));
    }

    #[test]
    fn nobody_holds_the_lock_of_a_fresh_home() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(holder(home.path()).unwrap(), None);
        let signalled = signal_holder(home.path(), rustix::process::Signal::TERM).unwrap();
        assert!(signalled.is_none());
        // Nor of one whose holder has gone.
        drop(ControlLock::acquire(home.path(), "graven daemon").unwrap());
        assert_eq!(holder(home.path()).unwrap(), None);
    }

    #[test]
    fn lines_of_proc_locks() {
        let listed = "1: FLOCK  ADVISORY  WRITE 32170 fe:00:10043491 0 EOF\n\
                      2: POSIX  ADVISORY  WRITE 40 fe:00:77 0 EOF\n\
                      3: -> FLOCK  ADVISORY  WRITE 41 fe:00:10043491 0 EOF\n";
        assert_eq!(flock_holders(listed, "fe:00:10043491"), vec![32170]);
        assert_eq!(flock_holders(listed, "fe:00:1004349"), Vec::<u32>::new());
        assert_eq!(flock_holders(listed, "fe:00:77"), Vec::<u32>::new());
    }

    #[test]
    fn names_are_read_only_once_whole() {
        assert_eq!(
            parse("12\ngraven daemon\n"),
            Some((12, "graven daemon".to_owned()))
        );
        assert_eq!(parse(""), None);
        assert_eq!(parse("12\ngraven dae"), None);
        assert_eq!(parse("1x\ngraven\n"), None);
    }
}
