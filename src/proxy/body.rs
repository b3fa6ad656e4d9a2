//! The two body types a route moves: requests on their way to an instance and answers on
//! their way to the client. Both stream; nothing is buffered.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::upstream::Lease;

/// A request body sent to an instance: the client's own, or none (a repeated request).
#[derive(Debug)]
pub(crate) enum ForwardBody {
    Client(Incoming),
    Empty,
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ForwardBody::Client(body) => Pin::new(body).poll_frame(cx),
            ForwardBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Client(body) => body.is_end_stream(),
            ForwardBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Client(body) => body.size_hint(),
            ForwardBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// An answer to the client: an instance's streamed body, or a short one graven made up.
/// An instance's body carries the lease on its connection, so the instance stays in flight
/// until the last byte has gone out, and the connection goes back to the pool only if the
/// answer was read to its end.
#[derive(Debug)]
pub(crate) enum ProxyBody {
    Upstream {
        body: Incoming,
        lease: Lease,
        done: bool,
    },
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub(crate) fn full(text: &'static str) -> ProxyBody {
        ProxyBody::Full(Some(Bytes::from_static(text.as_bytes())))
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let ProxyBody::Upstream { body, lease, done } = self
            && (*done || body.is_end_stream())
        {
            lease.release_connection();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, done, .. } => {
                // A chunked body only says it ended by returning None; remember that, since
                // is_end_stream stays false for it.
                let frame = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    *done = true;
                }
                frame
            }
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, done, .. } => *done || body.is_end_stream(),
            ProxyBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
            }
        }
    }
}
