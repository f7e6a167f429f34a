//! The client's side of a streamed answer, framed byte for byte as OpenAI frames it:
//! each chunk a `data: {…}` event (a space after the colon: hand-written
//! `startswith("data: ")` parsers rely on it), then `data: [DONE]`; a failure midway
//! sends one `event: error` with the OpenAI error body, ends the response, and closes
//! its HTTP/1 connection (see `CloseConnection` in `server`): never hangs.
//!
//! Each chunk's event carries its number first, `id: <seq>` (0, 1, 2…), so that a
//! client can resume after the last one it saw (SPEC §15); `[DONE]` and the `error`
//! event are not chunks and carry no `id:`. The OpenAI SDKs' parsers read the field
//! and ignore it. The answer comes from a [`Reader`] of the completion log, the same
//! for the asking client and for one that resumes.

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{CONTENT_TYPE, HeaderValue};
use virtual_llm_core::CompletionId;
use virtual_llm_core::completions::{Event, Reader};
use warp::reply::Response;

use crate::access::AccessLog;
use crate::reply::event_stream;
use crate::server::CloseConnection;

/// The payload of the event that ends a successful stream.
const DONE: &str = "[DONE]";

/// The most events joined into one piece of the response body.
const EVENTS_PER_WRITE: usize = 64;

/// The header naming a streamed answer for its client to resume it.
pub(crate) const COMPLETION_ID_HEADER: &str = "x-completion-id";

/// The response streaming what `reader` reads, with the `x-completion-id` header when
/// the answer is `completion`. After an `error` event the stream ends, and `close`
/// (the connection's, when served by [`serve`](crate::serve)) closes the connection
/// once the response is out.
///
/// `log`, the request's access log line, counts the bytes sent and is written when the
/// stream ends or the client goes away.
pub(crate) fn chunk_stream(
    reader: Reader,
    completion: Option<&CompletionId>,
    close: Option<CloseConnection>,
    mut log: Option<AccessLog>,
) -> Response {
    let events = reader.into_stream().map(move |event| {
        let event = match event {
            Event::Chunk { seq, data } => sse_event(Some(seq), None, &data),
            Event::Done => sse_event(None, None, DONE),
            Event::Failed(body) => {
                let body = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
                if let Some(close) = &close {
                    close.after_this_response();
                }
                sse_event(None, Some("error"), &body)
            }
        };
        if let Some(log) = &mut log {
            log.sent(event.len());
        }
        event
    });
    // The events that are ready together go out as one piece of the body: one
    // chunk of the HTTP/1.1 chunked encoding and one write, not one per event.
    let events = events
        .ready_chunks(EVENTS_PER_WRITE)
        .map(|events| Ok::<_, Infallible>(joined(events)));
    // warp wants a `Sync` body; the stream is only ever polled from one place.
    let mut response = warp::reply::Reply::into_response(warp::reply::stream(
        sync_wrapper::SyncStream::new(events),
    ));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    if let Some(id) = completion
        && let Ok(value) = HeaderValue::from_str(id.as_str())
    {
        headers.insert(COMPLETION_ID_HEADER, value);
    }
    event_stream(response)
}

/// `events`, one after the other, in one buffer.
fn joined(mut events: Vec<Bytes>) -> Bytes {
    if events.len() == 1 {
        return events.pop().unwrap_or_default();
    }
    let mut out = bytes::BytesMut::with_capacity(events.iter().map(Bytes::len).sum());
    for event in events {
        out.extend_from_slice(&event);
    }
    out.freeze()
}

/// One server-sent event: an `id: {seq}` line if it has one, an `event: {name}` line
/// if named, a `data: ` line per line of `data` (any of CRLF, LF and CR ends a line,
/// as for the parser at the other end), and the blank line that ends the event.
fn sse_event(id: Option<u64>, name: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&id.to_string());
        out.push('\n');
    }
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
    fn events_ready_together_are_joined_in_order() {
        let one = Bytes::from_static(b"data: 1\n\n");
        assert_eq!(joined(vec![one.clone()]), one);
        assert_eq!(
            joined(vec![one, Bytes::from_static(b"data: 2\n\n"), Bytes::new()]),
            "data: 1\n\ndata: 2\n\n"
        );
    }

    #[test]
    fn events_are_framed_with_a_space_and_one_data_line_per_line() {
        assert_eq!(sse_event(None, None, r#"{"a":1}"#), "data: {\"a\":1}\n\n");
        assert_eq!(
            sse_event(Some(7), None, r#"{"a":1}"#),
            "id: 7\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(sse_event(None, None, DONE), "data: [DONE]\n\n");
        assert_eq!(
            sse_event(None, Some("error"), r#"{"error":{}}"#),
            "event: error\ndata: {\"error\":{}}\n\n"
        );
        // A line break inside the data cannot end the event or start a field of its own.
        assert_eq!(
            sse_event(None, None, "a\nb\r\nc\rdata: x\n"),
            "data: a\ndata: b\ndata: c\ndata: data: x\ndata: \n\n"
        );
    }
}
