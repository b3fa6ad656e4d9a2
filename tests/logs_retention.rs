//! The log store's retention, through the real binary: a service's (here `graven run`'s
//! group's) logs are bounded by size, the oldest removed instances' going first and
//! another group's (as the controller gives each service) untouched; `graven gc` applies
//! every group's bound, by age too; a live instance over its share loses its oldest lines
//! only, by a hole punched in its data file. A service's age bound is its own
//! (`limits.log_age`, `graven run --log-age`).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use graven::runtime::local::retention::LOG_GROUP;
use graven::runtime::{InstanceSpec, LocalRuntime, Runtime};
use support::daemon::{block_on, run_ok};

/// The sources of a group, by name, with the bytes they hold.
fn sources(home: &Path, group: &str) -> BTreeMap<String, u64> {
    let dir = home.join("logs").join(group);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("meta.json").is_file())
        .map(|e| {
            let bytes = ["out", "err"]
                .iter()
                .map(|f| std::fs::metadata(e.path().join(f)).map_or(0, |m| m.len()))
                .sum();
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect()
}

fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                disk_usage(&path)
            } else {
                e.metadata().map_or(0, |m| m.blocks() * 512)
            }
        })
        .sum()
}

#[test]
fn a_services_logs_are_bounded_by_size_oldest_instances_first_and_per_group() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::bake_debian_base(&home, temp.path());

    // One removed instance of another group, as the controller labels a service's.
    graven::sandbox::set_helper_binary(support::graven_bin());
    let runtime = LocalRuntime::open(&home).unwrap();
    let image = runtime.store().resolve("base:test").unwrap();
    let mut spec = InstanceSpec::new(image);
    spec.command = Some(vec!["/bin/sh".into(), "-c".into(), "echo other".into()]);
    spec.labels = BTreeMap::from([(LOG_GROUP.to_owned(), "demo/local/web".to_owned())]);
    let other = block_on(async {
        let instance = runtime.start(spec).await.unwrap();
        runtime.logged(&instance.id).await.unwrap();
        runtime.remove(&instance.id).await.unwrap();
        instance.id.0
    });

    // Each writes 100 KiB; the group keeps 256 KiB: the newest two, and part of a third at
    // most.
    let mut churned = Vec::new();
    for _ in 0..6 {
        let (stdout, _) = run_ok(
            &home,
            &[
                "run",
                "-d",
                "--log-size",
                "256KiB",
                "base:test",
                "--",
                "/bin/sh",
                "-c",
                "head -c 102400 /dev/zero | tr '\\0' x | fold -w 1023",
            ],
        );
        let id = stdout.trim().to_owned();
        support::wait_for(Duration::from_secs(30), "the writer to exit", || {
            let (ps, _) = run_ok(&home, &["ps", "-a", "--json"]);
            let listed: serde_json::Value = serde_json::from_str(&ps).unwrap();
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == id.as_str() && i["status"]["state"] == "exited")
                .then_some(())
        });
        run_ok(&home, &["rm", "-f", &id]);
        churned.push(id);
    }
    let kept = sources(&home, "_run");
    assert!(
        kept.keys().all(|k| churned[3..].contains(k)),
        "only the newest are kept: {kept:?}, churned {churned:?}"
    );
    assert!(
        kept.contains_key(&churned[5]) && kept.contains_key(&churned[4]),
        "{kept:?}"
    );
    assert!(disk_usage(&home.join("logs/_run")) <= 300 << 10);
    assert_eq!(
        sources(&home, "demo/local/web").keys().collect::<Vec<_>>(),
        [&other],
        "another group keeps its own"
    );
    // The newest instance's lines read back whole.
    let (text, _) = run_ok(&home, &["logs", "--instance", &churned[5]]);
    assert_eq!(
        text.lines().count(),
        101,
        "{}",
        &text[..200.min(text.len())]
    );
}

#[test]
fn gc_removes_sources_past_their_age_and_punches_a_live_ones_oldest_lines() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let old = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    let meta = |instance: &str| graven::logs::Meta {
        app: "demo".into(),
        environment: "local".into(),
        service: "web".into(),
        instance: instance.into(),
        ..Default::default()
    };
    let open = |name: &str| {
        graven::logs::Writer::open_with(&home, "demo/local/web", name, &meta(name)).unwrap()
    };
    open("gone").append(old, b"an old line").unwrap();
    let mut live = open("live");
    let line = vec![b'y'; 4095];
    for _ in 0..64 {
        live.append(old, &line).unwrap();
    }
    live.append(SystemTime::now(), b"a new line").unwrap();
    let (dry, _) = run_ok(&home, &["gc", "--dry-run", "--json"]);
    assert!(dry.contains("logs/demo/local/web/gone"), "{dry}");
    assert!(home.join("logs/demo/local/web/gone").is_dir());

    run_ok(&home, &["gc"]);
    assert!(!home.join("logs/demo/local/web/gone").exists());
    let (text, _) = run_ok(&home, &["logs", "web"]);
    assert_eq!(
        text.lines()
            .map(|l| l.split(" | ").nth(1).unwrap())
            .collect::<Vec<_>>(),
        ["a new line"]
    );
    // The live source's old bytes are a hole now, its size unchanged.
    let out = home.join("logs/demo/local/web/live/out");
    let meta = std::fs::metadata(&out).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.len() > 64 * 4096 && meta.blocks() * 512 < 16 << 10,
        "{meta:?}"
    );
    drop(live);
}

#[test]
fn a_services_own_age_bound_lets_gc_remove_its_lines_sooner_than_the_default() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::bake_debian_base(&home, temp.path());
    let run = |age: Option<&str>| {
        let mut args = vec!["run"];
        if let Some(age) = age {
            args.extend(["--log-age", age]);
        }
        args.extend(["base:test", "--", "/bin/sh", "-c", "echo kept-for-a-while"]);
        run_ok(&home, &args);
    };
    // One instance with the default bound (7 days), then one whose group is given 1 s: the
    // group's policy is the newest instance's, so both lines go once they are a second old.
    run(None);
    let before = sources(&home, "_run");
    assert_eq!(before.len(), 1, "{before:?}");
    run_ok(&home, &["gc"]);
    assert_eq!(sources(&home, "_run").len(), 1, "the default bound kept it");
    run(Some("1s"));
    assert_eq!(sources(&home, "_run").len(), 2);
    support::wait_for(
        Duration::from_secs(30),
        "gc removing the group's lines past its 1 s bound",
        || {
            run_ok(&home, &["gc"]);
            sources(&home, "_run").is_empty().then_some(())
        },
    );
}
