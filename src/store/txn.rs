//! Transactions: a bake or an import writes its blobs through one, and only a committed
//! transaction keeps the blobs it added. Dropping it uncommitted (any error on the way) removes
//! them again, so a failed bake leaves the store's files exactly as they were.
//!
//! A transaction holds the store's gc lock shared: gc (exclusive) never runs while blobs that
//! no tag names yet are being written.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use super::layer::Hashing;
use super::{Descriptor, Digest, ImageConfig, Result, Store, check_digest, io_err};

pub struct Transaction<'a> {
    store: &'a Store,
    added: Vec<Digest>,
    committed: bool,
    _lock: File,
}

/// The store's gc lock: shared by transactions, exclusive for gc.
pub(super) fn gc_lock(store: &Store, exclusive: bool) -> Result<File> {
    store.lock("gc.lock", exclusive)
}

impl Store {
    pub fn transaction(&self) -> Result<Transaction<'_>> {
        Ok(Transaction {
            store: self,
            added: Vec::new(),
            committed: false,
            _lock: gc_lock(self, false)?,
        })
    }
}

impl<'a> Transaction<'a> {
    pub fn store(&self) -> &'a Store {
        self.store
    }

    pub fn put_blob(&mut self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if !self.store.has_blob(&digest) {
            self.store.put_blob(bytes)?;
            self.added.push(digest.clone());
        }
        Ok(digest)
    }

    /// Keeps a temp file whose content the caller hashed to `digest` as that blob.
    pub(super) fn put_blob_file(
        &mut self,
        file: tempfile::NamedTempFile,
        digest: &Digest,
    ) -> Result<()> {
        if !self.store.has_blob(digest) {
            self.store.put_blob_file(file, digest)?;
            self.added.push(digest.clone());
        }
        Ok(())
    }

    /// Copies a file into the store as blob `digest`, checking the content on the way.
    pub fn copy_blob_from(&mut self, path: &Path, digest: &Digest) -> Result<()> {
        if self.store.has_blob(digest) {
            return Ok(());
        }
        let temp = self.store.temp_file()?;
        let mut source = File::open(path).map_err(io_err(path))?;
        let mut copy = Hashing::new(temp.as_file());
        std::io::copy(&mut source, &mut copy).map_err(io_err(path))?;
        let (_, actual, _) = copy.finish();
        check_digest(digest, actual)?;
        self.put_blob_file(temp, digest)
    }

    /// A blob that arrives as a stream (from a registry): written to a temp file in the store
    /// and hashed on the way; `keep_incoming` names it only if it hashes to what it claims.
    pub fn incoming(&self) -> Result<IncomingBlob> {
        let temp = self.store.temp_file()?;
        let file = temp.as_file().try_clone().map_err(io_err(temp.path()))?;
        Ok(IncomingBlob {
            out: Hashing::new(BufWriter::with_capacity(256 * 1024, file)),
            temp,
        })
    }

    /// Keeps an incoming blob as `digest` when its content hashes to it (`CorruptBlob`
    /// otherwise, and the temp file goes); returns its size.
    pub fn keep_incoming(&mut self, blob: IncomingBlob, digest: &Digest) -> Result<u64> {
        let IncomingBlob { out, temp } = blob;
        let (writer, actual, size) = out.finish();
        writer
            .into_inner()
            .map_err(|e| io_err(temp.path())(e.into_error()))?;
        check_digest(digest, actual)?;
        self.put_blob_file(temp, digest)?;
        Ok(size)
    }

    /// Writes a config and a manifest over stored layers; returns the manifest's descriptor.
    pub fn put_image(
        &mut self,
        config: &ImageConfig,
        layers: Vec<Descriptor>,
    ) -> Result<Descriptor> {
        let (config, manifest) = super::image_blobs(config, layers);
        self.put_blob(&config)?;
        let size = manifest.len() as u64;
        Ok(Descriptor::new(
            super::MEDIA_TYPE_MANIFEST,
            self.put_blob(&manifest)?,
            size,
        ))
    }

    /// How many blobs this transaction has added so far.
    pub fn added(&self) -> usize {
        self.added.len()
    }

    /// Keeps every blob this transaction added.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

/// A blob being written by `Transaction::incoming`; dropping it removes its temp file.
pub struct IncomingBlob {
    out: Hashing<BufWriter<File>>,
    temp: tempfile::NamedTempFile,
}

impl IncomingBlob {
    /// How many bytes have been written so far.
    pub fn len(&self) -> u64 {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Write for IncomingBlob {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for digest in &self.added {
            // Best effort: a blob that cannot be removed is unreferenced and gc frees it later.
            let _ = fs::remove_file(self.store.blob_path(digest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_blobs_are_removed_committed_ones_and_old_ones_stay() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let old = store.put_blob(b"old").unwrap();
        let new = {
            let mut txn = store.transaction().unwrap();
            txn.put_blob(b"old").unwrap();
            txn.put_blob(b"new").unwrap()
        };
        assert!(store.has_blob(&old), "a blob that existed before must stay");
        assert!(!store.has_blob(&new), "an uncommitted blob must go");
        let mut txn = store.transaction().unwrap();
        let kept = txn.put_blob(b"kept").unwrap();
        txn.commit();
        assert!(store.has_blob(&kept));
    }

    /// A blob from outside is named only when it hashes to the digest it claims; a mismatch
    /// leaves no blob and no temp file, and an uncommitted match goes with its transaction.
    #[test]
    fn incoming_blobs_are_kept_only_under_their_own_digest() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let files = || {
            let mut names: Vec<_> = std::fs::read_dir(store.root().join("blobs"))
                .unwrap()
                .chain(std::fs::read_dir(store.root().join("blobs/sha256")).unwrap())
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        let before = files();
        let claimed = Digest::of(b"what the registry said");
        {
            let mut txn = store.transaction().unwrap();
            let mut blob = txn.incoming().unwrap();
            blob.write_all(b"what it sent").unwrap();
            assert_eq!(blob.len(), 12);
            assert!(matches!(
                txn.keep_incoming(blob, &claimed),
                Err(crate::store::StoreError::CorruptBlob { .. })
            ));
            assert!(!store.has_blob(&claimed));
            let mut blob = txn.incoming().unwrap();
            blob.write_all(b"what the registry said").unwrap();
            assert_eq!(txn.keep_incoming(blob, &claimed).unwrap(), 22);
            assert!(store.has_blob(&claimed));
        }
        assert_eq!(files(), before, "dropped uncommitted: nothing stays");
    }
}
