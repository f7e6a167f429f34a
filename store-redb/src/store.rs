//! [`RedbStore`]: the [`Store`] on a redb file.
//!
//! Where each operation runs, and why:
//! - **Writes** go to one dedicated writer thread (`writer`), which commits every
//!   batch queued at the time in one write transaction (group commit, redb's default
//!   immediate durability): one `fdatasync` for many batches, and no pool of threads
//!   queued on redb's single writer. Each batch's expectations are checked against the
//!   rows as the batches before it left them, then it is applied; or it is refused and
//!   changes nothing. redb admits one write transaction at a time and holds the file
//!   exclusively, so two batches expecting the same revision cannot both win.
//! - **Point reads and touches** (`get`, `by_session`, `bound_to`, `by_pool`, `touch`)
//!   run their read transaction on the calling async thread when the state lock can be
//!   taken shared without waiting, and on tokio's blocking pool when it cannot (see
//!   `Inner::try_shared`): a `get` is on every relayed request, and the hop to the pool
//!   and back costs several times the read. `by_session`, `bound_to` and `by_pool` read
//!   an index range and only the rows it names.
//! - **Scans** (`list`, the stale and expired queries), heartbeat flushes, the
//!   integrity check, open and close run on tokio's blocking pool
//!   ([`spawn_blocking`](tokio::task::spawn_blocking)): they read many rows, or wait for
//!   the disk.
//!
//! Heartbeats go to the in-memory [`Overlay`](crate::liveness::Overlay) and reach the
//! disk in batches (see `liveness` and `flusher`). The one subtle rule is how reads see both: the open
//! database sits behind a reader-writer lock. Reads, touches and the writer thread hold
//! it shared (redb still runs reads and the single writer concurrently); a heartbeat
//! flush holds it exclusively while it commits and then forgets the heartbeats it
//! wrote. So a read finds every heartbeat either in its snapshot or in the overlay,
//! never in neither. That state, and the flush and close that hold its lock, are the
//! `shared` module's; this one is the handle and its operations.
//!
//! Under tokio's paused test clock, a write waiting for the writer thread does not hold
//! the clock back as a blocking-pool task does: with nothing else to run, the runtime
//! may advance to its next timer while a group commits.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase};
use virtual_llm_core::store::check_batch;
use virtual_llm_core::{
    LlmName, LlmRecord, ReplicaId, SessionId, Store, StoreError, Timestamp, Write,
};

use crate::codec::StoredRow;
use crate::error::Error;
use crate::flusher::{self, FlusherGuard};
use crate::integrity::{self, IntegrityReport};
use crate::liveness::Pending;
use crate::options::RedbOptions;
use crate::schema;
use crate::shared::{Inner, Reopen, blocking, lock, snapshot_of};
use crate::tables::ReadTables;
use crate::writer::{self, Writer};

/// Rows given their in-memory heartbeats per hold of the overlay lock: a read of the
/// whole registry must not hold up, for its whole length, a touch or an inline `get`
/// waiting for that lock on an async thread.
const OVERLAY_CHUNK: usize = 256;

/// A durable [`Store`] in one redb file.
///
/// Rows live in one table keyed by name, with indexes by session, by the replica of
/// their binding, by pool key (every row), by heartbeat (live virtual rows) and by
/// `inactive_since` (inactive rows); the stale and expired queries, `by_session`,
/// `bound_to` and `by_pool` scan an index and read only the rows they return. Heartbeats are coalesced in memory and flushed every
/// [`RedbOptions::flush_every`], on [`Store::flush`], and on [`RedbStore::close`] or
/// drop. Writes are committed by one writer thread, the
/// batches of concurrent callers together in one transaction (up to
/// [`RedbOptions::max_group`]); each caller still gets its own answer, and an `Ok` only
/// once its batch is durable.
///
/// The file is held exclusively: a second open of the same path, from this process or
/// another, fails with [`StoreError::Unavailable`] until the first is closed. Close it
/// with [`RedbStore::close`]; a store that is merely dropped flushes its heartbeats and
/// releases the file shortly after, from its background flusher (or at once, if the
/// runtime is gone).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use virtual_llm_core::Store;
/// use virtual_llm_redb::RedbStore;
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = RedbStore::open(dir.path().join("registry.redb")).await.unwrap();
/// assert!(store.list().await.unwrap().is_empty());
/// store.close().await.unwrap();
/// # });
/// ```
pub struct RedbStore {
    /// The state the writer thread, the flusher and blocking operations share.
    pub(crate) inner: Arc<Inner>,
    /// Where [`Store::write`] sends its batches; stopped by close, and dropped with
    /// the store, which ends the writer thread.
    writer: Writer,
    /// Stops the background flusher when the store goes away.
    flusher: FlusherGuard,
}

/// What a [`RedbStore`] has done since it was opened; for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedbStats {
    /// Write transactions committed, each one `fdatasync`: groups of batches, heartbeat
    /// flushes, and the schema's creation or upgrade on open. Concurrent batches share a transaction, so
    /// under load this grows much more slowly than [`RedbStats::batches`].
    pub commits: u64,
    /// Batches ([`Store::write`] calls) committed; a refused batch is not counted.
    pub batches: u64,
    /// Heartbeat flushes that committed.
    pub flushes: u64,
    /// Row heartbeats those flushes wrote.
    pub heartbeats_flushed: u64,
    /// Heartbeats held in memory, waiting for the next flush.
    pub pending_heartbeats: usize,
    /// Batches handed to the writer thread and not answered yet: the depth of the
    /// write queue.
    pub writes_waiting: usize,
    /// Times the file was reopened because a failed write (a full disk, an I/O
    /// error) had left redb refusing every later write on its handle.
    pub reopens: u64,
}

impl RedbStore {
    /// Opens the registry file at `path`, creating it (not its directory) if needed,
    /// with the default [`RedbOptions`].
    ///
    /// A file of schema version 1 (written before the replica index) or 2 (before the
    /// pool index) is upgraded to [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) in place,
    /// in one durable transaction, before this returns.
    ///
    /// Fails with [`StoreError::Incompatible`] for a file of another schema version
    /// or a redb file that is not a registry, [`StoreError::Corrupted`] for a damaged
    /// one, and [`StoreError::Unavailable`] for I/O errors or a file another handle
    /// holds. A file left by a crash is recovered by redb on open. An existing file of
    /// zero bytes is refused as [`StoreError::Corrupted`] unless
    /// [`RedbOptions::accept_empty_file`]; a file that does not exist is created.
    ///
    /// Every open verifies the whole file (redb's integrity check on open), so a file
    /// damaged outside redb is refused as [`StoreError::Corrupted`] rather than
    /// trusted. A failed write (a full disk) does not leave the store unwritable: the
    /// next write or flusher tick reopens the file, as a restart would, and goes on.
    ///
    /// # Panics
    /// Outside a tokio runtime: the store runs on the blocking pool and owns a
    /// background flusher. (The writer is a thread of its own, named `redb-writer`.)
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, RedbOptions::default()).await
    }

    /// [`RedbStore::open`] with explicit options.
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: RedbOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let at = path.clone();
        let (cache_size, accept_empty) = (options.cache_size, options.accept_empty_file);
        let (db, opened) = match tokio::task::spawn_blocking(move || {
            schema::open(&at, cache_size, schema::Mode::Start { accept_empty })
        })
        .await
        {
            Ok(opened) => opened?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(Error::Cancelled.into()),
        };
        // After a failed write: a file gone or emptied since is refused, never
        // replaced by a new registry, whatever the options said at start.
        let at = path.clone();
        let reopen: Reopen = Box::new(move || schema::open(&at, cache_size, schema::Mode::Reopen));
        Self::start(path, db, reopen, opened, &options)
    }

    /// The store around `db`, opened and schema-checked (`opened`: what that wrote),
    /// which `reopen` opens again after a failed write: starts its writer thread and
    /// its flusher.
    fn start(
        path: PathBuf,
        db: Database,
        reopen: Reopen,
        opened: schema::Opened,
        options: &RedbOptions,
    ) -> Result<Self, StoreError> {
        let (writer, requests) = writer::channel();
        let inner = Arc::new(Inner::new(
            path,
            db,
            reopen,
            options.max_pending,
            opened.commits(),
        ));
        writer::spawn(Arc::downgrade(&inner), requests, options.max_group)?;
        let every = options.flush_every.max(Duration::from_millis(1));
        let flusher = flusher::spawn(inner.clone(), every);
        Ok(RedbStore {
            inner,
            writer,
            flusher,
        })
    }

    /// A store on a fault-injecting backend, opened (and reopened after a failed
    /// write) as a file is.
    #[cfg(test)]
    pub(crate) fn on_backend(
        backend: &crate::testing::FailingBackend,
        options: &RedbOptions,
    ) -> Result<Self, StoreError> {
        let path = PathBuf::from("(test backend)");
        let cache_size = options.cache_size;
        let open = {
            let (backend, path) = (backend.clone(), path.clone());
            move || {
                let db = schema::builder(cache_size).create_with_backend(backend.clone())?;
                let opened = schema::check_or_init(&db, &path)?;
                Ok((db, opened))
            }
        };
        let (db, opened) = open()?;
        Self::start(path, db, Box::new(open), opened, options)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> RedbStats {
        let c = &self.inner.counters;
        RedbStats {
            commits: c.commits.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            heartbeats_flushed: c.heartbeats_flushed.load(Ordering::Relaxed),
            pending_heartbeats: lock(&self.inner.overlay).len(),
            writes_waiting: c.waiting.load(Ordering::Relaxed),
            reopens: c.reopens.load(Ordering::Relaxed),
        }
    }

    /// Checks the whole file: redb's page checksums, that every row decodes, and that
    /// every index holds exactly the entries its rows call for. Reads and writes wait
    /// while it runs (it reads everything: an operator's tool, not a health probe).
    ///
    /// Returns the findings; `Err` only when the check itself cannot run, or redb
    /// finds damage it cannot repair ([`StoreError::Corrupted`]).
    pub async fn check_integrity(&self) -> Result<IntegrityReport, StoreError> {
        blocking(self.inner.clone(), |i| {
            let mut state = i.exclusive();
            let db = state.db_mut()?;
            integrity::check(db)
        })
        .await
    }

    /// Flushes coalesced heartbeats, stops the flusher and the writer thread and closes
    /// the file, so that it can be opened again (by this process or another). A group
    /// of batches being committed completes first; batches still queued, and later
    /// calls on this store, fail with [`StoreError::Unavailable`]. Closing twice is
    /// fine.
    ///
    /// If the flush fails the store stays open and the error is returned.
    pub async fn close(&self) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        blocking(self.inner.clone(), move |i| i.close(move || writer.stop())).await?;
        self.flusher.stop();
        Ok(())
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    {
        blocking(self.inner.clone(), f).await
    }
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        let inner = &self.inner;
        if let Some(done) = inner.try_shared(|db| inner.get_in(db, name.as_str())) {
            return done.map_err(StoreError::from);
        }
        let name = name.clone();
        self.run(move |i| i.with_shared(|db| i.get_in(db, name.as_str())))
            .await
    }

    async fn get_ignoring_case(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        let folded = name.folded();
        self.run(move |i| {
            i.with_shared(|db| {
                let row = snapshot_of(db, |t| t.by_folded(&folded))?;
                Ok(i.with_liveness(row.into_iter().collect()).pop())
            })
        })
        .await
    }

    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        self.run(|i| i.snapshot(|t| Ok(i.with_liveness(t.all()?))))
            .await
    }

    async fn list_after(
        &self,
        after: Option<&LlmName>,
        limit: usize,
    ) -> Result<Vec<LlmRecord>, StoreError> {
        let after = after.map(|a| a.as_str().to_owned());
        self.run(move |i| i.snapshot(|t| Ok(i.with_liveness(t.page(after.as_deref(), limit)?))))
            .await
    }

    async fn by_session(&self, session: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        let inner = &self.inner;
        if let Some(done) = inner.try_shared(|db| inner.by_session_in(db, session)) {
            return done.map_err(StoreError::from);
        }
        let session = session.clone();
        self.run(move |i| i.with_shared(|db| i.by_session_in(db, &session)))
            .await
    }

    async fn bound_to(&self, replica: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
        let inner = &self.inner;
        if let Some(done) = inner.try_shared(|db| inner.bound_to_in(db, replica)) {
            return done.map_err(StoreError::from);
        }
        let replica = replica.clone();
        self.run(move |i| i.with_shared(|db| i.bound_to_in(db, &replica)))
            .await
    }

    async fn by_pool(&self, pool: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
        let inner = &self.inner;
        if let Some(done) = inner.try_shared(|db| inner.by_pool_in(db, pool)) {
            return done.map_err(StoreError::from);
        }
        let pool = pool.clone();
        self.run(move |i| i.with_shared(|db| i.by_pool_in(db, &pool)))
            .await
    }

    async fn stale_virtuals(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.run(move |i| i.stale(cutoff)).await
    }

    async fn expired_inactives(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.run(move |i| {
            i.snapshot(|t| Ok(i.with_liveness(t.inactive_before(cutoff.as_millis())?)))
        })
        .await
    }

    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
        check_batch(&batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.writer.write(&self.inner, batch).await
    }

    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        if names.is_empty() {
            return Ok(0);
        }
        let inner = &self.inner;
        if let Some(done) = inner.try_shared(|db| inner.touch_in(db, names, at)) {
            return done.map_err(StoreError::from);
        }
        let names = names.to_vec();
        self.run(move |i| i.with_shared(|db| i.touch_in(db, &names, at)))
            .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.run(Inner::flush_pending).await
    }
}

/// The store's reads and touches, on the state it shares (see `shared`).
impl Inner {
    /// The row named `name`; the state is held shared.
    fn get_in(&self, db: &Database, name: &str) -> Result<Option<LlmRecord>, Error> {
        let row = snapshot_of(db, |t| t.row(name))?;
        Ok(self.with_liveness(row.into_iter().collect()).pop())
    }

    /// The rows bound to `session`; the state is held shared.
    fn by_session_in(&self, db: &Database, session: &SessionId) -> Result<Vec<LlmRecord>, Error> {
        let rows = snapshot_of(db, |t| t.by_session(session))?;
        Ok(self.with_liveness(rows))
    }

    /// The rows whose binding names `replica`; the state is held shared.
    fn bound_to_in(&self, db: &Database, replica: &ReplicaId) -> Result<Vec<LlmRecord>, Error> {
        let rows = snapshot_of(db, |t| t.bound_to(replica))?;
        Ok(self.with_liveness(rows))
    }

    /// The rows whose pool key is `pool`; the state is held shared.
    fn by_pool_in(&self, db: &Database, pool: &LlmName) -> Result<Vec<LlmRecord>, Error> {
        let rows = snapshot_of(db, |t| t.by_pool(pool))?;
        Ok(self.with_liveness(rows))
    }

    /// The rows as the core sees them, with their in-memory heartbeats. The caller
    /// holds the state shared, so no flush can forget a heartbeat between two chunks;
    /// a touch landing between them only makes a later row fresher.
    fn with_liveness(&self, rows: Vec<StoredRow>) -> Vec<LlmRecord> {
        let mut out = Vec::with_capacity(rows.len());
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let overlay = lock(&self.overlay);
            for row in rows.by_ref().take(OVERLAY_CHUNK) {
                let beat = overlay.heartbeat(row.name().as_str(), row.stamp());
                let mut r = row.into_record();
                if let Some(at) = beat {
                    r.last_heartbeat_at = Some(at);
                }
                out.push(r);
            }
        }
        out
    }

    /// Live virtual rows whose heartbeat, in memory or on disk, is before `cutoff`.
    ///
    /// The live index yields candidates without reading rows; a candidate whose
    /// in-memory heartbeat is at or after the cutoff is dropped unread. The overlay's
    /// own time order adds the rare row whose in-memory heartbeat went back past the
    /// cutoff (a clock stepped back). Only rows that match are read.
    fn stale(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, Error> {
        self.snapshot(|t| {
            let hits = t.live_before(cutoff.as_millis())?;
            let (matching, extra) = {
                let overlay = lock(&self.overlay);
                let mut matching = Vec::with_capacity(hits.len());
                for hit in &hits {
                    let beat = overlay.heartbeat(&hit.name, hit.stamp);
                    let key = beat.unwrap_or(Timestamp::from_millis(hit.heartbeat_ms));
                    if key < cutoff {
                        matching.push((hit, beat));
                    }
                }
                let seen: HashSet<&str> = hits.iter().map(|h| h.name.as_str()).collect();
                let extra: Vec<(String, Pending)> = overlay
                    .before(cutoff)
                    .into_iter()
                    .filter(|(name, _)| !seen.contains(name.as_str()))
                    .collect();
                (matching, extra)
            };
            let mut out = Vec::with_capacity(matching.len() + extra.len());
            for (hit, beat) in matching {
                let row = t.indexed_row("live_by_heartbeat", &hit.name)?;
                if row.stamp() != hit.stamp {
                    return Err(Error::Corrupted(format!(
                        "live_by_heartbeat holds stamp {} for row {:?}, which has stamp {}",
                        hit.stamp,
                        hit.name,
                        row.stamp()
                    )));
                }
                let mut r = row.into_record();
                if let Some(at) = beat {
                    r.last_heartbeat_at = Some(at);
                }
                out.push(r);
            }
            for (name, pending) in extra {
                if let Some(row) = t.row(&name)?
                    && row.stamp() == pending.stamp
                    && row.live_key().is_some()
                {
                    let mut r = row.into_record();
                    r.last_heartbeat_at = Some(pending.at);
                    out.push(r);
                }
            }
            out.sort_by(|a, b| (a.live_since(), &a.name).cmp(&(b.live_since(), &b.name)));
            Ok(out)
        })
    }

    /// Records a heartbeat for each named row that exists; no disk write. The state is
    /// held shared.
    fn touch_in(&self, db: &Database, names: &[LlmName], at: Timestamp) -> Result<usize, Error> {
        let txn = db.begin_read()?;
        let tables = ReadTables::open(&txn);
        let mut found = Vec::with_capacity(names.len());
        for name in names {
            if let Some(row) = tables.row(name.as_str())? {
                found.push((name, row.stamp()));
            }
        }
        let pending = {
            let mut overlay = lock(&self.overlay);
            for (name, stamp) in &found {
                overlay.record(name.as_str(), *stamp, at);
            }
            overlay.len()
        };
        if pending >= self.max_pending {
            self.wake.notify_one();
        }
        Ok(found.len())
    }
}

#[cfg(test)]
mod tests {
    //! Where the short reads run: inline on the calling thread while the state is free,
    //! on the blocking pool while a flush (here, the test) holds it.

    use std::task::Poll;

    use virtual_llm_core::testkit::{at, record};

    use super::*;
    use crate::testing::{hold, poll_once};

    async fn store_with_row(dir: &tempfile::TempDir) -> (RedbStore, LlmRecord) {
        let store = RedbStore::open(dir.path().join("registry.redb"))
            .await
            .unwrap();
        let mut row = record("row");
        row.provider_session_id = Some(SessionId::generate());
        let row = store
            .write(vec![Write::Insert(row)])
            .await
            .unwrap()
            .remove(0);
        (store, row)
    }

    #[tokio::test]
    async fn short_reads_complete_inline_when_the_state_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_row(&dir).await;
        let session = row.provider_session_id.clone().unwrap();
        let names = [row.name.clone()];
        // Ready at the first poll: no hand-off to another thread.
        let touched = poll_once(&mut store.touch(&names, at(42))).await;
        assert!(matches!(touched, Poll::Ready(Ok(1))), "{touched:?}");
        let got = poll_once(&mut store.get(&row.name)).await;
        let Poll::Ready(Ok(Some(got))) = got else {
            panic!("get did not complete inline: {got:?}")
        };
        assert_eq!(
            got.last_heartbeat_at,
            Some(at(42)),
            "the overlay's heartbeat"
        );
        let bound = poll_once(&mut store.by_session(&session)).await;
        let Poll::Ready(Ok(bound)) = bound else {
            panic!("by_session did not complete inline: {bound:?}")
        };
        assert_eq!(bound, [got]);
        store.close().await.unwrap();
        let closed = poll_once(&mut store.get(&row.name)).await;
        assert!(
            matches!(closed, Poll::Ready(Err(StoreError::Unavailable { .. }))),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn short_reads_wait_on_the_blocking_pool_while_a_flush_holds_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_row(&dir).await;
        let session = row.provider_session_id.clone().unwrap();
        let names = [row.name.clone()];
        let held = hold(&store);
        // Pending, not blocking this (async) thread until the state is free.
        let mut touch = store.touch(&names, at(42));
        assert!(poll_once(&mut touch).await.is_pending());
        let mut get = store.get(&row.name);
        assert!(poll_once(&mut get).await.is_pending());
        let mut by_session = store.by_session(&session);
        assert!(poll_once(&mut by_session).await.is_pending());
        held.release();
        assert_eq!(touch.await.unwrap(), 1);
        // The get may have read before the touch's heartbeat was recorded; a new one
        // sees it.
        assert_eq!(get.await.unwrap().unwrap().name, row.name);
        assert_eq!(by_session.await.unwrap().len(), 1);
        let got = store.get(&row.name).await.unwrap().unwrap();
        assert_eq!(got.last_heartbeat_at, Some(at(42)));
        store.close().await.unwrap();
    }
}
