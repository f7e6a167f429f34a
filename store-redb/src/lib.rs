#![doc = include_str!("../README.md")]
//!
//! # Layout
//! - [`store`](RedbStore): the [`Store`](virtual_llm_core::Store) implementation, its
//!   open and close, where each operation runs, and how reads see coalesced heartbeats.
//! - `shared`: the state the handle, the writer thread, the flusher and blocking
//!   operations share (the open file behind its lock, the overlay, the counters), and
//!   the heartbeat flush and close that must hold that lock.
//! - `writer`: the writer thread, which commits concurrent batches together in one
//!   write transaction (group commit).
//! - `schema`: the tables, [`SCHEMA_VERSION`], the version check on open, and the
//!   in-place upgrade of a version-1 or version-2 file.
//! - `tables`: row and index access inside one transaction; the only code that writes
//!   the tables, so the indexes move with the rows.
//! - `codec`: the stored form of a row and its JSON encoding.
//! - `liveness`: the in-memory overlay of heartbeats not yet on disk.
//! - `flusher`: the background task that writes the overlay to disk, and its drop guard.
//! - `integrity`: [`RedbStore::check_integrity`] and its [`IntegrityReport`].
//! - [`options`](RedbOptions): flush interval, overlay limit, group size, cache size.
//! - `testing` (tests only): helpers that hold the state as a flush does and inject
//!   I/O failures.
//! - `error`: the private error, mapped into
//!   [`StoreError`](virtual_llm_core::StoreError) by kind.

mod codec;
mod error;
mod flusher;
mod integrity;
mod liveness;
mod options;
mod schema;
mod shared;
mod store;
mod tables;
#[cfg(test)]
mod testing;
mod writer;

pub use integrity::IntegrityReport;
pub use options::RedbOptions;
pub use schema::SCHEMA_VERSION;
pub use store::{RedbStats, RedbStore};
