//! An upstream's event stream as the core's [`ChunkStream`]: each `data:` payload as
//! it arrives, `[DONE]` dropped, an error reported mid-stream (or a body that breaks
//! off) ending the stream with one `Err`.

use std::fmt;
use std::sync::Arc;

use futures::{Stream, StreamExt, stream};
use serde_json::Value;
use virtual_llm_core::ChunkStream;

use crate::events::{Event, EventsError};
use crate::message::{error_message, truncate, upstream};

/// The payload that ends an OpenAI stream; it is not forwarded.
const DONE: &str = "[DONE]";

/// The chunks of an upstream event stream: each event's data, in order, as it
/// arrives. Ends at `[DONE]` or the end of the body; ends after one `Err` when the body
/// breaks off, cannot be parsed, or carries an error. `host` is for the log: no
/// message names it.
pub(crate) fn chunks<S, E>(events: S, host: &str) -> ChunkStream
where
    S: Stream<Item = Result<Event, EventsError<E>>> + Send + 'static,
    E: fmt::Display,
{
    let host: Arc<str> = Arc::from(host);
    let events = Box::pin(events);
    stream::unfold(Some(events), move |state| {
        let host = Arc::clone(&host);
        async move {
            // `None` once the stream has ended: after `[DONE]` or an error.
            let mut events = state?;
            let item = match events.next().await? {
                Ok(event) if event.data.trim() == DONE => return None,
                Ok(event) => match stream_error(&event) {
                    Some(message) => Err(upstream(message)),
                    None => return Some((Ok(one_line(event.data)), Some(events))),
                },
                Err(e) => {
                    tracing::warn!(upstream = %host, error = %e, "upstream stream broke off");
                    Err(upstream("the upstream's stream broke off"))
                }
            };
            Some((item, None))
        }
    })
    // Polling past the end answers `None` again rather than panicking.
    .fuse()
    .boxed()
}

/// The message of an error reported inside a stream: an `event: error`, or a data
/// payload shaped as an error instead of a chunk (vLLM's mid-stream errors).
fn stream_error(event: &Event) -> Option<String> {
    if event.event == "error" {
        return Some(error_message(event.data.as_bytes()).unwrap_or_else(|| truncate(&event.data)));
    }
    if !event.data.trim_start().starts_with('{') || !event.data.contains("\"error\"") {
        return None;
    }
    let value: Value = serde_json::from_str(&event.data).ok()?;
    if value.get("error").is_none() || value.get("choices").is_some() {
        return None;
    }
    error_message(event.data.as_bytes())
}

/// `data` as one line. An upstream may split one event's JSON over several `data:`
/// lines, which the event stream joins with `\n`; the gateway refuses chunk data with a
/// line break (it would forge fields in the client's stream). Outside its strings, a
/// line break in JSON is whitespace, and inside one it is not valid JSON at all: a
/// space keeps the JSON what it was.
fn one_line(data: String) -> String {
    // A SIMD search for the two bytes: this runs on every chunk relayed.
    if memchr::memchr2(b'\n', b'\r', data.as_bytes()).is_some() {
        data.replace(['\n', '\r'], " ")
    } else {
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_split_over_lines_is_relayed_as_one_line_of_the_same_json() {
        let split = "{\"choices\":\n[{\"delta\":{\"content\":\"a b\"}}]\r\n}".to_owned();
        let joined = one_line(split.clone());
        assert!(!joined.contains(['\n', '\r']));
        let (a, b): (Value, Value) = (
            serde_json::from_str(&split).unwrap(),
            serde_json::from_str(&joined).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(one_line("{}".to_owned()), "{}");
    }

    #[test]
    fn errors_inside_a_stream_are_recognised_but_chunks_are_not() {
        let event = |event: &str, data: &str| Event {
            event: event.to_owned(),
            data: data.to_owned(),
        };
        assert_eq!(
            stream_error(&event("message", r#"{"error":{"message":"oom"}}"#)).as_deref(),
            Some("oom")
        );
        assert_eq!(
            stream_error(&event("error", "overloaded")).as_deref(),
            Some("overloaded")
        );
        let chunk = r#"{"choices":[{"delta":{"content":"\"error\""}}],"error":null}"#;
        assert_eq!(stream_error(&event("message", chunk)), None);
        assert_eq!(stream_error(&event("message", r#"{"id":"x"}"#)), None);
    }
}
