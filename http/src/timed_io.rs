//! An accepted connection's socket as the server hands it to hyper, with the time
//! bounds hyper does not keep itself:
//!
//! - **A write timeout.** A write that makes no progress for `write_timeout` (the
//!   client's receive window stays full: it stopped reading) fails the connection.
//!   hyper then drops what it was sending: a chat stream's body (which cancels its
//!   task upstream), an SSE control stream (which unbinds its session), a whole
//!   registry listing. Without it, a client that never reads holds all of that for as
//!   long as it keeps the TCP connection open (red-team findings F1, F2, F5). The
//!   clock runs only while a write is pending, so a slow reader that takes a few bytes
//!   now and then is never cut off, and neither is an idle connection.
//! - **A lingering close.** When hyper closes a connection whose request body was not
//!   read to its end (a 413 for a body over the limit, an early 401), closing the
//!   socket with unread bytes in its receive buffer makes the kernel send a reset,
//!   and a reset makes the client's kernel discard the answer it had not read yet:
//!   the client sees "connection reset" instead of its 413. So the close sends its
//!   FIN, then reads and discards what the client still sends, until the client
//!   closes, [`LINGER_BYTES`] have come, or `linger` has passed (nginx's
//!   `lingering_close`).
//!
//! The socket also holds the connection's slot under the server's connection cap
//! (`ServeOptions::max_connections`): it is released when the socket is dropped,
//! which for a WebSocket is when the upgraded socket closes, not when hyper hands it
//! over.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

/// Most bytes a lingering close reads and discards before it gives up and closes.
pub(crate) const LINGER_BYTES: usize = 64 << 20;

/// Whether the connection's last request body was left unread; set by the request
/// body (`TimedBody`) when it is dropped before its end, read by the close.
#[derive(Clone, Debug, Default)]
pub(crate) struct UnreadBody(Arc<AtomicBool>);

impl UnreadBody {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A connection (TCP, or any byte stream in tests) with a write timeout and a
/// lingering close; see the module doc.
pub(crate) struct TimedIo<T = TcpStream> {
    inner: T,
    write_timeout: Duration,
    /// Running while a write is pending; reset by every write that makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    unread: UnreadBody,
    linger: Duration,
    /// The lingering close: started once the FIN is sent.
    lingering: Option<Pin<Box<Sleep>>>,
    lingered: usize,
    shut: bool,
    /// The connection's slot under the server's connection cap.
    _permit: Option<OwnedSemaphorePermit>,
    /// The connection's place in its worker's count of open connections (see
    /// `ServeOptions::workers`): held by the socket, so that a connection upgraded to a
    /// WebSocket, whose socket outlives its HTTP connection's task, still counts.
    _worker: Option<std::sync::Arc<()>>,
}

impl TimedIo<TcpStream> {
    /// The first bytes the peer sent, left in the socket for the next read.
    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.peek(buf).await
    }
}

impl<T> TimedIo<T> {
    pub(crate) fn new(
        inner: T,
        write_timeout: Duration,
        linger: Duration,
        unread: UnreadBody,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        TimedIo {
            inner,
            write_timeout,
            stalled: None,
            timed_out: false,
            unread,
            linger,
            lingering: None,
            lingered: 0,
            shut: false,
            _permit: permit,
            _worker: None,
        }
    }

    /// Holds `token` for as long as the socket is open.
    pub(crate) fn holding(mut self, token: Option<std::sync::Arc<()>>) -> Self {
        self._worker = token;
        self
    }

    fn timed_out_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the peer took no bytes for {:?} (write timeout)",
                self.write_timeout
            ),
        )
    }

    /// A write's outcome, under the write timeout: progress resets the clock, a
    /// pending write starts it (if it is not running), and past the timeout the
    /// write fails.
    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
        progress: impl Fn(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(result) => {
                if result.as_ref().is_ok_and(&progress) {
                    self.stalled = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let limit = self.write_timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.timed_out = true;
                        tracing::debug!(?limit, "the peer stopped reading; closing its connection");
                        Poll::Ready(Err(self.timed_out_error()))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(self.timed_out_error()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, polled, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(self.timed_out_error()));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, polled, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Err(self.timed_out_error()));
        }
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        // A flush that returns is no sign the peer read anything (TCP's is a no-op).
        self.guard(cx, polled, |_| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.shut {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.shut = true;
        }
        if this.timed_out || this.linger.is_zero() || !this.unread.is_set() {
            return Poll::Ready(Ok(()));
        }
        let limit = this.linger;
        let deadline = this
            .lingering
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        let mut scratch = [0u8; 8192];
        loop {
            if deadline.as_mut().poll(cx).is_ready() || this.lingered >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.lingered += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);

    /// A connection whose peer's window is 64 bytes, and that peer's end.
    fn pair() -> (TimedIo<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64);
        let io = TimedIo::new(ours, TIMEOUT, Duration::ZERO, UnreadBody::default(), None);
        (io, theirs)
    }

    /// A peer that takes a few bytes now and then, each time within the timeout, is
    /// never cut off however long the whole write takes (here 20 times the timeout);
    /// one that stops taking bytes fails the write once the timeout has passed, not
    /// before. Paused time.
    #[tokio::test(start_paused = true)]
    async fn a_write_fails_only_after_the_timeout_without_progress() {
        let (mut io, mut peer) = pair();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 64 * 1024 - 64 {
                tokio::time::sleep(TIMEOUT / 2).await;
                total += peer.read(&mut buf).await.unwrap();
            }
            peer
        });
        let started = tokio::time::Instant::now();
        io.write_all(&vec![b'x'; 64 * 1024 - 64]).await.unwrap();
        assert!(
            started.elapsed() > TIMEOUT * 20,
            "the slow reader set the pace"
        );
        let peer = reader.await.unwrap();

        // The peer stops reading: the write fails, after the timeout.
        let started = tokio::time::Instant::now();
        let error = io.write_all(&vec![b'x'; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= TIMEOUT);
        assert!(started.elapsed() < TIMEOUT * 2);
        // And stays failed.
        assert_eq!(
            io.write(b"x").await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        drop(peer);
    }

    /// An idle connection (nothing to write) is never timed out: the clock runs only
    /// while a write is pending.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_not_timed_out() {
        let (mut io, mut peer) = pair();
        io.write_all(b"hello").await.unwrap();
        tokio::time::sleep(TIMEOUT * 100).await;
        io.write_all(b" world").await.unwrap();
        let mut buf = [0u8; 11];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello world");
    }
}
