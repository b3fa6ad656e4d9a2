//! Unpacking an image once into `$GRAVEN_HOME/rootfs/<manifest-hex>`: every layer checked
//! against its digest (compressed) and its diff id (uncompressed), OCI whiteouts applied,
//! into a temp dir renamed into place. The result is shared by every instance of the image
//! and never written again (instances see it through a read-only overlay).

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;

use crate::runtime::RuntimeError;
use crate::store::{Digest, Image, Store};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The unpacked root of `image`, unpacking it first when needed.
pub fn ensure(store: &Store, home: &Path, image: &Image) -> Result<PathBuf, RuntimeError> {
    let dir = home.join("rootfs");
    let target = dir.join(image.digest.hex());
    if target.is_dir() {
        return Ok(target);
    }
    let other = |context: String| move |source| RuntimeError::Other { context, source };
    std::fs::create_dir_all(&dir).map_err(other(format!("creating {}", dir.display())))?;
    let temp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", image.digest.short()))
        .tempdir_in(&dir)
        .map_err(other(format!("creating a temp dir in {}", dir.display())))?;
    for (index, layer) in image.manifest.layers.iter().enumerate() {
        let diff_id = image.config.rootfs.diff_ids.get(index);
        unpack_layer(
            store,
            &layer.digest,
            &layer.media_type,
            diff_id,
            temp.path(),
        )?;
    }
    let path = temp.keep();
    match std::fs::rename(&path, &target) {
        Ok(()) => Ok(target),
        // Another graven unpacked the same image first; theirs is identical.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&path);
            Ok(target)
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&path);
            Err(RuntimeError::Other {
                context: format!("moving the unpacked image to {}", target.display()),
                source,
            })
        }
    }
}

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

fn unpack_layer(
    store: &Store,
    digest: &Digest,
    media_type: &str,
    diff_id: Option<&Digest>,
    root: &Path,
) -> Result<(), RuntimeError> {
    let bad = |reason: String| RuntimeError::Other {
        context: format!("layer {digest}"),
        source: io::Error::new(io::ErrorKind::InvalidData, reason),
    };
    let file = store.open_blob(digest)?;
    let mut compressed = Hashing::new(io::BufReader::new(file));
    let gzip = media_type.ends_with("gzip") || !media_type.ends_with(".tar");
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
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    // Paths this layer created, which an opaque marker in the same layer must keep.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = clean(&entry.path()?)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = path.parent().unwrap_or(Path::new("")).to_owned();
        if name == OPAQUE {
            let dir = root.join(&parent);
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    let relative = parent.join(child.file_name());
                    if !created.contains(&relative) {
                        remove(&child.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            remove(&root.join(&parent).join(hidden))?;
            continue;
        }
        // A new entry replaces whatever a lower layer had there, unless both are directories.
        let target = root.join(&path);
        if let Ok(meta) = std::fs::symlink_metadata(&target)
            && !(meta.is_dir() && entry.header().entry_type().is_dir())
        {
            remove(&target)?;
        }
        entry.unpack_in(root)?;
        created.insert(path);
    }
    Ok(())
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
