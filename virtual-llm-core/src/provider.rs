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
#[async_trait]
pub trait Provider: fmt::Debug + Send + Sync + 'static {
    /// Answers one task.
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error>;
}
