//! The answer body a route sends its client: an instance's, streamed from the connection
//! it came on (`http1`), or a short one graven made up. Nothing is buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::http1::{Answer, BodyError, Decoder, Upload};
use super::upstream::Lease;

/// An answer to the client: an instance's streamed body, or a short one graven made up.
/// An instance's body carries the lease on its connection, so the instance stays in flight
/// until the last byte has gone out, and the connection goes back to the pool only if the
/// answer was read to its end (and the request written to its end).
#[derive(Debug)]
pub(crate) enum ProxyBody {
    Upstream {
        lease: Lease,
        decoder: Decoder,
        /// The rest of the request body, while it is still going out.
        upload: Option<Upload>,
        /// The connection cannot carry another request (the instance said so, the body
        /// ran to the close, or writing the request failed).
        spoiled: bool,
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
        if let ProxyBody::Upstream {
            lease,
            decoder,
            upload: None,
            spoiled: false,
        } = self
            && decoder.is_end()
            && lease.connection().is_clean()
        {
            lease.release_connection();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream {
                lease,
                decoder,
                upload,
                spoiled,
            } => Answer {
                connection: lease.connection(),
                decoder,
                upload,
                spoiled,
            }
            .poll_frame(cx),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { decoder, .. } => decoder.is_end(),
            ProxyBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { decoder, .. } => match decoder.remaining() {
                Some(left) => SizeHint::with_exact(left),
                None => SizeHint::default(),
            },
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
            }
        }
    }
}
