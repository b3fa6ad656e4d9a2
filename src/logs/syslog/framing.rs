//! Splitting a TCP byte stream into syslog frames, RFC 6587: octet-counted (`LEN SP MSG`,
//! §3.4.1) or non-transparent (`MSG LF`, §3.4.2), told apart by each frame's first byte (a
//! digit or `<`), so one connection may even mix them. Pure.
//!
//! Nothing a peer sends can make it panic or hold more than `limit` bytes and a few bytes of
//! header: a length prefix is trusted unless the frame it announces holds another frame's
//! start (then it was too long) or is larger than the limit; such a frame, and bytes that
//! start no frame (garbage, or the rest of a message whose length was too short), are counted
//! by kind and skipped up to the next place a frame can start, so the frames around them are
//! kept. A lying prefix found while resynchronising is not believed either.

use serde::Serialize;

/// Input refused, by kind: the listener counts each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum BadInput {
    #[error("wrong length prefix")]
    BadLength,
    #[error("frame larger than the limit")]
    Oversize,
    #[error("bytes between frames that start no frame")]
    Garbage,
    #[error("invalid utf-8")]
    InvalidUtf8,
    #[error("priority missing or out of range")]
    Pri,
    #[error("malformed rfc 5424 header")]
    Malformed,
}

impl BadInput {
    /// Its name in counts people read (`graven status`, docs/syslog.md's table).
    pub fn name(self) -> &'static str {
        match self {
            BadInput::BadLength => "bad_length",
            BadInput::Oversize => "oversize",
            BadInput::Garbage => "garbage",
            BadInput::InvalidUtf8 => "invalid_utf8",
            BadInput::Pri => "pri",
            BadInput::Malformed => "malformed",
        }
    }

    pub const ALL: [BadInput; 6] = [
        BadInput::BadLength,
        BadInput::Oversize,
        BadInput::Garbage,
        BadInput::InvalidUtf8,
        BadInput::Pri,
        BadInput::Malformed,
    ];
}

/// How a frame was delimited, as the listener's counts say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    OctetCounted,
    LineFeed,
}

/// Bytes kept from a resynchronising scan that found nothing: enough for a frame start cut
/// in two by a read (a few digits, space, `<`, a digit).
const KEEP: usize = 16;
/// The longest length prefix read; longer digit runs are scanned for a shorter suffix.
const MAX_DIGITS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Found(usize),
    /// Could still become a start once more bytes come.
    Partial(usize),
    None,
}

/// Where a frame can start in `buf` at or after `from`: `DIGITS SP < DIGIT` (octet-counted),
/// or `< DIGIT` (line-framed) anywhere when resynchronising, only after a line feed inside a
/// frame.
fn next_start(buf: &[u8], from: usize, inside_frame: bool) -> Start {
    for i in from..buf.len() {
        let b = buf[i];
        // A start is a whole digit run: a suffix of one is part of a longer (refused) number.
        if b.is_ascii_digit() && b != b'0' && (i == 0 || !buf[i - 1].is_ascii_digit()) {
            let digits = buf[i..].iter().take_while(|b| b.is_ascii_digit()).count();
            if digits > MAX_DIGITS {
                continue;
            }
            let tail = &buf[i + digits..];
            match tail {
                [] | [b' '] | [b' ', b'<'] => return Start::Partial(i),
                [b' ', b'<', d, ..] if d.is_ascii_digit() => return Start::Found(i),
                _ => {}
            }
        } else if b == b'<' && (!inside_frame || (i > 0 && buf[i - 1] == b'\n')) {
            match buf.get(i + 1) {
                None => return Start::Partial(i),
                Some(d) if d.is_ascii_digit() => return Start::Found(i),
                _ => {}
            }
        }
    }
    Start::None
}

/// How many bytes of a start found at `i` come before its message: a length prefix and the
/// space, or nothing for a line-framed message.
fn prefix_len(buf: &[u8], i: usize) -> usize {
    buf[i..].iter().take_while(|b| b.is_ascii_digit()).count() + 1
}

/// A TCP connection's framing state; `push` what arrives, `finish` at the end.
#[derive(Debug)]
pub struct Deframer {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
    /// Inside a run of refused bytes: the run is counted once.
    bad_run: bool,
    /// Bytes left of a frame larger than the limit, skipped as they come.
    discard: usize,
}

enum Step {
    Frame(usize, usize, usize),
    Bad(BadInput, usize),
    Skip(usize),
    /// A frame larger than the limit: count it, skip its header and then `usize` bytes.
    Discard(usize, usize),
    Wait,
}

impl Deframer {
    pub fn new(limit: usize) -> Deframer {
        Deframer {
            buf: Vec::new(),
            start: 0,
            limit: limit.max(8),
            bad_run: false,
            discard: 0,
        }
    }

    /// Bytes held for a frame not yet whole: never more than the limit and a header.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn push(&mut self, data: &[u8], emit: &mut impl FnMut(Result<(&[u8], Framing), BadInput>)) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Read in pieces no bigger than a frame, so the buffer stays within its bound.
        for piece in data.chunks(self.limit) {
            self.buf.extend_from_slice(piece);
            self.drain(false, emit);
        }
    }

    /// The connection ended: a last line-framed message without its line feed is a frame;
    /// anything else left is counted.
    pub fn finish(&mut self, emit: &mut impl FnMut(Result<(&[u8], Framing), BadInput>)) {
        self.drain(true, emit);
        self.buf.clear();
        self.start = 0;
    }

    fn drain(&mut self, eof: bool, emit: &mut impl FnMut(Result<(&[u8], Framing), BadInput>)) {
        loop {
            let avail = &self.buf[self.start..];
            if avail.is_empty() {
                break;
            }
            if self.discard > 0 {
                // An oversize frame's bytes, unless they hold another frame's start: then
                // its length was a lie and the frame starts there.
                let window = &avail[..avail.len().min(self.discard)];
                let skip = match next_start(avail, 0, true) {
                    // Whole inside the frame: digits that run on past its end are a message
                    // ending in a digit followed by the next frame's length.
                    Start::Found(i) if i + prefix_len(avail, i) < self.discard => {
                        self.discard = 0;
                        i
                    }
                    Start::Partial(i) if i < window.len() && !eof => {
                        self.discard -= i;
                        self.start += i;
                        break;
                    }
                    _ => window.len(),
                };
                self.discard = self.discard.saturating_sub(skip);
                self.start += skip;
                continue;
            }
            match self.step(avail, eof) {
                Step::Frame(from, to, consumed) => {
                    let framing = if avail[0] == b'<' {
                        Framing::LineFeed
                    } else {
                        Framing::OctetCounted
                    };
                    self.bad_run = false;
                    emit(Ok((&self.buf[self.start + from..self.start + to], framing)));
                    self.start += consumed;
                }
                Step::Bad(kind, skip) => {
                    if !self.bad_run {
                        emit(Err(kind));
                    }
                    self.bad_run = true;
                    self.start += skip;
                }
                Step::Skip(n) => self.start += n,
                Step::Discard(header, count) => {
                    emit(Err(BadInput::Oversize));
                    self.bad_run = false;
                    self.start += header;
                    self.discard = count;
                }
                Step::Wait => break,
            }
        }
        if eof {
            let rest = self.buf.len() - self.start;
            if rest > 0 && !self.bad_run {
                emit(Err(BadInput::BadLength));
            }
            self.start = self.buf.len();
        }
    }

    /// What to do with the bytes at the head of the buffer.
    fn step(&self, avail: &[u8], eof: bool) -> Step {
        match avail[0] {
            // Between frames, line ends and padding some senders add are not garbage.
            b'\n' | b'\r' | b' ' | b'\0' if !self.bad_run => Step::Skip(1),
            b'1'..=b'9' => self.octet_counted(avail, eof),
            b'<' => self.line_framed(avail, eof),
            _ => self.resync(avail, BadInput::Garbage),
        }
    }

    /// Skips refused bytes up to the next place a frame can start.
    fn resync(&self, avail: &[u8], kind: BadInput) -> Step {
        match next_start(avail, 1, false) {
            Start::Found(i) | Start::Partial(i) => Step::Bad(kind, i),
            Start::None => Step::Bad(kind, avail.len().saturating_sub(KEEP).max(1)),
        }
    }

    fn octet_counted(&self, avail: &[u8], eof: bool) -> Step {
        let digits = avail.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > MAX_DIGITS {
            return self.resync(avail, BadInput::BadLength);
        }
        match &avail[digits..] {
            [] | [b' '] | [b' ', b'<'] if !eof => return Step::Wait,
            [b' ', b'<', d, ..] if d.is_ascii_digit() => {}
            _ => return self.resync(avail, BadInput::Garbage),
        }
        let count: usize = avail[..digits]
            .iter()
            .fold(0, |a, b| a * 10 + usize::from(b - b'0'));
        if count > self.limit {
            // Believed only where a frame was expected; found while resynchronising it is
            // more likely garbage than a frame.
            return if self.bad_run {
                self.resync(avail, BadInput::Oversize)
            } else {
                Step::Discard(digits + 1, count)
            };
        }
        let body = digits + 1;
        let end = body + count;
        // A frame that holds another frame's start had a wrong length (too long).
        match next_start(avail, body + 1, true) {
            // Whole inside the frame, as for an oversize frame's bytes.
            Start::Found(i) if i + prefix_len(avail, i) < end => {
                return self.resync(avail, BadInput::BadLength);
            }
            Start::Partial(i) if i < end && avail.len() < end && !eof => return Step::Wait,
            _ => {}
        }
        if avail.len() < end {
            return if eof {
                self.resync(avail, BadInput::BadLength)
            } else {
                Step::Wait
            };
        }
        // Bytes after it that start no frame are garbage, or the rest of a message whose
        // length was too short: either way they are counted when read, and this frame kept.
        Step::Frame(body, end, end)
    }

    fn line_framed(&self, avail: &[u8], eof: bool) -> Step {
        if avail.len() < 2 {
            return if eof {
                self.resync(avail, BadInput::Garbage)
            } else {
                Step::Wait
            };
        }
        if !avail[1].is_ascii_digit() {
            return self.resync(avail, BadInput::Garbage);
        }
        let window = &avail[..avail.len().min(self.limit + 1)];
        let end = window.iter().position(|&b| b == b'\n');
        let scanned = end.unwrap_or(window.len());
        // A frame start inside the line: the line lost its line feed.
        match next_start(&avail[..scanned], 1, true) {
            Start::Found(_) => return self.resync(avail, BadInput::Garbage),
            Start::Partial(_) if end.is_none() && !eof && avail.len() <= self.limit => {
                return Step::Wait;
            }
            _ => {}
        }
        match end {
            Some(e) => {
                let to = if e > 0 && avail[e - 1] == b'\r' {
                    e - 1
                } else {
                    e
                };
                Step::Frame(0, to, e + 1)
            }
            None if avail.len() > self.limit => self.resync(avail, BadInput::Oversize),
            None if eof => Step::Frame(0, avail.len(), avail.len()),
            None => Step::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn run(chunks: &[&[u8]], limit: usize) -> (Vec<String>, Vec<BadInput>) {
        let mut d = Deframer::new(limit);
        let (mut frames, mut bad) = (Vec::new(), Vec::new());
        let mut emit = |r: Result<(&[u8], Framing), BadInput>| match r {
            Ok((f, _)) => frames.push(String::from_utf8_lossy(f).into_owned()),
            Err(k) => bad.push(k),
        };
        for c in chunks {
            d.push(c, &mut emit);
            assert!(d.buffered() <= limit + KEEP + MAX_DIGITS + 2);
        }
        d.finish(&mut emit);
        (frames, bad)
    }

    #[test]
    fn both_framings_on_one_connection() {
        let (frames, bad) = run(
            &[b"6 <13>ab<14>cd\n9 <15>1 x y", b"\n<16>e\r\n<17>last"],
            100,
        );
        assert_eq!(
            frames,
            ["<13>ab", "<14>cd", "<15>1 x y", "<16>e", "<17>last"]
        );
        assert!(bad.is_empty());
    }

    #[test]
    fn wrong_length_prefixes_lose_only_their_frame() {
        // Too long: it swallows the start of the next frame.
        let (frames, bad) = run(&[b"9 <13>a", b"b5 <14>c"], 100);
        assert_eq!(frames, ["<14>c"]);
        assert_eq!(bad, [BadInput::BadLength]);
        // Too short: the frame is cut, the rest of its message is garbage.
        let (frames, bad) = run(&[b"3 <13>abc5 <14>d"], 100);
        assert_eq!(frames, ["<13", "<14>d"]);
        assert_eq!(bad, [BadInput::Garbage]);
    }

    #[test]
    fn a_message_ending_in_a_digit_keeps_the_next_frame() {
        let (frames, bad) = run(&[b"6 <13>a15 <14>b6 <15>c2"], 100);
        assert_eq!(frames, ["<13>a1", "<14>b", "<15>c2"]);
        assert!(bad.is_empty());
        let (frames, bad) = run(&[b"9 <13>aaaa7", b"5 <14>b"], 8);
        assert_eq!(frames, ["<14>b"]);
        assert_eq!(bad, [BadInput::Oversize]);
    }

    #[test]
    fn oversize_and_garbage_are_counted_and_skipped() {
        let (frames, bad) = run(&[b"4 <1>a", b"999 <13>", &[b'x'; 300], b"4 <2>b"], 64);
        assert_eq!(frames, ["<1>a", "<2>b"]);
        assert_eq!(bad, [BadInput::Oversize]);
        let (frames, bad) = run(&[b"<13>", &[b'y'; 200], b"\n<14>z\n"], 64);
        assert_eq!(frames, ["<14>z"]);
        assert_eq!(bad, [BadInput::Oversize]);
        let (frames, bad) = run(&[b"\xff\xfegarbage 99999999999 <1", b"4 <3>c"], 64);
        assert_eq!(frames, ["<3>c"]);
        assert_eq!(bad, [BadInput::Garbage]);
    }

    /// A valid frame as a test builds it: octet-counted or line-framed, RFC 5424 or 3164, its
    /// text free of `<` and of digits but at its end (either could start a frame: see the
    /// module's head).
    fn frame() -> impl Strategy<Value = (bool, Vec<u8>)> {
        (
            any::<bool>(),
            0u8..192,
            any::<bool>(),
            "[a-zA-Z .,:=\\[\\]\"-]{0,40}[0-9]{0,3}",
        )
            .prop_map(|(octet, pri, modern, text)| {
                let msg = if modern {
                    format!("<{pri}>1 - host app - - - {text}")
                } else {
                    format!("<{pri}>Dec  6 10:00:01 host app: {text}")
                };
                let bytes = if octet {
                    format!("{} {msg}", msg.len()).into_bytes()
                } else {
                    format!("{msg}\n").into_bytes()
                };
                (octet, bytes)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_bytes_never_panic_and_stay_bounded(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cut in 1usize..300,
            limit in 8usize..200,
        ) {
            let chunks: Vec<&[u8]> = data.chunks(cut).collect();
            let _ = run(&chunks, limit);
        }

        #[test]
        fn frames_between_garbage_are_all_recovered(
            items in proptest::collection::vec(
                (frame(), proptest::collection::vec(any::<u8>().prop_filter("no <", |b| *b != b'<'), 0..30)),
                1..20,
            ),
            cut in 1usize..100,
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for ((_, frame), mut garbage) in items {
                // Digits (and a space) right before a frame are part of its length prefix:
                // garbage no receiver could tell from a frame is not garbage.
                if garbage.last().is_some_and(|b| *b == b' ' || b.is_ascii_digit()) {
                    garbage.push(b'x');
                }
                stream.extend_from_slice(&garbage);
                let text = String::from_utf8(frame.clone()).unwrap();
                let msg = match text.split_once(' ') {
                    Some((len, rest)) if len.bytes().all(|b| b.is_ascii_digit()) => rest.to_owned(),
                    _ => text.trim_end_matches('\n').to_owned(),
                };
                expected.push(msg);
                stream.extend_from_slice(&frame);
            }
            let chunks: Vec<&[u8]> = stream.chunks(cut).collect();
            let (frames, _) = run(&chunks, 1024);
            prop_assert_eq!(frames, expected);
        }
    }
}
