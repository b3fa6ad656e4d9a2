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

/// Every file under `dir` with its size: what a check must leave as it found it.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path().display().to_string(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bake_check_names_the_first_path_that_differs_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(support::busybox(), dir.path().join("busybox")).unwrap();
    let base = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\nENV PATH=/bin\nRUN busybox --install -s /bin\n";
    let home = tempfile::tempdir().unwrap();
    // A first bake of the base fills the store and the cache; the check uses neither.
    fs::write(dir.path().join("Containerfile"), base).unwrap();
    succeed(
        graven(home.path())
            .args(["bake", "--tag", "base:1"])
            .arg(dir.path()),
    );
    let store = home.path().join("store");
    let cache = home.path().join("cache");
    let before = (listing(&store), listing(&cache));

    fs::write(dir.path().join("Containerfile"), format!("{base}{RUN}")).unwrap();
    let out = succeed(
        graven(home.path())
            .args(["bake", "--check", "--tag", "r:1"])
            .arg(dir.path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("reproducible: two bakes from clean gave sha256:"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bake 2 of 2 [5/6]"),
        "progress names the round: {stderr}"
    );
    assert!(
        !stderr
            .lines()
            .any(|l| l.ends_with("cached") && !l.contains("] FROM ")),
        "a check reads no cache: {stderr}"
    );

    fs::write(
        dir.path().join("Containerfile"),
        format!("# reproducible=off\n{base}{RUN}"),
    )
    .unwrap();
    let out = graven(home.path())
        .args(["bake", "--check", "--json", "--tag", "r:1"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let checked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(checked["reproducible"], false);
    assert_ne!(checked["digest"], checked["second"]);
    let difference = &checked["difference"];
    assert!(
        difference["step"]
            .as_str()
            .unwrap()
            .starts_with("RUN mkdir -p /var/log/apt"),
        "{difference}"
    );
    // Paths sort as the layer holds them: the bytecode under /app comes before /var.
    assert_eq!(difference["path"], "/app/__pycache__/m.cpython-311.pyc");
    assert_ne!(difference["first"], difference["second"]);

    assert_eq!(
        (listing(&store), listing(&cache)),
        before,
        "the check kept nothing"
    );
    let images = succeed(graven(home.path()).args(["images"]));
    assert!(!String::from_utf8_lossy(&images.stdout).contains("r:1"));
}
