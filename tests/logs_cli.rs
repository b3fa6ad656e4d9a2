//! `graven logs` through the real binary: every flag on sources of known times; lines of
//! real instances (stdout and stderr, a binary flood with no newline and invalid UTF-8, a
//! workload that tries to truncate or rewrite its log); a full store that recovers; and
//! `-f` across a rolling deploy, showing old and new instances' lines in time order and the
//! old ones' last lines.

mod support;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::daemon::{remove_instances, run, run_ok};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `line` of each JSON object `graven logs --json ARGS` prints.
fn lines(home: &Path, args: &[&str]) -> Vec<String> {
    let (stdout, _) = run_ok(home, &[&["logs", "--json"], args].concat());
    json_lines(&stdout)
        .iter()
        .map(|v| v["line"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_flag_selects_what_it_says() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
    let source = |app: &str, service: &str, release: u64, instance: &str| {
        let meta = graven::logs::Meta {
            app: app.into(),
            environment: "production".into(),
            service: service.into(),
            release: Some(release),
            instance: instance.into(),
            id: format!("id{instance}").replace('-', ""),
            ..Default::default()
        };
        graven::logs::Writer::open_with(
            &home,
            &format!("{app}/production/{service}"),
            &meta.id,
            &meta,
        )
        .unwrap()
    };
    let mut web1 = source("shop", "web", 1, "web-1");
    let mut web2 = source("shop", "web", 2, "web-2");
    let mut worker = source("shop", "worker", 2, "worker-1");
    let mut other = source("blog", "web", 1, "web-1");
    web1.append(at(0), b"web-1 GET /a").unwrap();
    worker.append(at(1), b"worker-1 job 1").unwrap();
    web2.append(at(2), b"web-2 GET /b").unwrap();
    other.append(at(3), b"blog GET /").unwrap();
    web1.append(at(4), b"web-1 ERROR boom").unwrap();
    web2.append(at(5), b"web-2 GET /c").unwrap();
    drop((web1, web2, worker, other));

    assert_eq!(lines(&home, &[]).len(), 6);
    // Merged in time order across sources.
    assert_eq!(
        lines(&home, &["--app", "shop", "web"]),
        [
            "web-1 GET /a",
            "web-2 GET /b",
            "web-1 ERROR boom",
            "web-2 GET /c"
        ]
    );
    assert_eq!(
        lines(&home, &["--app", "shop", "worker"]),
        ["worker-1 job 1"]
    );
    assert_eq!(lines(&home, &["--app", "shop", "web", "worker"]).len(), 5);
    assert_eq!(lines(&home, &["--app", "blog"]), ["blog GET /"]);
    assert_eq!(lines(&home, &["--env", "staging"]), Vec::<String>::new());
    assert_eq!(
        lines(&home, &["--release", "2"]),
        ["worker-1 job 1", "web-2 GET /b", "web-2 GET /c"]
    );
    assert_eq!(
        lines(&home, &["--app", "shop", "--instance", "web-1"]),
        ["web-1 GET /a", "web-1 ERROR boom"]
    );
    assert_eq!(
        lines(&home, &["--tail", "2"]),
        ["web-1 ERROR boom", "web-2 GET /c"]
    );
    assert_eq!(
        lines(&home, &["--grep", "GET /", "--tail", "1"]),
        ["web-2 GET /c"]
    );
    assert_eq!(lines(&home, &["--grep", "ERROR"]), ["web-1 ERROR boom"]);
    assert_eq!(
        lines(&home, &["--regex", "^web-[12] GET /[ab]$"]),
        ["web-1 GET /a", "web-2 GET /b"]
    );
    let rfc = |s: u64| humantime::format_rfc3339(at(s)).to_string();
    assert_eq!(
        lines(&home, &["--since", &rfc(2), "--until", &rfc(4)]),
        ["web-2 GET /b", "blog GET /", "web-1 ERROR boom"]
    );
    assert_eq!(lines(&home, &["--stream", "stderr"]), Vec::<String>::new());
    // A duration: everything is newer than its age plus a minute, and none of it is from
    // the last minute.
    let long_ago = SystemTime::now().duration_since(at(0)).unwrap() + Duration::from_secs(60);
    let ago = format!("{}s", long_ago.as_secs());
    assert_eq!(lines(&home, &["--since", &ago]).len(), 6);
    assert_eq!(lines(&home, &["--since", "1m"]).len(), 0);
    // Every field of a JSON line.
    let (stdout, _) = run_ok(&home, &["logs", "--json", "--tail", "1"]);
    let last = &json_lines(&stdout)[0];
    assert_eq!(last["app"], "shop");
    assert_eq!(last["environment"], "production");
    assert_eq!(last["service"], "web");
    assert_eq!(last["release"], 2);
    assert_eq!(last["instance"], "web-2");
    assert_eq!(last["stream"], "stdout");
    assert_eq!(last["time"], "2023-11-14T22:13:25.000Z");
    // Text when piped: no colour.
    let (text, _) = run_ok(&home, &["logs", "--tail", "1"]);
    assert_eq!(text, "2023-11-14T22:13:25.000Z web/web-2 | web-2 GET /c\n");
    // Bad input is refused, naming it.
    let (ok, _, stderr) = run(&home, &["logs", "--since", "yesterday-ish"]);
    assert!(!ok && stderr.contains("--since yesterday-ish"), "{stderr}");
    let (ok, _, stderr) = run(&home, &["logs", "--regex", "("]);
    assert!(!ok && stderr.contains("--regex ("), "{stderr}");
}

/// Runs `script` with /bin/sh in a `base:test` instance (as `user` when given) to its end,
/// then removes it; returns its id.
fn run_script(home: &Path, user: Option<&str>, script: &str) -> String {
    let mut args = vec!["run", "-d"];
    if let Some(user) = user {
        args.extend(["--user", user]);
    }
    args.extend(["base:test", "--", "/bin/sh", "-c", script]);
    let (stdout, _) = run_ok(home, &args);
    let id = stdout.trim().to_owned();
    support::wait_for(Duration::from_secs(30), "the script to end", || {
        let (ps, _) = run_ok(home, &["ps", "-a", "--json"]);
        let listed: serde_json::Value = serde_json::from_str(&ps).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id.as_str() && i["status"]["state"] == "exited")
            .then_some(())
    });
    run_ok(home, &["rm", &id]);
    id
}

#[test]
fn instances_lines_a_binary_flood_and_a_workload_that_tries_to_rewrite_its_log() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::bake_debian_base(&home, temp.path());
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.clone());

    // Both streams, in order.
    let id = run_script(&home, None, "echo out one; echo err one >&2; echo out two");
    let (stdout, _) = run_ok(&home, &["logs", "--json", "--instance", &id]);
    let got: Vec<(String, String)> = json_lines(&stdout)
        .iter()
        .map(|v| {
            (
                v["stream"].as_str().unwrap().into(),
                v["line"].as_str().unwrap().into(),
            )
        })
        .collect();
    let streams: BTreeMap<&str, Vec<&str>> = got.iter().fold(BTreeMap::new(), |mut m, (s, l)| {
        m.entry(s.as_str())
            .or_insert_with(Vec::new)
            .push(l.as_str());
        m
    });
    assert_eq!(streams["stdout"], ["out one", "out two"]);
    assert_eq!(streams["stderr"], ["err one"]);
    assert_eq!(
        lines(&home, &["--instance", &id, "--stream", "stderr"]),
        ["err one"]
    );

    // 40,000 bytes of 0xff and no newline: 16 KiB pieces, lossy in `line`, exact in hex.
    let id = run_script(
        &home,
        None,
        "head -c 40000 /dev/zero | tr '\\000' '\\377'; echo; echo after",
    );
    let (stdout, _) = run_ok(&home, &["logs", "--json", "--instance", &id]);
    let flood = json_lines(&stdout);
    let sizes: Vec<usize> = flood
        .iter()
        .map(|v| v["line_hex"].as_str().map_or(0, |h| h.len() / 2))
        .collect();
    assert_eq!(sizes, [16384, 16384, 40000 - 2 * 16384, 0]);
    assert!(flood[0]["line"].as_str().unwrap().starts_with('\u{fffd}'));
    assert_eq!(flood[3]["line"], "after");
    let (text, _) = run_ok(&home, &["logs", "--instance", &id, "--grep", "after"]);
    assert!(text.ends_with("| after\n"), "{text}");

    // A workload, as a user that is not root, writes its log through /dev/stdout (as nginx
    // does), and cannot truncate nor rewrite what it wrote: as root graven makes the data
    // files append-only.
    let script = "echo one; echo two >> /dev/stdout; \
        if (: > /dev/stdout); then echo truncated; fi; \
        if truncate -s 0 /proc/self/fd/1; then echo truncated again; fi; \
        if (exec 3<>/dev/stdout); then echo opened read-write; fi; \
        echo three";
    let id = run_script(&home, Some("65534:65534"), script);
    assert_eq!(
        lines(&home, &["--instance", &id, "--stream", "stdout"]),
        ["one", "two", "three"]
    );
    let errors = lines(&home, &["--instance", &id, "--stream", "stderr"]).join("\n");
    assert!(errors.contains("Operation not permitted"), "{errors}");
}

/// A tmpfs mounted by the test, detached when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let target = CString::new(at.as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(
            mounted,
            0,
            "mounting a tmpfs: {}",
            std::io::Error::last_os_error()
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn warnings(home: &Path, id: &str) -> Vec<String> {
    let (ps, _) = run_ok(home, &["ps", "-a", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&ps).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .map(|i| {
            i["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| w.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_full_store_is_said_once_corrupts_nothing_and_ingestion_resumes() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::bake_debian_base(&home, temp.path());
    let _tmpfs = Tmpfs::mount(&home.join("logs"), "2m");
    // Dropped before the tmpfs: a failed assertion leaves no writer running on a detached
    // mount, where nothing could find it.
    let _cleanup = support::daemon::RemoveInstancesOnDrop(home.clone());
    let (stdout, _) = run_ok(
        &home,
        &[
            "run",
            "-d",
            "base:test",
            "--",
            "/bin/sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.005; done",
        ],
    );
    let id = stdout.trim().to_owned();
    let count = |home: &Path| lines(home, &["--instance", &id]).len();
    support::wait_for(Duration::from_secs(30), "lines", || {
        (count(&home) > 50).then_some(())
    });
    // Fill the store's filesystem.
    let filler = home.join("logs/filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&block[..1]).is_ok() {}
    }
    support::wait_for(Duration::from_secs(30), "the full store said", || {
        warnings(&home, &id)
            .iter()
            .any(|w| w.starts_with("log store full since"))
            .then_some(())
    });
    // Readable meanwhile, and whole: line numbers only grow.
    let numbers = |home: &Path| -> Vec<u64> {
        lines(home, &["--instance", &id])
            .iter()
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect()
    };
    let during = numbers(&home);
    assert!(during.windows(2).all(|w| w[0] < w[1]), "{during:?}");
    // Space again: ingestion resumes by itself, said once.
    std::fs::remove_file(&filler).unwrap();
    support::wait_for(Duration::from_secs(30), "ingestion to resume", || {
        (count(&home) > during.len() + 50).then_some(())
    });
    let said = support::wait_for(Duration::from_secs(30), "space again said", || {
        let said = warnings(&home, &id);
        said.iter()
            .any(|w| w.starts_with("log store has space again"))
            .then_some(said)
    });
    assert_eq!(
        said.iter()
            .filter(|w| w.starts_with("log store full since"))
            .count(),
        1,
        "{said:?}"
    );
    let after = numbers(&home);
    assert!(after.windows(2).all(|w| w[0] < w[1]));
    run_ok(&home, &["rm", "-f", &id]);
}

#[test]
fn follow_shows_old_and_new_instances_across_a_rolling_deploy_with_the_old_ones_last_lines() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Containerfile"),
        format!("FROM docker-archive:{}\n", support::debian_base().display()),
    )
    .unwrap();
    let project = |version: &str| {
        let script = match version {
            "broken" => "echo fatal: DATABASE_URL is not set >&2; exit 3".to_owned(),
            _ => format!(
                "trap 'echo bye {version}; exit 0' TERM; echo start {version}; \
                 i=0; while :; do i=$((i+1)); echo tick {version} $i; sleep 0.1; done"
            ),
        };
        std::fs::write(
            dir.join("graven.toml"),
            format!(
                r#"app = "demo"

[services.ticker]
command = ["/bin/sh", "-c", "{script}"]
deploy = {{ max_surge = 1, max_unavailable = 0, health_deadline = "60s" }}
stop_grace = "5s"
"#
            ),
        )
        .unwrap();
    };
    project("v1");
    // The image baked and unpacked beforehand, so `up` serves well within its deadline.
    support::bake_debian_base(&home, temp.path());
    run_script(&home, None, "true");
    let _up = UpSlow::start(&home, &dir);
    let mut follow = support::graven(&home)
        .args(["logs", "-f", "--json", "ticker"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let reader = BufReader::new(follow.stdout.take().unwrap());
    let lines_seen = seen.clone();
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            lines_seen
                .lock()
                .unwrap()
                .push(serde_json::from_str(&line).unwrap());
        }
    });
    let has = |text: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .any(|v| v["line"].as_str().unwrap().starts_with(text))
    };
    support::wait_for(Duration::from_secs(120), "v1 ticking", || {
        has("tick v1").then_some(())
    });
    project("v2");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    support::wait_for(Duration::from_secs(60), "v2 and v1's last line", || {
        (has("start v2") && has("bye v1") && has("tick v2")).then_some(())
    });
    follow.kill().unwrap();
    follow.wait().unwrap();
    let seen = seen.lock().unwrap().clone();
    let times: Vec<&str> = seen.iter().map(|v| v["time"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in time order: {times:?}"
    );
    let release = |v: &serde_json::Value| v["release"].as_u64().unwrap();
    assert!(seen.iter().any(|v| release(v) == 1) && seen.iter().any(|v| release(v) == 2));
    // A release whose instances fail: the deploy shows their last lines beside the failure.
    project("broken");
    let (ok, stdout, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok && stdout.contains("rolled back"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("! fatal: DATABASE_URL is not set"),
        "{stdout}"
    );
    // Every line once, none lost: each instance's ticks are numbered 1, 2, 3...
    let mut ticks: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in &seen {
        let line = v["line"].as_str().unwrap();
        if let Some(n) = line.strip_prefix("tick ").and_then(|t| t.split(' ').nth(1)) {
            let id = v["id"].as_str().unwrap().to_owned();
            ticks.entry(id).or_default().push(n.parse().unwrap());
        }
    }
    assert!(ticks.len() >= 2, "{ticks:?}");
    for (id, numbers) in &ticks {
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, &expected, "{id}: every tick once, in order");
    }
}

/// `graven up DIR`, waited for with a deadline that allows for a loaded machine (the
/// first rollout unpacks the Debian base), killed by its PID and its instances removed
/// when dropped.
struct UpSlow {
    child: std::process::Child,
    home: PathBuf,
}

impl UpSlow {
    fn start(home: &Path, dir: &Path) -> UpSlow {
        let mut child = support::graven(home)
            .arg("up")
            .arg(dir)
            .env("GRAVEN_RUNTIME", "local")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let up = UpSlow {
            child,
            home: home.to_owned(),
        };
        let mut said = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("graven: serving") => return up,
                Ok(line) => said.push(line),
                Err(_) => panic!("graven up did not serve: {}", said.join("\n")),
            }
        }
    }
}

impl Drop for UpSlow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_instances(&self.home);
    }
}
