//! What an inference produces, wherever it came from: a relayed task, a public
//! upstream, or a publisher's [`Provider`](crate::Provider).

use std::fmt;

use futures::stream::BoxStream;
use serde_json::Value;

use crate::Error;

/// A complete, non-streamed answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The upstream's HTTP status (200, or the upstream's own error status).
    pub status: u16,
    /// The body: an OpenAI `chat.completion`, or the upstream's error body.
    pub body: Value,
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
