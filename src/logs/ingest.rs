//! Getting lines into the store. An instance's workload writes straight into its source's
//! data files (opened `O_APPEND` and handed to it as stdout and stderr), so a write it made
//! is in the page cache the moment `write` returns, whatever is killed next; its shim only
//! stamps times (`Stamper`) and syncs on a schedule. A source graven writes itself (syslog
//! in) goes through `Writer`, which stamps each line with the time it is given.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::index::{ENTRY, Entry};
use super::{INDEX, LogsError, META, Meta, Stream, io, private_dirs};

/// Opens `path` for appending, 0600 and close-on-exec.
fn append(path: &Path) -> Result<File, LogsError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// Writes a source's `meta.json` (0600, replaced atomically).
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), LogsError> {
    let path = dir.join(META);
    let mut file = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io(&path))?;
    file.write_all(&serde_json::to_vec(meta).expect("a meta serializes"))
        .map_err(io(&path))?;
    file.persist(&path).map_err(|e| io(&path)(e.error))?;
    Ok(())
}

/// The index, held locked (flock) for as long as its writer lives: retention and readers
/// tell a live source from a dead one by that lock, which the kernel drops on any death.
struct Index {
    path: PathBuf,
    file: File,
    /// How many bytes of whole entries it holds.
    len: u64,
}

impl Index {
    fn open(dir: &Path) -> Result<Index, LogsError> {
        let path = dir.join(INDEX);
        let file = append(&path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| io(&path)(e.into()))?;
        let len = file.metadata().map_err(io(&path))?.len();
        // A torn entry left by a crash is cut off, so what follows stays aligned.
        let whole = len - len % ENTRY as u64;
        if whole != len {
            file.set_len(whole).map_err(io(&path))?;
        }
        Ok(Index {
            path,
            file,
            len: whole,
        })
    }

    /// Appends one entry, or nothing: a short write (a full disk) is cut off again, so the
    /// index never holds a torn entry before a whole one.
    fn push(&mut self, entry: Entry) -> Result<(), LogsError> {
        let bytes = entry.encode();
        match self.file.write(&bytes) {
            Ok(n) if n == bytes.len() => {
                self.len += n as u64;
                Ok(())
            }
            Ok(_) => {
                let _ = self.file.set_len(self.len);
                Err(io(&self.path)(std::io::ErrorKind::StorageFull.into()))
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(io(&self.path)(e))
            }
        }
    }
}

/// Whether a source is being written now (its writer holds the index's lock).
pub fn is_live(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(INDEX)) else {
        return false;
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
}

/// The shim's half of an instance's source: it watches the data files the workload writes
/// and appends index entries, at most one per stream per millisecond, so its cost does not
/// grow with the line rate.
pub struct Stamper {
    dir: PathBuf,
    data: [File; 2],
    index: Index,
    /// How far each stream is stamped, and the millisecond of its last entry.
    stamped: [u64; 2],
    last_ms: [u64; 2],
    unsynced: bool,
}

/// What the shim hands the workload, and whether the data files could be made append-only.
pub struct Outputs {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub append_only: bool,
}

impl Stamper {
    /// Makes the instance's source in `dir` and opens its data files: the shim's own
    /// handles, and the workload's (owned by `owner` when given, as runc gives a non-root
    /// workload its pipes, so it may open `/dev/stdout`). As root the data files get the
    /// append-only attribute, so the workload can neither truncate nor rewrite its history.
    pub fn create(
        dir: &Path,
        meta: &Meta,
        owner: Option<(u32, u32)>,
    ) -> Result<(Stamper, Outputs), LogsError> {
        private_dirs(dir)?;
        write_meta(dir, meta)?;
        let index = Index::open(dir)?;
        let mut data = Vec::new();
        let mut theirs = Vec::new();
        let mut append_only = true;
        for stream in Stream::ALL {
            let path = dir.join(stream.file());
            let file = append(&path)?;
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(
                    &file,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(|e| io(&path)(e.into()))?;
            }
            append_only &= set_append_only(&file, true);
            theirs.push(OwnedFd::from(append(&path)?));
            data.push(file);
        }
        let stamped = [
            data[0].metadata().map_err(io(dir))?.len(),
            data[1].metadata().map_err(io(dir))?.len(),
        ];
        let [out, err]: [File; 2] = data.try_into().expect("two streams");
        let [stdout, stderr]: [OwnedFd; 2] = theirs.try_into().expect("two streams");
        Ok((
            Stamper {
                dir: dir.to_owned(),
                data: [out, err],
                index,
                stamped,
                last_ms: [0; 2],
                unsynced: false,
            },
            Outputs {
                stdout,
                stderr,
                append_only,
            },
        ))
    }

    /// Appends an entry for each stream that grew, unless it has one for this millisecond
    /// already. Returns whether some growth is left to stamp (in a millisecond), or the
    /// index's error (a full disk): nothing is recorded then, and the next call tries again.
    pub fn stamp(&mut self, now_ns: u64) -> Result<bool, LogsError> {
        let now_ms = now_ns / 1_000_000;
        let mut pending = false;
        for stream in Stream::ALL {
            let i = stream.index();
            let len = self.data[i].metadata().map_err(io(&self.dir))?.len();
            if len <= self.stamped[i] {
                continue;
            }
            if now_ms <= self.last_ms[i] {
                pending = true;
                continue;
            }
            self.index.push(Entry {
                stream,
                end: len,
                time_ns: now_ns,
            })?;
            self.stamped[i] = len;
            self.last_ms[i] = now_ms;
            self.unsynced = true;
        }
        Ok(pending)
    }

    /// Stamps what grew, whatever the millisecond: the workload has ended.
    pub fn stamp_final(&mut self, now_ns: u64) -> Result<(), LogsError> {
        self.last_ms = [0; 2];
        self.stamp(now_ns).map(|_| ())
    }

    /// The workload has ended: its data files need not be append-only any more (and could
    /// not be removed if they stayed so).
    pub fn unseal(&self) {
        for file in &self.data {
            set_append_only(file, false);
        }
    }

    /// Bytes an unprivileged writer may still take on the data files' filesystem.
    pub fn space_left(&self) -> Option<u64> {
        let stat = rustix::fs::fstatvfs(&self.data[0]).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// How many entries the index holds.
    pub fn entries(&self) -> u64 {
        self.index.len / ENTRY as u64
    }

    /// Makes what was written so far durable (data files, then the index).
    pub fn sync(&mut self) -> Result<(), LogsError> {
        if !self.unsynced {
            return Ok(());
        }
        for file in &self.data {
            file.sync_data().map_err(io(&self.dir))?;
        }
        self.index.file.sync_data().map_err(io(&self.index.path))?;
        self.unsynced = false;
        Ok(())
    }

    /// The data files, for watching them (inotify).
    pub fn paths(&self) -> [PathBuf; 2] {
        Stream::ALL.map(|s| self.dir.join(s.file()))
    }
}

/// Clears the append-only attribute of a source's data files, once nothing writes them:
/// such a file cannot be unlinked, not even by root.
pub fn unseal(dir: &Path) {
    for stream in Stream::ALL {
        if let Ok(file) = File::options().append(true).open(dir.join(stream.file())) {
            set_append_only(&file, false);
        }
    }
}

/// Whether the append-only attribute is set.
pub(crate) fn is_append_only(file: &File) -> bool {
    rustix::fs::ioctl_getflags(file).is_ok_and(|f| f.contains(rustix::fs::IFlags::APPEND))
}

/// Sets or clears the append-only attribute (`FS_APPEND_FL`). It takes
/// `CAP_LINUX_IMMUTABLE` (root) and a filesystem that has it (ext4, xfs, btrfs, tmpfs);
/// returns whether it is set as asked.
pub(crate) fn set_append_only(file: &File, on: bool) -> bool {
    use rustix::fs::IFlags;
    let Ok(flags) = rustix::fs::ioctl_getflags(file) else {
        return false;
    };
    let wanted = if on {
        flags | IFlags::APPEND
    } else {
        flags - IFlags::APPEND
    };
    wanted == flags || rustix::fs::ioctl_setflags(file, wanted).is_ok()
}

/// A source graven writes itself, named `group/name` (syslog in uses
/// `_syslog/<host>/<app-name>`): one data file (`out`), each line stamped with the time it
/// is given. One writer per source at a time (the index's lock).
pub struct Writer {
    dir: PathBuf,
    data: File,
    index: Index,
    len: u64,
    buffer: Vec<u8>,
}

impl Writer {
    /// Opens the source `group/name`, described as `graven logs` shows it: the app is the
    /// group's first name, and the service and the instance are `name` (a source that knows
    /// more says so with `open_with`, as syslog's sink does).
    pub fn open(home: &Path, group: &str, name: &str) -> Result<Writer, LogsError> {
        let mut parts = group.split('/');
        let meta = Meta {
            app: parts.next().unwrap_or_default().to_owned(),
            service: name.to_owned(),
            instance: name.to_owned(),
            started_at_ms: super::now_ns() / 1_000_000,
            ..Meta::default()
        };
        Writer::open_with(home, group, name, &meta)
    }

    /// Opens the source `group/name`, recording `meta` when it is new.
    pub fn open_with(
        home: &Path,
        group: &str,
        name: &str,
        meta: &Meta,
    ) -> Result<Writer, LogsError> {
        let dir = super::source_dir(home, group, name)?;
        private_dirs(&dir)?;
        if !dir.join(META).exists() {
            write_meta(&dir, meta)?;
        }
        let index = Index::open(&dir)?;
        let path = dir.join(Stream::Stdout.file());
        let data = append(&path)?;
        let len = data.metadata().map_err(io(&path))?.len();
        Ok(Writer {
            dir,
            data,
            index,
            len,
            buffer: Vec::new(),
        })
    }

    /// Appends `line` (a newline inside it becomes a space: one call, one line) stamped with
    /// `time`.
    pub fn append(&mut self, time: SystemTime, line: &[u8]) -> Result<(), LogsError> {
        self.buffer.clear();
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        self.buffer
            .extend(line.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
        self.buffer.push(b'\n');
        let path = self.dir.join(Stream::Stdout.file());
        if let Err(e) = self.data.write_all(&self.buffer) {
            // What a full disk let through is cut off: a line is whole or absent.
            let _ = self.data.set_len(self.len);
            return Err(io(&path)(e));
        }
        self.len += self.buffer.len() as u64;
        let time_ns = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.index.push(Entry {
            stream: Stream::Stdout,
            end: self.len,
            time_ns,
        })
    }

    /// Makes what was appended so far durable.
    pub fn sync(&mut self) -> Result<(), LogsError> {
        self.data.sync_data().map_err(io(&self.dir))?;
        self.index.file.sync_data().map_err(io(&self.index.path))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
