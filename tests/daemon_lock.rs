//! One control plane per home: `graven up` and `graven daemon` take the home's control lock
//! before they bind or start anything, and hold it until they have drained and exited. A
//! second one fails at once naming the holder and touches nothing; the kernel frees the lock
//! of a holder killed with SIGKILL, so the next one starts and adopts its instances.

mod support;

use std::time::Duration;

use support::daemon::{Up, demo_instances, run, run_ok, v1_project, version, write_project};

/// What a second control plane on `home` says, given the first's PID and command.
fn refusal(home: &std::path::Path, pid: u32, command: &str) -> String {
    format!(
        "a control plane already runs on {} (pid {pid}, {command}): use `graven deploy` to \
         deploy to it, or stop it first",
        home.display()
    )
}

/// Runs `graven daemon` on `home` and waits (bounded) for it to exit by itself: (exit code,
/// stderr). One still running at the deadline is a second control plane: killed, and the
/// test fails.
fn second_daemon(home: &std::path::Path, runtime: &str) -> (Option<i32>, String) {
    let mut child = support::graven(home)
        .args(["daemon", "--runtime", runtime])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second control plane runs on {}", home.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

/// A daemon asked to stop no longer listens while it drains; a second one started then used
/// to take the socket and adopt the instances being drained. The lock is held until the
/// first has exited.
#[test]
fn a_second_control_plane_is_refused_while_the_first_drains() {
    let (_temp, home, dir, route) = v1_project(1);
    // Instances that ignore SIGTERM: the drain waits out a long grace.
    write_project(&dir, route, 1, r#"IGNORE_SIGTERM = "1""#, "");
    let toml = std::fs::read_to_string(dir.join("graven.toml")).unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        toml.replace(r#"stop_grace = "2s""#, r#"stop_grace = "60s""#),
    )
    .unwrap();
    let mut first = Up::daemon(&home, "fake");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    // SAFETY: kill(2) on the PID of a child this test started and has not reaped (`first`
    // owns it until dropped).
    unsafe { libc::kill(first.pid() as i32, libc::SIGTERM) };
    first.wait_for_line("draining and stopping", Duration::from_secs(20));
    let (code, stderr) = second_daemon(&home, "fake");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&refusal(&home, first.pid(), "graven daemon")),
        "{stderr}"
    );
}

#[test]
fn a_second_daemon_or_up_on_one_home_is_refused_naming_the_holder() {
    let (_temp, home, dir, _route) = v1_project(1);
    let first = Up::daemon(&home, "fake");
    let lock = home.join("control.lock");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&lock).unwrap().mode() & 0o777, 0o600);

    let (code, stderr) = second_daemon(&home, "fake");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&refusal(&home, first.pid(), "graven daemon")),
        "{stderr}"
    );

    let (ok, _, stderr) = run(&home, &["up", dir.to_str().unwrap(), "--runtime", "fake"]);
    assert!(!ok);
    assert!(
        stderr.contains(&refusal(&home, first.pid(), "graven daemon")),
        "{stderr}"
    );
    // The refused `up` baked nothing and deployed nothing; the first still serves.
    let (images, _) = run_ok(&home, &["images"]);
    assert!(!images.contains("demo"), "{images}");
    let (status, _) = run_ok(&home, &["status"]);
    assert!(status.contains("nothing is deployed"), "{status}");
}

#[test]
fn after_kill_9_the_next_control_plane_starts_and_adopts_the_instances() {
    let (_temp, home, dir, route) = v1_project(1);
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.clone());
    let mut first = Up::daemon(&home, "local");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert_eq!(version(route), Ok("v1".to_owned()));
    let running: Vec<String> = demo_instances(&home).into_iter().map(|i| i.id.0).collect();
    assert_eq!(running.len(), 1, "{running:?}");
    let killed = first.pid();
    assert!(
        !first
            .signal(libc::SIGKILL, Duration::from_secs(30))
            .success()
    );
    // The lock file still names the dead holder; only the kernel's lock counted, and it went
    // with the process (the instance's shim, its child, never held it).
    let named = std::fs::read_to_string(home.join("control.lock")).unwrap();
    assert!(named.starts_with(&format!("{killed}\n")), "{named}");

    let _second = Up::daemon(&home, "local");
    support::wait_for(Duration::from_secs(30), "the route to serve again", || {
        (version(route) == Ok("v1".to_owned())).then_some(())
    });
    let (status, _) = run_ok(&home, &["status"]);
    assert!(
        status.contains("healthy") && status.contains(&running[0]),
        "{status}"
    );
    let now: Vec<String> = demo_instances(&home).into_iter().map(|i| i.id.0).collect();
    assert_eq!(now, running, "the same instance serves, adopted");
}
