//! The systemd units in `contrib/systemd/` load as systemd reads them (`systemd-analyze
//! verify`, which needs no systemd running), with the binary they name pointed at the one
//! built, and keep the settings graven's control plane depends on.

mod support;

use std::path::Path;

/// The units shipped, each with the path its `ExecStart` names and how it is verified.
const UNITS: [(&str, &str, &[&str]); 2] = [
    ("graven.service", "/usr/local/bin/graven", &[]),
    ("graven-user.service", "%h/.local/bin/graven", &["--user"]),
];

/// `systemd-analyze verify` on `unit`: its stderr (it exits 0 on an unknown key or a bad
/// value, and says so there).
fn verify(unit: &Path, flags: &[&str]) -> String {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.is_file(),
        "{} is missing: install systemd (scripts/test does)",
        analyze.display()
    );
    // A user manager is looked for in XDG_RUNTIME_DIR, which a test run may not have.
    let runtime_dir = tempfile::tempdir().unwrap();
    let output = support::succeed(
        std::process::Command::new(analyze)
            .args(flags)
            .arg("verify")
            .arg(unit)
            .env("XDG_RUNTIME_DIR", runtime_dir.path())
            .env("SYSTEMD_LOG_COLOR", "0"),
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The unit's text with its `ExecStart` binary replaced by the built one, written to `dir`.
fn with_built_binary(dir: &Path, name: &str, shipped: &str) -> std::path::PathBuf {
    let text =
        std::fs::read_to_string(support::workspace().join("contrib/systemd").join(name)).unwrap();
    assert!(
        text.contains(&format!("ExecStart={shipped} daemon\n")),
        "{text}"
    );
    let unit = dir.join(name);
    let built = support::graven_bin();
    std::fs::write(&unit, text.replace(shipped, built.to_str().unwrap())).unwrap();
    unit
}

#[test]
fn the_systemd_units_verify_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, shipped, flags) in UNITS {
        let unit = with_built_binary(dir.path(), name, shipped);
        let complaints = verify(&unit, flags);
        assert!(complaints.trim().is_empty(), "{name}: {complaints}");
    }
}

#[test]
fn the_systemd_units_let_graven_drain_and_its_instances_outlive_a_restart() {
    for (name, _, _) in UNITS {
        let text = std::fs::read_to_string(support::workspace().join("contrib/systemd").join(name))
            .unwrap();
        let settings: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .collect();
        for wanted in [
            "KillSignal=SIGTERM",
            "KillMode=process",
            "Restart=on-failure",
            "TimeoutStopSec=5min",
            "LimitNOFILE=1024:1048576",
        ] {
            assert!(settings.contains(&wanted), "{name} lacks {wanted}");
        }
    }
}

/// The negative control: a misspelt key is reported, so a clean verify means something.
#[test]
fn verify_reports_a_misspelt_key() {
    let dir = tempfile::tempdir().unwrap();
    let unit = with_built_binary(dir.path(), "graven.service", "/usr/local/bin/graven");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&unit, text.replace("KillMode=", "KilMode=")).unwrap();
    let complaints = verify(&unit, &[]);
    assert!(complaints.contains("KilMode"), "{complaints}");
}
