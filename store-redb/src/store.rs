//! [`RedbStore`]: the [`Store`] on a redb file.
//!
//! Every operation runs its redb transaction on tokio's blocking pool
//! ([`spawn_blocking`](tokio::task::spawn_blocking)), never on an async thread. A
//! batch is one write transaction: every expectation is checked against the committed
//! rows first, then everything is applied and committed (redb's default, immediate
//! durability), or nothing is. redb admits one write transaction at a time and holds
//! the file exclusively, so two batches expecting the same revision cannot both win.
//!
//! Heartbeats go to the in-memory [`Overlay`] and reach the disk in batches (see
//! `liveness` and `flusher`). The one subtle rule is how reads see both: the open
//! database sits behind a reader-writer lock. Reads, writes and touches hold it shared
//! (redb still runs reads and the single writer concurrently); a heartbeat flush holds
//! it exclusively while it commits and then forgets the heartbeats it wrote. So a read
//! finds every heartbeat either in its snapshot or in the overlay, never in neither.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase};
use tokio::sync::Notify;
use virtual_llm_core::store::check_batch;
use virtual_llm_core::{LlmName, LlmRecord, SessionId, Store, StoreError, Timestamp, Write};

use crate::codec::StoredRow;
use crate::error::Error;
use crate::flusher::{self, FlusherGuard};
use crate::integrity::{self, IntegrityReport};
use crate::liveness::{Overlay, Pending};
use crate::options::RedbOptions;
use crate::schema;
use crate::tables::{ReadTables, WriteTables};

/// Heartbeats written per flush transaction: a flush holds reads off while it
/// commits, so a large backlog is written in several short transactions.
const FLUSH_BATCH: usize = 4096;

/// A durable [`Store`] in one redb file.
///
/// Rows live in one table keyed by name, with indexes by session, by heartbeat (live
/// virtual rows) and by `inactive_since` (inactive rows); the stale and expired
/// queries scan an index and read only the rows they return. Heartbeats are coalesced
/// in memory and flushed every [`RedbOptions::flush_every`], on [`Store::flush`], and
/// on [`RedbStore::close`] or drop.
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
    inner: Arc<Inner>,
    /// Stops the background flusher when the store goes away.
    flusher: FlusherGuard,
}

/// The state shared by the store handle, its flusher and its blocking operations.
pub(crate) struct Inner {
    path: PathBuf,
    /// The open file; `None` once closed. Shared by reads, writes and touches;
    /// exclusive for a heartbeat flush, the integrity check and close.
    state: RwLock<Option<Database>>,
    /// Heartbeats not yet on disk.
    overlay: Mutex<Overlay>,
    /// Wakes the flusher before its timer when the overlay is full.
    pub(crate) wake: Notify,
    max_pending: usize,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    flushes: AtomicU64,
    heartbeats_flushed: AtomicU64,
}

/// What a [`RedbStore`] has done since it was opened; for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedbStats {
    /// Write transactions committed (batches, heartbeat flushes, schema creation).
    pub commits: u64,
    /// Heartbeat flushes that committed.
    pub flushes: u64,
    /// Row heartbeats those flushes wrote.
    pub heartbeats_flushed: u64,
    /// Heartbeats held in memory, waiting for the next flush.
    pub pending_heartbeats: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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

impl RedbStore {
    /// Opens the registry file at `path`, creating it (not its directory) if needed,
    /// with the default [`RedbOptions`].
    ///
    /// Fails with [`StoreError::Incompatible`] for a file of another schema version
    /// or a redb file that is not a registry, [`StoreError::Corrupted`] for a damaged
    /// one, and [`StoreError::Unavailable`] for I/O errors or a file another handle
    /// holds. A file left by a crash is recovered by redb on open.
    ///
    /// # Panics
    /// Outside a tokio runtime: the store runs on the blocking pool and owns a
    /// background flusher.
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
        let cache_size = options.cache_size;
        let (db, created) =
            match tokio::task::spawn_blocking(move || schema::open(&at, cache_size)).await {
                Ok(opened) => opened?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(Error::Cancelled.into()),
            };
        let inner = Arc::new(Inner {
            path,
            state: RwLock::new(Some(db)),
            overlay: Mutex::new(Overlay::default()),
            wake: Notify::new(),
            max_pending: options.max_pending.max(1),
            counters: Counters {
                commits: AtomicU64::new(u64::from(created)),
                ..Counters::default()
            },
        });
        let every = options.flush_every.max(Duration::from_millis(1));
        let flusher = flusher::spawn(inner.clone(), every);
        Ok(RedbStore { inner, flusher })
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
            flushes: c.flushes.load(Ordering::Relaxed),
            heartbeats_flushed: c.heartbeats_flushed.load(Ordering::Relaxed),
            pending_heartbeats: lock(&self.inner.overlay).len(),
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
            let mut state = i.state.write().unwrap_or_else(PoisonError::into_inner);
            let db = state.as_mut().ok_or(Error::Closed)?;
            integrity::check(db)
        })
        .await
    }

    /// Flushes coalesced heartbeats, stops the flusher and closes the file, so that it
    /// can be opened again (by this process or another). Later calls on this store
    /// fail with [`StoreError::Unavailable`]; closing twice is fine.
    ///
    /// If the flush fails the store stays open and the error is returned.
    pub async fn close(&self) -> Result<(), StoreError> {
        blocking(self.inner.clone(), Inner::close).await?;
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
        let name = name.clone();
        self.run(move |i| {
            i.snapshot(|t| Ok(i.with_liveness(t.row(name.as_str())?.into_iter().collect())))
        })
        .await
        .map(|mut rows| rows.pop())
    }

    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        self.run(|i| i.snapshot(|t| Ok(i.with_liveness(t.all()?))))
            .await
    }

    async fn by_session(&self, session: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        let session = session.clone();
        self.run(move |i| i.snapshot(|t| Ok(i.with_liveness(t.by_session(&session)?))))
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
        self.run(move |i| i.write(batch)).await
    }

    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        if names.is_empty() {
            return Ok(0);
        }
        let names = names.to_vec();
        self.run(move |i| i.touch(&names, at)).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.run(Inner::flush_pending).await
    }
}

impl Inner {
    fn shared(&self) -> RwLockReadGuard<'_, Option<Database>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on a read snapshot, holding the state shared (no flush meanwhile).
    fn snapshot<T>(&self, f: impl FnOnce(&ReadTables) -> Result<T, Error>) -> Result<T, Error> {
        let state = self.shared();
        let db = state.as_ref().ok_or(Error::Closed)?;
        let txn = db.begin_read()?;
        let tables = ReadTables::open(&txn)?;
        f(&tables)
    }

    /// The rows as the core sees them, with their in-memory heartbeats.
    fn with_liveness(&self, rows: Vec<StoredRow>) -> Vec<LlmRecord> {
        let overlay = lock(&self.overlay);
        rows.into_iter()
            .map(|row| {
                let beat = overlay.heartbeat(row.name().as_str(), row.stamp());
                let mut r = row.into_record();
                if let Some(at) = beat {
                    r.last_heartbeat_at = Some(at);
                }
                r
            })
            .collect()
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

    /// One batch, one write transaction: check every expectation, then apply.
    fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, Error> {
        let state = self.shared();
        let db = state.as_ref().ok_or(Error::Closed)?;
        let txn = db.begin_write()?;
        let outcome = {
            let mut tables = WriteTables::open(&txn)?;
            apply(&mut tables, batch)?
        };
        match outcome {
            Ok(written) => {
                txn.commit()?;
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                Ok(written)
            }
            Err(conflict) => {
                if let Err(e) = txn.abort() {
                    tracing::warn!(error = %e, "aborting a refused batch failed; nothing was committed");
                }
                Err(Error::Conflict(conflict))
            }
        }
    }

    /// Records a heartbeat for each named row that exists; no disk write.
    fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, Error> {
        let state = self.shared();
        let db = state.as_ref().ok_or(Error::Closed)?;
        let txn = db.begin_read()?;
        let tables = ReadTables::open(&txn)?;
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

    /// Writes every heartbeat held in memory to disk.
    pub(crate) fn flush_pending(&self) -> Result<(), Error> {
        let entries = lock(&self.overlay).entries();
        for chunk in entries.chunks(FLUSH_BATCH) {
            let state = self.state.write().unwrap_or_else(PoisonError::into_inner);
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

    /// Flushes and closes the file; the state is `None` afterwards.
    fn close(&self) -> Result<(), Error> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = state.as_ref() else {
            return Ok(());
        };
        let entries = lock(&self.overlay).entries();
        for chunk in entries.chunks(FLUSH_BATCH) {
            self.flush_chunk(db, chunk)?;
        }
        if let Some(db) = state.take() {
            db.close()?;
        }
        Ok(())
    }
}

impl Drop for Inner {
    /// The last resort when no runtime ran the flusher's final flush (it was shut
    /// down first): flush and close here.
    fn drop(&mut self) {
        let pending = !lock(&self.overlay).is_empty();
        let open = self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if open
            && pending
            && let Err(e) = self.close()
        {
            tracing::warn!(error = %e, path = %self.path.display(), "flushing heartbeats on drop failed");
        }
    }
}

/// Checks every expectation of `batch`, then applies it. `Ok(Err(name))` is a failed
/// expectation: nothing was changed and the caller aborts the transaction.
fn apply(
    tables: &mut WriteTables<'_>,
    batch: Vec<Write>,
) -> Result<Result<Vec<LlmRecord>, String>, Error> {
    let mut current = Vec::with_capacity(batch.len());
    for w in &batch {
        let row = tables.row(w.name().as_str())?;
        if !w.matches(row.as_ref().map(|r| (r.id(), r.revision()))) {
            return Ok(Err(w.name().to_string()));
        }
        current.push(row);
    }
    let stamp = tables.next_stamp()?;
    let mut written = Vec::with_capacity(batch.len());
    for (w, old) in batch.into_iter().zip(current) {
        match w {
            Write::Insert(mut r) | Write::Update(mut r) => {
                r.revision = old.as_ref().map_or(1, |o| o.revision() + 1);
                tables.put(old.as_ref(), &StoredRow::new(r.clone(), stamp))?;
                written.push(r);
            }
            Write::Delete { .. } => {
                if let Some(old) = &old {
                    tables.delete(old)?;
                }
            }
        }
    }
    Ok(Ok(written))
}
