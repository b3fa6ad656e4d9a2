//! Phoenix on the local runtime, as users run it (the real binary, `graven up`, real
//! instances): with short ages, every instance of a service under keep-alive load is
//! recycled (condemned for its age, its replacement healthy before it drains) with no failed
//! request, the budget holds all along (sampled from `graven status --json`), and a stateful
//! service that did not opt in is never recycled. The negative control: a window that
//! excludes now recycles nothing, however overdue the instances are.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use graven::events::{CondemnReason, Event, EventLog};
use support::daemon::{Up, free_port, hello_project, run, run_ok};
use support::load::Load;

const CONNECTIONS: usize = 8;
const INSTANCES: usize = 3;
const MAX_AGE: Duration = Duration::from_secs(6);
const JITTER: Duration = Duration::from_secs(3);
/// How soon the controller condemns an instance once it may: due, and (`max_at_once = 1`)
/// the one condemned before it gone. Its rounds are 100 ms apart; the rest is room for a
/// loaded machine.
const REACTION: Duration = Duration::from_secs(5);

fn status(home: &Path) -> Option<Vec<serde_json::Value>> {
    let (ok, stdout, _) = run(home, &["status", "--json"]);
    ok.then(|| serde_json::from_str(&stdout).ok()).flatten()
}

/// The service's instances in `graven status --json`, by name.
fn instances_of(
    status: &[serde_json::Value],
    service: &str,
) -> BTreeMap<String, serde_json::Value> {
    status
        .first()
        .and_then(|s| s["state"]["instances"].as_object())
        .map(|all| {
            all.iter()
                .filter(|(_, i)| i["service"] == service)
                .map(|(name, i)| (name.clone(), i.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn healthy(instances: &BTreeMap<String, serde_json::Value>) -> usize {
    instances
        .values()
        .filter(|i| i["lifecycle"] == "healthy")
        .count()
}

/// Every event of the app's log so far, with its time.
fn events(home: &Path) -> Vec<(u64, Event)> {
    let log = EventLog::open(&graven::api::log_path(home, "demo", "local")).unwrap();
    log.read_after::<Event>(0)
        .unwrap()
        .into_iter()
        .map(|e| (e.at_ms, e.payload))
        .collect()
}

/// The instances condemned for their age, with when.
fn aged(events: &[(u64, Event)]) -> BTreeMap<String, u64> {
    events
        .iter()
        .filter_map(|(at, e)| match e {
            Event::InstanceCondemned {
                instance,
                reason: CondemnReason::Aged { .. },
            } => Some((instance.as_str().to_owned(), *at)),
            _ => None,
        })
        .collect()
}

fn settled(home: &Path, web: usize, db: usize) -> BTreeMap<String, serde_json::Value> {
    support::wait_for(Duration::from_secs(60), "the instances healthy", || {
        let status = status(home)?;
        let (w, d) = (instances_of(&status, "web"), instances_of(&status, "db"));
        (w.len() == web && healthy(&w) == web && d.len() == db && healthy(&d) == db).then_some(w)
    })
}

#[test]
fn every_instance_is_recycled_within_its_age_under_load_without_a_failed_request() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    let phoenix = format!(
        "phoenix = {{ max_age = \"{}s\", jitter = \"{}s\" }}",
        MAX_AGE.as_secs(),
        JITTER.as_secs()
    );
    // A stateful service with the same ages but no `stop_first`: never recycled.
    let db = format!(
        "{phoenix}\n\n[services.db]\nport = 8080\nstateful = true\nenv = {{ VERSION = \"db\" }}\n\
         health = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"1s\", healthy_after = 1 }}\n\
         {phoenix}\n"
    );
    hello_project(&dir, route, INSTANCES as u32, r#"VERSION = "v1""#, &db);
    let _up = Up::start(&home, &dir, "local");
    let first = settled(&home, INSTANCES, 1);
    let db_first: Vec<String> = instances_of(&status(&home).unwrap(), "db")
        .into_keys()
        .collect();

    // `status` shows each instance's age and when it is due (none for the stateful one).
    let shown = status(&home).unwrap();
    for (name, instance) in instances_of(&shown, "web") {
        assert!(instance["age_ms"].is_u64(), "{name}: {instance}");
        assert!(instance["recycle_due_ms"].is_u64(), "{name}: {instance}");
    }
    for (name, instance) in instances_of(&shown, "db") {
        assert!(instance["age_ms"].is_u64(), "{name}: {instance}");
        assert!(
            instance.get("recycle_due_ms").is_none(),
            "{name}: {instance}"
        );
    }
    let (text, _) = run_ok(&home, &["status"]);
    assert!(
        text.contains("recycled in") || text.contains("due for recycling"),
        "{text}"
    );

    let load = Load::start(route, CONNECTIONS);
    // Sampled all along: never more than `instances + max_at_once` alive (draining ones
    // included), never fewer than `instances - max_unavailable` healthy.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (home, stop) = (home.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut most_alive, mut fewest_healthy, mut samples) = (0, usize::MAX, 0);
            while !stop.load(Ordering::Relaxed) {
                if let Some(status) = status(&home) {
                    let web = instances_of(&status, "web");
                    most_alive = most_alive.max(web.len());
                    fewest_healthy = fewest_healthy.min(healthy(&web));
                    samples += 1;
                }
            }
            (most_alive, fewest_healthy, samples)
        })
    };

    // Every first instance condemned for its age and gone, and INSTANCES healthy others.
    support::wait_for(Duration::from_secs(120), "every instance recycled", || {
        let status = status(&home)?;
        let web = instances_of(&status, "web");
        let replaced = web.keys().all(|name| !first.contains_key(name));
        (replaced && web.len() == INSTANCES && healthy(&web) == INSTANCES).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let (most_alive, fewest_healthy, samples) = sampler.join().unwrap();
    let report = load.stop();

    let log = events(&home);
    let condemned = aged(&log);
    // When each instance had the event `pick` finds for it.
    let when = |pick: fn(&Event) -> Option<&str>| -> BTreeMap<String, u64> {
        log.iter()
            .filter_map(|(at, e)| Some((pick(e)?.to_owned(), *at)))
            .collect()
    };
    let launched = when(|e| match e {
        Event::InstanceLaunched { instance, .. } => Some(instance.as_str()),
        _ => None,
    });
    let gone = when(|e| match e {
        Event::InstanceGone { instance, .. } => Some(instance.as_str()),
        _ => None,
    });
    eprintln!(
        "load {report:?}; {samples} status samples: at most {most_alive} alive, at least \
         {fewest_healthy} healthy"
    );
    // In the order they were condemned: each once due (launch + max_age + an offset under
    // the jitter) and, with max_at_once = 1, once the one condemned before it was gone,
    // whichever is later, and within REACTION of that. (How long each recycle takes is the
    // machine's: it is measured here, not assumed.)
    let phoenix_config = graven::events::PhoenixConfig {
        max_age: MAX_AGE,
        jitter: JITTER,
        window: None,
        max_at_once: 1,
        stop_first: false,
    };
    for name in first.keys() {
        assert!(
            condemned.contains_key(name),
            "{name} was not condemned for its age: {condemned:?}"
        );
    }
    // Every aged condemnation counts for the queue: under load a replacement may come of age
    // before the last first instance is recycled.
    let mut queue: Vec<(u64, &String)> = condemned.iter().map(|(name, at)| (*at, name)).collect();
    queue.sort();
    let mut previous: Option<&String> = None;
    for (at, name) in queue {
        if !first.contains_key(name) {
            previous = Some(name);
            continue;
        }
        let age = Duration::from_millis(at - launched[name]);
        eprintln!("{name} condemned at the age of {age:?}");
        assert!(
            age >= MAX_AGE,
            "{name} recycled at {age:?}, before its max_age"
        );
        // Its due time exactly: the offset under the jitter is a hash of its name.
        let due = launched[name]
            + MAX_AGE.as_millis() as u64
            + graven::controller::plan::phoenix::offset_ms(name, &phoenix_config);
        let free = previous.map_or(0, |before| {
            *gone
                .get(before)
                .unwrap_or_else(|| panic!("{before} was condemned before {name} but never gone"))
        });
        let late = Duration::from_millis(at.saturating_sub(due.max(free)));
        assert!(
            late <= REACTION,
            "{name} condemned {late:?} after it could be (due at {due} ms, the one before it, \
             {previous:?}, gone at {free} ms)"
        );
        previous = Some(name);
    }
    // Each one drained as condemned, never stopped first: its replacement was healthy.
    for name in first.keys() {
        let drained = log.iter().any(|(_, e)| {
            matches!(e, Event::InstanceDraining { instance, reason: graven::events::DrainReason::Condemned { reason: CondemnReason::Aged { .. } } } if instance.as_str() == name)
        });
        assert!(drained, "{name} was not drained as condemned for its age");
    }
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(report.total > 200, "the load ran: {report:?}");
    assert!(samples > 10, "status was sampled: {samples}");
    assert!(
        most_alive <= INSTANCES + 1,
        "{most_alive} instances alive at once (max_at_once = 1)"
    );
    assert!(
        fewest_healthy >= INSTANCES,
        "{fewest_healthy} healthy at the lowest (max_unavailable = 0)"
    );
    // The stateful service, due many times over by now, still runs its first instance.
    let db_now: Vec<String> = instances_of(&status(&home).unwrap(), "db")
        .into_keys()
        .collect();
    assert_eq!(db_now, db_first, "the stateful service was replaced");
    let db_condemned: BTreeSet<&String> = condemned
        .keys()
        .filter(|name| name.starts_with("db-"))
        .collect();
    assert!(db_condemned.is_empty(), "{db_condemned:?}");
}

#[test]
fn nothing_is_recycled_outside_the_window_however_overdue() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    // A window from two to three hours from now, UTC: now is outside it.
    let minute = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        % 1440) as u16;
    let hm = |m: u16| format!("{:02}:{:02}", m % 1440 / 60, m % 60);
    let window = format!("{}-{}", hm(minute + 120), hm(minute + 180));
    hello_project(
        &dir,
        route,
        2,
        r#"VERSION = "v1""#,
        &format!("phoenix = {{ max_age = \"2s\", window = \"{window}\" }}"),
    );
    let _up = Up::start(&home, &dir, "local");
    let first = settled(&home, 2, 0);
    // Overdue by three seconds each (thirty planning rounds): still nothing recycled.
    support::wait_for(Duration::from_secs(60), "the instances overdue", || {
        let status = status(&home)?;
        let web = instances_of(&status, "web");
        let replaced: Vec<&String> = web.keys().filter(|n| !first.contains_key(*n)).collect();
        assert!(
            replaced.is_empty(),
            "{replaced:?} launched outside the window"
        );
        web.values()
            .all(|i| i["age_ms"].as_u64().is_some_and(|age| age > 5_000))
            .then_some(())
    });
    let (text, _) = run_ok(&home, &["status"]);
    assert!(text.contains("due for recycling"), "{text}");
    assert!(text.contains(&format!("window {window} UTC")), "{text}");
    let now = instances_of(&status(&home).unwrap(), "web");
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "an instance was replaced outside the window"
    );
    assert!(aged(&events(&home)).is_empty());
}
