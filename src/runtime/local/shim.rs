//! The per-instance supervisor, a fresh single-threaded graven process in its own session so
//! it outlives the graven that started it. Being single-threaded, it starts the sandbox
//! itself (`sandbox::launch`, no helper exec), tells its starter "ok" or the error on a pipe,
//! passes stop signals on to the workload, and records the exit in the instance's state.
//! The workload writes its stdout and stderr straight into its source in the log store
//! (`logs::ingest`); the shim stamps times into the source's index, syncs it on a schedule
//! and enforces its service's retention, so a kill -9 of the shim loses no line.
//!
//! How it comes to be depends on its starter (`start`). A single-threaded starter
//! (`graven run`) forks it: the child already is a fresh single-threaded graven, and an exec
//! would only add to every start. A starter with threads (the daemon, the tests) re-executes
//! the graven binary as `graven __shim <dir>` and hands it the request on its stdin, since a
//! fork of a threaded process may inherit a lock another thread holds. Either way the
//! request (which holds the workload's secrets) is never written to a file.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::state::{self, Proc, ShimRequest};
use super::volume_lock;
use crate::logs::Stamper;
use crate::runtime::InstanceStatus;
use crate::sandbox::{self, Ended, Launched};

/// The argv[1] that makes the graven binary act as an instance's shim.
pub const SHIM_ARG: &str = "__shim";

/// Starts the shim of the instance in `dir`, and waits for its "ok" (or its error).
pub fn start(dir: &Path, request: &ShimRequest) -> Result<(), String> {
    if sandbox::single_threaded() {
        fork(dir, request)
    } else {
        spawn(dir, request)
    }
}

/// Re-executes the graven binary as the shim, with the request on its stdin: a pipe, so
/// the secrets in its env are never on disk.
fn spawn(dir: &Path, request: &ShimRequest) -> Result<(), String> {
    let mut child = Command::new(sandbox::helper_binary())
        .arg(SHIM_ARG)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the shim: {e}"))?;
    let report = child.stdout.take().expect("stdout is piped");
    remember(child.id() as i32);
    // The shim reads the request whole before anything else, so a request larger than the
    // pipe's buffer does not block this write for long; a shim that died early breaks it,
    // and its report (none) says so.
    let mut input = child.stdin.take().expect("stdin is piped");
    let _ = input.write_all(&serde_json::to_vec(request).expect("a shim request serializes"));
    drop(input);
    read_report(report.into())
}

/// Forks the shim. The caller has no other thread, so the child may do anything.
fn fork(dir: &Path, request: &ShimRequest) -> Result<(), String> {
    let (report_read, report_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process has a single thread (checked by `start`), so the child inherits
    // no lock held by another, and ends with `_exit`, never returning to the caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!(
            "cannot start the shim: fork: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        let code = forked(dir, request, report_write.into());
        // SAFETY: ends the child without running the starter's exit handlers or flushing
        // the buffers it inherited.
        unsafe { libc::_exit(code) }
    }
    drop(report_write);
    remember(pid);
    read_report(report_read.into())
}

/// The forked shim: its own session, stdio on /dev/null, and none of the starter's files
/// left open but the report pipe, so it holds no lock or pipe end of the starter's.
fn forked(dir: &Path, request: &ShimRequest, report: OwnedFd) -> i32 {
    let _ = rustix::process::setsid();
    let _ = rustix::thread::set_name(c"graven shim");
    // It may outlive its starter's directory by far: it keeps none busy.
    let _ = std::env::set_current_dir("/");
    detach_stdio(&[0, 1, 2]);
    // The report pipe moves to fd 3 (close-on-exec, so the workload never holds it); every
    // fd above is closed. Its owner is forgotten: its fd is closed or moved.
    const REPORT_FD: i32 = 3;
    let from = report.as_raw_fd();
    std::mem::forget(report);
    // SAFETY: dup3 onto fd 3 and close_range above it only touch fds nothing here uses again.
    unsafe {
        if from != REPORT_FD && libc::dup3(from, REPORT_FD, libc::O_CLOEXEC) < 0 {
            return 1;
        }
        libc::close_range(REPORT_FD as u32 + 1, u32::MAX, 0);
    }
    // SAFETY: fd 3 is the report pipe, owned from here on by this File alone.
    serve(dir, request, unsafe { File::from_raw_fd(REPORT_FD) })
}

/// The shims this process started that had not ended when last looked at. A shim is its
/// starter's child until that exits, so a long-lived starter (the daemon) must reap the ones
/// that end; one list looked at on every start and every listing does that without a thread
/// waiting per instance. A shim left here when its starter exits is reaped by init.
static SHIMS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

pub(super) fn remember(pid: i32) {
    SHIMS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(pid);
    reap();
}

/// Reaps the shims this process started that have ended.
pub fn reap() {
    let mut shims = SHIMS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // SAFETY: waitpid without blocking on our own children.
    shims.retain(|&pid| unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == 0);
}

/// Reads the shim's one line: "ok", or "error <why>".
fn read_report(report: OwnedFd) -> Result<(), String> {
    let mut line = String::new();
    let _ = BufReader::new(File::from(report)).read_line(&mut line);
    match line.trim_end().strip_prefix("error ") {
        None if line.trim_end() == "ok" => Ok(()),
        Some(message) => Err(message.to_owned()),
        None => Err("the shim exited without a word".to_owned()),
    }
}

/// `graven __shim <dir>`: the shim re-executed by a starter with threads, reporting on its
/// stdout. Never returns.
pub fn main(dir: &Path) -> ! {
    // None of its starter's files (the daemon's, or whatever `graven up`'s caller left open
    // without close-on-exec): the shim has the host's privileges and outlives its starter.
    // SAFETY: first thing in a fresh process; it has opened nothing of its own above stderr.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    // Its own session, so a Ctrl-C or hang-up at the starter's terminal never reaches the
    // instance. Done here rather than by the starter between fork and exec, which would keep
    // the starter from using posix_spawn (a vfork) and make it copy its page tables instead.
    let _ = rustix::process::setsid();
    let _ = std::env::set_current_dir("/");
    let report = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from);
    // stdout is the report pipe: pointed at /dev/null, only the copy above holds it.
    detach_stdio(&[1, 2]);
    let Ok(mut report) = report else {
        std::process::exit(1)
    };
    let mut bytes = Vec::new();
    let request = std::io::stdin()
        .lock()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the request: {e}"))
        .and_then(|_| serde_json::from_slice::<ShimRequest>(&bytes).map_err(|e| e.to_string()));
    drop(bytes);
    // Its stdin was the starter's pipe: nothing of the starter's stays open.
    detach_stdio(&[0]);
    match request {
        Ok(request) => std::process::exit(serve(dir, &request, report)),
        Err(message) => {
            let _ = writeln!(report, "error {message}");
            std::process::exit(1)
        }
    }
}

/// Starts the workload, reports "ok" or the error on `report` and closes it, then stamps
/// and syncs its output until it ends and records how. Returns the shim's exit code.
fn serve(dir: &Path, request: &ShimRequest, mut report: File) -> i32 {
    let (launched, stamper, _held, volumes) = match launch(dir, request) {
        Ok(started) => started,
        Err(message) => {
            let _ = writeln!(report, "error {message}");
            return 1;
        }
    };
    let _ = report.write_all(b"ok\n");
    drop(report);
    let ended = match Ingest::new(dir, request, stamper) {
        Ok(mut ingest) => {
            let inotify = ingest
                .inotify
                .try_clone()
                .expect("an inotify descriptor dups");
            let ended = sandbox::supervise_watching(&launched, inotify.as_fd(), &mut |readable| {
                ingest.wake(readable)
            });
            ingest.finish();
            ended
        }
        // Without inotify (out of watches) output is still written, stamped on a timer.
        Err(mut stamper) => {
            let ended = sandbox::supervise(&launched, &[], &mut |_, _| {});
            let _ = stamper.stamp_final(crate::logs::now_ns());
            let _ = stamper.sync();
            stamper.unseal();
            ended
        }
    };
    // The workload is gone (reaped, and its namespace with it): its volumes are free, and
    // are let go before the exit is recorded, so whoever sees it exited can take them.
    drop(volumes);
    let exited = match ended {
        Ended::Code(code) => InstanceStatus::Exited {
            code: Some(code),
            signal: None,
        },
        Ended::Signal(signal) => InstanceStatus::Exited {
            code: None,
            signal: Some(signal),
        },
    };
    let recorded = state::update(dir, |s| {
        // The cgroups go before the exit is recorded, so whoever sees the instance exited
        // finds nothing of it left in /sys/fs/cgroup.
        s.cgroups.remove();
        // Its user-mode network carries nothing any more.
        if let Some(pasta) = s.pasta {
            super::usernet::stop(pasta);
        }
        if !s.status.is_exited() {
            s.status = exited;
        }
    });
    if recorded.is_err()
        && let Some(id) = dir.file_name().and_then(|name| name.to_str())
    {
        // Its state is gone (the instance's directory was deleted): nobody will remove its
        // cgroups but this shim, which alone knows the workload has ended.
        super::cgroup::of(id).remove();
    }
    i32::from(recorded.is_err())
}

/// Takes the locks of the instance's named volumes (volume_lock.rs), or says who holds one.
fn lock_volumes(request: &ShimRequest) -> Result<Vec<volume_lock::Held>, String> {
    if volume_lock::disabled() {
        return Ok(Vec::new());
    }
    let mut held = Vec::new();
    for claim in &request.volume_locks {
        let holder = volume_lock::Holder {
            id: claim.id.clone(),
            instance: claim.instance.clone(),
            shim: Proc::of(std::process::id()),
            workload: None,
        };
        let lock = volume_lock::take(
            &claim.volume,
            &claim.path,
            holder,
            volume_lock::WAIT_FOR_GONE,
        )
        .map_err(|e| e.to_string())?;
        held.push(lock);
    }
    Ok(held)
}

type Started = (Launched, Stamper, File, Vec<volume_lock::Held>);

/// Makes the instance's log source, takes its volumes' locks, starts the workload writing
/// straight into its data files and records it in the instance's state.
fn launch(dir: &Path, request: &ShimRequest) -> Result<Started, String> {
    use std::os::unix::fs::OpenOptionsExt;
    // Held open for writing for life (never written): how `orphans` finds this shim if the
    // instance's directory is deleted.
    let held = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(state::HELD))
        .map_err(|e| format!("opening {}: {e}", state::HELD))?;
    // The data files are given to the workload's user, as runc gives it its pipes, so a
    // server that opens /dev/stdout or /dev/stderr (nginx's `error_log /dev/stderr`) as a
    // user other than root may. Rootless, the maker already is that user.
    let owner = (!sandbox::rootless()).then_some((request.spec.uid, request.spec.gid));
    let (stamper, outputs) = Stamper::create(&request.log.dir, &request.log.meta, owner)
        .map_err(|e| format!("opening the log: {e}"))?;
    if let Some(group) = request.log.dir.parent() {
        // The newest start's bound is its service's, for `remove` and gc to enforce.
        let _ = crate::logs::retention::save_policy(group, request.log.policy());
    }
    // A workload that never starts writes nothing: its data files must not stay sealed.
    let started = lock_volumes(request).and_then(|volumes| {
        let launched = sandbox::launch(
            &request.spec,
            &request.options,
            outputs.stdout,
            outputs.stderr,
        )
        .map_err(|e| e.to_string())?;
        Ok((volumes, launched))
    });
    let (mut volumes, launched) = started.inspect_err(|_| stamper.unseal())?;
    let workload = Proc::of(launched.pid);
    for lock in &mut volumes {
        lock.record_workload(workload);
    }
    super::test_hold(super::HOLD_SHIM_RECORD_ENV);
    state::update(dir, |s| {
        s.shim = Proc::of(std::process::id());
        s.workload = workload;
        if s.status == InstanceStatus::Created {
            s.status = InstanceStatus::Running;
        }
    })
    .map_err(|e| e.to_string())?;
    Ok((launched, stamper, held, volumes))
}

/// The shim's loop over the log: an inotify watch on the two data files wakes it when the
/// workload writes; it stamps (at most once per stream per millisecond, then looks away for
/// that millisecond, so its wake-ups do not grow with the line rate), syncs on the
/// request's interval and enforces its service's retention now and then.
struct Ingest<'a> {
    dir: &'a Path,
    stamper: Stamper,
    inotify: OwnedFd,
    sync_every: Duration,
    next_sync: Instant,
    next_retention: Instant,
    group: Option<PathBuf>,
    policy: crate::logs::retention::Policy,
    /// Since when the store's filesystem is full (no space left, or the index could not be
    /// written), and whether the last stamp failed.
    full_since: Option<std::time::SystemTime>,
    stamp_failed: bool,
}

/// How often a shim enforces its service's retention.
const RETENTION_EVERY: Duration = Duration::from_secs(30);

impl<'a> Ingest<'a> {
    fn new(dir: &'a Path, request: &ShimRequest, stamper: Stamper) -> Result<Ingest<'a>, Stamper> {
        use rustix::fs::inotify;
        let Ok(fd) = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        else {
            return Err(stamper);
        };
        for path in stamper.paths() {
            if inotify::add_watch(&fd, &path, inotify::WatchFlags::MODIFY).is_err() {
                return Err(stamper);
            }
        }
        let now = Instant::now();
        let sync_every = Duration::from_millis(request.log.sync_ms.max(1));
        Ok(Ingest {
            dir,
            stamper,
            inotify: fd,
            sync_every,
            next_sync: now + sync_every,
            next_retention: now + RETENTION_EVERY,
            group: request.log.dir.parent().map(Path::to_owned),
            policy: request.log.policy(),
            full_since: None,
            stamp_failed: false,
        })
    }

    fn wake(&mut self, readable: bool) -> sandbox::Wake {
        if readable {
            let mut buffer = [0u8; 4096];
            // Drained: only that a file changed matters, not which.
            while rustix::io::read(&self.inotify, &mut buffer).is_ok_and(|n| n > 0) {}
        }
        let (stamped, pending) = self.stamp();
        let now = Instant::now();
        if now >= self.next_sync {
            let _ = self.stamper.sync();
            self.next_sync = now + self.sync_every;
            // A full disk fails the workload's writes, not ours (the index's page may
            // have room): the filesystem says so.
            match (self.stamper.space_left(), self.full_since) {
                (Some(0), None) => {
                    let since = std::time::SystemTime::now();
                    self.full_since = Some(since);
                    self.note_full(since, true);
                }
                (Some(left), Some(since)) if left > 0 => {
                    self.full_since = None;
                    self.note_full(since, false);
                }
                _ => {}
            }
        }
        if now >= self.next_retention {
            if let Some(group) = &self.group {
                let _ = crate::logs::retention::enforce(group, self.policy, false);
            }
            self.next_retention = now + RETENTION_EVERY;
        }
        let until = self.next_sync.min(self.next_retention);
        let idle = until.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1;
        match () {
            // The index could not be written: try again shortly, whatever the files do.
            () if self.stamp_failed => sandbox::Wake {
                watched: false,
                timeout_ms: 100.min(idle),
            },
            // Just stamped, or growth left for the next millisecond: look again in one.
            () if stamped || pending => sandbox::Wake {
                watched: false,
                timeout_ms: 1,
            },
            () => sandbox::Wake {
                watched: true,
                timeout_ms: idle,
            },
        }
    }

    /// Stamps; returns (whether it wrote an entry, whether growth is left to stamp).
    fn stamp(&mut self) -> (bool, bool) {
        let before = self.stamper.entries();
        match self.stamper.stamp(crate::logs::now_ns()) {
            Ok(pending) => {
                self.stamp_failed = false;
                (self.stamper.entries() > before, pending)
            }
            Err(_) => {
                self.stamp_failed = true;
                if self.full_since.is_none() {
                    let now = std::time::SystemTime::now();
                    self.full_since = Some(now);
                    self.note_full(now, true);
                }
                (false, true)
            }
        }
    }

    /// Records in the instance's state (its warnings, which `graven ps --json` and the
    /// controller show) that the log store could not be written, and when it could again.
    /// On a full disk the state may not be writable either: the end is recorded anyway.
    fn note_full(&self, since: std::time::SystemTime, starting: bool) {
        let at = humantime::format_rfc3339_seconds(since);
        let line = if starting {
            format!(
                "log store full since {at}: what the workload could not write meanwhile is lost"
            )
        } else {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            format!("log store has space again since {now} (full since {at})")
        };
        let _ = state::update(self.dir, |s| s.warnings.push(line));
    }

    /// The last stamp, whatever the millisecond, and a sync: the workload has ended.
    fn finish(&mut self) {
        let _ = self.stamper.stamp_final(crate::logs::now_ns());
        let _ = self.stamper.sync();
        self.stamper.unseal();
    }
}

/// Points the given standard fds at /dev/null, so nothing the shim reads or writes there
/// touches its starter's terminal or pipes, or can block.
fn detach_stdio(fds: &[i32]) {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for &fd in fds {
            // SAFETY: dup2 onto a standard fd replaces it with /dev/null; `null` stays valid.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}
