//! The route's HTTP/1.1 client side, run on the client connection's own task: the request
//! head and whatever of its body is ready go out in one write, the answer's head is parsed
//! where it was read (httparse), and its body is decoded as it streams (a length, chunks, or
//! up to the close). There is no task per connection to an instance and no channel between a
//! request and its connection: hyper's client connection is a task of its own, so every
//! request crossed to it and its answer back (two task wake-ups and a channel each way).
//!
//! A request's body keeps streaming while the answer comes in (an instance may answer
//! before it has read the whole body, or echo it back as it reads), and neither body is ever
//! held whole: at most `UPLOAD_BUFFER` of the request's and one read of the answer's.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, Incoming};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::batched::Batched;
use super::limits::Slot;

/// The largest answer head taken (what hyper's client was allowed before).
const MAX_HEAD: usize = 256 * 1024;
/// Header fields an answer head may have (hyper's default).
const MAX_HEADERS: usize = 100;
/// A read asks for at least this much room: a whole small answer, head and body, in one.
const READ_SIZE: usize = 8 * 1024;
/// A read of a long body asks for this much: fewer system calls per megabyte.
const BULK_READ_SIZE: usize = 64 * 1024;
/// Request body bytes taken from the client before they are written to the instance.
const UPLOAD_BUFFER: usize = 64 * 1024;

/// Why an exchange with an instance failed, on the instance's side.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before the answer was complete")]
    Closed,
    #[error("the answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

/// Why an answer's body stopped short: the client's request body failed (it went away), or
/// the instance did.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the client's request body failed: {0}")]
    Client(#[source] hyper::Error),
    #[error("the instance's answer failed: {0}")]
    Upstream(#[from] UpstreamError),
}

/// Why `Connection::exchange` got no answer head.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// No head before the deadline.
    Timeout,
    /// Reading the client's request body failed.
    Client(hyper::Error),
    /// The instance answered something that is not HTTP/1.1.
    Invalid(UpstreamError),
    /// The connection closed or failed before the head was whole.
    Closed(UpstreamError),
}

/// A keep-alive connection to an instance: its socket, what was read past the last answer
/// (nothing, between requests), the request bytes not written yet, and the timer that bounds
/// the wait for each answer. The timer lives as long as the connection: moving its deadline
/// later for the next request is an atomic store, where a fresh timer per request would be a
/// timer wheel insertion and removal.
#[derive(Debug)]
pub(crate) struct Connection {
    /// Its request writes go out with the route thread's batch, as answers to clients do.
    stream: Batched,
    read: BytesMut,
    write: BytesMut,
    timer: Pin<Box<Sleep>>,
    /// The connection's place in the descriptor budget, until its socket is closed.
    _slot: Slot,
}

impl Connection {
    pub(crate) fn new(stream: TcpStream, slot: Slot) -> Connection {
        Connection {
            stream: Batched::new(stream),
            read: BytesMut::new(),
            write: BytesMut::new(),
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            _slot: slot,
        }
    }

    /// Whether an idle connection can carry another request: the instance has neither
    /// closed it nor sent anything unasked. The runtime records a socket's readiness as
    /// epoll reports it, so when nothing happened this costs no system call.
    pub(crate) fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() || self.stream.write_failed() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: closed, bytes nobody asked for, or readiness left over from the last
            // answer's read; only a read tells which (and clears what was left over).
            Poll::Ready(Ok(())) => self.poll_read(&mut cx, READ_SIZE).is_pending(),
        }
    }

    /// Whether nothing was read past the last answer (more would be a broken instance).
    pub(crate) fn is_clean(&self) -> bool {
        self.read.is_empty()
    }

    /// Sends the request (head, then body as `upload` yields it) and waits for the answer's
    /// head until `deadline`. What is left of the body is `upload`'s to finish alongside the
    /// answer's body (`Answer`).
    pub(crate) async fn exchange(
        &mut self,
        parts: &Parts,
        upload: &mut Upload,
        deadline: Instant,
    ) -> Result<Head, ExchangeError> {
        self.write.clear();
        upload.begin(parts, &mut self.write);
        self.timer.as_mut().reset(deadline.into());
        // A failed write is reported only if no answer follows it: an instance may answer
        // (a 413, say) and close without reading the rest of the request.
        let mut write_error = None;
        poll_fn(|cx| {
            if !upload.finished && !upload.broken {
                match self.poll_upload(cx, upload) {
                    Poll::Ready(Ok(())) => upload.finished = true,
                    Poll::Ready(Err(BodyError::Client(error))) => {
                        return Poll::Ready(Err(ExchangeError::Client(error)));
                    }
                    Poll::Ready(Err(BodyError::Upstream(error))) => {
                        upload.broken = true;
                        write_error = Some(error);
                    }
                    Poll::Pending => {}
                }
            }
            // A write the route thread's batch sent for this task and that failed counts
            // as this task's own failed write.
            if let Some(error) = self.write_failed() {
                upload.broken = true;
                write_error.get_or_insert(error);
            }
            loop {
                match parse_head(&mut self.read, &parts.method) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Err(ExchangeError::Invalid(error))),
                }
                let failure = match self.poll_read(cx, READ_SIZE) {
                    Poll::Ready(Ok(0)) => UpstreamError::Closed,
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(error)) => error.into(),
                    Poll::Pending => break,
                };
                return Poll::Ready(Err(ExchangeError::Closed(
                    write_error.take().unwrap_or(failure),
                )));
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(ExchangeError::Timeout)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Why a write of the request that went out with the route thread's batch failed (see
    /// `Batched`), once: the request is as broken as if this task's own write had failed.
    fn write_failed(&mut self) -> Option<UpstreamError> {
        self.stream.take_write_error().map(UpstreamError::from)
    }

    /// Reads into the read buffer, with room for at least `size` more bytes. The runtime's
    /// read skips the system call while the socket is not readable, and takes a short read
    /// to mean it is drained (no extra read that would only return EAGAIN).
    fn poll_read(&mut self, cx: &mut Context<'_>, size: usize) -> Poll<std::io::Result<usize>> {
        self.read.reserve(size);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }

    /// Moves the request body along: takes what the client has sent (up to
    /// `UPLOAD_BUFFER`), frames it, and writes what is buffered. Ready once the body has
    /// ended and every byte is written.
    fn poll_upload(
        &mut self,
        cx: &mut Context<'_>,
        upload: &mut Upload,
    ) -> Poll<Result<(), BodyError>> {
        loop {
            while !upload.body_done && self.write.len() < UPLOAD_BUFFER {
                match Pin::new(&mut upload.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are dropped, as hyper's client dropped them.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            upload.started = true;
                            if upload.chunked {
                                let _ = write!(self.write, "{:x}\r\n", data.len());
                                self.write.extend_from_slice(&data);
                                self.write.extend_from_slice(b"\r\n");
                            } else {
                                self.write.extend_from_slice(&data);
                            }
                        }
                    }
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Err(BodyError::Client(error)));
                    }
                    Poll::Ready(None) => {
                        upload.body_done = true;
                        if upload.chunked {
                            self.write.extend_from_slice(LAST_CHUNK);
                        }
                    }
                    Poll::Pending => break,
                }
            }
            if self.write.is_empty() {
                return if upload.body_done {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let written = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.write))
                .map_err(UpstreamError::from)?;
            if written == 0 {
                return Poll::Ready(Err(
                    UpstreamError::Io(std::io::ErrorKind::WriteZero.into()).into()
                ));
            }
            self.write.advance(written);
        }
    }
}

const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A request's body on its way to an instance.
#[derive(Debug)]
pub(crate) struct Upload {
    body: Incoming,
    /// Sent with chunked framing: the body is not known to be empty and the request has no
    /// Content-Length.
    chunked: bool,
    /// The client's body has ended (framing included in the write buffer).
    body_done: bool,
    /// Every byte of the request is written.
    finished: bool,
    /// Writing to the instance failed: nothing more is sent on this connection.
    broken: bool,
    /// A part of the client's body has been taken: the request cannot be sent again.
    started: bool,
}

impl Upload {
    pub(crate) fn new(parts: &Parts, body: Incoming) -> Upload {
        let body_done = body.is_end_stream();
        Upload {
            chunked: !body_done && !parts.headers.contains_key(header::CONTENT_LENGTH),
            body,
            body_done,
            finished: false,
            broken: false,
            started: false,
        }
    }

    /// Whether a part of the client's body has been taken (and may be lost with a failed
    /// connection).
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Every byte of the request is written.
    pub(crate) fn finished(&self) -> bool {
        self.finished
    }

    /// Writing the request failed: the connection cannot carry another.
    pub(crate) fn broken(&self) -> bool {
        self.broken
    }

    /// Puts the head in `out`, and the end of the body if it has ended already (with
    /// nothing taken from it, or it would not be sent again).
    fn begin(&mut self, parts: &Parts, out: &mut BytesMut) {
        self.finished = false;
        self.broken = false;
        encode_head(parts, self.chunked, out);
        if self.body_done && self.chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
    }
}

/// Writes the request line and header fields, with `transfer-encoding: chunked` when
/// `chunked` (the route removed the client's own framing headers but Content-Length).
fn encode_head(parts: &Parts, chunked: bool, out: &mut BytesMut) {
    let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An answer's head, parsed.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) decoder: Decoder,
    /// The connection may carry another request once the body is read.
    pub(crate) keep_alive: bool,
}

/// Parses an answer head from the front of `buffer`, taking it (and any interim 1xx
/// answers before it) out; None while it is not whole.
fn parse_head(buffer: &mut BytesMut, method: &Method) -> Result<Option<Head>, UpstreamError> {
    loop {
        // Left uninitialised: parsing fills what it uses, and zeroing a hundred fields per
        // answer would cost more than parsing a small head.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buffer,
            &mut fields,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD => {
                return Err(UpstreamError::Invalid("the head is too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(UpstreamError::Invalid("too many header fields"));
            }
            Err(_) => return Err(UpstreamError::Invalid("a malformed head")),
        };
        let code = response.code.unwrap_or_default();
        let status =
            StatusCode::from_u16(code).map_err(|_| UpstreamError::Invalid("a malformed status"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // The route strips Upgrade from requests: an instance has nothing to switch to.
            return Err(UpstreamError::Invalid("an unrequested protocol switch"));
        }
        if status.is_informational() {
            // 100 Continue and the like: the final answer follows.
            buffer.advance(length);
            continue;
        }
        let http11 = response.version == Some(1);
        // Names are made now, values (which share the head's bytes) once it is split off.
        let base = buffer.as_ptr() as usize;
        let mut parsed = Vec::with_capacity(response.headers.len());
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| UpstreamError::Invalid("a malformed header name"))?;
            let start = field.value.as_ptr() as usize - base;
            parsed.push((name, start, start + field.value.len()));
        }
        // Copied out rather than split off: the read buffer then stays the connection's own,
        // reused for the next answer instead of shared with this one's headers and
        // allocated afresh.
        let head = Bytes::copy_from_slice(&buffer[..length]);
        buffer.advance(length);
        let mut headers = HeaderMap::with_capacity(parsed.len());
        for (name, start, end) in parsed {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| UpstreamError::Invalid("a malformed header value"))?;
            headers.append(name, value);
        }
        let (framing, exact) = framing(method, status, &headers)?;
        let keep_alive = exact && persistent(http11, &headers);
        return Ok(Some(Head {
            status,
            headers,
            decoder: Decoder { state: framing },
            keep_alive,
        }));
    }
}

/// How the answer's body is delimited (RFC 9112 6.3), and whether that leaves the
/// connection usable after it.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<(State, bool), UpstreamError> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((State::Length(0), true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let chunked = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
        // With a Content-Length as well the message may be smuggling another: use the
        // chunks, and close the connection after.
        let exact = chunked && !headers.contains_key(header::CONTENT_LENGTH);
        return Ok((
            if chunked {
                State::ChunkSize
            } else {
                State::Close
            },
            exact,
        ));
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| UpstreamError::Invalid("a malformed content-length"))?;
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(UpstreamError::Invalid("a malformed content-length"));
            }
            let value: u64 = item
                .parse()
                .map_err(|_| UpstreamError::Invalid("a malformed content-length"))?;
            if length.is_some_and(|length| length != value) {
                return Err(UpstreamError::Invalid("conflicting content-lengths"));
            }
            length = Some(value);
        }
    }
    Ok(match length {
        Some(length) => (State::Length(length), true),
        None => (State::Close, false),
    })
}

/// Whether the instance keeps the connection open after this answer.
fn persistent(http11: bool, headers: &HeaderMap) -> bool {
    let mut close = !http11;
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("close") {
                return false;
            }
            if token.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    !close
}

/// Where an answer's body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes are still to come.
    Length(u64),
    /// A chunk-size line is next.
    ChunkSize,
    /// This many bytes of the current chunk are still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data is next.
    ChunkEnd,
    /// Trailer fields (dropped) up to the empty line.
    Trailers,
    /// Everything until the instance closes the connection.
    Close,
    Done,
}

/// Decodes an answer's body from the connection's read buffer.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
}

/// What `Decoder::decode` found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The body has ended.
    Done,
    /// More must be read first.
    More,
}

impl Decoder {
    /// Takes the next part of the body out of `buffer`.
    pub(crate) fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, UpstreamError> {
        loop {
            match self.state {
                State::Length(0) | State::Done => {
                    self.state = State::Done;
                    return Ok(Decoded::Done);
                }
                State::Length(left) | State::ChunkData(left) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = left.min(buffer.len() as u64);
                    self.state = match self.state {
                        State::ChunkData(_) if take == left => State::ChunkEnd,
                        State::ChunkData(_) => State::ChunkData(left - take),
                        _ => State::Length(left - take),
                    };
                    let take = usize::try_from(take).unwrap_or(usize::MAX);
                    return Ok(Decoded::Data(take_front(buffer, take)));
                }
                State::Close => {
                    if buffer.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = buffer.len();
                    return Ok(Decoded::Data(take_front(buffer, take)));
                }
                State::ChunkSize => match httparse::parse_chunk_size(buffer) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buffer.advance(used);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD => {
                        return Err(UpstreamError::Invalid("a chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                    Err(_) => return Err(UpstreamError::Invalid("a malformed chunk size")),
                },
                State::ChunkEnd => {
                    if buffer.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(UpstreamError::Invalid("a chunk without its CRLF"));
                    }
                    buffer.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => match memchr::memmem::find(buffer, b"\r\n") {
                    Some(0) => {
                        buffer.advance(2);
                        self.state = State::Done;
                    }
                    Some(end) => buffer.advance(end + 2),
                    None if buffer.len() > MAX_HEAD => {
                        return Err(UpstreamError::Invalid("trailers too large"));
                    }
                    None => return Ok(Decoded::More),
                },
            }
        }
    }

    /// The connection closed: the end of a body delimited by the close, an error for any
    /// other.
    pub(crate) fn closed(&mut self) -> Result<Decoded, UpstreamError> {
        match self.state {
            State::Close | State::Done | State::Length(0) => {
                self.state = State::Done;
                Ok(Decoded::Done)
            }
            _ => Err(UpstreamError::Closed),
        }
    }

    /// Whether the whole body has been taken.
    pub(crate) fn is_end(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    /// The bytes still to come, when the framing says.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(left) => Some(left),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// How much room the next read asks for: more while a long body streams.
    fn read_size(&self) -> usize {
        match self.state {
            State::Length(left) | State::ChunkData(left) if left > READ_SIZE as u64 => {
                BULK_READ_SIZE
            }
            State::Close => BULK_READ_SIZE,
            _ => READ_SIZE,
        }
    }
}

/// Up to this many bytes of a body are copied out of the read buffer (see `take_front`).
const COPY_AT_MOST: usize = 4096;

/// Takes the first `length` bytes out of `buffer`: a small piece copied, so that the buffer
/// stays unshared and is reused for the next read; a large one split off without a copy.
fn take_front(buffer: &mut BytesMut, length: usize) -> Bytes {
    if length <= COPY_AT_MOST {
        let piece = Bytes::copy_from_slice(&buffer[..length]);
        buffer.advance(length);
        piece
    } else {
        buffer.split_to(length).freeze()
    }
}

/// An instance's answer body as it streams to the client, on the connection it came on,
/// with the rest of the request body still going out alongside.
pub(crate) struct Answer<'a> {
    pub(crate) connection: &'a mut Connection,
    pub(crate) decoder: &'a mut Decoder,
    pub(crate) upload: &'a mut Option<Upload>,
    /// Set when the connection cannot carry another request after this answer.
    pub(crate) spoiled: &'a mut bool,
}

impl Answer<'_> {
    /// The next part of the body, None at its end.
    pub(crate) fn poll_frame(
        self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Answer {
            connection,
            decoder,
            upload,
            spoiled,
        } = self;
        if let Some(sending) = upload {
            match connection.poll_upload(cx, sending) {
                Poll::Ready(Ok(())) => *upload = None,
                Poll::Ready(Err(BodyError::Client(error))) => {
                    return Poll::Ready(Some(Err(BodyError::Client(error))));
                }
                Poll::Ready(Err(BodyError::Upstream(_))) => {
                    // The instance stopped reading the request; its answer may still come
                    // whole, but the connection is done.
                    *upload = None;
                    *spoiled = true;
                }
                Poll::Pending => {}
            }
        }
        if connection.write_failed().is_some() {
            // As above: the request did not all reach the instance.
            *upload = None;
            *spoiled = true;
        }
        loop {
            let decoded = match decoder.decode(&mut connection.read) {
                Ok(Decoded::More) => {
                    let size = decoder.read_size();
                    match ready!(connection.poll_read(cx, size)) {
                        Ok(0) => decoder.closed(),
                        Ok(_) => continue,
                        Err(error) => Err(error.into()),
                    }
                }
                decoded => decoded,
            };
            return Poll::Ready(match decoded {
                Ok(Decoded::Data(data)) => Some(Ok(Frame::data(data))),
                Ok(Decoded::Done) => None,
                Ok(Decoded::More) => continue,
                Err(error) => {
                    *spoiled = true;
                    Some(Err(error.into()))
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the route has it from its client (with hyper's `Incoming` body, which
    /// only a hyper connection makes), and the client's end, kept open.
    async fn request(head: &'static str) -> (Parts, Upload, tokio::io::DuplexStream) {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, server) = tokio::io::duplex(4096);
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let _ = sender.send(request);
            // Never answered: the test only wants the request.
            std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        client.write_all(head.as_bytes()).await.unwrap();
        let (parts, body) = received.recv().await.unwrap().into_parts();
        let upload = Upload::new(&parts, body);
        (parts, upload, client)
    }

    /// A connection to an instance on which the route can no longer send (shut down for
    /// writing: the next write fails with EPIPE, reads go on), and the instance's end. The
    /// route's runtime has not seen the socket readable yet when the test's exchange begins,
    /// so the exchange's first read waits, and the batch's write fails before it reads.
    async fn unwritable_connection() -> (Connection, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (instance, _) = listener.accept().unwrap();
        rustix::net::shutdown(&stream, rustix::net::Shutdown::Write).unwrap();
        let slot = super::super::limits::budget().instance().unwrap();
        (Connection::new(stream, slot), instance)
    }

    fn deadline() -> Instant {
        Instant::now() + std::time::Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_request_without_a_body_whose_write_fails_is_closed_and_can_be_sent_again() {
        let (parts, mut upload, _client) = request("GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let (mut connection, instance) = unwritable_connection().await;
        // The instance closes without an answer (it got nothing).
        drop(instance);
        match connection.exchange(&parts, &mut upload, deadline()).await {
            // The write's failure, not the end of stream read after it, as when the route's
            // own write failed: the route sends the request again elsewhere (nothing of a
            // body was taken) and never reuses the connection.
            Err(ExchangeError::Closed(UpstreamError::Io(error))) => {
                assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(upload.broken());
        assert!(!upload.started());
    }

    #[tokio::test]
    async fn an_answer_that_came_before_a_failed_write_is_taken() {
        use std::io::Write as _;
        let (parts, mut upload, _client) = request("GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let (mut connection, mut instance) = unwritable_connection().await;
        // An instance may answer before it read the request (a 413, a 503), as this one does.
        instance
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        match connection.exchange(&parts, &mut upload, deadline()).await {
            Ok(head) => assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE),
            Err(other) => panic!("{other:?}"),
        }
        // The request did not all reach the instance: the route spoils the connection
        // (`respond`), as when its own write failed.
        assert!(upload.broken());
    }

    /// Parses `input` (the answer to `method`) as one head and decodes its body as if it
    /// arrived in pieces of `piece` bytes, rendering status, headers, framing and the
    /// body's frames.
    fn check(method: Method, input: &str, piece: usize, expected: expect_test::Expect) {
        let bytes = input.as_bytes();
        let mut buffer = BytesMut::new();
        let mut fed = 0;
        let mut rendered = String::new();
        let mut head = None;
        let mut result = Ok(());
        while head.is_none() {
            match parse_head(&mut buffer, &method) {
                Ok(Some(parsed)) => head = Some(parsed),
                Ok(None) if fed < bytes.len() => {
                    let end = (fed + piece).min(bytes.len());
                    buffer.extend_from_slice(&bytes[fed..end]);
                    fed = end;
                }
                Ok(None) => {
                    result = Err("incomplete head".to_owned());
                    break;
                }
                Err(error) => {
                    result = Err(error.to_string());
                    break;
                }
            }
        }
        if let Some(mut head) = head {
            let _ = writeln!(
                rendered,
                "{} keep-alive={} remaining={:?}",
                head.status.as_u16(),
                head.keep_alive,
                head.decoder.remaining()
            );
            for (name, value) in &head.headers {
                let _ = writeln!(rendered, "{name}: {}", value.to_str().unwrap());
            }
            loop {
                match head.decoder.decode(&mut buffer) {
                    Ok(Decoded::Data(data)) => {
                        let _ = writeln!(rendered, "data {:?}", String::from_utf8_lossy(&data));
                    }
                    Ok(Decoded::Done) => {
                        let _ = writeln!(rendered, "done, {} left over", buffer.len());
                        break;
                    }
                    Ok(Decoded::More) if fed < bytes.len() => {
                        let end = (fed + piece).min(bytes.len());
                        buffer.extend_from_slice(&bytes[fed..end]);
                        fed = end;
                    }
                    Ok(Decoded::More) => match head.decoder.closed() {
                        Ok(_) => {
                            let _ = writeln!(rendered, "done at the close");
                            break;
                        }
                        Err(error) => {
                            result = Err(error.to_string());
                            break;
                        }
                    },
                    Err(error) => {
                        result = Err(error.to_string());
                        break;
                    }
                }
            }
        }
        if let Err(error) = result {
            let _ = writeln!(rendered, "error: {error}");
        }
        expected.assert_eq(&rendered);
    }

    #[test]
    fn a_body_of_known_length_in_one_piece_and_in_many() {
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
        check(
            Method::GET,
            answer,
            1000,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=Some(5)
                content-length: 5
                x-a: b
                data "hello"
                done, 0 left over
            "#]],
        );
        check(
            Method::GET,
            answer,
            3,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=Some(5)
                content-length: 5
                x-a: b
                data "he"
                data "llo"
                done, 0 left over
            "#]],
        );
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n";
        check(
            Method::GET,
            answer,
            1000,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=None
                transfer-encoding: chunked
                data "hello"
                data " "
                data "world"
                done, 0 left over
            "#]],
        );
        check(
            Method::GET,
            answer,
            4,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=None
                transfer-encoding: chunked
                data "hel"
                data "lo"
                data " "
                data "wor"
                data "ld"
                done, 0 left over
            "#]],
        );
        check(
            Method::GET,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            1000,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=None
                transfer-encoding: chunked
                data "hello"
                error: the answer is not valid HTTP/1.1: a chunk without its CRLF
            "#]],
        );
    }

    #[test]
    fn a_body_without_length_runs_to_the_close_and_spends_the_connection() {
        check(
            Method::GET,
            "HTTP/1.1 200 OK\r\n\r\nuntil the end",
            5,
            expect_test::expect![[r#"
                200 keep-alive=false remaining=None
                data "u"
                data "ntil "
                data "the e"
                data "nd"
                done at the close
            "#]],
        );
        check(
            Method::GET,
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            100,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=Some(10)
                content-length: 10
                data "short"
                error: the connection closed before the answer was complete
            "#]],
        );
    }

    #[test]
    fn heads_without_bodies_and_interim_answers() {
        check(
            Method::HEAD,
            "HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n",
            1000,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=Some(0)
                content-length: 23
                done, 0 left over
            "#]],
        );
        check(
            Method::GET,
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            7,
            expect_test::expect![[r#"
                204 keep-alive=true remaining=Some(0)
                done, 0 left over
            "#]],
        );
    }

    #[test]
    fn connection_close_and_http10_spend_the_connection() {
        check(
            Method::GET,
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            1000,
            expect_test::expect![[r#"
                200 keep-alive=false remaining=Some(0)
                connection: close
                content-length: 0
                done, 0 left over
            "#]],
        );
        check(
            Method::GET,
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            1000,
            expect_test::expect![[r#"
                200 keep-alive=false remaining=Some(0)
                content-length: 0
                done, 0 left over
            "#]],
        );
        check(
            Method::GET,
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            1000,
            expect_test::expect![[r#"
                200 keep-alive=true remaining=Some(0)
                connection: keep-alive
                content-length: 0
                done, 0 left over
            "#]],
        );
    }

    #[test]
    fn malformed_answers_are_refused() {
        for (input, expected) in [
            ("this is not http\r\n\r\n", "a malformed head"),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "conflicting content-lengths",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
                "a malformed content-length",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "an unrequested protocol switch",
            ),
        ] {
            let mut buffer = BytesMut::from(input);
            match parse_head(&mut buffer, &Method::GET) {
                Err(UpstreamError::Invalid(reason)) => assert_eq!(reason, expected, "{input:?}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn request_heads_carry_the_framing_the_body_needs() {
        let render = |parts: &Parts, chunked: bool| {
            let mut out = BytesMut::new();
            encode_head(parts, chunked, &mut out);
            String::from_utf8(out.to_vec()).unwrap()
        };
        let (parts, ()) = http::Request::post("/upload?x=1")
            .header("host", "example.test")
            .body(())
            .unwrap()
            .into_parts();
        expect_test::expect![[r#"
            "POST /upload?x=1 HTTP/1.1\r\nhost: example.test\r\ntransfer-encoding: chunked\r\n\r\n"
        "#]]
        .assert_debug_eq(&render(&parts, true));
        expect_test::expect![[r#"
            "POST /upload?x=1 HTTP/1.1\r\nhost: example.test\r\n\r\n"
        "#]]
        .assert_debug_eq(&render(&parts, false));
    }
}
