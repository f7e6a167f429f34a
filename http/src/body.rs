//! Reading request bodies under a size limit: whole JSON bodies, and NDJSON streams
//! read line by line as they arrive (tokio-util's `LinesCodec`, with a maximum line
//! length). Anything over the limit is a 413 before it is
//! buffered; anything unparsable is a 400 that changes nothing.

use std::io;

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::io::StreamReader;
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

/// An NDJSON body as its lines, split as the bytes arrive: each line at most `limit`
/// bytes (413 past it, before more is buffered), UTF-8 (400 otherwise); blank lines
/// are skipped.
pub(crate) fn lines<S, B>(body: S, limit: usize) -> impl Stream<Item = Result<String, Error>>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let bytes = StreamReader::new(body.map(|chunk| chunk.map_err(io::Error::other)));
    FramedRead::new(bytes, LinesCodec::new_with_max_length(limit))
        .map(move |line| {
            line.map_err(|e| match e {
                LinesCodecError::MaxLineLengthExceeded => Error::PayloadTooLarge { limit },
                LinesCodecError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                    Error::invalid("an NDJSON line is not UTF-8")
                }
                LinesCodecError::Io(e) => {
                    Error::invalid(format!("could not read the request body: {e}"))
                }
            })
        })
        .try_filter(|line| futures::future::ready(!line.trim_ascii().is_empty()))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// The lines of a body arriving in `chunks`, or the first error's status.
    async fn split(chunks: &[&'static [u8]], limit: usize) -> Result<Vec<String>, u16> {
        let body = futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, warp::Error>(Bytes::from_static(c))),
        );
        lines(body, limit)
            .try_collect()
            .await
            .map_err(|e| e.status())
    }

    #[tokio::test]
    async fn lines_are_split_across_chunks_and_blank_ones_skipped() {
        let chunks: [&[u8]; 4] = [b"{\"a\"", b":1}\r\n\n  \n{\"b", b"\":2}\n", b"{\"c\":3}"];
        assert_eq!(
            split(&chunks, 16).await.unwrap(),
            [r#"{"a":1}"#, r#"{"b":2}"#, r#"{"c":3}"#]
        );
        assert_eq!(split(&[], 16).await.unwrap(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_413_and_one_not_utf8_is_400() {
        assert_eq!(split(&[b"12345678\n"], 8).await.unwrap(), ["12345678"]);
        assert_eq!(split(&[b"123456789\n"], 8).await, Err(413));
        // No newline yet: refused once the limit is passed, not at the end of the body.
        assert_eq!(split(&[b"12345", b"6789", b"0\n"], 8).await, Err(413));
        assert_eq!(split(&[b"ok\n\xff\xfe\n"], 8).await, Err(400));
    }
}
