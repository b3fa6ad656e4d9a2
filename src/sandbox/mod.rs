//! The sandbox owns the one place graven forks and enters namespaces: a fresh
//! single-threaded process of the graven binary that unshares, mounts, pivots root, drops
//! privileges and execs the workload. It never runs inside the multi-threaded async process,
//! and it knows nothing of images, services or the store: it is handed a root directory.
//!
//! Two ways in, one code path (`helper::launch`):
//! - `spawn`/`run` (bake's RUN steps) re-execute the binary as a helper, `graven __sandbox`:
//!   this side writes a `Request` as JSON to the helper's stdin and reads a status pipe (the
//!   helper's fd 3, close-on-exec in the workload), where the helper reports the workload's
//!   host PID or any error before the exec, so a failed setup or a missing entrypoint is an
//!   error here, never a silent exit.
//! - `launch` is for a process that already is a fresh single-threaded graven (the local
//!   runtime's shim): it starts the workload as its own child, saving the helper's exec on
//!   every instance start, and `supervise` then waits for it.

mod helper;
pub mod root;
mod seccomp;
pub mod user;

use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;

/// The argv[1] that makes the graven binary act as the sandbox helper.
pub const HELPER_ARG: &str = "__sandbox";
/// The argv[1] that makes the graven binary enter a running sandbox (break-glass exec).
pub const EXEC_ARG: &str = "__sandbox-exec";
/// Points test binaries (which are not graven) at the graven binary to re-execute.
pub const HELPER_ENV: &str = "GRAVEN_SANDBOX_HELPER";
/// The /tmp cap when a spec says 0 (a tmpfs of size 0 would be unlimited).
pub const DEFAULT_TMP_BYTES: u64 = 64 * 1024 * 1024;
/// The most processes and threads a RUN step (`run`) has at once, and an instance unless
/// told otherwise (`runtime::DEFAULT_PIDS` is this): podman's default. Thread-heavy
/// runtimes (a JVM, a large worker pool) stay well under it; a fork bomb stops there instead
/// of at the host's own limit.
pub const DEFAULT_PIDS: u64 = 2048;

/// The directories a read-only root is mounted over, with the modes an image would give them.
/// A root that has them all (the local runtime adds the missing ones when it unpacks an image)
/// is bound as it is, with no overlay to make them. A RUN step's writable root keeps its own
/// `/tmp`.
pub const MOUNT_POINTS: [(&str, u32); 4] = [
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
];

/// The directories a sandbox mounts over its root: a read-only root's `MOUNT_POINTS`, a
/// writable one's (a RUN step's) without `/tmp`, which is its own.
pub fn mount_points(writable_root: bool) -> impl Iterator<Item = &'static str> {
    MOUNT_POINTS
        .iter()
        .map(|(dir, _)| *dir)
        .filter(move |dir| !(writable_root && *dir == "tmp"))
}

/// The helper's file descriptor for the status pipe.
const STATUS_FD: i32 = 3;
/// The environment variable carrying an `ExecRequest` to `graven __sandbox-exec`.
const EXEC_REQUEST_ENV: &str = "GRAVEN_SANDBOX_EXEC";

/// One process to run in a fresh sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxSpec {
    /// The directory that becomes `/`.
    pub rootfs: PathBuf,
    /// False for instances (read-only root, a tmpfs at `/tmp`); true for bake RUN steps, which
    /// write the layer, `/tmp` included (as with `docker build`). A writable root gets empty
    /// `/dev`, `/proc` and `/sys` directories created as mount points when it lacks them; a
    /// read-only root is never written.
    pub writable_root: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    /// Extra bind mounts (volumes), source on the host, target inside the root.
    pub binds: Vec<Bind>,
    /// Size cap of the tmpfs mounted at /tmp of a read-only root (0 means
    /// `DEFAULT_TMP_BYTES`); a writable root has none.
    pub tmp_bytes: u64,
    /// An instance's tmpfs mounts (a build step's are its `BuildStep::tmpfs`), made after
    /// the binds; a missing mount point is made on the read-only root's overlay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<Tmpfs>,
    /// Whether programs may be run from an instance's /tmp, /dev/shm and tmpfs mounts; by
    /// default they are mounted `noexec`, so a program written there cannot be started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec_tmp: bool,
    /// Set for a bake's RUN step only: what a build step gets beyond an instance's lock-down.
    /// `None` (every instance) keeps it: no capability at all.
    #[serde(default)]
    pub build_step: Option<BuildStep>,
}

/// What a bake's RUN step gets that an instance does not: as root in the image, Docker's
/// default capabilities (`BUILD_CAPABILITIES`) inside its namespaces, `chroot` (which Docker's
/// seccomp profile allows with `CAP_SYS_CHROOT`), and tmpfs mounts of its own. Device nodes it
/// makes with `CAP_MKNOD` never open: everything writable in its sandbox is mounted `nodev`
/// and `/dev` holds only bind mounts of the standard nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildStep {
    /// Tmpfs mounts (`RUN --mount=type=tmpfs`), made after the binds.
    pub tmpfs: Vec<Tmpfs>,
    /// A network namespace of its own with nothing in it (`RUN --network=none`); otherwise
    /// the host's, as `docker build --network=host` gives.
    pub no_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tmpfs {
    /// The directory inside the root, made when missing.
    pub target: String,
    /// The size cap; 0 means the kernel's default (half the memory), as BuildKit's.
    pub bytes: u64,
}

/// The capabilities a build step running as root has, by name and number
/// (`linux/capability.h`): Docker's default set (moby's `oci/caps/defaults.go`). A step that
/// runs as another user has none, as with Docker.
pub const BUILD_CAPABILITIES: [(&str, u32); 14] = [
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_MKNOD", 27),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
];

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the sandbox helper {helper}: {source}")]
    Spawn {
        helper: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox for {program:?}: {message}")]
    Setup { program: String, message: String },
    #[error("sandbox for {program:?}: {source}")]
    Io {
        program: String,
        source: std::io::Error,
    },
}

/// What the helper is told beyond the spec: the local runtime's extras.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// An empty directory the helper mounts its scratch tmpfs on (the read-only root's
    /// overlay lives there). A temp dir is made and removed when absent.
    pub scratch: Option<PathBuf>,
    /// `cgroup.procs` files the workload joins before its exec (only the workload: whoever
    /// supervises it stays outside its limits).
    pub cgroups: Vec<PathBuf>,
    /// A prepared network namespace the workload joins instead of the host's network.
    #[serde(default)]
    pub network: Option<NetworkJoin>,
    /// A network namespace of its own with loopback only, made inside the sandbox's user
    /// namespace (rootless), for a user-mode network to attach to.
    #[serde(default)]
    pub new_network: bool,
}

/// A network namespace made ready for a sandbox (`runtime::local::net`): the helper enters
/// it through a close-on-exec descriptor it closes at once, and adds the default route.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkJoin {
    /// The namespace's file (`/run/netns/NAME`).
    pub netns: PathBuf,
    /// The gateway of the default route; `None` leaves the workload only its own subnet.
    pub gateway: Option<std::net::Ipv4Addr>,
}

/// The JSON the helper reads from its stdin.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Request {
    spec: SandboxSpec,
    scratch: PathBuf,
    cgroups: Vec<PathBuf>,
    #[serde(default)]
    network: Option<NetworkJoin>,
    #[serde(default)]
    new_network: bool,
}

/// The JSON `graven __sandbox-exec` reads: a command to run inside a running sandbox.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExecRequest {
    /// The host PID of the sandbox's first process, whose namespaces are entered.
    pub pid: u32,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub cgroups: Vec<PathBuf>,
}

/// A workload started by this process with `launch`.
#[derive(Debug)]
pub struct Launched {
    /// The workload's host PID (PID 1 of its namespace), a child of this process.
    pub pid: u32,
    /// Removed when this value is dropped, after the workload is gone.
    _scratch: Option<tempfile::TempDir>,
}

/// How a sandboxed workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Code(i32),
    /// It was ended by this signal.
    Signal(i32),
}

impl Ended {
    /// A deadly signal that PID 1 would have ignored is delivered as SIGKILL (`translated`
    /// holds the original); the original is what is reported.
    fn from_wait_status(status: i32, translated: Option<i32>) -> Ended {
        if libc::WIFEXITED(status) {
            return Ended::Code(libc::WEXITSTATUS(status));
        }
        match (libc::WTERMSIG(status), translated) {
            (libc::SIGKILL, Some(original)) => Ended::Signal(original),
            (signal, _) => Ended::Signal(signal),
        }
    }
}

/// A workload started in a sandbox through the helper.
#[derive(Debug)]
pub struct Sandboxed {
    /// The helper process; its exit status mirrors the workload's.
    pub child: Child,
    /// The workload's host PID (PID 1 of its namespace).
    pub pid: u32,
    /// Removed when this value is dropped, after the workload is gone.
    _scratch: Option<tempfile::TempDir>,
}

static HELPER_BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Makes this process re-execute `path` as the helper (test binaries are not graven).
pub fn set_helper_binary(path: impl Into<PathBuf>) {
    let _ = HELPER_BINARY.set(path.into());
}

/// The binary re-executed as the helper: `set_helper_binary`, else `$GRAVEN_SANDBOX_HELPER`,
/// else this executable.
pub fn helper_binary() -> PathBuf {
    if let Some(path) = HELPER_BINARY.get() {
        return path.clone();
    }
    if let Some(path) = std::env::var_os(HELPER_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// True when graven runs without root: every sandbox then gets a user namespace.
pub fn rootless() -> bool {
    !rustix::process::geteuid().is_root()
}

/// The ids a workload really runs as (inside its namespaces) when `uid:gid` is asked for.
/// As root, those. Without root the sandbox's user namespace maps one id, the user graven
/// runs as, to 0 inside, so every workload runs as that: root inside, with no capabilities,
/// and the unprivileged user on the host: the one id its map holds, whatever was asked. An
/// id no process can run as (`user::check_id`: -1, "unchanged" to setuid) is refused either
/// way, so a USER means the same on every host.
pub fn identity(uid: u32, gid: u32) -> Result<(u32, u32), user::UserError> {
    user::check_id("uid", uid)?;
    user::check_id("gid", gid)?;
    Ok(if rootless() { (0, 0) } else { (uid, gid) })
}

/// True when this process has no thread but the one calling: then a fork of it may do
/// anything, and `launch` may enter namespaces here. False when that cannot be read.
pub fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Runs `spec` in a fresh sandbox and waits for it, with at most `DEFAULT_PIDS` processes
/// and threads (a pids cgroup of its own, when the host lets graven make one: as root).
/// Blocking.
pub fn run(spec: &SandboxSpec, stdout: Stdio, stderr: Stdio) -> Result<ExitStatus, SandboxError> {
    let cgroup = RunCgroup::create();
    let options = Options {
        cgroups: cgroup.procs(),
        ..Options::default()
    };
    let mut sandboxed = spawn(spec, &options, stdout, stderr)?;
    let status = sandboxed.child.wait();
    // The workload's death ended every process of its PID namespace: the group empties.
    drop(cgroup);
    status.map_err(|source| io_error(spec, source))
}

/// The pids cgroup of one `run`, removed when dropped; none when it cannot be made.
struct RunCgroup(Option<PathBuf>);

impl RunCgroup {
    const ROOT: &str = "/sys/fs/cgroup";

    fn create() -> RunCgroup {
        let name = format!("run-{}-{:x}", std::process::id(), fastrand::u64(..));
        RunCgroup(Self::make(std::path::Path::new(Self::ROOT), &name).ok())
    }

    /// `graven/<name>` in the pids hierarchy (v1) or the unified one (v2, with the pids
    /// controller enabled above it), limited to `DEFAULT_PIDS`.
    fn make(root: &std::path::Path, name: &str) -> std::io::Result<PathBuf> {
        let dir = if root.join("cgroup.controllers").exists() {
            let parent = root.join("graven");
            std::fs::create_dir_all(&parent)?;
            for dir in [root, parent.as_path()] {
                std::fs::write(dir.join("cgroup.subtree_control"), "+pids")?;
            }
            parent.join(name)
        } else {
            root.join("pids/graven").join(name)
        };
        std::fs::create_dir_all(&dir)?;
        if let Err(e) = std::fs::write(dir.join("pids.max"), DEFAULT_PIDS.to_string()) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    fn procs(&self) -> Vec<PathBuf> {
        self.0.iter().map(|dir| dir.join("cgroup.procs")).collect()
    }
}

impl Drop for RunCgroup {
    /// The last processes of a PID namespace are reaped a moment after its PID 1, so a busy
    /// group is retried briefly.
    fn drop(&mut self) {
        let Some(dir) = &self.0 else { return };
        for _ in 0..100 {
            match std::fs::remove_dir(dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(2))
                }
                _ => break,
            }
        }
    }
}

/// Starts `spec` in a fresh sandbox and returns once the workload is exec'd (or setup
/// failed). Blocking, but only for the few milliseconds the setup takes.
pub fn spawn(
    spec: &SandboxSpec,
    options: &Options,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Sandboxed, SandboxError> {
    let (scratch, temp) = scratch_dir(spec, options)?;
    let request = Request {
        spec: spec.clone(),
        scratch,
        cgroups: options.cgroups.clone(),
        network: options.network.clone(),
        new_network: options.new_network,
    };
    let json = serde_json::to_vec(&request).expect("a sandbox request always serializes");
    let mut command = Command::new(helper_binary());
    command.arg(HELPER_ARG).stdout(stdout).stderr(stderr);
    detach_from_terminal(&mut command);
    let (child, pid) = start_helper(command, &json, &spec_program(spec))?;
    Ok(Sandboxed {
        child,
        pid,
        _scratch: temp,
    })
}

/// Puts the helper of `command`, and so the workload, in a session of its own, as runc does
/// for a container: a session without a controlling terminal. Otherwise a bake's RUN step,
/// whose output is graven's stderr, holds the terminal the user typed `graven bake` in, and
/// could push keystrokes into it with TIOCSTI (run by the user's shell once graven exits) or
/// open it again through `/dev/tty`. The new session no longer gets the terminal's SIGINT,
/// so the helper takes SIGKILL when the thread that started it ends (graven killed by ^C,
/// say), as the workload does when the helper dies.
fn detach_from_terminal(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: setsid, prctl and getppid are single syscalls, async-signal-safe, and touch
    // only the forked child itself.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            rustix::process::setsid()?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the death signal was set.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other(
                    "graven ended while starting a sandbox",
                ));
            }
            Ok(())
        });
    }
}

/// Starts `spec` in a fresh sandbox as a child of this process, with the workload's stdout
/// and stderr going to the given pipes or files, and returns once the workload is exec'd (or
/// setup failed). No helper: this process must itself be a fresh graven that has not started
/// a thread (the local runtime's shim, right after its exec); a process with threads is
/// refused. Afterwards this process is in the sandbox's PID (for its children), UTS and IPC
/// namespaces (and its user namespace when not root), with the forwarded signals blocked, and
/// it can no longer start threads; `supervise` waits for the workload.
pub fn launch(
    spec: &SandboxSpec,
    options: &Options,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Launched, SandboxError> {
    let setup = |message: String| SandboxError::Setup {
        program: spec_program(spec),
        message,
    };
    if !single_threaded() {
        return Err(setup(
            "launch needs a single-threaded process, this one has threads".to_owned(),
        ));
    }
    let (scratch, temp) = scratch_dir(spec, options)?;
    let request = Request {
        spec: spec.clone(),
        scratch,
        cgroups: options.cgroups.clone(),
        network: options.network.clone(),
        new_network: options.new_network,
    };
    let (status, status_writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| io_error(spec, e.into()))?;
    let pid = helper::launch(
        &request,
        status_writer.as_raw_fd(),
        Some((stdout.as_raw_fd(), stderr.as_raw_fd())),
    )
    .map_err(setup)?;
    // The workload holds the only other copies; its exec closes them, its death too.
    drop((status_writer, stdout, stderr));
    let mut text = String::new();
    let read = std::fs::File::from(status).read_to_string(&mut text);
    let errors: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("error "))
        .collect();
    if read.is_ok() && errors.is_empty() {
        return Ok(Launched {
            pid: pid as u32,
            _scratch: temp,
        });
    }
    // SAFETY: killing and reaping our own child, which failed before its exec.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    Err(match read {
        Err(source) => io_error(spec, source),
        Ok(_) => setup(errors.join("; ")),
    })
}

/// Waits for a workload started by `launch`, passing on the signals this process gets
/// (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2, SIGWINCH, SIGALRM), and returns how it ended.
/// A deadly signal that the workload, as PID 1, would ignore kills it instead. Meanwhile
/// whatever arrives on `outputs[i]` (the read ends of the pipes given to `launch` as its
/// stdout and stderr) goes to `on_output(i, bytes)`; it returns once they are at their end.
/// It never starts a thread: after `launch` this process cannot.
pub fn supervise(
    launched: &Launched,
    outputs: &[std::os::fd::BorrowedFd<'_>],
    on_output: &mut dyn FnMut(usize, &[u8]),
) -> Ended {
    helper::supervise(launched.pid as libc::pid_t, outputs, on_output)
}

/// What `supervise_watching`'s caller wants next: whether to wake when `watched` is
/// readable, and at the latest after `timeout_ms` (-1: no bound).
#[derive(Debug, Clone, Copy)]
pub struct Wake {
    pub watched: bool,
    pub timeout_ms: i32,
}

/// `supervise` for a workload whose output goes to files rather than pipes: passes signals
/// on the same way, and calls `on_wake(readable)` whenever `watched` (an inotify descriptor,
/// say) is readable or the timeout it asked for passed; once more after the workload ended.
pub fn supervise_watching(
    launched: &Launched,
    watched: std::os::fd::BorrowedFd<'_>,
    on_wake: &mut dyn FnMut(bool) -> Wake,
) -> Ended {
    helper::supervise_watching(launched.pid as libc::pid_t, watched, on_wake)
}

/// Runs a command inside the running sandbox whose first process is `request.pid`, with
/// the same privilege drop as the workload. Blocking; returns the command's exit status.
pub fn exec(
    request: &ExecRequest,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<ExitStatus, SandboxError> {
    let program = request.args.first().cloned().unwrap_or_default();
    exec_spawn(request, stdin, stdout, stderr)?
        .wait()
        .map_err(|source| SandboxError::Io { program, source })
}

/// Like `exec`, but returns once the command runs: the child is the helper, which exits as
/// the command does, and whose death (a SIGKILL, say) ends the command too.
pub fn exec_spawn(
    request: &ExecRequest,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Child, SandboxError> {
    let json = serde_json::to_string(request).expect("an exec request always serializes");
    let program = request.args.first().cloned().unwrap_or_default();
    // The request travels in the environment so the command keeps the caller's stdin; the
    // helper builds the command's environment from the request alone.
    let mut command = Command::new(helper_binary());
    command
        .arg(EXEC_ARG)
        .env(EXEC_REQUEST_ENV, json)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    let (child, _) = start_helper_with(command, &program, |_| Ok(()))?.finish()?;
    Ok(child)
}

/// The scratch directory of `options`, or a temp dir made for it.
fn scratch_dir(
    spec: &SandboxSpec,
    options: &Options,
) -> Result<(PathBuf, Option<tempfile::TempDir>), SandboxError> {
    match &options.scratch {
        Some(dir) => Ok((dir.clone(), None)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("graven-sandbox-")
                .tempdir()
                .map_err(|source| io_error(spec, source))?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

fn spec_program(spec: &SandboxSpec) -> String {
    spec.args.first().cloned().unwrap_or_default()
}

fn io_error(spec: &SandboxSpec, source: std::io::Error) -> SandboxError {
    SandboxError::Io {
        program: spec_program(spec),
        source,
    }
}

/// Spawns the helper with the request on its stdin and waits for its status report.
fn start_helper(
    mut command: Command,
    json: &[u8],
    program: &str,
) -> Result<(Child, u32), SandboxError> {
    command.stdin(Stdio::piped());
    let started = start_helper_with(command, program, |child| {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(json)
    })?;
    started.finish()
}

/// A helper that was spawned and whose status pipe is still to be read.
struct Started {
    child: Child,
    status: OwnedFd,
    program: String,
}

fn start_helper_with(
    mut command: Command,
    program: &str,
    send: impl FnOnce(&mut Child) -> std::io::Result<()>,
) -> Result<Started, SandboxError> {
    let helper = PathBuf::from(command.get_program());
    let io = |source: std::io::Error| SandboxError::Io {
        program: program.to_owned(),
        source,
    };
    let (status, status_writer) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| io(e.into()))?;
    let writer_fd = status_writer.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; the new fd 3 is not close-on-exec, so
    // only the helper inherits the status pipe (the original stays close-on-exec elsewhere).
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            // When the pipe already is fd 3, dup2 would do nothing and leave it
            // close-on-exec, so the flag is cleared instead.
            let rc = if writer_fd == STATUS_FD {
                libc::fcntl(STATUS_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(writer_fd, STATUS_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|source| SandboxError::Spawn { helper, source })?;
    drop(status_writer);
    if let Err(source) = send(&mut child) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io(source));
    }
    Ok(Started {
        child,
        status,
        program: program.to_owned(),
    })
}

impl Started {
    /// Reads the status pipe to its end: `pid N` from the helper, `error …` from setup.
    fn finish(mut self) -> Result<(Child, u32), SandboxError> {
        let mut text = String::new();
        let read = BufReader::new(std::fs::File::from(self.status)).read_to_string(&mut text);
        let mut pid = None;
        let mut errors = Vec::new();
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("pid ") {
                pid = n.parse::<u32>().ok();
            } else if let Some(message) = line.strip_prefix("error ") {
                errors.push(message.to_owned());
            }
        }
        let failure = if let Err(source) = read {
            Some(SandboxError::Io {
                program: self.program.clone(),
                source,
            })
        } else if !errors.is_empty() {
            Some(SandboxError::Setup {
                program: self.program.clone(),
                message: errors.join("; "),
            })
        } else if pid.is_none() {
            // The helper died before it could say anything (e.g. it is not graven).
            let status = self.child.wait().ok();
            Some(SandboxError::Setup {
                program: self.program.clone(),
                message: format!("the helper exited before starting the workload ({status:?})"),
            })
        } else {
            None
        };
        match failure {
            Some(error) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(error)
            }
            None => Ok((self.child, pid.unwrap_or_default())),
        }
    }
}

/// When this process was started as a sandbox helper, runs it and never returns.
pub fn enter_if_helper() {
    let Some(arg) = std::env::args_os().nth(1) else {
        return;
    };
    if arg == HELPER_ARG {
        helper::main_sandbox();
    } else if arg == EXEC_ARG {
        helper::main_exec();
    }
}

/// Reads all of `reader` (used by the helper for its request).
fn read_request<T: serde::de::DeserializeOwned>(reader: impl Read) -> Result<T, String> {
    let mut bytes = Vec::new();
    BufReader::new(reader)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the request: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("the request is not valid: {e}"))
}
