//! The event log's storage: an append-only table of versioned, checksummed envelopes in an
//! embedded SQLite database.
//!
//! Durability: WAL with `synchronous=FULL`, so when `append` returns the event is on disk
//! and the controller may act on it. Sequence numbers start at 1 and have no gaps; they are
//! assigned inside an immediate (write-locked) transaction, so several handles, even in
//! several processes, append safely. Reading never skips: a row whose checksum, version or
//! payload does not hold, or a gap in the sequence, is an error naming the sequence number.
//! The log is generic over the payload; what events mean is the fold's business.
//!
//! A shortened log is caught too. SQLite takes a WAL whose frames do not check out, or a lost
//! `-wal` file, as the end of the log, and would start on a shorter history without a word.
//! So after each durable append the highest sequence number ever appended is written to a
//! mark file beside the database (`events.db.seq`: a temp file, fsynced, renamed, the
//! directory fsynced). `open` refuses a log that ends before its mark, naming both numbers;
//! `recover` is the way on: it records the loss as an event numbered after the mark, so no
//! sequence number (and, through the fold, no release or instance number) is used twice.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The envelope format this graven writes and the newest it reads. It is the payload's
/// vocabulary version too: `EventKind::decode` reads every older one (version 1 is upcast).
pub const ENVELOPE_VERSION: u32 = 2;
/// The database layout (`PRAGMA user_version`) this graven writes and the newest it opens.
/// Layout 2 adds the `snapshots` table; a layout-1 log gains it when opened.
pub const SCHEMA_VERSION: i64 = 2;

/// What an event's payload says it is, stored beside it so queries need not parse JSON.
pub trait EventKind {
    fn kind(&self) -> &'static str;

    /// The loss this event records, if it is the one `EventLog::recover` appends: the
    /// reader lets the gap it describes pass, and no other.
    fn loss(&self) -> Option<Loss> {
        None
    }

    /// Reads a payload written under envelope `version`; a vocabulary that changed reads its
    /// older versions here (upcasting), so the log is never rewritten.
    fn decode(version: u32, payload: &str) -> Result<Self, serde_json::Error>
    where
        Self: Sized + DeserializeOwned,
    {
        let _ = version;
        serde_json::from_str(payload)
    }
}

/// Events lost from a log's end: the log kept them up to `kept_through`, while its mark said
/// `lost_through` had been appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    pub kept_through: u64,
    pub lost_through: u64,
}

/// One event as stored: its place in the log, when and by whom it was appended, and the fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub seq: u64,
    /// Milliseconds since the Unix epoch, as the appender's clock said.
    pub at_ms: u64,
    /// Who appended it: "controller", "cli", an instance's id…
    pub actor: String,
    pub version: u32,
    pub payload: T,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event log {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "event log {path} has schema version {found}; this graven reads up to {supported}: \
         upgrade graven"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("event {seq}: envelope version {version} is newer than {supported}: upgrade graven")]
    NewerEnvelope {
        seq: u64,
        version: i64,
        supported: u32,
    },
    #[error("event {seq} is corrupt: {reason}")]
    Corrupt { seq: i64, reason: String },
    #[error("event {seq}: the payload does not decode: {source}")]
    BadPayload { seq: u64, source: serde_json::Error },
    #[error("event log {path}: event {expected} is missing (the next stored one is {found})")]
    Gap {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "event log {path} ends at event {found}, but {} records that event {expected} was \
         appended: its end is lost (a damaged or missing WAL?); `graven recover` records the \
         loss and goes on after event {expected}, using no number twice",
        mark.display()
    )]
    Shortened {
        path: PathBuf,
        mark: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("event log mark {}: {reason}", path.display())]
    BadMark { path: PathBuf, reason: String },
    #[error("event of kind {kind} does not encode: {source}")]
    Encode {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("actor {actor:?} may not be empty or contain '|' or control characters")]
    BadActor { actor: String },
    #[error("event time {at_ms} is out of range")]
    BadTime { at_ms: u64 },
}

/// A row as SQLite holds it, before any of it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub version: i64,
    pub kind: String,
    pub payload: String,
    pub checksum: String,
}

/// The sha256, in hex, over `seq|at_ms|actor|version|payload`. Actors never contain '|'
/// and the other fields before the payload are numbers, so the joined form is unambiguous.
pub fn checksum(seq: i64, at_ms: i64, actor: &str, version: i64, payload: &str) -> String {
    let joined = format!("{seq}|{at_ms}|{actor}|{version}|{payload}");
    hex::encode(sha2::Sha256::digest(joined.as_bytes()))
}

/// Checks one stored row and decodes its payload as it is, whatever its version: pure, so a
/// fuzzer can drive it.
pub fn decode_envelope<T: DeserializeOwned>(row: &RawRow) -> Result<Envelope<T>, EventLogError> {
    decode_envelope_with(row, |_, payload| serde_json::from_str(payload))
}

/// Checks one stored row and decodes its payload as its version says (`EventKind::decode`).
pub fn decode_event<T: DeserializeOwned + EventKind>(
    row: &RawRow,
) -> Result<Envelope<T>, EventLogError> {
    decode_envelope_with(row, T::decode)
}

fn decode_envelope_with<T>(
    row: &RawRow,
    decode: impl FnOnce(u32, &str) -> Result<T, serde_json::Error>,
) -> Result<Envelope<T>, EventLogError> {
    let corrupt = |reason: String| EventLogError::Corrupt {
        seq: row.seq,
        reason,
    };
    let seq = u64::try_from(row.seq)
        .ok()
        .filter(|seq| *seq > 0)
        .ok_or_else(|| corrupt("the sequence number is not positive".into()))?;
    let at_ms = u64::try_from(row.at_ms)
        .map_err(|_| corrupt(format!("the time {} is negative", row.at_ms)))?;
    let expected = checksum(row.seq, row.at_ms, &row.actor, row.version, &row.payload);
    if expected != row.checksum {
        return Err(corrupt(format!(
            "checksum mismatch: stored {}, content hashes to {expected}",
            row.checksum
        )));
    }
    let version = match u32::try_from(row.version) {
        Ok(version) if version > ENVELOPE_VERSION => {
            return Err(EventLogError::NewerEnvelope {
                seq,
                version: row.version,
                supported: ENVELOPE_VERSION,
            });
        }
        Ok(version) if version >= 1 => version,
        _ => {
            return Err(corrupt(format!(
                "envelope version {} is not valid",
                row.version
            )));
        }
    };
    let payload = decode(version, &row.payload)
        .map_err(|source| EventLogError::BadPayload { seq, source })?;
    Ok(Envelope {
        seq,
        at_ms,
        actor: row.actor.clone(),
        version,
        payload,
    })
}

fn valid_actor(actor: &str) -> bool {
    !actor.is_empty() && !actor.contains('|') && !actor.chars().any(char::is_control)
}

/// The append-only event log of one graven home. `Send + Sync`: one connection behind a
/// mutex; several `EventLog`s (or processes) on the same file serialize through SQLite.
pub struct EventLog {
    path: PathBuf,
    connection: Mutex<Connection>,
    mark: Mark,
}

/// The file beside the database recording the highest sequence number ever appended.
#[derive(Debug)]
struct Mark {
    path: PathBuf,
}

impl Mark {
    fn of(log: &Path) -> Mark {
        let mut name = log.file_name().unwrap_or_default().to_owned();
        name.push(".seq");
        Mark {
            path: log.with_file_name(name),
        }
    }

    fn bad(&self, reason: String) -> EventLogError {
        EventLogError::BadMark {
            path: self.path.clone(),
            reason,
        }
    }

    /// The recorded sequence number, or `None` when there is no mark yet.
    fn read(&self) -> Result<Option<u64>, EventLogError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.bad(format!("{:?} is not a sequence number", text.trim()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(self.bad(error.to_string())),
        }
    }

    /// Whether the mark records `seq` or more; an unreadable mark records nothing, and is
    /// replaced by the next raise.
    fn covers(&self, seq: u64) -> bool {
        matches!(self.read(), Ok(Some(marked)) if marked >= seq)
    }

    /// Raises the mark to `seq`, durably; never lowers it.
    fn raise(&self, seq: u64) -> Result<(), EventLogError> {
        // Most opens find the mark current: they write nothing.
        if self.covers(seq) {
            return Ok(());
        }
        self.stage(seq)?.install()
    }

    /// Writes `seq` to a temp file beside the mark and fsyncs it. Done before an append
    /// commits, so a full disk fails the append (nothing appended) rather than leave an
    /// event its mark does not know.
    fn stage(&self, seq: u64) -> Result<StagedMark<'_>, EventLogError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let io = |error: std::io::Error| self.bad(error.to_string());
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        std::io::Write::write_all(&mut temp, format!("{seq}\n").as_bytes()).map_err(io)?;
        temp.as_file().sync_all().map_err(io)?;
        let dir = std::fs::File::open(dir).map_err(io)?;
        Ok(StagedMark {
            mark: self,
            seq,
            temp,
            dir,
        })
    }
}

/// A mark written and fsynced, not yet in place.
struct StagedMark<'a> {
    mark: &'a Mark,
    seq: u64,
    temp: tempfile::NamedTempFile,
    dir: std::fs::File,
}

impl StagedMark<'_> {
    /// Renames it over the mark unless that records `seq` or more already. Appenders in
    /// other processes serialize on a lock of the directory, so a slower one cannot put an
    /// older number over a newer.
    fn install(self) -> Result<(), EventLogError> {
        let io = |error: std::io::Error| self.mark.bad(error.to_string());
        rustix::fs::flock(&self.dir, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(e.into()))?;
        if self.mark.covers(self.seq) {
            return Ok(());
        }
        self.temp
            .persist(&self.mark.path)
            .map_err(|e| io(e.error))?;
        self.dir.sync_all().map_err(io)
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("path", &self.path)
            .finish()
    }
}

impl EventLog {
    /// Opens the log at `path`, creating its directory and schema when new. Refuses a log
    /// written by a newer graven rather than misreading it, and one that ends before the
    /// last event its mark records (`EventLogError::Shortened`).
    pub fn open(path: &Path) -> Result<EventLog, EventLogError> {
        let log = EventLog::open_unchecked(path)?;
        let found = log.last_seq()?;
        match log.mark.read()? {
            Some(expected) if expected > found => Err(EventLogError::Shortened {
                path: path.to_owned(),
                mark: log.mark.path.clone(),
                expected,
                found,
            }),
            // A log older than marks, or a mark whose last raise failed: it catches up.
            Some(_) | None => {
                log.mark.raise(found)?;
                Ok(log)
            }
        }
    }

    /// Opens a log that `open` refuses as shortened and carries on after its loss: appends
    /// the event `lost` makes, numbered one after the mark, so no sequence number is used
    /// twice. A damaged mark counts as none. Returns that event, or `None` when nothing
    /// was lost.
    pub fn recover<T: Serialize + EventKind + Clone>(
        path: &Path,
        actor: &str,
        at_ms: u64,
        lost: impl FnOnce(Loss) -> T,
    ) -> Result<Option<Envelope<T>>, EventLogError> {
        let log = EventLog::open_unchecked(path)?;
        let found = log.last_seq()?;
        let expected = match log.mark.read() {
            Ok(marked) => marked.unwrap_or(0),
            Err(EventLogError::BadMark { .. }) => found,
            Err(error) => return Err(error),
        };
        if expected <= found {
            log.mark.raise(found)?;
            return Ok(None);
        }
        let loss = Loss {
            kept_through: found,
            lost_through: expected,
        };
        log.append_at(actor, at_ms, &lost(loss), Some(expected + 1))
            .map(Some)
    }

    fn open_unchecked(path: &Path) -> Result<EventLog, EventLogError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| EventLogError::Io {
                    path: path.to_owned(),
                    source,
                })?;
        }
        // The log is made 0600 before SQLite opens it, whatever the umask, and one an older
        // graven made wider is tightened; SQLite gives its -wal and -shm files the mode of
        // the database file.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .and_then(|file| {
                use std::os::unix::fs::PermissionsExt;
                match file.metadata()?.permissions().mode() & 0o077 {
                    0 => Ok(()),
                    _ => file.set_permissions(std::fs::Permissions::from_mode(0o600)),
                }
            })
            .map_err(|source| EventLogError::Io {
                path: path.to_owned(),
                source,
            })?;
        let sqlite = |source| EventLogError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut connection = Connection::open(path).map_err(sqlite)?;
        // Another handle may hold the write lock for the length of one append.
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sqlite)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite)?;
        let found: i64 = transaction
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite)?;
        if found > SCHEMA_VERSION {
            return Err(EventLogError::NewerSchema {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found == 0 {
            transaction
                .execute_batch(
                    "CREATE TABLE events (
                        seq INTEGER PRIMARY KEY,
                        at_ms INTEGER NOT NULL,
                        actor TEXT NOT NULL,
                        version INTEGER NOT NULL,
                        kind TEXT NOT NULL,
                        payload TEXT NOT NULL,
                        checksum TEXT NOT NULL
                    );
                    CREATE INDEX events_by_kind ON events (kind, seq);",
                )
                .map_err(sqlite)?;
        }
        if found < 2 {
            // A snapshot of the folded state at `seq`, in the format `version` names; the
            // events stay, so a snapshot only shortens start-up and never loses history.
            transaction
                .execute_batch(
                    "CREATE TABLE snapshots (
                        seq INTEGER PRIMARY KEY,
                        version INTEGER NOT NULL,
                        state TEXT NOT NULL,
                        checksum TEXT NOT NULL
                    );",
                )
                .map_err(sqlite)?;
            transaction
                .pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sqlite)?;
        }
        transaction.commit().map_err(sqlite)?;
        Ok(EventLog {
            path: path.to_owned(),
            connection: Mutex::new(connection),
            mark: Mark::of(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written event (SQLite rolls
        // the transaction back), so a poisoned lock is still safe to use.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sqlite(&self) -> impl FnOnce(rusqlite::Error) -> EventLogError + '_ {
        |source| EventLogError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends one event; when this returns `Ok` the event is durable on disk, and so is
    /// the mark that says it was appended (but for its final rename: should that fail, the
    /// mark lags until the next append).
    pub fn append<T: Serialize + EventKind + Clone>(
        &self,
        actor: &str,
        at_ms: u64,
        payload: &T,
    ) -> Result<Envelope<T>, EventLogError> {
        self.append_at(actor, at_ms, payload, None)
    }

    /// Appends at the next sequence number, or at `seq` (a recovery, past a lost end).
    fn append_at<T: Serialize + EventKind + Clone>(
        &self,
        actor: &str,
        at_ms: u64,
        payload: &T,
        seq: Option<u64>,
    ) -> Result<Envelope<T>, EventLogError> {
        if !valid_actor(actor) {
            return Err(EventLogError::BadActor {
                actor: actor.to_owned(),
            });
        }
        let at = i64::try_from(at_ms).map_err(|_| EventLogError::BadTime { at_ms })?;
        let kind = payload.kind();
        let json = serde_json::to_string(payload)
            .map_err(|source| EventLogError::Encode { kind, source })?;
        let version = i64::from(ENVELOPE_VERSION);
        let mut connection = self.connection();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite())?;
        let next: i64 = transaction
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM events", [], |row| {
                row.get(0)
            })
            .map_err(self.sqlite())?;
        let seq = seq.map_or(next, |seq| next.max(seq as i64));
        let staged = self.mark.stage(seq as u64)?;
        transaction
            .execute(
                "INSERT INTO events (seq, at_ms, actor, version, kind, payload, checksum)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    seq,
                    at,
                    actor,
                    version,
                    kind,
                    json,
                    checksum(seq, at, actor, version, &json)
                ],
            )
            .map_err(self.sqlite())?;
        transaction.commit().map_err(self.sqlite())?;
        // Installed while the connection is still held, so this process's marks rise in
        // order. The event is durable already: should the rename fail, the mark only lags
        // (the next append's puts it right), so the append still succeeds.
        let _ = staged.install();
        drop(connection);
        Ok(Envelope {
            seq: seq as u64,
            at_ms,
            actor: actor.to_owned(),
            version: ENVELOPE_VERSION,
            payload: payload.clone(),
        })
    }

    /// Every event after `after_seq`, in order, each one verified. The only gap allowed is
    /// the one a recovery's event records.
    pub fn read_after<T: DeserializeOwned + EventKind>(
        &self,
        after_seq: u64,
    ) -> Result<Vec<Envelope<T>>, EventLogError> {
        self.read_page(after_seq, usize::MAX)
    }

    /// At most `limit` events after `after_seq`, in order, each one verified: a page of
    /// history, so that a reader of a long log never holds all of it at once.
    pub fn read_page<T: DeserializeOwned + EventKind>(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Envelope<T>>, EventLogError> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        // SQLite reads a negative LIMIT as none.
        let limit = i64::try_from(limit).unwrap_or(-1);
        let connection = self.connection();
        let mut statement = connection
            .prepare_cached(
                "SELECT seq, at_ms, actor, version, kind, payload, checksum
                 FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.sqlite())?;
        let rows = statement
            .query_map([after, limit], |row| {
                Ok(RawRow {
                    seq: row.get(0)?,
                    at_ms: row.get(1)?,
                    actor: row.get(2)?,
                    version: row.get(3)?,
                    kind: row.get(4)?,
                    payload: row.get(5)?,
                    checksum: row.get(6)?,
                })
            })
            .map_err(self.sqlite())?;
        let mut events = Vec::new();
        let mut expected = after_seq + 1;
        for row in rows {
            let envelope: Envelope<T> = decode_event(&row.map_err(self.sqlite())?)?;
            let recovered = envelope.payload.loss().is_some_and(|loss| {
                loss.lost_through + 1 == envelope.seq && loss.kept_through < expected
            });
            if envelope.seq != expected && !recovered {
                return Err(EventLogError::Gap {
                    path: self.path.clone(),
                    expected,
                    found: envelope.seq,
                });
            }
            expected = envelope.seq + 1;
            events.push(envelope);
        }
        Ok(events)
    }

    /// Appends several events in one transaction: one fsync for all of them, durable
    /// together when this returns. For bulk writes (a benchmark's history); the controller
    /// appends each decision on its own, before its effect.
    pub fn append_many<T: Serialize + EventKind + Clone>(
        &self,
        actor: &str,
        at_ms: u64,
        payloads: &[T],
    ) -> Result<u64, EventLogError> {
        if !valid_actor(actor) {
            return Err(EventLogError::BadActor {
                actor: actor.to_owned(),
            });
        }
        let at = i64::try_from(at_ms).map_err(|_| EventLogError::BadTime { at_ms })?;
        let version = i64::from(ENVELOPE_VERSION);
        let mut connection = self.connection();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite())?;
        let mut seq: i64 = transaction
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |row| {
                row.get(0)
            })
            .map_err(self.sqlite())?;
        {
            let mut insert = transaction
                .prepare_cached(
                    "INSERT INTO events (seq, at_ms, actor, version, kind, payload, checksum)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(self.sqlite())?;
            for payload in payloads {
                seq += 1;
                let kind = payload.kind();
                let json = serde_json::to_string(payload)
                    .map_err(|source| EventLogError::Encode { kind, source })?;
                let sum = checksum(seq, at, actor, version, &json);
                insert
                    .execute(params![seq, at, actor, version, kind, json, sum])
                    .map_err(self.sqlite())?;
            }
        }
        let staged = self.mark.stage(seq as u64)?;
        transaction.commit().map_err(self.sqlite())?;
        let _ = staged.install();
        Ok(seq as u64)
    }

    /// Stores a snapshot of the state folded through `seq`, in format `version`, checksummed
    /// like an event. Older snapshots are removed: only the newest is ever read.
    pub fn save_snapshot(&self, seq: u64, version: u32, state: &str) -> Result<(), EventLogError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let version = i64::from(version);
        let sum = checksum(seq, 0, "snapshot", version, state);
        let mut connection = self.connection();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sqlite())?;
        transaction
            .execute(
                "INSERT OR REPLACE INTO snapshots (seq, version, state, checksum)
                 VALUES (?1, ?2, ?3, ?4)",
                params![seq, version, state, sum],
            )
            .map_err(self.sqlite())?;
        transaction
            .execute("DELETE FROM snapshots WHERE seq < ?1", [seq])
            .map_err(self.sqlite())?;
        transaction.commit().map_err(self.sqlite())
    }

    /// The newest snapshot in format `version`, as (seq, state), if there is one whose
    /// checksum holds and that the log reaches (a snapshot past the log's end, left by a
    /// lost tail, is not used). A snapshot in another format is not used either: the caller
    /// folds the whole log instead.
    pub fn load_snapshot(&self, version: u32) -> Result<Option<(u64, String)>, EventLogError> {
        let last = self.last_seq()?;
        let connection = self.connection();
        let row: Option<(i64, i64, String, String)> = connection
            .query_row(
                "SELECT seq, version, state, checksum FROM snapshots ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()
            .map_err(self.sqlite())?;
        let Some((seq, found, state, sum)) = row else {
            return Ok(None);
        };
        let usable = found == i64::from(version)
            && checksum(seq, 0, "snapshot", found, &state) == sum
            && u64::try_from(seq).is_ok_and(|seq| seq <= last);
        Ok(usable.then_some((seq as u64, state)))
    }

    /// The sequence number of the newest event, 0 for an empty log.
    pub fn last_seq(&self) -> Result<u64, EventLogError> {
        let connection = self.connection();
        let seq: Option<i64> = connection
            .query_row("SELECT MAX(seq) FROM events", [], |row| row.get(0))
            .optional()
            .map_err(self.sqlite())?
            .flatten();
        Ok(seq.unwrap_or(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Fact {
        Created { name: String },
        Removed { name: String },
        Lost(Loss),
    }

    impl EventKind for Fact {
        fn kind(&self) -> &'static str {
            match self {
                Fact::Created { .. } => "created",
                Fact::Removed { .. } => "removed",
                Fact::Lost(_) => "lost",
            }
        }

        fn loss(&self) -> Option<Loss> {
            match self {
                Fact::Lost(loss) => Some(*loss),
                _ => None,
            }
        }
    }

    fn created(name: &str) -> Fact {
        Fact::Created { name: name.into() }
    }

    fn temp_log() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/events.db");
        (dir, path)
    }

    /// A new log holding `created` events for `a`, `b` and `c`, for tests that spoil one.
    fn log_of_three() -> (tempfile::TempDir, PathBuf, EventLog) {
        let (dir, path) = temp_log();
        let log = EventLog::open(&path).unwrap();
        for name in ["a", "b", "c"] {
            log.append("controller", 1, &created(name)).unwrap();
        }
        (dir, path, log)
    }

    fn raw(path: &Path) -> Connection {
        Connection::open(path).unwrap()
    }

    /// A payload holding a float, for the round-trip test below.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Measured {
        value: f64,
    }

    impl EventKind for Measured {
        fn kind(&self) -> &'static str {
            "measured"
        }
    }

    /// serde_json's default float parser may be one unit in the last place off, so a float
    /// written with its shortest form read back as a neighbour (found by fuzzing the decoder);
    /// the `float_roundtrip` feature parses exactly.
    #[test]
    fn appended_floats_read_back_exactly() {
        let (_dir, path) = temp_log();
        let log = EventLog::open(&path).unwrap();
        let values: Vec<f64> = ["4444444444444444444444444444444444", "0.1", "1e-300"]
            .iter()
            .map(|text| text.parse().unwrap())
            .collect();
        for &value in &values {
            log.append("controller", 1, &Measured { value }).unwrap();
        }
        let read: Vec<f64> = log
            .read_after::<Measured>(0)
            .unwrap()
            .into_iter()
            .map(|e| e.payload.value)
            .collect();
        let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&read), bits(&values));
    }

    #[test]
    fn appended_events_replay_in_order() {
        let (_dir, path) = temp_log();
        let log = EventLog::open(&path).unwrap();
        assert_eq!(log.last_seq().unwrap(), 0);
        let first = log.append("controller", 1000, &created("a")).unwrap();
        let second = log
            .append("cli", 2000, &Fact::Removed { name: "a".into() })
            .unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));
        let all: Vec<Envelope<Fact>> = log.read_after(0).unwrap();
        assert_eq!(all, vec![first, second.clone()]);
        assert_eq!(log.read_after::<Fact>(1).unwrap(), vec![second]);
        assert!(log.read_after::<Fact>(2).unwrap().is_empty());
        assert_eq!(log.last_seq().unwrap(), 2);
        let kind: String = raw(&path)
            .query_row("SELECT kind FROM events WHERE seq = 2", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kind, "removed");
    }

    #[test]
    fn events_survive_reopening() {
        let (_dir, path) = temp_log();
        {
            let log = EventLog::open(&path).unwrap();
            log.append("controller", 1, &created("a")).unwrap();
        }
        let log = EventLog::open(&path).unwrap();
        assert_eq!(log.last_seq().unwrap(), 1);
        log.append("controller", 2, &created("b")).unwrap();
        let all: Vec<Envelope<Fact>> = log.read_after(0).unwrap();
        assert_eq!(
            all.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
            vec![created("a"), created("b")]
        );
        let (journal, synchronous): (String, i64) = {
            let connection = log.connection();
            (
                connection
                    .pragma_query_value(None, "journal_mode", |r| r.get(0))
                    .unwrap(),
                connection
                    .pragma_query_value(None, "synchronous", |r| r.get(0))
                    .unwrap(),
            )
        };
        // synchronous=FULL is 2: every commit is fsynced before append returns.
        assert_eq!((journal.as_str(), synchronous), ("wal", 2));
    }

    #[test]
    fn a_tampered_payload_is_detected_and_named() {
        let (_dir, path, log) = log_of_three();
        raw(&path)
            .execute(
                "UPDATE events SET payload = ?1 WHERE seq = 2",
                [r#"{"type":"created","name":"evil"}"#],
            )
            .unwrap();
        let error = log.read_after::<Fact>(0).unwrap_err();
        assert!(
            matches!(error, EventLogError::Corrupt { seq: 2, .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .starts_with("event 2 is corrupt: checksum mismatch")
        );
        // Reading past the bad event still works; reading across it never skips it.
        assert_eq!(log.read_after::<Fact>(2).unwrap().len(), 1);
    }

    #[test]
    fn a_deleted_event_is_a_gap_not_a_skip() {
        let (_dir, path, log) = log_of_three();
        raw(&path)
            .execute("DELETE FROM events WHERE seq = 2", [])
            .unwrap();
        let error = log.read_after::<Fact>(0).unwrap_err();
        assert!(
            matches!(
                error,
                EventLogError::Gap {
                    expected: 2,
                    found: 3,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_lost_end_is_refused_naming_the_mark_and_both_numbers() {
        let (_dir, path, log) = log_of_three();
        drop(log);
        raw(&path)
            .execute("DELETE FROM events WHERE seq >= 2", [])
            .unwrap();
        let error = EventLog::open(&path).unwrap_err();
        assert!(
            matches!(
                error,
                EventLogError::Shortened {
                    expected: 3,
                    found: 1,
                    ..
                }
            ),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("events.db ends at event 1")
                && message.contains("events.db.seq records that event 3 was appended"),
            "{message}"
        );
    }

    #[test]
    fn a_lost_database_is_refused_by_its_mark() {
        let (_dir, path, log) = log_of_three();
        drop(log);
        std::fs::remove_file(&path).unwrap();
        let error = EventLog::open(&path).unwrap_err();
        assert!(
            matches!(
                error,
                EventLogError::Shortened {
                    expected: 3,
                    found: 0,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn recovery_records_the_loss_and_numbers_on_after_the_mark() {
        let (_dir, path, log) = log_of_three();
        drop(log);
        raw(&path)
            .execute("DELETE FROM events WHERE seq >= 2", [])
            .unwrap();
        let recorded = EventLog::recover(&path, "cli", 9, Fact::Lost)
            .unwrap()
            .unwrap();
        assert_eq!(recorded.seq, 4);
        assert_eq!(
            recorded.payload,
            Fact::Lost(Loss {
                kept_through: 1,
                lost_through: 3
            })
        );
        let log = EventLog::open(&path).unwrap();
        assert_eq!(log.append("controller", 10, &created("d")).unwrap().seq, 5);
        let seqs: Vec<u64> = log
            .read_after::<Fact>(0)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 4, 5]);
        assert_eq!(log.read_after::<Fact>(2).unwrap().len(), 2);
        // Nothing more was lost: a second recovery records nothing.
        assert!(
            EventLog::recover(&path, "cli", 11, Fact::Lost)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_damaged_mark_is_refused_and_recovery_replaces_it() {
        let (_dir, path, log) = log_of_three();
        drop(log);
        let mark = path.with_file_name("events.db.seq");
        std::fs::write(&mark, "garbage").unwrap();
        let error = EventLog::open(&path).unwrap_err();
        assert!(matches!(error, EventLogError::BadMark { .. }), "{error}");
        assert!(
            EventLog::recover(&path, "cli", 9, Fact::Lost)
                .unwrap()
                .is_none()
        );
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), "3\n");
        EventLog::open(&path).unwrap();
    }

    #[test]
    fn a_loss_event_does_not_excuse_another_gap() {
        let (_dir, path, log) = log_of_three();
        drop(log);
        raw(&path)
            .execute("DELETE FROM events WHERE seq >= 2", [])
            .unwrap();
        EventLog::recover(&path, "cli", 9, Fact::Lost).unwrap();
        let log = EventLog::open(&path).unwrap();
        log.append("controller", 10, &created("d")).unwrap();
        log.append("controller", 10, &created("e")).unwrap();
        raw(&path)
            .execute("DELETE FROM events WHERE seq = 5", [])
            .unwrap();
        let error = log.read_after::<Fact>(0).unwrap_err();
        assert!(
            matches!(
                error,
                EventLogError::Gap {
                    expected: 5,
                    found: 6,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_newer_envelope_version_is_refused() {
        let (_dir, path) = temp_log();
        let log = EventLog::open(&path).unwrap();
        log.append("controller", 5, &created("a")).unwrap();
        // A future graven's row, with a valid checksum for its version.
        let payload = r#"{"type":"created","name":"b"}"#;
        raw(&path)
            .execute(
                "INSERT INTO events VALUES (2, 5, 'controller', 3, 'created', ?1, ?2)",
                [payload, &checksum(2, 5, "controller", 3, payload)],
            )
            .unwrap();
        let error = log.read_after::<Fact>(0).unwrap_err();
        assert!(
            matches!(
                error,
                EventLogError::NewerEnvelope {
                    seq: 2,
                    version: 3,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_log_of_layout_1_gains_the_snapshots_table_when_opened() {
        let (_dir, path) = temp_log();
        drop(EventLog::open(&path).unwrap());
        let old = raw(&path);
        old.execute_batch("DROP TABLE snapshots; PRAGMA user_version = 1;")
            .unwrap();
        drop(old);
        let log = EventLog::open(&path).unwrap();
        log.save_snapshot(0, 1, "{}").unwrap();
        assert_eq!(log.load_snapshot(1).unwrap(), Some((0, "{}".to_owned())));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let (_dir, path) = temp_log();
        drop(EventLog::open(&path).unwrap());
        raw(&path)
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let error = EventLog::open(&path).unwrap_err();
        assert!(
            matches!(error, EventLogError::NewerSchema { found: 3, .. }),
            "{error}"
        );
    }

    #[test]
    fn concurrent_appends_from_two_handles_get_distinct_gap_free_seqs() {
        let (_dir, path) = temp_log();
        let one = EventLog::open(&path).unwrap();
        let two = EventLog::open(&path).unwrap();
        let per_thread = 50;
        let seqs = std::thread::scope(|scope| {
            let handles: Vec<_> = [(&one, "one"), (&two, "two")]
                .into_iter()
                .map(|(log, actor)| {
                    scope.spawn(move || {
                        (0..per_thread)
                            .map(|i| log.append(actor, i, &created(actor)).unwrap().seq)
                            .collect::<Vec<u64>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<u64>>()
        });
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=2 * per_thread).collect::<Vec<u64>>());
        let all: Vec<Envelope<Fact>> = one.read_after(0).unwrap();
        assert_eq!(all.len() as u64, 2 * per_thread);
        assert_eq!(
            all.iter().filter(|e| e.actor == "two").count() as u64,
            per_thread
        );
    }

    #[test]
    fn bad_actors_are_refused() {
        let (_dir, path) = temp_log();
        let log = EventLog::open(&path).unwrap();
        for actor in ["", "a|b", "line\nbreak"] {
            assert!(matches!(
                log.append(actor, 1, &created("a")),
                Err(EventLogError::BadActor { .. })
            ));
        }
        assert_eq!(log.last_seq().unwrap(), 0);
    }

    /// A row that decodes, for the garbage tests to spoil one field at a time.
    fn good_row() -> RawRow {
        let payload = r#"{"type":"created","name":"a"}"#.to_owned();
        RawRow {
            seq: 7,
            at_ms: 1000,
            actor: "controller".into(),
            version: 1,
            kind: "created".into(),
            checksum: checksum(7, 1000, "controller", 1, &payload),
            payload,
        }
    }

    fn check_decode(row: RawRow, expected: expect_test::Expect) {
        let shown = match decode_envelope::<Fact>(&row) {
            Ok(envelope) => format!("ok {envelope:?}"),
            Err(error) => format!("error {error}"),
        };
        expected.assert_eq(&shown);
    }

    /// Re-signs a row so the check under test is the one after the checksum.
    fn signed(mut row: RawRow) -> RawRow {
        row.checksum = checksum(row.seq, row.at_ms, &row.actor, row.version, &row.payload);
        row
    }

    #[test]
    fn decode_rejects_garbage() {
        use expect_test::expect;
        check_decode(
            good_row(),
            expect![[
                r#"ok Envelope { seq: 7, at_ms: 1000, actor: "controller", version: 1, payload: Created { name: "a" } }"#
            ]],
        );
        check_decode(
            RawRow {
                checksum: "00".into(),
                ..good_row()
            },
            expect![
                "error event 7 is corrupt: checksum mismatch: stored 00, content hashes to 9828f29dcd6e9141b5250858024184408ec875b4cc3412a3dd72148c9126ebcc"
            ],
        );
        check_decode(
            RawRow {
                actor: "someone".into(),
                ..good_row()
            },
            expect![
                "error event 7 is corrupt: checksum mismatch: stored 9828f29dcd6e9141b5250858024184408ec875b4cc3412a3dd72148c9126ebcc, content hashes to 71b03b967ce3f6763e68342857dbe2188c565a7686d75780ae03ef1771ce7abb"
            ],
        );
        check_decode(
            signed(RawRow {
                seq: 0,
                ..good_row()
            }),
            expect!["error event 0 is corrupt: the sequence number is not positive"],
        );
        check_decode(
            signed(RawRow {
                at_ms: -1,
                ..good_row()
            }),
            expect!["error event 7 is corrupt: the time -1 is negative"],
        );
        check_decode(
            signed(RawRow {
                version: 0,
                ..good_row()
            }),
            expect!["error event 7 is corrupt: envelope version 0 is not valid"],
        );
        check_decode(
            signed(RawRow {
                version: 1 << 40,
                ..good_row()
            }),
            expect!["error event 7 is corrupt: envelope version 1099511627776 is not valid"],
        );
        check_decode(
            signed(RawRow {
                version: 3,
                ..good_row()
            }),
            expect!["error event 7: envelope version 3 is newer than 2: upgrade graven"],
        );
        for payload in ["", "{", "null", r#"{"type":"exploded"}"#, "\u{0}\u{ffff}"] {
            let row = signed(RawRow {
                payload: payload.into(),
                ..good_row()
            });
            let error = decode_envelope::<Fact>(&row).unwrap_err();
            assert!(
                matches!(error, EventLogError::BadPayload { seq: 7, .. }),
                "{payload:?}: {error}"
            );
        }
    }
}
