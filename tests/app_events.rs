//! The app event log: an event-sourced app (examples/ledger) keeps its state across deploys,
//! kills and rollbacks with nothing but the log; the HTTP API, driven with curl, answers bad
//! input clearly; concurrent appenders with expected sequences lose and duplicate nothing;
//! a kill -9 of graven in the middle of appends loses no acknowledged event; an instance that
//! reads slowly is routed to only once it has caught up (`events_caught_up`), and a deploy
//! under load with the check fails no request.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::daemon::{Up, free_port, recorded_processes, run_ok};
use support::{ledger_binary, wait_for};

/// A project of the ledger example with two instances behind `route`, gated by
/// `events_caught_up`.
fn ledger_project(dir: &Path, route: SocketAddr, version: &str) {
    ledger_project_with(dir, route, version, true, "");
}

/// The ledger project with `events_caught_up` as given and `env` (TOML pairs) added.
fn ledger_project_with(dir: &Path, route: SocketAddr, version: &str, gated: bool, env: &str) {
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::copy(ledger_binary(), dir.join("dist/ledger")).unwrap();
    std::fs::copy(
        support::workspace().join("examples/ledger/Containerfile"),
        dir.join("Containerfile"),
    )
    .unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "demo"

[services.ledger]
instances = 2
route = "{route}"
env = {{ VERSION = "{version}"{env} }}
health = {{ path = "/healthz", interval = "100ms", timeout = "1s", healthy_after = 1, unhealthy_after = 3, events_caught_up = {gated} }}
deploy = {{ strategy = "rolling", max_surge = 1, max_unavailable = 0, health_deadline = "60s" }}
stop_grace = "2s"
"#
        ),
    )
    .unwrap();
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(70)))?;
    let body = json.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The loopback address of the daemon's app event log, and the URL path prefix of `demo` in
/// `local` (with its token), as an instance on the host network would be given them.
fn endpoint(home: &Path) -> (SocketAddr, String) {
    let port: u16 = std::fs::read_to_string(home.join("app-events.port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let token = std::fs::read_to_string(home.join("apps/demo/local/app-events.token")).unwrap();
    (
        SocketAddr::from(([127, 0, 0, 1], port)),
        format!("/v1/demo/local/{}", token.trim()),
    )
}

/// How far instance `name` of `demo/local` has read, as the app event log says when asked
/// with that instance's token.
fn read_by(home: &Path, name: &str) -> u64 {
    let (addr, prefix) = endpoint(home);
    let env_token = prefix.rsplit('/').next().unwrap();
    let token = graven::app_events::server::instance_token(env_token, "demo", "local", name);
    let (status, body) = http(addr, "GET", &format!("/v1/demo/local/{token}"), None).unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["instance"].as_str(), Some(name), "{body}");
    answer["read"]
        .as_u64()
        .unwrap_or_else(|| panic!("no read in {body}"))
}

fn totals_through(route: SocketAddr, times: usize) -> Vec<String> {
    (0..times)
        .map(|_| http(route, "GET", "/", None).map_or_else(|e| e.to_string(), |(_, body)| body))
        .collect()
}

/// Waits until every answer of the route (both instances) shows `expected`.
fn wait_for_total(route: SocketAddr, expected: &str) {
    wait_for(Duration::from_secs(30), expected, || {
        totals_through(route, 12)
            .iter()
            .all(|t| t == expected)
            .then_some(())
    });
}

/// A daemon in a scratch dir with the ledger project (`ledger_project`, release v1) up
/// behind a route of its own.
struct Ledger {
    home: PathBuf,
    dir: PathBuf,
    route: SocketAddr,
    up: Up,
    /// Dropped last: the daemon stops before its home is deleted.
    _temp: tempfile::TempDir,
}

impl Ledger {
    /// Up, then one append through the route per number of `adds` (adding it), which every
    /// instance is then seen to hold.
    fn start(adds: impl IntoIterator<Item = u64>) -> Ledger {
        let temp = tempfile::tempdir().unwrap();
        let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
        let route = free_port();
        ledger_project(&dir, route, "v1");
        let up = Up::start(&home, &dir, "local");
        let (mut total, mut events) = (0, 0);
        for n in adds {
            let (status, body) = http(route, "POST", &format!("/add?n={n}"), None).unwrap();
            assert_eq!(status, 200, "{body}");
            (total, events) = (total + n, events + 1);
        }
        if events > 0 {
            wait_for_total(route, &format!("total {total} after event {events}"));
        }
        Ledger {
            home,
            dir,
            route,
            up,
            _temp: temp,
        }
    }

    /// The app event log's address and `demo/local`'s path prefix (`endpoint`).
    fn endpoint(&self) -> (SocketAddr, String) {
        endpoint(&self.home)
    }
}

#[test]
fn an_event_sourced_app_keeps_its_state_across_deploys_kills_and_rollbacks() {
    let ledger = Ledger::start(1..=10);
    let (home, dir, route) = (&ledger.home, &ledger.dir, ledger.route);

    // A new release: new instances rebuild the total from the log alone.
    ledger_project(dir, route, "v2");
    run_ok(home, &["deploy", dir.to_str().unwrap()]);
    wait_for_total(route, "total 55 after event 10");
    http(route, "POST", "/add?n=45", None).unwrap();
    wait_for_total(route, "total 100 after event 11");

    // A kill -9 of an instance: its replacement replays the same events.
    let before = recorded_processes(home);
    let workload = before[1];
    assert!(workload.alive());
    // SAFETY: kill(2) of a PID the instance's state records, checked alive just before by
    // its start time.
    unsafe { libc::kill(workload.pid as i32, libc::SIGKILL) };
    wait_for(
        Duration::from_secs(30),
        "the killed instance's replacement",
        || {
            let now = recorded_processes(home);
            (!now.contains(&workload) && now.len() >= 4).then_some(())
        },
    );
    wait_for_total(route, "total 100 after event 11");

    // A rollback to the first release: the same state, since the state is in no release.
    run_ok(home, &["rollback"]);
    wait_for_total(route, "total 100 after event 11");

    // People see the same events.
    let (stdout, _) = run_ok(
        home,
        &["events", "tail", "--app", "demo", "--from", "1", "--json"],
    );
    let adds: Vec<i64> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["body"]["add"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(adds, (1..=10).chain([45]).collect::<Vec<_>>());
}

/// curl with the body and status split: (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

#[test]
fn the_api_answers_bad_input_clearly_and_loses_nothing() {
    let ledger = Ledger::start([]);
    let (home, (addr, prefix)) = (&ledger.home, ledger.endpoint());
    let url = |path: &str| format!("http://{addr}{prefix}{path}");
    let post = |path: &str, body: &str| {
        curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            &url(path),
        ])
    };

    let (status, body) = post("/events", r#"{"n":1}"#);
    assert_eq!(
        (status, json(&body)["seq"].as_u64()),
        (201, Some(1)),
        "{body}"
    );
    // Optimistic concurrency: expecting 0 when 1 is last is a conflict that says what is.
    let (status, body) = post("/events?expected=0", r#"{"n":2}"#);
    assert_eq!(status, 409, "{body}");
    assert_eq!(json(&body)["last"], 1);
    let (status, _) = post("/events?expected=1", r#"{"n":2}"#);
    assert_eq!(status, 201);
    // A body that claims to be JSON and is not; one over the size limit.
    assert_eq!(post("/events", "{not json").0, 400);
    let big = home.join("big");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1]).unwrap();
    let (status, _) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", big.display()),
        &url("/events"),
    ]);
    assert_eq!(status, 413);
    // Another app's token, and an app that does not exist.
    let wrong = format!("http://{addr}/v1/demo/local/{}/events", "0".repeat(64));
    assert_eq!(curl(&[&wrong]).0, 403);
    // An instance's token: one of this app's opens it and says how far that instance has
    // read. A live ledger instance follows the log, asking from 3 once it holds 1 and 2.
    let env_token = prefix.rsplit('/').next().unwrap();
    let token_of =
        |name: &str| graven::app_events::server::instance_token(env_token, "demo", "local", name);
    let progress = |name: &str| read_by(home, name);
    let live = support::daemon::demo_instances(home)
        .into_iter()
        .find_map(|i| i.labels.get(graven::controller::LABEL_INSTANCE).cloned())
        .expect("a ledger instance");
    wait_for(
        Duration::from_secs(30),
        "a live instance to have read 2",
        || (progress(&live) == 2).then_some(()),
    );
    // A name that is no live instance's: its token opens the log (a token is all the server
    // checks), and what it said it read is forgotten at the controller's next look, as a
    // removed instance's is.
    let gone = format!("http://{addr}/v1/demo/local/{}", token_of("x-1-1"));
    assert_eq!(curl(&[&format!("{gone}/events?from=3")]).0, 200);
    wait_for(
        Duration::from_secs(30),
        "x-1-1's read to be forgotten",
        || (progress("x-1-1") == 0).then_some(()),
    );
    let forged = format!("x-1-1.{}", "0".repeat(64));
    let other = graven::app_events::server::instance_token(env_token, "other", "local", "x-1-1");
    for token in [forged, other] {
        let (status, body) = curl(&[&format!("http://{addr}/v1/demo/local/{token}/events")]);
        assert_eq!(status, 403, "{body}");
        assert!(
            json(&body)["error"]
                .as_str()
                .is_some_and(|e| e.contains("nor one of its instances'")),
            "{body}"
        );
    }
    assert_eq!(
        curl(&[&format!("http://{addr}/v1/nope/local/x/events")]).0,
        404
    );

    // Reads: from 1, and past the end (nothing, with where the end is).
    let (status, body) = curl(&[&url("/events?from=1")]);
    assert_eq!(status, 200);
    let page = json(&body);
    assert_eq!(page["events"][1]["body"]["n"], 2);
    assert_eq!(
        (page["next"].as_u64(), page["last"].as_u64()),
        (Some(3), Some(2))
    );
    let page = json(&curl(&[&url("/events?from=50")]).1);
    assert_eq!(page["events"].as_array().unwrap().len(), 0);
    assert_eq!(page["last"], 2);

    // A long poll is answered by the next append.
    let waiting = {
        let url = url("/events?from=3&wait=30s");
        std::thread::spawn(move || curl(&[&url]))
    };
    std::thread::sleep(Duration::from_millis(300));
    post("/events", r#"{"n":3}"#);
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(json(&body)["events"][0]["body"]["n"], 3);

    // Snapshot, compaction, and a read from before it.
    let (status, _) = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "state as of 2",
        &url("/snapshot?seq=2"),
    ]);
    assert_eq!(status, 200);
    assert_eq!(
        curl(&["-X", "PUT", "--data-binary", "x", &url("/snapshot?seq=9")]).0,
        400
    );
    assert_eq!(
        curl(&[&url("/snapshot")]),
        (200, "state as of 2".to_owned())
    );
    run_ok(home, &["events", "compact", "--app", "demo"]);
    let (status, body) = curl(&[&url("/events?from=1")]);
    assert_eq!(status, 410, "{body}");
    assert_eq!(json(&body)["first"], 3);
    assert_eq!(
        json(&curl(&[&url("/events?from=3")]).1)["events"][0]["body"]["n"],
        3
    );
}

#[test]
fn concurrent_appenders_with_expected_sequences_lose_and_duplicate_nothing() {
    let ledger = Ledger::start([]);
    let (addr, prefix) = ledger.endpoint();
    const WRITERS: usize = 6;
    const EACH: usize = 40;
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let prefix = prefix.clone();
            std::thread::spawn(move || {
                let mut conflicts = 0;
                for i in 0..EACH {
                    loop {
                        let (_, body) =
                            http(addr, "GET", &format!("{prefix}/events?from=999999"), None)
                                .unwrap();
                        let last = json(&body)["last"].as_u64().unwrap();
                        let event = format!(r#"{{"writer":{writer},"i":{i}}}"#);
                        let (status, _) = http(
                            addr,
                            "POST",
                            &format!("{prefix}/events?expected={last}"),
                            Some(&event),
                        )
                        .unwrap();
                        match status {
                            201 => break,
                            409 => conflicts += 1,
                            other => panic!("append answered {other}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let mut seen: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let mut from = 1;
    loop {
        let (_, body) = http(addr, "GET", &format!("{prefix}/events?from={from}"), None).unwrap();
        let page = json(&body);
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        for event in events {
            let key = (
                event["body"]["writer"].as_u64().unwrap(),
                event["body"]["i"].as_u64().unwrap(),
            );
            *seen.entry(key).or_default() += 1;
        }
        from = page["next"].as_u64().unwrap();
    }
    assert_eq!(seen.len(), WRITERS * EACH, "every append is there");
    assert!(seen.values().all(|&n| n == 1), "none twice");
    // Each writer appended in order, which it could only do by winning its expected sequence.
    println!("{conflicts} conflicts answered 409 and retried");
}

#[test]
fn kill_9_of_graven_during_appends_loses_no_acknowledged_event() {
    let mut ledger = Ledger::start([]);
    let (home, (addr, prefix)) = (ledger.home.clone(), ledger.endpoint());
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.clone());
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, String)>::new()));
    let appenders: Vec<_> = (0..4)
        .map(|writer| {
            let prefix = prefix.clone();
            let acknowledged = acknowledged.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let body = format!(r#"{{"writer":{writer},"i":{i}}}"#);
                    match http(addr, "POST", &format!("{prefix}/events"), Some(&body)) {
                        Ok((201, answer)) => {
                            let seq = json(&answer)["seq"].as_u64().unwrap();
                            acknowledged.lock().unwrap().push((seq, body));
                        }
                        // The daemon is gone: whatever was not answered 201 was never promised.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    wait_for(Duration::from_secs(30), "some acknowledged appends", || {
        (acknowledged.lock().unwrap().len() > 200).then_some(())
    });
    ledger.up.signal(libc::SIGKILL, Duration::from_secs(10));
    for appender in appenders {
        appender.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    // Read back after the kill, as a restarted daemon would see the file.
    let (stdout, _) = run_ok(
        &home,
        &["events", "tail", "--app", "demo", "--from", "1", "--json"],
    );
    let stored: BTreeMap<u64, String> = stdout
        .lines()
        .map(|line| {
            let event = json(line);
            (event["seq"].as_u64().unwrap(), event["body"].to_string())
        })
        .collect();
    for (seq, body) in &acknowledged {
        assert_eq!(
            stored.get(seq).map(|b| json(b)),
            Some(json(body)),
            "acknowledged event {seq} is in the log as acknowledged"
        );
    }
    println!(
        "{} acknowledged before the kill, {} in the log",
        acknowledged.len(),
        stored.len()
    );
    // The next daemon on the home serves the same log and appends after it.
    let restarted = Up::daemon(&home, "local");
    let (addr, prefix) = endpoint(&home);
    let (status, answer) = http(addr, "POST", &format!("{prefix}/events"), Some("{}")).unwrap();
    assert_eq!(status, 201);
    assert_eq!(json(&answer)["seq"].as_u64(), Some(stored.len() as u64 + 1));
    drop(restarted);
}

/// What the route answers, sampled as fast as it answers until `done` is set, each with the
/// time it was asked at (as `graven history` prints times, to read a failure against it).
fn sample_route(
    route: SocketAddr,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, String)>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            let answer = http(route, "GET", "/", None).map_or_else(
                |e| format!("error {e}"),
                |(status, body)| format!("{status} {body}"),
            );
            seen.push((at, answer));
        }
        seen
    })
}

/// `graven status --json` of `demo/local`: (instance → (lifecycle, release)) and the
/// instances' `event_reads`.
fn status(home: &Path) -> (BTreeMap<String, (String, u64)>, serde_json::Value) {
    let (stdout, _) = run_ok(home, &["status", "--json"]);
    let snapshots = json(&stdout);
    let snapshot = &snapshots[0];
    let instances = snapshot["state"]["instances"]
        .as_object()
        .map(|all| {
            all.iter()
                .map(|(name, i)| {
                    (
                        name.clone(),
                        (
                            i["lifecycle"].as_str().unwrap_or("").to_owned(),
                            i["release"].as_u64().unwrap_or(0),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (instances, snapshot["event_reads"].clone())
}

/// The route's answers (as `sample_route` keeps them) that do not show the whole log, `full`.
fn behind_the_log<'a>(seen: &'a [(String, String)], full: &str) -> Vec<&'a (String, String)> {
    let whole = format!("200 {full}");
    seen.iter().filter(|(_, answer)| *answer != whole).collect()
}

/// A deploy of the ledger whose new instances read the log 5 events a page with a pause
/// after each: with `events_caught_up` no answer of the route ever shows a total behind the
/// log, and `graven status` shows the new instances catching up; without it (the negative
/// control) the route answers from an instance still replaying.
#[test]
fn a_slow_reader_is_routed_to_only_once_it_has_caught_up() {
    let ledger = Ledger::start(1..=60);
    let (home, dir, route) = (&ledger.home, &ledger.dir, ledger.route);
    let full = "total 1830 after event 60";
    let slow = r#", LEDGER_PAGE = "5", LEDGER_PAGE_PAUSE_MS = "300""#;

    // The negative control: the same slow reader without the check is routed to while it
    // replays, and the route answers with a total behind the log.
    ledger_project_with(dir, route, "v2", false, slow);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_route(route, done.clone());
    run_ok(home, &["deploy", dir.to_str().unwrap()]);
    wait_for_total(route, full);
    // Each of v2's instances has read the whole log before v3 comes, asked of the log: the
    // route's answers alone did not say so. The sampler asks at the same time and takes
    // turns with `wait_for_total`, so twelve answers in a row can all come from one
    // instance while the other is a page behind; that one then answered behind while v3's
    // answers were sampled (seen with the times below, before release 3 was made).
    wait_for(
        Duration::from_secs(60),
        "v2's instances to have read 60",
        || {
            let (instances, _) = status(home);
            let v2: Vec<&String> = instances
                .iter()
                .filter(|(_, (lifecycle, release))| *release == 2 && lifecycle != "draining")
                .map(|(name, _)| name)
                .collect();
            (v2.len() == 2 && v2.iter().all(|name| read_by(home, name) == 60)).then_some(())
        },
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = sampler.join().unwrap();
    let behind = behind_the_log(&seen, full);
    assert!(
        !behind.is_empty(),
        "without events_caught_up some answer should come from an instance still replaying; \
         {} answers all showed the whole log",
        seen.len()
    );
    println!(
        "without the check: {} of {} answers behind the log, e.g. {:?}",
        behind.len(),
        seen.len(),
        behind.first()
    );

    // With the check: never an answer behind the log, and the status shows the new
    // instances catching up (read below their target while starting), then caught up.
    ledger_project_with(dir, route, "v3", true, slow);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_route(route, done.clone());
    let deploy = {
        let (home, dir) = (home.clone(), dir.clone());
        std::thread::spawn(move || run_ok(&home, &["deploy", dir.to_str().unwrap()]))
    };
    let mut catching_up = None;
    while !deploy.is_finished() {
        let (instances, reads) = status(home);
        for (name, (lifecycle, release)) in &instances {
            let read = &reads[name.as_str()];
            if *release == 3
                && lifecycle == "starting"
                && read["target"] == 60
                && read["read"].as_u64().is_some_and(|r| r < 60)
            {
                catching_up.get_or_insert_with(|| (name.clone(), read.clone()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    deploy.join().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = sampler.join().unwrap();
    let behind = behind_the_log(&seen, full);
    if !behind.is_empty() {
        let (_, history, _) = support::daemon::run(home, &["history"]);
        let (_, status, _) = support::daemon::run(home, &["status"]);
        panic!(
            "with events_caught_up every answer shows the whole log; these did not \
             (asked at, answer): {behind:?}\n{history}\n{status}"
        );
    }
    let (name, read) = catching_up.expect("graven status showed a new instance catching up");
    println!(
        "with the check: {} answers, all whole; {name} was seen catching up: {read}",
        seen.len()
    );
    let (instances, reads) = status(home);
    let new: Vec<&String> = instances
        .iter()
        .filter(|(_, (lifecycle, release))| *release == 3 && lifecycle == "healthy")
        .map(|(name, _)| name)
        .collect();
    assert_eq!(new.len(), 2, "{instances:?}");
    for name in new {
        assert!(
            reads[name.as_str()]["read"].as_u64() >= Some(60),
            "{name}: {reads}"
        );
    }
    let (text, _) = run_ok(home, &["status"]);
    assert!(
        text.contains("app event log: read up to event"),
        "graven status shows how far instances read: {text}"
    );
}

/// A deploy under load of the gated ledger: appends and reads through the route fail none,
/// and the new instances hold the state the old ones had plus every acknowledged append.
#[test]
fn a_deploy_under_load_with_events_caught_up_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let ledger = Ledger::start([2; 50]);
    let (home, dir, route) = (&ledger.home, &ledger.dir, ledger.route);

    let done = std::sync::Arc::new(AtomicBool::new(false));
    let added = std::sync::Arc::new(AtomicU64::new(0));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (done, added, failures) = (done.clone(), added.clone(), failures.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    match http(route, "POST", "/add?n=1", None) {
                        Ok((200, _)) => {
                            added.fetch_add(1, Ordering::SeqCst);
                        }
                        other => failures.lock().unwrap().push(format!("add: {other:?}")),
                    }
                }
            })
        })
        .collect();
    let reader = {
        let (done, failures) = (done.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !done.load(Ordering::SeqCst) {
                match http(route, "GET", "/", None) {
                    Ok((200, _)) => reads += 1,
                    other => failures.lock().unwrap().push(format!("read: {other:?}")),
                }
            }
            reads
        })
    };
    ledger_project_with(
        dir,
        route,
        "v2",
        true,
        r#", LEDGER_PAGE = "20", LEDGER_PAGE_PAUSE_MS = "100""#,
    );
    run_ok(home, &["deploy", dir.to_str().unwrap()]);
    done.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().unwrap();
    }
    let reads = reader.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    let added = added.load(Ordering::SeqCst);
    println!("during the deploy: {added} appends and {reads} reads through the route");
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(added > 0 && reads > 0, "the load ran: {added} {reads}");
    // Every instance now is of the new release, and all hold the same state: the old
    // instances' 100 plus every acknowledged append (and nothing else: none was refused).
    let (instances, _) = status(home);
    assert!(
        instances.values().all(|(_, release)| *release == 2),
        "{instances:?}"
    );
    let expected = format!("total {} after event {}", 100 + added, 50 + added);
    wait_for_total(route, &expected);
}

/// `events_caught_up` where instances cannot reach the app event log is refused before
/// anything changes, saying why; and Kubernetes manifests cannot carry it.
#[test]
fn events_caught_up_without_an_event_log_is_refused_clearly() {
    let temp = tempfile::tempdir().unwrap();
    let fake = graven::runtime::FakeRuntime::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _entered = runtime.enter();
    // The in-process controller of these tests serves no app event log.
    let controller = support::daemon::fake_controller(&fake, &temp.path().join("events.db"));
    let mut config = support::daemon::config(1, free_port(), &[]);
    config.health.events_caught_up = true;
    let order = support::daemon::order(vec![support::daemon::release(config)]);
    let error = runtime
        .block_on(controller.deploy(order, "test"))
        .expect_err("the deploy is refused");
    let message = error.to_string();
    assert!(
        message.contains("events_caught_up") && message.contains("cannot reach the app event log"),
        "{message}"
    );
    let state = controller.snapshot().state.clone();
    assert!(
        state.releases.is_empty() && state.instances.is_empty(),
        "nothing recorded"
    );

    let dir = temp.path().join("project");
    ledger_project(&dir, free_port(), "v1");
    let (ok, _, stderr) = support::daemon::run(
        &temp.path().join("home"),
        &[
            "render",
            "--runtime",
            "kubernetes",
            "--registry",
            "registry.example:5000",
            dir.to_str().unwrap(),
        ],
    );
    assert!(!ok, "render refuses it");
    assert!(stderr.contains("events_caught_up"), "{stderr}");
}
