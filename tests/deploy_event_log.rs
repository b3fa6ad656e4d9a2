//! A shortened event log: its last events deleted, or its WAL lost after a crash. `graven up`
//! refuses to start on it, naming the file and the numbers; `graven recover` records the
//! loss, and the next release is numbered after every one ever issued.

mod support;

use std::time::Duration;

use support::daemon::{Up, hello_project, run, run_ok, v1_project};

/// `graven up` that must refuse to start: waits (bounded) for it to exit; its stderr.
fn up_refuses(home: &std::path::Path, dir: &std::path::Path) -> String {
    let mut child = support::graven(home)
        .args(["up", dir.to_str().unwrap()])
        .env("GRAVEN_RUNTIME", "fake")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            // It started on the shortened log: stop it by its PID before failing.
            let _ = child.kill();
            let _ = child.wait();
            panic!("graven up started on a shortened log");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "graven up started on a shortened log");
    stderr
}

/// The release numbers `graven releases --json` lists.
fn releases(home: &std::path::Path) -> Vec<u64> {
    let (stdout, _) = run_ok(home, &["releases", "--json"]);
    let releases: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    releases
        .iter()
        .map(|r| r["number"].as_u64().unwrap())
        .collect()
}

/// Deploys `VERSION = "v<n>"` of the project through the running daemon.
fn deploy(home: &std::path::Path, dir: &std::path::Path, route: std::net::SocketAddr, n: u32) {
    hello_project(dir, route, 1, &format!(r#"VERSION = "v{n}""#), "");
    run_ok(home, &["deploy", dir.to_str().unwrap()]);
}

#[test]
fn a_lost_tail_of_the_event_log_is_refused_and_recovery_reuses_no_release_number() {
    let (_temp, home, dir, route) = v1_project(1);
    let mut up = Up::start(&home, &dir, "fake");
    deploy(&home, &dir, route, 2);
    deploy(&home, &dir, route, 3);
    assert_eq!(releases(&home), [1, 2, 3]);
    assert!(up.signal(libc::SIGTERM, Duration::from_secs(30)).success());

    // Lose the end of the log from release 3's creation on, as a damaged WAL would.
    let log = graven::api::log_path(&home, "demo", "local");
    let db = rusqlite::Connection::open(&log).unwrap();
    let highest: i64 = db
        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
        .unwrap();
    let kept: i64 = db
        .query_row(
            "SELECT seq - 1 FROM events WHERE kind = 'release_created' ORDER BY seq DESC",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute("DELETE FROM events WHERE seq > ?1", [kept])
        .unwrap();
    drop(db);

    hello_project(&dir, route, 1, r#"VERSION = "v4""#, "");
    let refused = up_refuses(&home, &dir);
    assert!(
        refused.contains(&format!("{} ends at event {kept}", log.display()))
            && refused.contains(&format!("records that event {highest} was appended"))
            && refused.contains("graven recover"),
        "{refused}"
    );

    let (recovered, _) = run_ok(&home, &["recover"]);
    assert!(
        recovered.contains(&format!(
            "demo/local: events {} to {highest} were lost",
            kept + 1
        )),
        "{recovered}"
    );
    let _up = Up::start(&home, &dir, "fake");
    let numbers = releases(&home);
    assert_eq!(numbers[..2], [1, 2], "{numbers:?}");
    let newest = *numbers.last().unwrap();
    assert!(
        numbers.len() == 3 && newest > highest as u64,
        "release 3 was lost; the new one is numbered after every event ever appended \
         ({highest}): {numbers:?}"
    );
    let (_, history, _) = run(&home, &["history"]);
    assert!(history.contains("were lost from the log"), "{history}");
}

#[test]
fn a_lost_wal_after_a_crash_is_refused() {
    let (_temp, home, dir, route) = v1_project(1);
    let mut up = Up::start(&home, &dir, "fake");
    deploy(&home, &dir, route, 2);
    // Killed, so SQLite never checkpoints: the newest events are only in the WAL.
    assert!(!up.signal(libc::SIGKILL, Duration::from_secs(30)).success());
    let log = graven::api::log_path(&home, "demo", "local");
    let wal = log.with_file_name("events.db-wal");
    assert!(wal.is_file(), "the crash left the WAL");
    std::fs::remove_file(&wal).unwrap();
    let _ = std::fs::remove_file(log.with_file_name("events.db-shm"));
    let _ = std::fs::remove_file(graven::api::socket_path(&home));

    let refused = up_refuses(&home, &dir);
    assert!(
        refused.contains(&log.display().to_string()) && refused.contains("its end is lost"),
        "{refused}"
    );
    run_ok(&home, &["recover", "--app", "demo", "--env", "local"]);
    let _up = Up::start(&home, &dir, "fake");
    assert_eq!(support::daemon::version(route).as_deref(), Ok("v2"));
}
