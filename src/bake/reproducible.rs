//! The reproducibility rules for RUN layers: the files package managers and compilers rewrite
//! on every run with the time of day in them are dropped from the layer or normalised, so that
//! two cold bakes of a typical app give one digest. Default on; a Containerfile switches them
//! off with the parser directive `# reproducible=off` (Docker reads an unknown directive as a
//! comment, so the file still builds there).
//!
//! The list is what two `docker build --no-cache` runs of a Debian app (apt, venv, pip) were
//! seen to differ in, nothing guessed: apt's and dpkg's logs, apt's binary caches, ldconfig's
//! aux-cache, and timestamp-based Python bytecode of sources written by the same step.

use std::fs;
use std::io;
use std::path::PathBuf;

use super::tree::{Entry, EntryKind};

/// Files a RUN step's layer never records: logs with the time of each action in them, and
/// caches their programs rebuild when stale (apt from its lists, ldconfig from the libraries).
pub const DROPPED: [&str; 8] = [
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/ldconfig/aux-cache",
];

/// The parser directive that switches the rules, as `# reproducible=off`.
pub const DIRECTIVE: &str = "reproducible";

/// Whether the rules apply to a Containerfile: its parser directives (the `# key=value`
/// comment lines at the very top, as Docker reads them) may say `reproducible=off`.
/// A bad value is an error with its line number.
pub fn enabled(source: &str) -> Result<bool, (usize, String)> {
    for (number, line) in source.lines().enumerate() {
        let Some(comment) = line.trim().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = comment.split_once('=') else {
            break;
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            break;
        }
        if key.eq_ignore_ascii_case(DIRECTIVE) {
            return match value.trim() {
                "on" => Ok(true),
                "off" => Ok(false),
                other => Err((
                    number + 1,
                    format!("# {DIRECTIVE}={other}: the directive takes on or off"),
                )),
            };
        }
    }
    Ok(true)
}

/// What the rules did to one layer; holds the normalised copies until the layer is written.
#[derive(Debug, Default)]
pub struct Applied {
    pub dropped: Vec<String>,
    pub normalised: Vec<String>,
    scratch: Option<tempfile::TempDir>,
}

/// Applies the rules to a RUN step's entries. `mtime` is the one the layer gives every entry,
/// which a normalised bytecode file then names as its source's.
pub fn apply(entries: &mut Vec<Entry>, mtime: u64) -> io::Result<Applied> {
    let mut applied = Applied::default();
    entries.retain(|entry| {
        let drop = DROPPED.contains(&entry.path.as_str()) && entry.kind != EntryKind::Dir;
        if drop {
            applied.dropped.push(entry.path.clone());
        }
        !drop
    });
    let written: std::collections::BTreeSet<String> = entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::File { .. }))
        .map(|e| e.path.clone())
        .collect();
    for entry in entries.iter_mut() {
        let EntryKind::File { source, size } = &entry.kind else {
            continue;
        };
        let Some(py) = bytecode_source(&entry.path) else {
            continue;
        };
        if !written.contains(&py) || *size < 16 {
            continue;
        }
        let mut bytes = fs::read(source)?;
        if !timestamp_based(&bytes) {
            continue;
        }
        let stamp = (mtime as u32).to_le_bytes();
        if bytes[8..12] == stamp {
            continue;
        }
        bytes[8..12].copy_from_slice(&stamp);
        let scratch = match &applied.scratch {
            Some(dir) => dir,
            None => applied.scratch.insert(
                tempfile::Builder::new()
                    .prefix("graven-reproducible-")
                    .tempdir()?,
            ),
        };
        let copy = scratch.path().join(applied.normalised.len().to_string());
        fs::write(&copy, &bytes)?;
        entry.kind = EntryKind::File {
            source: copy,
            size: bytes.len() as u64,
        };
        applied.normalised.push(entry.path.clone());
    }
    Ok(applied)
}

/// The source a bytecode file was compiled from: `d/__pycache__/m.cpython-311.pyc` (and its
/// `.opt-N` variants) → `d/m.py`; a legacy `d/m.pyc` → `d/m.py`.
fn bytecode_source(path: &str) -> Option<String> {
    let stem = path.strip_suffix(".pyc")?;
    let (dir, name) = stem.rsplit_once('/').unwrap_or(("", stem));
    let joined = |dir: &str, module: &str| {
        PathBuf::from(dir)
            .join(format!("{module}.py"))
            .to_string_lossy()
            .into_owned()
    };
    let (parent, last) = dir.rsplit_once('/').unwrap_or(("", dir));
    if last == "__pycache__" {
        let module = name.split('.').next().filter(|m| !m.is_empty())?;
        Some(joined(parent, module))
    } else {
        Some(joined(dir, name))
    }
}

/// A Python 3.7+ bytecode header (PEP 552) whose validation is by the source's mtime: magic
/// ending in `\r\n`, then flags 0, then the mtime and the size.
fn timestamp_based(bytes: &[u8]) -> bool {
    bytes.len() >= 16 && bytes[2..4] == *b"\r\n" && bytes[4..8] == [0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &std::path::Path, path: &str, bytes: &[u8]) -> Entry {
        let source = dir.join(path.replace('/', "_"));
        fs::write(&source, bytes).unwrap();
        Entry {
            path: path.to_owned(),
            kind: EntryKind::File {
                source,
                size: bytes.len() as u64,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    fn pyc(flags: u32, mtime: u32) -> Vec<u8> {
        let mut bytes = vec![0xa7, 0x0d, 0x0d, 0x0a];
        bytes.extend(flags.to_le_bytes());
        bytes.extend(mtime.to_le_bytes());
        bytes.extend(42u32.to_le_bytes());
        bytes.extend(b"code");
        bytes
    }

    fn content(entry: &Entry) -> Vec<u8> {
        match &entry.kind {
            EntryKind::File { source, .. } => fs::read(source).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn logs_and_caches_are_dropped_and_bytecode_of_new_sources_names_the_layer_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut entries = vec![
            file(d, "var/log/dpkg.log", b"2026-12-06 05:00:01 install"),
            file(d, "var/cache/ldconfig/aux-cache", b"x"),
            file(d, "var/log/other.log", b"kept"),
            file(d, "app/m.py", b"print(1)"),
            file(
                d,
                "app/__pycache__/m.cpython-311.pyc",
                &pyc(0, 1_765_000_000),
            ),
            // Hash-based bytecode (SOURCE_DATE_EPOCH makes pip write it) is left alone.
            file(d, "app/h.py", b"print(2)"),
            file(d, "app/__pycache__/h.cpython-311.pyc", &pyc(3, 7)),
            // Bytecode of a source this step did not write keeps the lower source's mtime.
            file(d, "usr/lib/__pycache__/os.cpython-311.pyc", &pyc(0, 5)),
        ];
        let applied = apply(&mut entries, 100).unwrap();
        assert_eq!(
            applied.dropped,
            ["var/log/dpkg.log", "var/cache/ldconfig/aux-cache"]
        );
        assert_eq!(applied.normalised, ["app/__pycache__/m.cpython-311.pyc"]);
        let by_path = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
        assert_eq!(
            content(by_path("app/__pycache__/m.cpython-311.pyc")),
            pyc(0, 100)
        );
        assert_eq!(
            content(by_path("app/__pycache__/h.cpython-311.pyc")),
            pyc(3, 7)
        );
        assert_eq!(
            content(by_path("usr/lib/__pycache__/os.cpython-311.pyc")),
            pyc(0, 5)
        );
        assert_eq!(content(by_path("var/log/other.log")), b"kept");
    }

    #[test]
    fn bytecode_names_its_source() {
        for (pyc, py) in [
            ("a/b/__pycache__/m.cpython-311.pyc", Some("a/b/m.py")),
            ("a/__pycache__/m.cpython-311.opt-1.pyc", Some("a/m.py")),
            ("__pycache__/m.cpython-311.pyc", Some("m.py")),
            ("a/m.pyc", Some("a/m.py")),
            ("m.pyc", Some("m.py")),
            ("a/m.py", None),
        ] {
            assert_eq!(bytecode_source(pyc).as_deref(), py, "{pyc}");
        }
    }

    #[test]
    fn the_directive_switches_the_rules() {
        for (source, expected) in [
            ("FROM scratch\n", Ok(true)),
            ("# reproducible=off\nFROM scratch\n", Ok(false)),
            (
                "# syntax=docker/dockerfile:1\n# Reproducible = off\nFROM x\n",
                Ok(false),
            ),
            ("# reproducible=on\nFROM x\n", Ok(true)),
            // Directives end at the first line that is not one, as Docker reads them.
            ("# a comment\n# reproducible=off\nFROM x\n", Ok(true)),
            ("FROM x\n# reproducible=off\n", Ok(true)),
            (
                "# reproducible=maybe\n",
                Err((
                    1,
                    "# reproducible=maybe: the directive takes on or off".to_owned(),
                )),
            ),
        ] {
            assert_eq!(enabled(source), expected, "{source:?}");
        }
    }
}
