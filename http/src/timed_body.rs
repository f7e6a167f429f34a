//! A request body as the server hands it to the routes, with a read timeout: the gap
//! between two pieces of a body the route is waiting for is bounded
//! (`ServeOptions::body_read_timeout`), so a client that sends a body's first bytes
//! and then nothing (or a byte now and then, slower than the timeout) does not hold a
//! request and its connection forever. The clock runs only while the route waits for
//! the client: a route that stops reading for its own reasons (the NDJSON result
//! route waiting for a slow client to take a chunk) is never the publisher's fault.
//!
//! It also tells the connection when a body is dropped before its end, so that the
//! connection's close lingers (see `timed_io`).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use crate::timed_io::UnreadBody;

type BoxError = Box<dyn StdError + Send + Sync>;

/// What a route reads when a client pauses longer than the body read timeout.
#[derive(Debug)]
pub(crate) struct BodyReadTimeout(Duration);

impl std::fmt::Display for BodyReadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no part of the request body came for {:?} (body read timeout)",
            self.0
        )
    }
}

impl StdError for BodyReadTimeout {}

/// hyper's request body under the body read timeout; see the module doc.
pub(crate) struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
    /// The body ended, failed or timed out: nothing is left to drain.
    over: bool,
    unread: UnreadBody,
}

impl TimedBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration, unread: UnreadBody) -> Self {
        TimedBody {
            inner,
            timeout,
            waiting: None,
            over: false,
            unread,
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.over {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.over = true;
                this.waiting = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                this.waiting = None;
                if frame.is_err() {
                    this.over = true;
                }
                Poll::Ready(Some(frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.timeout;
                let waiting = this
                    .waiting
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match waiting.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        // A silent client: no use lingering for the rest of it.
                        this.over = true;
                        this.waiting = None;
                        Poll::Ready(Some(Err(Box::new(BodyReadTimeout(limit)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.over || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        if !self.over && !self.inner.is_end_stream() {
            self.unread.set();
        }
    }
}
