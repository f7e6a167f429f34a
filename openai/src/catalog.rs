//! Discovery: [`OpenAiCatalog`] publishes every model an OpenAI-compatible server
//! lists at `GET {base_url}/models` (SPEC §17, `publisher --discover URL`).

use std::sync::Arc;

use async_trait::async_trait;
use virtual_llm_core::protocol::LlmSpec;
use virtual_llm_core::publisher::Catalog;
use virtual_llm_core::{Error, LlmName, PublishedLlm};

use crate::{OpenAiProvider, OpenAiUpstream};

/// The models an OpenAI-compatible server lists, each published as an LLM answered by
/// an [`OpenAiProvider`] for that model.
///
/// A model's name is the prefix followed by its id, each character outside the name
/// alphabet (`[A-Za-z0-9._:-]` and `/`) replaced by `-` (see [`catalog_name`]); an id
/// that still makes no valid name (too long, an empty or `..` segment) is skipped with
/// a warning.
///
/// ```no_run
/// # fn run() -> Result<(), virtual_llm_core::Error> {
/// use std::sync::Arc;
/// use virtual_llm_core::{Publisher, PublisherOptions};
/// use virtual_llm_openai::{OpenAiCatalog, OpenAiUpstream};
/// # let wire: Arc<dyn virtual_llm_core::publisher::Wire> = unimplemented!();
///
/// let vllm = OpenAiUpstream::new("http://127.0.0.1:8000/v1")?;
/// let catalog = Arc::new(OpenAiCatalog::new(vllm, "gpu7/"));
/// let publisher = Publisher::spawn_discovering(wire, catalog, PublisherOptions::default());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct OpenAiCatalog {
    upstream: OpenAiUpstream,
    prefix: String,
    provider_type: String,
    max_concurrent: Option<u32>,
}

impl OpenAiCatalog {
    /// The models of `upstream`, named `prefix` + id.
    pub fn new(upstream: OpenAiUpstream, prefix: impl Into<String>) -> Self {
        OpenAiCatalog {
            upstream,
            prefix: prefix.into(),
            provider_type: "openai".to_owned(),
            max_concurrent: None,
        }
    }

    /// Publishes each model with `maxConcurrent` `n`.
    #[must_use]
    pub fn with_max_concurrent(mut self, n: u32) -> Self {
        self.max_concurrent = Some(n);
        self
    }
}

/// The registry name of model `id` under `prefix`: the prefix and the id, each
/// character outside `[A-Za-z0-9._:-]` and `/` replaced by `-`; `None` when that is
/// no valid name.
///
/// ```
/// use virtual_llm_openai::catalog_name;
///
/// assert_eq!(catalog_name("", "meta-llama/Llama-3.1-8B-Instruct").unwrap().as_str(), "meta-llama/Llama-3.1-8B-Instruct");
/// assert_eq!(catalog_name("box1-", "qwen2.5 7b@q4").unwrap().as_str(), "box1-qwen2.5-7b-q4");
/// assert!(catalog_name("", "a//b").is_none());
/// ```
pub fn catalog_name(prefix: &str, id: &str) -> Option<LlmName> {
    let name: String = format!("{prefix}{id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '/') {
                c
            } else {
                '-'
            }
        })
        .collect();
    LlmName::parse(&name).ok()
}

#[async_trait]
impl Catalog for OpenAiCatalog {
    async fn llms(&self) -> Result<Vec<PublishedLlm>, Error> {
        let ids = self.upstream.model_ids().await?;
        let mut llms: Vec<PublishedLlm> = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(name) = catalog_name(&self.prefix, &id) else {
                tracing::warn!(model = %id, prefix = %self.prefix, "the upstream's model makes no valid name; not published");
                continue;
            };
            if llms.iter().any(|l| l.spec.name == name) {
                tracing::warn!(model = %id, %name, "two models make the same name; the first is published");
                continue;
            }
            let mut spec = LlmSpec::new(name, self.provider_type.clone(), id.clone());
            spec.max_concurrent = self.max_concurrent;
            if let Err(e) = spec.validate() {
                tracing::warn!(model = %id, error = %e, "not published");
                continue;
            }
            let provider = OpenAiProvider::new(self.upstream.clone(), id);
            llms.push(PublishedLlm::new(spec, Arc::new(provider)));
        }
        Ok(llms)
    }
}
