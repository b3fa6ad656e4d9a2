//! Writing layer blobs: an uncompressed tar stream in, a gzip blob out, hashed on both sides
//! (the diff_id is the sha256 of the tar, the blob digest that of the gzip), streamed to a temp
//! file in the store so a layer never has to fit in memory.
//!
//! The gzip header is fixed (no mtime, no file name, OS byte 255), the level is constant and
//! the stream is cut into fixed chunks compressed in parallel (`pgzip`), so the same tar always
//! gives the same blob.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use sha2::Digest as _;

use super::pgzip::ParallelGz;

use super::{Digest, Result, Store, StoreError, Transaction};

/// The one compression level graven uses: changing it changes every layer digest.
pub const GZIP_LEVEL: u32 = 6;

/// A writer that hashes and counts what passes through it.
pub(super) struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
    len: u64,
}

impl<W> Hashing<W> {
    pub(super) fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: sha2::Sha256::new(),
            len: 0,
        }
    }

    /// How many bytes have been written through it.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The inner writer, and the digest and length of all that was written through it.
    pub(super) fn finish(self) -> (W, Digest, u64) {
        let digest = Digest::from_sha256(self.hasher.finalize().into());
        (self.inner, digest, self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Takes the uncompressed tar bytes of one layer (wrap it in `tar::Builder`).
pub struct LayerWriter {
    out: Hashing<ParallelGz<Hashing<BufWriter<File>>>>,
    temp: tempfile::NamedTempFile,
}

/// A finished layer blob, still in its temp file until a transaction keeps it.
pub struct FinishedLayer {
    temp: tempfile::NamedTempFile,
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
}

impl LayerWriter {
    pub fn new(store: &Store) -> Result<LayerWriter> {
        let temp = store.temp_file()?;
        let file = temp
            .as_file()
            .try_clone()
            .map_err(|source| StoreError::Io {
                path: temp.path().to_owned(),
                source,
            })?;
        let compressed = Hashing::new(BufWriter::with_capacity(256 * 1024, file));
        let gzip = ParallelGz::new(compressed, GZIP_LEVEL).map_err(|source| StoreError::Io {
            path: temp.path().to_owned(),
            source,
        })?;
        Ok(LayerWriter {
            out: Hashing::new(gzip),
            temp,
        })
    }

    pub fn finish(self) -> Result<FinishedLayer> {
        let io = |source| StoreError::Io {
            path: self.temp.path().to_owned(),
            source,
        };
        let (gzip, diff_id, _) = self.out.finish();
        let mut compressed = gzip.finish().map_err(io)?;
        compressed.flush().map_err(io)?;
        let (_, digest, size) = compressed.finish();
        Ok(FinishedLayer {
            temp: self.temp,
            digest,
            size,
            diff_id,
        })
    }
}

impl Write for LayerWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl FinishedLayer {
    /// Moves the blob into the store as part of `txn` (removed again if the txn fails).
    pub fn keep(self, txn: &mut Transaction<'_>) -> Result<super::Descriptor> {
        txn.put_blob_file(self.temp, &self.digest)?;
        Ok(super::Descriptor::new(
            super::MEDIA_TYPE_LAYER_GZIP,
            self.digest,
            self.size,
        ))
    }
}

/// Opens a file as an uncompressed stream: gunzipped when it starts with gzip's magic bytes.
pub fn decompressed(path: &std::path::Path) -> io::Result<Box<dyn io::Read>> {
    use io::BufRead;
    let mut reader = io::BufReader::with_capacity(256 * 1024, File::open(path)?);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Whether a file starts with gzip's magic bytes.
pub fn is_gzip(path: &std::path::Path) -> io::Result<bool> {
    use io::Read;
    let mut magic = [0u8; 2];
    let n = File::open(path)?.read(&mut magic)?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Compresses an uncompressed layer tar read from `reader` the way graven writes layers.
pub fn compress_into(store: &Store, mut reader: impl io::Read) -> Result<FinishedLayer> {
    let mut writer = LayerWriter::new(store)?;
    let path = writer.temp.path().to_owned();
    io::copy(&mut reader, &mut writer).map_err(|source| StoreError::Io { path, source })?;
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_same_blob_and_diff_id_is_the_tar_hash() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let tar = b"not really a tar but bytes all the same".repeat(100);
        let a = compress_into(&store, &tar[..]).unwrap();
        let b = compress_into(&store, &tar[..]).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.diff_id, Digest::of(&tar));
        let blob = std::fs::read(a.temp.path()).unwrap();
        assert_eq!(Digest::of(&blob), a.digest);
        assert_eq!(blob.len() as u64, a.size);
        // Fixed header: magic, deflate, no flags, zero mtime, OS unknown.
        assert_eq!(&blob[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert_eq!(blob[9], 255);
        let other = compress_into(&store, &b"different"[..]).unwrap();
        assert_ne!(other.digest, a.digest);
    }
}
