//! A named volume is owned by at most one live instance: a second `graven run -v` on it is
//! refused naming the volume and its holder, `graven volumes` shows the holder and `volume
//! rm` refuses; a kill -9 of the holder's shim frees it only once its workload is gone; and a
//! controller (`graven up`) cannot start its service on a volume a hand-started instance
//! holds, before or after it is killed and started again.

mod support;

use std::time::Duration;

use support::daemon::{RemoveInstancesOnDrop, Up, free_port, hello_project, run, run_ok};

fn json(home: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let (stdout, _) = run_ok(home, args);
    serde_json::from_str(&stdout).unwrap()
}

/// The shim and workload an instance's state records: (pid, start) each.
fn processes(
    home: &std::path::Path,
    id: &str,
) -> (support::daemon::Recorded, support::daemon::Recorded) {
    let text = std::fs::read_to_string(home.join("instances").join(id).join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let recorded = |key: &str| support::daemon::Recorded {
        pid: state[key]["pid"].as_u64().unwrap() as u32,
        start: state[key]["start"].as_u64().unwrap(),
    };
    (recorded("shim"), recorded("workload"))
}

fn holders(home: &std::path::Path) -> Vec<String> {
    let listed = json(home, &["volumes", "--json"]);
    listed[0]["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_second_instance_on_a_held_volume_is_refused_until_the_first_workload_is_gone() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::runtime::hello_image(&home);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let start = |volume: &str| {
        let mount = format!("{volume}:/data");
        run(&home, &["run", "-d", "--json", "-v", &mount, "hello:test"])
    };

    let (ok, stdout, stderr) = start("data");
    assert!(ok, "{stderr}");
    let first: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let first = first["id"].as_str().unwrap().to_owned();

    // Refused, saying which volume and who holds it; another volume is no obstacle.
    let (ok, _, stderr) = start("data");
    assert!(!ok, "a second instance started on the held volume");
    assert!(
        stderr.contains("volume \"data\" is in use by") && stderr.contains(&first),
        "{stderr}"
    );
    let (ok, _, stderr) = start("other");
    assert!(ok, "{stderr}");
    assert_eq!(holders(&home), vec![first.clone()]);
    let (ok, _, stderr) = run(&home, &["volume", "rm", "data"]);
    assert!(!ok && stderr.contains("in use by"), "{stderr}");

    // The shim killed: the volume is free only once its workload is gone, and the next
    // start takes it then.
    let (shim, workload) = processes(&home, &first);
    // SAFETY: kill of the shim this test started, by its recorded PID.
    assert_eq!(unsafe { libc::kill(shim.pid as i32, libc::SIGKILL) }, 0);
    let (ok, stdout, stderr) = start("data");
    assert!(ok, "{stderr}");
    assert!(
        !workload.alive(),
        "a second workload started beside the first"
    );
    let second: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let second = second["id"].as_str().unwrap().to_owned();
    assert_eq!(holders(&home), vec![second.clone()]);

    // Stopped: free again, for a start as for `volume rm`'s lock.
    run_ok(&home, &["stop", "--grace", "5s", &second]);
    assert_eq!(holders(&home), Vec::<String>::new());
    let (ok, _, stderr) = start("data");
    assert!(ok, "{stderr}");
}

#[test]
fn a_controller_started_again_cannot_start_its_service_on_a_volume_held_by_hand() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    hello_project(
        &dir,
        free_port(),
        1,
        r#"VERSION = "v1""#,
        "volumes = { data = \"/data\" }",
    );
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let mut up = Up::start(&home, &dir, "local");
    let owner = holders(&home);
    assert_eq!(owner.len(), 1, "the service's instance holds its volume");
    let listed = json(&home, &["ps", "--json"]);
    let image = listed[0]["image"].as_str().unwrap().to_owned();

    // graven killed: its instance runs on, and a hand start on the volume is refused.
    up.signal(libc::SIGKILL, Duration::from_secs(10));
    drop(up);
    let (ok, _, stderr) = run(&home, &["run", "-d", "-v", "data:/data", &image]);
    assert!(!ok && stderr.contains("in use by"), "{stderr}");
    assert_eq!(holders(&home), owner);

    // The other way round: the service's instance removed behind graven's back, one
    // started by hand takes the volume, and graven started again cannot start the service
    // beside it: its start is refused, naming the volume.
    run_ok(&home, &["rm", "-f", &owner[0]]);
    let started = json(&home, &["run", "-d", "--json", "-v", "data:/data", &image]);
    let by_hand = started["id"].as_str().unwrap().to_owned();
    let _up = Up::start(&home, &dir, "local");
    let mut seen = String::new();
    let refused = support::try_wait_for(Duration::from_secs(30), || {
        let (_, stdout, stderr) = run(&home, &["history"]);
        seen = stdout + &stderr;
        seen.contains("volume \"data\" is in use by").then_some(())
    });
    assert!(refused.is_some(), "no refused start in the history: {seen}");
    assert_eq!(holders(&home), vec![by_hand]);
}
