//! No line lost, none duplicated: a worker writes numbered lines to stdout as fast as it
//! can and, after each write returned, records the number in a file on a volume (one per
//! instance). Its workload is killed -9, then a new instance's shim, then `graven up`
//! itself, which is started again. Read back with `graven logs --json`, every instance's
//! lines are 1..M exactly once, with M at least the last number it recorded. The negative
//! control: with one instance's data file punched out or removed, the same check fails.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use support::daemon::{Up, demo_instances, run_ok};

fn project(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        format!("FROM docker-archive:{}\n", support::debian_base().display()),
    )
    .unwrap();
    // The record is written after the line's write returned: whatever the record says was
    // written is in the store.
    let script = r#"h=$(cat /proc/sys/kernel/hostname); i=0; while :; do i=$((i+1)); echo \"line $i\"; echo $i > /data/$h.tmp && mv /data/$h.tmp /data/$h; done"#;
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "demo"

[services.writer]
command = ["/bin/sh", "-c", "{script}"]
volumes = {{ data = "/data" }}
deploy = {{ max_surge = 1, max_unavailable = 0, health_deadline = "90s" }}
stop_grace = "1s"
"#
        ),
    )
    .unwrap();
}

/// The number each instance (by runtime id) last recorded.
fn recorded(home: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(home.join("volumes/data"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().into_string().unwrap();
        if name.ends_with(".tmp") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        out.insert(name, text.trim().parse().unwrap());
    }
    out
}

/// `graven logs --json`'s numbers, per instance id, in the order shown.
fn stored(home: &Path) -> BTreeMap<String, Vec<u64>> {
    let (stdout, _) = run_ok(home, &["logs", "--json", "writer"]);
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // A line that is not `line N` (zeros where bytes were punched out) counts as 0.
        let n = v["line"]
            .as_str()
            .unwrap()
            .strip_prefix("line ")
            .unwrap_or("");
        out.entry(v["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(n.parse().unwrap_or(0));
    }
    out
}

/// Every instance that recorded a number has 1..M in the store, in order, each once, with
/// M at least what it recorded.
fn check(
    recorded: &BTreeMap<String, u64>,
    stored: &BTreeMap<String, Vec<u64>>,
) -> Result<(), String> {
    for (id, &last) in recorded {
        let lines = stored.get(id).map_or(&[][..], Vec::as_slice);
        let m = lines.len() as u64;
        if m < last {
            return Err(format!("{id}: recorded {last}, stored {m} lines"));
        }
        if let Some((i, n)) = lines.iter().enumerate().find(|&(i, &n)| n != i as u64 + 1) {
            return Err(format!("{id}: line {} is {n}", i + 1));
        }
    }
    Ok(())
}

fn running(home: &Path) -> Vec<graven::runtime::Instance> {
    demo_instances(home)
        .into_iter()
        .filter(|i| !i.status.is_exited())
        .collect()
}

/// Waits until one instance that is not in `before` runs and has recorded a few thousand
/// lines; returns its id.
fn a_new_writer(home: &Path, before: &[String]) -> String {
    support::wait_for(Duration::from_secs(120), "a new writer writing", || {
        let id = running(home)
            .into_iter()
            .map(|i| i.id.0)
            .find(|id| !before.contains(id))?;
        (recorded(home).get(&id).copied().unwrap_or(0) > 2000).then_some(id)
    })
}

fn kill(pid: u32) {
    // SAFETY: kill(2) of a process the runtime or this test just reported, still running.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn shim_pid(home: &Path, id: &str) -> u32 {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.join("instances").join(id).join("state.json")).unwrap(),
    )
    .unwrap();
    state["shim"]["pid"].as_u64().unwrap() as u32
}

#[test]
fn no_line_is_lost_or_doubled_across_kill_9_of_workload_shim_and_graven() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    project(&dir);
    let mut up = Up::start(&home, &dir, "local");
    let mut seen = Vec::new();

    // The workload, killed -9: the controller replaces it.
    let first = a_new_writer(&home, &seen);
    seen.push(first.clone());
    let pid = running(&home)[0].pid.unwrap();
    kill(pid);

    // The next one's shim, killed -9 (its workload dies with it).
    let second = a_new_writer(&home, &seen);
    seen.push(second.clone());
    kill(shim_pid(&home, &second));

    // `graven up` itself, killed -9 and started again: the instance goes on writing.
    let third = a_new_writer(&home, &seen);
    // The killed shim could not clear its data files' append-only attribute; removing the
    // instance does, or nobody could ever delete them (not even root).
    let second_out = home
        .join("logs/demo/local/writer")
        .join(&second)
        .join("out");
    support::wait_for(
        Duration::from_secs(30),
        "the killed shim's data files unsealed once its instance is removed",
        || {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(&second_out)
                .unwrap();
            let flags = rustix::fs::ioctl_getflags(&file).unwrap();
            (!flags.contains(rustix::fs::IFlags::APPEND)).then_some(())
        },
    );
    up.signal(libc::SIGKILL, Duration::from_secs(30));
    let _up = Up::start(&home, &dir, "local");
    let before = recorded(&home)[&third];
    support::wait_for(
        Duration::from_secs(30),
        "more lines after the restart",
        || (recorded(&home)[&third] > before + 1000).then_some(()),
    );

    // Recorded first, then read: the store must hold at least what was recorded.
    let recorded = recorded(&home);
    let kept = stored(&home);
    for id in [&first, &second, &third] {
        assert!(
            recorded.contains_key(id),
            "{id} recorded nothing: {recorded:?}"
        );
    }
    check(&recorded, &kept).unwrap();

    // The negative control: an instance's data file punched out, then removed, fails it.
    let out = home.join("logs/demo/local/writer").join(&first).join("out");
    let file = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    let flags = rustix::fs::ioctl_getflags(&file).unwrap();
    rustix::fs::ioctl_setflags(&file, flags - rustix::fs::IFlags::APPEND).unwrap();
    rustix::fs::fallocate(
        &file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        4096,
        4096,
    )
    .unwrap();
    assert!(
        check(&recorded, &stored(&home)).is_err(),
        "a punched-out range went unnoticed"
    );
    std::fs::remove_file(&out).unwrap();
    assert!(
        check(&recorded, &stored(&home)).is_err(),
        "a removed data file went unnoticed"
    );
}
