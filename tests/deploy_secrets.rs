//! Secrets end to end through the real binary: `graven secrets set/list/rm`, a graven.toml
//! that refers to one, a deploy that pins its version, a workload that sees its value, and
//! nothing else anywhere (outputs, the event log, instance state, any file of the home) that
//! does. And every file the home holds is its owner's alone.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use support::daemon::{Up, free_port, hello_project, run, run_ok, test_runtime};

/// Sets secret `name` of app `demo` (environment `local`) to `value` through stdin.
fn set_secret(home: &Path, dir: &Path, name: &str, value: &str) -> String {
    let mut child = support::graven(home)
        .args(["secrets", "set", name])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // What `echo` would give: the last newline is not part of the value.
    writeln!(child.stdin.take().unwrap(), "{value}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The body of one `GET /` through the route.
fn greeting(route: SocketAddr) -> Result<String, String> {
    let response = support::daemon::get_root(route)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(response),
    }
}

/// A project of app `demo` whose `GREETING` is the secret `greeting`.
fn secret_project(dir: &Path, route: SocketAddr, version: &str) {
    let env = format!(r#"VERSION = "{version}", GREETING = {{ secret = "greeting" }}"#);
    hello_project(dir, route, 1, &env, "");
}

/// Every regular file under `dir`, the secret stores left out.
fn files_outside_the_secret_stores(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() && !kind.is_symlink() {
            if entry.file_name() != "secrets" {
                files_outside_the_secret_stores(&path, out);
            }
        } else if kind.is_file() {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn secret_values_never_leave_the_secret_store() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    secret_project(&dir, route, "v1");
    let first = format!("first-{:016x}", fastrand::u64(..));
    let second = format!("second-{:016x}", fastrand::u64(..));
    let said = set_secret(&home, &dir, "greeting", &first);
    assert!(said.contains("version 1"), "{said}");

    let up = Up::start(&home, &dir, &test_runtime());
    assert_eq!(greeting(route), Ok(format!("{first} from hello v1\n")));

    // Rotating the secret and deploying makes a new release, whose instances see the new
    // value; graven.toml did not change.
    set_secret(&home, &dir, "greeting", &second);
    let (stdout, _) = run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(stdout.contains("release 2 is serving"), "{stdout}");
    assert_eq!(greeting(route), Ok(format!("{second} from hello v1\n")));

    // The releases record the reference: name and version, never the value.
    let (stdout, _) = run_ok(&home, &["releases", "--json"]);
    let releases: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let pinned: Vec<&serde_json::Value> = releases
        .iter()
        .map(|r| &r["config"]["secrets"]["GREETING"])
        .collect();
    assert_eq!(
        pinned,
        [
            &serde_json::json!({"name": "greeting", "version": 1}),
            &serde_json::json!({"name": "greeting", "version": 2})
        ],
        "{stdout}"
    );

    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    for command in [
        &["history", "--json"][..],
        &["history"],
        &["status", "--json"],
        &["status"],
        &["releases", "--json"],
        &["releases"],
        &["ps", "--json"],
        &["ps"],
        &["secrets", "list", "--app", "demo", "--json"],
    ] {
        let (stdout, stderr) = run_ok(&home, command);
        seen.push((format!("graven {}", command.join(" ")), stdout.into_bytes()));
        seen.push((
            format!("graven {} (stderr)", command.join(" ")),
            stderr.into_bytes(),
        ));
    }
    seen.push(("graven up's output".to_owned(), up.stderr().into_bytes()));
    let mut files = Vec::new();
    files_outside_the_secret_stores(&home, &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("events.db")),
        "the walk sees the event log: {files:?}"
    );
    // Instances' states (the DNS server's own `dns/state.json` names only its address).
    let states: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.ends_with("state.json") && f.starts_with(home.join("instances")))
        .collect();
    assert!(!states.is_empty(), "the walk sees instance state");
    for file in &files {
        // A file may vanish between the walk and the read (a removed instance's).
        if let Ok(bytes) = std::fs::read(file) {
            seen.push((file.display().to_string(), bytes));
        }
    }
    for (what, bytes) in &seen {
        for value in [&first, &second] {
            assert!(!contains(bytes, value), "{what} holds the secret's value");
        }
    }
    // The instance's state names the variable, redacted; the test is not vacuous.
    if test_runtime() == "local" {
        let state = std::fs::read_to_string(states[0]).unwrap();
        assert!(state.contains("GREETING=<secret>"), "{state}");
    }
    drop(up);
}

#[test]
fn a_missing_secret_fails_the_deploy_before_anything_is_recorded() {
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    hello_project(&dir, route, 1, r#"VERSION = "v1""#, "");
    let _up = Up::start(&home, &dir, "fake");

    secret_project(&dir, route, "v2");
    let (ok, _, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "service web: secret \"greeting\" is not set in demo/local: graven secrets set greeting"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("bake"), "nothing was built: {stderr}");
    let (stdout, _) = run_ok(&home, &["releases", "--json"]);
    let releases: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(releases.len(), 1, "no release was recorded");

    // Set, the same graven.toml deploys.
    set_secret(&home, &dir, "greeting", "hi");
    let (stdout, _) = run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(stdout.contains("release 2 is serving"), "{stdout}");
    assert_eq!(greeting(route), Ok("hi from hello v2\n".to_owned()));
    // The same inputs again: the same release, nothing new.
    let (stdout, _) = run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!stdout.contains("release 3"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_that_cannot_be_read_fails_the_start_naming_it() {
    use graven::controller::{self, ControllerOptions};
    use graven::events::{DeployOutcome, Event, GoneReason, SecretRef};
    use graven::runtime::FakeRuntime;

    let temp = tempfile::tempdir().unwrap();
    let secrets = graven::secrets::Secrets::open(temp.path(), "hello", "test").unwrap();
    secrets.set("token", b"one").unwrap();
    let controller = controller::spawn(ControllerOptions {
        secrets: Some(secrets.clone()),
        ..support::daemon::fake_options(&FakeRuntime::new(), &temp.path().join("events.db"))
    })
    .unwrap();
    let route = free_port();
    let mut config = support::daemon::config(1, route, &[]);
    // Version 2 was pinned, then the secret removed and set again (version 1 only now).
    config.secrets.insert(
        "TOKEN".to_owned(),
        SecretRef {
            name: "token".to_owned(),
            version: 2,
        },
    );
    controller
        .deploy(
            support::daemon::order(vec![support::daemon::release(config)]),
            "test",
        )
        .await
        .unwrap();
    assert!(matches!(
        support::daemon::outcome(&controller).await,
        DeployOutcome::RolledBack { .. }
    ));
    let history = controller.history(0).await.unwrap();
    let failure = history
        .iter()
        .find_map(|e| match &e.payload {
            Event::InstanceGone {
                reason: GoneReason::StartFailed { error },
                ..
            } => Some(error.clone()),
            _ => None,
        })
        .expect("the start failed");
    assert_eq!(
        failure,
        "env TOKEN: secret \"token\" has no version 2 in hello/test"
    );
    controller.shutdown().await;
}

#[test]
fn the_secrets_commands_take_values_from_stdin_or_a_file_and_list_no_values() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let scope = ["--app", "shop", "--env", "production"];
    let file = temp.path().join("key.pem");
    std::fs::write(&file, "line one\nline two\n").unwrap();
    let (stdout, _) = run_ok(
        &home,
        &[
            &[
                "secrets",
                "set",
                "tls.key",
                "--from-file",
                file.to_str().unwrap(),
            ][..],
            &scope,
        ]
        .concat(),
    );
    assert!(stdout.contains("secret tls.key of shop/production is at version 1"));
    let stored = home.join("apps/shop/production/secrets/tls.key/1");
    assert_eq!(
        std::fs::read_to_string(&stored).unwrap(),
        "line one\nline two\n",
        "a file is taken byte for byte"
    );

    let (stdout, _) = run_ok(
        &home,
        &[&["secrets", "list", "--json"][..], &scope].concat(),
    );
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "tls.key");
    assert_eq!(listed[0]["version"], 1);
    assert!(listed[0]["set_at_ms"].as_u64().unwrap() > 0);
    assert!(!stdout.contains("line one"));
    let (stdout, _) = run_ok(&home, &[&["secrets", "list"][..], &scope].concat());
    assert!(
        stdout.contains("tls.key") && !stdout.contains("line one"),
        "{stdout}"
    );

    // Refused: a bad name, a value that no env variable can hold, a value on the command
    // line (there is no such argument), an app that cannot be found.
    let (ok, _, stderr) = run(&home, &[&["secrets", "set", "../x"][..], &scope].concat());
    assert!(
        !ok && stderr.contains("secret name \"../x\" is not valid"),
        "{stderr}"
    );
    std::fs::write(&file, [b'a', 0, b'b']).unwrap();
    let from_file = ["secrets", "set", "k", "--from-file", file.to_str().unwrap()];
    let (ok, _, stderr) = run(&home, &[&from_file[..], &scope].concat());
    assert!(!ok && stderr.contains("NUL"), "{stderr}");
    std::fs::write(&file, vec![b'a'; 64 * 1024 + 1]).unwrap();
    let (ok, _, stderr) = run(&home, &[&from_file[..], &scope].concat());
    assert!(!ok && stderr.contains("at most 64 KiB"), "{stderr}");
    let (ok, _, _) = run(
        &home,
        &[&["secrets", "set", "k", "value"][..], &scope].concat(),
    );
    assert!(!ok, "a value is never an argument");
    let (ok, _, stderr) = run(&home, &["secrets", "list"]);
    assert!(!ok && stderr.contains("--app"), "{stderr}");

    let (stdout, _) = run_ok(&home, &[&["secrets", "rm", "tls.key"][..], &scope].concat());
    assert!(stdout.contains("removed"), "{stdout}");
    assert!(!stored.exists());
    let (ok, _, stderr) = run(&home, &[&["secrets", "rm", "tls.key"][..], &scope].concat());
    assert!(
        !ok && stderr.contains("is not set in shop/production"),
        "{stderr}"
    );
}

#[test]
fn home_files_are_owner_only() {
    // What a user's shell usually has: files 0644 and dirs 0755 unless graven says otherwise.
    // SAFETY: umask only sets this process's file creation mask, inherited by the graven
    // processes the test starts.
    unsafe { libc::umask(0o022) };
    let temp = tempfile::tempdir().unwrap();
    let (home, dir) = (temp.path().join("home"), temp.path().join("project"));
    let route = free_port();
    secret_project(&dir, route, "v1");
    set_secret(&home, &dir, "greeting", "hi");
    let up = Up::start(&home, &dir, "local");
    assert_eq!(greeting(route), Ok("hi from hello v1\n".to_owned()));
    run_ok(&home, &["history"]);
    run_ok(&home, &["ps"]);

    let mut wrong = Vec::new();
    check_modes(&home, &home, &mut wrong);
    assert!(wrong.is_empty(), "not owner-only:\n{}", wrong.join("\n"));
    drop(up);
}

/// Records every file under `dir` open to group or others, and every directory that is not
/// 0700. Left out, each behind an owner-only directory that is checked: an unpacked image
/// (`rootfs/<manifest>` is the image's `/`, whose modes the workload needs), a volume (the
/// workload's own files), and the store and bake cache (image content, which every instance
/// sees unpacked with the image's modes anyway; only the home's 0700 keeps it from other
/// users, and that is checked here), and an instance's `resolv.conf` and `hosts` (bound into
/// its root read-only, for its workload's user to read as an image's `/etc` files are; they
/// name resolvers and the instance's own name, behind the instance's 0700 directory).
fn check_modes(home: &Path, dir: &Path, wrong: &mut Vec<String>) {
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let relative = dir.strip_prefix(home).unwrap();
    let parent = relative.parent().and_then(|p| p.to_str());
    if matches!(parent, Some("rootfs") | Some("volumes"))
        || relative == Path::new("store")
        || relative == Path::new("cache")
    {
        return;
    }
    if mode(dir) != 0o700 {
        wrong.push(format!("{:o} {}", mode(dir), dir.display()));
    }
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            check_modes(home, &path, wrong);
        } else if kind.is_file() || kind.is_socket() {
            let in_instance = parent == Some("instances");
            let name = entry.file_name();
            if in_instance && (name == "resolv.conf" || name == "hosts") {
                continue;
            }
            let mode = mode(&path);
            if mode & 0o077 != 0 {
                wrong.push(format!("{mode:o} {}", path.display()));
            }
        }
    }
}

use std::os::unix::fs::FileTypeExt;
