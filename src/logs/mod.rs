//! The log store: every instance's stdout and stderr, and lines from other sources (syslog),
//! kept under `$GRAVEN_HOME/logs` after the instance is gone and across every deploy, read
//! by `graven logs`. It owns the on-disk format (data files, the index of times, a source's
//! metadata), ingestion's two halves (`ingest`: the files a workload writes to and the
//! stamper its shim runs; `Writer`: a source graven writes itself), reading, search and
//! following (`read`), and retention (`retention`). It names no other graven module: the
//! runtime's shim and the CLI call it, never the other way round.
//!
//! A source is a directory `logs/<group>/<name>/` holding `meta.json` (who wrote it),
//! `out` and `err` (the bytes as written, never copied nor compressed), `index` (fixed-size
//! entries `(stream, end offset, time)`, appended at most once per stream per millisecond)
//! and, once retention freed its oldest bytes, `start` (where each stream's kept bytes
//! begin). A line's time is that of the first index entry at or past its end.

pub mod bridge;
pub mod index;
pub mod ingest;
pub mod read;
pub mod retention;
pub mod syslog;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use ingest::{Stamper, Writer};
pub use read::{Cursor, Follower, Query, Record};

/// The directory under graven's home that holds the store.
pub const DIR: &str = "logs";
pub const META: &str = "meta.json";
pub const INDEX: &str = "index";
pub const START: &str = "start";
/// The group of instances started without a controller (`graven run`).
pub const RUN_GROUP: &str = "_run";
/// A line longer than this is shown in pieces of this size: a workload that never writes a
/// newline cannot make a reader hold an unbounded line.
pub const MAX_LINE: usize = 16 * 1024;

/// Which of a source's two data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// The data file's name.
    pub fn file(self) -> &'static str {
        match self {
            Stream::Stdout => "out",
            Stream::Stderr => "err",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: u32) -> Option<Stream> {
        match i {
            0 => Some(Stream::Stdout),
            1 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

impl std::str::FromStr for Stream {
    type Err = String;
    fn from_str(s: &str) -> Result<Stream, String> {
        match s {
            "stdout" | "out" => Ok(Stream::Stdout),
            "stderr" | "err" => Ok(Stream::Stderr),
            _ => Err(format!("{s}: expected stdout or stderr")),
        }
    }
}

/// Who wrote a source: what `graven logs` shows beside each line and filters on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub environment: String,
    #[serde(default)]
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// The instance's name (the controller's), or the source's name.
    pub instance: String,
    /// The runtime's id of the instance, when it is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub started_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("log store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("log source name {name:?} is not a relative path of plain names")]
    BadName { name: String },
    #[error("log source {path}: meta.json: {source}")]
    Meta {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogsError + '_ {
    move |source| LogsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The store's root under `home`.
pub fn root(home: &Path) -> PathBuf {
    home.join(DIR)
}

/// The directory of the source named `group/name` under `home`, checked to be plain names
/// (no `..`, nothing absolute), so a label or a syslog host name never leads outside.
pub fn source_dir(home: &Path, group: &str, name: &str) -> Result<PathBuf, LogsError> {
    let mut dir = root(home);
    for part in group.split('/').chain([name]) {
        let plain = !part.is_empty()
            && part != "."
            && part != ".."
            && !part.contains('\0')
            && part.len() <= 255;
        if !plain {
            return Err(LogsError::BadName {
                name: format!("{group}/{name}"),
            });
        }
        dir.push(part);
    }
    Ok(dir)
}

/// Makes `dir` and its parents owner-only (0700) whatever the umask: a workload's output
/// may hold anything it prints.
pub(crate) fn private_dirs(dir: &Path) -> Result<(), LogsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Now, in ns since the epoch: the store's times.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_stay_inside_the_store() {
        let home = Path::new("/h");
        assert_eq!(
            source_dir(home, "a/b/c", "i1").unwrap(),
            Path::new("/h/logs/a/b/c/i1")
        );
        for (group, name) in [
            ("a/../..", "x"),
            ("", "x"),
            ("a", ".."),
            ("/abs", "x"),
            ("a//b", "x"),
        ] {
            assert!(source_dir(home, group, name).is_err(), "{group} {name}");
        }
    }
}
