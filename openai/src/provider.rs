//! A publisher's local model behind an OpenAI-compatible server: [`OpenAiProvider`], a
//! [`Provider`] answering relayed tasks through an [`OpenAiUpstream`].

use async_trait::async_trait;
use virtual_llm_core::protocol::TaskFrame;
use virtual_llm_core::{Error, Provider, Reply};

use crate::upstream::{OpenAiUpstream, call_as};

/// A publisher's local model behind an OpenAI-compatible server.
///
/// Answers each task by sending its body upstream with `model` replaced by the
/// upstream's model name (clients call the gateway with the registry name). Streams
/// are relayed chunk by chunk as the model produces them; dropping the reply (a
/// `cancel` frame) aborts the upstream request. An upstream's own 4xx or 5xx answer is
/// posted as that answer (status, body, `Retry-After`), not as a failure (see
/// [`OpenAiUpstream::chat`]). It is ready when the server lists its models
/// ([`OpenAiUpstream::probe`]).
///
/// # Example
///
/// ```no_run
/// # fn run() -> Result<(), virtual_llm_core::Error> {
/// use std::sync::Arc;
/// use virtual_llm_core::Provider;
/// use virtual_llm_openai::{OpenAiProvider, OpenAiUpstream};
///
/// let upstream = OpenAiUpstream::new("http://127.0.0.1:11434/v1")?;
/// let provider: Arc<dyn Provider> = Arc::new(OpenAiProvider::new(upstream, "llama3.2:3b"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct OpenAiProvider {
    upstream: OpenAiUpstream,
    /// The name the upstream knows the model by, sent instead of the registry name.
    model: String,
}

impl OpenAiProvider {
    /// A provider sending tasks to `upstream` as model `model`.
    pub fn new(upstream: OpenAiUpstream, model: impl Into<String>) -> Self {
        OpenAiProvider {
            upstream,
            model: model.into(),
        }
    }

    /// The upstream's model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The upstream server.
    pub fn upstream(&self) -> &OpenAiUpstream {
        &self.upstream
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        call_as(
            &self.upstream,
            task.endpoint,
            &self.model,
            &task.body,
            task.stream,
        )
        .await
    }

    /// `GET {base_url}/models` answering 2xx within 5 s (see
    /// [`OpenAiUpstream::probe`]).
    async fn probe(&self) -> bool {
        self.upstream.probe().await
    }
}
