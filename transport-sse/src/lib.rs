//! The SSE transport of virtual-llm: the control channel as a server-sent event stream
//! the publisher holds open, results posted back as NDJSON.
//!
//! # Layout
//! - `route`: the gateway's side, the warp filter at `{base}/_provider-stream`, which
//!   `virtual-llm-http`'s `routes` mounts beside the other routes (registration,
//!   heartbeats and results are plain HTTP routes of that crate).
//! - `client`: the publisher's [`SseWire`], a [`Wire`](virtual_llm_core::publisher::Wire)
//!   over HTTP for the core's [`Publisher`](virtual_llm_core::Publisher).
//! - `batch`: the whole answers that are ready together, posted in one request to a
//!   gateway that takes them (capability `resultBatches`).

mod batch;
mod client;
mod route;

pub use client::SseWire;
pub use route::route;
pub use virtual_llm_core::protocol::SESSION_HEADER;
