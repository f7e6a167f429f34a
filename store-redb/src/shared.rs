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
//! A failed write (a full disk, an I/O error) leaves redb's handle refusing every
//! later write ("Previous I/O error occurred. Please close and re-open the
//! database"), until it is closed and opened again; reads still work on it. So the
//! next write or flush that finds it so reopens the file here, under the lock held
//! exclusively: redb recovers it as after a crash (nothing of the failed transaction
//! is in it, every committed one is), and the write goes on on the new handle. If the
//! cause is still there and the reopen fails too, the state is [`State::Lost`]: reads
//! and writes answer `Unavailable` with the reason, and the next write or flusher tick
//! tries again. Before this, one full disk left the registry unwritable until a restart,
//! even once space was back (red-team finding F6).
//!
//! This module depends on no other part of the store that runs: the handle (`store`),
//! the writer thread (`writer`) and the flusher (`flusher`) depend on it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use redb::{Database, ReadableDatabase, WriteTransaction};
use tokio::sync::Notify;
use virtual_llm_core::StoreError;

use crate::error::Error;
use crate::liveness::{Overlay, Pending};
use crate::schema::Opened;
use crate::tables::{ReadTables, WriteTables};

/// Heartbeats written per flush transaction: a flush holds reads off while it
/// commits, so a large backlog is written in several short transactions.
const FLUSH_BATCH: usize = 4096;

/// Opens the store's file again, schema-checked, after a failed write.
pub(crate) type Reopen = Box<dyn Fn() -> Result<(Database, Opened), Error> + Send + Sync>;

/// The file behind the state's lock.
pub(crate) enum State {
    /// Open.
    Open(Database),
    /// A failed write poisoned the handle, it was dropped, and opening the file again
    /// failed with this error; the next write or flush tries again.
    Lost(Error),
    /// Closed by [`Inner::close`]; for good.
    Closed,
}

impl State {
    /// The open file, or why there is none.
    pub(crate) fn db(&self) -> Result<&Database, Error> {
        match self {
            State::Open(db) => Ok(db),
            State::Lost(e) => Err(e.clone()),
            State::Closed => Err(Error::Closed),
        }
    }

    /// The open file, mutably, or why there is none.
    pub(crate) fn db_mut(&mut self) -> Result<&mut Database, Error> {
        match self {
            State::Open(db) => Ok(db),
            State::Lost(e) => Err(e.clone()),
            State::Closed => Err(Error::Closed),
        }
    }
}

/// Whether `e` is redb refusing a handle after an earlier failed write.
fn poisoned(e: &redb::TransactionError) -> bool {
    matches!(
        e,
        redb::TransactionError::Storage(redb::StorageError::PreviousIo)
    )
}

/// The state shared by the store handle, its flusher, its writer thread and its
/// blocking operations.
pub(crate) struct Inner {
    /// The file, for messages and [`RedbStore::path`](crate::RedbStore::path).
    pub(crate) path: PathBuf,
    /// The file. Shared by reads, touches and the writer thread; exclusive for a
    /// heartbeat flush, the integrity check, a reopen and close.
    state: RwLock<State>,
    /// How to open the file again after a failed write.
    reopen: Reopen,
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
    pub(crate) reopens: AtomicU64,
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
    /// `reopen` opens the file again after a failed write.
    pub(crate) fn new(
        path: PathBuf,
        db: Database,
        reopen: Reopen,
        max_pending: usize,
        commits: u64,
    ) -> Self {
        Inner {
            path,
            state: RwLock::new(State::Open(db)),
            reopen,
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
    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, State> {
        virtual_llm_core::sync::write(&self.state)
    }

    /// The state, shared; waits while a flush, the integrity check or close holds it.
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, State> {
        virtual_llm_core::sync::read(&self.state)
    }

    /// Runs `op` on the open file with the state held shared, waiting for it if need
    /// be: for the blocking pool.
    pub(crate) fn with_shared<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let state = self.shared();
        op(state.db()?)
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
        Some(state.db().and_then(op))
    }

    /// The state held shared and a write transaction begun on its file, for the writer
    /// thread's group. If a failed write left the handle refusing writes, or a reopen
    /// failed before, the file is reopened first (with the state held exclusively,
    /// then shared again).
    pub(crate) fn begin_write(
        &self,
    ) -> Result<(RwLockReadGuard<'_, State>, WriteTransaction), Error> {
        {
            let state = self.shared();
            match &*state {
                State::Open(db) => match db.begin_write() {
                    Ok(txn) => return Ok((state, txn)),
                    Err(e) if !poisoned(&e) => return Err(e.into()),
                    Err(_) => {}
                },
                State::Lost(_) => {}
                State::Closed => return Err(Error::Closed),
            }
        }
        // Whoever takes the state exclusively first reopens; the others find it open.
        self.begin_write_locked(&mut self.exclusive())?.abort()?;
        let state = self.shared();
        let txn = state.db()?.begin_write()?;
        Ok((state, txn))
    }

    /// A write transaction on the file of `state`, held exclusively by the caller;
    /// reopens the file first if a failed write poisoned its handle, or a reopen
    /// failed before.
    fn begin_write_locked(&self, state: &mut State) -> Result<WriteTransaction, Error> {
        match state {
            State::Open(db) => match db.begin_write() {
                Ok(txn) => return Ok(txn),
                Err(e) if !poisoned(&e) => return Err(e.into()),
                Err(_) => {}
            },
            State::Lost(_) => {}
            State::Closed => return Err(Error::Closed),
        }
        self.reopen_locked(state)?;
        Ok(state.db()?.begin_write()?)
    }

    /// Drops the file's handle and opens the file again (redb recovers it as after a
    /// crash). On failure the state is [`State::Lost`] with the error.
    fn reopen_locked(&self, state: &mut State) -> Result<(), Error> {
        if let State::Open(db) = std::mem::replace(state, State::Closed) {
            // redb refuses this handle; closing it may fail as well, and releases the
            // file either way (it is dropped).
            if let Err(e) = db.close() {
                tracing::debug!(error = %e, "closing the registry's failed handle failed");
            }
        }
        match (self.reopen)() {
            Ok((db, opened)) => {
                *state = State::Open(db);
                let c = &self.counters;
                c.reopens.fetch_add(1, Ordering::Relaxed);
                c.commits.fetch_add(opened.commits(), Ordering::Relaxed);
                tracing::warn!(
                    path = %self.path.display(),
                    "a failed write had left the registry refusing writes; reopened the file, \
                     which redb recovered, and writing again"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    path = %self.path.display(),
                    "reopening the registry after a failed write failed; reads and writes \
                     are unavailable until the next write or heartbeat flush reopens it"
                );
                *state = State::Lost(e.clone());
                Err(e)
            }
        }
    }

    /// Runs `f` on a read snapshot, holding the state shared (no flush meanwhile).
    pub(crate) fn snapshot<T>(
        &self,
        f: impl FnOnce(&ReadTables<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.with_shared(|db| snapshot_of(db, f))
    }

    /// Writes every heartbeat held in memory to disk.
    ///
    /// If a reopen after a failed write failed ([`State::Lost`]), this tries it again
    /// even with nothing to flush: the flusher's tick is what brings reads back once
    /// the cause is gone, when no write comes to do it.
    pub(crate) fn flush_pending(&self) -> Result<(), Error> {
        if matches!(*self.shared(), State::Lost(_)) {
            let mut state = self.exclusive();
            if matches!(*state, State::Lost(_)) {
                self.reopen_locked(&mut state)?;
            }
        }
        let entries = lock(&self.overlay).entries();
        for chunk in entries.chunks(FLUSH_BATCH) {
            let mut state = self.exclusive();
            if matches!(*state, State::Closed) {
                // Closed: close flushed what there was.
                return Ok(());
            }
            let txn = self.begin_write_locked(&mut state)?;
            self.flush_chunk(txn, chunk)?;
        }
        Ok(())
    }

    /// Writes `chunk`'s heartbeats in `txn` (revisions and stamps unchanged), then
    /// forgets them. The caller holds the state exclusively.
    fn flush_chunk(&self, txn: WriteTransaction, chunk: &[(String, Pending)]) -> Result<(), Error> {
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
        match *state {
            State::Closed => return Ok(()),
            State::Lost(ref e) => {
                // No file to flush into: the heartbeats held in memory are lost (only
                // liveness; the next heartbeats restore it).
                tracing::warn!(error = %e, "closing a registry that could not be reopened; heartbeats not yet on disk are dropped");
                *state = State::Closed;
                closed();
                return Ok(());
            }
            State::Open(_) => {}
        }
        let entries = lock(&self.overlay).entries();
        for chunk in entries.chunks(FLUSH_BATCH) {
            let txn = self.begin_write_locked(&mut state)?;
            self.flush_chunk(txn, chunk)?;
        }
        if let State::Open(db) = std::mem::replace(&mut *state, State::Closed) {
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
        let open = matches!(*self.shared(), State::Open(_));
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
