//! `graven up` asked to stop: by SIGTERM before its first rollout has finished, by Ctrl-C
//! after whatever read its output has gone away, and by the hang-up of a closed terminal (as
//! is `graven daemon`). Each time it drains and stops every instance it started before it
//! exits, checked by the processes the instances' states recorded (their PIDs and start times
//! in /proc), not by name.

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use support::daemon::{
    RemoveInstancesOnDrop, Up, demo_instances, recorded_processes, run, run_ok, v1_project,
    version, write_project,
};

/// Waits (bounded) for `child` to exit by itself.
fn exits(child: &mut std::process::Child, deadline: Duration) -> std::process::ExitStatus {
    support::wait_for(deadline, "graven up to exit", || child.try_wait().unwrap())
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped yet, so
    // the PID cannot have been reused.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// After graven exited: no process an instance recorded runs, and the runtime lists none.
fn nothing_left(home: &std::path::Path, recorded: &[support::daemon::Recorded]) {
    let alive: Vec<_> = recorded.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    let left = demo_instances(home);
    assert!(left.is_empty(), "instances left: {left:?}");
}

#[test]
fn sigterm_during_the_first_rollout_stops_every_instance() {
    let (_temp, home, dir, route) = v1_project(2);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    // Instances that never pass their check, within a deadline far away: the first rollout
    // is still starting them when the signal comes.
    write_project(&dir, route, 2, r#"HEALTHY = "0""#, "");
    support::daemon::set_health_deadline(&dir, "10m");
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::copy(support::hello_binary(), dir.join("dist/hello")).unwrap();
    std::fs::copy(
        support::workspace().join("examples/hello/Containerfile"),
        dir.join("Containerfile"),
    )
    .unwrap();

    let mut up = support::graven(&home)
        .args(["up", dir.to_str().unwrap()])
        .env("GRAVEN_RUNTIME", "local")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let recorded = support::wait_for(
        Duration::from_secs(60),
        "two instances running, none healthy",
        || {
            let running = demo_instances(&home)
                .iter()
                .filter(|i| !i.status.is_exited())
                .count();
            let recorded = recorded_processes(&home);
            (running == 2 && recorded.len() == 4).then_some(recorded)
        },
    );
    let (_, status, _) = run(&home, &["status", "--json"]);
    assert!(
        status.contains("\"starting\"") && !status.contains("\"healthy\""),
        "{status}"
    );
    signal(&up, libc::SIGTERM);
    let exited = exits(&mut up, Duration::from_secs(60));
    assert!(
        exited.code().is_some(),
        "graven up ended by the signal: {exited}"
    );
    nothing_left(&home, &recorded);
}

#[test]
fn a_closed_output_pipe_does_not_stop_the_drain() {
    let (_temp, home, dir, _route) = v1_project(2);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let (reader, writer) = std::io::pipe().unwrap();
    let mut up = support::graven(&home)
        .args(["up", dir.to_str().unwrap()])
        .env("GRAVEN_RUNTIME", "local")
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    // Read as `tee` would until graven serves, then go away as `tee` does when it dies first.
    let mut lines = BufReader::new(reader).lines();
    let served = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.contains("graven: serving"));
    assert!(served, "graven up ended before serving");
    drop(lines);
    let recorded = recorded_processes(&home);
    assert_eq!(
        recorded.len(),
        4,
        "two instances, each a shim and a workload"
    );
    signal(&up, libc::SIGINT);
    let exited = exits(&mut up, Duration::from_secs(60));
    assert_eq!(exited.code(), Some(0), "{exited}");
    nothing_left(&home, &recorded);
}

#[test]
fn a_failing_up_with_a_closed_stderr_exits_1_not_101() {
    let temp = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = support::graven(&temp.path().join("home"))
        .args(["up", temp.path().join("no-such-project").to_str().unwrap()])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
}

/// Closing the terminal `graven up` runs in sends it SIGHUP: it drains and stops its
/// instances and closes its route, as Ctrl-C does, instead of dying with them left running
/// unrouted.
#[test]
fn sighup_drains_like_ctrl_c() {
    let (_temp, home, dir, route) = v1_project(2);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let mut up = Up::start(&home, &dir, "local");
    assert_eq!(version(route), Ok("v1".to_owned()));
    let recorded = recorded_processes(&home);
    assert_eq!(
        recorded.len(),
        4,
        "two instances, each a shim and a workload"
    );
    let exited = up.signal(libc::SIGHUP, Duration::from_secs(60));
    assert_eq!(exited.code(), Some(0), "{exited}\n{}", up.stderr());
    assert!(up.stderr().contains("draining"), "{}", up.stderr());
    nothing_left(&home, &recorded);
    assert!(
        std::net::TcpStream::connect(route).is_err(),
        "the route still listens"
    );
}

/// The same for `graven daemon` started from a terminal.
#[test]
fn a_daemon_drains_on_sighup_too() {
    let (_temp, home, dir, route) = v1_project(1);
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    let mut daemon = Up::daemon(&home, "local");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert_eq!(version(route), Ok("v1".to_owned()));
    let recorded = recorded_processes(&home);
    assert_eq!(recorded.len(), 2, "one instance: a shim and a workload");
    let exited = daemon.signal(libc::SIGHUP, Duration::from_secs(60));
    assert_eq!(exited.code(), Some(0), "{exited}\n{}", daemon.stderr());
    nothing_left(&home, &recorded);
}
