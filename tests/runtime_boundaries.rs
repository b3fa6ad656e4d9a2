//! The host's side of the sandbox boundary, through the real binary: what a starter leaves
//! open never reaches an instance or its shim (`run`, `run -d`, `exec`, `up`, the daemon);
//! ids that mean "unchanged" to the kernel are refused; a workload running as uid 0 owns its
//! own device nodes, not the host's; image content with setuid bits is out of other host
//! users' reach and gives nothing inside; an image's symlinks resolve inside its root; a fork
//! bomb stops at the process limit; /dev/shm is as big as /tmp.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use graven::runtime::Instance;
use graven::store::RuntimeConfig;
use support::runtime::{File, get, parse_report, probe_binary, put_image};
use support::{StrayFds, graven, succeed};

/// A fresh home with `probe:test` (passwd with root and app), and the scratch dir above it.
fn probe_home() -> (Scratch, PathBuf) {
    let scratch = Scratch(tempfile::tempdir().unwrap());
    let home = scratch.path().join("home");
    put_image(&home, "probe:test", &probe_files(&[]), probe_config());
    (scratch, home)
}

/// A test's scratch dir whose home's instances are removed when it goes: `graven run` keeps
/// an exited instance, whose append-only log files the temp dir could not delete and whose
/// network address would stay leased.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let home = self.path().join("home");
        let Ok(listed) = graven(&home).args(["ps", "--all", "--json"]).output() else {
            return;
        };
        let instances: Vec<serde_json::Value> =
            serde_json::from_slice(&listed.stdout).unwrap_or_default();
        let ids: Vec<&str> = instances.iter().filter_map(|i| i["id"].as_str()).collect();
        if !ids.is_empty() {
            let _ = graven(&home).args(["rm", "--force"]).args(&ids).output();
        }
    }
}

fn probe_files(extra: &[File]) -> Vec<File> {
    let mut files = vec![
        File::executable("probe", &probe_binary()),
        File::text(
            "etc/passwd",
            "root:x:0:0::/:/probe\napp:x:1000:1000::/:/probe\n",
        ),
        File::text("etc/group", "root:x:0:\napp:x:1000:\n"),
    ];
    files.extend(extra.iter().map(|f| File {
        path: f.path.clone(),
        bytes: f.bytes.clone(),
        mode: f.mode,
    }));
    files
}

fn probe_config() -> RuntimeConfig {
    RuntimeConfig {
        // CMD, so a command given (`graven run IMG -- /probe report`) replaces it.
        cmd: Some(vec!["/probe".to_owned(), "serve".to_owned()]),
        ..RuntimeConfig::default()
    }
}

/// Runs a graven command that may fail: its output.
fn output(command: &mut Command) -> Output {
    command.output().expect("graven starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `graven run -d` of `args`; the instance as `ps` lists it once it answers.
fn run_detached(home: &Path, args: &[&str], prepare: impl FnOnce(&mut Command)) -> Instance {
    let mut command = graven(home);
    command.args(["run", "-d"]).args(args);
    prepare(&mut command);
    let id = text(&succeed(&mut command).stdout).trim().to_owned();
    let listed: Vec<Instance> =
        serde_json::from_slice(&succeed(graven(home).args(["ps", "--json"])).stdout).unwrap();
    let instance = listed.into_iter().find(|i| i.id.0 == id).unwrap();
    support::wait_for(Duration::from_secs(10), "the probe to answer", || {
        get(instance.address.unwrap(), "/healthz")
    });
    instance
}

fn report_of(instance: &Instance) -> BTreeMap<String, String> {
    parse_report(&get(instance.address.unwrap(), "/report").unwrap().body)
}

/// The shim's PID, from the instance's state.
fn shim_of(home: &Path, instance: &Instance) -> u32 {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            home.join("instances")
                .join(&instance.id.0)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    state["shim"]["pid"].as_u64().unwrap() as u32
}

fn remove_all(home: &Path) {
    support::daemon::remove_instances(home);
}

// --- a starter's open files (issue 10, item 2) ---

/// `exec 7</dir 9>>file; graven run …`: the workload sees only stdin, stdout and stderr.
#[test]
fn a_starter_s_open_files_never_reach_run_s_workload() {
    let (scratch, home) = probe_home();
    let stray = StrayFds::new(scratch.path());
    let mut command = graven(&home);
    command.args(["run", "probe:test", "--", "/probe", "report"]);
    stray.hand_to(&mut command);
    let seen = parse_report(&text(&succeed(&mut command).stdout));
    assert_eq!(seen["fds"], "0,1,2", "{seen:?}");
}

/// The same through `run -d` (its forked shim included) and a break-glass `exec`, which used
/// to pass its caller's fds 7 and 9 on to the command it runs inside the instance.
#[test]
fn a_starter_s_open_files_never_reach_exec_or_a_detached_instance() {
    let (scratch, home) = probe_home();
    let stray = StrayFds::new(scratch.path());
    let instance = run_detached(&home, &["probe:test"], |c| stray.hand_to(c));
    let seen = report_of(&instance);
    let links: Vec<String> = seen["fd_links"].split(' ').map(str::to_owned).collect();
    stray.assert_none_in(&links, "the workload of run -d");
    stray.assert_none_in(&support::fd_links(shim_of(&home, &instance)), "its shim");
    let mut exec = graven(&home);
    exec.args(["exec", &instance.id.0, "--", "/probe", "report"]);
    stray.hand_to(&mut exec);
    let seen = parse_report(&text(&succeed(&mut exec).stdout));
    assert_eq!(seen["fds"], "0,1,2", "exec: {seen:?}");
    assert!(
        !seen["fd_links"].contains("host-"),
        "exec: {}",
        seen["fd_links"]
    );
    remove_all(&home);
}

/// A project whose one service is the probe, behind a free route.
fn probe_project(dir: &Path) {
    support::daemon::write_project(dir, support::daemon::free_port(), 1, "", "");
    std::fs::copy(probe_binary(), dir.join("probe")).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY probe /probe\nENTRYPOINT [\"/probe\", \"serve\"]\n",
    )
    .unwrap();
}

/// Waits for app `demo`'s running instance and checks that neither it nor its shim holds
/// the starter's files; its own report says fds 0, 1 and 2 besides its sockets.
fn assert_instance_holds_nothing_of(home: &Path, stray: &StrayFds) {
    let instance = support::wait_for(Duration::from_secs(60), "a running instance", || {
        support::daemon::demo_instances(home)
            .into_iter()
            .find(|i| !i.status.is_exited() && i.pid.is_some())
            .filter(|i| get(i.address.unwrap(), "/healthz").is_some())
    });
    stray.assert_none_in(&support::fd_links(instance.pid.unwrap()), "the workload");
    stray.assert_none_in(&support::fd_links(shim_of(home, &instance)), "its shim");
    let seen = report_of(&instance);
    let fds: Vec<&str> = seen["fds"].split(',').collect();
    for fd in support::STRAY_FDS {
        assert!(!fds.contains(&fd.to_string().as_str()), "{seen:?}");
    }
}

/// `graven up` has threads, so it re-executes graven as each shim: the shim and the workload
/// used to keep every inheritable fd `up` was started with.
#[test]
fn an_up_s_instances_hold_none_of_its_starter_s_files() {
    let scratch = tempfile::tempdir().unwrap();
    let (home, dir) = (scratch.path().join("home"), scratch.path().join("project"));
    probe_project(&dir);
    let stray = StrayFds::new(scratch.path());
    let _up = support::daemon::Up::start_with(&home, &dir, "local", |c| stray.hand_to(c));
    assert_instance_holds_nothing_of(&home, &stray);
}

#[test]
fn a_daemon_s_instances_hold_none_of_its_starter_s_files() {
    let scratch = tempfile::tempdir().unwrap();
    let (home, dir) = (scratch.path().join("home"), scratch.path().join("project"));
    probe_project(&dir);
    let stray = StrayFds::new(scratch.path());
    let _daemon = support::daemon::Up::daemon_with(&home, "local", |c| stray.hand_to(c));
    support::daemon::run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert_instance_holds_nothing_of(&home, &stray);
}

// --- ids that mean "unchanged" (item 4) ---

/// uid (or gid) 4294967295 is -1, "leave it unchanged" to setresuid: a workload that asked
/// for it ran as root. Refused with the value named, from every way an id comes in.
#[test]
fn uid_minus_one_is_refused_wherever_it_comes_from() {
    let (_scratch, home) = probe_home();
    put_image(
        &home,
        "minus:test",
        &probe_files(&[File::text("etc/passwd", "evil:x:4294967295:0::/:/probe\n")]),
        RuntimeConfig {
            user: Some("4294967295:65534".to_owned()),
            ..probe_config()
        },
    );
    let refused = |args: &[&str], value: &str| {
        let out = output(graven(&home).args(args));
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran: {}", text(&out.stdout));
        assert!(stderr.contains(value), "{args:?}: {stderr}");
        assert!(stderr.contains("not a valid id"), "{args:?}: {stderr}");
    };
    refused(&["run", "minus:test"], "uid 4294967295");
    refused(
        &["run", "--user", "4294967295:0", "probe:test"],
        "uid 4294967295",
    );
    refused(
        &["run", "--user", "0:4294967295", "probe:test"],
        "gid 4294967295",
    );
    refused(&["run", "--user", "evil", "minus:test"], "uid 4294967295");
    // A volume would have been given to that owner (chown -1 changes nothing).
    refused(
        &[
            "run",
            "--user",
            "4294967295",
            "-v",
            "data:/data",
            "probe:test",
        ],
        "uid 4294967295",
    );
    assert!(!home.join("volumes/data").exists());
    assert!(
        std::fs::read_dir(home.join("instances"))
            .unwrap()
            .next()
            .is_none(),
        "a refused start left an instance"
    );
    // bake: USER before a RUN, and COPY --chown.
    let context = tempfile::tempdir().unwrap();
    std::fs::copy(support::busybox(), context.path().join("busybox")).unwrap();
    for (containerfile, value) in [
        (
            "FROM scratch\nCOPY busybox /bin/busybox\nUSER 4294967295:0\nRUN [\"/bin/busybox\", \"true\"]\n",
            "uid 4294967295",
        ),
        (
            "FROM scratch\nCOPY busybox /bin/busybox\nUSER 0:4294967295\nRUN [\"/bin/busybox\", \"true\"]\n",
            "gid 4294967295",
        ),
        (
            "FROM scratch\nCOPY --chown=4294967295:0 busybox /bin/busybox\n",
            "uid 4294967295",
        ),
    ] {
        std::fs::write(context.path().join("Containerfile"), containerfile).unwrap();
        let out = output(
            graven(&home)
                .args(["bake", "--tag", "minus:bake"])
                .arg(context.path()),
        );
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{containerfile}");
        assert!(stderr.contains(value), "{containerfile}: {stderr}");
    }
}

// --- the host's device nodes (item 5) ---

/// A workload running as uid 0 (no capability) owned the host's /dev nodes it was given as
/// binds: it could chmod 000 the host's /dev/null. Its nodes are its own now.
#[test]
fn a_root_instance_cannot_touch_the_host_s_device_nodes() {
    let scratch = tempfile::tempdir().unwrap();
    let home = scratch.path().join("home");
    put_image(
        &home,
        "busybox:test",
        &[
            File::executable("bin/busybox", support::busybox()),
            File::executable("bin/sh", support::busybox()),
        ],
        RuntimeConfig {
            env: vec!["PATH=/bin".to_owned()],
            ..RuntimeConfig::default()
        },
    );
    let before = support::host_devices();
    let out = succeed(graven(&home).args([
        "run",
        "--user",
        "0",
        "busybox:test",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        support::TOUCH_DEVICES,
    ]));
    assert_eq!(
        support::host_devices(),
        before,
        "the host's device nodes changed"
    );
    assert_eq!(text(&out.stdout).trim(), "5");
}

// --- setuid files and other users (item 3) ---

/// Runs `args` as nobody (a real other user of the host): its output.
fn as_nobody(args: &[&std::ffi::OsStr]) -> Output {
    output(support::as_nobody().args(args))
}

/// With `COPY --chmod=4755`, an image's setuid-root file lay in `$GRAVEN_HOME/rootfs/<m>`
/// under a home that `run` and `bake` made 0755: a host user ran it as euid 0. Whoever makes
/// the home now, it is owner-only, and inside an instance the bit gives nothing (nosuid).
#[test]
fn setuid_files_of_an_image_are_out_of_other_users_reach() {
    let scratch = tempfile::tempdir().unwrap();
    // Other users may walk to the home, as they may to a user's ~/.local/share.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = scratch.path().join("home");
    let context = scratch.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::copy(probe_binary(), context.join("probe")).unwrap();
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY --chmod=4755 probe /suid\nUSER 65534:65534\nCMD [\"/suid\", \"report\"]\n",
    )
    .unwrap();
    succeed(
        graven(&home)
            .args(["bake", "--tag", "suid:1"])
            .arg(&context),
    );
    let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o7777;
    assert_eq!(mode(&home), 0o700, "bake made the home");
    let listed = as_nobody(&["ls".as_ref(), home.as_os_str()]);
    assert!(
        !listed.status.success(),
        "nobody lists the home: {}",
        text(&listed.stdout)
    );
    // The first run unpacks the image; the probe runs as nobody (its USER).
    let seen = parse_report(&text(
        &succeed(graven(&home).args(["run", "suid:1"])).stdout,
    ));
    assert_eq!(seen["euid"], "65534", "the setuid bit worked: {seen:?}");
    let unpacked: Vec<PathBuf> = std::fs::read_dir(home.join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        // The root itself, not its drift manifest beside it.
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.') && p.is_dir())
        .collect();
    let suid = unpacked[0].join("suid");
    assert_eq!(mode(&suid), 0o4755);
    let ran = as_nobody(&[suid.as_os_str(), "report".as_ref()]);
    assert!(
        !ran.status.success() && text(&ran.stderr).contains("Permission denied"),
        "nobody ran {}: {}{}",
        suid.display(),
        text(&ran.stdout),
        text(&ran.stderr)
    );
    for dir in ["rootfs", "instances", "volumes"] {
        assert_eq!(mode(&home.join(dir)), 0o700, "{dir}");
    }
    // Inside, the root and a volume are nosuid (a uid-0 instance could make a setuid file
    // in a volume; the host sees it as root's).
    let instance = run_detached(
        &home,
        &["-v", "data:/data", "suid:1", "--", "/suid", "serve"],
        |_| {},
    );
    assert_eq!(report_of(&instance)["euid"], "65534");
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", instance.pid.unwrap())).unwrap();
    for point in ["/", "/data"] {
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(point))
            .unwrap_or_else(|| panic!("no {point} in {mountinfo}"));
        let options = line.split(' ').nth(5).unwrap();
        assert!(options.split(',').any(|o| o == "nosuid"), "{line}");
    }
    remove_all(&home);
}

/// A home made 0755 by an earlier graven (or by hand) is made owner-only by the next command.
#[test]
fn an_open_home_is_made_owner_only() {
    let scratch = tempfile::tempdir().unwrap();
    let home = scratch.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    succeed(graven(&home).args(["images"]));
    assert_eq!(std::fs::metadata(&home).unwrap().mode() & 0o777, 0o700);
}

// --- an image's symlinks resolve inside its root (item 1's class, in the runtime) ---

/// An image's `etc/passwd -> /host/file` made the runtime read the host's file to resolve
/// USER: here that file names `app` as uid 4242, and the instance ran as 4242. Resolved
/// inside the root, the link leads nowhere and the user is unknown.
#[test]
fn an_image_s_passwd_symlink_never_reads_the_host_s() {
    let (scratch, home) = probe_home();
    let host_passwd = scratch.path().join("passwd");
    std::fs::write(&host_passwd, "app:x:4242:4242::/:/probe\n").unwrap();
    put_image(
        &home,
        "linked:test",
        &[
            File::executable("probe", &probe_binary()),
            File::symlink("etc/passwd", host_passwd.to_str().unwrap()),
        ],
        RuntimeConfig {
            user: Some("app".to_owned()),
            entrypoint: Some(vec!["/probe".to_owned(), "report".to_owned()]),
            ..RuntimeConfig::default()
        },
    );
    let out = output(graven(&home).args(["run", "linked:test"]));
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("user \"app\" does not exist"),
        "{}",
        text(&out.stderr)
    );
}

/// A mount point that is a symlink is resolved inside the image's root, as the workload
/// will see it: `/data -> /srv/data` gets the volume at the image's /srv/data (it used to be
/// refused, being checked against the host's /srv/data). One that leads to nothing inside
/// the root (`/tmp -> <a host dir>`) fails with a clear error, and nothing on the host is
/// created or mounted over.
#[test]
fn image_symlinks_resolve_mount_points_inside_the_root() {
    let (scratch, home) = probe_home();
    put_image(
        &home,
        "data-link:test",
        &probe_files(&[File::dir("srv/data"), File::symlink("data", "/srv/data")]),
        probe_config(),
    );
    let out = succeed(graven(&home).args([
        "run",
        "-v",
        "store:/data",
        "-e",
        "PROBE_VOLUME=/data",
        "data-link:test",
        "--",
        "/probe",
        "report",
    ]));
    let seen = parse_report(&text(&out.stdout));
    assert_eq!(seen["volume_count"], "1", "{seen:?}");
    assert_eq!(
        std::fs::read_to_string(home.join("volumes/store/count")).unwrap(),
        "1"
    );

    let victim = scratch.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    for (link, volume) in [("tmp", None), ("dev", None), ("mnt", Some("v:/mnt/x"))] {
        let tag = format!("{link}-link:test");
        put_image(
            &home,
            &tag,
            &probe_files(&[File::symlink(link, victim.to_str().unwrap())]),
            probe_config(),
        );
        let mut command = graven(&home);
        command.arg("run");
        if let Some(volume) = volume {
            command.args(["-v", volume]);
        }
        let out = output(command.args([&tag, "--", "/probe", "report"]));
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{link}: {}", text(&out.stdout));
        assert!(stderr.contains("mount point"), "{link}: {stderr}");
        assert!(
            std::fs::read_dir(&victim).unwrap().next().is_none(),
            "{link}: something was made in the host's dir"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(victim.to_str().unwrap()), "{link}");
    }
    // A refused start wrote nothing, and left no append-only log file that nobody could
    // delete: every source of this home's `graven run`s can go.
    for source in std::fs::read_dir(home.join("logs/_run")).unwrap() {
        let source = source.unwrap().path();
        if !source.is_dir() {
            continue;
        }
        std::fs::remove_dir_all(&source)
            .unwrap_or_else(|e| panic!("removing {}: {e}", source.display()));
    }
}

// --- defaults: the process limit and /dev/shm (item 15) ---

/// A fork bomb of 300 used to succeed: no process limit unless `--pids` was given. Now every
/// instance has one (2048 by default); the probe starts threads until refused.
#[test]
fn a_fork_bomb_stops_at_the_process_limit() {
    let (_scratch, home) = probe_home();
    let count = |extra: &[&str]| {
        let out = succeed(graven(&home).arg("run").args(extra).args([
            "probe:test",
            "--",
            "/probe",
            "threads",
            "10000",
        ]));
        assert!(
            !text(&out.stderr).contains("not enforced"),
            "{}",
            text(&out.stderr)
        );
        let seen = parse_report(&text(&out.stdout));
        assert_eq!(seen["threads_end"], "Resource temporarily unavailable");
        seen["threads"].parse::<u64>().unwrap()
    };
    // The probe's own thread is one of the limit's.
    assert_eq!(count(&["--pids", "64"]), 63);
    assert_eq!(count(&[]), graven::runtime::DEFAULT_PIDS - 1);
    // `--pids 0` asks for no limit: the workload is in no pids cgroup of graven's.
    let pids_cgroup = |extra: &[&str]| {
        let args: Vec<&str> = extra.iter().copied().chain(["probe:test"]).collect();
        let instance = run_detached(&home, &args, |_| {});
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", instance.pid.unwrap()));
        succeed(graven(&home).args(["rm", "-f", &instance.id.0]));
        cgroup
            .unwrap()
            .lines()
            .find(|line| line.contains(":pids:") || line.starts_with("0::"))
            .unwrap_or_default()
            .contains("/graven/")
    };
    assert!(
        pids_cgroup(&[]),
        "an instance with the default limit is in a pids cgroup"
    );
    assert!(
        !pids_cgroup(&["--pids", "0"]),
        "--pids 0 still made a pids cgroup"
    );
}

/// /dev/shm was 64 MiB whatever the /tmp size said; it follows it now.
#[test]
fn dev_shm_is_as_big_as_tmp() {
    let (_scratch, home) = probe_home();
    let shm = |extra: &[&str]| {
        let out = succeed(graven(&home).arg("run").args(extra).args([
            "probe:test",
            "--",
            "/probe",
            "report",
        ]));
        parse_report(&text(&out.stdout))["shm_bytes"].clone()
    };
    assert_eq!(shm(&["--tmp-size", "16M"]), (16u64 << 20).to_string());
    assert_eq!(shm(&[]), (64u64 << 20).to_string());
}
