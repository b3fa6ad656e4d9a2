//! A `Feed` and a `Sink` on files, enough for a forwarder that restarts and for tests that
//! read what was received from another process: records as JSON lines, the delivered cursor
//! in a file of its own (written to a temp file and renamed, so a crash leaves the old one or
//! the new one). The store's own implementations replace these.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Cursor, Feed, OutRecord, Received, Sink, SyslogError};

/// Records appended as JSON lines to `path` by someone else, read in order; the delivered
/// cursor is kept in `cursor_path`, and a feed opened again starts after it.
#[derive(Debug)]
pub struct FileFeed {
    path: PathBuf,
    cursor_path: PathBuf,
    reader: BufReader<File>,
    after: Option<Cursor>,
    partial: String,
}

impl FileFeed {
    pub fn open(path: &Path, cursor_path: &Path) -> Result<FileFeed, SyslogError> {
        let error = |source| SyslogError::Feed {
            name: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(error)?;
        let after = match fs::read_to_string(cursor_path) {
            Ok(text) => text.trim().parse().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(error(e)),
        };
        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(0)).map_err(error)?;
        Ok(FileFeed {
            path: path.to_owned(),
            cursor_path: cursor_path.to_owned(),
            reader,
            after,
            partial: String::new(),
        })
    }

    fn error(&self, source: std::io::Error) -> SyslogError {
        SyslogError::Feed {
            name: self.path.display().to_string(),
            source,
        }
    }

    /// Appends a record (the test's writer side).
    pub fn append(path: &Path, record: &OutRecord) -> std::io::Result<()> {
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        file.write_all(&line)
    }
}

impl Feed for FileFeed {
    fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<OutRecord>, SyslogError> {
        let deadline = Instant::now() + wait;
        let mut batch = Vec::new();
        loop {
            while batch.len() < max {
                let read = self
                    .reader
                    .read_line(&mut self.partial)
                    .map_err(|e| self.error(e))?;
                if read == 0 || !self.partial.ends_with('\n') {
                    break;
                }
                let record: OutRecord = serde_json::from_str(&self.partial)
                    .map_err(|e| self.error(std::io::Error::other(e)))?;
                self.partial.clear();
                if self.after.is_none_or(|a| record.cursor > a) {
                    batch.push(record);
                }
            }
            if !batch.is_empty() || Instant::now() >= deadline {
                return Ok(batch);
            }
            // A file has no change notification worth its weight here: poll briefly.
            std::thread::sleep(Duration::from_millis(10).min(wait));
        }
    }

    fn delivered(&mut self, cursor: Cursor) -> Result<(), SyslogError> {
        let temp = self.cursor_path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temp)?;
            file.write_all(cursor.to_string().as_bytes())?;
            file.sync_data()?;
            fs::rename(&temp, &self.cursor_path)
        };
        write().map_err(|e| self.error(e))
    }
}

/// Received messages appended to a file as JSON lines.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
}

impl FileSink {
    pub fn create(path: &Path) -> Result<FileSink, SyslogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| SyslogError::Sink {
                name: path.display().to_string(),
                source,
            })?;
        Ok(FileSink {
            path: path.to_owned(),
            file,
        })
    }

    /// Every message the file holds.
    pub fn read(path: &Path) -> std::io::Result<Vec<Received>> {
        let text = fs::read_to_string(path)?;
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
            .collect()
    }
}

impl Sink for FileSink {
    fn accept(&mut self, batch: Vec<Received>) -> Result<(), SyslogError> {
        let mut out = Vec::new();
        for r in &batch {
            serde_json::to_writer(&mut out, r).map_err(|e| SyslogError::Sink {
                name: self.path.display().to_string(),
                source: std::io::Error::other(e),
            })?;
            out.push(b'\n');
        }
        self.file
            .write_all(&out)
            .map_err(|source| SyslogError::Sink {
                name: self.path.display().to_string(),
                source,
            })
    }
}
