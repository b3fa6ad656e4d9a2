//! An instance's log: the file the shim writes captured lines to, rotated at a size with one
//! earlier file kept, and a follower that reads it across rotations (`graven run` prints
//! through one; the central log store will read the same way).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::state::{LOG, LOG_BEFORE};

/// Where captured lines go: the instance's log file, or a buffer in tests.
pub(super) trait Sink {
    /// Appends whole lines, written at once.
    fn append(&mut self, lines: &[u8]);
}

impl Sink for Vec<u8> {
    fn append(&mut self, lines: &[u8]) {
        self.extend_from_slice(lines);
    }
}

/// The instance's log file, `log`. When the next lines would take it past `cap` bytes it is
/// renamed to `log.1` (replacing the one before) and a new `log` begins, so an instance's
/// output takes at most twice the cap on disk. Files are cut between lines, never inside
/// one; only a line longer than the cap (a line is at most 16 KiB) makes a file larger.
pub(super) struct Log {
    path: PathBuf,
    before: PathBuf,
    file: File,
    len: u64,
    cap: u64,
}

impl Log {
    pub(super) fn open(dir: &Path, cap: u64) -> std::io::Result<Log> {
        let path = dir.join(LOG);
        let file = owner_only_append(&path)?;
        let len = file.metadata()?.len();
        Ok(Log {
            before: dir.join(LOG_BEFORE),
            path,
            file,
            len,
            cap,
        })
    }

    /// Renames `log` to `log.1` and begins a new `log`. On failure the current file stays
    /// `log` and is still the one written, so the next rotation starts from the same place.
    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, &self.before)?;
        match owner_only_append(&self.path) {
            Ok(file) => {
                self.file = file;
                self.len = 0;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::rename(&self.before, &self.path);
                Err(e)
            }
        }
    }
}

/// Opens `path` for appending, made 0600 whatever the umask: a workload's output may hold
/// anything it prints.
fn owner_only_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl Sink for Log {
    fn append(&mut self, mut lines: &[u8]) {
        while !lines.is_empty() {
            let room = usize::try_from(self.cap.saturating_sub(self.len)).unwrap_or(usize::MAX);
            let take = if lines.len() <= room {
                lines.len()
            } else {
                // The whole lines that fit; an empty file takes one line, however long.
                match lines[..room].iter().rposition(|&b| b == b'\n') {
                    Some(end) => end + 1,
                    None if self.len == 0 => lines
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(lines.len(), |end| end + 1),
                    None => 0,
                }
            };
            let (now, rest) = lines.split_at(take);
            if self.file.write_all(now).is_err() {
                return;
            }
            self.len += take as u64;
            lines = rest;
            // When rotating fails (the disk is full, say) the rest goes to the current file,
            // and the next write tries again.
            if !lines.is_empty() && self.rotate().is_err() {
                if self.file.write_all(lines).is_ok() {
                    self.len += lines.len() as u64;
                }
                return;
            }
        }
    }
}

/// Reads an instance's log from its first line on, across rotations. It keeps the file it
/// reads open, so a rotation never cuts it short; only output rotated out twice between two
/// reads (more than twice the cap) is missed, and that is gone from the disk too.
pub struct LogFollower {
    dir: PathBuf,
    /// The file being read and its inode.
    current: Option<(File, u64)>,
}

impl LogFollower {
    pub fn new(dir: &Path) -> LogFollower {
        LogFollower {
            dir: dir.to_owned(),
            current: None,
        }
    }

    /// Appends to `out` what was logged since the last call (everything, the first time).
    pub fn read_new(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        // `log` is opened before our file is read: if it is another file by then, ours was
        // renamed away already, and the shim wrote its last lines to it before that.
        let latest = open(&self.dir.join(LOG))?;
        if let Some((file, _)) = &mut self.current {
            file.read_to_end(out)?;
        }
        let Some((mut latest, latest_inode)) = latest else {
            return Ok(());
        };
        let ours = self.current.as_ref().map(|(_, inode)| *inode);
        if ours == Some(latest_inode) {
            return Ok(());
        }
        // The file between ours and the latest, or the one before the latest when we start.
        if let Some((mut before, inode)) = open(&self.dir.join(LOG_BEFORE))?
            && Some(inode) != ours
            && inode != latest_inode
        {
            before.read_to_end(out)?;
        }
        latest.read_to_end(out)?;
        self.current = Some((latest, latest_inode));
        Ok(())
    }
}

/// The file and its inode, or `None` when it does not exist.
fn open(path: &Path) -> std::io::Result<Option<(File, u64)>> {
    match File::open(path) {
        Ok(file) => {
            let inode = file.metadata()?.ino();
            Ok(Some((file, inode)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// One captured log line, split back into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    pub text: &'a str,
}

pub fn parse_log_line(line: &str) -> Option<LogLine<'_>> {
    let (time, rest) = line.split_once(' ')?;
    let (stream, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(LogLine { time, stream, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` lines `<first + i>\n`, as one write.
    fn batch(first: usize, count: usize) -> Vec<u8> {
        (first..first + count)
            .map(|i| format!("{i:04}\n"))
            .collect::<String>()
            .into_bytes()
    }

    fn numbers(bytes: &[u8]) -> Vec<usize> {
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    fn read(dir: &Path, name: &str) -> Vec<u8> {
        std::fs::read(dir.join(name)).unwrap_or_default()
    }

    /// The line numbers in `log.1` and in `log`.
    fn both(dir: &Path) -> (Vec<usize>, Vec<usize>) {
        (numbers(&read(dir, LOG_BEFORE)), numbers(&read(dir, LOG)))
    }

    #[test]
    fn the_log_rotates_between_lines_and_keeps_one_earlier_file() {
        let dir = tempfile::tempdir().unwrap();
        // Lines of 5 bytes, 4 per write, cap 50: a file holds 10 lines, cut inside a write.
        let mut log = Log::open(dir.path(), 50).unwrap();
        for n in 0..7 {
            log.append(&batch(n * 4, 4));
        }
        // 0-9 and 10-19 each filled a file; 20-27 began the third. The first is gone; the
        // newest two hold whole lines, in order, up to the last.
        assert_eq!(both(dir.path()), ((10..20).collect(), (20..28).collect()));
        // One write of many times the cap: only its last lines stay, cut the same way.
        log.append(&batch(28, 100));
        assert_eq!(
            both(dir.path()),
            ((110..120).collect(), (120..128).collect())
        );
        // A line longer than the cap is kept whole, in a file of its own.
        let long = format!("{}\n", "7".repeat(80));
        log.append(format!("{long}0128\n").as_bytes());
        assert_eq!(read(dir.path(), LOG_BEFORE), long.as_bytes());
        assert_eq!(numbers(&read(dir.path(), LOG)), [128]);
    }

    #[test]
    fn a_reopened_log_counts_what_it_already_holds() {
        let dir = tempfile::tempdir().unwrap();
        Log::open(dir.path(), 50).unwrap().append(&batch(0, 8));
        let mut log = Log::open(dir.path(), 50).unwrap();
        log.append(&batch(8, 4));
        assert_eq!(both(dir.path()), ((0..10).collect(), (10..12).collect()));
    }

    #[test]
    fn a_rotation_that_fails_loses_no_line_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where `log.1` would go: renaming `log` onto it fails.
        std::fs::create_dir_all(dir.path().join(LOG_BEFORE).join("x")).unwrap();
        let mut log = Log::open(dir.path(), 50).unwrap();
        log.append(&batch(0, 8));
        log.append(&batch(8, 8));
        assert_eq!(numbers(&read(dir.path(), LOG)), (0..16).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir.path().join(LOG_BEFORE)).unwrap();
        log.append(&batch(16, 2));
        assert_eq!(both(dir.path()), ((0..16).collect(), vec![16, 17]));
    }

    #[test]
    fn the_follower_reads_every_line_across_a_rotation_between_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut follower = LogFollower::new(dir.path());
        let mut seen = Vec::new();
        follower.read_new(&mut seen).unwrap();
        assert!(seen.is_empty(), "no log yet");
        let mut log = Log::open(dir.path(), 50).unwrap();
        let mut next = 0;
        for writes_between_reads in [1, 2, 3, 1, 4, 0, 2] {
            for _ in 0..writes_between_reads {
                log.append(&batch(next, 4));
                next += 4;
            }
            follower.read_new(&mut seen).unwrap();
            assert_eq!(numbers(&seen), (0..next).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_new_follower_starts_with_the_earlier_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 50).unwrap();
        for n in 0..3 {
            log.append(&batch(n * 4, 4));
        }
        let mut seen = Vec::new();
        LogFollower::new(dir.path()).read_new(&mut seen).unwrap();
        assert_eq!(numbers(&seen), (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn output_rotated_out_twice_between_reads_is_missed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 20).unwrap();
        let mut follower = LogFollower::new(dir.path());
        let mut seen = Vec::new();
        log.append(&batch(0, 4));
        follower.read_new(&mut seen).unwrap();
        // Four rotations before the next read: the files of 4-7 and 8-11 are gone from the
        // disk by then; the one being read (0-3) and the newest two are all read.
        for n in 1..5 {
            log.append(&batch(n * 4, 4));
        }
        follower.read_new(&mut seen).unwrap();
        let expected: Vec<usize> = (0..4).chain(12..20).collect();
        assert_eq!(numbers(&seen), expected);
    }

    #[test]
    fn log_lines_split_back() {
        assert_eq!(
            parse_log_line("2026-11-22T00:00:00.123Z stdout hello world"),
            Some(LogLine {
                time: "2026-11-22T00:00:00.123Z",
                stream: "stdout",
                text: "hello world"
            })
        );
        assert_eq!(
            parse_log_line("2026-11-22T00:00:00.123Z stderr"),
            Some(LogLine {
                time: "2026-11-22T00:00:00.123Z",
                stream: "stderr",
                text: ""
            })
        );
    }
}
