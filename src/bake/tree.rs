//! Layer contents: the entries a step adds, written as a reproducible tar (sorted by path
//! components, fixed mtime, given owners and modes, no user or group names), plus reading
//! layers back: listing the paths the lower layers hold and unpacking them for RUN.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use sha2::Digest as _;

use crate::store::snapshot::PathChange;
use crate::store::{Descriptor, Digest, FinishedLayer, LayerWriter, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A regular file whose content is read from `source` when the layer is written.
    File {
        source: PathBuf,
        size: u64,
    },
    /// An empty regular file (whiteouts).
    Empty,
    Symlink(String),
}

/// One path in a layer; `path` is relative to `/`, without leading or trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Orders entries by path components, so a directory precedes what it holds; of two entries
/// with the same path the later one wins.
pub fn normalize(entries: &mut Vec<Entry>) {
    let mut by_path: BTreeMap<Vec<String>, Entry> = BTreeMap::new();
    for entry in entries.drain(..) {
        let key = entry.path.split('/').map(str::to_owned).collect();
        by_path.insert(key, entry);
    }
    entries.extend(by_path.into_values());
}

/// Refuses entries a layer cannot carry as they are: in a layer a name starting with `.wh.`
/// marks a whiteout, so a file COPY, ADD or RUN made under such a name would, once unpacked,
/// remove another path instead (`/bin/.wh.sh` hides `/bin/sh`) rather than be a file.
pub fn check_names(entries: &[Entry]) -> Result<(), String> {
    for entry in entries {
        let name = entry.path.rsplit('/').next().unwrap_or(&entry.path);
        if name.starts_with(".wh.") && entry.kind != EntryKind::Empty {
            return Err(format!(
                "/{}: names starting with .wh. mark whiteouts in an image layer, so no file \
                 can have one",
                entry.path
            ));
        }
    }
    Ok(())
}

/// A content hash of the entries (paths, metadata and file contents): what a COPY step's
/// cache key depends on, independent of mtimes and listing order.
/// `file_digest` hashes one file (the bake passes its stat-keyed memo of file hashes).
pub fn content_hash(
    entries: &[Entry],
    file_digest: &mut dyn FnMut(&Path) -> io::Result<Digest>,
) -> io::Result<Digest> {
    let mut hasher = sha2::Sha256::new();
    for entry in entries {
        hasher.update(format!(
            "{}\0{:o}\0{}\0{}\0",
            entry.path, entry.mode, entry.uid, entry.gid
        ));
        match &entry.kind {
            EntryKind::Dir => hasher.update(b"dir\0"),
            EntryKind::Empty => hasher.update(b"empty\0"),
            EntryKind::Symlink(target) => hasher.update(format!("link\0{target}\0")),
            EntryKind::File { source, size } => {
                let digest = file_digest(source)?;
                hasher.update(format!("file\0{size}\0{digest}\0"));
            }
        }
    }
    Ok(Digest::from_sha256(hasher.finalize().into()))
}

/// Writes the (normalized) entries as a layer blob in a temp file of the store.
pub fn write_layer(
    store: &Store,
    entries: &[Entry],
    mtime: u64,
) -> Result<FinishedLayer, StoreError> {
    let writer = LayerWriter::new(store)?;
    let mut tar = tar::Builder::new(writer);
    let io = |path: &str| {
        let path = PathBuf::from(path);
        move |source| StoreError::Io { path, source }
    };
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_mtime(mtime);
        header.set_uid(entry.uid.into());
        header.set_gid(entry.gid.into());
        header.set_mode(entry.mode);
        match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, format!("{}/", entry.path), io::empty())
                    .map_err(io(&entry.path))?;
            }
            EntryKind::Empty => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(0);
                tar.append_data(&mut header, &entry.path, io::empty())
                    .map_err(io(&entry.path))?;
            }
            EntryKind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                tar.append_link(&mut header, &entry.path, target)
                    .map_err(io(&entry.path))?;
            }
            EntryKind::File { source, size } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(*size);
                let file = File::open(source).map_err(|source_err| StoreError::Io {
                    path: source.clone(),
                    source: source_err,
                })?;
                let mut data = BufReader::with_capacity(256 * 1024, file).take(*size);
                tar.append_data(&mut header, &entry.path, &mut data)
                    .map_err(io(&entry.path))?;
                if data.limit() != 0 {
                    return Err(StoreError::Io {
                        path: source.clone(),
                        source: io::Error::other("the file shrank while it was being read"),
                    });
                }
            }
        }
    }
    let writer = tar.into_inner().map_err(io("layer"))?;
    let finished = writer.finish()?;
    // What the layer does to which paths exist, for a later COPY on top of it (`LowerTree`):
    // an index that cannot be written only costs reading the layer then.
    let _ = store.put_path_index(&finished.digest, &path_changes_of(entries));
    Ok(finished)
}

/// The path changes of a layer's entries.
fn path_changes_of(entries: &[Entry]) -> Vec<PathChange> {
    entries
        .iter()
        .map(|entry| path_change(&entry.path, matches!(entry.kind, EntryKind::Dir)))
        .collect()
}

/// The change a layer entry at `path` (clean, relative) makes.
fn path_change(path: &str, dir: bool) -> PathChange {
    let (parent, name) = match path.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", path),
    };
    if name == ".wh..wh..opq" {
        PathChange::Opaque(parent.to_owned())
    } else if let Some(hidden) = name.strip_prefix(".wh.") {
        PathChange::Remove(if parent.is_empty() {
            hidden.to_owned()
        } else {
            format!("{parent}/{hidden}")
        })
    } else {
        PathChange::Add {
            path: path.to_owned(),
            dir,
        }
    }
}

/// Opens a layer blob as an uncompressed tar stream (gzip is detected by its magic).
fn open_layer(store: &Store, digest: &Digest) -> Result<Box<dyn Read>, StoreError> {
    let path = store.blob_path(digest);
    crate::store::decompressed(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => StoreError::MissingBlob {
            digest: digest.clone(),
        },
        _ => StoreError::Io { path, source },
    })
}

/// A layer's entries as `bake --check` compares them: path → type, mode, owner and content
/// (a SHA-256 for files, the target for links).
pub fn describe_layer(
    store: &Store,
    digest: &Digest,
) -> Result<BTreeMap<String, String>, StoreError> {
    let io = |source| StoreError::Io {
        path: store.blob_path(digest),
        source,
    };
    let mut archive = tar::Archive::new(open_layer(store, digest)?);
    let mut out = BTreeMap::new();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let header = entry.header().clone();
        let path = entry.path().map_err(io)?.to_string_lossy().into_owned();
        let (mode, uid, gid) = (
            header.mode().unwrap_or(0),
            header.uid().unwrap_or(0),
            header.gid().unwrap_or(0),
        );
        let kind = header.entry_type();
        let content = if kind.is_file() {
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = entry.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            format!("sha256:{}", hex::encode(hasher.finalize()))
        } else {
            entry
                .link_name()
                .map_err(io)?
                .map(|l| format!("-> {}", l.display()))
                .unwrap_or_default()
        };
        out.insert(
            path.trim_end_matches('/').to_owned(),
            format!("{kind:?} {mode:04o} {uid}:{gid} {content}")
                .trim_end()
                .to_owned(),
        );
    }
    Ok(out)
}

/// What the lower layers hold: path → is it a directory.
#[derive(Debug, Default)]
pub struct LowerTree {
    pub paths: BTreeMap<String, bool>,
    applied: usize,
}

impl LowerTree {
    /// Reads the layers not read yet: from each layer's path index when the store has one,
    /// else from its tar headers (which writes the index, so the next bake reads no layer).
    pub fn update(&mut self, store: &Store, layers: &[Descriptor]) -> Result<(), StoreError> {
        if layers.len() < self.applied {
            *self = LowerTree::default();
        }
        for layer in &layers[self.applied..] {
            let changes = match store.path_index(&layer.digest) {
                Some(changes) => changes,
                None => {
                    let changes = path_changes(store, &layer.digest)?;
                    // An index that cannot be written only costs reading the layer again.
                    let _ = store.put_path_index(&layer.digest, &changes);
                    changes
                }
            };
            for change in changes {
                self.apply(change);
            }
        }
        self.applied = layers.len();
        Ok(())
    }

    fn apply(&mut self, change: PathChange) {
        match change {
            PathChange::Opaque(dir) => {
                let prefix = format!("{dir}/");
                self.paths.retain(|p, _| !p.starts_with(&prefix));
            }
            PathChange::Remove(gone) => {
                let prefix = format!("{gone}/");
                self.paths
                    .retain(|p, _| p != &gone && !p.starts_with(&prefix));
            }
            PathChange::Add { path, dir } => {
                self.paths.insert(path, dir);
            }
        }
    }

    /// Records the entries of the layer just written on top of `layers`, when the tree is
    /// current (otherwise the next `update` reads it from the store).
    pub fn add_if_current(&mut self, layers: &[Descriptor], entries: &[Entry]) {
        if self.applied != layers.len() {
            return;
        }
        for entry in entries {
            self.paths
                .insert(entry.path.clone(), matches!(entry.kind, EntryKind::Dir));
        }
        self.applied += 1;
    }
}

/// What one layer changes of which paths exist, read from its tar headers.
fn path_changes(store: &Store, digest: &Digest) -> Result<Vec<PathChange>, StoreError> {
    let err = |source| StoreError::Io {
        path: store.blob_path(digest),
        source,
    };
    let mut changes = Vec::new();
    let mut archive = tar::Archive::new(open_layer(store, digest)?);
    for entry in archive.entries().map_err(err)? {
        let entry = entry.map_err(err)?;
        let path = clean(&entry.path().map_err(err)?.to_string_lossy());
        if !path.is_empty() {
            changes.push(path_change(&path, entry.header().entry_type().is_dir()));
        }
    }
    Ok(changes)
}

/// A tar path without `./`, leading or trailing slashes.
fn clean(path: &str) -> String {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Writes the last version of each of `wanted` (relative paths) the layers hold into `root`,
/// for looking up user and group names without unpacking the whole image.
pub fn extract_files(
    store: &Store,
    layers: &[Descriptor],
    root: &Path,
    wanted: &[&str],
) -> Result<(), StoreError> {
    for layer in layers {
        let err = |source| StoreError::Io {
            path: store.blob_path(&layer.digest),
            source,
        };
        let mut archive = tar::Archive::new(open_layer(store, &layer.digest)?);
        for entry in archive.entries().map_err(err)? {
            let mut entry = entry.map_err(err)?;
            let path = clean(&entry.path().map_err(err)?.to_string_lossy());
            if wanted.contains(&path.as_str()) && entry.header().entry_type().is_file() {
                let target = root.join(&path);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(err)?;
                }
                let mut out = File::create(&target).map_err(err)?;
                io::copy(&mut entry, &mut out).map_err(err)?;
            }
        }
    }
    Ok(())
}

/// The state of one path of a root filesystem, to see what a RUN step changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub is_dir: bool,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    /// The inode change time: a file rewritten in place with its size and mtime put back
    /// (useradd's backups, `cp -p` over a file) changes nothing else a stat shows; and a
    /// copy-up into an overlay's upper dir always changes it, as any write or chmod would.
    pub ctime: (i64, i64),
    pub ino: u64,
    pub link: Option<String>,
}

/// Every path under `root` (not following symlinks), relative to it, with owners as the
/// sandbox sees them.
pub fn snapshot(root: &Path) -> io::Result<BTreeMap<String, Seen>> {
    // Rootless, the sandbox maps graven's user to root inside: what RUN wrote as root is on
    // disk as graven's user, and the layer says root, as it does when baking as root.
    let mapped = crate::sandbox::rootless().then(|| {
        (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        )
    });
    let inside = |id: u32, host: Option<u32>| if host == Some(id) { 0 } else { id };
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for child in fs::read_dir(&dir)? {
            let child = child?;
            let name = child.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(child.path())?;
            let link = if meta.file_type().is_symlink() {
                Some(fs::read_link(child.path())?.to_string_lossy().into_owned())
            } else {
                None
            };
            if meta.is_dir() {
                stack.push((child.path(), rel.clone()));
            }
            out.insert(
                rel,
                Seen {
                    is_dir: meta.is_dir(),
                    mode: meta.permissions().mode() & 0o7777,
                    uid: inside(meta.uid(), mapped.map(|m| m.0)),
                    gid: inside(meta.gid(), mapped.map(|m| m.1)),
                    size: meta.len(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    ctime: (meta.ctime(), meta.ctime_nsec()),
                    ino: meta.ino(),
                    link,
                },
            );
        }
    }
    Ok(out)
}

/// The entries of the layer that turns `before` into `after` (both snapshots of `root`):
/// new and changed paths as they are now, removed ones as whiteouts (only the topmost).
/// `skip` names top-level directories the sandbox mounts over, which are never content.
pub fn diff(
    root: &Path,
    before: &BTreeMap<String, Seen>,
    after: &BTreeMap<String, Seen>,
    skip: &[&str],
) -> Vec<Entry> {
    let skipped = |path: &str| {
        let top = path.split('/').next().unwrap_or(path);
        skip.contains(&top)
    };
    let mut entries = Vec::new();
    for (path, now) in after {
        if skipped(path) {
            continue;
        }
        let changed = match before.get(path) {
            None => true,
            Some(was) if now.is_dir && was.is_dir => {
                (now.mode, now.uid, now.gid) != (was.mode, was.uid, was.gid)
            }
            // Not the change time: a chmod to the same mode or a hard link made to a file
            // changes it and nothing the layer holds. (A file rewritten in place with its size
            // and mtime put back goes unseen here; the overlay way compares its content.)
            Some(was) => {
                Seen {
                    ctime: now.ctime,
                    ..was.clone()
                } != *now
            }
        };
        if !changed {
            continue;
        }
        let kind = if now.is_dir {
            EntryKind::Dir
        } else if let Some(target) = &now.link {
            EntryKind::Symlink(target.clone())
        } else {
            EntryKind::File {
                source: root.join(path),
                size: now.size,
            }
        };
        entries.push(Entry {
            path: path.clone(),
            kind,
            mode: now.mode,
            uid: now.uid,
            gid: now.gid,
        });
    }
    for path in before.keys() {
        if after.contains_key(path) || skipped(path) {
            continue;
        }
        // Only the topmost removal is written: below a directory that is gone, or that a
        // file or symlink replaced, nothing is left to remove.
        let parent_gone = path
            .rsplit_once('/')
            .is_some_and(|(parent, _)| !after.get(parent).is_some_and(|seen| seen.is_dir));
        if parent_gone {
            continue;
        }
        entries.push(whiteout(path));
    }
    normalize(&mut entries);
    entries
}

/// A `Seen` from what `stat` says of a path; `link` is its target when it is a symlink.
fn seen_of(stat: &rustix::fs::Stat, link: Option<String>) -> Seen {
    Seen {
        is_dir: rustix::fs::FileType::from_raw_mode(stat.st_mode)
            == rustix::fs::FileType::Directory,
        mode: stat.st_mode & 0o7777,
        uid: stat.st_uid,
        gid: stat.st_gid,
        size: stat.st_size as u64,
        mtime: (stat.st_mtime, stat.st_mtime_nsec as i64),
        ctime: (stat.st_ctime, stat.st_ctime_nsec as i64),
        ino: stat.st_ino,
        link,
    }
}

/// What `lower` (a directory of the lower tree) holds at `name`, not following symlinks.
fn lower_seen(lower: &OwnedFd, name: &OsStr) -> io::Result<Option<Seen>> {
    let stat = match rustix::fs::statat(lower, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let link = if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Symlink
    {
        let target = rustix::fs::readlinkat(lower, name, Vec::new())?;
        Some(target.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(Some(seen_of(&stat, link)))
}

/// The entries of the layer a RUN made on an overlay, read from its upper dir alone: what
/// `diff` gives for the same change made to an unpacked root (the tests bake both ways and
/// compare digests). `lower` is the tree the RUN started from (the overlay's lower dirs,
/// merged), read only where the upper dir holds something; `pre` is what the upper dir held
/// before the command (the working directory graven made), which counts as unchanged.
/// A path is compared with what it was as `diff` compares it, but for the inode, which a
/// copy-up always changes: a file in a directory the RUN removed and made again (opaque) is
/// new whatever its metadata, the paths that directory held and no longer does are removals.
pub fn upper_diff(
    upper: &Path,
    lower: &Path,
    pre: &BTreeMap<String, Seen>,
    skip: &[&str],
) -> io::Result<Vec<Entry>> {
    let lower = rustix::fs::open(
        lower,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut walk = UpperWalk {
        pre,
        skip,
        entries: Vec::new(),
    };
    walk.dir(upper, "", Some(&lower), false)?;
    let mut entries = walk.entries;
    normalize(&mut entries);
    Ok(entries)
}

struct UpperWalk<'a> {
    pre: &'a BTreeMap<String, Seen>,
    skip: &'a [&'a str],
    entries: Vec<Entry>,
}

impl UpperWalk<'_> {
    /// Walks `dir` (the upper dir's copy of `rel`); `lower` is the lower tree's directory at
    /// `rel` when it has one, `hidden` whether the upper one hides it (opaque).
    fn dir(
        &mut self,
        dir: &Path,
        rel: &str,
        lower: Option<&OwnedFd>,
        hidden: bool,
    ) -> io::Result<()> {
        let join = |name: &str| {
            if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            }
        };
        let mut names = std::collections::BTreeSet::new();
        for child in fs::read_dir(dir)? {
            let child = child?;
            let os_name = child.file_name();
            let name = os_name.to_string_lossy().into_owned();
            names.insert(os_name.clone());
            if rel.is_empty() && self.skip.contains(&name.as_str()) {
                continue;
            }
            let path = join(&name);
            let meta = fs::symlink_metadata(child.path())?;
            let below = match lower {
                Some(lower) => lower_seen(lower, &os_name)?,
                None => None,
            };
            let was = self.pre.get(&path).cloned().or_else(|| below.clone());
            let kind = meta.file_type();
            // overlayfs records a removal as a 0/0 character device.
            if kind.is_char_device() && meta.rdev() == 0 {
                if was.is_some() {
                    self.entries.push(whiteout(&path));
                }
                continue;
            }
            // A layer carries directories, regular files and symlinks. A socket the step left
            // is not content (the lower tree's stays); a device node or FIFO it made is refused
            // by name: writing the layer would open it on the host, and a block device there
            // would be the host's disk.
            if kind.is_socket() {
                continue;
            }
            if kind.is_block_device() || kind.is_char_device() || kind.is_fifo() {
                let what = if kind.is_fifo() {
                    "a fifo"
                } else {
                    "a device node"
                };
                return Err(io::Error::other(format!(
                    "the command left {what} at /{path}, which an image layer made by graven \
                     cannot hold; remove it in the same RUN"
                )));
            }
            let link = if meta.file_type().is_symlink() {
                Some(fs::read_link(child.path())?.to_string_lossy().into_owned())
            } else {
                None
            };
            let now = Seen {
                is_dir: meta.is_dir(),
                mode: meta.permissions().mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: meta.len(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
                ino: meta.ino(),
                link,
            };
            let changed = match &was {
                None => true,
                Some(was) if now.is_dir && was.is_dir => {
                    (now.mode, now.uid, now.gid) != (was.mode, was.uid, was.gid)
                }
                // A copy-up changes the inode and its change time whatever the step did
                // (a chmod to the same mode, a hard link made to it), so a file whose other
                // metadata is the lower one's changed only if its content did: useradd
                // rewrites its backups in place and puts their size and mtime back.
                Some(was) => {
                    hidden
                        || Seen {
                            ino: now.ino,
                            ctime: now.ctime,
                            ..was.clone()
                        } != now
                        || (was.link.is_none()
                            && !now.is_dir
                            && below.is_some()
                            && !self.pre.contains_key(&path)
                            && match lower {
                                Some(lower) => !same_content(&child.path(), lower, &os_name)?,
                                None => true,
                            })
                }
            };
            if changed {
                let kind = if now.is_dir {
                    EntryKind::Dir
                } else if let Some(target) = &now.link {
                    EntryKind::Symlink(target.clone())
                } else {
                    EntryKind::File {
                        source: child.path(),
                        size: now.size,
                    }
                };
                self.entries.push(Entry {
                    path: path.clone(),
                    kind,
                    mode: now.mode,
                    uid: now.uid,
                    gid: now.gid,
                });
            }
            if now.is_dir {
                let below_dir = match (lower, &below) {
                    (Some(lower), Some(below)) if below.is_dir => Some(rustix::fs::openat(
                        lower,
                        &os_name,
                        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?),
                    _ => None,
                };
                let opaque = hidden || is_opaque(&child.path());
                self.dir(&child.path(), &path, below_dir.as_ref(), opaque)?;
            }
        }
        // An opaque directory hides what the lower tree held in it: what it no longer holds
        // is removed.
        if hidden && let Some(lower) = lower {
            let mut gone = Vec::new();
            for entry in rustix::fs::Dir::read_from(lower)? {
                let entry = entry?;
                let name = OsStr::from_bytes(entry.file_name().to_bytes());
                if name == "." || name == ".." || names.contains(name) {
                    continue;
                }
                let name = name.to_string_lossy().into_owned();
                if rel.is_empty() && self.skip.contains(&name.as_str()) {
                    continue;
                }
                gone.push(whiteout(&join(&name)));
            }
            self.entries.extend(gone);
        }
        Ok(())
    }
}

/// Whether the file at `upper` holds the bytes of `name` in the lower directory `lower`.
fn same_content(upper: &Path, lower: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    let lower = rustix::fs::openat(
        lower,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let (mut a, mut b) = (
        BufReader::new(File::open(upper)?),
        BufReader::new(File::from(lower)),
    );
    let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            return Ok(b.read(&mut y[..1])? == 0);
        }
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// Whether overlayfs marked `dir` opaque (made again after its lower copy was removed).
fn is_opaque(dir: &Path) -> bool {
    let mut value = [0u8; 8];
    rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut value[..])
        .is_ok_and(|n| value[..n] == *b"y")
}

/// The whiteout entry that removes `path`.
fn whiteout(path: &str) -> Entry {
    let name = match path.rsplit_once('/') {
        Some((parent, name)) => format!("{parent}/.wh.{name}"),
        None => format!(".wh.{path}"),
    };
    Entry {
        path: name,
        kind: EntryKind::Empty,
        mode: 0o644,
        uid: 0,
        gid: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8], dir: &Path) -> Entry {
        let source = dir.join(path.replace('/', "_"));
        fs::write(&source, content).unwrap();
        Entry {
            path: path.to_owned(),
            kind: EntryKind::File {
                source,
                size: content.len() as u64,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    fn list(store: &Store, layer: FinishedLayer) -> Vec<String> {
        let mut txn = store.transaction().unwrap();
        let descriptor = layer.keep(&mut txn).unwrap();
        txn.commit();
        let mut archive = tar::Archive::new(open_layer(store, &descriptor.digest).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                format!(
                    "{} {:o} {}:{} {} {:?}",
                    e.path().unwrap().display(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                    h.username().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn layers_are_sorted_and_normalized_whatever_the_input_order() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        let dir = |path: &str| Entry {
            path: path.to_owned(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        let mut a = vec![
            file("a/b", b"1", src.path()),
            dir("a"),
            file("a-b", b"2", src.path()),
            file("a/a", b"3", src.path()),
        ];
        let mut b: Vec<Entry> = a.iter().rev().cloned().collect();
        normalize(&mut a);
        normalize(&mut b);
        assert_eq!(a, b);
        let la = write_layer(&store, &a, 0).unwrap();
        let lb = write_layer(&store, &b, 0).unwrap();
        assert_eq!(la.digest, lb.digest);
        assert_eq!(
            list(&store, la),
            [
                "a/ 755 0:0 0 Some(\"\")",
                "a/a 644 0:0 0 Some(\"\")",
                "a/b 644 0:0 0 Some(\"\")",
                "a-b 644 0:0 0 Some(\"\")"
            ]
        );
        // A different mtime (SOURCE_DATE_EPOCH) gives a different, but again stable, layer.
        let l1 = write_layer(&store, &a, 1_700_000_000).unwrap();
        let l2 = write_layer(&store, &a, 1_700_000_000).unwrap();
        assert_eq!(l1.digest, l2.digest);
        assert_ne!(l1.digest, lb.digest);
    }

    #[test]
    fn long_paths_and_symlink_targets_round_trip() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        let long = format!("{}/file", "d".repeat(150));
        let target = "t".repeat(120);
        let mut entries = vec![
            file(&long, b"x", src.path()),
            Entry {
                path: "link".to_owned(),
                kind: EntryKind::Symlink(target.clone()),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        ];
        normalize(&mut entries);
        let layer = write_layer(&store, &entries, 0).unwrap();
        let mut txn = store.transaction().unwrap();
        let descriptor = layer.keep(&mut txn).unwrap();
        txn.commit();
        let mut archive = tar::Archive::new(open_layer(&store, &descriptor.digest).unwrap());
        let read: Vec<(String, Option<String>)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect();
        assert_eq!(read, [(long, None), ("link".to_owned(), Some(target))]);
    }

    #[test]
    fn diff_finds_new_changed_and_removed_paths() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc/keep")).unwrap();
        fs::create_dir_all(r.join("gone/deep")).unwrap();
        fs::write(r.join("etc/same"), "x").unwrap();
        fs::write(r.join("etc/changed"), "x").unwrap();
        fs::write(r.join("etc/removed"), "x").unwrap();
        let before = snapshot(r).unwrap();
        fs::write(r.join("etc/changed"), "xy").unwrap();
        fs::remove_file(r.join("etc/removed")).unwrap();
        fs::remove_dir_all(r.join("gone")).unwrap();
        fs::write(r.join("etc/keep/new"), "n").unwrap();
        fs::create_dir(r.join("proc")).unwrap();
        let after = snapshot(r).unwrap();
        let paths: Vec<String> = diff(r, &before, &after, &["proc"])
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            [".wh.gone", "etc/.wh.removed", "etc/changed", "etc/keep/new"]
        );
    }
}
