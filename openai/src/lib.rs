#![doc = include_str!("../README.md")]
//!
//! # Layout
//! - `upstream`: [`OpenAiUpstream`], the HTTP client of one OpenAI-compatible server,
//!   and how its answers (complete, streamed, failed) become the core's replies.
//! - `chunks`: an upstream's event stream as the core's
//!   [`ChunkStream`](virtual_llm_core::ChunkStream), chunk by chunk as it arrives.
//! - `message`: the upstream's own error message, from every error shape these servers
//!   use, and the body an error answer passes through with.
//! - `retry_after`: an upstream's `Retry-After`, in seconds or as a date.
//! - `provider`: [`OpenAiProvider`], a publisher's local model, ready when its server
//!   lists its models.
//! - `catalog`: [`OpenAiCatalog`], discovery: every model the server lists, published.
//! - `recipe`: [`UrlRecipe`], a wake or sleep recipe that calls a URL.
//! - `backend`: [`OpenAiBackend`], the gateway's answer for `kind=public` rows.
//!
//! The core's few facts about chat-completion bodies ([`chunk_body`],
//! [`completion_body`], [`last_user_text`]) are re-exported here, so that one path
//! names everything OpenAI.

mod backend;
mod catalog;
mod chunks;
mod events;
mod message;
mod provider;
mod recipe;
mod retry_after;
mod upstream;

pub use backend::OpenAiBackend;
pub use catalog::{OpenAiCatalog, catalog_name};
pub use provider::OpenAiProvider;
pub use recipe::UrlRecipe;
pub use upstream::OpenAiUpstream;
pub use virtual_llm_core::openai::{InferRequest, chunk_body, completion_body, last_user_text};
