//! The index: fixed-size entries `(stream, end offset, time)` appended to a source's `index`
//! file, each saying "this stream's first `end` bytes were written by `time`". Each entry is
//! one write of 24 bytes with a check word, so a torn or zeroed trailing entry (a crash
//! mid-write, a disk that filled) is told apart and ignored on reading.

use super::Stream;

pub const ENTRY: usize = 24;
const MAGIC: u32 = 0x4c47_5631; // "LGV1"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub stream: Stream,
    pub end: u64,
    pub time_ns: u64,
}

fn check(stream: u32, end: u64, time_ns: u64) -> u32 {
    let mix = end ^ time_ns.rotate_left(17) ^ u64::from(stream);
    (mix as u32) ^ ((mix >> 32) as u32) ^ MAGIC
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY] {
        let stream = self.stream.index() as u32;
        let mut bytes = [0u8; ENTRY];
        bytes[0..8].copy_from_slice(&self.end.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.time_ns.to_le_bytes());
        bytes[16..20].copy_from_slice(&stream.to_le_bytes());
        bytes[20..24].copy_from_slice(&check(stream, self.end, self.time_ns).to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let bytes: &[u8; ENTRY] = bytes.try_into().ok()?;
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (end, time_ns, stream, sum) = (u64_at(0), u64_at(8), u32_at(16), u32_at(20));
        (sum == check(stream, end, time_ns)).then_some(())?;
        Some(Entry {
            stream: Stream::from_index(stream)?,
            end,
            time_ns,
        })
    }
}

/// Each stream's entries, in the order written (their ends only grow). Reading stops at the
/// first entry that does not check: what follows a torn write is not trusted.
pub fn decode_all(bytes: &[u8]) -> [Vec<(u64, u64)>; 2] {
    let mut streams: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for chunk in bytes.chunks_exact(ENTRY) {
        let Some(entry) = Entry::decode(chunk) else {
            break;
        };
        let list = &mut streams[entry.stream.index()];
        // An end that went back (it never should) would break the binary searches.
        if list.last().is_none_or(|&(end, _)| end <= entry.end) {
            list.push((entry.end, entry.time_ns));
        }
    }
    streams
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_or_zeroed_trailing_entry_is_ignored() {
        let a = Entry {
            stream: Stream::Stdout,
            end: 10,
            time_ns: 5,
        };
        let b = Entry {
            stream: Stream::Stderr,
            end: 3,
            time_ns: 6,
        };
        let mut bytes = [a.encode(), b.encode()].concat();
        assert_eq!(decode_all(&bytes), [vec![(10, 5)], vec![(3, 6)]]);
        bytes.extend_from_slice(&a.encode()[..7]);
        assert_eq!(decode_all(&bytes), [vec![(10, 5)], vec![(3, 6)]]);
        bytes.truncate(ENTRY * 2);
        bytes.extend_from_slice(&[0; ENTRY]);
        assert_eq!(decode_all(&bytes), [vec![(10, 5)], vec![(3, 6)]]);
    }
}
