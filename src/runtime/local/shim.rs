//! The per-instance supervisor: the graven binary re-executed as `graven __shim <dir>`, in
//! its own session so it outlives the graven that started it. Being a fresh single-threaded
//! process, it starts the sandbox itself (`sandbox::launch`, no helper exec), tells its
//! starter "ok" or the error on its stdout, passes stop signals on to the workload, captures
//! the workload's stdout and stderr line by line with a timestamp into the instance's log
//! (rotated at a size, one earlier file kept), and records the exit in the instance's state.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;

use super::log::{Log, Sink};
use super::state::{self, Proc, SHIM_REQUEST, ShimRequest};
use crate::runtime::InstanceStatus;
use crate::sandbox::Ended;

/// The argv[1] that makes the graven binary act as an instance's shim.
pub const SHIM_ARG: &str = "__shim";

pub fn main(dir: &Path) -> ! {
    // Its own session, so a Ctrl-C or hang-up at the starter's terminal never reaches the
    // instance. Done here rather than by the starter between fork and exec, which would keep
    // the starter from using posix_spawn (a vfork) and make it copy its page tables instead.
    let _ = rustix::process::setsid();
    match run(dir) {
        Ok(()) => std::process::exit(0),
        Err(message) => {
            // The starter reads this line; after "ok" stdout is /dev/null and this is lost,
            // which is fine: the state file then says how the instance ended.
            println!("error {message}");
            std::process::exit(1)
        }
    }
}

fn run(dir: &Path) -> Result<(), String> {
    let request_path = dir.join(SHIM_REQUEST);
    let request: ShimRequest = std::fs::read(&request_path)
        .map_err(|e| format!("reading {}: {e}", request_path.display()))
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))?;
    let mut log = Log::open(dir, request.log_bytes).map_err(|e| format!("opening the log: {e}"))?;
    let (out_read, out_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (err_read, err_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let launched = crate::sandbox::launch(
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
    println!("ok");
    let _ = std::io::stdout().flush();
    detach_stdio();
    let mut streams = [Lines::new("stdout"), Lines::new("stderr")];
    let ended = crate::sandbox::supervise(
        &launched,
        &[out_read.as_fd(), err_read.as_fd()],
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
    state::update(dir, |s| {
        // The cgroups go before the exit is recorded, so whoever sees the instance exited
        // finds nothing of it left in /sys/fs/cgroup.
        s.cgroups.remove();
        if !s.status.is_exited() {
            s.status = exited;
        }
    })
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Points stdout and stderr at /dev/null, so the starter sees the end of the "ok" line's
/// pipe and nothing the shim writes later goes anywhere it could block.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fds 1 and 2 replaces them with /dev/null; `null` stays valid.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
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
