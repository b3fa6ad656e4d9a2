//! Reading the store: every source's lines with their times, filtered, merged in time order
//! (`read`), searched at memory speed (`--grep` and `--regex` scan the data files in large
//! reads with `memchr::memmem`, in parallel, and look a hit's time up in the index only),
//! and followed live from a cursor that can be persisted (`Follower`).
//!
//! Lines are cut when read: at each newline, and a line longer than `MAX_LINE` in pieces of
//! that size. Bytes past a stream's last index entry (its shim was killed before stamping
//! them) take the data file's modification time, a fair upper bound of when they were
//! written.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{INDEX, LogsError, MAX_LINE, META, Meta, START, Stream, io};

/// One line (or piece of a long line) as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub time_ns: u64,
    pub source: Arc<Source>,
    pub stream: Stream,
    /// Where the line begins in its data file.
    pub offset: u64,
    pub line: Vec<u8>,
}

impl Record {
    fn key(&self) -> (u64, &Path, Stream, u64) {
        (self.time_ns, &self.source.dir, self.stream, self.offset)
    }
}

/// A source as opened for reading: who wrote it and, per stream, its extent and times.
#[derive(Debug, PartialEq, Eq)]
pub struct Source {
    pub dir: PathBuf,
    pub meta: Meta,
    pub live: bool,
    streams: [Extent; 2],
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Extent {
    /// Where the kept bytes begin (retention frees the ones before).
    start: u64,
    len: u64,
    /// `(end offset, time ns)`, ends growing.
    entries: Vec<(u64, u64)>,
    mtime_ns: u64,
}

impl Source {
    pub fn open(dir: &Path) -> Result<Source, LogsError> {
        let meta_path = dir.join(META);
        let meta_bytes = std::fs::read(&meta_path).map_err(io(&meta_path))?;
        let meta: Meta = serde_json::from_slice(&meta_bytes).map_err(|source| LogsError::Meta {
            path: dir.to_owned(),
            source,
        })?;
        let live = super::ingest::is_live(dir);
        let index = match std::fs::read(dir.join(INDEX)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&dir.join(INDEX))(e)),
        };
        let starts = read_starts(dir);
        let from = usize::try_from(starts[2])
            .unwrap_or(usize::MAX)
            .min(index.len());
        let [out, err] = super::index::decode_all(&index[from - from % super::index::ENTRY..]);
        let mut streams = [Extent::default(), Extent::default()];
        for (stream, entries) in Stream::ALL.into_iter().zip([out, err]) {
            let extent = &mut streams[stream.index()];
            extent.entries = entries;
            extent.start = starts[stream.index()];
            match std::fs::metadata(dir.join(stream.file())) {
                Ok(m) => {
                    extent.len = m.len();
                    extent.mtime_ns = (m.mtime() as u64)
                        .saturating_mul(1_000_000_000)
                        .saturating_add(m.mtime_nsec() as u64);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(dir)(e)),
            }
        }
        Ok(Source {
            dir: dir.to_owned(),
            meta,
            live,
            streams,
        })
    }

    /// The time of the bytes of `stream` that end at `end`: the first entry at or past it,
    /// or the data file's modification time past the last one.
    pub fn time_of(&self, stream: Stream, end: u64) -> u64 {
        let extent = &self.streams[stream.index()];
        let i = extent.entries.partition_point(|&(e, _)| e < end);
        match extent.entries.get(i) {
            Some(&(_, time)) => time,
            None => extent
                .mtime_ns
                .max(extent.entries.last().map_or(0, |&(_, t)| t)),
        }
    }

    /// Where `stream`'s kept bytes begin and end.
    pub fn extent(&self, stream: Stream) -> (u64, u64) {
        let e = &self.streams[stream.index()];
        (e.start.min(e.len), e.len)
    }

    /// How far `stream` is stamped: its readable end while a shim still watches it.
    fn stamped(&self, stream: Stream) -> u64 {
        let e = &self.streams[stream.index()];
        e.entries.last().map_or(e.start, |&(end, _)| end.min(e.len))
    }

    /// An offset at or before the first line of `stream` stamped at or after `since`.
    fn offset_since(&self, stream: Stream, since_ns: u64) -> u64 {
        let extent = &self.streams[stream.index()];
        let i = extent.entries.partition_point(|&(_, t)| t < since_ns);
        let (start, _) = self.extent(stream);
        match i.checked_sub(1).and_then(|i| extent.entries.get(i)) {
            Some(&(end, _)) => end.max(start),
            None => start,
        }
    }
}

impl Source {
    /// The start of the first line of `stream` stamped at or after `cutoff` (its end when
    /// every line is older).
    pub(crate) fn first_at_or_after(&self, stream: Stream, cutoff_ns: u64) -> u64 {
        let (_, len) = self.extent(stream);
        if self.time_of(stream, len) < cutoff_ns {
            return len;
        }
        line_start(self, stream, self.offset_since(stream, cutoff_ns))
    }

    /// The start of the line of `stream` that holds `offset`.
    pub(crate) fn line_start_at(&self, offset: u64, stream: Stream) -> u64 {
        line_start(self, stream, offset)
    }
}

/// Where each stream's kept bytes begin, and the index's first kept entry (`start`: three
/// little-endian u64s), zero without one.
pub(crate) fn read_starts(dir: &Path) -> [u64; 3] {
    let bytes = std::fs::read(dir.join(START)).unwrap_or_default();
    let word = |i: usize| {
        bytes
            .get(i * 8..i * 8 + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    [word(0), word(1), word(2)]
}

/// Every source directory under the store's root (a directory holding `meta.json`).
pub fn source_dirs(home: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![super::root(home)];
    while let Some(dir) = todo.pop() {
        if dir.join(META).is_file() {
            found.push(dir);
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

/// What to find in a line: a fixed string or a regular expression.
#[derive(Debug, Clone)]
pub enum Pattern {
    Text(Vec<u8>),
    Regex(regex::bytes::Regex),
}

impl Pattern {
    fn is_match(&self, line: &[u8]) -> bool {
        match self {
            Pattern::Text(text) => memchr::memmem::find(line, text).is_some(),
            Pattern::Regex(re) => re.is_match(line),
        }
    }
}

/// Which lines to read. Empty lists and `None`s select everything.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub app: Option<String>,
    pub environment: Option<String>,
    pub services: Vec<String>,
    pub release: Option<u64>,
    pub instance: Option<String>,
    pub stream: Option<Stream>,
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    pub patterns: Vec<Pattern>,
    pub tail: Option<usize>,
}

impl Query {
    pub fn selects(&self, meta: &Meta) -> bool {
        self.app.as_ref().is_none_or(|a| *a == meta.app)
            && self
                .environment
                .as_ref()
                .is_none_or(|e| *e == meta.environment)
            && (self.services.is_empty() || self.services.contains(&meta.service))
            && self.release.is_none_or(|r| meta.release == Some(r))
            && self
                .instance
                .as_ref()
                .is_none_or(|i| *i == meta.instance || *i == meta.id)
    }

    fn streams(&self) -> impl Iterator<Item = Stream> + '_ {
        Stream::ALL
            .into_iter()
            .filter(|s| self.stream.is_none_or(|w| w == *s))
    }

    fn keeps(&self, time_ns: u64, line: &[u8]) -> bool {
        self.since_ns.is_none_or(|s| time_ns >= s)
            && self.until_ns.is_none_or(|u| time_ns <= u)
            && self.patterns.iter().all(|p| p.is_match(line))
    }

    /// The sources under `home` this query selects, opened.
    pub fn sources(&self, home: &Path) -> Vec<Arc<Source>> {
        source_dirs(home)
            .iter()
            .filter_map(|dir| Source::open(dir).ok())
            .filter(|s| self.selects(&s.meta))
            .map(Arc::new)
            .collect()
    }
}

/// The lines of `stream` in `source` between two offsets, cut as `MAX_LINE` says; the last
/// bytes without a newline make a line only when `partial` allows it.
struct Lines {
    source: Arc<Source>,
    stream: Stream,
    file: Option<File>,
    /// `buf[i..]` is unread; `buf` begins at offset `base`.
    buf: Vec<u8>,
    i: usize,
    base: u64,
    next_read: u64,
    limit: u64,
    partial: bool,
}

const READ: usize = 4 << 20;

impl Lines {
    fn new(source: Arc<Source>, stream: Stream, from: u64, limit: u64, partial: bool) -> Lines {
        let file = File::open(source.dir.join(stream.file())).ok();
        Lines {
            source,
            stream,
            file,
            buf: Vec::new(),
            i: 0,
            base: from,
            next_read: from,
            limit,
            partial,
        }
    }

    /// Where the next line begins: the bytes before were read.
    fn position(&self) -> u64 {
        self.base + self.i as u64
    }

    /// The next piece, as (start offset, end offset, bytes without the newline).
    fn next_piece(&mut self) -> Option<(u64, u64, Vec<u8>)> {
        loop {
            let avail = &self.buf[self.i..];
            let window = &avail[..avail.len().min(MAX_LINE + 1)];
            let start = self.position();
            if let Some(nl) = memchr::memchr(b'\n', window) {
                let line = window[..nl].to_vec();
                self.i += nl + 1;
                return Some((start, self.position(), line));
            }
            if window.len() > MAX_LINE {
                let line = window[..MAX_LINE].to_vec();
                self.i += MAX_LINE;
                return Some((start, self.position(), line));
            }
            let left = avail.len();
            if self.next_read >= self.limit || !self.fill() {
                if self.partial && left > 0 {
                    let line = self.buf[self.i..].to_vec();
                    self.i = self.buf.len();
                    return Some((start, self.position(), line));
                }
                return None;
            }
        }
    }

    /// Reads more; false at the end.
    fn fill(&mut self) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        self.buf.drain(..self.i);
        self.base += self.i as u64;
        self.i = 0;
        let want = READ.min((self.limit - self.next_read) as usize);
        let have = self.buf.len();
        self.buf.resize(have + want, 0);
        let n = file
            .read_at(&mut self.buf[have..], self.next_read)
            .unwrap_or(0);
        self.buf.truncate(have + n);
        self.next_read += n as u64;
        n > 0
    }

    fn next_record(&mut self) -> Option<Record> {
        let (offset, end, line) = self.next_piece()?;
        Some(Record {
            time_ns: self.source.time_of(self.stream, end),
            source: self.source.clone(),
            stream: self.stream,
            offset,
            line,
        })
    }
}

/// The start of the line that holds `offset` (at most `MAX_LINE` back), so a read that
/// begins mid-line begins with that whole line.
fn line_start(source: &Source, stream: Stream, offset: u64) -> u64 {
    let (start, _) = source.extent(stream);
    if offset <= start {
        return start;
    }
    let from = offset.saturating_sub(MAX_LINE as u64).max(start);
    let Ok(file) = File::open(source.dir.join(stream.file())) else {
        return offset;
    };
    let mut buf = vec![0; (offset - from) as usize];
    if file.read_exact_at(&mut buf, from).is_err() {
        return offset;
    }
    match memchr::memrchr(b'\n', &buf) {
        Some(nl) => from + nl as u64 + 1,
        None if from == start => start,
        None => offset,
    }
}

/// Reads the lines `query` selects, merged in time order (a line's time, then its source,
/// stream and offset, so equal times keep a stable order), handing each to `emit`.
pub fn read(home: &Path, query: &Query, emit: &mut dyn FnMut(Record)) {
    let sources = query.sources(home);
    let mut runs: Vec<Box<dyn Iterator<Item = Record>>> = Vec::new();
    let searched = query.patterns.first().map(|p| match p {
        Pattern::Text(text) => Some(text.clone()),
        Pattern::Regex(_) => None,
    });
    if let Some(Some(text)) = searched {
        for records in search(&sources, query, &text) {
            runs.push(Box::new(records.into_iter()));
        }
    } else {
        for source in &sources {
            for stream in query.streams() {
                let (_, len) = source.extent(stream);
                let from = match query.since_ns {
                    Some(since) => line_start(source, stream, source.offset_since(stream, since)),
                    None => source.extent(stream).0,
                };
                let mut lines = Lines::new(source.clone(), stream, from, len, true);
                let until = query.until_ns;
                let q = query.clone();
                runs.push(Box::new(
                    std::iter::from_fn(move || lines.next_record())
                        .take_while(move |r| until.is_none_or(|u| r.time_ns <= u))
                        .filter(move |r| q.keeps(r.time_ns, &r.line)),
                ));
            }
        }
    }
    let merged = Merge::new(runs);
    match query.tail {
        Some(n) => {
            let mut last = VecDeque::with_capacity(n.min(1 << 16));
            for record in merged {
                if last.len() == n {
                    last.pop_front();
                }
                if n > 0 {
                    last.push_back(record);
                }
            }
            last.into_iter().for_each(emit);
        }
        None => merged.for_each(emit),
    }
}

/// A k-way merge of runs each in time order.
struct Merge {
    runs: Vec<Box<dyn Iterator<Item = Record>>>,
    heads: BinaryHeap<Reverse<Head>>,
}

struct Head(Record, usize);

impl PartialEq for Head {
    fn eq(&self, other: &Head) -> bool {
        self.0.key() == other.0.key()
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Head) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Head) -> std::cmp::Ordering {
        self.0.key().cmp(&other.0.key())
    }
}

impl Merge {
    fn new(mut runs: Vec<Box<dyn Iterator<Item = Record>>>) -> Merge {
        let mut heads = BinaryHeap::new();
        for (i, run) in runs.iter_mut().enumerate() {
            if let Some(record) = run.next() {
                heads.push(Reverse(Head(record, i)));
            }
        }
        Merge { runs, heads }
    }
}

impl Iterator for Merge {
    type Item = Record;
    fn next(&mut self) -> Option<Record> {
        let Reverse(Head(record, i)) = self.heads.pop()?;
        if let Some(next) = self.runs[i].next() {
            self.heads.push(Reverse(Head(next, i)));
        }
        Some(record)
    }
}

/// Searches every selected stream for `text` (the first pattern; the others, the time
/// bounds and the piece cutting are checked on the lines it finds), in parallel over ranges
/// of the data files. Returns one run per range, each in offset (so time) order.
fn search(sources: &[Arc<Source>], query: &Query, text: &[u8]) -> Vec<Vec<Record>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut ranges = Vec::new();
    for source in sources {
        for stream in query.streams() {
            let (start, len) = source.extent(stream);
            let from = match query.since_ns {
                Some(since) => line_start(source, stream, source.offset_since(stream, since)),
                None => start,
            };
            let to = match query.until_ns {
                // The first line stamped after `until` ends past this entry's end.
                Some(until) => {
                    let e = &source.streams[stream.index()].entries;
                    let i = e.partition_point(|&(_, t)| t <= until);
                    e.get(i).map_or(len, |&(end, _)| end.min(len))
                }
                None => len,
            };
            // Ranges of at least 64 MiB, so a thread's start-up is paid back.
            let size = ((to.saturating_sub(from)) / threads as u64).max(64 << 20);
            let mut at = from;
            while at < to {
                ranges.push((source.clone(), stream, at, (at + size).min(to)));
                at += size;
            }
        }
    }
    let finder = memchr::memmem::Finder::new(text);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Vec<Record>> = (0..ranges.len()).map(|_| Vec::new()).collect();
    let slots: Vec<std::sync::Mutex<&mut Vec<Record>>> =
        results.iter_mut().map(std::sync::Mutex::new).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(ranges.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((source, stream, from, to)) = ranges.get(i) else {
                        break;
                    };
                    let found = search_range(source, *stream, *from, *to, &finder, query);
                    **slots[i].lock().unwrap_or_else(|p| p.into_inner()) = found;
                }
            });
        }
    });
    drop(slots);
    results
}

/// The hits in one range, a range begun mid-line taking the lines that begin in it (the one
/// before it takes the line it ends in).
fn search_range(
    source: &Arc<Source>,
    stream: Stream,
    from: u64,
    to: u64,
    finder: &memchr::memmem::Finder<'_>,
    query: &Query,
) -> Vec<Record> {
    let mut found = Vec::new();
    let Ok(file) = File::open(source.dir.join(stream.file())) else {
        return found;
    };
    let (start, len) = source.extent(stream);
    let mut at = if from == start || from == line_start(source, stream, from) {
        from
    } else {
        // Skip to the first line that begins in this range.
        let mut probe = vec![0; MAX_LINE + 1];
        let n = file.read_at(&mut probe, from - 1).unwrap_or(0);
        match memchr::memchr(b'\n', &probe[..n]) {
            Some(nl) => from - 1 + nl as u64 + 1,
            None => to,
        }
    };
    let mut buf = vec![0u8; READ + MAX_LINE];
    while at < to {
        // Whole lines: read past `to` to the end of the line that holds it.
        let n = file.read_at(&mut buf, at).unwrap_or(0);
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let cut = if at + n as u64 >= len {
            n
        } else {
            match memchr::memrchr(b'\n', chunk) {
                Some(nl) => nl + 1,
                None => n,
            }
        };
        let chunk = &chunk[..cut];
        let mut pos = 0;
        while let Some(hit) = finder.find(&chunk[pos..]) {
            let hit = pos + hit;
            let begin = memchr::memrchr(b'\n', &chunk[..hit]).map_or(0, |nl| nl + 1);
            let end = memchr::memchr(b'\n', &chunk[hit..]).map_or(chunk.len(), |nl| hit + nl + 1);
            if at + (begin as u64) >= to {
                break;
            }
            // The line, cut into pieces as reading would.
            let line = &chunk[begin..end];
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let mut piece_at = 0;
            loop {
                let rest = &body[piece_at..];
                let take = if rest.len() > MAX_LINE {
                    MAX_LINE
                } else {
                    rest.len()
                };
                let piece = &rest[..take];
                let last = take == rest.len();
                let piece_end = if last { end } else { begin + piece_at + take };
                let time = source.time_of(stream, at + piece_end as u64);
                if query.keeps(time, piece) {
                    found.push(Record {
                        time_ns: time,
                        source: source.clone(),
                        stream,
                        offset: at + (begin + piece_at) as u64,
                        line: piece.to_vec(),
                    });
                }
                if last {
                    break;
                }
                piece_at += take;
            }
            pos = end;
            if pos >= chunk.len() {
                break;
            }
        }
        if cut == 0 {
            break;
        }
        at += cut as u64;
    }
    found
}

/// Where a follower is in every source: per source (its path under the store) the offset
/// of each stream read up to. Serializable, so a forwarder resumes where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor(pub BTreeMap<String, [u64; 2]>);

/// Follows the sources a query selects, new ones included, yielding each line once, after
/// its shim stamped it (or, when the shim is gone or fell silent, once it is a second old).
pub struct Follower {
    home: PathBuf,
    query: Query,
    cursor: Cursor,
}

/// Bytes left unstamped this long are read anyway: their shim is gone.
const UNSTAMPED_NS: u64 = 1_000_000_000;

impl Follower {
    /// A follower from `cursor` (a source it does not name is read from its start).
    pub fn new(home: &Path, query: Query, cursor: Cursor) -> Follower {
        Follower {
            home: home.to_owned(),
            query,
            cursor,
        }
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The lines that became readable since the last call (everything the cursor has not
    /// passed, the first time), in time order.
    pub fn poll(&mut self) -> Vec<Record> {
        let root = super::root(&self.home);
        let mut records = Vec::new();
        for source in self.query.sources(&self.home) {
            let key = source
                .dir
                .strip_prefix(&root)
                .unwrap_or(&source.dir)
                .to_string_lossy()
                .into_owned();
            let at = self.cursor.0.entry(key).or_insert([0, 0]);
            for stream in self.query.streams() {
                let (start, len) = source.extent(stream);
                let from = at[stream.index()].max(start);
                let stale = super::now_ns().saturating_sub(source.streams[stream.index()].mtime_ns)
                    > UNSTAMPED_NS;
                let (limit, partial) = if !source.live || stale {
                    (len, true)
                } else {
                    (source.stamped(stream), false)
                };
                if limit <= from {
                    at[stream.index()] = from;
                    continue;
                }
                let mut lines = Lines::new(source.clone(), stream, from, limit, partial);
                while let Some(record) = lines.next_record() {
                    if self.query.keeps(record.time_ns, &record.line) {
                        records.push(record);
                    }
                }
                at[stream.index()] = lines.position();
            }
        }
        records.sort_by(|a, b| a.key().cmp(&b.key()));
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Writer;
    use std::time::{Duration, UNIX_EPOCH};

    fn lines(home: &Path, query: &Query) -> Vec<String> {
        let mut got = Vec::new();
        read(home, query, &mut |r| {
            got.push(format!(
                "{} {} {}",
                r.time_ns / 1_000_000_000,
                r.source.meta.instance,
                String::from_utf8_lossy(&r.line)
            ))
        });
        got
    }

    fn at(s: u64) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn sources_merge_in_time_order_and_filters_apply() {
        let home = tempfile::tempdir().unwrap();
        let mut a = Writer::open(home.path(), "g", "a").unwrap();
        let mut b = Writer::open(home.path(), "g", "b").unwrap();
        a.append(at(1), b"one").unwrap();
        b.append(at(2), b"two needle").unwrap();
        a.append(at(3), b"three").unwrap();
        b.append(at(4), b"four needle").unwrap();
        let all = Query::default();
        assert_eq!(
            lines(home.path(), &all),
            ["1 a one", "2 b two needle", "3 a three", "4 b four needle"]
        );
        let grep = Query {
            patterns: vec![Pattern::Text(b"needle".to_vec())],
            ..Query::default()
        };
        assert_eq!(
            lines(home.path(), &grep),
            ["2 b two needle", "4 b four needle"]
        );
        let since = Query {
            since_ns: Some(2_000_000_000),
            until_ns: Some(3_000_000_000),
            ..Query::default()
        };
        assert_eq!(lines(home.path(), &since), ["2 b two needle", "3 a three"]);
        let tail = Query {
            tail: Some(1),
            instance: Some("a".into()),
            ..Query::default()
        };
        assert_eq!(lines(home.path(), &tail), ["3 a three"]);
        let regex = Query {
            patterns: vec![Pattern::Regex(regex::bytes::Regex::new("^th.*e$").unwrap())],
            ..Query::default()
        };
        assert_eq!(lines(home.path(), &regex), ["3 a three"]);
    }

    #[test]
    fn a_long_line_is_read_in_pieces_by_scan_and_search_alike() {
        let home = tempfile::tempdir().unwrap();
        let mut w = Writer::open(home.path(), "g", "a").unwrap();
        let long = [vec![b'x'; MAX_LINE * 2], b"needle".to_vec()].concat();
        w.append(at(1), &long).unwrap();
        w.append(at(2), b"short needle").unwrap();
        let mut sizes = Vec::new();
        read(home.path(), &Query::default(), &mut |r| {
            sizes.push(r.line.len())
        });
        assert_eq!(sizes, [MAX_LINE, MAX_LINE, 6, 12]);
        let mut found = Vec::new();
        let grep = Query {
            patterns: vec![Pattern::Text(b"needle".to_vec())],
            ..Query::default()
        };
        read(home.path(), &grep, &mut |r| found.push(r.line.len()));
        assert_eq!(found, [6, 12]);
    }

    #[test]
    fn a_follower_yields_each_line_once_and_resumes_from_its_cursor() {
        let home = tempfile::tempdir().unwrap();
        let mut w = Writer::open(home.path(), "_syslog/h", "app").unwrap();
        let mut f = Follower::new(home.path(), Query::default(), Cursor::default());
        w.append(at(1), b"1").unwrap();
        w.append(at(2), b"2").unwrap();
        let text = |rs: Vec<Record>| {
            rs.iter()
                .map(|r| String::from_utf8_lossy(&r.line).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(text(f.poll()), ["1", "2"]);
        assert!(f.poll().is_empty());
        w.append(at(3), b"3").unwrap();
        let saved = serde_json::to_string(f.cursor()).unwrap();
        let mut resumed = Follower::new(
            home.path(),
            Query::default(),
            serde_json::from_str(&saved).unwrap(),
        );
        assert_eq!(text(resumed.poll()), ["3"]);
        // A second writer of a new source appears without a new follower.
        let mut other = Writer::open(home.path(), "_syslog/h", "other").unwrap();
        other.append(at(4), b"4").unwrap();
        assert_eq!(text(resumed.poll()), ["4"]);
    }
}
