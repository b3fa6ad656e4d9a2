//! The single-threaded side of the sandbox: `launch` and `supervise`, run either by the
//! graven binary re-executed as `__sandbox` (or `__sandbox-exec`) before anything else in
//! `main`, or by another fresh single-threaded process of graven's (the local runtime's
//! shim), which then needs no helper of its own.
//!
//! Two processes: the launching one unshares the namespaces, forks, forwards signals and
//! reports the workload's exit; the forked one is PID 1 of the new PID namespace, joins the
//! cgroups, builds the root, drops every privilege and execs the workload. Its errors before
//! the exec go to a close-on-exec status pipe, which the exec closes.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{DEFAULT_TMP_BYTES, ExecRequest, Request, STATUS_FD, root};

type Result<T, E = String> = std::result::Result<T, E>;

/// Signals the outer helper passes on to the workload.
const FORWARDED: [i32; 8] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGALRM,
];

/// Proc files hidden behind /dev/null, and proc/sys directories hidden behind an empty
/// read-only tmpfs: kernel memory, keys, timers and firmware are none of a workload's business.
const MASKED_FILES: [&str; 6] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/timer_stats",
];
const MASKED_DIRS: [&str; 5] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// Proc paths that stay readable but can never be written.
const READONLY_PATHS: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
];

pub(super) fn main_sandbox() -> ! {
    close_inherited(STATUS_FD + 1);
    set_cloexec(STATUS_FD);
    let request: Request = match super::read_request(std::io::stdin()) {
        Ok(request) => request,
        Err(message) => fail(STATUS_FD, &message, 125),
    };
    if let Err(message) = redirect_stdin_to_null() {
        fail(STATUS_FD, &message, 125);
    }
    report_and_supervise(launch(&request, STATUS_FD, None))
}

pub(super) fn main_exec() -> ! {
    close_inherited(STATUS_FD + 1);
    set_cloexec(STATUS_FD);
    let request: ExecRequest = match std::env::var(super::EXEC_REQUEST_ENV)
        .map_err(|_| "no exec request in the environment".to_owned())
        .and_then(|json| {
            serde_json::from_str(&json).map_err(|e| format!("the exec request is not valid: {e}"))
        }) {
        Ok(request) => request,
        Err(message) => fail(STATUS_FD, &message, 125),
    };
    report_and_supervise(enter(&request))
}

/// The helper's end: tells its parent the workload's PID (or why there is none) on the
/// status pipe, closes it, and waits for the workload, exiting as it did.
fn report_and_supervise(started: Result<libc::pid_t>) -> ! {
    let pid = started.unwrap_or_else(|message| fail(STATUS_FD, &message, 125));
    report(STATUS_FD, &format!("pid {pid}"));
    // SAFETY: the status pipe is ours; the workload keeps its own copy until its exec.
    unsafe { libc::close(STATUS_FD) };
    exit_like(supervise(pid, &[], &mut |_, _| {}))
}

enum Never {}

/// Starts the workload of a new sandbox as a child of this process, which must be
/// single-threaded (a fork of a multi-threaded process may inherit a lock held by another
/// thread, and the user namespace cannot be entered at all). Returns the workload's PID once
/// it has been forked (a failure before that is returned); the child's own setup errors go
/// to `status_fd` (close-on-exec, so the exec closes it), for whoever holds the read end to
/// collect: the helper's parent, or `sandbox::launch` in this very process. `stdio` replaces
/// the workload's stdout and stderr.
///
/// This process is left in the new UTS and IPC namespaces (and the user namespace when not
/// root), with the forwarded signals blocked, ready for `supervise`.
pub(super) fn launch(
    request: &Request,
    status_fd: i32,
    stdio: Option<(i32, i32)>,
) -> Result<libc::pid_t> {
    let spec = &request.spec;
    if spec.args.is_empty() || spec.args[0].is_empty() {
        return Err("no command to run".to_owned());
    }
    let build_step = spec.build_step.as_ref();
    let filters = super::seccomp::filters(build_step.is_some())?;
    // A build step that runs as root in the image keeps Docker's default capabilities; one
    // that runs as another user, and every instance, none. The id asked for decides, not the
    // one it maps to: without root every id maps to 0 inside.
    let keep = match build_step {
        Some(_) if spec.uid == 0 => super::BUILD_CAPABILITIES
            .iter()
            .fold(0u64, |all, (_, cap)| all | 1 << cap),
        _ => 0,
    };
    // Both asked before the user namespace, inside which this process is uid 0.
    let rootless = super::rootless();
    let (uid, gid) = super::identity(spec.uid, spec.gid).map_err(|e| e.to_string())?;
    // Before the user namespace: the prepared namespace belongs to the host's.
    if let Some(network) = &request.network {
        join_network(network)?;
    }
    if rootless {
        enter_user_namespace()?;
    }
    // The mount namespace is the workload's own (unshared after the fork): pivot_root moves
    // every process of a mount namespace, and this helper must keep the host's /proc to
    // look at the workload.
    // SAFETY: unshare only changes this process's namespace membership.
    let net = if build_step.is_some_and(|step| step.no_network) || request.new_network {
        libc::CLONE_NEWNET
    } else {
        0
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | net)
    };
    check(rc, "unshare of the pid, uts and ipc namespaces")?;
    if request.new_network {
        // As in a prepared namespace (and as Docker sets it): a server that is not root binds
        // port 80. A net sysctl is the namespace's of whoever opens it: this one's, now.
        std::fs::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")
            .map_err(|e| format!("setting ip_unprivileged_port_start in the new netns: {e}"))?;
    }
    fork_workload(status_fd, || {
        if let Some((stdout, stderr)) = stdio {
            // SAFETY: dup2 onto fds 1 and 2 replaces them with the given pipes.
            check(unsafe { libc::dup2(stdout, 1) }, "redirecting stdout")?;
            // SAFETY: as above.
            check(unsafe { libc::dup2(stderr, 2) }, "redirecting stderr")?;
        }
        // Only the workload joins the cgroups: a pids or memory limit is the workload's, not
        // shared with whoever supervises it.
        join_cgroups(&request.cgroups)?;
        // SAFETY: unshare only changes this process's namespace membership.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        check(rc, "unshare of the mount namespace")?;
        build_root(request, rootless)?;
        // Only now, so stdin is the sandbox's own /dev/null: an open file of the host's
        // /dev/null would let a workload that runs as uid 0 chmod it through
        // /proc/self/fd/0 (it owns it).
        redirect_stdin_to_null()?;
        sethostname(&spec.hostname)?;
        drop_privileges_and_exec(&spec.args, &spec.env, &spec.cwd, (uid, gid), keep, &filters)
    })
}

/// Forks the workload. The child starts from a clean process state, arranges to die with this
/// process and runs `setup_and_exec`, whose error goes to `status_fd` (exit status 127).
/// Here the forwarded signals stay blocked, for `supervise`. The callers are
/// single-threaded, so the child may use the allocator and everything else after the fork.
fn fork_workload(
    status_fd: i32,
    setup_and_exec: impl FnOnce() -> Result<Never>,
) -> Result<libc::pid_t> {
    block_forwarded_signals()?;
    // SAFETY: fork in a single-threaded process (see above).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno()));
    }
    if pid == 0 {
        clean_process_state();
        match die_with_parent().and_then(|()| setup_and_exec()) {
            Ok(never) => match never {},
            Err(message) => fail(status_fd, &message, 127),
        }
    }
    Ok(pid)
}

/// The outer helper of a break-glass exec into a running sandbox: enters the sandbox's
/// namespaces and forks the command there; returns its PID.
fn enter(request: &ExecRequest) -> Result<libc::pid_t> {
    if request.args.is_empty() || request.args[0].is_empty() {
        return Err("no command to run".to_owned());
    }
    let filters = super::seccomp::filters(false)?;
    join_cgroups(&request.cgroups)?;
    let (uid, gid) = super::identity(request.uid, request.gid).map_err(|e| e.to_string())?;
    let ns = |name: &str| format!("/proc/{}/ns/{name}", request.pid);
    // The user namespace first (when the sandbox has its own), then the others; the mount
    // namespace last because entering it changes this process's root.
    let own_user =
        std::fs::metadata("/proc/self/ns/user").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let their_user = std::fs::metadata(ns("user")).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let mut names = Vec::new();
    if let (Ok(own), Ok(theirs)) = (own_user, their_user)
        && own != theirs
    {
        names.push("user");
    }
    // The mount namespace is entered by the child only, so this helper keeps the host's
    // /proc (as in `launch`).
    names.extend(["ipc", "uts", "pid"]);
    // Its own network namespace too, when it has one (not when it shares the host's, which
    // a rootless helper could not enter again).
    let own_net =
        std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let their_net = std::fs::metadata(ns("net")).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if let (Ok(own), Ok(theirs)) = (own_net, their_net)
        && own != theirs
    {
        names.push("net");
    }
    let files = names
        .iter()
        .map(|name| {
            std::fs::File::open(ns(name))
                .map(|f| (*name, f))
                .map_err(|e| format!("instance process {} is gone: {e}", request.pid))
        })
        .collect::<Result<Vec<_>>>()?;
    for (name, file) in &files {
        // SAFETY: setns only changes this process's namespace membership.
        let rc = unsafe { libc::setns(file.as_raw_fd(), 0) };
        check(
            rc,
            &format!("entering the {name} namespace of process {}", request.pid),
        )?;
    }
    drop(files);
    let mnt = std::fs::File::open(ns("mnt"))
        .map_err(|e| format!("instance process {} is gone: {e}", request.pid))?;
    fork_workload(STATUS_FD, || {
        // SAFETY: setns only changes this process's namespace membership.
        let rc = unsafe { libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) };
        check(rc, "entering the mount namespace")?;
        drop_privileges_and_exec(
            &request.args,
            &request.env,
            &request.cwd,
            (uid, gid),
            0,
            &filters,
        )
    })
}

/// Enters a prepared network namespace (this process and every child it forks), closing
/// the descriptor at once so nothing after holds it, and adds the default route through
/// `gateway` when there is one.
fn join_network(network: &super::NetworkJoin) -> Result<()> {
    let file = std::fs::File::open(&network.netns)
        .map_err(|e| format!("opening {}: {e}", network.netns.display()))?;
    // SAFETY: setns only changes this process's namespace membership; `file` is a
    // close-on-exec descriptor of a network namespace, dropped right after.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    drop(file);
    check(rc, "entering the instance's network namespace")?;
    if let Some(gateway) = network.gateway {
        add_default_route(gateway)?;
    }
    Ok(())
}

/// `ip route add default via GATEWAY`, through the routing ioctl: no netlink exchange and no
/// `ip` exec on the start path.
fn add_default_route(gateway: std::net::Ipv4Addr) -> Result<()> {
    let sockaddr = |ip: std::net::Ipv4Addr| {
        let inet = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads the family.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
    };
    // SAFETY: rtentry is plain data, all zeroes a valid (empty) value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: a plain socket, closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(socket, "opening a socket for the default route")?;
    // SAFETY: SIOCADDRT reads the rtentry we own, for the duration of the call.
    let rc = unsafe { libc::ioctl(socket, libc::SIOCADDRT, &route) };
    let error = errno();
    // SAFETY: the socket is ours.
    unsafe { libc::close(socket) };
    if rc < 0 {
        return Err(format!("adding the default route via {gateway}: {error}"));
    }
    Ok(())
}

/// Moves this process into the cgroups whose `cgroup.procs` files are given. Its callers are
/// single-threaded, so on cgroup v1 it moves its one thread through the group's `tasks` file
/// as "0" (itself): the kernel then skips the global write lock a `cgroup.procs` move takes,
/// whose RCU grace period cost 6–14 ms of every start on a cgroup v1 host (0.3 ms this way).
/// On cgroup v2 (no `tasks` file) the process moves through `cgroup.procs`.
fn join_cgroups(procs: &[PathBuf]) -> Result<()> {
    let me = std::process::id().to_string();
    for path in procs {
        let tasks = path.with_file_name("tasks");
        let (file, value) = if tasks.exists() {
            (tasks, "0")
        } else {
            (path.clone(), me.as_str())
        };
        std::fs::write(&file, value).map_err(|e| format!("joining {}: {e}", path.display()))?;
    }
    Ok(())
}

fn redirect_stdin_to_null() -> Result<()> {
    let null = open("/dev/null", libc::O_RDWR)?;
    // SAFETY: dup2 onto fd 0 replaces the request pipe, which has been read to its end.
    check(unsafe { libc::dup2(null, 0) }, "redirecting stdin")?;
    // SAFETY: `null` is ours and no longer needed.
    unsafe { libc::close(null) };
    Ok(())
}

/// A user namespace mapping root inside to this unprivileged user outside.
fn enter_user_namespace() -> Result<()> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    // SAFETY: unshare only changes this process's namespace membership.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    check(rc, "unshare of the user namespace")?;
    let write = |path: &str, text: String| {
        std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
    };
    write("/proc/self/setgroups", "deny".to_owned())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))
}

fn die_with_parent() -> Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets this process's parent-death signal, so
    // killing the outer helper (SIGKILL) kills the whole sandbox.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    check(rc, "prctl(PR_SET_PDEATHSIG)")?;
    // SAFETY: getppid has no preconditions. In the new PID namespace the parent is outside,
    // so it reads 0 while the parent lives and something else once it has died.
    if unsafe { libc::getppid() } != 0 {
        return Err("the sandbox helper died during setup".to_owned());
    }
    Ok(())
}

/// Builds the sandbox's root under the scratch directory and pivots into it. Every mount
/// point inside the image's root is opened through `root::open_in` (resolved inside the root
/// by the kernel) and mounted on through `/proc/self/fd`, as runc does: an image's symlink
/// can make its own sandbox fail, never mount over or create anything outside it.
fn build_root(request: &Request, rootless: bool) -> Result<()> {
    let spec = &request.spec;
    mount(
        None::<&str>,
        "/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let scratch = &request.scratch;
    mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=700,size=4m"),
    )?;
    let root = scratch.join("root");
    mkdir(&root, 0o755)?;
    let rootfs = &spec.rootfs;
    if !rootfs.is_dir() {
        return Err(format!("root {} is not a directory", rootfs.display()));
    }
    // A read-only root whose mount points are all there already (the local runtime makes
    // /dev, /proc, /sys and /tmp when it unpacks an image) is a plain bind, like a RUN step's
    // writable one, made read-only at once so nothing below can write the shared root. Image
    // content is never seen with a working setuid bit or device node, whatever the bind's
    // source allows.
    if spec.writable_root || has_mount_points(rootfs, spec) {
        mount(
            Some(rootfs),
            &root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        let readonly = if spec.writable_root {
            0
        } else {
            libc::MS_RDONLY
        };
        remount_bind(&root, readonly | libc::MS_NOSUID | libc::MS_NODEV)?;
    } else {
        // A read-only root that still gets mount points: the image's root as the lower layer
        // of an overlay whose upper layer is a throwaway tmpfs, remounted read-only after.
        let lower = rootfs.to_string_lossy();
        if lower.contains([',', ':']) {
            return Err(format!("root {lower} may not contain ',' or ':'"));
        }
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        mkdir(&upper, 0o755)?;
        mkdir(&work, 0o755)?;
        let options = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&options),
        )?;
    }
    let root_fd = root::open_root(&root).map_err(|e| format!("opening the root: {e}"))?;
    // A RUN step's /tmp is its root's own, so what it leaves there is part of its layer, as
    // with `docker build`; an instance's /tmp is a capped tmpfs.
    for dir in super::mount_points(spec.writable_root) {
        ensure_dir(&root_fd, dir)?;
    }
    for bind in &spec.binds {
        let target = if bind.source.is_dir() {
            ensure_dir(&root_fd, &bind.target)?
        } else {
            ensure_file(&root_fd, &bind.target)?
        };
        mount(
            Some(&bind.source),
            fd_path(&target),
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        let readonly = if bind.readonly { libc::MS_RDONLY } else { 0 };
        let mounted = open_mount_point(&root_fd, &bind.target)?;
        remount_bind(
            &fd_path(&mounted),
            readonly | libc::MS_NOSUID | libc::MS_NODEV,
        )?;
    }
    // An instance's writable mounts are `noexec` unless it opts out: a program it writes
    // there cannot be started (drift). A build step's are not: a RUN step may run what it
    // writes, as with Docker.
    let noexec = if spec.exec_tmp || spec.build_step.is_some() {
        0
    } else {
        libc::MS_NOEXEC
    };
    let build_tmpfs = spec.build_step.iter().flat_map(|step| &step.tmpfs);
    for tmpfs in spec.tmpfs.iter().chain(build_tmpfs) {
        let target = ensure_dir(&root_fd, &tmpfs.target)?;
        let size = match tmpfs.bytes {
            0 => String::new(),
            bytes => format!(",size={bytes}"),
        };
        mount(
            Some("tmpfs"),
            fd_path(&target),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | noexec,
            Some(&format!("mode=1777{size}")),
        )?;
    }
    let tmp_bytes = if spec.tmp_bytes == 0 {
        DEFAULT_TMP_BYTES
    } else {
        spec.tmp_bytes
    };
    if !spec.writable_root {
        mount(
            Some("tmpfs"),
            fd_path(&open_mount_point(&root_fd, "tmp")?),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | noexec,
            Some(&format!("mode=1777,size={tmp_bytes}")),
        )?;
    }
    let shm_noexec = if spec.exec_tmp { 0 } else { libc::MS_NOEXEC };
    build_dev(&root_fd, scratch, tmp_bytes, shm_noexec, !rootless)?;
    mount(
        Some("proc"),
        fd_path(&open_mount_point(&root_fd, "proc")?),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    // sysfs needs its own network namespace when not real root; without it /sys stays empty.
    let _ = mount(
        Some("sysfs"),
        fd_path(&open_mount_point(&root_fd, "sys")?),
        Some("sysfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    );
    mask_paths(&root_fd)?;
    drop(root_fd);
    pivot(&root)?;
    if !spec.writable_root {
        remount_readonly(Path::new("/"), libc::MS_NOSUID | libc::MS_NODEV)?;
    }
    Ok(())
}

/// The devices a sandbox gets, with their numbers: the harmless ones runc gives.
const DEVICE_NUMBERS: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// A minimal /dev on a small tmpfs, mounted `nodev`: its device nodes are bind mounts, each
/// its own mount that works whatever /dev's flags, and a node made in /dev itself (a build
/// step holds `CAP_MKNOD`) never opens, as Docker's devices cgroup keeps it from opening.
/// As real root the nodes bound are the sandbox's own, made with mknod on a tmpfs of the
/// scratch dir that no path of the sandbox reaches after the pivot: a bind of the host's
/// would be the host's inode, which a workload running as uid 0 owns and could chmod or
/// touch (it needs no capability for its own file). Without root (a user namespace) mknod is
/// refused and the host's are bound: the host's root is not mapped inside, so the nodes
/// belong to no one the workload can be. /dev/shm is sized as /tmp is, and `noexec` as
/// /tmp is unless `shm_noexec` is 0 (an instance that opted out).
fn build_dev(
    root_fd: &OwnedFd,
    scratch: &Path,
    shm_bytes: u64,
    shm_noexec: libc::c_ulong,
    own_nodes: bool,
) -> Result<()> {
    let dev = ensure_dir(root_fd, "dev")?;
    mount(
        Some("tmpfs"),
        fd_path(&dev),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV,
        Some("mode=755,size=65536"),
    )?;
    let dev = open_mount_point(root_fd, "dev")?;
    let in_dev = |what: &str, e: rustix::io::Errno| format!("creating /dev/{what}: {e}");
    let nodes = if own_nodes {
        let nodes = scratch.join("devices");
        mkdir(&nodes, 0o755)?;
        // Not nodev: the nodes made here must work; noexec and nosuid all the same.
        mount(
            Some("tmpfs"),
            &nodes,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=755,size=65536"),
        )?;
        let dir = root::open_root(&nodes).map_err(|e| format!("opening the nodes' dir: {e}"))?;
        for (name, major, minor) in DEVICE_NUMBERS {
            rustix::fs::mknodat(
                &dir,
                name,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0o666),
                rustix::fs::makedev(major, minor),
            )
            .map_err(|e| in_dev(name, e))?;
            // The umask took 0o022 off.
            rustix::fs::chmodat(
                &dir,
                name,
                rustix::fs::Mode::from_raw_mode(0o666),
                rustix::fs::AtFlags::empty(),
            )
            .map_err(|e| in_dev(name, e))?;
        }
        nodes
    } else {
        PathBuf::from("/dev")
    };
    for (name, _, _) in DEVICE_NUMBERS {
        rustix::fs::mknodat(
            &dev,
            name,
            rustix::fs::FileType::RegularFile,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .map_err(|e| in_dev(name, e))?;
        let target = root::open_in(&dev, name, rustix::fs::OFlags::PATH)
            .map_err(|e| format!("opening /dev/{name}: {e}"))?;
        mount(
            Some(&nodes.join(name)),
            fd_path(&target),
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        rustix::fs::symlinkat(to, &dev, link).map_err(|e| in_dev(link, e))?;
    }
    for (dir, mode) in [("pts", 0o755), ("shm", 0o1777)] {
        rustix::fs::mkdirat(&dev, dir, rustix::fs::Mode::from_raw_mode(mode))
            .map_err(|e| in_dev(dir, e))?;
    }
    let at = |dir: &str| {
        root::open_in(
            &dev,
            dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        )
        .map_err(|e| format!("opening /dev/{dir}: {e}"))
    };
    // A private devpts is a convenience (terminals in exec); a host without it still runs.
    let pts = at("pts")?;
    let _ = mount(
        Some("devpts"),
        fd_path(&pts),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    );
    let shm = at("shm")?;
    mount(
        Some("tmpfs"),
        fd_path(&shm),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | shm_noexec,
        Some(&format!("mode=1777,size={shm_bytes}")),
    )
}

/// Hides kernel files behind the sandbox's own /dev/null and kernel directories behind an
/// empty read-only tmpfs, and makes the read-only proc paths so; each found inside the root.
fn mask_paths(root_fd: &OwnedFd) -> Result<()> {
    use rustix::fs::OFlags;
    let found = |path: &str, flags: OFlags| match root::open_in(root_fd, path, flags) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(format!("opening {path}: {e}")),
    };
    let null = found("/dev/null", OFlags::PATH)?.ok_or("the sandbox has no /dev/null")?;
    for file in MASKED_FILES {
        if let Some(target) = found(file, OFlags::PATH)? {
            mount(
                Some(fd_path(&null)),
                fd_path(&target),
                None,
                libc::MS_BIND,
                None,
            )?;
        }
    }
    for dir in MASKED_DIRS {
        if let Some(target) = found(dir, OFlags::PATH | OFlags::DIRECTORY)? {
            mount(
                Some("tmpfs"),
                fd_path(&target),
                Some("tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("size=0"),
            )?;
        }
    }
    for path in READONLY_PATHS {
        if let Some(target) = found(path, OFlags::PATH)? {
            mount(
                Some(fd_path(&target)),
                fd_path(&target),
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            let mounted = open_mount_point(root_fd, path)?;
            remount_readonly(
                &fd_path(&mounted),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            )?;
        }
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<()> {
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    let dot = c".";
    // SAFETY: pivot_root with "." twice stacks the old root on the new one; it is detached
    // right after, so nothing of the host stays reachable.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32 };
    check(rc, "pivot_root")?;
    // SAFETY: "." is a valid C string; MNT_DETACH unmounts the old root lazily.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, "detaching the old root")?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

fn sethostname(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    check(rc, "sethostname")
}

/// Drops every capability but those in `keep` (a bit per capability; only a build step that
/// runs as root keeps any), sets no_new_privs and the seccomp filter, becomes `uid:gid` and
/// execs `args[0]` (searched in `$PATH` from `env` when it has no slash).
fn drop_privileges_and_exec(
    args: &[String],
    env: &[String],
    cwd: &str,
    (uid, gid): (u32, u32),
    keep: u64,
    filters: &[seccompiler::BpfProgram],
) -> Result<Never> {
    let argv = cstrings(args)?;
    let envp = cstrings(env)?;
    let candidates = executable_candidates(&args[0], env)?;
    // Whatever this process was handed beyond stdin, stdout and stderr (its starter's open
    // files: a directory, a socket, a host file) closes at the exec; the status pipe too,
    // which is how its reader learns the exec happened.
    // SAFETY: close_range only sets close-on-exec on this process's descriptors.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    check(rc, "marking inherited descriptors close-on-exec")?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which setuid takes away.
    for cap in (0..=last_cap()).filter(|cap| keep & (1 << cap) == 0) {
        // SAFETY: PR_CAPBSET_DROP only shrinks this process's bounding set.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        check(
            rc,
            &format!("dropping capability {cap} from the bounding set"),
        )?;
    }
    // SAFETY: setgroups with one valid gid; EPERM in a user namespace with setgroups denied,
    // where there are no supplementary groups to drop anyway.
    if unsafe { libc::setgroups(1, &gid) } != 0 && errno_raw() != libc::EPERM {
        return Err(format!("setgroups: {}", errno()));
    }
    // SAFETY: plain credential changes of this single-threaded process.
    let rc = unsafe { libc::setresgid(gid, gid, gid) };
    check(rc, &format!("setgid {gid}"))?;
    // SAFETY: as above.
    let rc = unsafe { libc::setresuid(uid, uid, uid) };
    check(rc, &format!("setuid {uid}"))?;
    // A credential change clears the parent-death signal, so it is set again.
    die_with_parent()?;
    // SAFETY: clearing the ambient set only removes capabilities.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    check(rc, "clearing ambient capabilities")?;
    // A root exec gets its bounding set as permitted and effective capabilities: what is kept
    // here. Nothing is inheritable (Docker's fix for CVE-2022-24769).
    set_capabilities(keep)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS only restricts this process and its children.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "setting no_new_privs")?;
    std::env::set_current_dir(cwd).map_err(|e| format!("working directory {cwd:?}: {e}"))?;
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|e| format!("installing seccomp: {e}"))?;
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let mut last = libc::ENOENT;
    for path in &candidates {
        last = execve_when_not_busy(path, &argv_ptrs, &envp_ptrs);
        if last != libc::ENOENT {
            break;
        }
    }
    let message = std::io::Error::from_raw_os_error(last);
    Err(format!("cannot execute {:?}: {message}", args[0]))
}

/// How many times an exec that found its file open for writing (ETXTBSY) is tried again, with
/// a pause that doubles from 1 ms up to 100 ms: about 2 s in all.
const BUSY_RETRIES: u32 = 25;

/// Execs `path`, trying again while the kernel answers ETXTBSY, and returns the errno of the
/// exec that failed. A file is busy while any process holds it open for writing, and a
/// process holds a descriptor it never opened when it was forked (by another thread of the
/// starter: a daemon spawning a shim, a test running its neighbour) while the file that was
/// just unpacked was still being written; the fork's copy closes at its own exec, a moment
/// later (Go's os/exec and the Linux test suites retry the same way).
fn execve_when_not_busy(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> i32 {
    let mut pause = Duration::from_millis(1);
    let mut tries = 0;
    loop {
        // SAFETY: argv and envp are null-terminated arrays of valid C strings that outlive
        // the call; execve only returns on failure.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let errno = errno_raw();
        if errno != libc::ETXTBSY || tries == BUSY_RETRIES {
            return errno;
        }
        tries += 1;
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn executable_candidates(program: &str, env: &[String]) -> Result<Vec<CString>> {
    if program.contains('/') {
        return cstrings(&[program.to_owned()]);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let candidates: Vec<String> = path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .collect();
    cstrings(&candidates)
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Sets the effective and permitted sets to `keep` and empties the inheritable one (setuid to
/// non-root already emptied them all; a workload that runs as uid 0 needs it done here).
fn set_capabilities(keep: u64) -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [keep as u32, (keep >> 32) as u32].map(|bits| Data {
        effective: bits,
        permitted: bits,
        inheritable: 0,
    });
    // SAFETY: capset reads a v3 header and two data structs, which is what is passed.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as i32 };
    check(rc, "setting capabilities")
}

/// Waits for the workload (a child of this process), passing on forwarded signals, and
/// returns how it ended once it is reaped and every pipe in `outputs` is at its end (the
/// workload's death ends its whole PID namespace, so nothing holds them open after). What
/// arrives on `outputs[i]` is handed to `on_output(i, bytes)` as it comes. One thread does
/// it all with poll(2): a process that has unshared a PID namespace cannot start threads.
/// The forwarded signals must be blocked (`launch` blocks them).
pub(super) fn supervise(
    pid: libc::pid_t,
    outputs: &[std::os::fd::BorrowedFd<'_>],
    on_output: &mut dyn FnMut(usize, &[u8]),
) -> super::Ended {
    let mut mask = empty_sigset();
    for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
        // SAFETY: `mask` is an initialized sigset.
        unsafe { libc::sigaddset(&mut mask, *signal) };
    }
    // SAFETY: a new signalfd for the signals that are blocked in this process.
    let signals = unsafe { libc::signalfd(-1, &mask, libc::SFD_CLOEXEC) };
    let mut open: Vec<bool> = vec![true; outputs.len()];
    let mut buffer = vec![0u8; 64 * 1024];
    let mut translated: Option<i32> = None;
    let mut status: Option<i32> = None;
    loop {
        if status.is_none() {
            status = reap(pid);
        }
        if let Some(status) = status
            && !open.contains(&true)
        {
            if signals >= 0 {
                // SAFETY: the signalfd is ours and no longer needed.
                unsafe { libc::close(signals) };
            }
            return super::Ended::from_wait_status(status, translated);
        }
        let mut polled: Vec<libc::pollfd> = Vec::with_capacity(outputs.len() + 1);
        let watch_signals = signals >= 0 && status.is_none();
        if watch_signals {
            polled.push(libc::pollfd {
                fd: signals,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let first_output = polled.len();
        let watched: Vec<usize> = (0..outputs.len()).filter(|&i| open[i]).collect();
        for &i in &watched {
            polled.push(libc::pollfd {
                fd: outputs[i].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a signalfd the child's exit is only seen by looking again now and then.
        let timeout = if signals >= 0 { -1 } else { 100 };
        // SAFETY: `polled` is a valid array of pollfds of the given length.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue;
        }
        if watch_signals
            && polled[0].revents != 0
            && let Some(signal) = read_signal(signals)
            && signal != libc::SIGCHLD
        {
            let deliver = if translates_to_kill(pid, signal) {
                translated = Some(signal);
                libc::SIGKILL
            } else {
                signal
            };
            // SAFETY: signalling our own child (not yet reaped, so its PID is its own).
            unsafe { libc::kill(pid, deliver) };
        }
        for (slot, &i) in polled[first_output..].iter().zip(&watched) {
            if slot.revents == 0 {
                continue;
            }
            // SAFETY: reads at most `buffer.len()` bytes into `buffer`.
            let read = unsafe { libc::read(slot.fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            match read {
                n if n > 0 => on_output(i, &buffer[..n as usize]),
                n if n < 0 && errno_raw() == libc::EINTR => {}
                _ => open[i] = false,
            }
        }
    }
}

pub(super) fn supervise_watching(
    pid: libc::pid_t,
    watched: std::os::fd::BorrowedFd<'_>,
    on_wake: &mut dyn FnMut(bool) -> super::Wake,
) -> super::Ended {
    let mut mask = empty_sigset();
    for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
        // SAFETY: `mask` is an initialized sigset.
        unsafe { libc::sigaddset(&mut mask, *signal) };
    }
    // SAFETY: a new signalfd for the signals that are blocked in this process.
    let signals = unsafe { libc::signalfd(-1, &mask, libc::SFD_CLOEXEC) };
    let mut translated: Option<i32> = None;
    let mut wake = on_wake(false);
    loop {
        if let Some(status) = reap(pid) {
            on_wake(false);
            if signals >= 0 {
                // SAFETY: the signalfd is ours and no longer needed.
                unsafe { libc::close(signals) };
            }
            return super::Ended::from_wait_status(status, translated);
        }
        let mut polled: Vec<libc::pollfd> = Vec::with_capacity(2);
        if signals >= 0 {
            polled.push(libc::pollfd {
                fd: signals,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if wake.watched {
            polled.push(libc::pollfd {
                fd: watched.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a signalfd the child's exit is only seen by looking again now and then.
        let timeout = match (signals >= 0, wake.timeout_ms) {
            (true, t) => t,
            (false, t) if t < 0 => 100,
            (false, t) => t.min(100),
        };
        // SAFETY: `polled` is a valid array of pollfds of the given length.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue;
        }
        if signals >= 0
            && polled[0].revents != 0
            && let Some(signal) = read_signal(signals)
            && signal != libc::SIGCHLD
        {
            let deliver = if translates_to_kill(pid, signal) {
                translated = Some(signal);
                libc::SIGKILL
            } else {
                signal
            };
            // SAFETY: signalling our own child (not yet reaped, so its PID is its own).
            unsafe { libc::kill(pid, deliver) };
        }
        let readable = wake.watched && polled.last().is_some_and(|p| p.revents != 0);
        wake = on_wake(readable);
    }
}

/// One signal from the signalfd, if a whole record could be read.
fn read_signal(fd: i32) -> Option<i32> {
    // SAFETY: zeroed memory is a valid signalfd_siginfo.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe { libc::read(fd, (&raw mut info).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// PID 1 of a namespace never gets a signal it does not handle, so a workload that neither
/// handles, blocks nor ignores a deadly signal would never stop. It is killed instead, and the
/// helper reports the original signal, as for an ordinary process.
fn translates_to_kill(pid: libc::pid_t, signal: i32) -> bool {
    if signal == libc::SIGWINCH {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    // A blocked signal is queued even for PID 1 (it may be read from a signalfd).
    let bit = 1u64 << (signal - 1);
    (mask("SigCgt:") | mask("SigIgn:") | mask("SigBlk:")) & bit == 0
}

fn reap(pid: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    // SAFETY: non-blocking wait for our own child.
    let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (got == pid).then_some(status)
}

/// Ends this process as the workload ended, so the helper's parent sees the same status.
fn exit_like(ended: super::Ended) -> ! {
    let signal = match ended {
        super::Ended::Code(code) => std::process::exit(code),
        super::Ended::Signal(signal) => signal,
    };
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: ending this process with the same signal as the workload, so the caller sees
    // the same wait status; no core file, the workload already had its chance at one.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(signal, libc::SIG_DFL);
        let mut mask = empty_sigset();
        libc::sigaddset(&mut mask, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &mask, std::ptr::null_mut());
        libc::kill(libc::getpid(), signal);
    }
    std::process::exit(128 + signal)
}

fn block_forwarded_signals() -> Result<()> {
    let mut mask = empty_sigset();
    for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
        // SAFETY: `mask` is an initialized sigset.
        unsafe { libc::sigaddset(&mut mask, *signal) };
    }
    // SAFETY: a valid sigset; blocking only defers delivery to the signalfd.
    let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut()) };
    check(rc, "blocking signals")
}

/// Gives the workload what a process started by init has: no signal blocked, every signal at
/// its default, and umask 022. An exec keeps ignored signals ignored and the mask and umask
/// as they are, so without this a workload would inherit graven's ignored SIGPIPE (Rust
/// ignores it) and whatever its starter blocked, ignored or masked: a program that counts on
/// SIGPIPE ending it would not end, and what a RUN step writes would depend on who bakes.
fn clean_process_state() {
    // The kernel's struct sigaction all zero: SIG_DFL, no flags, an empty mask, whatever the
    // architecture's field order. Through the raw syscall, because glibc refuses to touch the
    // two real-time signals it keeps for itself, and those can arrive ignored too.
    let default = [0u64; 4];
    // SAFETY: in the forked child before exec: an empty mask, and SIG_DFL for every signal
    // that can be changed (SIGKILL and SIGSTOP refuse it, which is harmless).
    unsafe {
        libc::umask(0o022);
        let empty = empty_sigset();
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for signal in 1..=libc::SIGRTMAX() {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
}

fn empty_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set it is given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

// --- small wrappers ---

fn mount(
    source: Option<impl AsRef<std::ffi::OsStr>>,
    target: impl AsRef<Path>,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let target = target.as_ref();
    let source_c = source.map(|s| cstring(s.as_ref().as_bytes())).transpose()?;
    let target_c = cstring(target.as_os_str().as_bytes())?;
    let fstype_c = fstype.map(|s| cstring(s.as_bytes())).transpose()?;
    let data_c = data.map(|s| cstring(s.as_bytes())).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a valid C string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(
        rc,
        &format!(
            "mounting {} on {}",
            fstype.unwrap_or("a bind"),
            target.display()
        ),
    )
}

fn remount_readonly(target: &Path, extra: libc::c_ulong) -> Result<()> {
    mount(
        None::<&str>,
        target,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | extra,
        None,
    )
}

/// Remounts the bind mount at `target` with `flags`, keeping the flags its source mount has
/// (noexec, atime handling and the like): without root, a user namespace may not drop them.
fn remount_bind(target: &Path, flags: libc::c_ulong) -> Result<()> {
    let c = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: zeroed memory is a valid statvfs; `c` is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statvfs writes only into `stat`.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
    check(rc, &format!("reading the flags of {}", target.display()))?;
    let kept = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(st, _)| stat.f_flag & st != 0)
    .fold(0, |all, (_, ms)| all | ms);
    mount(
        None::<&str>,
        target,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | flags | kept,
        None,
    )
}

/// `/proc/self/fd/N`: the path through which a mount lands on what `fd` holds open.
fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens the mount point `path` inside the root as it is now: after a mount on it, the
/// mounted file system's root.
fn open_mount_point(root_fd: &OwnedFd, path: &str) -> Result<OwnedFd> {
    root::open_in(root_fd, path, rustix::fs::OFlags::PATH)
        .map_err(|e| format!("mount point {path}: {e}"))
}

/// Whether every mount point a read-only root needs is in `rootfs` already, resolved inside
/// it: `/dev`, `/proc`, `/sys`, `/tmp`, each bind's target, a directory or a file as its
/// source is, and each tmpfs's directory.
fn has_mount_points(rootfs: &Path, spec: &super::SandboxSpec) -> bool {
    use rustix::fs::FileType;
    let Ok(root_fd) = root::open_root(rootfs) else {
        return false;
    };
    let present = |path: &str, want_dir: bool| {
        root::open_in(&root_fd, path, rustix::fs::OFlags::PATH)
            .and_then(|fd| Ok(rustix::fs::fstat(&fd)?))
            .is_ok_and(|stat| {
                let kind = FileType::from_raw_mode(stat.st_mode);
                if want_dir {
                    kind == FileType::Directory
                } else {
                    kind == FileType::RegularFile
                }
            })
    };
    super::MOUNT_POINTS
        .iter()
        .all(|(dir, _)| present(dir, true))
        && spec
            .binds
            .iter()
            .all(|bind| present(&bind.target, bind.source.is_dir()))
        && spec.tmpfs.iter().all(|tmpfs| present(&tmpfs.target, true))
}

/// Opens the directory `path` inside the root, first making what is missing of it, each
/// directory made under a parent the kernel resolved inside the root, so a symlink in the
/// image can never lead a mount point outside it.
fn ensure_dir(root_fd: &OwnedFd, path: &str) -> Result<OwnedFd> {
    use rustix::fs::OFlags;
    let (parent, name) = split_mount_point(path)?;
    let flags = OFlags::PATH | OFlags::DIRECTORY;
    match root::open_in(root_fd, path, flags) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !name.is_empty() => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(format!(
                "mount point {path} is not a directory in the image"
            ));
        }
        Err(e) => return Err(format!("mount point {path}: {e}")),
    }
    let parent_fd = ensure_dir(root_fd, parent)?;
    match rustix::fs::mkdirat(&parent_fd, name, rustix::fs::Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(format!("creating mount point {path}: {e}")),
    }
    // A name that existed already but resolves to nothing is a dangling symlink.
    root::open_in(root_fd, path, flags).map_err(|e| {
        format!("mount point {path} is a symlink to nothing inside the image's root: {e}")
    })
}

/// Opens the mount point of a file bind, making an empty file when it is missing (under a
/// parent resolved inside the root).
fn ensure_file(root_fd: &OwnedFd, path: &str) -> Result<OwnedFd> {
    let (parent, name) = split_mount_point(path)?;
    if name.is_empty() {
        return Err(format!("mount point {path} names no file"));
    }
    let parent_fd = ensure_dir(root_fd, parent)?;
    match rustix::fs::mknodat(
        &parent_fd,
        name,
        rustix::fs::FileType::RegularFile,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    ) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(format!("creating mount point {path}: {e}")),
    }
    let fd = open_mount_point(root_fd, path)?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| format!("mount point {path}: {e}"))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Directory {
        return Err(format!(
            "mount point {path} is a directory in the image, for a file"
        ));
    }
    Ok(fd)
}

/// A mount point's parent and last name; `.` and `..` are refused (a volume's path is
/// checked for them already; this keeps the sandbox from relying on it).
fn split_mount_point(path: &str) -> Result<(&str, &str)> {
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("mount point {path} may not contain '.' or '..'"));
    }
    let path = path.trim_end_matches('/');
    Ok(path.rsplit_once('/').unwrap_or(("", path)))
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

fn open(path: &str, flags: i32) -> Result<i32> {
    let c = cstring(path.as_bytes())?;
    // SAFETY: a valid C string path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("opening {path}: {}", errno()));
    }
    Ok(fd)
}

/// Closes every descriptor from `first` up: a helper is a graven process with the host's
/// privileges, and must hold none of its starter's files (the workload's own exec closes
/// what is left above stderr anyway).
fn close_inherited(first: i32) {
    // SAFETY: called first thing in a fresh helper, before it opens anything of its own.
    unsafe { libc::close_range(first as u32, u32::MAX, 0) };
}

fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on a descriptor number; a closed fd just fails.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes)
        .map_err(|_| format!("{:?} contains a NUL byte", String::from_utf8_lossy(bytes)))
}

fn cstrings(items: &[String]) -> Result<Vec<CString>> {
    items.iter().map(|s| cstring(s.as_bytes())).collect()
}

fn errno_raw() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn check(rc: i32, what: &str) -> Result<()> {
    if rc < 0 {
        Err(format!("{what}: {}", errno()))
    } else {
        Ok(())
    }
}

/// Writes one line to the status pipe (ignored when the reader is gone).
fn report(status_fd: i32, line: &str) {
    let mut text = line.replace('\n', " ");
    text.push('\n');
    // SAFETY: `status_fd` is the status pipe, or closed, in which case the write fails
    // harmlessly.
    unsafe { libc::write(status_fd, text.as_ptr().cast(), text.len()) };
}

/// Reports `message` and ends this process at once: in a forked child, nothing of the
/// parent's (exit handlers, buffers) may run twice.
fn fail(status_fd: i32, message: &str, code: i32) -> ! {
    report(status_fd, &format!("error {message}"));
    let _ = writeln!(std::io::stderr(), "graven sandbox: {message}");
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(code) }
}
