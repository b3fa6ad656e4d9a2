//! The per-instance supervisor, a fresh single-threaded graven process in its own session so
//! it outlives the graven that started it. Being single-threaded, it starts the sandbox
//! itself (`sandbox::launch`, no helper exec), tells its starter "ok" or the error on a pipe,
//! passes stop signals on to the workload, captures the workload's stdout and stderr line by
//! line with a timestamp into the instance's log (rotated at a size, one earlier file kept),
//! and records the exit in the instance's state.
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
use std::path::Path;
use std::process::{Command, Stdio};

use super::log::{Log, Sink};
use super::state::{self, Proc, ShimRequest};
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

/// Starts the workload, reports "ok" or the error on `report` and closes it, then captures
/// the workload's output until it ends and records how. Returns the shim's exit code.
fn serve(dir: &Path, request: &ShimRequest, mut report: File) -> i32 {
    let (launched, mut log, outputs) = match launch(dir, request) {
        Ok(started) => started,
        Err(message) => {
            let _ = writeln!(report, "error {message}");
            return 1;
        }
    };
    let _ = report.write_all(b"ok\n");
    drop(report);
    let mut streams = [Lines::new("stdout"), Lines::new("stderr")];
    let ended = sandbox::supervise(
        &launched,
        &[outputs[0].as_fd(), outputs[1].as_fd()],
        &mut |i, bytes| streams[i].push(bytes, &mut log),
    );
    for stream in &mut streams {
        stream.finish(&mut log);
    }
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

/// Opens the log, starts the workload with its output on two pipes and records it in the
/// instance's state.
fn launch(dir: &Path, request: &ShimRequest) -> Result<(Launched, Log, [OwnedFd; 2]), String> {
    let log = Log::open(dir, request.log_bytes).map_err(|e| format!("opening the log: {e}"))?;
    let (out_read, out_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (err_read, err_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    // A pipe is made 0600 for its maker: the workload's user gets its ends, as runc gives
    // them, so a server that opens /dev/stdout or /dev/stderr (nginx's `error_log
    // /dev/stderr`) as a user other than root may. Rootless, the maker already is that user.
    if !sandbox::rootless() {
        let owner = (
            Some(rustix::fs::Uid::from_raw(request.spec.uid)),
            Some(rustix::fs::Gid::from_raw(request.spec.gid)),
        );
        for pipe in [&out_write, &err_write] {
            rustix::fs::fchown(pipe, owner.0, owner.1)
                .map_err(|e| format!("giving the output pipes to the workload's user: {e}"))?;
        }
    }
    let launched = sandbox::launch(
        &request.spec,
        &request.options,
        out_write.into(),
        err_write.into(),
    )
    .map_err(|e| e.to_string())?;
    state::update(dir, |s| {
        s.shim = Proc::of(std::process::id());
        s.workload = Proc::of(launched.pid);
        if s.status == InstanceStatus::Created {
            s.status = InstanceStatus::Running;
        }
    })
    .map_err(|e| e.to_string())?;
    Ok((launched, log, [out_read.into(), err_read.into()]))
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

/// A line longer than this is logged in pieces of this size, so a workload that never
/// writes a newline cannot make the shim hold an unbounded line.
const MAX_LINE: usize = 16 * 1024;

/// One captured stream, cut into lines that are logged as `<RFC 3339 time> <stream> <line>`.
struct Lines {
    stream: &'static str,
    pending: Vec<u8>,
}

impl Lines {
    fn new(stream: &'static str) -> Lines {
        Lines {
            stream,
            pending: Vec::new(),
        }
    }

    /// Takes what arrived and logs every line it completes, in one write.
    fn push(&mut self, bytes: &[u8], log: &mut impl Sink) {
        let mut lines = Vec::new();
        self.split(bytes, |line| lines.push(line));
        self.write(&lines, log);
    }

    /// Logs the last line when the stream ended without a newline.
    fn finish(&mut self, log: &mut impl Sink) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.write(&[line], log);
        }
    }

    fn split(&mut self, mut bytes: &[u8], mut line: impl FnMut(Vec<u8>)) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.pending.len();
            // One byte past the room: a newline right after a full piece ends that piece.
            let window = &bytes[..bytes.len().min(room + 1)];
            match window.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.pending.extend_from_slice(&window[..end]);
                    line(std::mem::take(&mut self.pending));
                    bytes = &bytes[end + 1..];
                }
                None if window.len() > room => {
                    self.pending.extend_from_slice(&window[..room]);
                    line(std::mem::take(&mut self.pending));
                    bytes = &bytes[room..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    bytes = &[];
                }
            }
        }
    }

    fn write(&self, lines: &[Vec<u8>], log: &mut impl Sink) {
        if lines.is_empty() {
            return;
        }
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut text = String::new();
        for line in lines {
            text.push_str(&now);
            text.push(' ');
            text.push_str(self.stream);
            text.push(' ');
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
        }
        log.append(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::local::log::parse_log_line;

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut framer = Lines::new("stdout");
        let mut log = Vec::new();
        for chunk in chunks {
            framer.push(chunk, &mut log);
        }
        framer.finish(&mut log);
        String::from_utf8(log)
            .unwrap()
            .lines()
            .map(|line| {
                let parsed = parse_log_line(line).unwrap();
                assert_eq!(parsed.stream, "stdout");
                parsed.text.to_owned()
            })
            .collect()
    }

    #[test]
    fn output_is_cut_into_lines_across_chunks() {
        assert_eq!(lines(&[b"a\nb", b"c\n", b"\nd"]), ["a", "bc", "", "d"]);
        assert_eq!(lines(&[b"one\ntwo\n"]), ["one", "two"]);
        assert!(lines(&[b""]).is_empty());
    }

    #[test]
    fn a_line_without_end_is_logged_in_pieces() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let got = lines(&[&long[..MAX_LINE - 1], &long[MAX_LINE - 1..], b"\nshort\n"]);
        let lengths: Vec<usize> = got.iter().map(String::len).collect();
        assert_eq!(lengths, [MAX_LINE, MAX_LINE, 5, 5]);
        // A line of exactly the piece size is one line, with no empty one after it.
        let exact = [vec![b'y'; MAX_LINE], b"\n".to_vec()].concat();
        assert_eq!(lines(&[&exact]).len(), 1);
        assert_eq!(lines(&[&exact[..MAX_LINE], b"\n"]).len(), 1);
    }
}
