#![doc = include_str!("../README.md")]
//!
//! # Layout
//! - [`store`](PgStore): the [`Store`](virtual_llm_core::Store) implementation, its
//!   connect, the compare-and-set transaction of a batch, retries, and the reads.
//! - `schema`: [`SCHEMA_VERSION`], the embedded migrations (`migrations/*.sql`) and
//!   their application on connect; a newer schema is refused.
//! - `codec`: a row's columns, the SQL that writes and reads them, and the change
//!   notification's payload.
//! - `heartbeats`: coalesced heartbeats, one `UPDATE` per flush on a connection of
//!   their own.
//! - `feed`: the change feed, `LISTEN`/`NOTIFY` as a hint, reconnected when lost.
//! - [`options`](PgOptions): pool size, timeouts, retries, tolerated clock skew.
//! - `error`: the private error, mapped into
//!   [`StoreError`](virtual_llm_core::StoreError) by kind.
//! - [`testing`] (feature `testing`): a throwaway PostgreSQL server for tests.

mod codec;
mod error;
mod feed;
mod heartbeats;
mod options;
mod schema;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use options::PgOptions;
pub use schema::SCHEMA_VERSION;
pub use store::{PgStats, PgStore};
