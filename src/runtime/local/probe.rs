//! Exec health probes: a command run inside a running instance as `exec` runs one (its
//! namespaces, user, env and cgroups), but part of running it rather than a break-glass
//! entry: the instance is not tainted, the command's output is kept (its last line,
//! bounded) instead of shown, and a command that outlasts its timeout is killed. Also the
//! check, before a deploy starts anything, that a health command exists in the image.

use std::io::Read as _;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{DEFAULT_PATH, LocalRuntime, check_entrypoint, other};
use crate::runtime::{InstanceId, ProbeOutput, RuntimeError};
use crate::sandbox;
use crate::store::Digest;

/// How much of a probe's output is read in all: the rest is left in the pipe (whose reader
/// is closed, so a chatty command gets EPIPE rather than block).
const OUTPUT_BYTES: usize = 64 * 1024;

/// How many bytes of the end of the output are kept to find its last line in.
const TAIL_BYTES: usize = 4096;

impl LocalRuntime {
    /// `Runtime::probe`, blocking.
    pub fn probe_blocking(
        &self,
        id: &InstanceId,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ProbeOutput, RuntimeError> {
        let (_, state) = self.load(id)?;
        let status = state.observed_status();
        let Some(workload) = state.workload.filter(|_| !status.is_exited()) else {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                status,
                action: "probed",
            });
        };
        // Unlike `exec`, the state is not touched: a probe leaves the instance as it was.
        let request = sandbox::ExecRequest {
            pid: workload.pid,
            args: command,
            env: state.env.clone(),
            cwd: state.cwd.clone(),
            uid: state.uid,
            gid: state.gid,
            cgroups: state.cgroups.procs(),
        };
        let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| other("making a probe's pipe")(e.into()))?;
        let writer_too = writer.try_clone().map_err(other("making a probe's pipe"))?;
        let started = Instant::now();
        // Both write ends go into the command builder and are closed with it, so the pipe
        // ends when the command (and whatever it left running) does.
        let mut child = sandbox::exec_spawn(
            &request,
            Stdio::null(),
            Stdio::from(writer),
            Stdio::from(writer_too),
        )
        .map_err(|e| RuntimeError::Sandbox {
            id: id.clone(),
            message: e.to_string(),
        })?;
        let pidfd = match rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        ) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(other("watching a probe")(error.into()));
            }
        };
        let mut output = Output::default();
        let mut pipe = std::fs::File::from(reader);
        let ended = wait(pidfd.as_fd(), &mut pipe, &mut output, started + timeout);
        if !ended {
            // The helper's death kills the command (its parent-death signal). The child is
            // not yet reaped, so its PID is still its own.
            let _ = child.kill();
        }
        let status = child.wait().map_err(other("waiting for a probe"))?;
        // Whatever is already in the pipe, without waiting for what the command left running.
        if rustix::io::ioctl_fionbio(&pipe, true).is_ok() {
            while read_some(&mut pipe, &mut output) {}
        }
        Ok(ProbeOutput {
            code: status.code(),
            timed_out: !ended,
            last_line: output.last_line(),
        })
    }

    /// Checks that a health command's program is in `image` (a path, or a name on the
    /// image's `$PATH`), in the image's root as an instance sees it, unpacking the image
    /// when it is not yet: a deploy is refused before anything starts rather than rolled
    /// back after. Blocking.
    pub fn check_probe_command(
        &self,
        image: &Digest,
        command: &[String],
    ) -> Result<(), RuntimeError> {
        let _lock = super::rootfs::start_lock(&self.home, false)?;
        let (image_config, root) = self.prepare_locked(image)?;
        let path = image_config
            .config
            .config
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned();
        let program = command.first().map_or("", String::as_str);
        check_entrypoint(&root, program, &path).map_err(|path| RuntimeError::MissingHealthCommand {
            image: image.clone(),
            path,
        })
    }
}

/// Waits for the child behind `pidfd` to exit, reading its output meanwhile, until
/// `deadline`. Returns whether it exited.
fn wait(
    pidfd: std::os::fd::BorrowedFd<'_>,
    pipe: &mut std::fs::File,
    output: &mut Output,
    deadline: Instant,
) -> bool {
    let mut pipe_open = true;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if pipe_open { pipe.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let millis = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: `fds` is an array of two initialized pollfds that outlives the call; a
        // negative fd is ignored by poll.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if pipe_open && fds[1].revents != 0 {
            pipe_open = read_some(pipe, output);
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// One read into `output`; false at the end of the pipe, on an error, or once enough was read.
fn read_some(pipe: &mut std::fs::File, output: &mut Output) -> bool {
    let mut buffer = [0u8; 4096];
    match pipe.read(&mut buffer) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            output.push(&buffer[..n]);
            output.read < OUTPUT_BYTES
        }
    }
}

/// The end of a probe's output.
#[derive(Default)]
struct Output {
    tail: Vec<u8>,
    read: usize,
}

impl Output {
    fn push(&mut self, bytes: &[u8]) {
        self.read += bytes.len();
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > TAIL_BYTES {
            self.tail.drain(..self.tail.len() - TAIL_BYTES);
        }
    }

    /// The last line that is not blank, at most `PROBE_LINE_BYTES` long (cut at a character).
    fn last_line(&self) -> String {
        crate::runtime::probe_last_line(&self.tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PROBE_LINE_BYTES;

    fn check(chunks: &[&str], expected: &str) {
        let mut output = Output::default();
        for chunk in chunks {
            output.push(chunk.as_bytes());
        }
        assert_eq!(output.last_line(), expected, "{chunks:?}");
    }

    #[test]
    fn the_last_line_that_says_something_is_kept() {
        check(&[], "");
        check(&["ready\n"], "ready");
        check(&["starting\nno response", "\n\n  \n"], "no response");
        check(&["a\nb", "c\n"], "bc");
        let long = "x".repeat(1000);
        check(&[&long], &"x".repeat(PROBE_LINE_BYTES));
        // Cut at a character, never inside one.
        let wide = "é".repeat(150);
        assert_eq!(
            {
                let mut o = Output::default();
                o.push(wide.as_bytes());
                o.last_line()
            },
            "é".repeat(PROBE_LINE_BYTES / 2)
        );
        let flood = "line\n".repeat(10_000);
        check(&[&flood, "last words\n"], "last words");
    }
}
