//! The gateway's answer for `kind=public` rows: [`OpenAiBackend`], a [`PublicBackend`]
//! routing each public LLM name to an OpenAI-compatible upstream.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use virtual_llm_core::{Error, InferRequest, LlmName, LlmRecord, PublicBackend, Reply};

use crate::upstream::{OpenAiUpstream, call_as};

/// How long an unknown public LLM should wait before retrying.
const UNKNOWN_LLM_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The gateway's [`PublicBackend`]: each public LLM name routed to an
/// OpenAI-compatible upstream and the model name it knows there.
///
/// A name without a route answers [`Error::Unavailable`] (503) so that a client retries
/// once the configuration is fixed, rather than a 404 for a row that exists.
/// An upstream's own 4xx or 5xx answer reaches the client as it came: its status, body
/// and `Retry-After` (see [`OpenAiUpstream::chat`]).
///
/// # Example
///
/// ```no_run
/// # fn run() -> Result<(), virtual_llm_core::Error> {
/// use virtual_llm_core::LlmName;
/// use virtual_llm_openai::{OpenAiBackend, OpenAiUpstream};
///
/// let openai = OpenAiUpstream::new("https://api.openai.com/v1")?.with_api_key("sk-…")?;
/// let backend = OpenAiBackend::new()
///     .with_llm(LlmName::parse("gpt-mini")?, openai.clone(), "gpt-4o-mini")
///     .with_llm(LlmName::parse("gpt")?, openai, "gpt-4o");
/// assert_eq!(backend.len(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct OpenAiBackend {
    routes: HashMap<LlmName, Route>,
}

/// Where one public LLM is answered.
#[derive(Clone, Debug)]
struct Route {
    upstream: OpenAiUpstream,
    model: String,
}

impl OpenAiBackend {
    /// A backend with no routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes the public LLM `name` to `upstream`, sending `model` as the model name.
    /// A second route for the same name replaces the first.
    pub fn with_llm(
        mut self,
        name: LlmName,
        upstream: OpenAiUpstream,
        model: impl Into<String>,
    ) -> Self {
        self.routes.insert(
            name,
            Route {
                upstream,
                model: model.into(),
            },
        );
        self
    }

    /// The routed LLM names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &LlmName> {
        self.routes.keys()
    }

    /// How many LLMs are routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no LLM is routed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[async_trait]
impl PublicBackend for OpenAiBackend {
    async fn infer(&self, llm: &LlmRecord, request: InferRequest) -> Result<Reply, Error> {
        let Some(route) = self.routes.get(&llm.name) else {
            tracing::warn!(llm = %llm.name, "public llm has no upstream configured");
            return Err(Error::Unavailable {
                kind: virtual_llm_core::UnavailableKind::Offline,
                reason: format!("public llm {} has no upstream configured", llm.name),
                retry_after: UNKNOWN_LLM_RETRY_AFTER,
            });
        };
        call_as(
            &route.upstream,
            request.endpoint,
            &route.model,
            &request.body,
            request.stream,
        )
        .await
    }
}
