//! An instance whose directory was deleted (`rm -rf $GRAVEN_HOME/instances/<id>`) while it
//! ran: its state, PIDs included, went with the directory, yet graven still finds its
//! processes (the shim holds the instance's log open, which /proc still names) and stops
//! them, whether `graven ps` lists the runtime or `graven up` shuts down. Checked by the
//! PIDs and start times the state recorded before it was deleted, read from /proc.

mod support;

use std::time::Duration;

use support::daemon::{Recorded, Up, recorded_processes, run_ok, test_runtime, v1_project};

/// Kills (SIGKILL) whatever of `processes` still runs when dropped, so a failing test leaves
/// nothing behind: nothing else could find them once their directory is gone.
struct KillOnDrop(Vec<Recorded>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for process in &self.0 {
            if process.alive() {
                // SAFETY: kill(2) on a PID checked just before to be the recorded process
                // (same start time), not a reused one.
                unsafe { libc::kill(process.pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn all_dead(processes: &[Recorded], what: &str) {
    support::wait_for(Duration::from_secs(15), what, || {
        processes.iter().all(|p| !p.alive()).then_some(())
    });
}

#[test]
fn an_instance_whose_dir_was_deleted_is_stopped_when_graven_lists() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    support::runtime::hello_image(&home);
    let (stdout, _) = run_ok(&home, &["run", "-d", "hello:test"]);
    let id = stdout.trim().to_owned();
    let processes = recorded_processes(&home);
    let _cleanup = KillOnDrop(processes.clone());
    assert_eq!(processes.len(), 2, "a shim and a workload");
    assert!(processes.iter().all(Recorded::alive));

    let in_cgroup = processes.iter().any(|p| {
        std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid))
            .unwrap_or_default()
            .contains(&format!("/graven/{id}"))
    });
    std::fs::remove_dir_all(home.join("instances").join(&id)).unwrap();
    let (listed, _) = run_ok(&home, &["ps"]);
    assert!(!listed.contains(&id[..8]), "{listed}");
    all_dead(&processes, "graven ps to stop the orphan");
    // Its cgroups went with it (they are made only as root).
    let cgroups = std::path::Path::new("/sys/fs/cgroup");
    let left: Vec<_> = std::iter::once(cgroups.join("graven").join(&id))
        .chain(
            std::fs::read_dir(cgroups)
                .into_iter()
                .flatten()
                .flatten()
                .map(|h| h.path().join("graven").join(&id)),
        )
        .filter(|dir| dir.is_dir())
        .collect();
    assert!(
        in_cgroup || !rustix::process::geteuid().is_root(),
        "no cgroup to check"
    );
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[test]
fn an_instance_whose_dir_was_deleted_is_stopped_by_a_clean_shutdown() {
    if test_runtime() != "local" {
        return;
    }
    let (_temp, home, dir, _route) = v1_project(1);
    let mut up = Up::start(&home, &dir, "local");
    let processes = recorded_processes(&home);
    let _cleanup = KillOnDrop(processes.clone());
    assert_eq!(processes.len(), 2, "a shim and a workload");
    for entry in std::fs::read_dir(home.join("instances")).unwrap() {
        std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    assert!(up.signal(libc::SIGTERM, Duration::from_secs(60)).success());
    all_dead(&processes, "the shutdown to stop the orphan");
}
