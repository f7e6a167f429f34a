#![doc = include_str!("../README.md")]
//!
//! # Layout
//! - `routes`: [`routes`], [`routes_with`] and [`api_routes`]: every route as one warp
//!   filter, the transports' control channels mounted beside them.
//! - `access`: the access log, one line per inference request under the target
//!   [`ACCESS_LOG_TARGET`].
//! - `client`: the client routes (the OpenAI pair, the registry's list, get and infer,
//!   and the resuming of a streamed answer from the core's completion log).
//! - `provider`: the provider routes that are plain HTTP (register, heartbeat,
//!   results as JSON or NDJSON).
//! - `cors`: [`with_cors`], CORS for browser pages from the origins an embedder lists.
//! - `health`: `GET /healthz` (alive) and `GET /readyz` (store reachable, not
//!   draining), for orchestrators: no token.
//! - `status`: the status page, `GET /`: the registry live in a browser.
//! - `openapi`: [`openapi_document`], the OpenAPI 3.1 document generated from the
//!   handlers and wire types, served at `GET /openapi.json`.
//! - `extract`: what every route reads first, shared with the transports: the base
//!   path, the principal, the session header.
//! - `body`: request bodies under the size limit; NDJSON line by line.
//! - `error`: [`error_response`], the one place an error becomes a response, and
//!   [`recover`] for requests no route took.
//! - `reply`: JSON and empty answers, event-stream headers.
//! - `stream`: the client's chat-completion event stream, each chunk with its `id:`.
//! - `server`: [`serve`]: the server loop, with `TCP_NODELAY`, a graceful shutdown and
//!   the bounds of [`ServeOptions`] (header read, write and body read timeouts, a
//!   connection cap, an HTTP/2 idle timeout, a lingering close); [`bind`] with a deep
//!   listen backlog.
//! - `timed_io`: an accepted socket with the write timeout and the lingering close.
//! - `timed_body`: a request body with the body read timeout.
//! - `mcp` (feature `mcp`): the active agents as MCP tools over Streamable HTTP at
//!   `/mcp`, with the official Rust MCP SDK.

mod access;
mod body;
mod client;
mod cors;
mod error;
mod extract;
mod health;
mod local_only;
#[cfg(feature = "mcp")]
pub mod mcp;
mod openapi;
mod provider;
mod reply;
mod routes;
mod server;
mod status;
mod stream;
mod timed_body;
mod timed_io;
mod workers;

pub use access::TARGET as ACCESS_LOG_TARGET;
pub use cors::{check_origins, with_cors};
pub use error::{error_response, recover, respond};
pub use extract::{authorization, base_path, principal, session_header, session_id};
pub use local_only::local_only;
pub use openapi::document as openapi_document;
pub use reply::event_stream;
pub use routes::{api_routes, routes, routes_with};
pub use server::{LISTEN_BACKLOG, ServeOptions, bind, serve, serve_with};
pub use virtual_llm_core::protocol::SESSION_HEADER;
pub use workers::Workers;
