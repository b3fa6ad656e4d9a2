//! The layer cache under `$GRAVEN_HOME/cache`: one small JSON file per step key, naming the
//! layer the step made (or none, for config-only steps). A key is the hash of the parent
//! step's key and everything the step reads: the expanded instruction, the content hash of its
//! files, the build args in scope and the layer mtime. Entries are written with a rename (no
//! fsync: a lost or torn entry is only a cache miss), and an entry whose layer blob is gone
//! from the store is a miss too.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::store::{Descriptor, Digest, Store};

/// Bumped whenever the way layers are written changes, so old entries stop matching.
const VERSION: &str = "graven-bake-cache-v2";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub layer: Option<LayerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerRecord {
    pub descriptor: Descriptor,
    pub diff_id: Digest,
}

pub struct Cache {
    dir: PathBuf,
}

/// The key of a step: its parent's key and the step's inputs, each length-prefixed.
pub fn key(parent: Option<&Digest>, parts: &[&str]) -> Digest {
    let mut hasher = sha2::Sha256::new();
    hasher.update(VERSION);
    hasher.update(parent.map(Digest::as_str).unwrap_or("root"));
    for part in parts {
        hasher.update(format!("\n{}\n", part.len()));
        hasher.update(part);
    }
    Digest::from_sha256(hasher.finalize().into())
}

impl Cache {
    pub fn open(home: &Path) -> Cache {
        Cache {
            dir: home.join("cache"),
        }
    }

    fn path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", key.hex()))
    }

    /// The record for `key` when it exists and its layer is still in the store.
    pub fn get(&self, store: &Store, key: &Digest) -> Option<Record> {
        let bytes = fs::read(self.path(key)).ok()?;
        let record: Record = serde_json::from_slice(&bytes).ok()?;
        match &record.layer {
            Some(layer) if !store.has_blob(&layer.descriptor.digest) => None,
            _ => Some(record),
        }
    }

    pub fn put(&self, key: &Digest, record: &Record) -> io::Result<()> {
        write_json(&self.path(key), record)
    }

    /// The layer blobs the cache refers to (gc keeps them).
    pub fn roots(&self) -> Vec<Digest> {
        let Ok(read) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut roots: Vec<Digest> = read
            .flatten()
            .filter(|entry| entry.file_name() != "files.json")
            .filter_map(|entry| {
                let record: Record = serde_json::from_slice(&fs::read(entry.path()).ok()?).ok()?;
                Some(record.layer?.descriptor.digest)
            })
            .collect();
        roots.sort();
        roots.dedup();
        roots
    }

    /// Drops every entry (`graven gc --cache`).
    pub fn clear(&self) -> io::Result<usize> {
        let Ok(read) = fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in read.flatten() {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// What a file looked like when it was hashed; a file that still looks the same is not read
/// again (as git's index does). The content, not this, is what cache keys use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    digest: Digest,
}

/// A memo of file content hashes keyed by path and stat, in `$GRAVEN_HOME/cache/files.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FileHashes {
    files: std::collections::BTreeMap<PathBuf, Stamp>,
    #[serde(skip)]
    changed: bool,
}

impl FileHashes {
    fn path(home: &Path) -> PathBuf {
        home.join("cache").join("files.json")
    }

    pub fn load(home: &Path) -> FileHashes {
        fs::read(Self::path(home))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// The sha256 of the file at `path`. `now` (seconds since the epoch) guards against a
    /// file changed twice within one timestamp tick: stamps younger than 2 s are not kept.
    pub fn digest(&mut self, path: &Path, now: i64) -> io::Result<Digest> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)?;
        let stamp = |digest: Digest| Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            digest,
        };
        if let Some(known) = self.files.get(path)
            && stamp(known.digest.clone()) == *known
        {
            return Ok(known.digest.clone());
        }
        let (digest, _) = crate::store::digest_reader(fs::File::open(path)?)?;
        let fresh = stamp(digest.clone());
        if now - fresh.mtime.0.max(fresh.ctime.0) >= 2 {
            self.files.insert(path.to_owned(), fresh);
            self.changed = true;
        } else if self.files.remove(path).is_some() {
            self.changed = true;
        }
        Ok(digest)
    }

    /// Writes the memo back when it changed (a lost write only costs hashing again).
    pub fn save(&self, home: &Path) -> io::Result<()> {
        if !self.changed {
            return Ok(());
        }
        write_json(&Self::path(home), self)
    }
}

/// Replaces `path` (in the cache directory, made if missing) with `value` as JSON, through a
/// rename so a reader never sees half a file. No fsync: a lost write is only a cache miss.
fn write_json(path: &Path, value: &impl serde::Serialize) -> io::Result<()> {
    let dir = path.parent().expect("cache files have a parent");
    fs::create_dir_all(dir)?;
    let mut temp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    temp.write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hashes_follow_content_and_skip_young_files() {
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join("f");
        fs::write(&file, "one").unwrap();
        let mut memo = FileHashes::default();
        let far_future = i64::MAX / 2;
        assert_eq!(memo.digest(&file, far_future).unwrap(), Digest::of(b"one"));
        assert_eq!(memo.files.len(), 1);
        fs::write(&file, "two").unwrap();
        assert_eq!(memo.digest(&file, far_future).unwrap(), Digest::of(b"two"));
        // A file modified just now is hashed but not remembered.
        let mut young = FileHashes::default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        young.digest(&file, now).unwrap();
        assert!(young.files.is_empty());
        memo.save(home.path()).unwrap();
        assert_eq!(FileHashes::load(home.path()).files, memo.files);
    }

    #[test]
    fn keys_depend_on_every_input_and_their_boundaries() {
        let a = key(None, &["COPY a b", "x"]);
        assert_eq!(a, key(None, &["COPY a b", "x"]));
        assert_ne!(a, key(None, &["COPY a b", "y"]));
        assert_ne!(a, key(None, &["COPY a bx", ""]));
        assert_ne!(a, key(Some(&a), &["COPY a b", "x"]));
    }

    #[test]
    fn missing_layers_are_misses() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let cache = Cache::open(home.path());
        let present = store.put_blob(b"layer").unwrap();
        let absent = Digest::of(b"gone");
        let record = |digest: &Digest| Record {
            layer: Some(LayerRecord {
                descriptor: Descriptor::new("x", digest.clone(), 1),
                diff_id: digest.clone(),
            }),
        };
        let (k1, k2) = (key(None, &["1"]), key(None, &["2"]));
        cache.put(&k1, &record(&present)).unwrap();
        cache.put(&k2, &record(&absent)).unwrap();
        assert_eq!(cache.get(&store, &k1), Some(record(&present)));
        assert_eq!(cache.get(&store, &k2), None);
        assert_eq!(cache.roots().len(), 2);
    }
}
