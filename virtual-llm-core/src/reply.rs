//! What an inference produces, wherever it came from: a relayed task, a public
//! upstream, or a publisher's [`Provider`](crate::Provider).

use std::fmt;
use std::time::Duration;

use futures::stream::BoxStream;
use serde_json::Value;

use crate::Error;

/// A complete, non-streamed answer: a `chat.completion`, or an upstream's own error
/// answer passed through as it came (its status, its body, its `Retry-After`).
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The upstream's HTTP status (200, or the upstream's own error status).
    pub status: u16,
    /// The body: an OpenAI `chat.completion`, or the upstream's error body.
    pub body: Value,
    /// The upstream's `Retry-After`, when it sent one with an error answer: the client
    /// gets it as its own `Retry-After` header, in whole seconds.
    pub retry_after: Option<Duration>,
}

impl Completion {
    /// A 200 answer with `body` and no `Retry-After`.
    pub fn ok(body: Value) -> Self {
        Completion {
            status: 200,
            body,
            retry_after: None,
        }
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
