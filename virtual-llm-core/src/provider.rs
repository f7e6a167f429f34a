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
/// - Dropping the returned future or stream aborts the upstream call: that is how a
///   `cancel` frame takes effect, so hold no work that outlives them.
/// - Upstream failures are [`Error::Upstream`] with the upstream's message.
#[async_trait]
pub trait Provider: fmt::Debug + Send + Sync + 'static {
    /// Answers one task.
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error>;
}
