//! A full disk under the event log: the app's log directory is a small tmpfs of the test's
//! own (mounted by it, unmounted on every way out), filled up. The route keeps serving the
//! healthy instances, `status` and `up` say the log cannot be written, a deploy is refused
//! (the negative control: the log really could not be written), and once space is freed the
//! controller resumes by itself: it replaces the instance killed meanwhile and deploys again.

mod support;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::daemon::{Up, hello_project, recorded_processes, run, v1_project, versions_during};

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
            "mounting a tmpfs on {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; MNT_DETACH lets go even if graven still holds it.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Fails unless every request in `seen` was answered by `version`; says how many failed and
/// the first error.
fn all_answered(seen: &[Result<String, String>], version: &str, what: &str) {
    let failed: Vec<&Result<String, String>> = seen
        .iter()
        .filter(|v| v.as_deref() != Ok(version))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed, first: {:?}",
        failed.len(),
        seen.len(),
        failed.first()
    );
}

/// Writes `path` until the filesystem it is on has no room left.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match file.write_all(&chunk).and_then(|()| file.sync_all()) {
            Ok(()) => continue,
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(error) => panic!("filling {}: {error}", path.display()),
        }
    }
}

fn status(home: &Path) -> serde_json::Value {
    let (ok, stdout, stderr) = run(home, &["status", "--json"]);
    assert!(ok, "{stderr}");
    let mut all: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    all.remove(0)
}

/// Healthy instances of `release` in `graven status --json`.
fn healthy(home: &Path, release: u64) -> usize {
    status(home)["state"]["instances"]
        .as_object()
        .map(|i| {
            i.values()
                .filter(|i| i["release"] == release && i["lifecycle"] == "healthy")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_full_disk_under_the_event_log_keeps_the_route_serving_and_heals_when_space_returns() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let (_temp, home, dir, route) = v1_project(2);
    let log_dir = graven::api::log_path(&home, "demo", "local")
        .parent()
        .unwrap()
        .to_owned();
    let _tmpfs = Tmpfs::mount(&log_dir, "4m");
    let mut up = Up::start(&home, &dir, "local");
    assert_eq!(healthy(&home, 1), 2);

    fill(&log_dir.join("filler"));
    // The negative control: the log really cannot be written, so the deploy is refused
    // before anything is built into a release.
    hello_project(&dir, route, 2, r#"VERSION = "v2""#, "");
    let (ok, _, refused) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(!ok, "a deploy went through a full log");
    // Serving goes on with the last known state, and the controller has not stopped.
    let seen = versions_during(route, Duration::from_millis(500));
    all_answered(&seen, "v1", "the route stopped serving");
    assert!(refused.contains("cannot be written"), "{refused}");
    up.wait_for_line("the event log cannot be written", Duration::from_secs(10));
    let problem = &status(&home)["log_problem"];
    assert!(
        problem["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{problem}"
    );
    let (_, text, _) = run(&home, &["status"]);
    assert!(text.contains("the event log cannot be written"), "{text}");

    // A dead instance is not replaced meanwhile: its replacement could not be recorded.
    let workload = recorded_processes(&home)[1];
    assert!(workload.alive());
    // SAFETY: kill(2) on a PID the instance's state recorded, checked alive just before by
    // its start time, so it is that workload and not a reused PID.
    unsafe { libc::kill(workload.pid as i32, libc::SIGKILL) };
    support::wait_for(Duration::from_secs(10), "the workload to die", || {
        (!workload.alive()).then_some(())
    });
    let seen = versions_during(route, Duration::from_millis(500));
    all_answered(&seen, "v1", "the instance left serves");
    assert!(!status(&home)["log_problem"].is_null());

    // Space comes back: the controller resumes by itself, records the outage, replaces the
    // dead instance, and deploys again.
    std::fs::remove_file(log_dir.join("filler")).unwrap();
    support::wait_for(Duration::from_secs(30), "the log problem to clear", || {
        status(&home)["log_problem"].is_null().then_some(())
    });
    up.wait_for_line("can be written again", Duration::from_secs(10));
    support::wait_for(
        Duration::from_secs(30),
        "two healthy instances again",
        || {
            (healthy(&home, 1) == 2
                && recorded_processes(&home)
                    .iter()
                    .filter(|p| p.alive())
                    .count()
                    >= 4)
                .then_some(())
        },
    );
    let (ok, _, stderr) = run(&home, &["deploy", dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(support::daemon::version(route).as_deref(), Ok("v2"));
    let (_, history, _) = run(&home, &["history"]);
    assert!(
        history.contains("the event log could not be written"),
        "{history}"
    );
}
