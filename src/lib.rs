//! virtual-llm: publish locally hosted LLMs into a central gateway's registry.
//!
//! This facade re-exports [`virtual_llm_core`] (always) and the HTTP, OpenAI,
//! transport and store crates behind features, so an application adds one dependency.

pub use virtual_llm_core::*;

/// The core crate, by name.
pub use virtual_llm_core as core;

/// The durable redb-backed [`Store`]: `redb::RedbStore`
/// (feature `redb`).
#[cfg(feature = "redb")]
pub use virtual_llm_redb as redb;

/// The registry on PostgreSQL, shared by several gateway replicas:
/// `postgres::PgStore` (feature `postgres`).
#[cfg(feature = "postgres")]
pub use virtual_llm_postgres as postgres;

/// The request plane on NATS between gateway replicas: `nats::NatsPlane`, the
/// channel directory and task router across replicas (feature `nats`).
#[cfg(feature = "nats")]
pub use virtual_llm_nats as nats;

/// The gateway's HTTP surface: client and provider routes, composed with the
/// transports' control channels; errors as responses; the server loop (feature `http`).
#[cfg(feature = "http")]
pub use virtual_llm_http as http;

/// The OpenAI-compatible upstream: `OpenAiUpstream`, the publisher's `OpenAiProvider`,
/// the gateway's `OpenAiBackend` (feature `openai`). Without the feature,
/// `virtual_llm::openai` is the core's module of chat-completion body helpers, which
/// this crate re-exports too.
#[cfg(feature = "openai")]
pub use virtual_llm_openai as openai;

/// The SSE transport: the control-stream route and the publisher's `SseWire` (feature
/// `sse`).
#[cfg(feature = "sse")]
pub use virtual_llm_sse as sse;

/// The WebSocket transport: the control-socket route and the publisher's `WsWire`
/// (feature `ws`).
#[cfg(feature = "ws")]
pub use virtual_llm_ws as ws;

/// The test kit (feature `testkit`): the core's test kit and the transport
/// conformance suite.
#[cfg(feature = "testkit")]
pub mod testkit;
