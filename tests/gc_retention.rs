//! `graven gc` bounds what grows with use: the images of releases beyond a service's
//! `keep_releases` (but never the wanted release's, nor one within the bound), unpacked roots
//! no instance uses (but never one an instance, running or exited, uses), and the directories
//! of removed instances beyond log retention. A rollback to a release whose image went is
//! refused before anything is recorded.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use support::daemon::{RemoveInstancesOnDrop, Up, free_port, run, run_ok};
use support::runtime::{File, put_image};

/// A project whose image differs per `version` (a file in the build context), with
/// `keep_releases` in its deploy policy.
fn write_project(dir: &Path, route: std::net::SocketAddr, version: u32, keep: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY version /version\n",
    )
    .unwrap();
    std::fs::write(dir.join("version"), version.to_string()).unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "demo"

[services.web]
port = 8080
route = "{route}"
health = {{ path = "/healthz", interval = "50ms", timeout = "1s", healthy_after = 1 }}
deploy = {{ health_deadline = "60s", keep_releases = {keep} }}
stop_grace = "1s"
"#
        ),
    )
    .unwrap();
}

fn json(home: &Path, args: &[&str]) -> serde_json::Value {
    let (stdout, _) = run_ok(home, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

fn has_blob(home: &Path, digest: &str) -> bool {
    home.join("store/blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
        .is_file()
}

#[test]
fn old_release_images_are_collected_beyond_keep_releases() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    write_project(&dir, route, 1, 3);
    let _up = Up::start(&home, &dir, "fake");
    for version in 2..=12 {
        write_project(&dir, route, version, 3);
        run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    }
    // Back to an old release: the wanted one is kept whatever its age.
    run_ok(&home, &["rollback", "--to", "5"]);
    let releases = json(&home, &["releases", "--json"]);
    let images: BTreeMap<u64, String> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let image = r["image"].as_str().unwrap().to_owned();
            (r["number"].as_u64().unwrap(), image)
        })
        .collect();
    assert_eq!(images.len(), 12);
    let distinct: std::collections::BTreeSet<&String> = images.values().collect();
    assert_eq!(distinct.len(), 12, "each release has an image of its own");
    assert!(images.values().all(|i| has_blob(&home, i)));

    // A dry run says what would go and removes nothing.
    let dry = json(&home, &["gc", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], true);
    assert!(images.values().all(|i| has_blob(&home, i)), "{dry}");

    let report = json(&home, &["gc", "--json"]);
    assert_eq!(report["blobs"], dry["blobs"], "the dry run said the same");
    let removed: Vec<&str> = report["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    for (number, image) in &images {
        let kept = [5, 10, 11, 12].contains(number);
        assert_eq!(
            has_blob(&home, image),
            kept,
            "release {number}'s image {image}: {report}"
        );
        assert_eq!(removed.contains(&image.as_str()), !kept, "{report}");
    }
    assert!(report["freed_bytes"].as_u64().unwrap() > 0);

    // A rollback to a release whose image went fails clearly, and records nothing.
    let events = json(&home, &["history", "--json"])
        .as_array()
        .unwrap()
        .len();
    let (ok, _, stderr) = run(&home, &["rollback", "--to", "1"]);
    assert!(!ok);
    let expected = format!(
        "release 1 of web was made with image {}, which gc removed (keep_releases = 3): \
         deploy it again",
        images[&1]
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(
        json(&home, &["history", "--json"])
            .as_array()
            .unwrap()
            .len(),
        events
    );
    // A release within the bound still rolls back.
    run_ok(&home, &["rollback", "--to", "11"]);
    let status = json(&home, &["status", "--json"]);
    assert_eq!(status[0]["state"]["services"]["web"]["wanted"], 11);
}

/// A one-file image beside `hello:test` (so its root differs), tagged `tag`.
fn other_image(home: &Path, tag: &str) -> String {
    let config = graven::store::RuntimeConfig {
        user: Some("65534:65534".to_owned()),
        entrypoint: Some(vec!["/hello".to_owned()]),
        ..Default::default()
    };
    put_image(
        home,
        tag,
        &[
            File::executable("hello", &support::hello_binary()),
            File::text("tag", tag),
        ],
        config,
    )
    .to_string()
}

fn root(home: &Path, image: &str) -> std::path::PathBuf {
    home.join("rootfs")
        .join(image.strip_prefix("sha256:").unwrap())
}

#[test]
fn unused_roots_are_collected_and_roots_of_instances_are_kept() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let running = support::runtime::hello_image(&home).to_string();
    let exited = other_image(&home, "exited:test");
    let unused = other_image(&home, "unused:test");

    let (stdout, _) = run_ok(&home, &["run", "-d", "hello:test"]);
    let running_id = stdout.trim().to_owned();
    let (stdout, _) = run_ok(&home, &["run", "-d", "exited:test"]);
    let exited_id = stdout.trim().to_owned();
    run_ok(&home, &["stop", "--grace", "0s", &exited_id]);
    let (stdout, _) = run_ok(&home, &["run", "-d", "unused:test"]);
    run_ok(&home, &["rm", "-f", stdout.trim()]);
    for image in [&running, &exited, &unused] {
        assert!(root(&home, image).is_dir());
    }

    let report = json(&home, &["gc", "--json"]);
    let roots: Vec<&str> = report["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(roots, [unused.as_str()], "{report}");
    assert!(report["roots"][0]["bytes"].as_u64().unwrap() > 0);
    assert!(!root(&home, &unused).exists());
    assert!(root(&home, &running).join("hello").is_file());
    assert!(root(&home, &exited).join("hello").is_file());
    // Tagged, so its blobs stay: a new instance unpacks it again.
    let ps = json(&home, &["ps", "--all", "--json"]);
    let status: BTreeMap<&str, &str> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap(),
                i["status"]["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(status[running_id.as_str()], "running", "{ps}");
    let (stdout, _) = run_ok(&home, &["run", "-d", "unused:test"]);
    assert!(root(&home, &unused).join("tag").is_file());
    run_ok(&home, &["rm", "-f", stdout.trim(), &running_id, &exited_id]);

    // Once no instance uses them, they go too.
    let report = json(&home, &["gc", "--json"]);
    assert_eq!(report["roots"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(
        std::fs::read_dir(home.join("rootfs")).unwrap().count(),
        0,
        "nothing is left under rootfs"
    );
}

#[test]
fn dirs_of_removed_instances_beyond_retention_are_collected() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    support::runtime::hello_image(&home);
    let instances = home.join("instances");

    // A removed instance leaves nothing there: its output is in the log store.
    let (stdout, _) = run_ok(&home, &["run", "-d", "hello:test"]);
    let removed = stdout.trim().to_owned();
    run_ok(&home, &["rm", "-f", &removed]);
    assert!(!instances.join(&removed).exists());
    assert!(
        home.join("logs/_run")
            .join(&removed)
            .join("meta.json")
            .is_file()
    );
    // Directories from a graven before the log store: a log and no state. One within the
    // store's age (with a file a removal cut short left beside it), one past it.
    let recent = instances.join("000000000001");
    let old = instances.join("000000000002");
    for (dir, age) in [(&recent, 3600), (&old, 8 * 24 * 3600)] {
        std::fs::create_dir(dir).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        log.set_modified(SystemTime::now() - Duration::from_secs(age))
            .unwrap();
    }
    std::fs::write(recent.join("shim.json"), "{}").unwrap();
    // What a start that died left: no state, no log.
    let dead_start = instances.join("00000000dead");
    std::fs::create_dir_all(dead_start.join("mnt")).unwrap();
    // A running instance is never touched.
    let (stdout, _) = run_ok(&home, &["run", "-d", "hello:test"]);
    let running = stdout.trim().to_owned();

    let report = json(&home, &["gc", "--json"]);
    let mut names: Vec<String> = report["instance_dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["000000000001/shim.json", "000000000002", "00000000dead"],
        "{report}"
    );
    assert!(!dead_start.exists() && !old.exists());
    assert!(recent.join("log").is_file());
    assert!(!recent.join("shim.json").exists());
    assert!(instances.join(&running).join("state.json").is_file());
    run_ok(&home, &["rm", "-f", &running]);
}

/// A start under way (holding the start lock, its directory made but its state not yet
/// written, its image being unpacked) is never collected: gc waits for it. Without the lock
/// gc would take the half-made directory for what a dead start left.
#[test]
fn gc_waits_for_a_start_under_way() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    run_ok(&home, &["ps"]);
    let starting = home.join("instances/0123456789ab");
    let unpacking = home.join("rootfs/.tmp-0123456789ab-x");
    std::fs::create_dir_all(&starting).unwrap();
    std::fs::create_dir_all(unpacking.join("bin")).unwrap();
    let lock = std::fs::File::create(home.join("start.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).unwrap();

    let mut gc = support::graven(&home)
        .args(["gc", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let wchan = format!("/proc/{}/wchan", gc.id());
    support::wait_for(
        Duration::from_secs(30),
        "gc to wait on the start lock",
        || {
            let waiting = std::fs::read_to_string(&wchan).unwrap_or_default();
            waiting.contains("lock").then_some(())
        },
    );
    assert!(gc.try_wait().unwrap().is_none(), "gc did not wait");
    assert!(starting.is_dir() && unpacking.is_dir());

    // The start ended without writing its state (it died): now they are leftovers.
    drop(lock);
    let output = gc.wait_with_output().unwrap();
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(!starting.exists() && !unpacking.exists(), "{report}");
}
