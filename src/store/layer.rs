//! Writing layer blobs: an uncompressed tar stream in, a gzip blob out, hashed on both sides
//! (the diff_id is the sha256 of the tar, the blob digest that of the gzip), streamed to a temp
//! file in the store so a layer never has to fit in memory.
//!
//! The gzip header is fixed (no mtime, no file name, OS byte 255), the level is constant and
//! the stream is cut into fixed chunks compressed in parallel (`pgzip`), so the same tar always
//! gives the same blob.
//!
//! A bake may also compress a layer on a thread of its own while its next steps run
//! (`Compressing::start`): the thread writes the layer's tar again from where its files are
//! (a RUN's snapshot) into the very blob `LayerWriter` would have written, and checks that the
//! tar is the diff_id the bake already named it by. Where no such tree is kept, the layer is
//! staged first (`StagingWriter`): the tar goes to a temp file, hashed to its diff_id on the
//! way, and `StagedLayer::compress` gzips that.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Takes the uncompressed tar bytes of one layer into a temp file, hashing them to the diff_id.
pub struct StagingWriter {
    out: Hashing<BufWriter<File>>,
    temp: tempfile::NamedTempFile,
}

/// A layer's uncompressed tar in a temp file of the store, not yet compressed.
pub struct StagedLayer {
    temp: tempfile::NamedTempFile,
    pub diff_id: Digest,
    /// The tar's length.
    pub len: u64,
}

/// A staged layer being compressed on its own thread. Dropping it stops the work and removes
/// both temp files; `wait` gives the finished blob.
pub struct Compressing {
    thread: Option<std::thread::JoinHandle<Result<FinishedLayer>>>,
    stop: Arc<AtomicBool>,
    pub diff_id: Digest,
}

impl StagingWriter {
    pub fn new(store: &Store) -> Result<StagingWriter> {
        let temp = store.temp_file()?;
        let file = temp
            .as_file()
            .try_clone()
            .map_err(|source| StoreError::Io {
                path: temp.path().to_owned(),
                source,
            })?;
        Ok(StagingWriter {
            out: Hashing::new(BufWriter::with_capacity(256 * 1024, file)),
            temp,
        })
    }

    /// The staged tar. Not fsynced: it is read back by this process only, never named as a
    /// blob; what a crash leaves of it is a temp file gc removes.
    pub fn finish(self) -> Result<StagedLayer> {
        let (writer, diff_id, len) = self.out.finish();
        writer.into_inner().map_err(|e| StoreError::Io {
            path: self.temp.path().to_owned(),
            source: e.into_error(),
        })?;
        Ok(StagedLayer {
            temp: self.temp,
            diff_id,
            len,
        })
    }
}

impl Write for StagingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl StagedLayer {
    /// Starts compressing the tar on a thread of its own, into the blob `LayerWriter` makes of
    /// the same bytes (`pgzip`'s chunks spread over every core, as when writing inline).
    pub fn compress(self, store: &Store) -> Result<Compressing> {
        let StagedLayer { temp, diff_id, .. } = self;
        let mut reader = temp.reopen().map_err(|source| StoreError::Io {
            path: temp.path().to_owned(),
            source,
        })?;
        Compressing::start(store, diff_id, move |writer| {
            let io = |source| StoreError::Io {
                path: temp.path().to_owned(),
                source,
            };
            let mut buf = vec![0; 1 << 20];
            loop {
                let n = reader.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buf[..n]).map_err(io)?;
            }
            drop(temp);
            Ok(())
        })
    }
}

/// A writer that fails once its compression is stopped, so a dropped one ends soon.
struct Stoppable<'a> {
    inner: &'a mut LayerWriter,
    stop: &'a AtomicBool,
}

impl Write for Stoppable<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("compression stopped"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Compressing {
    /// Starts writing a layer blob on a thread of its own: `produce` writes the layer's
    /// uncompressed tar into the writer it is given, which gzips it as `LayerWriter` does
    /// (`pgzip`'s chunks spread over every core). The tar must hash to `diff_id`, the digest
    /// the bake names the layer by meanwhile: a source changed underneath would give a blob
    /// that is not this layer, and is an error instead.
    pub fn start(
        store: &Store,
        diff_id: Digest,
        produce: impl FnOnce(&mut dyn Write) -> Result<()> + Send + 'static,
    ) -> Result<Compressing> {
        let mut writer = LayerWriter::new(store)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let expected = diff_id.clone();
        let thread = std::thread::Builder::new()
            .name("graven-gzip".to_owned())
            .spawn(move || {
                // The lowest priority for this thread and the chunk threads it spawns (nice
                // is per thread and inherited): the RUN steps that follow get the cores
                // first, and the gzip takes what their waits on the network and the disk
                // leave. Its output does not depend on it.
                let _ = rustix::process::setpriority_process(None, 19);
                produce(&mut Stoppable {
                    inner: &mut writer,
                    stop: &stopped,
                })?;
                let finished = writer.finish()?;
                // Written to disk here, off the bake's path, so the fsync that names the
                // blob (`Transaction::put_blob_file`) finds nothing left to write.
                finished
                    .temp
                    .as_file()
                    .sync_all()
                    .map_err(|source| StoreError::Io {
                        path: finished.temp.path().to_owned(),
                        source,
                    })?;
                if finished.diff_id != expected {
                    return Err(StoreError::CorruptBlob {
                        digest: expected,
                        actual: finished.diff_id,
                    });
                }
                Ok(finished)
            })
            .map_err(|source| StoreError::Io {
                path: "graven-gzip".into(),
                source,
            })?;
        Ok(Compressing {
            thread: Some(thread),
            stop,
            diff_id,
        })
    }

    /// Waits for the blob.
    pub fn wait(mut self) -> Result<FinishedLayer> {
        let thread = self
            .thread
            .take()
            .expect("a compression is waited for once");
        thread.join().unwrap_or_else(|_| {
            Err(StoreError::Io {
                path: "graven-gzip".into(),
                source: io::Error::other("the compression thread panicked"),
            })
        })
    }
}

impl Drop for Compressing {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::Relaxed);
            // Joined, so no temp file outlives a failed bake in a process that goes on.
            let _ = thread.join();
        }
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

    /// A layer staged and compressed on its own thread is the very blob writing it inline
    /// gives: a bake that compresses off its path changes no digest.
    #[test]
    fn a_staged_layer_compresses_to_the_inline_blob() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        // Over three pgzip chunks, part incompressible, part not.
        let mut tar: Vec<u8> = (0..3 * (1 << 20) + 4321).map(|_| rng.u8(..)).collect();
        tar[..1 << 20].fill(b'z');
        let inline = compress_into(&store, &tar[..]).unwrap();
        let mut staging = StagingWriter::new(&store).unwrap();
        for piece in tar.chunks(99_999) {
            staging.write_all(piece).unwrap();
        }
        let staged = staging.finish().unwrap();
        assert_eq!(staged.diff_id, inline.diff_id);
        assert_eq!(staged.len, tar.len() as u64);
        let staged_path = staged.temp.path().to_owned();
        let finished = staged.compress(&store).unwrap().wait().unwrap();
        assert_eq!(
            (&finished.digest, finished.size, &finished.diff_id),
            (&inline.digest, inline.size, &inline.diff_id)
        );
        assert_eq!(
            std::fs::read(finished.temp.path()).unwrap(),
            std::fs::read(inline.temp.path()).unwrap()
        );
        assert!(!staged_path.exists(), "the staged tar goes once compressed");
    }

    /// A compression dropped unfinished (a failed bake) stops and leaves no temp file.
    #[test]
    fn a_dropped_compression_leaves_no_temp_file() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let temps = || {
            std::fs::read_dir(store.root().join("blobs"))
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(super::super::TEMP)
                })
                .count()
        };
        let mut staging = StagingWriter::new(&store).unwrap();
        staging.write_all(&vec![1u8; 8 << 20]).unwrap();
        let compressing = staging.finish().unwrap().compress(&store).unwrap();
        assert_eq!(temps(), 2, "the staged tar and the blob being written");
        drop(compressing);
        assert_eq!(temps(), 0);
    }
}
