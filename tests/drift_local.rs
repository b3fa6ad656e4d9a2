//! Drift on the local runtime, as users run it (the real binary, `graven up`, real images):
//! each kind of change to a running server is found by the drift check and the instance is
//! replaced through the surge-first path with no failed request under keep-alive load.
//!
//! - the image's root changed on the host (a changed byte, a changed mode, an added file, a
//!   removed file): every instance on it condemned with the evidence, the root unpacked
//!   afresh before the replacements start;
//! - a program that is not the image's run from /tmp (the service lets /tmp execute) and
//!   from a volume, in a Debian-based image (one instance, which owns the volume, so it is
//!   replaced stop-first with the route holding requests); the negative control first: an
//!   instance that writes to its volume and /tmp without executing is never condemned;
//! - /tmp is `noexec` unless the service opts out.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::daemon::{Up, demo_instances, free_port, hello_project, run, run_ok};
use support::load::Load;

const CONNECTIONS: usize = 8;
const INSTANCES: usize = 2;
/// The check interval the tests configure (the default is a minute).
const INTERVAL: &str = "300ms";

fn running_ids(home: &Path) -> Vec<String> {
    demo_instances(home)
        .into_iter()
        .filter(|i| !i.status.is_exited())
        .map(|i| i.id.0)
        .collect()
}

/// The unpacked root of the one image the project runs (the only named root).
fn root(home: &Path) -> PathBuf {
    let roots: Vec<PathBuf> = std::fs::read_dir(home.join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            !name.starts_with('.') && p.is_dir()
        })
        .collect();
    assert_eq!(roots.len(), 1, "one root: {roots:?}");
    roots[0].clone()
}

/// `graven drift --json`.
fn drift_report(home: &Path) -> serde_json::Value {
    let (stdout, _) = run_ok(home, &["drift", "--json"]);
    serde_json::from_str(&stdout).unwrap()
}

/// Waits until every instance in `before` is gone and `INSTANCES` others run, each healthy.
fn wait_replaced(home: &Path, before: &[String], what: &str) {
    support::wait_for(Duration::from_secs(60), what, || {
        let now = running_ids(home);
        let replaced = now.len() == INSTANCES && now.iter().all(|id| !before.contains(id));
        (replaced && healthy(home) == INSTANCES).then_some(())
    });
}

fn healthy(home: &Path) -> usize {
    let (ok, stdout, _) = run(home, &["status", "--json"]);
    if !ok {
        return 0;
    }
    let status: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    status[0]["state"]["instances"]
        .as_object()
        .map(|i| i.values().filter(|i| i["lifecycle"] == "healthy").count())
        .unwrap_or(0)
}

/// The drift history's reasons (`graven drift --json`), in the log's order.
fn condemned(home: &Path) -> Vec<serde_json::Value> {
    drift_report(home)["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reason"].clone())
        .collect()
}

#[test]
fn each_change_to_the_images_root_replaces_every_instance_on_it_without_failing_a_request() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    hello_project(
        &dir,
        route,
        INSTANCES as u32,
        r#"VERSION = "v1""#,
        &format!("drift = {{ interval = \"{INTERVAL}\" }}"),
    );
    // A file of the image's to change (the running binary cannot be written: ETXTBSY).
    std::fs::write(dir.join("app.conf"), "setting = 1\n").unwrap();
    let mut containerfile = std::fs::read_to_string(dir.join("Containerfile")).unwrap();
    containerfile.push_str("COPY app.conf /etc/app.conf\n");
    std::fs::write(dir.join("Containerfile"), containerfile).unwrap();
    let _up = Up::start(&home, &dir, "local");
    support::wait_for(Duration::from_secs(30), "the instances healthy", || {
        (running_ids(&home).len() == INSTANCES && healthy(&home) == INSTANCES).then_some(())
    });
    assert!(
        support::daemon::run(&home, &["drift"])
            .1
            .contains("no running instance differs"),
        "an untouched root is no drift"
    );

    let load = Load::start(route, CONNECTIONS);
    type Tamper = fn(&Path);
    let cases: [(&str, &str, Tamper); 4] = [
        ("/etc/app.conf", "content", |root| {
            // One byte, same size: only the hashing pass can see it.
            std::fs::write(root.join("etc/app.conf"), "setting = 2\n").unwrap()
        }),
        ("/etc/app.conf", "mode", |root| {
            use std::os::unix::fs::PermissionsExt;
            let path = root.join("etc/app.conf");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o4777)).unwrap()
        }),
        ("/etc/added", "added", |root| {
            std::fs::write(root.join("etc/added"), "x").unwrap()
        }),
        ("/etc/app.conf", "removed", |root| {
            std::fs::remove_file(root.join("etc/app.conf")).unwrap()
        }),
    ];
    for (n, (path, change, tamper)) in cases.into_iter().enumerate() {
        let before = running_ids(&home);
        let root = root(&home);
        let started = Instant::now();
        tamper(&root);
        wait_replaced(
            &home,
            &before,
            &format!("the instances replaced after a {change}"),
        );
        eprintln!("{change}: replaced in {:?}", started.elapsed());
        let reasons = condemned(&home);
        let new = &reasons[n * INSTANCES..];
        assert_eq!(
            new.len(),
            INSTANCES,
            "each instance condemned once: {reasons:?}"
        );
        for reason in new {
            assert_eq!(reason["why"], "root_changed", "{reason}");
            assert_eq!(reason["path"], path, "{reason}");
            assert_eq!(reason["change"], change, "{reason}");
        }
        // The replacements run on a root unpacked afresh: the file is as the image has it.
        let fresh = self::root(&home);
        assert_eq!(
            std::fs::read_to_string(fresh.join("etc/app.conf")).unwrap(),
            "setting = 1\n"
        );
        assert!(!fresh.join("etc/added").exists());
        // The evidence shows in `graven status` while the condemned instance drains, and
        // in the plain history.
        let (text, _) = run_ok(&home, &["drift"]);
        assert!(
            text.contains(&format!("its image's file {path} changed ({change})")),
            "{text}"
        );
    }
    let report = load.stop();
    assert!(report.total > 0);
    assert_eq!(
        report.failed, 0,
        "clients saw errors: {:?}",
        report.failures
    );
}

#[test]
fn tmp_is_noexec_unless_the_service_opts_out() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::bake_debian_base(&home, temp.path());
    let script = "cp /bin/true /tmp/t && cp /bin/true /dev/shm/t && /tmp/t";
    let (ok, _, stderr) = run(&home, &["run", "base:test", "--", "/bin/sh", "-c", script]);
    assert!(!ok, "a program written to /tmp ran");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let script = "cp /bin/true /dev/shm/t && /dev/shm/t";
    let (ok, _, _) = run(&home, &["run", "base:test", "--", "/bin/sh", "-c", script]);
    assert!(!ok, "a program written to /dev/shm ran");
}

/// A Debian-based service whose shell loop writes to its volume and /tmp all the time, and
/// runs a copy of `sleep` from /tmp or from the volume when the test drops a file asking
/// for it into the volume.
const LOOP: &str = r#"/hello & n=0
while :; do
  n=$((n+1)); echo "$n" > /tmp/scratch; echo "$n" >> /data/writes
  if rm /data/run-tmp 2>/dev/null; then cp /bin/sleep /tmp/sleeper && /tmp/sleeper 600 & fi
  if rm /data/run-volume 2>/dev/null; then cp /bin/sleep /data/sleeper-$n && /data/sleeper-$n 600 & fi
  sleep 0.1
done"#;

/// One instance: a named volume is owned by one live instance at a time.
const ALONE: usize = 1;

#[test]
fn a_program_not_in_the_image_replaces_its_instance_and_writing_alone_never_does() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    support::bake_debian_base(&home, temp.path());
    let route = free_port();
    let command = serde_json::to_string(&["/bin/sh", "-c", LOOP]).unwrap();
    // A Debian instance takes longer to start than the example's: a generous deadline.
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "demo"

[services.web]
instances = {ALONE}
port = 8080
route = "{route}"
command = {command}
volumes = {{ data = "/data" }}
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "60s" }}
stop_grace = "2s"
drift = {{ interval = "{INTERVAL}", exec_tmp = true }}
"#
        ),
    )
    .unwrap();
    std::fs::copy(support::hello_binary(), dir.join("dist/hello")).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        "FROM base:test\nCOPY dist/hello /hello\nENV PORT=8080\n",
    )
    .unwrap();
    let _up = Up::start(&home, &dir, "local");
    support::wait_for(Duration::from_secs(120), "the instances healthy", || {
        (running_ids(&home).len() == ALONE && healthy(&home) == ALONE).then_some(())
    });
    let load = Load::start(route, CONNECTIONS);

    // The negative control: the instance writes to its volume and /tmp over many check
    // intervals (150 loops of 0.1 s each: 15 s, 50 intervals), and nothing is condemned.
    let writes = home.join("volumes/data/writes");
    support::wait_for(Duration::from_secs(120), "150 writes to the volume", || {
        let text = std::fs::read_to_string(&writes).unwrap_or_default();
        (text.lines().count() >= 150).then_some(())
    });
    assert_eq!(condemned(&home), Vec::<serde_json::Value>::new());
    assert_eq!(running_ids(&home).len(), ALONE);

    for (trigger, exe) in [
        ("run-tmp", "/tmp/sleeper"),
        ("run-volume", "/data/sleeper-"),
    ] {
        let before = running_ids(&home);
        let done = condemned(&home).len();
        let started = Instant::now();
        std::fs::write(home.join("volumes/data").join(trigger), "").unwrap();
        // The instance ran it: it is condemned and replaced, stop-first (it owns the
        // volume), the route holding requests meanwhile.
        let reason = support::wait_for(Duration::from_secs(60), "a condemned instance", || {
            condemned(&home).get(done).cloned()
        });
        eprintln!("{trigger}: condemned in {:?}", started.elapsed());
        assert_eq!(reason["why"], "foreign_program", "{reason}");
        assert!(reason["exe"].as_str().unwrap().starts_with(exe), "{reason}");
        assert!(
            reason["cmdline"].as_str().unwrap().ends_with(" 600"),
            "{reason}"
        );
        support::wait_for(
            Duration::from_secs(60),
            "the condemned one replaced",
            || {
                let now = running_ids(&home);
                let gone = before.iter().filter(|id| !now.contains(id)).count();
                (gone == 1 && now.len() == ALONE && healthy(&home) == ALONE).then_some(())
            },
        );
    }
    let report = load.stop();
    assert!(report.total > 0);
    assert_eq!(
        report.failed, 0,
        "clients saw errors: {:?}",
        report.failures
    );
}

/// A root unpacked by a graven from before manifests has none: the check makes one from the
/// image's layers, never from the tree in use, so a change made before the first check is
/// found all the same; the tampered root is moved aside and a fresh one (with its manifest)
/// takes its place.
#[test]
fn a_root_without_a_manifest_is_checked_against_the_image_not_against_itself() {
    use graven::runtime::{Drift, DriftCheck, FileChange, InstanceSpec, LocalRuntime, Runtime};
    graven::sandbox::set_helper_binary(support::graven_bin());
    let temp = tempfile::tempdir().unwrap();
    let image = support::runtime::hello_image(temp.path());
    let local = LocalRuntime::open(temp.path()).unwrap();
    let instance = local
        .start_blocking(InstanceSpec::new(image.clone()))
        .unwrap();
    let _cleanup = support::daemon::RemoveInstancesOnDrop(temp.path().to_owned());
    let root = temp.path().join("rootfs").join(image.hex());
    let manifest = temp
        .path()
        .join("rootfs")
        .join(format!("{}.manifest", image.hex()));
    std::fs::remove_file(&manifest).unwrap();
    std::fs::write(root.join("planted"), "x").unwrap();
    let found = local
        .check_drift_blocking(std::slice::from_ref(&instance.id), DriftCheck::default())
        .unwrap();
    assert_eq!(
        found,
        vec![(
            instance.id.clone(),
            Drift::RootChanged {
                path: "/planted".into(),
                change: FileChange::Added,
                expected: None,
                found: Some("file 0644 0:0".into()),
            }
        )]
    );
    assert!(manifest.exists(), "the fresh root has its manifest");
    assert!(
        !root.join("planted").exists(),
        "the root was unpacked afresh"
    );
    let seen = support::daemon::block_on(local.inspect(&instance.id)).unwrap();
    assert!(
        seen.drift.is_some(),
        "the finding is recorded on the instance"
    );
    // Found once: a second check does not find it again.
    let again = local
        .check_drift_blocking(std::slice::from_ref(&instance.id), DriftCheck::default())
        .unwrap();
    assert_eq!(again, vec![]);
}
