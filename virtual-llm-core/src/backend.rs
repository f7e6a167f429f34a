//! Public LLMs: rows of `kind=public` are answered by an upstream the gateway holds the
//! URL and key of, through a [`PublicBackend`].

use std::fmt;

use async_trait::async_trait;

use crate::{Error, InferRequest, LlmRecord, Reply};

/// How the gateway answers a `kind=public` row.
///
/// # Contract
/// - Streams are real streams: yield each upstream chunk as it arrives.
/// - Upstream failures are [`Error::Upstream`] (502), or [`Error::Unavailable`] (503)
///   when the upstream cannot be reached; never a panic.
/// - Dropping the reply aborts the upstream call.
#[async_trait]
pub trait PublicBackend: fmt::Debug + Send + Sync + 'static {
    /// Answers `request` for the public row `llm`.
    async fn infer(&self, llm: &LlmRecord, request: InferRequest) -> Result<Reply, Error>;
}
