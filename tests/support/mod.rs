//! Shared helpers for integration tests: the real binary, temp homes, the example's static
//! binary, and waiting on a condition with a deadline (never sleeping for luck).
#![allow(dead_code)]

pub mod daemon;
pub mod docker;
pub mod fuzzing;
pub mod imagefs;
pub mod kube;
pub mod load;
pub mod proxy;
pub mod runtime;
pub mod swarm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The graven binary cargo built for this test run.
pub fn graven_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_graven"))
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The host's static busybox, which tests copy into images; panics with the fix when missing.
pub fn busybox() -> &'static Path {
    let path = Path::new("/bin/busybox");
    assert!(
        path.is_file(),
        "{} is missing: install busybox-static (scripts/test does)",
        path.display()
    );
    path
}

/// A Debian bookworm base (debootstrap minbase) as a docker-archive tar, from
/// `scripts/debian-base`: cached on the machine, built (from Debian's mirror) when missing.
/// Both `FROM docker-archive:PATH` and `docker load -i PATH` read it.
pub fn debian_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let out = Command::new(workspace().join("scripts/debian-base"))
            .output()
            .expect("run scripts/debian-base");
        assert!(
            out.status.success(),
            "scripts/debian-base failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A command that runs what its arguments say as nobody (uid and gid 65534, no groups): a real
/// other user of the host. Through a shell, as `setpriv`'s own exec may still hold root's
/// capabilities, which pass any directory.
pub fn as_nobody() -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
        "/bin/sh",
        "-c",
        "exec \"$0\" \"$@\"",
    ]);
    command
}

/// A `graven` command with `GRAVEN_HOME` set to `home`.
pub fn graven(home: &Path) -> Command {
    let mut command = Command::new(graven_bin());
    command
        .env("GRAVEN_HOME", home)
        .env_remove("SOURCE_DATE_EPOCH");
    command
}

/// Runs `command` to completion with stdout and stderr captured and returns its output; panics
/// naming the command, its exit status and its stderr when it does not start or fails, so a
/// failing test says which step broke and why.
pub fn succeed(command: &mut Command) -> Output {
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{shown}: cannot start: {error}"));
    assert!(
        output.status.success(),
        "{shown}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the example service as a static binary once per test process, as the example's
/// declared build step does, and returns its path.
pub fn hello_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| example_binary("hello")).clone()
}

/// Builds the event-sourced example (`examples/ledger`) as a static binary once per test
/// process and returns its path.
pub fn ledger_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| example_binary("ledger")).clone()
}

fn example_binary(package: &str) -> PathBuf {
    let target = workspace().join("target/static");
    succeed(
        Command::new(env!("CARGO"))
            .current_dir(workspace())
            .args([
                "rustc",
                "--quiet",
                "--release",
                "-p",
                package,
                "--target-dir",
            ])
            .arg(&target)
            .args(["--", "-C", "target-feature=+crt-static"]),
    );
    target.join("release").join(package)
}

/// The least time `wait_for` gives a condition. What a test waits for is what must
/// eventually happen, and a loaded 2-core machine (CI's) can take many times what this one
/// does; a deadline only bounds how long a failing test takes, never what passes.
pub const LEAST_WAIT: Duration = Duration::from_secs(30);

/// Polls `condition` until it returns `Some` or `deadline` (at least `LEAST_WAIT`) passes.
pub fn wait_for<T>(deadline: Duration, what: &str, condition: impl FnMut() -> Option<T>) -> T {
    let deadline = deadline.max(LEAST_WAIT);
    try_wait_for(deadline, condition)
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// `wait_for` that gives up with `None` at the deadline instead of panicking.
pub fn try_wait_for<T>(deadline: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = condition() {
            return Some(value);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Open files handed to a command as its starter's stray descriptors (no close-on-exec), as
/// `exec 7</dir 9>>file; graven …` in a shell does: fd 7 a host directory, fd 9 a host file
/// open for writing. Keep the value until the command has started.
pub struct StrayFds {
    pub dir: PathBuf,
    pub file: PathBuf,
    _open: (std::fs::File, std::fs::File),
}

/// The descriptor numbers `StrayFds` puts its files on.
pub const STRAY_FDS: [i32; 2] = [7, 9];

impl StrayFds {
    /// A directory holding a `secret` file, and a file beside it, under `scratch`.
    pub fn new(scratch: &Path) -> StrayFds {
        let dir = scratch.join("host-dir");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), "host secret").unwrap();
        let file = scratch.join("host-file");
        // Moved above the numbers they are handed on as: a test process whose other threads
        // hold a few files could otherwise open them at 7 or 9 themselves, and the dup2 of
        // one onto the other's number would close it.
        let high = |file: std::fs::File| {
            use std::os::fd::{AsRawFd, FromRawFd};
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor this function owns; the copy it
            // returns is a new descriptor, owned by the `File` made from it.
            let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
            assert!(fd >= 64, "{}", std::io::Error::last_os_error());
            // SAFETY: `fd` was just returned by fcntl and is owned by nothing else.
            unsafe { std::fs::File::from_raw_fd(fd) }
        };
        let open = (
            high(std::fs::File::open(&dir).unwrap()),
            high(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file)
                    .unwrap(),
            ),
        );
        StrayFds {
            dir,
            file,
            _open: open,
        }
    }

    /// Makes `command` start with the two files on fds 7 and 9, inheritable.
    pub fn hand_to(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let from = [self._open.0.as_raw_fd(), self._open.1.as_raw_fd()];
        assert!(from.iter().all(|fd| !STRAY_FDS.contains(fd)));
        // SAFETY: dup2 between fork and exec is async-signal-safe; the copies it makes are
        // inheritable (dup2 never sets close-on-exec).
        unsafe {
            command.pre_exec(move || {
                for (from, to) in from.iter().zip(STRAY_FDS) {
                    if libc::dup2(*from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// Panics when any of `links` (what a process's fds point at) is one of these files.
    pub fn assert_none_in(&self, links: &[String], whose: &str) {
        for link in links {
            assert!(
                !link.contains(self.dir.to_str().unwrap())
                    && !link.contains(self.file.to_str().unwrap()),
                "{whose} holds a starter's file: {link} (all: {links:?})"
            );
        }
    }
}

/// What the open descriptors of process `pid` point at, from the host's /proc.
pub fn fd_links(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Mode, ctime and mtime (ns) of the host's harmless devices, to see that a sandbox left
/// them alone.
pub fn host_devices() -> Vec<(String, u32, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    ["null", "zero", "urandom"]
        .iter()
        .map(|name| {
            let meta = std::fs::metadata(format!("/dev/{name}")).unwrap();
            (
                name.to_string(),
                meta.mode(),
                meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
                meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            )
        })
        .collect()
}

/// A busybox `sh -c` script for a workload running as uid 0: it chmods and touches its
/// devices, through /dev, its stdin and the masked /proc files, then checks that its
/// /dev/null and /dev/zero still work (printing 5). 0666 is the mode the host's nodes have:
/// a regression changes their ctime and mtime (`host_devices`), never their mode, so a
/// failing run cannot break the host.
pub const TOUCH_DEVICES: &str = "set -e; B=/bin/busybox; \
    $B chmod 0666 /dev/null /dev/zero /dev/urandom; $B touch /dev/null /dev/zero /dev/urandom; \
    $B chmod 0666 /proc/self/fd/0; $B touch /proc/self/fd/0; \
    for f in /proc/kcore /proc/keys /proc/timer_list; do \
    if [ -e $f ]; then $B chmod 0666 $f; $B touch $f; fi; done; \
    echo gone > /dev/null; test -z \"$($B cat /dev/null)\"; $B head -c 5 /dev/zero | $B wc -c";

/// Bakes the Debian base (`debian_base`) into `home`'s store as `base:test`, from a context
/// under `temp`.
pub fn bake_debian_base(home: &Path, temp: &Path) {
    let ctx = temp.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Containerfile"),
        format!("FROM docker-archive:{}\n", debian_base().display()),
    )
    .unwrap();
    succeed(
        graven(home)
            .args(["bake", "--tag", "base:test", "--file"])
            .arg(ctx.join("Containerfile"))
            .arg(&ctx),
    );
}

/// Writes an executable at `path` (mode 0755) that a process can exec at once. The bytes
/// are written by a child process: a file this (multi-threaded) test process held open for
/// writing would be held open too by any process another test thread forked meanwhile, until
/// that fork's exec, and an exec of the file then fails with ETXTBSY ("Text file busy").
pub fn write_executable(path: &Path, contents: &[u8]) {
    use std::io::Write;
    let mut child = Command::new("/bin/sh")
        .args(["-c", "cat > \"$0\" && chmod 0755 \"$0\""])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("start sh to write an executable");
    child
        .stdin
        .take()
        .expect("sh's stdin")
        .write_all(contents)
        .expect("write the executable through sh");
    let status = child.wait().expect("wait for sh");
    assert!(status.success(), "writing {}: {status}", path.display());
}
