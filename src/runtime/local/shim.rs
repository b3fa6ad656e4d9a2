//! The per-instance supervisor: the graven binary re-executed as `graven __shim <dir>`, in
//! its own session so it outlives the graven that started it. It starts the sandbox, tells
//! its starter "ok" or the error on its stdout, captures the workload's stdout and stderr
//! line by line with a timestamp into the instance's log, and records the exit in the
//! instance's state.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::state::{self, LOG, Proc, SHIM_REQUEST, ShimRequest};
use crate::runtime::InstanceStatus;

/// The argv[1] that makes the graven binary act as an instance's shim.
pub const SHIM_ARG: &str = "__shim";

pub fn main(dir: &Path) -> ! {
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
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG))
        .map_err(|e| format!("opening the log: {e}"))?;
    let log = Arc::new(Mutex::new(log));
    let (out_read, out_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (err_read, err_write) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut sandboxed = crate::sandbox::spawn(
        &request.spec,
        &request.options,
        out_write.into(),
        err_write.into(),
    )
    .map_err(|e| e.to_string())?;
    state::update(dir, |s| {
        s.shim = Proc::of(std::process::id());
        s.helper = Proc::of(sandboxed.child.id());
        s.workload = Proc::of(sandboxed.pid);
        if s.status == InstanceStatus::Created {
            s.status = InstanceStatus::Running;
        }
    })
    .map_err(|e| e.to_string())?;
    println!("ok");
    let _ = std::io::stdout().flush();
    detach_stdio();
    let readers = [("stdout", out_read), ("stderr", err_read)].map(|(stream, pipe)| {
        let log = log.clone();
        std::thread::spawn(move || capture(stream, pipe, &log))
    });
    let status = sandboxed.child.wait();
    for reader in readers {
        let _ = reader.join();
    }
    let exited = match status {
        Ok(status) => InstanceStatus::Exited {
            code: status.code(),
            signal: status.signal(),
        },
        Err(_) => InstanceStatus::Exited {
            code: None,
            signal: None,
        },
    };
    // The cgroups go before the exit is recorded, so whoever sees the instance exited
    // finds nothing of it left in /sys/fs/cgroup.
    if let Ok(state) = state::load(dir) {
        state.cgroups.remove();
    }
    state::update(dir, |s| {
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

/// Copies one stream into the log as `<RFC 3339 time> <stream> <line>` lines.
fn capture(stream: &str, pipe: std::io::PipeReader, log: &Mutex<std::fs::File>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line);
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(file, "{now} {stream} {text}");
    }
}

/// One captured log line, split back into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    pub text: &'a str,
}

pub fn parse_log_line(line: &str) -> Option<LogLine<'_>> {
    let (time, rest) = line.split_once(' ')?;
    let (stream, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(LogLine { time, stream, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_split_back() {
        assert_eq!(
            parse_log_line("2026-11-22T00:00:00.123Z stdout hello world"),
            Some(LogLine {
                time: "2026-11-22T00:00:00.123Z",
                stream: "stdout",
                text: "hello world"
            })
        );
        assert_eq!(
            parse_log_line("2026-11-22T00:00:00.123Z stderr"),
            Some(LogLine {
                time: "2026-11-22T00:00:00.123Z",
                stream: "stderr",
                text: ""
            })
        );
    }
}
