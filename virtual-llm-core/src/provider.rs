//! The publisher side: a [`Provider`] answers the tasks the gateway relays.

use std::fmt;

use async_trait::async_trait;

use crate::protocol::TaskFrame;
use crate::{Error, Reply};

/// Answers tasks on the publisher side: a local model behind an OpenAI-compatible
/// server, or the built-in [`EchoProvider`](crate::EchoProvider).
///
/// # Contract
/// - For a task with `stream: true`, return [`Reply::Stream`] and yield each upstream
///   chunk as soon as it arrives (one SSE `data:` payload per item); do not collect.
///   A [`Reply::Complete`] is still allowed for an upstream error answer.
/// - For `stream: false`, return [`Reply::Complete`].
/// - An upstream's own error answer (a 4xx or 5xx) is an answer, not a failure: a
///   [`Reply::Complete`] with its status, body and
///   [`retry_after`](crate::Completion::retry_after), whatever `stream` asked, so the
///   client gets it as it came (SPEC §12).
/// - Dropping the returned future or stream aborts the upstream call: that is how a
///   `cancel` frame takes effect, so hold no work that outlives them.
/// - Failing to talk to the upstream (no connection, no answer, a stream broken
///   midway) is [`Error::Upstream`], with a message that says what happened without
///   naming where the upstream runs: the gateway shows it to the client, prefixed
///   once with `upstream error: `.
/// - `probe` says whether the upstream would answer a task now (SPEC §12: for an
///   OpenAI-compatible server, `GET {url}/models` answering 2xx). The publisher calls it
///   before each register, every heartbeat and every second while it wakes the LLM, so
///   it must be cheap and return within a few seconds (bound it with a timeout of its
///   own; the publisher gives up on it after 10 s and counts that as not ready), and it
///   logs no secret. A provider with nothing to probe keeps the default: always ready.
#[async_trait]
pub trait Provider: fmt::Debug + Send + Sync + 'static {
    /// Answers one task.
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error>;

    /// Whether the upstream can answer now. Default: always.
    async fn probe(&self) -> bool {
        true
    }
}
