//! The state a store shares with its writer thread, its flusher and its blocking
//! operations: [`Inner`], the open file behind its reader-writer lock, the overlay of
//! heartbeats not yet on disk, and the counters; with the two helpers every one of
//! them uses ([`lock`], [`blocking`]).
//!
//! The lock is the one subtle rule (see the `store` module): reads, touches and the
//! writer thread hold it shared; a heartbeat flush, the integrity check and close hold
//! it exclusively. A flush commits and then forgets the heartbeats it wrote while it
//! holds the lock, so a read finds every heartbeat either in its snapshot or in the
//! overlay, never in neither. That is why flushing and closing live here, beside the
//! lock, and not in the modules that call them.
//!
//! This module depends on no other part of the store that runs: the handle (`store`),
//! the writer thread (`writer`) and the flusher (`flusher`) depend on it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use redb::{Database, ReadableDatabase};
use tokio::sync::Notify;
use virtual_llm_core::StoreError;

use crate::error::Error;
use crate::liveness::{Overlay, Pending};
use crate::tables::{ReadTables, WriteTables};

/// Heartbeats written per flush transaction: a flush holds reads off while it
/// commits, so a large backlog is written in several short transactions.
const FLUSH_BATCH: usize = 4096;

/// The state shared by the store handle, its flusher, its writer thread and its
/// blocking operations.
pub(crate) struct Inner {
    /// The file, for messages and [`RedbStore::path`](crate::RedbStore::path).
    pub(crate) path: PathBuf,
    /// The open file; `None` once closed. Shared by reads, touches and the writer
    /// thread; exclusive for a heartbeat flush, the integrity check and close.
    state: RwLock<Option<Database>>,
    /// Heartbeats not yet on disk.
    pub(crate) overlay: Mutex<Overlay>,
    /// Wakes the flusher before its timer when the overlay is full.
    pub(crate) wake: Notify,
    /// Heartbeats held in memory that wake the flusher.
    pub(crate) max_pending: usize,
    pub(crate) counters: Counters,
}

/// What the store has done, for [`RedbStats`](crate::RedbStats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) heartbeats_flushed: AtomicU64,
    pub(crate) waiting: AtomicUsize,
}

/// Locks `m`; a panic elsewhere while it was held does not make it unusable (what it
/// guards is always left consistent between two statements). The core's one helper.
pub(crate) use virtual_llm_core::sync::lock;

/// Runs `f` on tokio's blocking pool. A panic inside is resumed in the caller; a task
/// cancelled by a runtime shutdown is `Unavailable`.
pub(crate) async fn blocking<T, F>(inner: Arc<Inner>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&inner)).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::Cancelled.into()),
    }
}

impl Inner {
    /// The state around `db`, opened and schema-checked; `commits` counts the
    /// transactions already committed on it (the schema's creation).
    pub(crate) fn new(path: PathBuf, db: Database, max_pending: usize, commits: u64) -> Self {
        Inner {
            path,
            state: RwLock::new(Some(db)),
            overlay: Mutex::new(Overlay::default()),
            wake: Notify::new(),
            max_pending: max_pending.max(1),
            counters: Counters {
                commits: AtomicU64::new(commits),
                ..Counters::default()
            },
        }
    }

    /// The state, exclusively: the writer thread and every read wait meanwhile. For
    /// the integrity check, and for tests that make batches queue up.
    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, Option<Database>> {
        virtual_llm_core::sync::write(&self.state)
    }

    /// The state, shared; waits while a flush, the integrity check or close holds it.
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, Option<Database>> {
        virtual_llm_core::sync::read(&self.state)
    }

    /// Runs `op` on the open file with the state held shared, waiting for it if need
    /// be: for the blocking pool.
    pub(crate) fn with_shared<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let state = self.shared();
        op(state.as_ref().ok_or(Error::Closed)?)
    }

    /// Runs `op` on the open file with the state held shared, if it can be taken
    /// without waiting; `None` if it is held, or wanted, exclusively.
    ///
    /// This is how the short reads run on an async thread. A `get` is on every relayed
    /// request, and a hop to the blocking pool and back (two thread wake-ups, often
    /// across CPUs) costs many times the read itself: in the crate's benchmark on a
    /// 2-vCPU VM, 31 µs through the pool against 1.5 µs inline. The read cannot wait
    /// on the disk: a redb read transaction never waits for the writer (MVCC: it reads
    /// the last committed snapshot, and a commit holds no lock a reader takes while it
    /// syncs), and the registry's pages stay in redb's cache, so it is a few µs of CPU,
    /// at worst a page read from the OS cache. The one thing that could make it wait is
    /// this lock, held exclusively across a heartbeat flush's commit (an `fdatasync`)
    /// or an integrity check: then `None`, and the caller goes to the blocking pool
    /// rather than block an async worker. (On Linux, std's lock also refuses a new
    /// reader while a flush waits for it, so reads do not starve flushes.) The
    /// overlay's mutex is only ever held for bounded work in memory.
    pub(crate) fn try_shared<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, Error>,
    ) -> Option<Result<T, Error>> {
        let state = match self.state.try_read() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(state.as_ref().ok_or(Error::Closed).and_then(op))
    }

    /// Runs `f` on a read snapshot, holding the state shared (no flush meanwhile).
    pub(crate) fn snapshot<T>(
        &self,
        f: impl FnOnce(&ReadTables<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.with_shared(|db| snapshot_of(db, f))
    }

    /// Writes every heartbeat held in memory to disk.
    pub(crate) fn flush_pending(&self) -> Result<(), Error> {
        let entries = lock(&self.overlay).entries();
        for chunk in entries.chunks(FLUSH_BATCH) {
            let state = self.exclusive();
            let Some(db) = state.as_ref() else {
                // Closed: close flushed what there was.
                return Ok(());
            };
            self.flush_chunk(db, chunk)?;
        }
        Ok(())
    }

    /// Writes `chunk`'s heartbeats in one transaction (revisions and stamps unchanged),
    /// then forgets them. The caller holds the state exclusively.
    fn flush_chunk(&self, db: &Database, chunk: &[(String, Pending)]) -> Result<(), Error> {
        let txn = db.begin_write()?;
        let mut written = 0u64;
        {
            let mut tables = WriteTables::open(&txn)?;
            for (name, pending) in chunk {
                let Some(row) = tables.row(name)? else {
                    continue; // deleted since: the heartbeat goes with it
                };
                if row.stamp() != pending.stamp || row.heartbeat() == Some(pending.at) {
                    continue; // replaced by a write since, or already on disk
                }
                let mut beat = row.clone();
                beat.set_heartbeat(pending.at);
                tables.put(Some(&row), &beat)?;
                written += 1;
            }
        }
        if written > 0 {
            txn.commit()?;
            let c = &self.counters;
            c.commits.fetch_add(1, Ordering::Relaxed);
            c.flushes.fetch_add(1, Ordering::Relaxed);
            c.heartbeats_flushed.fetch_add(written, Ordering::Relaxed);
        } else {
            txn.abort()?;
        }
        let mut overlay = lock(&self.overlay);
        for (name, pending) in chunk {
            overlay.remove_if(name, *pending);
        }
        Ok(())
    }

    /// Flushes and closes the file; the state is `None` afterwards. `closed` runs as
    /// soon as the state is `None`, still under the lock (the store stops its writer
    /// thread there). The writer's group in progress, if any, commits first: it holds
    /// the state shared. If the flush fails, the file stays open and `closed` does not
    /// run.
    pub(crate) fn close(&self, closed: impl FnOnce()) -> Result<(), Error> {
        let mut state = self.exclusive();
        let Some(db) = state.as_ref() else {
            return Ok(());
        };
        let entries = lock(&self.overlay).entries();
        for chunk in entries.chunks(FLUSH_BATCH) {
            self.flush_chunk(db, chunk)?;
        }
        if let Some(db) = state.take() {
            // Closed from here on, even if redb fails to close the file cleanly: batches
            // queued meanwhile find the state closed and are refused.
            closed();
            db.close()?;
        }
        Ok(())
    }
}

impl Drop for Inner {
    /// The last resort when no runtime ran the flusher's final flush (it was shut
    /// down first): flush and close here. The store handle, and with it the writer
    /// thread's channel, is gone by now.
    fn drop(&mut self) {
        let pending = !lock(&self.overlay).is_empty();
        let open = self.shared().is_some();
        if open
            && pending
            && let Err(e) = self.close(|| {})
        {
            tracing::warn!(error = %e, path = %self.path.display(), "flushing heartbeats on drop failed");
        }
    }
}

/// Runs `f` on a read snapshot of `db`.
pub(crate) fn snapshot_of<T>(
    db: &Database,
    f: impl FnOnce(&ReadTables<'_>) -> Result<T, Error>,
) -> Result<T, Error> {
    let txn = db.begin_read()?;
    let tables = ReadTables::open(&txn);
    f(&tables)
}
