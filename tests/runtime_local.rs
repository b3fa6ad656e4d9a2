//! The local runtime with the probe baked into a test image: what an instance sees, what
//! survives it, how it stops, and that another graven process finds it.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use graven::runtime::{
    AnyRuntime, Instance, InstanceSpec, InstanceStatus, Limits, LocalRuntime, Runtime,
    RuntimeError, VolumeMount,
};
use graven::store::{Digest, RuntimeConfig};
use support::runtime::{File, assert_locked_down, get, parse_report, probe_binary, put_image};

struct Home {
    dir: tempfile::TempDir,
    runtime: LocalRuntime,
    image: Digest,
}

impl Home {
    fn new() -> Home {
        graven::sandbox::set_helper_binary(support::graven_bin());
        let dir = tempfile::tempdir().unwrap();
        let image = probe_image(dir.path(), None);
        Home {
            runtime: LocalRuntime::open(dir.path()).unwrap(),
            dir,
            image,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spec(&self) -> InstanceSpec {
        InstanceSpec::new(self.image.clone())
    }
}

/// Kills and removes whatever a test left (removing clears the log files' append-only flag,
/// so the temp dir can go, and hands the instance's network namespace back).
impl Drop for Home {
    fn drop(&mut self) {
        let runtime = AnyRuntime::Local(self.runtime.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for instance in runtime.list().await.unwrap_or_default() {
                    let _ = runtime.stop(&instance.id, Duration::ZERO).await;
                    let _ = runtime.remove(&instance.id).await;
                }
            });
        })
        .join();
    }
}

fn probe_image(home: &Path, user: Option<&str>) -> Digest {
    let config = RuntimeConfig {
        user: user.map(str::to_owned),
        // CMD, so a command given (`graven run IMG -- /probe report`) replaces it.
        cmd: Some(vec!["/probe".to_owned(), "serve".to_owned()]),
        ..RuntimeConfig::default()
    };
    put_image(
        home,
        "probe:test",
        &[
            File::executable("probe", &probe_binary()),
            File::text(
                "etc/passwd",
                "root:x:0:0::/:/probe\napp:x:1000:1000::/:/probe\n",
            ),
            File::text("etc/group", "root:x:0:\napp:x:1000:\n"),
        ],
        config,
    )
}

fn report(instance: &Instance, path: &str) -> BTreeMap<String, String> {
    let address = instance.address.unwrap();
    let reply = support::wait_for(Duration::from_secs(10), "the probe to answer", || {
        get(address, path)
    });
    parse_report(&reply.body)
}

async fn wait_exited(runtime: &LocalRuntime, instance: &Instance) -> InstanceStatus {
    let deadline = tokio::time::Instant::now() + support::LEAST_WAIT;
    loop {
        let status = runtime.inspect(&instance.id).await.unwrap().status;
        if status.is_exited() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never exited",
            instance.id
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The instance's state file, as JSON.
fn state_of(home: &Home, instance: &Instance) -> serde_json::Value {
    let path = home
        .path()
        .join("instances")
        .join(&instance.id.0)
        .join("state.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The file system type of an instance's `/`, from its workload's mountinfo: a bind of the
/// shared root shows the host's type, an overlay "overlay".
fn root_fstype(instance: &Instance) -> String {
    let pid = instance.pid.unwrap();
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let line = info
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap();
    let (_, after) = line.split_once(" - ").unwrap();
    after.split_whitespace().next().unwrap().to_owned()
}

/// The parent PID and session id of a process, from /proc/<pid>/stat.
fn parent_and_session(pid: u64) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (fields[1].parse().unwrap(), fields[3].parse().unwrap())
}

/// The instance's lines in the log store, as `<time> <stream> <line>`.
fn log_of(home: &Path, id: &str) -> String {
    let query = graven::logs::Query {
        instance: Some(id.to_owned()),
        ..Default::default()
    };
    let mut text = String::new();
    graven::logs::read::read(home, &query, &mut |r| {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(r.time_ns);
        text.push_str(&format!(
            "{} {} {}\n",
            humantime::format_rfc3339_millis(time),
            r.stream.name(),
            String::from_utf8_lossy(&r.line)
        ));
    });
    text
}

fn log_text(home: &Home, instance: &Instance) -> String {
    log_of(home.path(), &instance.id.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_is_locked_down() {
    let home = Home::new();
    let mut spec = home.spec();
    spec.env.insert("PROBE_ENV".into(), "given".into());
    spec.limits.tmp_bytes = Some(8 << 20);
    let instance = home.runtime.start(spec).await.unwrap();
    let seen = report(&instance, "/report");
    // Every mount point is in the unpacked image: the root is a plain read-only bind of it.
    assert_ne!(root_fstype(&instance), "overlay");
    assert_locked_down(&seen);
    // As with Docker, an image without USER runs as root: here uid 0 with no capability.
    assert_eq!(seen["uid"], "0", "an image without USER runs as root");
    assert_eq!(seen["timer_list_bytes"], "0");
    assert_eq!(seen["probe_env"], "given");
    assert_eq!(seen["port"], instance.address.unwrap().port().to_string());
    assert_eq!(seen["hostname"], instance.id.0);
    let filled = report(&instance, "/fill-tmp");
    let bytes: u64 = filled["tmp_fill_bytes"].parse().unwrap();
    assert!(
        ((6 << 20)..=(8 << 20)).contains(&bytes),
        "{bytes} bytes fitted in /tmp"
    );
    // The shared root holds the image and the empty mount points made when it was unpacked,
    // and nothing else: not the probe's writes, not the sandbox's.
    let rootfs = home.path().join("rootfs").join(home.image.hex());
    let listing = |dir: &Path| {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        entries
    };
    assert_eq!(
        listing(&rootfs),
        ["dev", "etc", "probe", "proc", "sys", "tmp"]
    );
    for mount_point in ["dev", "proc", "sys", "tmp"] {
        assert!(
            listing(&rootfs.join(mount_point)).is_empty(),
            "{mount_point}"
        );
    }
    home.runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
    // The log holds the probe's output, timestamped, and outlives the instance.
    home.runtime.remove(&instance.id).await.unwrap();
    let log = log_text(&home, &instance);
    let line = log
        .lines()
        .find(|l| l.contains("stdout pid=1"))
        .expect(&log);
    assert!(line.starts_with("20"), "{line}");
}

/// The home's one scratch directory, on which every sandbox mounts its own tmpfs: only inside
/// its mount namespace, so two instances running at once share it and the host sees it empty
/// and unmounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_mount_their_scratch_where_the_host_never_sees_it() {
    let home = Home::new();
    let first = home.runtime.start(home.spec()).await.unwrap();
    let second = home.runtime.start(home.spec()).await.unwrap();
    for instance in [&first, &second] {
        assert_locked_down(&report(instance, "/report"));
    }
    let scratch = home.path().join("scratch");
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let at = scratch.to_str().unwrap();
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(4) == Some(at)),
        "{at} is mounted on the host:\n{mounts}"
    );
    // Nothing of the scratch in the instance's own directory either.
    for instance in [&first, &second] {
        let dir = home.path().join("instances").join(&instance.id.0);
        assert!(!dir.join("mnt").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_user_is_resolved_and_root_stays_root_without_capabilities() {
    let home = Home::new();
    let app = probe_image(home.path(), Some("app"));
    let instance = home.runtime.start(InstanceSpec::new(app)).await.unwrap();
    assert_eq!(report(&instance, "/report")["uid"], "1000");
    let root = probe_image(home.path(), Some("root"));
    let as_root = home
        .runtime
        .start(InstanceSpec::new(root.clone()))
        .await
        .unwrap();
    assert_eq!(report(&as_root, "/report")["uid"], "0");
    // An explicit user replaces the image's: root in name, still without capabilities.
    let mut spec = InstanceSpec::new(root);
    spec.user = Some("0".into());
    let explicit = home.runtime.start(spec).await.unwrap();
    let seen = report(&explicit, "/report");
    assert_eq!(seen["uid"], "0");
    assert_eq!(seen["cap_eff"], "0000000000000000");
    assert_eq!(seen["root_write"], "Read-only file system");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_data_survives_the_instance() {
    let home = Home::new();
    let mut spec = home.spec();
    spec.volumes.push(VolumeMount {
        name: "data".into(),
        path: "/var/data".into(),
    });
    spec.env.insert("PROBE_VOLUME".into(), "/var/data".into());
    let first = home.runtime.start(spec.clone()).await.unwrap();
    assert_eq!(report(&first, "/report")["volume_count"], "1");
    // /var/data is not in the image, so its mount point lives in a throwaway overlay.
    assert_eq!(root_fstype(&first), "overlay");
    home.runtime
        .stop(&first.id, Duration::from_secs(5))
        .await
        .unwrap();
    home.runtime.remove(&first.id).await.unwrap();
    let second = home.runtime.start(spec).await.unwrap();
    // The probe counts its start once; the second instance starts from what the first left.
    assert_eq!(report(&second, "/report")["volume_count"], "2");
    assert_eq!(
        std::fs::read_to_string(home.path().join("volumes/data/count")).unwrap(),
        "2"
    );
    // The negative control: without the volume, nothing persists.
    let mut bare = home.spec();
    bare.env.insert("PROBE_VOLUME".into(), "/tmp".into());
    let third = home.runtime.start(bare).await.unwrap();
    assert_eq!(report(&third, "/report")["volume_count"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_delivered() {
    let home = Home::new();
    let instance = home.runtime.start(home.spec()).await.unwrap();
    report(&instance, "/healthz");
    let stopped = home
        .runtime
        .stop(&instance.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        stopped.status,
        InstanceStatus::Exited {
            code: Some(0),
            signal: None
        }
    );
    assert!(log_text(&home, &instance).contains("probe: got SIGTERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_follows_after_the_grace() {
    let home = Home::new();
    let mut spec = home.spec();
    spec.env.insert("PROBE_IGNORE_TERM".into(), "1".into());
    let instance = home.runtime.start(spec).await.unwrap();
    report(&instance, "/healthz");
    let stopped = home
        .runtime
        .stop(&instance.id, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        stopped.status,
        InstanceStatus::Exited {
            code: None,
            signal: Some(9)
        }
    );
    assert!(log_text(&home, &instance).contains("probe: ignoring SIGTERM"));
    assert!(get(instance.address.unwrap(), "/healthz").is_none());
}

/// A stop waiting out its grace while another graven (or the controller, which removes the
/// instances it sees exited) kills and removes the instance ends with it exited, not with
/// "no instance": `tests/deploy_local.rs`'s negative control hit this when its kill raced
/// the controller's remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_instance_is_removed_meanwhile_reports_it_exited() {
    let home = Home::new();
    let mut spec = home.spec();
    spec.env.insert("PROBE_IGNORE_TERM".into(), "1".into());
    let instance = home.runtime.start(spec).await.unwrap();
    report(&instance, "/healthz");
    let runtime = home.runtime.clone();
    let id = instance.id.clone();
    let stopping = tokio::spawn(async move { runtime.stop(&id, Duration::from_secs(30)).await });
    let deadline = tokio::time::Instant::now() + support::LEAST_WAIT;
    while home.runtime.inspect(&instance.id).await.unwrap().status != InstanceStatus::Stopping {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stop never began"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The workload ignores SIGTERM, so the stop is waiting out its grace now.
    home.runtime.kill(&instance.id).await.unwrap();
    home.runtime.remove(&instance.id).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the stop ends once the instance is gone")
        .unwrap()
        .unwrap();
    assert!(stopped.status.is_exited(), "{:?}", stopped.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_reported_exited() {
    let home = Home::new();
    let instance = home.runtime.start(home.spec()).await.unwrap();
    report(&instance, "/healthz");
    let pid = instance.pid.unwrap();
    // SAFETY: killing the instance's own process, started by this test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let status = wait_exited(&home.runtime, &instance).await;
    assert!(status.is_exited(), "{status:?}");
    let listed = home.runtime.list().await.unwrap();
    assert!(listed.iter().all(|i| i.status.is_exited()));
}

/// An instance is two host processes: the shim, which leads a session of its own (so the
/// starter's terminal cannot signal it), and the workload as its direct child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_leads_its_own_session_and_is_the_workload_s_parent() {
    let home = Home::new();
    let instance = home.runtime.start(home.spec()).await.unwrap();
    report(&instance, "/healthz");
    let state = state_of(&home, &instance);
    let shim = state["shim"]["pid"].as_u64().unwrap();
    let workload = state["workload"]["pid"].as_u64().unwrap();
    assert_eq!(Some(workload as u32), instance.pid);
    let (_, shim_session) = parent_and_session(shim);
    assert_eq!(shim_session, shim, "the shim leads its session");
    let (_, own_session) = parent_and_session(std::process::id().into());
    assert_ne!(shim_session, own_session);
    let (workload_parent, _) = parent_and_session(workload);
    assert_eq!(workload_parent, shim, "no helper between shim and workload");
    assert_eq!(
        std::fs::read_link(format!("/proc/{shim}/cwd")).unwrap(),
        Path::new("/"),
        "the shim keeps no directory of its starter's busy"
    );
    home.runtime.kill(&instance.id).await.unwrap();
}

/// `graven run -d` has one thread, so it forks its shim rather than re-executing graven. That
/// shim must be as detached as a re-executed one: its own session, the workload's parent,
/// and none of its starter's open files. Here the starter inherits a pipe as an extra fd, as
/// a CI runner or a supervisor may pass one; a shim that kept it would hold the pipe open
/// for as long as the instance runs, and whoever reads it would hang.
#[test]
fn a_shim_forked_by_graven_run_keeps_nothing_of_its_starter() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    const INHERITED: i32 = 57;
    let home = Home::new();
    let (mut reader, writer) = std::io::pipe().unwrap();
    let writer_fd = writer.as_raw_fd();
    assert_ne!(
        writer_fd, INHERITED,
        "dup2 onto itself would keep close-on-exec"
    );
    // Started from the home with a relative GRAVEN_HOME: what is recorded must still be
    // absolute, and the shim must not keep this directory busy.
    let mut command = support::graven(home.path());
    command
        .env("GRAVEN_HOME", ".")
        .current_dir(home.path())
        .args(["run", "-d", "probe:test"]);
    // SAFETY: dup2 between fork and exec; the copy is inheritable (no close-on-exec).
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(writer_fd, INHERITED) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run = support::succeed(&mut command);
    drop(writer);
    let id = String::from_utf8(run.stdout).unwrap().trim().to_owned();
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = done.send(reader.read_to_end(&mut rest).map(|_| rest.len()));
    });
    let read = ended.recv_timeout(Duration::from_secs(10));
    let listed: Vec<Instance> = serde_json::from_slice(
        &support::succeed(support::graven(home.path()).args(["ps", "--json"])).stdout,
    )
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, InstanceStatus::Running);
    assert!(
        matches!(read, Ok(Ok(0))),
        "the starter's pipe stays open while the instance runs: {read:?}"
    );
    report(&listed[0], "/healthz");
    let state = state_of(&home, &listed[0]);
    let shim = state["shim"]["pid"].as_u64().unwrap();
    let workload = state["workload"]["pid"].as_u64().unwrap();
    let (_, shim_session) = parent_and_session(shim);
    assert_eq!(shim_session, shim, "the shim leads its session");
    assert_eq!(parent_and_session(workload).0, shim);
    assert_eq!(
        std::fs::read_link(format!("/proc/{shim}/cwd")).unwrap(),
        Path::new("/")
    );
    let log = listed[0].log.clone().unwrap();
    assert!(log.is_absolute(), "{}", log.display());
    support::succeed(support::graven(home.path()).args(["rm", "-f", &id]));
}

/// A start whose starter is killed before its shim recorded anything looks exited, yet the
/// shim goes on launching. A removal that looked then and deleted after the shim's record
/// left the workload running with its directory gone, found by nothing (what CI's runs left
/// behind). The hooks hold the shim just before its record and `rm` between its look and its
/// deletion, so the record lands in between: `rm` must see it and refuse.
#[test]
fn a_removal_racing_the_record_of_a_start_whose_starter_died_leaves_nothing_unmanaged() {
    use graven::runtime::local::{HOLD_REMOVE_ENV, HOLD_SHIM_RECORD_ENV};
    let home = Home::new();
    let gates = tempfile::tempdir().unwrap();
    let (shim_go, rm_go) = (gates.path().join("shim"), gates.path().join("rm"));
    let waiting = |gate: &Path| {
        let marker = gate.with_extension("waiting");
        support::wait_for(Duration::from_secs(20), "a hook waiting", || {
            marker.exists().then_some(())
        });
    };
    let mut run = support::graven(home.path())
        .env(HOLD_SHIM_RECORD_ENV, &shim_go)
        .args(["run", "-d", "probe:test"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    waiting(&shim_go);
    run.kill().unwrap();
    run.wait().unwrap();
    let ids: Vec<String> = std::fs::read_dir(home.path().join("instances"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("state.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = &ids[0];
    let rm = support::graven(home.path())
        .env(HOLD_REMOVE_ENV, &rm_go)
        .args(["rm", id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    waiting(&rm_go);
    std::fs::write(&shim_go, "").unwrap();
    let state = home.path().join("instances").join(id).join("state.json");
    let workload = support::wait_for(Duration::from_secs(20), "the workload recorded", || {
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        state["workload"]["pid"].as_u64()
    });
    std::fs::write(&rm_go, "").unwrap();
    let removed = rm.wait_with_output().unwrap();
    assert!(
        !removed.status.success(),
        "a running instance was removed: its workload {workload} runs on, unmanaged"
    );
    let listed: Vec<Instance> = serde_json::from_slice(
        &support::succeed(support::graven(home.path()).args(["ps", "--json"])).stdout,
    )
    .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].status, InstanceStatus::Running);
    support::succeed(support::graven(home.path()).args(["rm", "-f", id]));
    support::wait_for(Duration::from_secs(10), "the workload gone", || {
        (!Path::new(&format!("/proc/{workload}")).exists()).then_some(())
    });
}

/// A workload starts as one started by init would: no signal blocked, none ignored, umask
/// 022. Rust ignores SIGPIPE in graven (and in the shim), and an exec keeps ignored signals
/// ignored and the mask and umask as they are; here the starter also blocks SIGUSR1, ignores
/// SIGHUP and has umask 077, as a service manager, `nohup` or a careful admin may. Its
/// `graven run` unpacks the image too, whose root must still be open to the workload's user
/// (nobody). busybox reports on itself without touching any of it.
#[test]
fn the_workload_starts_in_a_clean_process_state() {
    use std::os::unix::process::CommandExt;

    let home = Home::new();
    put_image(
        home.path(),
        "busybox:test",
        &[File::executable("bin/busybox", support::busybox())],
        RuntimeConfig {
            entrypoint: Some(
                [
                    "/bin/busybox",
                    "grep",
                    "-E",
                    "^(Sig[BI]|Umask)",
                    "/proc/self/status",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            ..RuntimeConfig::default()
        },
    );
    let mut command = support::graven(home.path());
    command.args(["run", "busybox:test"]);
    // SAFETY: between fork and exec, only async-signal-safe calls on a local sigset.
    unsafe {
        command.pre_exec(|| {
            let mut blocked: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut blocked);
            libc::sigaddset(&mut blocked, libc::SIGUSR1);
            libc::sigprocmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::umask(0o077);
            Ok(())
        });
    }
    let run = support::succeed(&mut command);
    let seen = String::from_utf8_lossy(&run.stdout);
    let field = |name: &str| {
        seen.lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {seen:?}"))
            .trim()
            .to_owned()
    };
    assert_eq!(field("SigBlk:"), "0000000000000000", "{seen}");
    assert_eq!(field("SigIgn:"), "0000000000000000", "{seen}");
    assert_eq!(field("Umask:"), "0022", "{seen}");
}

/// A long-lived starter (the daemon, here this test process) is the parent of every shim it
/// starts: it must reap the ones that end, or they stay behind as zombies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_starter_reaps_its_ended_shims() {
    let home = Home::new();
    let instance = home.runtime.start(home.spec()).await.unwrap();
    report(&instance, "/healthz");
    let shim = state_of(&home, &instance)["shim"]["pid"].as_u64().unwrap();
    let (shim_parent, _) = parent_and_session(shim);
    assert_eq!(shim_parent, u64::from(std::process::id()));
    home.runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
    let rt = home.runtime.clone();
    support::wait_for(Duration::from_secs(10), "the shim to be reaped", || {
        // Listing is what the controller does every round.
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(rt.list()))
            .unwrap();
        (!Path::new(&format!("/proc/{shim}")).exists()).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_supervisor_still_means_exited_never_running() {
    let home = Home::new();
    let instance = home.runtime.start(home.spec()).await.unwrap();
    report(&instance, "/healthz");
    let state = state_of(&home, &instance);
    // Kill the shim first (so nobody records the exit), then the workload.
    for who in ["shim", "workload"] {
        let pid = state[who]["pid"].as_u64().unwrap() as i32;
        // SAFETY: killing processes of the instance this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = wait_exited(&home.runtime, &instance).await;
    assert_eq!(
        status,
        InstanceStatus::Exited {
            code: None,
            signal: None
        }
    );
    // Removing it removes its cgroups, which the vanished shim could not.
    let cgroups: Vec<std::path::PathBuf> = state["cgroups"]["dirs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|dir| dir.as_str().unwrap().into())
        .collect();
    home.runtime.remove(&instance.id).await.unwrap();
    for dir in cgroups {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_starts_nothing_and_leaves_nothing() {
    let home = Home::new();
    let mut ghost = home.spec();
    ghost.user = Some("ghost".into());
    let mut missing = home.spec();
    missing.entrypoint = Some(vec!["/nope".into()]);
    let mut escaping = home.spec();
    escaping.volumes.push(VolumeMount {
        name: "..".into(),
        path: "/data".into(),
    });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut port = home.spec();
    // A fixed host port is taken on the host's network only.
    port.network = graven::runtime::NetworkMode::Host;
    port.host_port = Some(taken.local_addr().unwrap().port());
    type Expect = fn(&RuntimeError) -> bool;
    let cases: Vec<(InstanceSpec, Expect)> = vec![
        (ghost, |e| matches!(e, RuntimeError::UnknownUser { .. })),
        (missing, |e| {
            matches!(e, RuntimeError::MissingEntrypoint { .. })
        }),
        (escaping, |e| matches!(e, RuntimeError::BadVolume { .. })),
        (port, |e| matches!(e, RuntimeError::PortInUse { .. })),
        (InstanceSpec::new(Digest::of(b"absent")), |e| {
            matches!(e, RuntimeError::UnknownImage { .. })
        }),
    ];
    for (spec, expected) in cases {
        let error = home.runtime.start(spec).await.unwrap_err();
        assert!(expected(&error), "{error:?}");
        assert!(!error.to_string().is_empty());
    }
    let instances = std::fs::read_dir(home.path().join("instances"))
        .unwrap()
        .count();
    assert_eq!(instances, 0, "a refused start left an instance dir");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(home.path().to_str().unwrap()));
    // The negative control: the same home starts a good spec.
    let good = home.runtime.start(home.spec()).await.unwrap();
    report(&good, "/healthz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_go_to_cgroups_or_say_they_do_not() {
    let home = Home::new();
    let mut spec = home.spec();
    spec.limits = Limits {
        memory_bytes: Some(64 << 20),
        pids: Some(64),
        cpu_millis: Some(500),
        ..Limits::default()
    };
    let instance = home.runtime.start(spec).await.unwrap();
    report(&instance, "/healthz");
    let memory = Path::new("/sys/fs/cgroup/memory/graven").join(&instance.id.0);
    if instance.warnings.is_empty() {
        let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), (64u64 << 20).to_string());
        // The workload and nothing else: the shim that supervises it stays outside its limits.
        let procs = std::fs::read_to_string(memory.join("cgroup.procs")).unwrap();
        assert_eq!(
            procs.lines().collect::<Vec<_>>(),
            [instance.pid.unwrap().to_string()],
            "{procs}"
        );
    } else {
        assert!(instance.warnings[0].contains("not enforced"));
    }
    home.runtime
        .stop(&instance.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!memory.exists(), "the cgroup outlived the instance");
}

/// The CLI in separate processes: one graven starts the instance and exits; others list,
/// exec into and stop it.
#[test]
fn a_restarted_graven_finds_execs_and_stops_the_instance() {
    let home = Home::new();
    let run = support::succeed(support::graven(home.path()).args([
        "run",
        "-d",
        "probe:test",
        "--env",
        "PROBE_ENV=cli",
    ]));
    let id = String::from_utf8(run.stdout).unwrap().trim().to_owned();
    let ps = support::graven(home.path())
        .args(["ps", "--json"])
        .output()
        .unwrap();
    let listed: Vec<Instance> = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id.0, id);
    assert_eq!(listed[0].status, InstanceStatus::Running);
    assert!(!listed[0].tainted);
    report(&listed[0], "/healthz");
    // Break-glass exec: it runs inside (same namespaces, not PID 1, same user)...
    let exec = support::succeed(support::graven(home.path()).args([
        "exec",
        &id[..8],
        "--",
        "/probe",
        "report",
    ]));
    let seen = String::from_utf8_lossy(&exec.stdout).into_owned();
    assert!(seen.contains("uid=0"), "{seen}");
    assert!(seen.contains("cap_eff=0000000000000000"), "{seen}");
    assert!(seen.contains("probe_env=cli"), "{seen}");
    assert!(seen.contains(&format!("hostname={id}")), "{seen}");
    assert!(!seen.contains("pid=1\n"), "{seen}");
    // ...and taints the instance.
    let ps = support::graven(home.path())
        .args(["ps", "--json"])
        .output()
        .unwrap();
    let listed: Vec<Instance> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(listed[0].tainted);
    // A fresh runtime value in this process sees the same instance.
    let again = LocalRuntime::open(home.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(again.list()).unwrap();
    assert_eq!(seen[0].id.0, id);
    let stop = support::succeed(support::graven(home.path()).args(["stop", &id, "--grace", "5s"]));
    assert!(String::from_utf8_lossy(&stop.stdout).contains("exited (0)"));
    support::succeed(support::graven(home.path()).args(["rm", &id]));
    let ps = support::graven(home.path())
        .args(["ps", "--all", "--json"])
        .output()
        .unwrap();
    let listed: Vec<Instance> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(listed.is_empty());
    // Its output outlives it, in the log store.
    assert!(!log_of(home.path(), &id).is_empty());
}

#[test]
fn run_reads_sizes_as_graven_toml_does_and_refuses_an_overflow() {
    let home = Home::new();
    let out = support::graven(home.path())
        .args(["run", "--memory", "99999999999G", "probe:test"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"99999999999G\" is not a size"),
        "{stderr}"
    );
    // KB is decimal, as in graven.toml: 40960KB is 40,960,000 bytes (a whole number of
    // pages), where 40960K would be 41,943,040.
    let run = support::succeed(support::graven(home.path()).args([
        "run",
        "-d",
        "--json",
        "--memory",
        "40960KB",
        "probe:test",
    ]));
    let instance: Instance = serde_json::from_slice(&run.stdout).unwrap();
    let memory = Path::new("/sys/fs/cgroup/memory/graven").join(&instance.id.0);
    let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes"));
    support::succeed(support::graven(home.path()).args(["rm", "-f", &instance.id.0]));
    if instance.warnings.is_empty() {
        assert_eq!(limit.unwrap().trim(), "40960000");
    } else {
        assert!(instance.warnings[0].contains("not enforced"));
    }
}

/// The numbers of `line N` lines.
fn line_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| l.split(" line ").nth(1).unwrap().parse().unwrap())
        .collect()
}

/// `graven run` prints every line the instance wrote, through the log store's reader; an
/// instance's logs past its size bound (`--log-size`) lose their oldest lines only, even
/// once it is removed: the newest lines, up to the last, stay.
#[test]
fn run_prints_every_line_and_a_removed_instances_log_keeps_its_newest_lines_within_its_size() {
    let home = Home::new();
    let cap = 64 << 10;
    // `graven run [-d --json] --log-size 64K probe:test -- /probe lines COUNT`
    let lines = |detached: &[&str], count: &str| {
        let mut run = support::graven(home.path());
        run.arg("run")
            .args(detached)
            .args(["--log-size", "64K", "probe:test"]);
        support::succeed(run.args(["--", "/probe", "lines", count]))
    };
    let run = lines(&[], "3000");
    let printed: Vec<String> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (0..3000).map(|i| format!("line {i}")).collect();
    assert_eq!(printed, expected);
    // Many times the cap.
    let run = lines(&["-d", "--json"], "100000");
    let instance: Instance = serde_json::from_slice(&run.stdout).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_exited(&home.runtime, &instance));
    // Removed as soon as it is seen exited: the shim may still be stamping, and the removal
    // waits for it. Nothing is left of its directory; its log is in the store.
    support::succeed(support::graven(home.path()).args(["rm", &instance.id.0]));
    assert!(!home.path().join("instances").join(&instance.id.0).exists());
    let both = line_numbers(&log_of(home.path(), &instance.id.0));
    let first = both[0];
    assert!(first > 0, "the oldest lines went");
    assert_eq!(both, (first..100_000).collect::<Vec<_>>());
    let group = home.path().join("logs/_run");
    let used: u64 = walk_usage(&group);
    assert!(used <= cap + (32 << 10), "{used} bytes on disk");
}

/// Bytes the files under `dir` take on disk.
fn walk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| match e.path() {
            p if p.is_dir() => walk_usage(&p),
            _ => e.metadata().map_or(0, |m| m.blocks() * 512),
        })
        .sum()
}

/// `graven run` in the foreground: the instance lives as long as the command, so closing its
/// terminal (SIGHUP) or SIGTERM stops the instance and the command ends, where both used to
/// kill the command and leave the instance running unfollowed.
#[test]
fn graven_run_stops_its_instance_on_sighup_and_sigterm() {
    for signal in [libc::SIGHUP, libc::SIGTERM] {
        let home = tempfile::tempdir().unwrap();
        // Whatever the test leaves running (when it fails) is stopped by the runtime.
        let _cleanup = support::daemon::RemoveInstancesOnDrop(home.path().to_owned());
        support::runtime::hello_image(home.path());
        let mut run = support::graven(home.path())
            .args(["run", "hello:test"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let runtime = LocalRuntime::open(home.path()).unwrap();
        let list = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(runtime.list())
                .unwrap()
        };
        support::wait_for(Duration::from_secs(30), "the instance to run", || {
            list()
                .iter()
                .any(|i| i.status == InstanceStatus::Running)
                .then_some(())
        });
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        unsafe { libc::kill(run.id() as i32, signal) };
        let status = support::wait_for(Duration::from_secs(30), "graven run to end", || {
            run.try_wait().unwrap()
        });
        let left: Vec<_> = list()
            .into_iter()
            .filter(|i| !i.status.is_exited())
            .collect();
        assert!(left.is_empty(), "signal {signal}: still running: {left:?}");
        assert!(
            status.code().is_some(),
            "signal {signal}: it ended by itself: {status}"
        );
    }
}

/// An instance whose directory is deleted and whose workload then ends on its own leaves no
/// cgroup behind: no graven can find it any more to remove them, so its shim does.
#[test]
fn an_instance_whose_dir_is_gone_when_it_ends_leaves_no_cgroup() {
    let home = tempfile::tempdir().unwrap();
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.path().to_owned());
    support::runtime::hello_image(home.path());
    let out =
        support::succeed(support::graven(home.path()).args(["run", "-d", "--json", "hello:test"]));
    let instance: Instance = serde_json::from_slice(&out.stdout).unwrap();
    let group = Path::new("/sys/fs/cgroup/pids/graven").join(&instance.id.0);
    let unified = Path::new("/sys/fs/cgroup/graven").join(&instance.id.0);
    let made: Vec<&Path> = [group.as_path(), unified.as_path()]
        .into_iter()
        .filter(|g| g.is_dir())
        .collect();
    if made.is_empty() {
        eprintln!("this host gives graven no cgroups: nothing to check");
        return;
    }
    std::fs::remove_dir_all(home.path().join("instances").join(&instance.id.0)).unwrap();
    // SAFETY: kill(2) on the workload this test just started, still running.
    unsafe { libc::kill(instance.pid.unwrap() as i32, libc::SIGKILL) };
    support::wait_for(Duration::from_secs(10), "its cgroup to go", || {
        made.iter().all(|g| !g.exists()).then_some(())
    });
}
