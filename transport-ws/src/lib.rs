//! The WebSocket transport of virtual-llm: registration, tasks and results on one
//! socket (SPEC §5, "WebSocket frames").
//!
//! # Layout
//! - `route`: the gateway's warp filter at `{base}/_provider-ws`, which
//!   `virtual-llm-http`'s `routes` mounts beside the other routes: authentication
//!   before the upgrade, then the upgrade with explicit buffer sizes.
//! - `session`: one publisher's socket on the gateway: register first, then tasks,
//!   cancels, heartbeats and results; ping/pong; unbind on close.
//! - `client`: the publisher's [`WsWire`], a [`Wire`](virtual_llm_core::publisher::Wire)
//!   for the core's [`Publisher`](virtual_llm_core::Publisher).
//! - `confirm`: how the publisher learns that the gateway read its results (a ping
//!   after them, answered), so a resumable task is not kept longer than that.
//! - `config`: the socket settings both ends share (4 KiB read buffers, frame limits)
//!   and the header that turns on per-task flow control (`credit` frames).

mod client;
mod config;
mod confirm;
mod route;
mod session;

pub use client::WsWire;
pub use config::{
    CREDITS_HEADER, GATEWAY_WRITE_BUFFER, PUBLISHER_WRITE_BUFFER, READ_BUFFER,
    gateway_socket_config, socket_config,
};
pub use route::route;
