//! Unpacking layers onto a directory, for the local runtime's shared read-only root
//! filesystems and for bake's RUN steps: one implementation, so both see the same tree.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::Digest as _;

use super::{
    Descriptor, Digest, MAX_IMAGE_SIZE_VAR, Result, Store, StoreError, inroot, io_err,
    max_image_size,
};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: sha2::Sha256::new(),
        }
    }

    /// Reads what is left (tar leaves padding unread) and returns the digest of it all.
    fn finish(mut self) -> io::Result<Digest> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(Digest::from_sha256(self.hasher.finalize().into()))
    }
}

impl Store {
    /// Applies `layers` in order on top of `root`: each checked against its digest (as
    /// stored) and, where the image lists one, its diff id (uncompressed), with OCI whiteouts
    /// and opaque directories applied and entries that would leave `root` refused. Gzip and
    /// plain tar layers are told apart by their first bytes. The image may take at most
    /// `max_image_size()` bytes unpacked; past that it fails naming the layer, and what was
    /// unpacked stays in `root` for the caller (which unpacks into a temp dir) to drop.
    pub fn unpack_layers(
        &self,
        layers: &[Descriptor],
        diff_ids: &[Digest],
        root: &Path,
    ) -> Result<()> {
        // `root` is the image's `/`: 0755 like every image's, not what the unpacking
        // process's umask made of it (0700 under 077, which only root could enter).
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(root))?;
        let mut budget = Budget::new(max_image_size()?);
        for (index, layer) in layers.iter().enumerate() {
            self.unpack_layer(&layer.digest, diff_ids.get(index), root, &mut budget)?;
        }
        Ok(())
    }

    /// Applies one layer on top of `root` as `unpack_layers` does each, `used` bytes of the
    /// image's bound being taken by the layers below it already (a snapshot is one layer
    /// unpacked on the ones below); returns what the image takes with this layer.
    pub(super) fn unpack_layer_above(
        &self,
        layer: &Descriptor,
        diff_id: &Digest,
        root: &Path,
        used: u64,
    ) -> Result<u64> {
        let limit = max_image_size()?;
        let mut budget = Budget {
            limit,
            left: limit.saturating_sub(used),
        };
        self.unpack_layer(&layer.digest, Some(diff_id), root, &mut budget)?;
        Ok(limit - budget.left)
    }

    fn unpack_layer(
        &self,
        digest: &Digest,
        diff_id: Option<&Digest>,
        root: &Path,
        budget: &mut Budget,
    ) -> Result<()> {
        let bad = |reason: String| StoreError::BadLayer {
            digest: digest.clone(),
            reason,
        };
        let file = self.open_blob(digest)?;
        let mut compressed = Hashing::new(io::BufReader::new(file));
        let gzip = compressed
            .inner
            .fill_buf()
            .map_err(|e| bad(format!("cannot read: {e}")))?
            .starts_with(&[0x1f, 0x8b]);
        let actual_diff = {
            let decoder: Box<dyn Read + '_> = if gzip {
                Box::new(flate2::read::GzDecoder::new(&mut compressed))
            } else {
                Box::new(&mut compressed)
            };
            let mut raw = Hashing::new(decoder);
            match apply(&mut raw, root, budget) {
                Ok(()) => {}
                Err(Failure::TooLarge) => {
                    return Err(StoreError::TooLarge {
                        digest: digest.clone(),
                        limit: budget.limit,
                    });
                }
                Err(Failure::Io(e)) => return Err(bad(format!("cannot unpack: {}", chain(&e)))),
            }
            raw.finish().map_err(|e| bad(format!("cannot read: {e}")))?
        };
        let actual = compressed
            .finish()
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        if &actual != digest {
            return Err(bad(format!("its content hashes to {actual}")));
        }
        if let Some(expected) = diff_id
            && expected != &actual_diff
        {
            return Err(bad(format!(
                "its uncompressed content hashes to {actual_diff}, the image says {expected}"
            )));
        }
        Ok(())
    }
}

/// Applies one plain (uncompressed) tar layer on top of `root` as `Store::unpack_layers` does
/// each layer, without a store or digests, bounded by `max_image_size()`: for tools and for
/// the fuzz properties that check what unpacking may touch.
pub fn unpack_tar(reader: impl Read, root: &Path) -> Result<()> {
    match apply(reader, root, &mut Budget::new(max_image_size()?)) {
        Ok(()) => Ok(()),
        Err(Failure::Io(source)) => Err(StoreError::Io {
            path: root.to_owned(),
            source,
        }),
        Err(Failure::TooLarge) => Err(StoreError::Io {
            path: root.to_owned(),
            source: io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("the layer unpacks to more than {MAX_IMAGE_SIZE_VAR}"),
            ),
        }),
    }
}

/// An error with its sources (tar wraps the reason in a source).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Why applying a layer stopped.
enum Failure {
    Io(io::Error),
    /// The image's unpacked size passed its bound.
    TooLarge,
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure::Io(error)
    }
}

impl From<rustix::io::Errno> for Failure {
    fn from(error: rustix::io::Errno) -> Self {
        Failure::Io(error.into())
    }
}

/// What an image may still take on disk as it is unpacked: file bytes as written (a sparse
/// entry counts at its full size) and a block per entry, so neither a gzip bomb nor a flood of
/// empty files fills the disk.
struct Budget {
    limit: u64,
    left: u64,
}

impl Budget {
    fn new(limit: u64) -> Self {
        Budget { limit, left: limit }
    }

    fn charge(&mut self, bytes: u64) -> Result<(), Failure> {
        self.left = self.left.checked_sub(bytes).ok_or(Failure::TooLarge)?;
        Ok(())
    }
}

/// What one entry costs besides its data, as a tar header does.
const ENTRY_COST: u64 = 512;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Applies one layer's tar stream on top of `root`. Every path is resolved inside the root by
/// the kernel (`inroot`), and every change is made relative to a descriptor of the entry's
/// parent directory, so neither a symlink the image made (`link -> /`, then `link/.wh.etc`)
/// nor a name (`.wh..`, `.wh...`) can act outside the root.
fn apply(reader: impl Read, root: &Path, budget: &mut Budget) -> Result<(), Failure> {
    let root_fd = inroot::open_root(root)?;
    let root_fd = root_fd.as_fd();
    // Only root can give files away. Without it every file is the unpacking user's, which is
    // what a rootless sandbox maps to uid 0 inside (its one mapped id).
    let chown = rustix::process::geteuid().is_root();
    let mut archive = tar::Archive::new(reader);
    // What this layer created, as (parent directory's device and inode, name): an opaque
    // marker in the same layer keeps them, however the path that made them was spelled.
    let mut created: HashSet<(u64, u64, OsString)> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        budget.charge(ENTRY_COST)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue; // metadata for the whole archive (git archive's comment), not a file
        }
        let path = clean(&entry.path()?)?;
        let Some(name) = path.file_name().map(ToOwned::to_owned) else {
            continue; // the root itself: nothing to write
        };
        inroot::check_name(&name)?;
        let parent = path.parent().unwrap_or(Path::new(""));
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE.as_bytes() {
            if let Some(dir) = existing_dir(root_fd, parent)? {
                let here = dir_id(&dir)?;
                inroot::remove_children(dir.as_fd(), |child| {
                    created.contains(&(here.0, here.1, child.to_owned()))
                })?;
            }
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
            let hidden = OsStr::from_bytes(hidden);
            inroot::check_name(hidden)
                .map_err(|e| invalid(format!("whiteout {}: {e}", path.display())))?;
            if let Some(dir) = existing_dir(root_fd, parent)? {
                inroot::remove_at(dir.as_fd(), hidden)?;
            }
            continue;
        }
        let dir = inroot::make_dirs(root_fd, parent)?;
        // A new entry replaces whatever a lower layer had there, unless both are directories.
        match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if is_dir(&stat) && kind.is_dir() => {}
            Ok(_) => inroot::remove_at(dir.as_fd(), &name)?,
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let header = entry.header();
        // As tar does: a mode it cannot read leaves the default, an mtime it cannot read
        // leaves the time of unpacking; owners are read only when they are set.
        let mode = Mode::from_raw_mode(
            header
                .mode()
                .map_or(if kind.is_dir() { 0o755 } else { 0o644 }, |mode| {
                    mode & 0o7777
                }),
        );
        let owners = if chown {
            Some((id(header.uid()?)?, gid_of(id(header.gid()?)?)))
        } else {
            None
        };
        let owner = |fd: BorrowedFd<'_>| -> io::Result<()> {
            if let Some((uid, gid)) = owners {
                rustix::fs::fchown(fd, Some(uid), Some(gid))?;
            }
            Ok(())
        };
        let owner_at = |dir: &OwnedFd, name: &OsStr| -> io::Result<()> {
            if let Some((uid, gid)) = owners {
                rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
            }
            Ok(())
        };
        // tar gives a zero mtime as 1: some tools take 0 for "unset".
        let times = header.mtime().ok().map(|mtime| rustix::fs::Timestamps {
            last_access: timespec(mtime.max(1)),
            last_modification: timespec(mtime.max(1)),
        });
        let set_times = |dir: &OwnedFd, name: &OsStr| -> io::Result<()> {
            if let Some(times) = &times {
                rustix::fs::utimensat(dir, name, times, AtFlags::SYMLINK_NOFOLLOW)?;
            }
            Ok(())
        };
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                let made = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                // Owner first: chown clears the setuid and setgid bits chmod sets.
                owner(made.as_fd())?;
                rustix::fs::fchmod(&made, mode)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .filter(|t| !t.as_os_str().is_empty())
                    .ok_or_else(|| invalid(format!("symlink {} has no target", path.display())))?;
                rustix::fs::symlinkat(target.as_ref(), &dir, &name)?;
                owner_at(&dir, &name)?;
                set_times(&dir, &name)?;
            }
            tar::EntryType::Link => {
                // The source is a path inside the image, resolved inside the root like any
                // other (tar would take it relative to the working directory).
                let source = entry.link_name()?.ok_or_else(|| {
                    invalid(format!("hard link {} has no source", path.display()))
                })?;
                let source = clean(&source)?;
                let source_name = source.file_name().unwrap_or_default();
                inroot::check_name(source_name)?;
                let source_dir =
                    inroot::open_dir(root_fd, source.parent().unwrap_or(Path::new("")))?;
                rustix::fs::linkat(&source_dir, source_name, &dir, &name, AtFlags::empty())?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let file = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::WRONLY
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                let mut file = std::fs::File::from(file);
                copy_counted(&mut entry, &mut file, budget)?;
                owner(file.as_fd())?;
                rustix::fs::fchmod(&file, mode)?;
                if let Some(times) = &times {
                    rustix::fs::futimens(&file, times)?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let header = entry.header();
                let device = if kind == tar::EntryType::Fifo {
                    0 // a fifo has no device number, and tars leave the fields blank
                } else {
                    rustix::fs::makedev(
                        header.device_major()?.unwrap_or(0),
                        header.device_minor()?.unwrap_or(0),
                    )
                };
                rustix::fs::mknodat(&dir, &name, file_type, Mode::from_raw_mode(0o600), device)?;
                owner_at(&dir, &name)?;
                // A node just made is not a symlink, so following it cannot leave the root.
                rustix::fs::chmodat(&dir, &name, mode, AtFlags::empty())?;
                set_times(&dir, &name)?;
            }
            other => {
                return Err(invalid(format!(
                    "entry {} has tar type {:?}, which a layer cannot hold",
                    path.display(),
                    other
                ))
                .into());
            }
        }
        let here = dir_id(&dir)?;
        created.insert((here.0, here.1, name));
    }
    Ok(())
}

/// The directory at `parent` when there is one; `None` when it is missing or not a directory
/// (a whiteout there has nothing to hide).
fn existing_dir(root: BorrowedFd<'_>, parent: &Path) -> io::Result<Option<OwnedFd>> {
    match inroot::open_dir(root, parent) {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn dir_id(dir: &OwnedFd) -> io::Result<(u64, u64)> {
    let stat = rustix::fs::fstat(dir)?;
    Ok((stat.st_dev, stat.st_ino))
}

fn is_dir(stat: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::Directory
}

/// A tar id as a uid; ids beyond 32 bits are refused (the kernel would truncate them).
fn id(raw: u64) -> io::Result<rustix::fs::Uid> {
    let raw = u32::try_from(raw)
        .ok()
        .filter(|id| *id != u32::MAX)
        .ok_or_else(|| invalid(format!("owner id {raw} is out of range")))?;
    Ok(rustix::fs::Uid::from_raw(raw))
}

fn gid_of(uid: rustix::fs::Uid) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(uid.as_raw())
}

fn timespec(seconds: u64) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: i64::try_from(seconds).unwrap_or(i64::MAX),
        tv_nsec: 0,
    }
}

/// Copies an entry's data, charging the budget as it goes.
fn copy_counted(
    from: &mut impl Read,
    to: &mut impl Write,
    budget: &mut Budget,
) -> Result<(), Failure> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        budget.charge(n as u64)?;
        to.write_all(&buffer[..n])?;
    }
}

/// The entry's path as plain relative components; `..` and absolute paths are refused.
fn clean(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid(format!("entry {} leaves the root", path.display())));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apply` with an ample budget, its failure as text.
    fn unpack(layer: &[u8], root: &Path) -> std::result::Result<(), String> {
        apply(layer, root, &mut Budget::new(u64::MAX)).map_err(|e| match e {
            Failure::Io(e) => e.to_string(),
            Failure::TooLarge => "too large".to_owned(),
        })
    }

    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            match content {
                Some(text) => {
                    header.set_size(text.len() as u64);
                    header.set_mode(0o644);
                    builder
                        .append_data(&mut header, path, text.as_bytes())
                        .unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder.append_data(&mut header, path, io::empty()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                out.push(path.strip_prefix(root).unwrap().display().to_string());
                if path.is_dir() {
                    walk(root, &path, out);
                }
            }
        }
        walk(root, root, &mut out);
        out.sort();
        out
    }

    fn check(layers: &[&[(&str, Option<&str>)]], expected: &[&str]) {
        let root = tempfile::tempdir().unwrap();
        for entries in layers {
            unpack(layer(entries).as_slice(), root.path()).unwrap();
        }
        assert_eq!(listing(root.path()), expected);
    }

    #[test]
    fn whiteouts() {
        // A whiteout hides a lower file.
        check(
            &[
                &[("etc", None), ("etc/a", Some("1")), ("etc/b", Some("2"))],
                &[("etc/.wh.a", Some(""))],
            ],
            &["etc", "etc/b"],
        );
        // An opaque directory hides all lower content but keeps its own layer's.
        check(
            &[
                &[("d", None), ("d/old", Some("1"))],
                &[
                    ("d", None),
                    ("d/new", Some("2")),
                    ("d/.wh..wh..opq", Some("")),
                ],
            ],
            &["d", "d/new"],
        );
        // A file replaces a lower directory.
        check(
            &[&[("x", None), ("x/y", Some("1"))], &[("x", Some("file"))]],
            &["x"],
        );
    }

    /// Writes a raw tar entry (tar::Builder refuses some of the names these tests need).
    fn raw(
        builder: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if !link.is_empty() {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    /// Regression (found by the `layer_unpack` and `instance_rootfs` fuzz targets): a layer
    /// that made a symlink out of the root and then wrote, whited out or made opaque a path
    /// below it removed files on the host.
    #[test]
    fn paths_below_a_symlink_stay_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir(host.path().join("d")).unwrap();
        for file in ["x", "y", "d/z"] {
            std::fs::write(host.path().join(file), "host").unwrap();
        }
        let outside = host.path().to_str().unwrap();
        for (kind, name, link) in [
            (tar::EntryType::Regular, "link/x", ""),
            (tar::EntryType::Regular, "link/.wh.y", ""),
            (tar::EntryType::Regular, "link/d/.wh..wh..opq", ""),
            (tar::EntryType::Link, "link/hard", "link/x"),
        ] {
            let root = tempfile::tempdir().unwrap();
            let mut builder = tar::Builder::new(Vec::new());
            raw(&mut builder, tar::EntryType::Symlink, "link", outside, b"");
            raw(&mut builder, kind, name, link, b"");
            let _ = unpack(builder.into_inner().unwrap().as_slice(), root.path());
            for file in ["x", "y", "d/z"] {
                assert_eq!(
                    std::fs::read_to_string(host.path().join(file)).unwrap(),
                    "host",
                    "{name}: {file} outside the root was touched"
                );
            }
            assert!(
                !host.path().join("hard").exists(),
                "{name}: a link was made outside"
            );
        }
    }

    /// A symlink that stays inside the root is followed, as Docker does (`lib -> usr/lib`).
    #[test]
    fn symlinks_inside_the_root_are_followed() {
        let root = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        raw(&mut builder, tar::EntryType::Directory, "usr/lib", "", b"");
        raw(
            &mut builder,
            tar::EntryType::Symlink,
            "lib",
            "/usr/lib",
            b"",
        );
        raw(
            &mut builder,
            tar::EntryType::Regular,
            "lib/libc.so",
            "",
            b"c",
        );
        raw(
            &mut builder,
            tar::EntryType::Link,
            "usr/libc-again.so",
            "lib/libc.so",
            b"",
        );
        unpack(builder.into_inner().unwrap().as_slice(), root.path()).unwrap();
        assert_eq!(
            std::fs::read(root.path().join("usr/lib/libc.so")).unwrap(),
            b"c"
        );
        assert_eq!(
            std::fs::read(root.path().join("usr/libc-again.so")).unwrap(),
            b"c"
        );
    }

    #[test]
    fn escaping_entries_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        // tar::Builder refuses `..` itself, so the name is written into the header directly.
        header.as_old_mut().name[..8].copy_from_slice(b"../evil\0");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        assert!(unpack(bytes.as_slice(), root.path()).is_err());
        assert!(!root.path().parent().unwrap().join("evil").exists());
    }

    /// A root inside a dir that also holds a sentinel: what a layer does must leave both the
    /// sentinel and the root itself in place.
    struct Beside {
        _work: tempfile::TempDir,
        root: PathBuf,
        sentinel: PathBuf,
    }

    impl Beside {
        fn new() -> Beside {
            let work = tempfile::tempdir().unwrap();
            let root = work.path().join("root");
            let sentinel = work.path().join("sentinel");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::create_dir_all(sentinel.join("d")).unwrap();
            std::fs::write(sentinel.join("d/file"), "host").unwrap();
            Beside {
                _work: work,
                root,
                sentinel,
            }
        }

        fn check(&self, what: &str) {
            assert_eq!(
                std::fs::read_to_string(self.sentinel.join("d/file"))
                    .ok()
                    .as_deref(),
                Some("host"),
                "{what}: a file beside the root was removed"
            );
            assert!(self.root.is_dir(), "{what}: the root itself was removed");
        }
    }

    /// Regression (issue 10, item 1): `.wh...` named `..` as the file to hide, and the
    /// unpacker removed the root's parent: `$TMPDIR` in a bake, `$GRAVEN_HOME/rootfs` for
    /// instances. `.wh.` named the root itself, `.wh..` the directory holding it.
    #[test]
    fn whiteout_dot_dot_stays_inside_root() {
        for names in [
            &[".wh..."][..],
            &[".wh.."],
            &[".wh."],
            &["d/.wh..."],
            &["sub/.wh..."],
            &["sub/.wh.."],
            &["sub/.wh."],
            &["sub/.wh..wh..opq"],
            &["sub/../.wh..."],
        ] {
            let beside = Beside::new();
            std::fs::create_dir(beside.root.join("d")).unwrap();
            std::fs::write(beside.root.join("d/keep"), "image").unwrap();
            let mut builder = tar::Builder::new(Vec::new());
            raw(&mut builder, tar::EntryType::Symlink, "sub", "/", b"");
            for name in names {
                raw(&mut builder, tar::EntryType::Regular, name, "", b"");
            }
            let result = unpack(builder.into_inner().unwrap().as_slice(), &beside.root);
            beside.check(names[0]);
            if names[0] != "sub/.wh..wh..opq" {
                assert!(result.is_err(), "{}: accepted", names[0]);
                assert!(
                    beside.root.join("d/keep").exists(),
                    "{}: the image's own file was removed",
                    names[0]
                );
            }
        }
    }

    /// Every kind of entry a layer can make, placed through a symlink out of the root, lands
    /// inside it; nothing is made or changed beside the root.
    #[test]
    fn entries_through_a_symlink_land_inside_the_root() {
        let beside = Beside::new();
        let outside = beside.sentinel.to_str().unwrap().to_owned();
        let mut builder = tar::Builder::new(Vec::new());
        raw(&mut builder, tar::EntryType::Symlink, "abs", &outside, b"");
        raw(&mut builder, tar::EntryType::Symlink, "up", "../../..", b"");
        raw(
            &mut builder,
            tar::EntryType::Regular,
            "abs/d/file",
            "",
            b"image",
        );
        raw(&mut builder, tar::EntryType::Directory, "up/made", "", b"");
        raw(
            &mut builder,
            tar::EntryType::Symlink,
            "up/made/l",
            "/x",
            b"",
        );
        raw(&mut builder, tar::EntryType::Fifo, "up/made/f", "", b"");
        raw(
            &mut builder,
            tar::EntryType::Link,
            "up/made/h",
            "abs/d/file",
            b"",
        );
        raw(&mut builder, tar::EntryType::Regular, "abs/.wh.d", "", b"");
        unpack(builder.into_inner().unwrap().as_slice(), &beside.root).unwrap();
        beside.check("entries");
        assert!(beside.root.join("made/l").symlink_metadata().is_ok());
        assert_eq!(
            std::fs::read_to_string(beside.root.join("made/h")).unwrap(),
            "image"
        );
        let work = beside.root.parent().unwrap();
        assert!(
            !work.join("made").exists(),
            "a directory was made beside the root"
        );
    }

    /// A symlink the image holds is never followed when a whiteout or a replacing entry
    /// removes it: the link goes, its target stays.
    #[test]
    fn removing_a_symlink_removes_only_the_link() {
        let beside = Beside::new();
        let outside = beside.sentinel.join("d");
        std::os::unix::fs::symlink(&outside, beside.root.join("a")).unwrap();
        std::os::unix::fs::symlink(&outside, beside.root.join("b")).unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        raw(&mut builder, tar::EntryType::Regular, ".wh.a", "", b"");
        raw(&mut builder, tar::EntryType::Directory, "b", "", b"");
        unpack(builder.into_inner().unwrap().as_slice(), &beside.root).unwrap();
        beside.check("symlinks");
        assert!(beside.root.join("a").symlink_metadata().is_err());
        assert!(beside.root.join("b").symlink_metadata().unwrap().is_dir());
    }

    /// Names that are not one name are refused wherever a layer gives one: entries, whiteouts,
    /// hard link sources.
    #[test]
    fn names_from_a_layer_are_checked() {
        for (kind, name, link) in [
            (tar::EntryType::Link, "h", ""),
            (tar::EntryType::Link, "h", "."),
            (tar::EntryType::Link, "h", "d/.."),
            (tar::EntryType::Regular, "d/.wh.", ""),
            (tar::EntryType::Symlink, "s", ""),
        ] {
            let beside = Beside::new();
            let mut builder = tar::Builder::new(Vec::new());
            raw(&mut builder, tar::EntryType::Directory, "d", "", b"");
            raw(&mut builder, kind, name, link, b"");
            let result = unpack(builder.into_inner().unwrap().as_slice(), &beside.root);
            assert!(result.is_err(), "{name} -> {link:?} accepted");
            beside.check(name);
        }
    }

    /// Regression (issue 10, item 15c): a layer of zeros compresses about 1000 to 1, so a small
    /// blob became a root of hundreds of MB. The budget counts bytes as written, a sparse or
    /// empty-looking entry included, and each entry's header.
    #[test]
    fn unpacked_size_is_bounded() {
        let root = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 64 * 1024];
        let mut builder = tar::Builder::new(Vec::new());
        raw(&mut builder, tar::EntryType::Regular, "big", "", &zeros);
        let layer = builder.into_inner().unwrap();
        let mut budget = Budget::new(32 * 1024);
        assert!(matches!(
            apply(layer.as_slice(), root.path(), &mut budget),
            Err(Failure::TooLarge)
        ));
        let mut budget = Budget::new(80 * 1024);
        assert!(apply(layer.as_slice(), root.path(), &mut budget).is_ok());
        // The budget spans layers: the same layer again does not fit.
        assert!(matches!(
            apply(layer.as_slice(), root.path(), &mut budget),
            Err(Failure::TooLarge)
        ));
        // Many empty files cost their headers.
        let mut builder = tar::Builder::new(Vec::new());
        for n in 0..100 {
            raw(
                &mut builder,
                tar::EntryType::Regular,
                &format!("e{n}"),
                "",
                b"",
            );
        }
        let mut budget = Budget::new(100 * ENTRY_COST - 1);
        assert!(matches!(
            apply(
                builder.into_inner().unwrap().as_slice(),
                root.path(),
                &mut budget
            ),
            Err(Failure::TooLarge)
        ));
    }
}
