//! Reading request bodies under a size limit: whole JSON bodies, and NDJSON streams
//! read line by line as they arrive. Anything over the limit is a 413 before it is
//! buffered; anything unparsable is a 400 that changes nothing.

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use virtual_llm_core::Error;

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read<S, B>(body: S, limit: usize) -> Result<BytesMut, Error>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| Error::invalid(format!("could not read the request body: {e}")))?;
        if buf.len() + chunk.remaining() > limit {
            return Err(Error::PayloadTooLarge { limit });
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            buf.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Ok(buf)
}

/// Parses a JSON body; a 400 naming what is wrong when it does not fit `T`.
pub(crate) fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::invalid(format!("invalid JSON body: {e}")))
}

/// Splits an NDJSON body into lines as the bytes arrive; each line at most `limit`
/// bytes. Blank lines are skipped.
pub(crate) struct Lines<S> {
    body: S,
    buf: BytesMut,
    limit: usize,
    ended: bool,
}

impl<S, B> Lines<S>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    pub(crate) fn new(body: S, limit: usize) -> Self {
        Lines {
            body,
            buf: BytesMut::new(),
            limit,
            ended: false,
        }
    }

    /// The next complete line, `None` at the end of the body.
    pub(crate) async fn next(&mut self) -> Option<Result<BytesMut, Error>> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line = self.buf.split_to(at + 1);
                line.truncate(at);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(Ok(line));
            }
            if self.buf.len() > self.limit {
                return Some(Err(Error::PayloadTooLarge { limit: self.limit }));
            }
            if self.ended {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                return Some(Ok(self.buf.split()));
            }
            match self.body.next().await {
                Some(Ok(mut chunk)) => {
                    while chunk.has_remaining() {
                        let piece = chunk.chunk();
                        self.buf.extend_from_slice(piece);
                        let n = piece.len();
                        chunk.advance(n);
                    }
                }
                Some(Err(e)) => {
                    return Some(Err(Error::invalid(format!(
                        "could not read the request body: {e}"
                    ))));
                }
                None => self.ended = true,
            }
        }
    }
}
