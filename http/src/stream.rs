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
use std::fmt::Write as _;

use bytes::BytesMut;
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
    // The events that are ready together go out as one piece of the body, framed
    // straight into one buffer: one chunk of the HTTP/1.1 chunked encoding and one
    // write, not one per event. Nothing waits for more.
    let events = reader
        .into_stream()
        .ready_chunks(EVENTS_PER_WRITE)
        .map(move |events| {
            let mut out = BytesMut::with_capacity(events.iter().map(framed_len).sum());
            for event in events {
                match event {
                    Event::Chunk { seq, data } => write_event(&mut out, Some(seq), None, &data),
                    Event::Done => write_event(&mut out, None, None, DONE),
                    Event::Failed(body) => {
                        let body = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
                        if let Some(close) = &close {
                            close.after_this_response();
                        }
                        write_event(&mut out, None, Some("error"), &body);
                    }
                }
            }
            if let Some(log) = &mut log {
                log.sent(out.len());
            }
            Ok::<_, Infallible>(out.freeze())
        });
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

/// About the bytes `event` takes framed (its payload and the field names around it):
/// the buffer's starting capacity, not a bound.
fn framed_len(event: &Event) -> usize {
    const FIELDS: usize = 32;
    match event {
        Event::Chunk { data, .. } => data.len() + FIELDS,
        Event::Done => DONE.len() + FIELDS,
        Event::Failed(_) => 256,
    }
}

/// Appends one server-sent event to `out`: an `id: {seq}` line if it has one, an
/// `event: {name}` line if named, a `data: ` line per line of `data` (any of CRLF, LF
/// and CR ends a line, as for the parser at the other end), and the blank line that
/// ends the event.
fn write_event(out: &mut BytesMut, id: Option<u64>, name: Option<&str>, data: &str) {
    if let Some(id) = id {
        // Writing into a `BytesMut` cannot fail: it grows.
        let _ = writeln!(out, "id: {id}");
    }
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    let lines = data
        .split('\n')
        .flat_map(|line| line.strip_suffix('\r').unwrap_or(line).split('\r'));
    for line in lines {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `events` framed one after the other, as a ready batch is.
    fn framed(events: &[(Option<u64>, Option<&str>, &str)]) -> BytesMut {
        let mut out = BytesMut::new();
        for (id, name, data) in events {
            write_event(&mut out, *id, *name, data);
        }
        out
    }

    #[test]
    fn events_ready_together_are_framed_in_order_into_one_buffer() {
        assert_eq!(
            framed(&[
                (Some(0), None, "1"),
                (Some(1), None, "2"),
                (None, None, DONE)
            ]),
            "id: 0\ndata: 1\n\nid: 1\ndata: 2\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn events_are_framed_with_a_space_and_one_data_line_per_line() {
        assert_eq!(framed(&[(None, None, r#"{"a":1}"#)]), "data: {\"a\":1}\n\n");
        assert_eq!(
            framed(&[(Some(7), None, r#"{"a":1}"#)]),
            "id: 7\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(framed(&[(None, None, DONE)]), "data: [DONE]\n\n");
        assert_eq!(
            framed(&[(None, Some("error"), r#"{"error":{}}"#)]),
            "event: error\ndata: {\"error\":{}}\n\n"
        );
        // A line break inside the data cannot end the event or start a field of its own.
        assert_eq!(
            framed(&[(None, None, "a\nb\r\nc\rdata: x\n")]),
            "data: a\ndata: b\ndata: c\ndata: data: x\ndata: \n\n"
        );
    }
}
