//! The client's side of a streamed chat completion, framed byte for byte as OpenAI
//! frames it: each chunk a `data: {…}` event (a space after the colon: hand-written
//! `startswith("data: ")` parsers rely on it), then `data: [DONE]`; a failure midway
//! sends one `event: error` with the OpenAI error body, ends the response, and closes
//! its HTTP/1 connection (see `CloseConnection` in `server`): never hangs.

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{CONTENT_TYPE, HeaderValue};
use virtual_llm_core::ChunkStream;
use virtual_llm_core::error::Escaped;
use warp::reply::Response;

use crate::access::AccessLog;
use crate::reply::event_stream;
use crate::server::CloseConnection;

/// The payload of the event that ends a successful stream.
const DONE: &str = "[DONE]";

/// The response streaming `chunks` to the client. After an `error` event the stream
/// ends, and `close` (the connection's, when served by [`serve`](crate::serve)) closes
/// the connection once the response is out.
///
/// `log`, the request's access log line, counts the bytes sent and is written when the
/// stream ends or the client goes away.
pub(crate) fn chunk_stream(
    chunks: ChunkStream,
    close: Option<CloseConnection>,
    mut log: Option<AccessLog>,
) -> Response {
    let events = futures::stream::unfold(Some(chunks), move |state| {
        let close = close.clone();
        async move {
            let mut chunks = state?;
            match chunks.next().await {
                Some(Ok(data)) => Some((event(None, &data), Some(chunks))),
                Some(Err(e)) => {
                    tracing::debug!(error = %Escaped(&e), "stream failed midway");
                    let body =
                        serde_json::to_string(&e.to_body()).unwrap_or_else(|_| "{}".to_owned());
                    if let Some(close) = close {
                        close.after_this_response();
                    }
                    Some((event(Some("error"), &body), None))
                }
                None => Some((event(None, DONE), None)),
            }
        }
    })
    .map(move |event| {
        if let Some(log) = &mut log {
            log.sent(event.len());
        }
        Ok::<_, Infallible>(event)
    });
    // warp wants a `Sync` body; the stream is only ever polled from one place.
    let mut response = warp::reply::Reply::into_response(warp::reply::stream(
        sync_wrapper::SyncStream::new(events),
    ));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    event_stream(response)
}

/// One server-sent event: an `event: {name}` line if named, a `data: ` line per line
/// of `data` (any of CRLF, LF and CR ends a line, as for the parser at the other end),
/// and the blank line that ends the event.
fn event(name: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 16);
    if let Some(name) = name {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    let lines = data
        .split('\n')
        .flat_map(|line| line.strip_suffix('\r').unwrap_or(line).split('\r'));
    for line in lines {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_framed_with_a_space_and_one_data_line_per_line() {
        assert_eq!(event(None, r#"{"a":1}"#), "data: {\"a\":1}\n\n");
        assert_eq!(event(None, DONE), "data: [DONE]\n\n");
        assert_eq!(
            event(Some("error"), r#"{"error":{}}"#),
            "event: error\ndata: {\"error\":{}}\n\n"
        );
        // A line break inside the data cannot end the event or start a field of its own.
        assert_eq!(
            event(None, "a\nb\r\nc\rdata: x\n"),
            "data: a\ndata: b\ndata: c\ndata: data: x\ndata: \n\n"
        );
    }
}
