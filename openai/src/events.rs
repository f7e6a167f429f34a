//! An upstream's event stream (`text/event-stream`), read as the SSE standard reads it
//! (WHATWG HTML, "Server-sent events", the event stream interpretation): lines end
//! with CRLF, LF or CR; a line starting with `:` is a comment; `field: value` sets a
//! field (one space after the colon is dropped, a line without a colon is a field with
//! an empty value); `data` lines are joined with LF; an empty line dispatches the
//! event, unless it has no data; fields other than `data` and `event` are ignored, as
//! is an event the body ends in the middle of. A leading byte order mark is skipped.
//!
//! It does what the `eventsource-stream` crate did here, with the cost of a stream's
//! every chunk in mind: lines are found with a SIMD search, and an event's data is the
//! one allocation per event. A differential test checks it against that crate.
//!
//! Unlike that crate it bounds what an upstream makes it hold: a line, or an event's
//! data, longer than [`MAX_EVENT_BYTES`] ends the stream with an error.

use std::collections::VecDeque;
use std::fmt;

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// The longest line, and the most data of one event, read from an upstream: the
/// gateway's default body limit, which no chunk it relays can pass anyway.
pub(crate) const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    /// Its type: the last `event` field, or `message`.
    pub(crate) event: String,
    /// Its `data` lines, joined with LF.
    pub(crate) data: String,
}

/// Why an event stream ended early.
#[derive(Debug)]
pub(crate) enum EventsError<E> {
    /// The body broke off.
    Transport(E),
    /// A line is not UTF-8.
    Utf8,
    /// A line, or an event's data, passed [`MAX_EVENT_BYTES`].
    TooLong,
}

impl<E: fmt::Display> fmt::Display for EventsError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventsError::Transport(e) => write!(f, "the body broke off: {e}"),
            EventsError::Utf8 => f.write_str("a line is not UTF-8"),
            EventsError::TooLong => {
                write!(
                    f,
                    "a line or an event is longer than {MAX_EVENT_BYTES} bytes"
                )
            }
        }
    }
}

/// The events of `body`, in order; the stream ends after the body does, or after one
/// error.
pub(crate) fn events<S, E>(body: S) -> impl Stream<Item = Result<Event, EventsError<E>>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    let state = (body.boxed(), Parser::default(), false);
    futures::stream::unfold(state, |(mut body, mut parser, mut ended)| async move {
        loop {
            if let Some(event) = parser.ready.pop_front() {
                return Some((Ok(event), (body, parser, ended)));
            }
            if ended {
                return None;
            }
            match body.next().await {
                Some(Ok(bytes)) => {
                    if let Err(e) = parser.feed(&bytes) {
                        ended = true;
                        parser.ready.clear();
                        return Some((Err(e), (body, parser, ended)));
                    }
                }
                Some(Err(e)) => {
                    ended = true;
                    return Some((Err(EventsError::Transport(e)), (body, parser, ended)));
                }
                // An event the body ends in the middle of is not dispatched.
                None => ended = true,
            }
        }
    })
}

/// The parser's state between two pieces of the body.
#[derive(Default)]
struct Parser {
    /// The start of a line whose end has not come yet.
    partial: Vec<u8>,
    /// The last piece ended with a CR: an LF starting the next one belongs to it.
    after_cr: bool,
    /// Past the first line (the one a byte order mark may start).
    started: bool,
    /// The data of the event being read, each line followed by an LF.
    data: String,
    /// The type of the event being read (empty: `message`).
    event: String,
    /// Events dispatched, not yet yielded.
    ready: VecDeque<Event>,
}

impl Parser {
    /// Reads `bytes`, the next piece of the body: every line it completes.
    fn feed<E>(&mut self, mut bytes: &[u8]) -> Result<(), EventsError<E>> {
        if bytes.is_empty() {
            // Says nothing, not even whether an LF follows a CR.
            return Ok(());
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', bytes) {
            let (line, rest) = bytes.split_at(end);
            let mut rest = &rest[1..];
            if bytes[end] == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.partial.is_empty() {
                self.line(line)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                self.bounded(whole.len().saturating_add(line.len()))?;
                whole.extend_from_slice(line);
                self.line(&whole)?;
                whole.clear();
                self.partial = whole;
            }
            bytes = rest;
        }
        self.bounded(self.partial.len().saturating_add(bytes.len()))?;
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    fn bounded<E>(&self, len: usize) -> Result<(), EventsError<E>> {
        if len > MAX_EVENT_BYTES {
            return Err(EventsError::TooLong);
        }
        Ok(())
    }

    /// One whole line, without its end.
    fn line<E>(&mut self, mut line: &[u8]) -> Result<(), EventsError<E>> {
        if !self.started {
            self.started = true;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return Ok(()), // a comment
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                let value = std::str::from_utf8(value).map_err(|_| EventsError::Utf8)?;
                self.bounded(self.data.len().saturating_add(value.len()))?;
                self.data.push_str(value);
                self.data.push('\n');
            }
            b"event" => {
                let value = std::str::from_utf8(value).map_err(|_| EventsError::Utf8)?;
                value.clone_into(&mut self.event);
            }
            // `id` and `retry` are for reconnecting, which a relayed answer never does;
            // other fields mean nothing.
            _ => {}
        }
        Ok(())
    }

    /// The empty line: the event read so far goes out, if it has data.
    fn dispatch(&mut self) {
        let event = std::mem::take(&mut self.event);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the LF after the last line
        self.ready.push_back(Event {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use eventsource_stream::Eventsource;
    use proptest::prelude::*;

    use super::*;

    /// `pieces` as a body, read by this parser: its events, and whether it failed.
    fn ours(pieces: &[Vec<u8>]) -> (Vec<(String, String)>, bool) {
        let items = futures::executor::block_on(events(body(pieces)).collect());
        outcome(items, |e| (e.event, e.data))
    }

    /// The same, read by `eventsource-stream`.
    fn theirs(pieces: &[Vec<u8>]) -> (Vec<(String, String)>, bool) {
        let items = futures::executor::block_on(body(pieces).eventsource().collect());
        outcome(items, |e| (e.event, e.data))
    }

    /// `pieces` as a response body.
    fn body(
        pieces: &[Vec<u8>],
    ) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
        let pieces: Vec<_> = pieces.iter().map(|p| Ok(Bytes::from(p.clone()))).collect();
        futures::stream::iter(pieces)
    }

    /// What a parser read: each event's type and data, and whether it failed.
    fn outcome<T, E>(
        items: Vec<Result<T, E>>,
        fields: impl Fn(T) -> (String, String),
    ) -> (Vec<(String, String)>, bool) {
        let failed = items.iter().any(Result::is_err);
        (
            items
                .into_iter()
                .filter_map(Result::ok)
                .map(fields)
                .collect(),
            failed,
        )
    }

    #[test]
    fn an_openai_stream_reads_as_its_events() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: keep-alive\n\nevent: error\ndata: {\"error\":{}}\n\ndata: [DONE]\n\n".to_vec();
        let expected = vec![
            ("message".to_owned(), r#"{"a":1}"#.to_owned()),
            ("message".to_owned(), r#"{"b":2}"#.to_owned()),
            ("error".to_owned(), r#"{"error":{}}"#.to_owned()),
            ("message".to_owned(), "[DONE]".to_owned()),
        ];
        assert_eq!(ours(std::slice::from_ref(&body)), (expected.clone(), false));
        // Cut anywhere, even between the CR and the LF of a line end, and with an
        // empty piece between (which says nothing about the LF after a CR).
        for cut in 0..body.len() {
            let pieces = [body[..cut].to_vec(), Vec::new(), body[cut..].to_vec()];
            assert_eq!(ours(&pieces), (expected.clone(), false), "cut at {cut}");
        }
    }

    #[test]
    fn the_standards_corner_cases() {
        for (text, data) in [
            // Lines joined with LF; one space dropped after the colon, and only one.
            ("data:a\ndata:  b\n\n", "a\n b"),
            // A lone CR ends a line; a field without a colon has an empty value.
            ("data\rdata: x\r\r", "\nx"),
            // No data, no event; the type does not carry over; unknown fields are
            // ignored.
            ("event: a\n\nretry: 5\nid: 7\nfoo: bar\ndata: d\n\n", "d"),
            // A byte order mark is skipped; an unfinished event is not dispatched.
            ("\u{feff}data: x\n\ndata: cut", "x"),
        ] {
            let events = ours(&[text.as_bytes().to_vec()]).0;
            assert_eq!(
                events,
                [("message".to_owned(), data.to_owned())],
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_line_past_the_bound_ends_the_stream() {
        let long = vec![b'a'; MAX_EVENT_BYTES + 1];
        let (events, failed) = ours(&[b"data: x\n\n".to_vec(), long]);
        assert_eq!(events, [("message".to_owned(), "x".to_owned())]);
        assert!(failed);
        let (_, failed) = ours(&[b"data: \xff\n\n".to_vec()]);
        assert!(failed, "not UTF-8");
    }

    /// A line of an event stream: a field the standard names, one it does not, a
    /// comment, or an empty line; with any of the three line ends.
    fn line() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            Just("data"),
            Just("event"),
            Just("id"),
            Just("retry"),
            Just("foo"),
            Just(""),
        ];
        let value = "[ a-z:{}\"é]{0,8}";
        let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        prop_oneof![
            (field, any::<bool>(), value, end.clone()).prop_map(|(f, colon, v, e)| {
                if colon || f.is_empty() {
                    format!("{f}:{v}{e}")
                } else {
                    format!("{f}{e}")
                }
            }),
            end.prop_map(str::to_owned),
        ]
    }

    proptest! {
        /// Any stream of such lines, cut into any pieces, reads as the
        /// `eventsource-stream` crate reads it. Each body ends with an LF: that crate
        /// waits for the byte after a CR to end a line, so a body whose last byte is a
        /// CR loses its last line there, where the standard (and this parser) ends
        /// the line at the CR.
        #[test]
        fn reads_as_eventsource_stream_does(
            lines in proptest::collection::vec(line(), 0..24),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let text = (lines.concat() + "\n").into_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(text.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for to in at {
                pieces.push(text[from..to].to_vec());
                from = to;
            }
            pieces.push(text[from..].to_vec());
            prop_assert_eq!(ours(&pieces), theirs(&pieces));
        }
    }
}
