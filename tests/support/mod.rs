//! Shared helpers for integration tests: the real binary, temp homes, the example's static
//! binary, and waiting on a condition with a deadline (never sleeping for luck).
#![allow(dead_code)]

pub mod daemon;
pub mod fuzzing;
pub mod load;
pub mod proxy;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The graven binary cargo built for this test run.
pub fn graven_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_graven"))
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The host's static busybox, which tests copy into images; panics with the fix when missing.
pub fn busybox() -> &'static Path {
    let path = Path::new("/bin/busybox");
    assert!(
        path.is_file(),
        "{} is missing: install busybox-static (scripts/test does)",
        path.display()
    );
    path
}

/// A `graven` command with `GRAVEN_HOME` set to `home`.
pub fn graven(home: &Path) -> Command {
    let mut command = Command::new(graven_bin());
    command
        .env("GRAVEN_HOME", home)
        .env_remove("SOURCE_DATE_EPOCH");
    command
}

/// Runs `command` to completion with stdout and stderr captured and returns its output; panics
/// naming the command, its exit status and its stderr when it does not start or fails, so a
/// failing test says which step broke and why.
pub fn succeed(command: &mut Command) -> Output {
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{shown}: cannot start: {error}"));
    assert!(
        output.status.success(),
        "{shown}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds the example service as a static binary once per test process, as the example's
/// declared build step does, and returns its path.
pub fn hello_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let target = workspace().join("target/static");
            succeed(
                Command::new(env!("CARGO"))
                    .current_dir(workspace())
                    .args([
                        "rustc",
                        "--quiet",
                        "--release",
                        "-p",
                        "hello",
                        "--target-dir",
                    ])
                    .arg(&target)
                    .args(["--", "-C", "target-feature=+crt-static"]),
            );
            target.join("release/hello")
        })
        .clone()
}

/// Polls `condition` until it returns `Some` or `deadline` passes.
pub fn wait_for<T>(deadline: Duration, what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
