//! The reproducibility rules for RUN layers (src/bake/reproducible.rs): what package managers
//! and compilers write with the time of day in it (here stood in for by random bytes, which
//! differ on every run for certain) is dropped or normalised, so two cold bakes give one
//! digest; `# reproducible=off` keeps every byte, and the digests then differ.

mod support;

use std::fs;
use std::path::Path;

use support::{graven, succeed};

/// A RUN that writes what apt, dpkg, ldconfig and pip write: logs and caches with varying
/// content, and a new Python source with timestamp-based bytecode whose header holds the time.
const RUN: &str = r#"RUN mkdir -p /var/log/apt /var/cache/ldconfig /app/__pycache__ \
 && head -c 16 /dev/urandom > /var/log/dpkg.log \
 && head -c 16 /dev/urandom > /var/log/apt/history.log \
 && head -c 16 /dev/urandom > /var/cache/ldconfig/aux-cache \
 && echo 'print(1)' > /app/m.py \
 && { printf '\247\015\015\012\000\000\000\000'; head -c 4 /dev/urandom; printf '\011\000\000\000body'; } > /app/__pycache__/m.cpython-311.pyc
"#;

fn digest(dir: &Path, containerfile: &str) -> String {
    let home = tempfile::tempdir().unwrap();
    digest_in(home.path(), dir, containerfile)
}

fn digest_in(home: &Path, dir: &Path, containerfile: &str) -> String {
    fs::write(dir.join("Containerfile"), containerfile).unwrap();
    let out = succeed(
        graven(home)
            .args(["bake", "--json", "--tag", "r:1"])
            .arg(dir),
    );
    let baked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    baked["digest"].as_str().unwrap().to_owned()
}

#[test]
fn two_cold_bakes_of_a_run_that_writes_logs_and_bytecode_give_one_digest() {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::busybox(), dir.path().join("busybox")).unwrap();
    let base = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\nENV PATH=/bin\nRUN busybox --install -s /bin\n";
    let on = format!("{base}{RUN}");
    assert_eq!(digest(dir.path(), &on), digest(dir.path(), &on));
    let off = format!("# reproducible=off\n{base}{RUN}");
    assert_ne!(
        digest(dir.path(), &off),
        digest(dir.path(), &off),
        "without the rules the random bytes reach the layer"
    );
    // Switching the rules off is part of a RUN step's cache key: the layer made with them is
    // not what the file without them asks for.
    let home = tempfile::tempdir().unwrap();
    let with = digest_in(home.path(), dir.path(), &on);
    assert_ne!(digest_in(home.path(), dir.path(), &off), with);
}

#[test]
fn a_bad_reproducible_directive_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("Containerfile"),
        "# syntax=docker/dockerfile:1\n# reproducible=sometimes\nFROM scratch\n",
    )
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = graven(home.path())
        .args(["bake", "--tag", "r:1"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Containerfile:2: # reproducible=sometimes: the directive takes on or off"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Containerfile:2").count(), 1, "{stderr}");
}
