//! The app event log: per app and environment, an append-only, durable stream of events that
//! the app's instances append to and replay (the seeds' event sourcing), with the snapshot the
//! app last wrote. It lives under the app's directory in the persistent layer, beside the
//! control plane's own log, and nothing a deploy, a rollback or `graven down` does touches it.
//!
//! This module owns the file format, appending (in batches, one synced write each: a group
//! commit), reading and compaction. It knows nothing of HTTP (`server`) or of the control
//! plane. Every process that writes (the daemon, `graven events append`) takes the file's
//! `flock` for the batch, so two writers never interleave; readers take no lock and stop at
//! the first record that is not whole.
//!
//! The file: a 16-byte header (`MAGIC`, the first sequence it holds), then records, each a
//! 32-byte head (body length, kind, sequence, time, CRC-32 of head and body) and the body.
//! An append is acknowledged only after its batch's sync (`RWF_DSYNC`, which is `fdatasync`
//! for the batch's range); a torn record at the end (a crash inside a write) was never
//! acknowledged and is zeroed by the next writer.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub mod server;

/// The first bytes of every event log file.
const MAGIC: &[u8; 8] = b"gravenev";
/// The file header: `MAGIC`, then the first sequence the file holds (little endian).
const HEADER: u64 = 16;
/// The head before each record's body.
const HEAD: usize = 32;
/// The largest body an append may carry, so one event never holds up a batch for long and
/// a reader's page always has room for it.
pub const MAX_BODY: usize = 1024 * 1024;
/// The most bytes of records one batch should write (`server` batches up to it); a crash
/// inside a batch leaves at most this much, plus one record, to clear.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// The file is extended this much at a time, with zeros really written: an append then
/// rewrites blocks the file already has, so its `fdatasync` flushes data and no metadata (the
/// size and the extents stay as they are), as PostgreSQL's pre-zeroed WAL segments do. With
/// `write_zeros_ahead` a thread of its own extends the file once fewer than half of this
/// remains, so no append waits for the zeros.
const PREALLOCATE: u64 = 8 * 1024 * 1024;
/// One index entry per this many events: a read from a sequence seeks near it at once.
const INDEX_EVERY: u64 = 256;

/// The log's file name in an environment's directory.
pub const LOG_FILE: &str = "app-events.log";
/// The snapshot's file name beside it.
pub const SNAPSHOT_FILE: &str = "app-events.snapshot";
/// The file writers lock beside it.
const LOCK_FILE: &str = "app-events.lock";

#[derive(Debug, thiserror::Error)]
pub enum AppEventsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an app event log (its header is {found:?})")]
    NotALog { path: PathBuf, found: Vec<u8> },
    #[error("the event is {size} bytes, over the limit of {MAX_BODY}")]
    TooLarge { size: usize },
    #[error("expected the last event to be {expected}, but it is {last}")]
    Conflict { expected: u64, last: u64 },
    #[error("events before {first} were compacted into the snapshot; read the snapshot first")]
    Compacted { first: u64 },
    #[error("the snapshot's sequence {seq} is past the last event {last}")]
    SnapshotAhead { seq: u64, last: u64 },
    #[error("the append was not written: {message}")]
    NotWritten { message: String },
}

type Result<T, E = AppEventsError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AppEventsError + '_ {
    move |source| AppEventsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What an event's body is: JSON is given back as JSON, anything else as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Bytes,
    Json,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Bytes => 0,
            Kind::Json => 1,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        match code {
            0 => Some(Kind::Bytes),
            1 => Some(Kind::Json),
            _ => None,
        }
    }
}

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: Kind,
    pub body: Vec<u8>,
}

/// One append asked for: the body, and the sequence the appender believes is last
/// (optimistic concurrency: the append is refused if another came first).
#[derive(Debug, Clone)]
pub struct Append {
    pub kind: Kind,
    pub body: Vec<u8>,
    pub expected: Option<u64>,
}

/// The snapshot an app wrote: its state as of event `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub body: Vec<u8>,
}

/// Where the log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    /// The first sequence still in the log (1 unless compacted).
    pub first: u64,
    /// The last sequence appended, 0 when none was.
    pub last: u64,
    /// The log file's size in bytes.
    pub bytes: u64,
}

/// An open event log. Appends go through `append`; reads may come from any number of
/// threads at once (`read` takes `&self`).
#[derive(Debug)]
pub struct AppEventLog {
    path: PathBuf,
    file: File,
    /// The lock file, shared with each `Locked` taken on it (no descriptor is duplicated).
    lock: std::sync::Arc<File>,
    first: u64,
    last: u64,
    /// Where the whole records end: the next append's offset.
    end: u64,
    /// The file's length: records, then zeros written ahead (`PREALLOCATE`).
    allocated: u64,
    /// (sequence, offset) of every `INDEX_EVERY`th event, ascending.
    index: Vec<(u64, u64)>,
    /// The thread that writes zeros ahead of the records, when this handle has one.
    ahead: Option<ZerosAhead>,
    /// How many times an append had to write zeros itself (the thread, if any, was behind).
    zeroed_inline: u64,
}

/// Writes zeros past the end of the log's file on a thread of its own, ahead of the records,
/// so that no append waits for them (`AppEventLog::write_zeros_ahead`). The thread writes
/// through a handle opened with `O_APPEND`: each of its writes lands at the file's end as the
/// kernel knows it, past every byte any writer ever wrote, so it needs no lock and can never
/// cover a record, whoever (this process or another) appended it.
#[derive(Debug)]
struct ZerosAhead {
    /// Where to ask the thread for a longer file: an appending handle of the file, and the
    /// length wanted. The thread ends when this is dropped.
    asks: std::sync::mpsc::Sender<(File, u64)>,
    /// An appending handle of the file this log has open, when it could be opened.
    file: Option<File>,
    /// The longest length asked for on this file.
    asked: u64,
}

impl ZerosAhead {
    fn start(path: &Path) -> Result<ZerosAhead> {
        let (asks, wanted) = std::sync::mpsc::channel::<(File, u64)>();
        std::thread::Builder::new()
            .name("app-events-zeros".into())
            .spawn(move || {
                for (file, length) in wanted {
                    // A failure leaves the file shorter: the batch that reaches its end writes
                    // the zeros itself, as every writer without this thread does.
                    let _ = extend(&file, length);
                }
            })
            .map_err(io(path))?;
        Ok(ZerosAhead {
            asks,
            file: None,
            asked: 0,
        })
    }
}

/// Appends zeros to `file` (opened `O_APPEND`) until it is `length` long, then syncs them. A
/// batch may write its records into them before they are synced: its own sync then flushes
/// the file's new size too, so it is as durable, only slower.
fn extend(file: &File, length: u64) -> std::io::Result<()> {
    let mut len = identity(file)?.len;
    if len >= length {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    while len < length {
        let n = zeros.len().min((length - len) as usize);
        (&*file).write_all(&zeros[..n])?;
        len = identity(file)?.len;
    }
    file.sync_all()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn checksum(head: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[..28]);
    hasher.update(body);
    hasher.finalize()
}

/// The bytes of one record.
fn encode(seq: u64, time_ms: u64, kind: Kind, body: &[u8], out: &mut Vec<u8>) {
    let mut head = [0u8; HEAD];
    head[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    head[4] = kind.code();
    head[8..16].copy_from_slice(&seq.to_le_bytes());
    head[16..24].copy_from_slice(&time_ms.to_le_bytes());
    let crc = checksum(&head, body);
    head[28..32].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
}

/// A record's head, read back.
struct Head {
    len: usize,
    kind: Kind,
    seq: u64,
    time_ms: u64,
    crc: u32,
}

fn decode_head(head: &[u8; HEAD]) -> Option<Head> {
    decode_head_any(head).filter(|h| h.len <= MAX_BODY)
}

/// Reads the record at `offset` if it is whole and sound, with the offset after it.
fn read_record(file: &File, offset: u64, expect_seq: u64) -> std::io::Result<Option<(Event, u64)>> {
    let mut head = [0u8; HEAD];
    if !read_exact_at(file, &mut head, offset)? {
        return Ok(None);
    }
    let Some(parsed) = decode_head(&head) else {
        return Ok(None);
    };
    if parsed.seq != expect_seq {
        return Ok(None);
    }
    let mut body = vec![0u8; parsed.len];
    if !read_exact_at(file, &mut body, offset + HEAD as u64)? {
        return Ok(None);
    }
    if checksum(&head, &body) != parsed.crc {
        return Ok(None);
    }
    let next = offset + (HEAD + parsed.len) as u64;
    Ok(Some((
        Event {
            seq: parsed.seq,
            time_ms: parsed.time_ms,
            kind: parsed.kind,
            body,
        },
        next,
    )))
}

/// Fills `buf` from `offset`; false when the file ends first.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// An exclusive `flock` on the log's lock file for one batch, released when dropped. The lock
/// is on a file of its own, not the log, because compaction replaces the log's file.
struct Locked(std::sync::Arc<File>);

impl Locked {
    fn take(lock: &std::sync::Arc<File>, path: &Path) -> Result<Locked> {
        rustix::fs::flock(&**lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(path)(e.into()))?;
        Ok(Locked(lock.clone()))
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(&*self.0, rustix::fs::FlockOperation::Unlock);
    }
}

impl AppEventLog {
    /// Opens the log in `dir`, making it (and `dir`) if there is none.
    pub fn open(dir: &Path) -> Result<AppEventLog> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOG_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let mut log = AppEventLog {
            path,
            file,
            lock: std::sync::Arc::new(lock),
            first: 1,
            last: 0,
            end: HEADER,
            allocated: 0,
            index: Vec::new(),
            ahead: None,
            zeroed_inline: 0,
        };
        {
            let _lock = Locked::take(&log.lock, &log.path)?;
            log.load()?;
        }
        Ok(log)
    }

    /// Reads the header (writing one into an empty file) and scans the records.
    fn load(&mut self) -> Result<()> {
        let len = identity(&self.file).map_err(io(&self.path))?.len;
        if len < HEADER {
            // Empty, or a crash while the header was written (nothing was acknowledged).
            let mut header = [0u8; HEADER as usize];
            header[..8].copy_from_slice(MAGIC);
            header[8..16].copy_from_slice(&1u64.to_le_bytes());
            self.file.set_len(0).map_err(io(&self.path))?;
            self.file.write_all_at(&header, 0).map_err(io(&self.path))?;
            self.file.sync_all().map_err(io(&self.path))?;
            sync_dir(&self.path)?;
            self.first = 1;
        } else {
            let mut header = [0u8; HEADER as usize];
            self.file
                .read_exact_at(&mut header, 0)
                .map_err(io(&self.path))?;
            if &header[..8] != MAGIC {
                return Err(AppEventsError::NotALog {
                    path: self.path.clone(),
                    found: header[..8].to_vec(),
                });
            }
            self.first = u64::from_le_bytes(header[8..16].try_into().expect("eight bytes"));
        }
        self.last = self.first - 1;
        self.end = HEADER;
        self.index.clear();
        self.scan()?;
        self.allocated = identity(&self.file).map_err(io(&self.path))?.len;
        self.open_ahead()?;
        self.clear_tail()
    }

    /// Has a thread of its own write the zeros ahead of the records (the daemon's log, which
    /// appends all the time), so that no append waits for them.
    pub fn write_zeros_ahead(&mut self) -> Result<()> {
        if self.ahead.is_none() {
            self.ahead = Some(ZerosAhead::start(&self.path)?);
            let _lock = Locked::take(&self.lock, &self.path)?;
            self.open_ahead()?;
            self.ask_ahead();
        }
        Ok(())
    }

    /// Under the lock: opens the appending handle the zeros thread writes through, on the file
    /// this log has open (the path names it: every replacement happens under the lock).
    fn open_ahead(&mut self) -> Result<()> {
        let Some(ahead) = &mut self.ahead else {
            return Ok(());
        };
        ahead.asked = 0;
        ahead.file = None;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        let (theirs, ours) = (
            identity(&file).map_err(io(&self.path))?,
            identity(&self.file).map_err(io(&self.path))?,
        );
        if theirs.same_file(&ours) {
            ahead.file = Some(file);
        }
        Ok(())
    }

    /// Asks the zeros thread for another `PREALLOCATE` once fewer than half of one remain.
    fn ask_ahead(&mut self) {
        let Some(ahead) = &mut self.ahead else {
            return;
        };
        if self.allocated.saturating_sub(self.end) >= PREALLOCATE / 2 {
            return;
        }
        // A whole number of `PREALLOCATE`s, at least half of one past the records.
        let wanted = (self.end + PREALLOCATE / 2).div_ceil(PREALLOCATE) * PREALLOCATE;
        if wanted <= ahead.asked {
            return;
        }
        let Some(file) = ahead.file.as_ref().and_then(|f| f.try_clone().ok()) else {
            return;
        };
        if ahead.asks.send((file, wanted)).is_ok() {
            ahead.asked = wanted;
        }
    }

    /// Reads the records after `end` that other writers (or earlier runs) added.
    fn scan(&mut self) -> Result<()> {
        // Mostly nothing was added (this process is the only writer): one small read says so.
        let mut probe = [0u8; HEAD];
        let whole = read_exact_at(&self.file, &mut probe, self.end).map_err(io(&self.path))?;
        if !whole || decode_head(&probe).is_none_or(|h| h.seq != self.last + 1) {
            return Ok(());
        }
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &self.file);
        reader
            .seek(SeekFrom::Start(self.end))
            .map_err(io(&self.path))?;
        loop {
            let mut head = [0u8; HEAD];
            if !fill(&mut reader, &mut head).map_err(io(&self.path))? {
                break;
            }
            let Some(parsed) = decode_head(&head).filter(|h| h.seq == self.last + 1) else {
                break;
            };
            let mut body = vec![0u8; parsed.len];
            if !fill(&mut reader, &mut body).map_err(io(&self.path))? {
                break;
            }
            if checksum(&head, &body) != parsed.crc {
                break;
            }
            if (parsed.seq - self.first).is_multiple_of(INDEX_EVERY) {
                self.index.push((parsed.seq, self.end));
            }
            self.last = parsed.seq;
            self.end += (HEAD + parsed.len) as u64;
        }
        Ok(())
    }

    /// Where the log stands now, as this handle last saw it.
    pub fn position(&self) -> Position {
        Position {
            first: self.first,
            last: self.last,
            bytes: self.end,
        }
    }

    /// Appends a batch: each append is checked against the last sequence in order (so two
    /// in one batch expecting the same sequence: the first wins), the accepted ones are
    /// written at once and made durable with one synced write, and only then answered. A
    /// failed write or sync fails every append of the batch, and the log's end goes back
    /// to where it was, so a failed append never becomes visible.
    pub fn append(&mut self, batch: &[Append]) -> Result<Vec<Result<u64>>> {
        let _lock = Locked::take(&self.lock, &self.path)?;
        self.catch_up()?;
        let time_ms = now_ms();
        let mut bytes = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        let mut last = self.last;
        let mut accepted = Vec::new();
        for append in batch {
            if append.body.len() > MAX_BODY {
                answers.push(Err(AppEventsError::TooLarge {
                    size: append.body.len(),
                }));
                continue;
            }
            if let Some(expected) = append.expected
                && expected != last
            {
                answers.push(Err(AppEventsError::Conflict { expected, last }));
                continue;
            }
            last += 1;
            accepted.push((last, self.end + bytes.len() as u64));
            encode(last, time_ms, append.kind, &append.body, &mut bytes);
            answers.push(Ok(last));
        }
        if bytes.is_empty() {
            return Ok(answers);
        }
        self.make_room(bytes.len() as u64)?;
        let written = write_synced(&self.file, &bytes, self.end);
        if let Err(e) = written {
            // Nothing of the batch counts: clear what may have landed, so no reader takes a
            // record nobody was told about for an event (best effort: the disk may be failing).
            let _ = self
                .file
                .write_all_at(&vec![0; bytes.len()], self.end)
                .and_then(|()| self.file.sync_data());
            return Err(io(&self.path)(e));
        }
        for (seq, offset) in accepted {
            if (seq - self.first).is_multiple_of(INDEX_EVERY) {
                self.index.push((seq, offset));
            }
        }
        self.last = last;
        self.end += bytes.len() as u64;
        self.ask_ahead();
        Ok(answers)
    }

    /// Under the lock: learns what other writers appended, and cuts a torn record at the end
    /// (a crash inside an unacknowledged write) is cleared so the next record follows the last
    /// sound one.
    fn catch_up(&mut self) -> Result<()> {
        let here = identity(&self.file).map_err(io(&self.path))?;
        let named = identity_at(&self.path).map_err(io(&self.path))?;
        if !here.same_file(&named) {
            // Compacted by another handle: the path names a new file; read it afresh.
            return self.reopen();
        }
        self.allocated = here.len;
        // Mostly nothing follows (this process is the only writer): one small read says so.
        if !self.followed()? {
            return Ok(());
        }
        self.scan()?;
        // Another process that crashed mid-batch left its bytes in the page cache in order: a
        // fragment starts right at the end. (After a power loss pages may have reached the disk
        // out of order; `load`, at every open, clears the whole span for that.)
        if self.followed()? {
            self.clear_tail()?;
        }
        Ok(())
    }

    /// Zeroes what follows the last whole record, when something does: the part of a batch a
    /// crash cut short (never acknowledged), so the next append is not followed by a stale
    /// fragment that a scan could misread.
    fn clear_tail(&mut self) -> Result<()> {
        let span = (self.allocated.saturating_sub(self.end))
            .min((MAX_BATCH_BYTES + HEAD + MAX_BODY) as u64) as usize;
        if span == 0 {
            return Ok(());
        }
        let mut tail = vec![0u8; span];
        let read = self
            .file
            .read_at(&mut tail, self.end)
            .map_err(io(&self.path))?;
        let Some(last) = tail[..read].iter().rposition(|&b| b != 0) else {
            return Ok(());
        };
        self.file
            .write_all_at(&vec![0; last + 1], self.end)
            .and_then(|()| self.file.sync_data())
            .map_err(io(&self.path))
    }

    /// Extends the file with written zeros when `len` more bytes would not fit.
    fn make_room(&mut self, len: u64) -> Result<()> {
        if self.end + len <= self.allocated {
            return Ok(());
        }
        self.zeroed_inline += 1;
        let target = (self.end + len).div_ceil(PREALLOCATE) * PREALLOCATE;
        let zeros = vec![0u8; (target - self.allocated).min(PREALLOCATE) as usize];
        let mut at = self.allocated;
        while at < target {
            let n = zeros.len().min((target - at) as usize);
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(io(&self.path))?;
            at += n as u64;
        }
        self.file.sync_all().map_err(io(&self.path))?;
        self.allocated = target;
        Ok(())
    }

    /// Opens the file at the path again (another process replaced it) and scans it.
    fn reopen(&mut self) -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        self.file = file;
        self.load()
    }

    /// Takes notice of appends other processes made since this handle last looked (a reader
    /// that follows calls this before each read).
    pub fn refresh(&mut self) -> Result<()> {
        let _lock = Locked::take(&self.lock, &self.path)?;
        self.catch_up()
    }

    /// `refresh`, but only when the log is not as this handle last saw it, which a stat and
    /// one small read tell without the lock (cheap enough for every read): another process
    /// compacted (the path names another file) or appended (the bytes after the last record
    /// this handle knows are no longer the zeros written ahead; the file's length says
    /// nothing, as it runs ahead of the records).
    pub fn refresh_if_changed(&mut self) -> Result<bool> {
        let named = identity_at(&self.path).map_err(io(&self.path))?;
        let here = identity(&self.file).map_err(io(&self.path))?;
        if named.same_file(&here) && !self.followed()? {
            return Ok(false);
        }
        self.refresh()?;
        Ok(true)
    }

    /// Whether anything but zeros follows the last record this handle knows: another
    /// writer's records, or a fragment a crash left.
    fn followed(&self) -> Result<bool> {
        let mut head = [0u8; HEAD];
        let read = self
            .file
            .read_at(&mut head, self.end)
            .map_err(io(&self.path))?;
        Ok(head[..read].iter().any(|&b| b != 0))
    }

    /// Up to `max_events` events from `from` on (and at most about `max_bytes` of bodies,
    /// always at least one event if there is one). Past the end: none.
    pub fn read(&self, from: u64, max_events: usize, max_bytes: usize) -> Result<Vec<Event>> {
        if from < self.first {
            return Err(AppEventsError::Compacted { first: self.first });
        }
        let mut events = Vec::new();
        if from > self.last || max_events == 0 {
            return Ok(events);
        }
        let slot = self.index.partition_point(|&(seq, _)| seq <= from);
        let (mut seq, mut offset) = if slot == 0 {
            (self.first, HEADER)
        } else {
            self.index[slot - 1]
        };
        let mut bytes = 0;
        while seq <= self.last && events.len() < max_events {
            let Some((event, next)) =
                read_record(&self.file, offset, seq).map_err(io(&self.path))?
            else {
                break;
            };
            offset = next;
            seq += 1;
            if event.seq >= from {
                bytes += event.body.len();
                events.push(event);
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        Ok(events)
    }

    /// Stores the app's snapshot as of event `seq` (written aside, synced, renamed over
    /// the last one): a crash leaves the old snapshot or the new one, never a mix.
    pub fn put_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        if snapshot.seq > self.last {
            return Err(AppEventsError::SnapshotAhead {
                seq: snapshot.seq,
                last: self.last,
            });
        }
        if snapshot.body.len() > MAX_BODY * 16 {
            return Err(AppEventsError::TooLarge {
                size: snapshot.body.len(),
            });
        }
        let dir = self.path.parent().expect("the log is in a directory");
        let path = dir.join(SNAPSHOT_FILE);
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
        let mut bytes = Vec::with_capacity(HEAD + snapshot.body.len());
        encode(
            snapshot.seq,
            now_ms(),
            Kind::Bytes,
            &snapshot.body,
            &mut bytes,
        );
        temp.write_all(&bytes).map_err(io(&path))?;
        temp.as_file().sync_all().map_err(io(&path))?;
        temp.persist(&path).map_err(|e| io(&path)(e.error))?;
        sync_dir(&path)
    }

    /// The snapshot last stored, if any.
    pub fn snapshot(&self) -> Result<Option<Snapshot>> {
        let path = self
            .path
            .parent()
            .expect("the log is in a directory")
            .join(SNAPSHOT_FILE);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(&path))?;
        let head: Option<&[u8; HEAD]> = bytes.get(..HEAD).and_then(|h| h.try_into().ok());
        let Some((head, parsed)) = head.and_then(|h| Some((h, decode_head_any(h)?))) else {
            return Ok(None);
        };
        let body = bytes[HEAD..].to_vec();
        if body.len() != parsed.len || checksum(head, &body) != parsed.crc {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            seq: parsed.seq,
            body,
        }))
    }

    /// Drops the events the snapshot covers: the events after it are copied into a new file,
    /// which replaces the log under the lock. Returns how many events went.
    pub fn compact(&mut self) -> Result<u64> {
        let Some(snapshot) = self.snapshot()? else {
            return Ok(0);
        };
        let _lock = Locked::take(&self.lock, &self.path)?;
        self.catch_up()?;
        let new_first = snapshot.seq + 1;
        if new_first <= self.first {
            return Ok(0);
        }
        let dir = self.path.parent().expect("the log is in a directory");
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&new_first.to_le_bytes());
        temp.write_all(&header).map_err(io(&self.path))?;
        let mut from = new_first;
        loop {
            let events = self.read(from, 4096, 16 << 20)?;
            let Some(last) = events.last().map(|e| e.seq) else {
                break;
            };
            let mut bytes = Vec::new();
            for event in &events {
                encode(
                    event.seq,
                    event.time_ms,
                    event.kind,
                    &event.body,
                    &mut bytes,
                );
            }
            temp.write_all(&bytes).map_err(io(&self.path))?;
            from = last + 1;
        }
        temp.as_file().sync_all().map_err(io(&self.path))?;
        let dropped = new_first - self.first;
        temp.persist(&self.path)
            .map_err(|e| io(&self.path)(e.error))?;
        sync_dir(&self.path)?;
        // The old file (still locked by this handle) is gone from the path; the next
        // writer of every other handle sees the new first sequence and reopens.
        self.reopen()?;
        Ok(dropped)
    }
}

/// A record's head as written, its length unchecked (a snapshot may exceed `MAX_BODY`).
fn decode_head_any(head: &[u8; HEAD]) -> Option<Head> {
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    Some(Head {
        len,
        kind: Kind::from_code(head[4])?,
        seq: u64::from_le_bytes(head[8..16].try_into().ok()?),
        time_ms: u64::from_le_bytes(head[16..24].try_into().ok()?),
        crc: u32::from_le_bytes(head[28..32].try_into().ok()?),
    })
}

/// Writes `bytes` at `offset` and makes them durable as `pwrite` then `fdatasync` would (the
/// data, and whatever metadata reading it back needs), but in one call that syncs only this
/// range (`RWF_DSYNC`): the zeros being written ahead at the file's end are not flushed with
/// the batch.
fn write_synced(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match rustix::io::pwritev2(
            file,
            &[std::io::IoSlice::new(bytes)],
            offset,
            rustix::io::ReadWriteFlags::DSYNC,
        ) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads exactly `buf`, or reports that the stream ended first.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Which file, and how long: the device and inode, and the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: (u32, u32),
    ino: u64,
    len: u64,
}

impl Identity {
    fn of(statx: &rustix::fs::Statx) -> Identity {
        Identity {
            dev: (statx.stx_dev_major, statx.stx_dev_minor),
            ino: statx.stx_ino,
            len: statx.stx_size,
        }
    }

    fn same_file(&self, other: &Identity) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// What `statx` is asked for: never the file's times. Asking for the change or the
/// modification time (as `metadata()` does) makes the file's next write store a new one even
/// within the clock's tick (the kernel's multigrain timestamps, Linux 6.13 on), which dirties
/// the inode; ext4 without a journal then writes the inode's block in that write's sync, before
/// the flush. Stat'ed in every batch, the log made every batch's sync write two blocks.
const IDENTITY: rustix::fs::StatxFlags =
    rustix::fs::StatxFlags::INO.union(rustix::fs::StatxFlags::SIZE);

/// The identity of an open file, its times unread (`IDENTITY`).
fn identity(file: &File) -> std::io::Result<Identity> {
    let statx = rustix::fs::statx(file, "", rustix::fs::AtFlags::EMPTY_PATH, IDENTITY)?;
    Ok(Identity::of(&statx))
}

/// The identity of the file `path` names now, its times unread (`IDENTITY`).
fn identity_at(path: &Path) -> std::io::Result<Identity> {
    let statx = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::empty(),
        IDENTITY,
    )?;
    Ok(Identity::of(&statx))
}

/// Makes a new name in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().expect("a file is in a directory");
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests;
