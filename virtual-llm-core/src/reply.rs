//! What an inference produces, wherever it came from: a relayed task, a public
//! upstream, or a publisher's [`Provider`](crate::Provider).

use std::fmt;
use std::time::Duration;

use futures::stream::BoxStream;
use serde_json::Value;

use crate::Error;
use crate::raw_body::RawBody;

/// A complete, non-streamed answer: a `chat.completion`, or an upstream's own error
/// answer passed through as it came (its status, its body, its `Retry-After`).
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The upstream's HTTP status (200, or the upstream's own error status).
    pub status: u16,
    /// The body: an OpenAI `chat.completion`, or the upstream's error body, as JSON
    /// text. It crosses the relay as it is (the publisher's frame, the client's
    /// response), never parsed into a tree on the way; [`Completion::json`] parses it
    /// for the few that read into it.
    pub body: RawBody,
    /// The upstream's `Retry-After`, when it sent one with an error answer: the client
    /// gets it as its own `Retry-After` header, in whole seconds.
    pub retry_after: Option<Duration>,
}

impl Completion {
    /// A 200 answer with `body` (a `serde_json::Value`, or a [`RawBody`]) and no
    /// `Retry-After`.
    pub fn ok(body: impl Into<RawBody>) -> Self {
        Completion {
            status: 200,
            body: body.into(),
            retry_after: None,
        }
    }

    /// The body parsed into a `serde_json::Value` (`null` in the one case a
    /// [`RawBody`] does not parse: nesting deeper than serde_json's limit).
    ///
    /// ```
    /// use virtual_llm_core::Completion;
    ///
    /// let c = Completion::ok(serde_json::json!({"choices": [{"index": 0}]}));
    /// assert_eq!(c.json()["choices"][0]["index"], 0);
    /// ```
    pub fn json(&self) -> Value {
        self.body.to_value().unwrap_or(Value::Null)
    }

    /// [`Completion::retry_after`] in whole seconds, rounded up (what the
    /// `Retry-After` header and the wire's `retryAfter` carry).
    ///
    /// ```
    /// use std::time::Duration;
    /// use virtual_llm_core::Completion;
    ///
    /// let mut busy = Completion::ok(serde_json::json!({}));
    /// assert_eq!(busy.retry_after_secs(), None);
    /// busy.retry_after = Some(Duration::from_millis(1500));
    /// assert_eq!(busy.retry_after_secs(), Some(2));
    /// ```
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
    }
}

/// A stream of SSE `data:` payloads (serialized `chat.completion.chunk`s). It ends after
/// the last chunk; an `Err` item ends it early.
pub type ChunkStream = BoxStream<'static, Result<String, Error>>;

/// An answer: complete, or streamed chunk by chunk as the model produces it.
pub enum Reply {
    /// The whole answer at once.
    Complete(Completion),
    /// Chunks as they come.
    Stream(ChunkStream),
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Complete(c) => f.debug_tuple("Complete").field(c).finish(),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}
