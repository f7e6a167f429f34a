#![doc = include_str!("../README.md")]
//!
//! # Layout
//! - [`plane`](NatsPlane): the link of one replica, its connection, its background
//!   tasks (announcements, frames and results held here, answers, probes,
//!   reconnects).
//! - `directory`: the [`ChannelDirectory`](virtual_llm_core::ChannelDirectory) on it.
//! - `router`: the [`TaskRouter`](virtual_llm_core::TaskRouter) on it.
//! - `wire`: the subjects, and what replicas say on them.
//! - `ack`: a taken task frame's answer, which its first result gives.
//! - `chunk`: messages over the server's `max_payload`, cut and put back together.
//! - [`options`](NatsOptions): prefix, timeouts, probe interval, queue bounds.
//! - [`error`](NatsError): why a replica could not join.
//! - [`testing`] (feature `testing`): a throwaway `nats-server` for tests.

mod ack;
mod chunk;
mod directory;
mod error;
mod options;
mod plane;
mod router;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;

pub use error::NatsError;
pub use options::NatsOptions;
pub use plane::NatsPlane;
