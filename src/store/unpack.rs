//! Unpacking layers onto a directory, for the local runtime's shared read-only root
//! filesystems and for bake's RUN steps: one implementation, so both see the same tree.

use std::collections::HashSet;
use std::io::{self, BufRead, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;

use super::{Descriptor, Digest, Result, Store, StoreError, io_err};

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
    /// plain tar layers are told apart by their first bytes.
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
        for (index, layer) in layers.iter().enumerate() {
            self.unpack_layer(&layer.digest, diff_ids.get(index), root)?;
        }
        Ok(())
    }

    fn unpack_layer(&self, digest: &Digest, diff_id: Option<&Digest>, root: &Path) -> Result<()> {
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
            apply(&mut raw, root).map_err(|e| bad(format!("cannot unpack: {}", chain(&e))))?;
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

/// Applies one layer's tar stream on top of `root`.
fn apply(reader: impl Read, root: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    // Only root can give files away. Without it every file is the unpacking user's, which is
    // what a rootless sandbox maps to uid 0 inside (its one mapped id).
    archive.set_preserve_ownerships(rustix::process::geteuid().is_root());
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    // Paths this layer created (relative to `root`, resolved), which an opaque marker in the
    // same layer must keep.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = clean(&entry.path()?)?;
        let Some(name) = path.file_name().map(ToOwned::to_owned) else {
            continue; // the root itself: nothing to write
        };
        // Every path is resolved inside `root` before anything at it is touched: a layer
        // may have made `link -> /etc` and then hold `link/passwd`, `link/.wh.passwd` or
        // `link/.wh..wh..opq`; those must act inside the root, never on the host.
        let dir = resolve_in_root(root, path.parent().unwrap_or(Path::new("")))?;
        let name_text = name.to_string_lossy();
        if name_text == OPAQUE {
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child = child.path();
                    if !created.contains(child.strip_prefix(root).unwrap_or(&child)) {
                        remove(&child)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name_text.strip_prefix(WHITEOUT) {
            remove(&dir.join(hidden))?;
            continue;
        }
        let target = dir.join(&name);
        // A new entry replaces whatever a lower layer had there, unless both are directories.
        if let Ok(meta) = std::fs::symlink_metadata(&target)
            && !(meta.is_dir() && entry.header().entry_type().is_dir())
        {
            remove(&target)?;
        }
        make_dirs(&dir)?;
        if entry.header().entry_type().is_hard_link() {
            // tar would resolve a hard link's source against the working directory; it is a
            // path inside the image, so it is resolved inside the root like any other.
            let source = entry.link_name()?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "a hard link without a source")
            })?;
            let source = clean(&source)?;
            let source_dir = resolve_in_root(root, source.parent().unwrap_or(Path::new("")))?;
            let source = source_dir.join(source.file_name().unwrap_or_default());
            std::fs::hard_link(&source, &target)?;
        } else {
            entry.unpack(&target)?;
        }
        created.insert(target.strip_prefix(root).unwrap_or(&target).to_owned());
    }
    Ok(())
}

/// Resolves `relative` (plain components) under `root` as a chroot would: symlinks met on
/// the way are followed, but an absolute target starts again at `root` and `..` stops at it,
/// so the result is always inside `root`. The last component is followed too (the callers
/// pass directories).
fn resolve_in_root(root: &Path, relative: &Path) -> io::Result<PathBuf> {
    const MAX_LINKS: usize = 40;
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: std::collections::VecDeque<std::ffi::OsString> = relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_owned()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let candidate: PathBuf = std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(|p| p.as_os_str()))
            .chain(std::iter::once(part.as_os_str()))
            .collect();
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("too many symlinks under {}", relative.display()),
                    ));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut rest: Vec<std::ffi::OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(p) => Some(p.to_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                rest.extend(pending.drain(..));
                pending = rest.into();
            }
            _ => resolved.push(part),
        }
    }
    Ok(resolved
        .iter()
        .fold(root.to_owned(), |path, part| path.join(part)))
}

/// The entry's path as plain relative components; `..` and absolute paths are refused.
fn clean(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("entry {} leaves the root", path.display()),
                ));
            }
        }
    }
    Ok(out)
}

/// Makes `dir` and its missing parents (the root exists, so this stops there) with the mode
/// an image's directories have when its layer does not say: 0755, whatever the umask of
/// whoever unpacks (under 077 a workload that is not root could not reach its files). One
/// stat when `dir` exists, as it does for most entries.
fn make_dirs(dir: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(dir).is_ok() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(parent)?;
    }
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            apply(layer(entries).as_slice(), root.path()).unwrap();
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
            let _ = apply(builder.into_inner().unwrap().as_slice(), root.path());
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
        apply(builder.into_inner().unwrap().as_slice(), root.path()).unwrap();
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
        assert!(apply(bytes.as_slice(), root.path()).is_err());
        assert!(!root.path().parent().unwrap().join("evil").exists());
    }
}
