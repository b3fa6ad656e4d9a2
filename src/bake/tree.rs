//! Layer contents: the entries a step adds, written as a reproducible tar (sorted by path
//! components, fixed mtime, given owners and modes, no user or group names), plus reading
//! layers back: listing the paths the lower layers hold and unpacking them for RUN.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use sha2::Digest as _;

use crate::store::snapshot::PathChange;
use crate::store::{
    Compressing, Descriptor, Digest, FinishedLayer, LayerWriter, StagedLayer, StagingWriter, Store,
    StoreError,
};

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
    let writer = write_tar(LayerWriter::new(store)?, entries, mtime, Files::Sources)?;
    let finished = writer.finish()?;
    // What the layer does to which paths exist, for a later COPY on top of it (`LowerTree`):
    // an index that cannot be written only costs reading the layer then.
    let _ = store.put_path_index(&finished.digest, &path_changes_of(entries));
    Ok(finished)
}

/// A layer with at least this many bytes of file content is staged (`stage_layer`) rather
/// than compressed as it is written: below it the gzip takes a few milliseconds, and a layer
/// written whole is one the next step never waits for.
pub const STAGE_FROM: u64 = 4 << 20;

/// The bytes of file content the entries hold.
pub fn content_len(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|entry| match entry.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        })
        .sum()
}

/// Writes the (normalized) entries as an uncompressed tar in a temp file of the store, to be
/// compressed off the bake's path (`StagedLayer::compress`). Its path index is written under
/// the diff_id, which names the same tar as an uncompressed blob, so a later COPY or WORKDIR
/// reads no layer before the gzip is done; the caller indexes the gzip blob once it is.
pub fn stage_layer(
    store: &Store,
    entries: &[Entry],
    mtime: u64,
) -> Result<(StagedLayer, Vec<PathChange>), StoreError> {
    let writer = write_tar(StagingWriter::new(store)?, entries, mtime, Files::Sources)?;
    let staged = writer.finish()?;
    let changes = path_changes_of(entries);
    let _ = store.put_path_index(&staged.diff_id, &changes);
    Ok((staged, changes))
}

/// The diff_id and length of the layer tar the (normalized) entries make, written nowhere:
/// what names a layer that `compress_from_tree` then writes from the tree its files are in.
pub fn tar_diff_id(entries: &[Entry], mtime: u64) -> Result<(Digest, u64), StoreError> {
    let sink = write_tar(TarHash::default(), entries, mtime, Files::Sources)?;
    Ok((Digest::from_sha256(sink.hasher.finalize().into()), sink.len))
}

/// Starts compressing the layer the (normalized) entries make, named `diff_id` (`tar_diff_id`),
/// on a thread of its own (`Compressing::start`), reading each file's bytes at its path in
/// `tree` (resolved inside it by the kernel), not from the entry's source: the tree is where
/// the layer stays unpacked, a RUN's upper dir become its snapshot, so the tar is never
/// written out uncompressed. Its path index is written under the diff_id, as `stage_layer`
/// writes it.
pub fn compress_from_tree(
    store: &Store,
    entries: Vec<Entry>,
    mtime: u64,
    tree: PathBuf,
    diff_id: Digest,
) -> Result<(Compressing, Vec<PathChange>), StoreError> {
    let changes = path_changes_of(&entries);
    let _ = store.put_path_index(&diff_id, &changes);
    let root = crate::sandbox::root::open_root(&tree).map_err(|source| StoreError::Io {
        path: tree.clone(),
        source,
    })?;
    let compressing = Compressing::start(store, diff_id, move |writer| {
        write_tar(writer, &entries, mtime, Files::InRoot(root.as_fd())).map(|_| ())
    })?;
    Ok((compressing, changes))
}

/// Hashes a tar as it is written, keeping none of it.
#[derive(Default)]
struct TarHash {
    hasher: sha2::Sha256,
    len: u64,
}

impl Write for TarHash {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where `write_tar` reads a file entry's bytes.
#[derive(Clone, Copy)]
enum Files<'a> {
    /// From the entry's source.
    Sources,
    /// From the entry's path inside this tree, resolved inside it, following no symlink.
    InRoot(BorrowedFd<'a>),
}

/// Writes the entries as a tar into `writer` and returns it, the tar ended.
fn write_tar<W: Write>(
    writer: W,
    entries: &[Entry],
    mtime: u64,
    files: Files<'_>,
) -> Result<W, StoreError> {
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
                let file = match files {
                    Files::Sources => File::open(source),
                    Files::InRoot(root) => crate::sandbox::root::open_in(
                        root,
                        &entry.path,
                        OFlags::RDONLY | OFlags::NOFOLLOW,
                    )
                    .map(File::from),
                }
                .map_err(|source_err| StoreError::Io {
                    path: match files {
                        Files::Sources => source.clone(),
                        Files::InRoot(_) => PathBuf::from(&entry.path),
                    },
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
    tar.into_inner().map_err(io("layer"))
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
    PathChange::of(path, dir)
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
        // As unpacking applies them: a whiteout removes the path it names, not adds itself.
        for entry in entries {
            self.apply(path_change(
                &entry.path,
                matches!(entry.kind, EntryKind::Dir),
            ));
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
    crate::store::snapshot::tar_path_changes(open_layer(store, digest)?).map_err(err)
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
/// Also returns what else the upper dir holds, for `settle_upper`.
pub fn upper_diff(
    upper: &Path,
    lower: &Path,
    pre: &BTreeMap<String, Seen>,
    skip: &[&str],
) -> io::Result<(Vec<Entry>, UpperRest)> {
    let lower = rustix::fs::open(
        lower,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut walk = UpperWalk {
        pre,
        skip,
        entries: Vec::new(),
        rest: UpperRest::default(),
    };
    walk.dir(upper, "", Some(&lower), false)?;
    let mut entries = walk.entries;
    normalize(&mut entries);
    Ok((entries, walk.rest))
}

/// What a RUN's upper dir holds that its layer does not, found by `upper_diff`: what
/// `settle_upper` removes so that the upper dir, over the same lower dirs, shows the tree the
/// layer unpacked there would.
#[derive(Debug, Default)]
pub struct UpperRest {
    /// Paths to remove whole, so the lower tree shows through: overlayfs's copies of files
    /// the step left as they were, sockets, and what is under the directories the sandbox
    /// mounts over.
    unchanged: Vec<String>,
    /// The directories graven made for the working directory that the layer does not hold:
    /// removed when nothing the layer holds is under them (unpacking makes them only then).
    made_dirs: Vec<String>,
    /// Something to remove is inside a directory the step made opaque, where the lower tree
    /// would not show through: this upper dir cannot be the snapshot.
    hidden: bool,
}

struct UpperWalk<'a> {
    pre: &'a BTreeMap<String, Seen>,
    skip: &'a [&'a str],
    entries: Vec<Entry>,
    rest: UpperRest,
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
                self.rest.unchanged.push(name);
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
                self.rest.hidden |= hidden;
                self.rest.unchanged.push(path);
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
            } else if now.is_dir {
                // A copied-up directory (the lower one's mode and owners) stays: its
                // children may be entries. One graven made is the layer's only when
                // something under it is.
                if !below.as_ref().is_some_and(|below| below.is_dir) {
                    self.rest.made_dirs.push(path.clone());
                }
            } else {
                self.rest.hidden |= hidden;
                self.rest.unchanged.push(path.clone());
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

/// Makes a RUN's upper dir, once its layer is written, the tree that unpacking that layer
/// onto an overlay of the same lower dirs makes (`Store::snapshots`), so it can be the layer's
/// snapshot without unpacking it: what the layer does not hold is removed (`rest`, and the
/// files the reproducibility rules `dropped`), so the lower tree shows through; every file and
/// symlink takes the layer's `mtime`, a file the rules rewrote its rewritten bytes, a hard
/// link becomes a file of its own (layers store copies); no extended attribute is left but
/// overlayfs's own; `/` is 0755 again. `Ok(false)` means the upper dir cannot be made that
/// tree (a removal inside an opaque directory): it is then thrown away and the snapshot
/// unpacked when a step needs it. Call it only once the step's processes are gone. Every
/// path is taken inside `upper` by descriptor, following no symlink the step made.
pub fn settle_upper(
    upper: &Path,
    entries: &[Entry],
    rest: &UpperRest,
    dropped: &[String],
    mtime: u64,
) -> io::Result<bool> {
    use crate::store::inroot;
    if rest.hidden {
        return Ok(false);
    }
    let root = inroot::open_root(upper)?;
    let split = |path: &str| -> (String, String) {
        match path.rsplit_once('/') {
            Some((parent, name)) => (parent.to_owned(), name.to_owned()),
            None => (String::new(), path.to_owned()),
        }
    };
    for path in dropped {
        // Inside an opaque directory the lower file would not show through.
        let mut ancestor = String::new();
        for part in path.split('/').take(path.matches('/').count()) {
            ancestor = if ancestor.is_empty() {
                part.to_owned()
            } else {
                format!("{ancestor}/{part}")
            };
            let dir = inroot::open_dir(root.as_fd(), Path::new(&ancestor))?;
            let mut value = [0u8; 8];
            if rustix::fs::fgetxattr(&dir, "trusted.overlay.opaque", &mut value[..])
                .is_ok_and(|n| value[..n] == *b"y")
            {
                return Ok(false);
            }
        }
    }
    for path in rest.unchanged.iter().chain(dropped) {
        let (parent, name) = split(path);
        let dir = inroot::open_dir(root.as_fd(), Path::new(&parent))?;
        inroot::remove_at(dir.as_fd(), OsStr::new(&name))?;
    }
    let by_path: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: i64::try_from(mtime.max(1)).unwrap_or(i64::MAX),
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: i64::try_from(mtime.max(1)).unwrap_or(i64::MAX),
            tv_nsec: 0,
        },
    };
    let settle = Settle {
        upper,
        by_path,
        times,
    };
    if !settle.dir(root.as_fd(), "")? {
        return Ok(false);
    }
    let mut made: Vec<&String> = rest.made_dirs.iter().collect();
    made.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for path in made {
        let (parent, name) = split(path);
        let dir = inroot::open_dir(root.as_fd(), Path::new(&parent))?;
        match rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    strip_xattrs(root.as_fd(), None)?;
    rustix::fs::fchmod(&root, Mode::from_raw_mode(0o755))?;
    Ok(true)
}

/// The walk of `settle_upper` over what is left of the upper dir.
struct Settle<'a> {
    upper: &'a Path,
    by_path: BTreeMap<&'a str, &'a Entry>,
    times: rustix::fs::Timestamps,
}

impl Settle<'_> {
    /// Settles what the directory `dir` (the upper dir's `rel`) holds; `false` when something
    /// is there that the layer cannot account for.
    fn dir(&self, dir: BorrowedFd<'_>, rel: &str) -> io::Result<bool> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        for name in names {
            let text = name.to_string_lossy();
            let path = if rel.is_empty() {
                text.into_owned()
            } else {
                format!("{rel}/{text}")
            };
            let stat = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
            strip_xattrs(dir, Some(&name))?;
            let entry = self.by_path.get(path.as_str());
            match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
                rustix::fs::FileType::Directory => {
                    let child = rustix::fs::openat(
                        dir,
                        &name,
                        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    if !self.dir(child.as_fd(), &path)? {
                        return Ok(false);
                    }
                }
                // overlayfs's removals: the layer's whiteouts, or nothing below to hide.
                rustix::fs::FileType::CharacterDevice if stat.st_rdev == 0 => {}
                rustix::fs::FileType::Symlink if entry.is_some() => {
                    rustix::fs::utimensat(dir, &name, &self.times, AtFlags::SYMLINK_NOFOLLOW)?;
                }
                rustix::fs::FileType::RegularFile => {
                    let Some(Entry {
                        kind: EntryKind::File { source, .. },
                        mode,
                        uid,
                        gid,
                        ..
                    }) = entry
                    else {
                        return Ok(false);
                    };
                    let rewritten = (*source != self.upper.join(&path)).then_some(source.as_path());
                    if rewritten.is_some() || stat.st_nlink > 1 {
                        copy_in(dir, &name, rewritten, (*mode, *uid, *gid))?;
                    }
                    rustix::fs::utimensat(dir, &name, &self.times, AtFlags::SYMLINK_NOFOLLOW)?;
                }
                _ => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// Replaces `name` in `dir` with a new file with the entry's mode and owners, holding the
/// bytes of `rewritten` (graven's copy) when given, else its own: a hard link's own copy.
fn copy_in(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    rewritten: Option<&Path>,
    (mode, uid, gid): (u32, u32, u32),
) -> io::Result<()> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut from = File::from(match rewritten {
        Some(source) => rustix::fs::open(source, flags, Mode::empty())?,
        None => rustix::fs::openat(dir, name, flags, Mode::empty())?,
    });
    // No layer entry has a name starting with `.wh.` (`check_names`), so this one is free.
    let temp = OsStr::new(".wh.graven-settle");
    let mut to = File::from(rustix::fs::openat(
        dir,
        temp,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?);
    io::copy(&mut from, &mut to)?;
    // Owner first: chown clears the setuid and setgid bits chmod sets.
    if rustix::process::geteuid().is_root() {
        rustix::fs::fchown(
            &to,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
    }
    rustix::fs::fchmod(&to, Mode::from_raw_mode(mode))?;
    rustix::fs::renameat(dir, temp, dir, name)?;
    Ok(())
}

/// Removes the extended attributes of `name` in `dir` (of `dir` itself when `None`) but
/// overlayfs's own (`trusted.overlay.*`: opaque directories): a layer carries none, so the
/// tree it unpacks to has none either.
fn strip_xattrs(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // The l* calls name the file through the directory's descriptor and do not follow the
    // last component: a symlink's own attributes, never its target's.
    let path = name.map(|name| {
        let mut path = std::ffi::OsString::from(format!("/proc/self/fd/{}/", dir.as_raw_fd()));
        path.push(name);
        path
    });
    let mut list = vec![0u8; 64 * 1024];
    let n = match &path {
        Some(path) => rustix::fs::llistxattr(path.as_os_str(), &mut list[..]),
        None => rustix::fs::flistxattr(dir, &mut list[..]),
    };
    let n = match n {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for attr in list[..n].split(|b| *b == 0).filter(|a| !a.is_empty()) {
        if attr.starts_with(b"trusted.overlay.") {
            continue;
        }
        let attr = OsStr::from_bytes(attr);
        match &path {
            Some(path) => rustix::fs::lremovexattr(path.as_os_str(), attr)?,
            None => rustix::fs::fremovexattr(dir, attr)?,
        }
    }
    Ok(())
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

    /// A RUN layer added to a current tree removes what its whiteouts name, as unpacking it
    /// does: a WORKDIR or COPY above a RUN that deleted a directory makes it again.
    #[test]
    fn a_run_layers_whiteouts_remove_from_the_lower_tree() {
        let mut lower = LowerTree::default();
        let dir = |path: &str| Entry {
            path: path.to_owned(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        let whiteout = |path: &str| Entry {
            kind: EntryKind::Empty,
            ..dir(path)
        };
        lower.add_if_current(&[], &[dir("d"), dir("d/sub"), dir("e"), dir("e/x")]);
        let one = Descriptor::new(crate::store::MEDIA_TYPE_LAYER, Digest::of(b"one"), 0);
        lower.add_if_current(
            std::slice::from_ref(&one),
            &[whiteout(".wh.d"), whiteout("e/.wh..wh..opq")],
        );
        let paths: Vec<&str> = lower.paths.keys().map(String::as_str).collect();
        assert_eq!(paths, ["e"]);
    }

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

    /// A layer compressed from the tree that holds its files (a RUN's snapshot) is the blob
    /// writing it from its entries gives, under the diff_id hashed without writing the tar;
    /// the files are read from the tree, not from the entries' sources; a file that changed
    /// in the tree meanwhile is an error, not another layer under that diff_id.
    #[test]
    fn a_layer_compressed_from_its_tree_is_the_blob_its_entries_write() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let src = tempfile::tempdir().unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        // Over three pgzip chunks.
        let big: Vec<u8> = (0..(3 << 20) + 17).map(|_| rng.u8(..)).collect();
        let mut entries = vec![
            file("d/big", &big, src.path()),
            Entry {
                path: "d".to_owned(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            file("small", b"small", src.path()),
            Entry {
                path: "link".to_owned(),
                kind: EntryKind::Symlink("d/big".to_owned()),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        ];
        normalize(&mut entries);
        let inline = write_layer(&store, &entries, 7).unwrap();
        let (diff_id, len) = tar_diff_id(&entries, 7).unwrap();
        assert_eq!(diff_id, inline.diff_id);
        assert!(len > big.len() as u64);
        // The tree the layer is unpacked in; the entries' sources are gone.
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir(tree.path().join("d")).unwrap();
        fs::write(tree.path().join("d/big"), &big).unwrap();
        fs::write(tree.path().join("small"), b"small").unwrap();
        std::os::unix::fs::symlink("d/big", tree.path().join("link")).unwrap();
        drop(src);
        let compress = || {
            compress_from_tree(
                &store,
                entries.clone(),
                7,
                tree.path().to_owned(),
                diff_id.clone(),
            )
            .unwrap()
            .0
            .wait()
        };
        let blob = compress().unwrap();
        assert_eq!(
            (&blob.digest, blob.size, &blob.diff_id),
            (&inline.digest, inline.size, &inline.diff_id)
        );
        fs::write(tree.path().join("small"), b"smell").unwrap();
        assert!(
            matches!(compress(), Err(StoreError::CorruptBlob { .. })),
            "a changed tree is not this layer"
        );
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

    /// An upper dir laid out by hand as overlayfs leaves one (a copy-up of a file the step
    /// left as it was, a socket, what is under a directory the sandbox mounts over, a
    /// working directory graven made, a file the rules drop, and new files with an extended
    /// attribute and a second hard link) settles into what the layer holds and nothing else.
    #[test]
    fn a_settled_upper_dir_holds_the_layer_and_nothing_else() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        let (l, u) = (lower.path(), upper.path());
        fs::write(l.join("keep"), "k").unwrap();
        fs::create_dir_all(l.join("var/log")).unwrap();
        fs::write(l.join("var/log/dpkg.log"), "lower log").unwrap();
        let kept_time = fs::metadata(l.join("keep")).unwrap().modified().unwrap();
        fs::write(u.join("keep"), "k").unwrap();
        File::options()
            .write(true)
            .open(u.join("keep"))
            .unwrap()
            .set_modified(kept_time)
            .unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(u.join("sock")).unwrap();
        fs::create_dir_all(u.join("proc/self")).unwrap();
        fs::create_dir_all(u.join("made/deeper")).unwrap();
        let pre = snapshot(u).unwrap();
        fs::create_dir_all(u.join("var/log")).unwrap();
        fs::write(u.join("var/log/dpkg.log"), "new log").unwrap();
        fs::write(u.join("new"), "new").unwrap();
        fs::hard_link(u.join("new"), u.join("new-link")).unwrap();
        rustix::fs::setxattr(
            u.join("new"),
            "user.graven-test",
            b"x",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        fs::set_permissions(u, fs::Permissions::from_mode(0o700)).unwrap();
        let (mut entries, rest) = upper_diff(u, l, &pre, &["proc"]).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["new", "new-link", "var/log/dpkg.log"]);
        let dropped = vec!["var/log/dpkg.log".to_owned()];
        entries.retain(|e| !dropped.contains(&e.path));
        assert!(settle_upper(u, &entries, &rest, &dropped, 5).unwrap());
        let left: Vec<String> = snapshot(u).unwrap().into_keys().collect();
        assert_eq!(left, ["new", "new-link", "var", "var/log"]);
        for name in ["new", "new-link"] {
            let meta = fs::symlink_metadata(u.join(name)).unwrap();
            assert_eq!((meta.nlink(), meta.mtime()), (1, 5), "{name}");
            assert_eq!(fs::read_to_string(u.join(name)).unwrap(), "new");
            let mut list = [0u8; 256];
            let n = rustix::fs::llistxattr(u.join(name), &mut list[..]).unwrap();
            assert_eq!(&list[..n], b"", "{name}");
        }
        assert_eq!(
            fs::metadata(u).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }

    /// A file the rules drop inside a directory the step removed and made again (opaque)
    /// cannot be removed from the upper dir to show the lower one: the upper dir is not kept.
    #[test]
    fn an_upper_dir_that_cannot_show_the_layer_is_not_kept() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        let (l, u) = (lower.path(), upper.path());
        fs::create_dir_all(l.join("var/log")).unwrap();
        fs::write(l.join("var/log/dpkg.log"), "lower log").unwrap();
        fs::create_dir_all(u.join("var/log")).unwrap();
        rustix::fs::setxattr(
            u.join("var/log"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        fs::write(u.join("var/log/dpkg.log"), "new log").unwrap();
        let (mut entries, rest) = upper_diff(u, l, &BTreeMap::new(), &[]).unwrap();
        let dropped = vec!["var/log/dpkg.log".to_owned()];
        entries.retain(|e| !dropped.contains(&e.path));
        assert!(!settle_upper(u, &entries, &rest, &dropped, 5).unwrap());
    }
}
