//! The log store as syslog's feed and sink. What the control plane forwards comes from the
//! store (`StoreFeed`: a `Follower` over an app's sources, its cursor kept in a file so that a
//! restarted forwarder resumes where the server last confirmed); what its listener receives
//! goes into the store (`StoreSink`: one `Writer` per sending host and APP-NAME, under the
//! app `_syslog`, so `graven logs --app _syslog [APP-NAME]` shows them).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::ingest::Writer;
use super::read::{Cursor as StoreCursor, Follower, Query};
use super::syslog::{self, Cursor, Feed, OutRecord, Received, Sink, SyslogError};
use super::{Meta, Stream};

/// The app the lines other machines send are filed under.
pub const SYSLOG_APP: &str = "_syslog";

/// An app's lines, in time order, for one forward destination.
pub struct StoreFeed {
    follower: Follower,
    /// The number the next record gets: the forwarder's cursor, counted from this feed's
    /// start (the store's own position is `StoreCursor`, a map per source).
    next: Cursor,
    /// After each poll, the store's position once every record up to that number is dealt
    /// with: `delivered` persists the latest one reached.
    marks: VecDeque<(Cursor, StoreCursor)>,
    ready: VecDeque<OutRecord>,
    path: PathBuf,
}

fn feed_error(path: &Path) -> impl FnOnce(std::io::Error) -> SyslogError + '_ {
    move |source| SyslogError::Feed {
        name: path.display().to_string(),
        source,
    }
}

impl StoreFeed {
    /// Follows the sources `query` selects from the position saved in `cursor_file` (from
    /// the store's end when there is none: a new destination gets what is written from now
    /// on, not the whole history).
    pub fn open(home: &Path, query: Query, cursor_file: PathBuf) -> StoreFeed {
        let saved = std::fs::read(&cursor_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<StoreCursor>(&bytes).ok());
        let follower = match saved {
            Some(cursor) => Follower::new(home, query, cursor),
            None => {
                let mut follower = Follower::new(home, query, StoreCursor::default());
                // Everything already stored is skipped once, so only new lines go out.
                while !follower.poll().is_empty() {}
                follower
            }
        };
        StoreFeed {
            follower,
            next: 1,
            marks: VecDeque::new(),
            ready: VecDeque::new(),
            path: cursor_file,
        }
    }

    fn fill(&mut self) {
        let records = self.follower.poll();
        if records.is_empty() {
            return;
        }
        for record in records {
            let meta = &record.source.meta;
            self.ready.push_back(OutRecord {
                time: UNIX_EPOCH + Duration::from_nanos(record.time_ns),
                app: meta.app.clone(),
                environment: meta.environment.clone(),
                service: meta.service.clone(),
                release: meta.release.unwrap_or(0),
                instance: meta.instance.clone(),
                stream: match record.stream {
                    Stream::Stdout => syslog::Stream::Stdout,
                    Stream::Stderr => syslog::Stream::Stderr,
                },
                line: record.line,
                cursor: self.next,
            });
            self.next += 1;
        }
        self.marks
            .push_back((self.next - 1, self.follower.cursor().clone()));
    }
}

impl Feed for StoreFeed {
    fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<OutRecord>, SyslogError> {
        let deadline = Instant::now() + wait;
        while self.ready.is_empty() {
            self.fill();
            if !self.ready.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50).min(wait));
        }
        let n = self.ready.len().min(max);
        Ok(self.ready.drain(..n).collect())
    }

    fn delivered(&mut self, cursor: Cursor) -> Result<(), SyslogError> {
        let mut reached = None;
        while self.marks.front().is_some_and(|(last, _)| *last <= cursor) {
            reached = self.marks.pop_front().map(|(_, position)| position);
        }
        let Some(position) = reached else {
            return Ok(());
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(feed_error(&self.path))?;
        serde_json::to_writer(&mut temp, &position)
            .map_err(|e| feed_error(&self.path)(e.into()))?;
        temp.persist(&self.path)
            .map_err(|e| feed_error(&self.path)(e.error))?;
        Ok(())
    }
}

/// Received messages into the store, a source per sending host and APP-NAME.
pub struct StoreSink {
    home: PathBuf,
    writers: BTreeMap<(String, String), Writer>,
}

impl StoreSink {
    pub fn new(home: &Path) -> StoreSink {
        StoreSink {
            home: home.to_owned(),
            writers: BTreeMap::new(),
        }
    }
}

/// A host or APP-NAME as a source's name: what the store accepts (no `/`, no leading dot).
fn plain(name: Option<&str>) -> String {
    let name: String = name
        .unwrap_or("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match name.trim_start_matches('.') {
        "" => "-".to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

impl Sink for StoreSink {
    fn accept(&mut self, batch: Vec<Received>) -> Result<(), SyslogError> {
        let sink_error = |source: std::io::Error| SyslogError::Sink {
            name: self.home.display().to_string(),
            source,
        };
        let mut touched = Vec::new();
        for message in batch {
            let host = plain(message.hostname.as_deref());
            let app_name = plain(message.app_name.as_deref());
            let key = (host.clone(), app_name.clone());
            if !self.writers.contains_key(&key) {
                let meta = Meta {
                    app: SYSLOG_APP.to_owned(),
                    environment: host.clone(),
                    service: app_name.clone(),
                    release: None,
                    instance: host.clone(),
                    id: String::new(),
                    started_at_ms: super::now_ns() / 1_000_000,
                };
                let group = format!("{SYSLOG_APP}/{host}");
                let writer = Writer::open_with(&self.home, &group, &app_name, &meta)
                    .map_err(|e| sink_error(std::io::Error::other(e.to_string())))?;
                self.writers.insert(key.clone(), writer);
            }
            // Filed at the time it arrived (the sender's own clock may run backwards; the
            // store's times only grow within a source).
            let writer = self.writers.get_mut(&key).expect("opened above");
            writer
                .append(message.received, &message.message)
                .map_err(|e| sink_error(std::io::Error::other(e.to_string())))?;
            touched.push(key);
        }
        // Durable before the batch counts as taken: a TCP sender's lines are then on disk.
        touched.sort();
        touched.dedup();
        for key in touched {
            if let Some(writer) = self.writers.get_mut(&key) {
                writer
                    .sync()
                    .map_err(|e| sink_error(std::io::Error::other(e.to_string())))?;
            }
        }
        Ok(())
    }
}
