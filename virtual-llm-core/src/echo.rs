//! The echo model: answers with the last user message, one word per streamed chunk.
//! Deterministic and dependency-free, for tests, demos and `publisher --echo`.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream;

use crate::openai::{chunk_body, completion_body, last_user_text};
use crate::protocol::TaskFrame;
use crate::{Clock, Completion, Error, Provider, Reply, SystemClock};

/// A [`Provider`] that echoes the last user message.
///
/// The answer is the message's whitespace-separated words joined by single spaces.
/// Streamed, each word is one `chat.completion.chunk` (words after the first carry
/// their leading space, so the deltas concatenate to the answer), then a closing chunk
/// with `finish_reason: "stop"`.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use futures::StreamExt;
/// use serde_json::json;
/// use virtual_llm_core::protocol::{TaskFrame, TaskKind};
/// use virtual_llm_core::{EchoProvider, LlmName, Provider, Reply, TaskId};
///
/// let task = TaskFrame {
///     task_id: TaskId::generate(),
///     kind: TaskKind::Infer,
///     llm: LlmName::parse("demo").unwrap(),
///     stream: true,
///     body: json!({"model": "demo", "messages": [{"role": "user", "content": "hi  there"}]}),
/// };
/// let Reply::Stream(chunks) = EchoProvider::new().infer(task).await.unwrap() else { panic!() };
/// let chunks: Vec<String> = chunks.map(|c| c.unwrap()).collect().await;
/// assert_eq!(chunks.len(), 3); // "hi", " there", then the closing chunk
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct EchoProvider {
    clock: Arc<dyn Clock>,
}

impl Default for EchoProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl EchoProvider {
    /// An echo model stamping answers with the system clock.
    pub fn new() -> Self {
        EchoProvider {
            clock: Arc::new(SystemClock),
        }
    }

    /// An echo model stamping answers (`created`) with `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        EchoProvider { clock }
    }
}

#[async_trait]
impl Provider for EchoProvider {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let text = last_user_text(&task.body);
        let words: Vec<&str> = text.split_whitespace().collect();
        let id = format!("chatcmpl-{}", task.task_id);
        let model = task
            .body
            .get("model")
            .and_then(|m| m.as_str())
            .unwrap_or(task.llm.as_str());
        let created = self.clock.now().as_millis() / 1000;
        if !task.stream {
            let body = completion_body(&id, model, created, &words.join(" "));
            return Ok(Reply::Complete(Completion::ok(body)));
        }
        let mut chunks: Vec<Result<String, Error>> = words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let piece = if i == 0 {
                    (*w).to_owned()
                } else {
                    format!(" {w}")
                };
                Ok(chunk_body(&id, model, created, Some(&piece), None).to_string())
            })
            .collect();
        chunks.push(Ok(
            chunk_body(&id, model, created, None, Some("stop")).to_string()
        ));
        Ok(Reply::Stream(Box::pin(stream::iter(chunks))))
    }

    /// No upstream: always ready.
    async fn probe(&self) -> bool {
        true
    }
}
