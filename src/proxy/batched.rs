//! A route's connections write in batches: a small write to a client or to an instance is
//! held until the route thread has run the other tasks that were ready, then all held writes
//! go out one after the other (HAProxy's order: the receives of a poll, then its sends). A
//! peer (a load generator, a browser's many connections, an instance's server) then wakes
//! once for the writes of a batch instead of once per write: on busy cores, each wake-up cost
//! the route a scheduler wake-up and often a preemption (bench/proxy.sh counts them).
//!
//! The hold is bounded: the flush is a task of the route thread, queued behind the tasks that
//! were ready when the first write of the batch was held, so it runs within one pass over the
//! thread's queue. Large writes (over `HOLD_LIMIT`) and anything after a write the flush could
//! not finish go out through the connection's own task, with the runtime's readiness and
//! back-pressure. Bytes always leave in the order they were written. A write the flush could
//! not make is reported to the connection's task (`take_write_error`, or its next read after
//! what the peer had sent before), as its own failed write would have been.
//!
//! Only route threads (single-threaded runtimes, `serving`) make these connections: the batch
//! is the thread's own.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Held bytes per connection past which a write goes out at once (with what was held).
const HOLD_LIMIT: usize = 16 * 1024;

/// A client connection whose small writes wait for the thread's batch flush.
#[derive(Debug)]
pub(crate) struct Batched {
    stream: TcpStream,
    held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    state: Mutex<HeldState>,
}

#[derive(Debug)]
struct HeldState {
    bytes: BytesMut,
    /// The socket, while the connection owns it; None once it is dropped (its descriptor
    /// may be another's then).
    fd: Option<RawFd>,
    /// In the thread's batch already.
    queued: bool,
    /// The flush could not write everything (the socket was full): the connection's task
    /// writes the rest itself.
    stalled: bool,
    /// The flush failed: the connection's next read or write reports it.
    error: Option<io::Error>,
    /// The connection's task, woken when the flush stalled or failed.
    waker: Option<Waker>,
}

/// The route thread's batch: connections with held bytes, and the flush task's waker.
#[derive(Default)]
struct Batch {
    queue: Vec<Arc<Held>>,
    flusher: Option<Waker>,
    /// A flush task is spawned on this thread (its waker may not be registered yet).
    spawned: bool,
}

thread_local! {
    static BATCH: RefCell<Batch> = RefCell::default();
}

impl Batched {
    pub(crate) fn new(stream: TcpStream) -> Batched {
        let fd = stream.as_raw_fd();
        Batched {
            stream,
            held: Arc::new(Held {
                state: Mutex::new(HeldState {
                    bytes: BytesMut::new(),
                    fd: Some(fd),
                    queued: false,
                    stalled: false,
                    error: None,
                    waker: None,
                }),
            }),
        }
    }

    /// The socket's read readiness as the runtime last recorded it.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_read_ready(cx)
    }

    /// Why the batch could not write what was held, once: a write that failed before the
    /// connection's own task wrote again, which that task may want to know before it reads
    /// (an instance may answer and close without reading the whole request).
    pub(crate) fn take_write_error(&mut self) -> Option<io::Error> {
        self.held.lock().error.take()
    }

    /// Whether a held write failed and nobody has been told yet.
    pub(crate) fn write_failed(&self) -> bool {
        self.held.lock().error.is_some()
    }

    /// Writes what is held through the runtime (registering for writability when the socket
    /// is full): Ready once nothing is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.held.lock();
        if let Some(error) = state.error.take() {
            return Poll::Ready(Err(error));
        }
        while !state.bytes.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &state.bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => state.bytes.advance(written),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        state.stalled = false;
        Poll::Ready(Ok(()))
    }
}

impl HeldState {
    /// Keeps `waker` as the task to wake when the flush stalls or fails (cloned only when it
    /// is another task's).
    fn remember(&mut self, waker: &Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
        }
    }
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what is held without waiting (the flush task's part).
    fn flush(&self) {
        let mut state = self.lock();
        state.queued = false;
        let Some(fd) = state.fd else {
            state.bytes.clear();
            return;
        };
        while !state.bytes.is_empty() {
            // SAFETY: `fd` is the connection's open socket: `Batched`'s drop clears it (under
            // this lock, on this thread) before the socket is closed.
            let sent = unsafe {
                libc::send(
                    fd,
                    state.bytes.as_ptr().cast(),
                    state.bytes.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if sent > 0 {
                state.bytes.advance(sent as usize);
                continue;
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => state.stalled = true,
                _ => state.error = Some(error),
            }
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
            return;
        }
    }
}

/// Puts `held` in this thread's batch and makes sure the flush task will run.
fn enqueue(held: &Arc<Held>) {
    BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        batch.queue.push(Arc::clone(held));
        if let Some(flusher) = batch.flusher.take() {
            flusher.wake();
        } else if !batch.spawned {
            batch.spawned = true;
            tokio::spawn(flush_task());
        }
    });
}

/// The thread's flush task: each time it is woken, writes every held answer of the batch.
async fn flush_task() {
    std::future::poll_fn(|cx: &mut Context<'_>| {
        let queue = BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            batch.flusher = Some(cx.waker().clone());
            std::mem::take(&mut batch.queue)
        });
        for held in &queue {
            held.flush();
        }
        // The queue's allocation is kept for the next batch.
        BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            if batch.queue.is_empty() {
                let mut queue = queue;
                queue.clear();
                batch.queue = queue;
            }
        });
        Poll::<()>::Pending
    })
    .await;
}

impl AsyncRead for Batched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        {
            let mut state = this.held.lock();
            if state.error.is_some() {
                drop(state);
                // What the peer sent before the failure is read first, as it would have been
                // had the write failed in the task's own call; then the failure is reported.
                let before = buf.filled().len();
                if let Poll::Ready(Ok(())) = Pin::new(&mut this.stream).poll_read(cx, buf)
                    && buf.filled().len() > before
                {
                    return Poll::Ready(Ok(()));
                }
                let error = this.held.lock().error.take();
                return Poll::Ready(Err(
                    error.unwrap_or_else(|| io::ErrorKind::BrokenPipe.into())
                ));
            }
            if state.stalled {
                drop(state);
                // What is left is this task's to write; reading goes on meanwhile.
                if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(error));
                }
            } else if !state.bytes.is_empty() {
                // Polled before the flush ran: the flush keeps the bytes; be woken if it
                // cannot write them.
                state.remember(cx.waker());
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Batched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut state = this.held.lock();
        if let Some(error) = state.error.take() {
            return Poll::Ready(Err(error));
        }
        if !state.stalled && state.bytes.len() + data.len() <= HOLD_LIMIT {
            state.bytes.extend_from_slice(data);
            state.remember(cx.waker());
            if !state.queued {
                state.queued = true;
                drop(state);
                enqueue(&this.held);
            }
            return Poll::Ready(Ok(data.len()));
        }
        drop(state);
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.stream).poll_write(cx, data)
    }

    /// Held bytes wait for the batch: a flush after each answer is what batching saves.
    /// Bytes the batch could not write are written here.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let stalled = this.held.lock().stalled;
        if stalled {
            std::task::ready!(this.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

impl Drop for Batched {
    /// What is still held is written once more without waiting (the answer before a close),
    /// then the socket is forgotten by the batch before it is closed.
    fn drop(&mut self) {
        let held = &self.held;
        if !held.lock().bytes.is_empty() {
            held.flush();
        }
        let mut state = held.lock();
        state.fd = None;
        state.bytes = BytesMut::new();
        state.waker = None;
    }
}
