//! Deterministic parallel gzip: the input is cut into fixed 1 MiB chunks, each deflated on its
//! own thread with a fresh compressor and ended with a sync flush (the last one with a final
//! block), and the pieces are written in order between a fixed gzip header and the trailer.
//! The output is one valid gzip member and depends only on the input, the chunk size and the
//! level, never on the number of threads or their timing.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

const CHUNK: usize = 1 << 20;

pub struct ParallelGz<W: Write> {
    out: W,
    level: u32,
    chunk: Vec<u8>,
    crc: Crc,
    pending: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    max_in_flight: usize,
}

/// Raw deflate of one chunk: ended by a sync flush, or by the final block when `last`.
fn deflate(level: u32, input: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut compress = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(input.len() + input.len() / 8 + 4096);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(input.len() / 4 + 4096);
        }
        let consumed = compress.total_in() as usize;
        let status = compress
            .compress_vec(&input[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = compress.total_in() as usize == input.len();
        match status {
            Status::StreamEnd => return Ok(out),
            // A flush is complete once all input is taken and the output was not filled.
            _ if !last && all_in && out.len() < out.capacity() => return Ok(out),
            _ => {}
        }
    }
}

impl<W: Write> ParallelGz<W> {
    pub fn new(mut out: W, level: u32) -> io::Result<ParallelGz<W>> {
        // Magic, deflate, no flags, mtime 0, XFL as gzip sets it for the level, OS unknown.
        let xfl = match level {
            9 => 2,
            1 => 4,
            _ => 0,
        };
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255])?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(ParallelGz {
            out,
            level,
            chunk: Vec::with_capacity(CHUNK),
            crc: Crc::new(),
            pending: VecDeque::new(),
            max_in_flight: threads.max(2),
        })
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(done) = self.pending.pop_front() {
            let bytes = done
                .recv()
                .map_err(|_| io::Error::other("a compression thread died"))??;
            self.out.write_all(&bytes)?;
        }
        Ok(())
    }

    fn dispatch(&mut self) -> io::Result<()> {
        while self.pending.len() >= self.max_in_flight {
            self.write_oldest()?;
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        let level = self.level;
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let _ = tx.send(deflate(level, &chunk, false));
        });
        self.pending.push_back(rx);
        Ok(())
    }

    /// Writes the rest, the final block and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        let last = deflate(self.level, &self.chunk, true)?;
        self.out.write_all(&last)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.chunk.len() == CHUNK {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gzip(data: &[u8], threads: usize) -> Vec<u8> {
        let mut gz = ParallelGz::new(Vec::new(), 6).unwrap();
        gz.max_in_flight = threads;
        // Odd write sizes, so chunk boundaries never line up with writes.
        for piece in data.chunks(77_777) {
            gz.write_all(piece).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn round_trips_and_does_not_depend_on_threads() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut data: Vec<u8> = (0..3 * CHUNK + 12345).map(|_| rng.u8(..)).collect();
        // Some compressible stretches too.
        data[100_000..900_000].fill(b'a');
        let one = gzip(&data, 1);
        let many = gzip(&data, 8);
        assert_eq!(one, many);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        // Empty input and an input of exactly one chunk are valid gzip too.
        for data in [Vec::new(), vec![7u8; CHUNK]] {
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gzip(&data, 2)[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data);
        }
    }

    /// The bytes a layer's gzip holds are part of every layer digest: this pins them for a
    /// text-like input (long matches, as package files have), so that a change of deflate
    /// implementation or level, which changes every digest graven makes, is a change someone
    /// decides on and not a side effect. It caught the move from `miniz_oxide`, whose level 6
    /// took 2.5 times zlib-rs's CPU on a bake's apt layer.
    #[test]
    fn layer_gzip_is_zlib_rs_at_level_6() {
        use sha2::Digest as _;
        let text: String = (0..60_000u32)
            .map(|i| {
                format!(
                    "{i:08} usr/lib/python3/dist-packages/module_{}/file_{}.py {}\n",
                    i % 97,
                    i % 13,
                    i.wrapping_mul(2_654_435_761) % 1_000
                )
            })
            .collect();
        let mut gz = ParallelGz::new(Vec::new(), crate::store::GZIP_LEVEL).unwrap();
        gz.write_all(text.as_bytes()).unwrap();
        let blob = gz.finish().unwrap();
        let digest = crate::store::Digest::from_sha256(sha2::Sha256::digest(&blob).into());
        assert_eq!(
            (blob.len(), digest.as_str()),
            (
                469_907,
                "sha256:920f9809548f7558a2b82a7e0a57998dfab80921fc55eb1846f5385e34d9a448"
            ),
            "the gzip of this input changed"
        );
    }
}
