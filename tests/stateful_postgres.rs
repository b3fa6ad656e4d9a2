//! PostgreSQL from a Debian base as a stateful service (`stateful = true`): its data
//! directory on a named volume, behind a TCP route. A writer inserts rows through the route,
//! each on its own connection, while the service is deployed, rolled back, has its workload
//! killed -9 and has graven itself killed -9 and started again. Every row whose insert was
//! acknowledged is there afterwards, and a sampler looking at /proc every few milliseconds
//! never sees two postmasters on the volume's data directory. The negative control starts
//! two instances on the volume with the lock turned off (a test-only switch) and the same
//! sampler sees both. Each switch's client-visible pause (the longest gap between
//! acknowledged inserts) is printed, not asserted.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::daemon::{RemoveInstancesOnDrop, Up, free_port, run, run_ok};

/// PostgreSQL with its cluster on the volume: made by the first instance, reused by every
/// later one (crash recovery from the WAL when the last one was killed).
const CONTAINERFILE: &str = "\
RUN apt-get update \\
 && apt-get install -y --no-install-recommends postgresql-15 \\
 && rm -rf /var/lib/apt/lists/*
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data/pg
EXPOSE 5432
CMD [\"sh\", \"-c\", \"test -s $PGDATA/PG_VERSION || { initdb -D $PGDATA -U postgres --auth=trust >/dev/null && echo 'host all all 0.0.0.0/0 trust' >> $PGDATA/pg_hba.conf; } && exec postgres -D $PGDATA -k /tmp -c listen_addresses='*'\"]
";

fn project(dir: &Path, route: SocketAddr, version: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        format!(
            "FROM docker-archive:{}\n{CONTAINERFILE}",
            support::debian_base().display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("graven.toml"),
        format!(
            r#"app = "pg"

[services.db]
route = "tcp://{route}"
stateful = true
env = {{ VERSION = "{version}" }}
volumes = {{ pgdata = "/var/lib/postgresql/data" }}
limits = {{ tmp = "256MiB" }}
health = {{ kind = "exec", command = "pg_isready -q -h 127.0.0.1 -p 5432", interval = "100ms", timeout = "2s", healthy_after = 1, unhealthy_after = 3 }}
deploy = {{ health_deadline = "60s" }}
stop_grace = "20s"
"#
        ),
    )
    .unwrap();
}

/// `psql -c SQL` through `route` on a connection of its own: its output, or why it failed.
/// A connection the route holds during a switch waits (up to a minute) rather than failing.
fn psql(route: SocketAddr, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            &route.ip().to_string(),
            "-p",
            &route.port().to_string(),
        ])
        .args(["-U", "postgres", "-tA", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "60")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// The postmasters whose working directory is `data` (by device and inode, as seen from the
/// host whatever mount namespace they run in): processes named `postgres` there, not
/// retitled (`postgres: checkpointer`), whose parent is not a `postgres` process (a
/// postmaster's children are its own, even while a killed one's are being torn down).
fn postmasters(data: (u64, u64)) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if comm.trim_end() != "postgres" {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let child = parent.is_none_or(|parent| {
            std::fs::read_to_string(format!("/proc/{parent}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        });
        let retitled = std::fs::read(path.join("cmdline"))
            .map_or(true, |cmdline| cmdline.starts_with(b"postgres:"));
        if !child
            && !retitled
            && std::fs::metadata(path.join("cwd")).is_ok_and(|m| (m.dev(), m.ino()) == data)
            && let Ok(pid) = name.to_string_lossy().parse::<u32>()
        {
            found.push(pid);
        }
    }
    found
}

/// Samples `postmasters` every few milliseconds on a thread: the most seen at once.
struct Sampler {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Samples>>,
}

/// How many samples were taken, and the longest and 99th-percentile time between two.
struct Samples {
    count: u64,
    longest: Duration,
    p99: Duration,
}

impl Sampler {
    fn start(data: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, most) = (stop.clone(), most.clone());
            std::thread::spawn(move || {
                // The machine is shared with builds: a real-time priority keeps the sampling
                // steady (it sleeps between samples, so it takes little).
                let param = libc::sched_param { sched_priority: 1 };
                // SAFETY: sets this thread's own scheduling policy with a valid parameter.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
                let mut gaps = Vec::new();
                let mut last = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    // The data directory exists once the first instance ran initdb.
                    if let Ok(meta) = std::fs::metadata(&data) {
                        let seen = postmasters((meta.dev(), meta.ino()));
                        if seen.len() >= 2 && most.load(Ordering::SeqCst) < 2 {
                            for pid in &seen {
                                let read = |f: &str| {
                                    std::fs::read_to_string(format!("/proc/{pid}/{f}"))
                                        .unwrap_or_default()
                                        .replace('\0', " ")
                                };
                                eprintln!(
                                    "two postmasters at once, {pid}: {} | {}",
                                    read("cmdline"),
                                    read("stat")
                                );
                            }
                        }
                        most.fetch_max(seen.len(), Ordering::SeqCst);
                    }
                    let now = Instant::now();
                    gaps.push(now - last);
                    last = now;
                    std::thread::sleep(Duration::from_millis(5));
                }
                gaps.sort();
                Samples {
                    count: gaps.len() as u64,
                    longest: gaps.last().copied().unwrap_or_default(),
                    p99: gaps.get(gaps.len() * 99 / 100).copied().unwrap_or_default(),
                }
            })
        };
        Sampler {
            stop,
            most,
            thread: Some(thread),
        }
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> (usize, Samples) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        (self.most(), samples)
    }
}

/// Inserts 1, 2, 3... through the route, each on its own connection, one after another:
/// the acknowledged ids and when each was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(route: SocketAddr) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut id = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    if psql(route, &format!("insert into t values ({id})")).is_ok() {
                        acked.lock().unwrap().push((id, Instant::now()));
                    } else {
                        // Nothing listens (graven is down): try again shortly.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        };
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn acked_since(&self, since: Instant) -> usize {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| *at > since)
            .count()
    }

    /// The longest wait between two acknowledged inserts around `[from, to]`.
    fn pause(&self, from: Instant, to: Instant) -> Duration {
        let acked = self.acked.lock().unwrap();
        acked
            .windows(2)
            .filter(|pair| pair[1].1 >= from && pair[0].1 <= to)
            .map(|pair| pair[1].1 - pair[0].1)
            .max()
            .unwrap_or_default()
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.acked
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }
}

/// The one instance's name and release, once there is exactly one and it is healthy.
fn healthy_instance(home: &Path) -> Option<(String, u64)> {
    let (ok, stdout, _) = run(home, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout).ok().filter(|_| ok)?;
    let instances = status[0]["state"]["instances"].as_object()?;
    let [(name, instance)] = instances.iter().collect::<Vec<_>>()[..] else {
        return None;
    };
    let release = instance["release"].as_u64()?;
    (instance["lifecycle"] == "healthy").then(|| (name.clone(), release))
}

/// Waits until release `release` serves alone (in an instance other than `not`, when
/// given) and the writer got inserts through after that: the switch is over for clients.
fn settled(home: &Path, writer: &Writer, release: u64, not: Option<&str>, what: &str) -> String {
    let mut last = None;
    let mut serving_since = None;
    let done = support::try_wait_for(Duration::from_secs(120), || {
        last = healthy_instance(home);
        let (name, serving) = last.clone()?;
        if serving != release || not == Some(name.as_str()) {
            return None;
        }
        let since = *serving_since.get_or_insert_with(Instant::now);
        (writer.acked_since(since) >= 3).then_some(name)
    });
    match done {
        Some(name) => name,
        None => {
            let (history, _) = run_ok(home, &["history"]);
            panic!("{what}: release {release} never served alone (last {last:?}):\n{history}");
        }
    }
}

/// The running instance's runtime id and image.
fn running(home: &Path) -> (String, String) {
    let (stdout, _) = run_ok(home, &["ps", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let running: Vec<&serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"]["state"] == "running")
        .collect();
    let [instance] = &running[..] else {
        panic!("one instance running: {listed}");
    };
    let id = instance["id"].as_str().unwrap().to_owned();
    (id, instance["image"].as_str().unwrap().to_owned())
}

/// The running instance's workload, as its state records it.
fn workload_pid(home: &Path) -> u32 {
    let (id, _) = running(home);
    let text = std::fs::read_to_string(home.join("instances").join(id).join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["workload"]["pid"].as_u64().unwrap() as u32
}

#[test]
fn postgres_as_a_stateful_service_loses_no_acknowledged_row_and_never_runs_twice() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    let _cleanup = RemoveInstancesOnDrop(home.clone());
    project(&dir, route, "v1");
    let mut daemon = Up::daemon(&home, "local");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    let sampler = Sampler::start(home.join("volumes/pgdata/pg"));
    psql(route, "create table t (id bigint primary key)").unwrap();
    let writer = Writer::start(route);
    let mut pauses: Vec<(&str, Duration)> = Vec::new();

    // A deploy: stop-first, the v2 image prepared while v1 serves.
    let since = Instant::now();
    project(&dir, route, "v2");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    settled(&home, &writer, 2, None, "deploy");
    pauses.push(("deploy v1 -> v2", writer.pause(since, Instant::now())));

    // A rollback, stop-first the same way.
    let since = Instant::now();
    run_ok(&home, &["rollback"]);
    let serving = settled(&home, &writer, 1, None, "rollback");
    pauses.push(("rollback v2 -> v1", writer.pause(since, Instant::now())));

    // The workload killed: self-healing starts another once it is gone.
    let since = Instant::now();
    let workload = workload_pid(&home) as i32;
    // SAFETY: kill of the workload this test's daemon started, by its recorded PID.
    let killed = unsafe { libc::kill(workload, libc::SIGKILL) };
    assert_eq!(killed, 0);
    settled(&home, &writer, 1, Some(&serving), "kill -9 of the workload");
    pauses.push(("kill -9 workload", writer.pause(since, Instant::now())));

    // graven killed and started again: the instance runs on, and is adopted.
    let since = Instant::now();
    assert!(
        !daemon
            .signal(libc::SIGKILL, Duration::from_secs(30))
            .success()
    );
    drop(daemon);
    daemon = Up::daemon(&home, "local");
    settled(&home, &writer, 1, None, "kill -9 of graven");
    pauses.push(("kill -9 graven", writer.pause(since, Instant::now())));

    let acked = writer.finish();
    let stored: std::collections::BTreeSet<u64> = psql(route, "select id from t")
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    let lost: Vec<&u64> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged rows lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    assert!(
        acked.len() > 20,
        "only {} inserts acknowledged",
        acked.len()
    );
    let (_, image) = running(&home);
    run_ok(&home, &["down"]);
    drop(daemon);
    let (most, samples) = sampler.finish();
    for (what, pause) in &pauses {
        println!("client-visible pause, {what}: {} ms", pause.as_millis());
    }
    assert!(samples.count > 100, "{} samples", samples.count);
    assert_eq!(most, 1, "postmasters on the volume at once (at most)");
    println!(
        "{} inserts acknowledged, all stored; {} samples of /proc (p99 {:?}, longest {:?} \
         apart), never two postmasters",
        acked.len(),
        samples.count,
        samples.p99,
        samples.longest
    );

    // The negative control: with the lock off, two instances start on the volume, and the
    // sampler sees two postmasters on one data directory.
    let sampler = Sampler::start(home.join("volumes/pgdata/pg"));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = support::succeed(
            support::graven(&home)
                .env(NO_LOCK, "1")
                .args([
                    "run",
                    "-d",
                    "--json",
                    "-v",
                    "pgdata:/var/lib/postgresql/data",
                ])
                .arg(&image),
        );
        let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(started["id"].as_str().unwrap().to_owned());
    }
    let both = support::try_wait_for(Duration::from_secs(60), || {
        (sampler.most() >= 2).then_some(())
    });
    for id in &ids {
        run_ok(&home, &["rm", "-f", id]);
    }
    let (most, _) = sampler.finish();
    assert!(
        both.is_some(),
        "without the lock the sampler saw at most {most} postmaster(s): it cannot tell"
    );
}

/// The test-only switch that turns the volume lock off (honoured by builds with `dev-tools`).
const NO_LOCK: &str = "GRAVEN_TEST_NO_VOLUME_LOCK";
