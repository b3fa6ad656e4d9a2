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
const VERSION: &str = "graven-bake-cache-v1";

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
        fs::create_dir_all(&self.dir)?;
        let mut temp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)?;
        temp.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
        temp.persist(self.path(key)).map_err(|e| e.error)?;
        Ok(())
    }

    /// The layer blobs the cache refers to (gc keeps them).
    pub fn roots(&self) -> Vec<Digest> {
        let Ok(read) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut roots: Vec<Digest> = read
            .flatten()
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

#[cfg(test)]
mod tests {
    use super::*;

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
