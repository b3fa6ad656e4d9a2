//! `graven up --detach`: the control plane in the background, in a session of its own, so
//! that the hang-up of the terminal it was started from never reaches it; the project
//! deployed to it as `graven deploy` does; `graven daemon stop` drains it and waits for it
//! to exit. Background processes are found by the control lock's PID and their start time,
//! and killed by those when a test fails.

mod support;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use support::daemon::{
    Recorded, Up, demo_instances, hello_project, remove_instances, run, run_ok, v1_project, version,
};

/// Fields of `/proc/<pid>/stat` after the command's name: (process group, session,
/// controlling terminal, start time).
fn stat(pid: u32) -> Option<(i64, i64, i64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((
        fields.get(2)?.parse().ok()?,
        fields.get(3)?.parse().ok()?,
        fields.get(4)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// The control plane running in the background on a home, as the lock names it; killed by
/// its PID (checked against its start time) and its instances removed when dropped, unless
/// it has already gone.
struct Background {
    home: std::path::PathBuf,
    process: Recorded,
}

impl Background {
    fn find(home: &std::path::Path) -> Background {
        let named = std::fs::read_to_string(home.join("control.lock")).unwrap();
        let pid: u32 = named.lines().next().unwrap().parse().unwrap();
        let (_, _, _, start) = stat(pid).expect("the holder runs");
        Background {
            home: home.to_owned(),
            process: Recorded { pid, start },
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.process.alive() {
            // SAFETY: kill(2) on the PID whose start time was just checked to be the
            // daemon's.
            unsafe { libc::kill(self.process.pid as i32, libc::SIGKILL) };
        }
        remove_instances(&self.home);
    }
}

/// A stand-in for a terminal's job: a process group (led by a `sleep`) that `up --detach`
/// runs in, hung up as a closed terminal hangs up its jobs. Its leader is killed by PID when
/// dropped.
struct Terminal(std::process::Child);

/// Gives `command` the default disposition of SIGHUP, as a terminal's job has: the test may
/// run under `nohup` (SIGHUP ignored, and inherited across exec), which would make a hang-up
/// end nothing and the test pass whether or not the daemon escaped the terminal.
fn hang_up_ends_it(command: &mut std::process::Command) -> &mut std::process::Command {
    // SAFETY: signal(2) is async-signal-safe; the closure runs in the child before exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        })
    }
}

impl Terminal {
    fn open() -> Terminal {
        Terminal(
            hang_up_ends_it(std::process::Command::new("sleep").arg("600"))
                .process_group(0)
                .spawn()
                .unwrap(),
        )
    }

    fn group(&self) -> i32 {
        self.0.id() as i32
    }

    fn hang_up(&mut self) {
        // SAFETY: killpg(2) on the group this test made; its leader is its unreaped child.
        assert_eq!(unsafe { libc::killpg(self.group(), libc::SIGHUP) }, 0);
        let status =
            support::wait_for(Duration::from_secs(10), "the group's leader to end", || {
                self.0.try_wait().unwrap()
            });
        assert!(!status.success(), "{status}");
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn up_detach_serves_after_the_terminal_hangs_up_until_daemon_stop() {
    let (_temp, home, dir, route) = v1_project(1);
    let mut terminal = Terminal::open();
    let output = support::succeed(
        hang_up_ends_it(&mut support::graven(&home))
            .args(["up", "--detach", dir.to_str().unwrap()])
            .process_group(terminal.group()),
    );
    let background = Background::find(&home);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        stdout.contains("web: release 1 is serving") && stdout.contains(&route.to_string()),
        "{stdout}"
    );
    assert!(
        stderr.contains("started the control plane in the background")
            && stderr.contains("graven daemon stop"),
        "{stderr}"
    );
    assert_eq!(version(route), Ok("v1".to_owned()));
    // It leads a session of its own, without a terminal: no hang-up can reach it.
    let (group, session, tty, _) = stat(background.process.pid).unwrap();
    let pid = background.process.pid as i64;
    assert_eq!((group, session, tty), (pid, pid, 0));
    use std::os::unix::fs::MetadataExt;
    let log = home.join("daemon.log");
    assert_eq!(std::fs::metadata(&log).unwrap().mode() & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("daemon listening"),
        "{}",
        log.display()
    );

    terminal.hang_up();
    assert!(background.process.alive(), "the hang-up ended the daemon");
    // Still the same control plane, taking deploys.
    hello_project(&dir, route, 1, r#"VERSION = "v2""#, "");
    run_ok(&home, &["deploy", dir.to_str().unwrap()]);
    assert_eq!(version(route), Ok("v2".to_owned()));
    assert!(background.process.alive());

    let (stdout, stderr) = run_ok(&home, &["daemon", "stop"]);
    assert!(stdout.contains("has stopped"), "{stdout}");
    assert!(
        stderr.contains(&format!("pid {}, graven daemon", background.process.pid)),
        "{stderr}"
    );
    assert!(!background.process.alive(), "daemon stop returned first");
    assert_eq!(
        demo_instances(&home),
        vec![],
        "daemon stop drains every instance"
    );
    assert!(
        std::net::TcpStream::connect(route).is_err(),
        "the route listens"
    );
    let (stdout, _) = run_ok(&home, &["daemon", "stop"]);
    assert!(stdout.contains("no control plane runs"), "{stdout}");
}

#[test]
fn up_detach_deploys_to_a_control_plane_already_running() {
    let (_temp, home, dir, route) = v1_project(1);
    let foreground = Up::daemon(&home, "local");
    let (stdout, stderr) = run_ok(&home, &["up", "-d", dir.to_str().unwrap()]);
    assert!(stdout.contains("web: release 1 is serving"), "{stdout}");
    let expected = format!(
        "a control plane already runs on {} (pid {}, graven daemon): deploying to it",
        home.display(),
        foreground.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(version(route), Ok("v1".to_owned()));
    assert!(
        !home.join("daemon.log").exists(),
        "a second one was started"
    );
    // `daemon stop` stops whichever control plane holds the home, this one too.
    let (_, _, _, start) = stat(foreground.pid()).unwrap();
    let process = Recorded {
        pid: foreground.pid(),
        start,
    };
    let (stdout, _) = run_ok(&home, &["daemon", "stop"]);
    assert!(stdout.contains("has stopped"), "{stdout}");
    assert!(!process.alive(), "daemon stop returned first");
    assert!(
        std::net::TcpStream::connect(route).is_err(),
        "the route listens"
    );
}

#[test]
fn a_background_control_plane_that_cannot_start_says_why_and_where_its_log_is() {
    let (_temp, home, dir, _route) = v1_project(1);
    let log = graven::api::log_path(&home, "demo", "local");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(
        &log,
        "not an event log, but long enough to be read as a database",
    )
    .unwrap();
    let (ok, _, stderr) = run(&home, &["up", "--detach", dir.to_str().unwrap()]);
    assert!(!ok);
    let daemon_log = home.join("daemon.log");
    assert!(
        stderr.contains(&daemon_log.display().to_string())
            && stderr.contains(&log.display().to_string()),
        "{stderr}"
    );
    let (stdout, _) = run_ok(&home, &["daemon", "stop"]);
    assert!(stdout.contains("no control plane runs"), "{stdout}");
}
