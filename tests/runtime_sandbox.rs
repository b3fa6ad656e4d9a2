//! The sandbox helper on its own (`graven::sandbox::run`, as bake's RUN uses it): what a
//! workload sees inside, checked with the probe, and against the probe run bare.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use graven::sandbox::{self, SandboxError, SandboxSpec};
use support::runtime::{assert_locked_down, parse_report, probe_binary};

fn rootfs_with_probe(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(probe_binary(), root.join("probe")).unwrap();
    root
}

fn spec(root: &Path, args: &[&str]) -> SandboxSpec {
    sandbox::set_helper_binary(support::graven_bin());
    SandboxSpec {
        rootfs: root.to_owned(),
        writable_root: false,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PROBE_ENV=inside".to_owned(), "PORT=1234".to_owned()],
        cwd: "/".to_owned(),
        uid: 65534,
        gid: 65534,
        hostname: "probe-host".to_owned(),
        binds: Vec::new(),
        tmp_bytes: 8 << 20,
        tmpfs: Vec::new(),
        exec_tmp: false,
        build_step: None,
    }
}

/// Runs `spec` and returns its exit code and its stdout parsed as `key=value` lines.
fn run(spec: &SandboxSpec) -> (Option<i32>, BTreeMap<String, String>) {
    let out = tempfile::tempfile().unwrap();
    let status = sandbox::run(
        spec,
        Stdio::from(out.try_clone().unwrap()),
        Stdio::inherit(),
    )
    .expect("the sandbox starts");
    (status.code(), parse_report(&read_all(out)))
}

fn read_all(mut file: std::fs::File) -> String {
    use std::io::{Read, Seek};
    file.rewind().unwrap();
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn the_probe_sees_a_locked_down_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let (code, seen) = run(&spec(&root, &["/probe", "report"]));
    assert_eq!(code, Some(0), "{seen:?}");
    assert_locked_down(&seen);
    assert_eq!(seen["uid"], "65534");
    assert_eq!(seen["gid"], "65534");
    assert_eq!(seen["cap_bnd"], "0000000000000000");
    assert_eq!(
        seen["timer_list_bytes"], "0",
        "/proc/timer_list is not masked"
    );
    assert_ne!(seen["proc_sys_write"], "ok");
    assert_eq!(seen["hostname"], "probe-host");
    assert_eq!(seen["probe_env"], "inside");
    assert_eq!(seen["port"], "1234");
    // Nothing was written to the shared root.
    let entries: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("probe")]);
}

#[test]
fn the_probe_run_bare_sees_the_opposite() {
    // The negative control: the same probe outside the sandbox, as root, is not confined.
    let out = Command::new(probe_binary()).arg("report").output().unwrap();
    let seen = parse_report(&String::from_utf8_lossy(&out.stdout));
    assert_ne!(seen["pid"], "1");
    assert_ne!(seen["cap_eff"], "0000000000000000");
    assert_eq!(seen["no_new_privs"], "0");
    assert_eq!(seen["seccomp"], "0");
    assert_eq!(seen["root_write"], "ok");
    assert_ne!(seen["timer_list_bytes"], "0");
    assert_eq!(seen["mount"], "No such device");
    assert_eq!(seen["io_uring"], "Bad address");
    assert_eq!(seen["unshare"], "ok");
}

#[test]
fn tmp_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let (code, seen) = run(&spec(&root, &["/probe", "fill-tmp"]));
    assert_eq!(code, Some(0));
    let filled: u64 = seen["tmp_fill_bytes"].parse().unwrap();
    assert!(filled <= 8 << 20, "wrote {filled} bytes into an 8 MiB /tmp");
    assert!(filled >= 6 << 20, "only {filled} bytes fitted");
    assert_eq!(seen["tmp_fill_end"], "No space left on device");
}

#[test]
fn a_writable_root_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let mut spec = spec(&root, &["/probe", "report"]);
    spec.writable_root = true;
    spec.uid = 0;
    spec.gid = 0;
    let (code, seen) = run(&spec);
    assert_eq!(code, Some(0));
    assert_eq!(seen["root_write"], "ok");
    // Root inside, but still without capabilities.
    assert_eq!(seen["uid"], "0");
    assert_eq!(seen["cap_eff"], "0000000000000000");
}

#[test]
fn exit_codes_come_through() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let (code, _) = run(&spec(&root, &["/probe", "no-such-mode"]));
    assert_eq!(code, Some(2));
}

#[test]
fn a_missing_entrypoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let result = sandbox::run(&spec(&root, &["/nope"]), Stdio::null(), Stdio::null());
    match result {
        Err(SandboxError::Setup { program, message }) => {
            assert_eq!(program, "/nope");
            assert!(message.contains("No such file"), "{message}");
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
}

#[test]
fn a_missing_root_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let result = sandbox::run(
        &spec(&dir.path().join("absent"), &["/probe"]),
        Stdio::null(),
        Stdio::null(),
    );
    assert!(
        matches!(&result, Err(SandboxError::Setup { message, .. }) if message.contains("not a directory")),
        "{result:?}"
    );
}

/// Starts `probe serve` in a sandbox and waits until it listens (its signal setup is done).
fn serve(
    root: &Path,
    env: &[&str],
) -> (
    sandbox::Sandboxed,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead;
    let mut spec = spec(root, &["/probe", "serve"]);
    spec.env.retain(|e| !e.starts_with("PORT="));
    spec.env.push("PORT=0".to_owned());
    spec.env.extend(env.iter().map(|s| s.to_string()));
    let mut sandboxed = sandbox::spawn(
        &spec,
        &sandbox::Options::default(),
        Stdio::piped(),
        Stdio::inherit(),
    )
    .unwrap();
    let mut out = std::io::BufReader::new(sandboxed.child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert_ne!(
            out.read_line(&mut line).unwrap(),
            0,
            "the probe ended early"
        );
    }
    (sandboxed, out)
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: signalling a child this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

fn alive(pid: u32) -> bool {
    // Zombies count as gone: read the state letter from /proc.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn a_handled_stop_signal_is_delivered() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let (mut sandboxed, mut out) = serve(&root, &[]);
    signal(sandboxed.child.id(), libc::SIGTERM);
    let status = sandboxed.child.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("got SIGTERM"), "{rest}");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(status.signal(), None);
}

#[test]
fn an_unhandled_stop_signal_ends_pid_1_as_it_would_any_process() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let (mut sandboxed, _out) = serve(&root, &["PROBE_DEFAULT_TERM=1"]);
    signal(sandboxed.child.id(), libc::SIGTERM);
    let status = sandboxed.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert!(!alive(sandboxed.pid));
}

#[test]
fn an_ignored_stop_signal_leaves_it_running_and_killing_the_helper_kills_it() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    let (mut sandboxed, _out) = serve(&root, &["PROBE_IGNORE_TERM=1"]);
    signal(sandboxed.child.id(), libc::SIGTERM);
    // The ignored signal changes nothing: the helper and the workload keep running. (This
    // waits a moment to check that nothing happens; no condition marks "ignored".)
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(sandboxed.child.try_wait().unwrap().is_none());
    assert!(alive(sandboxed.pid));
    signal(sandboxed.child.id(), libc::SIGKILL);
    let status = sandboxed.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    support::wait_for(
        std::time::Duration::from_secs(5),
        "the workload to die",
        || (!alive(sandboxed.pid)).then_some(()),
    );
}

/// `launch` forks in the calling process, which is only safe (and a user namespace only
/// possible) while it has one thread: the shim right after its exec. A test process has
/// several, so it is refused before anything is forked or unshared.
#[test]
fn launch_refuses_a_process_with_threads() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs_with_probe(dir.path());
    // Makes sure of a second thread, whatever the harness does.
    let (stop, parked) = std::sync::mpsc::channel::<()>();
    let extra = std::thread::spawn(move || parked.recv());
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let result = sandbox::launch(
        &spec(&root, &["/probe"]),
        &sandbox::Options::default(),
        out.into(),
        err.into(),
    );
    drop(stop);
    let _ = extra.join();
    match result {
        Err(SandboxError::Setup { message, .. }) => {
            assert!(message.contains("single-threaded"), "{message}")
        }
        other => panic!("launch in a multi-threaded process: {other:?}"),
    }
}

/// A root with the probe and every mount point, as the local runtime unpacks an image: bound
/// as it is (an overlay's files are other inodes, which a writer of the lower ones never
/// makes busy).
fn bound_rootfs_with_probe(dir: &Path) -> std::path::PathBuf {
    let root = rootfs_with_probe(dir);
    for (mount_point, _) in sandbox::MOUNT_POINTS {
        std::fs::create_dir(root.join(mount_point)).unwrap();
    }
    root
}

/// The PIDs of this process's descendants (the sandbox helper and its workload), from the
/// parent links in /proc.
fn descendants() -> Vec<u32> {
    let mut parents = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // The parent is the second field after the command, which is in parentheses.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parents.insert(pid, ppid);
        }
    }
    let mut found = vec![std::process::id()];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|&(_, &p)| p == parent)
                .map(|(&c, _)| c),
        );
        i += 1;
    }
    found.split_off(1)
}

/// Whether `pid` is in a sleep: the sandbox's workload waiting to exec again.
fn sleeping(pid: u32) -> bool {
    let Ok(syscall) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return false;
    };
    let number = syscall.split_whitespace().next().unwrap_or_default();
    [libc::SYS_clock_nanosleep, libc::SYS_nanosleep]
        .iter()
        .any(|n| number == n.to_string())
}

/// ETXTBSY: an executable that another process still holds open for writing cannot be
/// exec'd. A descriptor is held that way by any process forked (by another thread of the
/// starter: the daemon, or a test binary's neighbouring test) while the file was being
/// written, until that fork's own exec: the conformance suite once failed on it. The
/// sandbox tries again while the file is busy, so an exec that finds it busy succeeds once
/// the writer closes it.
#[test]
fn an_entrypoint_busy_for_a_moment_is_executed_once_its_writer_closes() {
    let dir = tempfile::tempdir().unwrap();
    let root = bound_rootfs_with_probe(dir.path());
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("probe"))
        .unwrap();
    let spec = spec(&root, &["/probe", "report"]);
    let out = tempfile::tempfile().unwrap();
    let stdout = Stdio::from(out.try_clone().unwrap());
    let started = std::thread::spawn(move || sandbox::run(&spec, stdout, Stdio::inherit()));
    // Closed only once the workload found its file busy and waits to try again, so that the
    // test fails where a busy file is not tried again.
    support::wait_for(
        std::time::Duration::from_secs(30),
        "the workload to find its file busy",
        || (started.is_finished() || descendants().into_iter().any(sleeping)).then_some(()),
    );
    drop(writer);
    let status = started.join().unwrap().expect("the busy entrypoint runs");
    assert_eq!(status.code(), Some(0));
    assert_locked_down(&parse_report(&read_all(out)));
}

/// A file that stays busy is not waited on for ever: the exec fails with the kernel's word.
#[test]
fn an_entrypoint_that_stays_busy_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = bound_rootfs_with_probe(dir.path());
    let _writer = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("probe"))
        .unwrap();
    let result = sandbox::run(
        &spec(&root, &["/probe", "report"]),
        Stdio::null(),
        Stdio::null(),
    );
    match result {
        Err(SandboxError::Setup { program, message }) => {
            assert_eq!(program, "/probe");
            assert!(message.contains("Text file busy"), "{message}");
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
}
