//! [`RedbOptions`]: how often coalesced heartbeats reach the disk, how many batches
//! share a commit, how much the engine caches, and whether an empty file may be taken
//! as a new registry.

use std::time::Duration;

/// Tuning of a [`RedbStore`](crate::RedbStore). The defaults suit a gateway.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_redb::RedbOptions;
///
/// let options = RedbOptions::default().flush_every(Duration::from_millis(500));
/// assert_eq!(options.flush_every, Duration::from_millis(500));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedbOptions {
    /// How often the background flusher writes coalesced heartbeats to disk
    /// (default 1 s). A crash loses at most this much liveness, which is small next to
    /// the 90 s stale timeout; lifecycle writes are never held back. Values under 1 ms
    /// count as 1 ms.
    pub flush_every: Duration,
    /// Heartbeats held in memory that wake the flusher before its timer (default
    /// 10 000): bounds the overlay's memory and the size of one flush.
    pub max_pending: usize,
    /// Most batches the writer commits in one write transaction (default 1024). A
    /// batch waits for no timer: the writer takes whatever queued while the previous
    /// commit ran, up to this many, so the limit only bounds one transaction's size
    /// and how long the first batch of a large group waits for the last to be
    /// applied. 1 commits every batch on its own. Values under 1 count as 1.
    pub max_group: usize,
    /// The engine's page cache in bytes (default 64 MiB; redb's own default is 1 GiB).
    pub cache_size: usize,
    /// Whether an existing registry file of zero bytes is taken as a new, empty
    /// registry (default `false`: it is refused as
    /// [`StoreError::Corrupted`](virtual_llm_core::StoreError::Corrupted)). An empty
    /// file is what a failed restore, a copy onto a full disk or a stray truncation
    /// leaves; taking it as new would make every name free for anyone to register, so
    /// only an operator who means it sets this. A file that does not exist is created
    /// either way.
    pub accept_empty_file: bool,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            flush_every: Duration::from_secs(1),
            max_pending: 10_000,
            max_group: 1024,
            cache_size: 64 << 20,
            accept_empty_file: false,
        }
    }
}

impl RedbOptions {
    /// Sets [`RedbOptions::flush_every`].
    pub fn flush_every(mut self, every: Duration) -> Self {
        self.flush_every = every;
        self
    }

    /// Sets [`RedbOptions::max_pending`].
    pub fn max_pending(mut self, max: usize) -> Self {
        self.max_pending = max;
        self
    }

    /// Sets [`RedbOptions::max_group`].
    pub fn max_group(mut self, max: usize) -> Self {
        self.max_group = max;
        self
    }

    /// Sets [`RedbOptions::cache_size`].
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }

    /// Sets [`RedbOptions::accept_empty_file`].
    pub fn accept_empty_file(mut self, accept: bool) -> Self {
        self.accept_empty_file = accept;
        self
    }
}
