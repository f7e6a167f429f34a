//! The SSE transport of virtual-llm: the gateway's HTTP routes (warp) and the
//! publisher's client (reqwest), with the control channel as a server-sent event
//! stream and results posted back as NDJSON.
//!
//! # Layout
//! - `routes`: every gateway route of SPEC §5 except the WebSocket one, as warp
//!   filters over a core [`Gateway`](virtual_llm_core::Gateway).
//! - `reply`, `body`: responses (OpenAI-shaped errors, streams) and size-limited
//!   request bodies.
//! - `server`: serving the routes with `TCP_NODELAY` and a graceful shutdown.
//! - `client`: the publisher's [`SseWire`], a [`Wire`](virtual_llm_core::publisher::Wire)
//!   over HTTP for the core's [`Publisher`](virtual_llm_core::Publisher).

mod body;
mod client;
mod reply;
mod routes;
mod server;

pub use client::SseWire;
pub use reply::error as error_response;
pub use routes::{SESSION_HEADER, api_routes, routes, routes_with};
pub use server::{LISTEN_BACKLOG, ServeOptions, bind, serve, serve_with};
