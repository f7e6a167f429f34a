//! The writer thread: one dedicated thread commits every
//! [`Store::write`](virtual_llm_core::Store::write) batch, many batches to a redb write
//! transaction (group commit).
//!
//! Why one thread: redb admits one write transaction at a time, and each durable
//! commit pays an `fdatasync`. With a blocking-pool task per batch, a burst of
//! publishers registering at once grew tokio's blocking pool to some 180 threads, all
//! queued on redb's writer lock, each batch still paying its own `fdatasync`, and the
//! gateway spent 41 % of its CPU scheduling those threads. Here a caller sends its
//! batch down a channel and awaits the answer on a oneshot: no thread per write, one
//! `fdatasync` per group.
//!
//! Why no timer: the thread blocks for a batch; once it holds the write transaction it
//! takes every batch queued meanwhile, up to
//! [`RedbOptions::max_group`](crate::RedbOptions::max_group). A lone batch is committed
//! at once, and under load the groups grow by themselves: they are the batches that
//! queued while the previous group committed.
//!
//! A group is applied in queue order, each batch by [`apply`], which checks all of the
//! batch's expectations before it writes anything: a refused batch changes nothing and
//! gets its own `Conflict` while the others go on, and a later batch sees the earlier
//! ones' writes, exactly as if each had been committed alone in that order. The group
//! commits once, and only then is each caller answered, so an `Ok` is durable. An engine
//! error anywhere (applying any batch, or the commit) aborts the transaction, and every
//! batch of the group gets that error: nothing of the group was written; it is logged
//! as a warning. The next group reopens the file if the failure left redb refusing
//! writes on its handle (see `shared`), so a full disk fails the writes made while it
//! is full, not every later one. A group that finds the store closed (it queued while `close` ran) is
//! refused with the closed error, as a batch sent after `close` is, and logged only at
//! debug level: a clean shutdown is not a failure.
//!
//! The thread holds the state shared for the whole group, so a heartbeat flush, the
//! integrity check or `close` never runs in the middle of one (nor needs to: redb
//! would make it wait for the write transaction anyway). It holds the store weakly, so
//! that the store is not kept alive by its own writer, and it ends when the channel
//! closes: on `close`, or when the store handle, which holds the [`Writer`], is
//! dropped.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Weak};
use std::thread;

use redb::WriteTransaction;
use tokio::sync::oneshot;
use virtual_llm_core::{LlmRecord, StoreError, Write};

use crate::codec::StoredRow;
use crate::error::Error;
use crate::shared::{Inner, lock};
use crate::tables::WriteTables;

/// One batch for the writer, and where its answer goes.
pub(crate) struct Request {
    batch: Vec<Write>,
    reply: oneshot::Sender<Reply>,
}

/// The writer's answer to one batch.
enum Reply {
    /// The rows written, or why the batch was not: its own `Conflict`, or the error
    /// that failed its whole group.
    Done(Result<Vec<LlmRecord>, Error>),
    /// Applying the batch's group panicked (a bug) and its transaction was rolled back.
    /// The caller panics in turn, as it did when each batch ran on the blocking pool;
    /// the writer itself goes on with the next group.
    Panicked(String),
}

/// The outcome of each batch of a group, in queue order, or the error that failed
/// the whole group.
type GroupOutcome = Result<Vec<Result<Vec<LlmRecord>, Error>>, Error>;

/// The store's end of the channel to the writer thread. Clones share it: stopping
/// one stops them all.
#[derive(Clone)]
pub(crate) struct Writer {
    /// `None` once the store is closed: the thread ends when this, the only sender,
    /// is dropped, after answering what is already queued.
    requests: Arc<Mutex<Option<Sender<Request>>>>,
}

/// A writer and the receiving end for [`spawn`]: the store is built around the
/// writer before the thread, which holds the store, can start.
pub(crate) fn channel() -> (Writer, Receiver<Request>) {
    let (tx, rx) = mpsc::channel();
    let writer = Writer {
        requests: Arc::new(Mutex::new(Some(tx))),
    };
    (writer, rx)
}

/// Starts the writer thread for `store`, taking batches from `requests`, at most
/// `max_group` to a transaction (values under 1 count as 1).
pub(crate) fn spawn(
    store: Weak<Inner>,
    requests: Receiver<Request>,
    max_group: usize,
) -> Result<(), Error> {
    let max_group = max_group.max(1);
    std::thread::Builder::new()
        .name("redb-writer".to_owned())
        .spawn(move || run(&store, &requests, max_group))
        // Detached: it ends by itself once the channel closes, and nothing waits for
        // it (the file is released by close or by the store's drop, not by the thread).
        .map(drop)
        .map_err(|e| Error::unavailable("starting the redb writer thread", e))
}

impl Writer {
    /// Stops taking batches. Those already queued are still answered (with
    /// `Unavailable`: the file is closed by then).
    pub(crate) fn stop(&self) {
        lock(&self.requests).take();
    }

    fn send(&self, request: Request) -> Result<(), Error> {
        let requests = lock(&self.requests);
        let Some(requests) = requests.as_ref() else {
            return Err(Error::Closed);
        };
        // The thread ends only once this sender is dropped, unless it died.
        requests.send(request).map_err(|_| Error::WriterStopped)
    }

    /// Hands `batch` to the writer thread of `inner` and waits for its answer.
    ///
    /// If the caller stops waiting, the batch may still be committed: it was queued.
    pub(crate) async fn write(
        &self,
        inner: &Inner,
        batch: Vec<Write>,
    ) -> Result<Vec<LlmRecord>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let waiting = &inner.counters.waiting;
        waiting.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.send(Request { batch, reply }) {
            waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(e.into());
        }
        match answer.await {
            Ok(Reply::Done(result)) => result.map_err(StoreError::from),
            Ok(Reply::Panicked(message)) => panic::resume_unwind(Box::new(message)),
            Err(_) => Err(Error::WriterStopped.into()),
        }
    }
}

/// The thread: one group per turn, until the channel closes.
fn run(store: &Weak<Inner>, requests: &Receiver<Request>, max_group: usize) {
    while let Ok(first) = requests.recv() {
        let Some(inner) = store.upgrade() else {
            // The store is gone, and with it whoever queued this: nothing to answer.
            return;
        };
        let mut replies = Vec::new();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            commit_group(&inner, first, requests, max_group, &mut replies)
        }));
        // Before the answers: a caller that has its answer is no longer counted.
        let waiting = &inner.counters.waiting;
        waiting.fetch_sub(replies.len(), Ordering::Relaxed);
        // And the store is let go of before the answers too: a caller that drops the
        // store once its write has returned must not find this thread still holding it
        // (the file would be released a moment later, here, rather than by the drop).
        // If the handle is gone already, this is the last reference, and the state is
        // closed and dropped here.
        drop(inner);
        answer(outcome, replies);
    }
}

/// Sends each batch of a group its answer, and logs what failed the group.
fn answer(outcome: thread::Result<GroupOutcome>, replies: Vec<oneshot::Sender<Reply>>) {
    let batches = replies.len();
    match outcome {
        Ok(Ok(outcomes)) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // A caller that stopped waiting has dropped its receiver: fine.
                let _ = reply.send(Reply::Done(outcome));
            }
        }
        Ok(Err(e)) => {
            if matches!(e, Error::Closed) {
                // Not a failure: the store was closed while these waited (a clean
                // shutdown with requests still arriving). Each caller gets the closed
                // error, as a batch sent after close does.
                tracing::debug!(error = %e, batches, "the store was closed before a group was committed; its batches are refused");
            } else {
                tracing::warn!(error = %e, batches, "a group commit failed; none of its batches was written");
            }
            for reply in replies {
                let _ = reply.send(Reply::Done(Err(e.clone())));
            }
        }
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            tracing::error!(%message, batches, "applying a group of batches panicked; none of them was written");
            for reply in replies {
                let _ = reply.send(Reply::Panicked(message.clone()));
            }
        }
    }
}

/// Takes the state shared, begins one write transaction, adds every batch queued by
/// then (up to `max_group` in all), applies them in order and commits once. Each
/// batch's reply sender is pushed onto `replies`, in order, as the batch is taken, so
/// the caller can answer every one whatever happens here.
fn commit_group(
    inner: &Inner,
    first: Request,
    queued: &Receiver<Request>,
    max_group: usize,
    replies: &mut Vec<oneshot::Sender<Reply>>,
) -> GroupOutcome {
    let mut batches = Vec::new();
    replies.push(first.reply);
    batches.push(first.batch);
    // Held shared for the whole group (no flush or close in the middle of it). If a
    // failed write left the handle refusing writes, this reopens the file first.
    let (_state, txn) = match inner.begin_write() {
        Ok(begun) => begun,
        Err(e) => {
            // Closed, or the file cannot be written now: refuse everything queued in
            // one go (a reopen is tried once per group, not once per batch).
            drain(queued, max_group, &mut batches, replies);
            return Err(e);
        }
    };
    // Taken only now, with the transaction open: what queued while the previous group
    // committed, or while this thread waited for the state behind a heartbeat flush,
    // joins this group.
    drain(queued, max_group, &mut batches, replies);
    let outcomes = match apply_all(&txn, batches) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            if let Err(abort) = txn.abort() {
                tracing::warn!(error = %abort, "aborting a failed group failed; nothing was committed");
            }
            return Err(e);
        }
    };
    let written = outcomes.iter().filter(|o| o.is_ok()).count();
    if written == 0 {
        // Every batch refused: nothing to make durable, no fsync.
        if let Err(e) = txn.abort() {
            tracing::warn!(error = %e, "aborting a refused group failed; nothing was committed");
        }
        return Ok(outcomes);
    }
    txn.commit()?;
    let c = &inner.counters;
    c.commits.fetch_add(1, Ordering::Relaxed);
    c.batches.fetch_add(written as u64, Ordering::Relaxed);
    Ok(outcomes)
}

/// Moves queued requests into the group until it holds `max_group` batches or the
/// queue is empty.
fn drain(
    queued: &Receiver<Request>,
    max_group: usize,
    batches: &mut Vec<Vec<Write>>,
    replies: &mut Vec<oneshot::Sender<Reply>>,
) {
    while batches.len() < max_group {
        match queued.try_recv() {
            Ok(request) => {
                replies.push(request.reply);
                batches.push(request.batch);
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
        }
    }
}

/// Applies each batch in order in `txn`; a refused batch is its own `Conflict`.
fn apply_all(
    txn: &WriteTransaction,
    batches: Vec<Vec<Write>>,
) -> Result<Vec<Result<Vec<LlmRecord>, Error>>, Error> {
    let mut tables = WriteTables::open(txn)?;
    let mut outcomes = Vec::with_capacity(batches.len());
    for batch in batches {
        outcomes.push(apply(&mut tables, batch)?.map_err(Error::Conflict));
    }
    Ok(outcomes)
}

/// Checks every expectation of `batch`, then applies it. `Ok(Err(name))` is a failed
/// expectation: nothing was changed, so the group goes on without this batch.
fn apply(
    tables: &mut WriteTables<'_>,
    batch: Vec<Write>,
) -> Result<Result<Vec<LlmRecord>, String>, Error> {
    let mut current = Vec::with_capacity(batch.len());
    let mut inserted = std::collections::HashSet::new();
    for w in &batch {
        let row = tables.row(w.name().as_str())?;
        // An insert also needs its folded name free, in the file and in the batch.
        let lookalike = matches!(w, Write::Insert(_)) && {
            let folded = w.name().folded();
            tables.folded_taken(&folded)? || !inserted.insert(folded)
        };
        if lookalike || !w.matches(row.as_ref().map(|r| (r.id(), r.revision()))) {
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

/// The message of a panic, for the log and for the callers that panic in turn.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    //! Group commit, made deterministic: the state is held exclusively (as a heartbeat
    //! flush holds it) while batches are queued, so the writer thread waits and every
    //! batch queues before the first group is formed.

    use std::sync::atomic::Ordering;

    use virtual_llm_core::testkit::record;
    use virtual_llm_core::{LlmName, LlmRecord, Store, StoreError, Timestamp, Write};

    use crate::error::Error;
    use crate::testing::{FailingBackend, INJECTED, Logged, hold, logged, poll_once};
    use crate::{RedbOptions, RedbStore};

    fn insert(name: &str) -> Write {
        Write::Insert(record(name))
    }

    fn update(row: &LlmRecord, model: &str) -> Write {
        let mut r = row.clone();
        r.model = model.to_owned();
        Write::Update(r)
    }

    async fn names(store: &RedbStore) -> Vec<String> {
        let rows = store.list().await.unwrap();
        rows.into_iter().map(|r| r.name.to_string()).collect()
    }

    /// The whole chain of an error, for matching on redb's message.
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(e) = next {
            out = format!("{out}: {e}");
            next = e.source();
        }
        out
    }

    /// Whether `l` is the writer's, at `level`.
    fn is_writer(l: &Logged, level: tracing::Level) -> bool {
        l.level == level && l.target == "virtual_llm_redb::writer"
    }

    async fn open(dir: &tempfile::TempDir, options: RedbOptions) -> RedbStore {
        RedbStore::open_with(dir.path().join("registry.redb"), options)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn batches_queued_while_the_writer_waits_commit_in_one_transaction() {
        const BATCHES: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, RedbOptions::default()).await;
        let before = store.stats();
        let held = hold(&store);
        let mut writes: Vec<_> = (0..BATCHES)
            .map(|i| store.write(vec![insert(&format!("row-{i:03}"))]))
            .collect();
        for w in &mut writes {
            assert!(poll_once(w).await.is_pending(), "the writer is held");
        }
        assert_eq!(store.stats().writes_waiting, BATCHES, "all queued");
        held.release();
        for w in writes {
            assert_eq!(w.await.unwrap()[0].revision, 1);
        }
        let after = store.stats();
        assert_eq!(
            after.commits - before.commits,
            1,
            "one transaction, one fsync"
        );
        assert_eq!(after.batches - before.batches, BATCHES as u64);
        assert_eq!(after.writes_waiting, 0);
        assert_eq!(names(&store).await.len(), BATCHES);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_group_applies_its_batches_in_order_and_refuses_each_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, RedbOptions::default()).await;
        let x = store.write(vec![insert("x")]).await.unwrap().remove(0);
        let mut x2 = x.clone();
        x2.revision = 2; // what the first batch below will have made of x
        let y = record("y");
        let before = store.stats();
        let held = hold(&store);
        let mut writes = vec![
            // Wins: x is at revision 1.
            store.write(vec![update(&x, "first")]),
            // Refused: the batch before moved x to revision 2.
            store.write(vec![update(&x, "second")]),
            // Unrelated: goes through.
            store.write(vec![Write::Insert(y.clone())]),
            // Refused as a whole: z is not inserted because the update of x fails.
            store.write(vec![insert("z"), update(&x, "third")]),
            // Sees the first batch's write: x at revision 2.
            store.write(vec![update(&x2, "fourth")]),
            // Sees the third batch's insert.
            store.write(vec![Write::Delete {
                name: y.name.clone(),
                id: y.id.clone(),
                revision: 1,
            }]),
        ];
        for w in &mut writes {
            assert!(poll_once(w).await.is_pending());
        }
        held.release();
        let mut outcomes = Vec::new();
        for w in writes {
            outcomes.push(w.await);
        }
        let conflict = |o: &Result<Vec<LlmRecord>, StoreError>| match o {
            Err(StoreError::Conflict { name }) => Some(name.clone()),
            _ => None,
        };
        assert_eq!(outcomes[0].as_ref().unwrap()[0].revision, 2);
        assert_eq!(conflict(&outcomes[1]).as_deref(), Some("x"));
        assert_eq!(outcomes[2].as_ref().unwrap()[0].revision, 1);
        assert_eq!(conflict(&outcomes[3]).as_deref(), Some("x"));
        let fourth = &outcomes[4].as_ref().unwrap()[0];
        assert_eq!((fourth.revision, fourth.model.as_str()), (3, "fourth"));
        assert!(
            outcomes[5].as_ref().unwrap().is_empty(),
            "a delete returns no row"
        );

        let after = store.stats();
        assert_eq!(after.commits - before.commits, 1, "one group");
        assert_eq!(
            after.batches - before.batches,
            4,
            "refused batches do not count"
        );
        assert_eq!(names(&store).await, ["x"], "z never written, y deleted");
        let x = store.get(&LlmName::parse("x").unwrap()).await.unwrap();
        assert_eq!(x.map(|x| (x.revision, x.model)), Some((3, "fourth".into())));
        assert!(store.check_integrity().await.unwrap().is_ok());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_group_refused_as_a_whole_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, RedbOptions::default()).await;
        store.write(vec![insert("x")]).await.unwrap();
        let before = store.stats();
        let held = hold(&store);
        let mut writes = vec![
            store.write(vec![insert("x")]),
            store.write(vec![insert("y"), insert("x")]),
        ];
        for w in &mut writes {
            assert!(poll_once(w).await.is_pending());
        }
        held.release();
        for w in writes {
            assert!(matches!(w.await, Err(StoreError::Conflict { name }) if name == "x"));
        }
        let after = store.stats();
        assert_eq!(after.commits, before.commits, "nothing to make durable");
        assert_eq!(after.batches, before.batches);
        assert_eq!(names(&store).await, ["x"]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn max_group_bounds_the_batches_of_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, RedbOptions::default().max_group(8)).await;
        let before = store.stats();
        let held = hold(&store);
        let mut writes: Vec<_> = (0..20)
            .map(|i| store.write(vec![insert(&format!("row-{i:02}"))]))
            .collect();
        for w in &mut writes {
            assert!(poll_once(w).await.is_pending());
        }
        held.release();
        for w in writes {
            w.await.unwrap();
        }
        let after = store.stats();
        assert_eq!(after.commits - before.commits, 3, "8, 8, then 4");
        assert_eq!(after.batches - before.batches, 20);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn batches_that_find_the_store_closed_are_refused_as_closed_without_a_warning() {
        logged(); // records from here on
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, RedbOptions::default()).await;
        store.write(vec![insert("before")]).await.unwrap();
        let held = hold(&store);
        // Queued while close holds the state, as writes arriving during a clean
        // shutdown are; the writer thread takes them and waits for the state.
        let mut writes: Vec<_> = (0..3)
            .map(|i| store.write(vec![insert(&format!("late-{i}"))]))
            .collect();
        for w in &mut writes {
            assert!(poll_once(w).await.is_pending());
        }
        held.close_and_release();
        let closed = Error::Closed.to_string();
        for w in writes {
            let err = w.await.expect_err("closed");
            assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
            assert!(chain(&err).ends_with(&closed), "{}", chain(&err));
        }
        let logs = logged();
        let about_closed = |level| {
            logs.iter()
                .any(|l| is_writer(l, level) && l.fields.contains(&closed))
        };
        assert!(
            !about_closed(tracing::Level::WARN),
            "a refusal, not a failure"
        );
        assert!(
            about_closed(tracing::Level::DEBUG),
            "still traced, at debug"
        );
        // And once close has stopped the writer, a batch is refused before it queues.
        store.close().await.unwrap();
        let err = store.write(vec![insert("after")]).await.unwrap_err();
        assert!(chain(&err).ends_with(&closed), "{}", chain(&err));
    }

    /// Red-team finding F6: one failed commit (a full disk) left redb refusing every
    /// later write on its handle ("Previous I/O error occurred"), so every register
    /// failed until a restart, even once space was back. Now the next write reopens
    /// the file (redb recovers it as after a crash) and goes through once the disk
    /// takes writes again; while it does not, writes are answered with the cause.
    #[tokio::test]
    async fn a_write_after_a_failed_commit_goes_through_once_the_disk_works_again() {
        let backend = FailingBackend::default();
        let options = RedbOptions::default();
        let store = RedbStore::on_backend(&backend, &options).unwrap();
        store.write(vec![insert("seed")]).await.unwrap();
        assert_eq!(store.stats().reopens, 0);

        backend.fail.store(true, Ordering::SeqCst);
        let err = store.write(vec![insert("lost")]).await.unwrap_err();
        assert!(chain(&err).contains(INJECTED), "{}", chain(&err));
        // The disk still fails: the reopen cannot recover the file, and the write is
        // refused with the disk's error, not left waiting; so is a read meanwhile (no
        // handle is open).
        let err = store
            .write(vec![insert("still-failing")])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(chain(&err).contains(INJECTED), "{}", chain(&err));
        let err = store.list().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");

        // Space is back: the next write reopens the file and is committed.
        backend.fail.store(false, Ordering::SeqCst);
        let written = store.write(vec![insert("after")]).await.unwrap();
        assert_eq!(written[0].revision, 1);
        assert!(store.stats().reopens >= 1);
        assert_eq!(
            names(&store).await,
            ["after", "seed"],
            "nothing of the failed writes"
        );
        // And the store goes on as usual: heartbeats reach the disk, the file is whole.
        let after = LlmName::parse("after").unwrap();
        let at = Timestamp::from_millis(1_000_000);
        assert_eq!(
            store.touch(std::slice::from_ref(&after), at).await.unwrap(),
            1
        );
        store.flush().await.unwrap();
        assert!(store.check_integrity().await.unwrap().is_ok());
        store.close().await.unwrap();
        drop(store);

        let store = RedbStore::on_backend(&backend, &options).unwrap();
        assert_eq!(names(&store).await, ["after", "seed"]);
        let row = store.get(&after).await.unwrap().unwrap();
        assert_eq!(row.last_heartbeat_at, Some(at));
        store.close().await.unwrap();
    }

    /// F6, when the reopen itself fails (the disk still refuses writes): reads are
    /// unavailable meanwhile, and the next flush (the flusher's tick) reopens the file
    /// once the disk works, with no write needed to bring reads back.
    #[tokio::test]
    async fn a_flush_reopens_a_file_whose_reopen_failed_once_the_disk_works() {
        let backend = FailingBackend::default();
        let options = RedbOptions::default();
        let store = RedbStore::on_backend(&backend, &options).unwrap();
        store.write(vec![insert("kept")]).await.unwrap();
        backend.fail.store(true, Ordering::SeqCst);
        store.write(vec![insert("lost")]).await.unwrap_err();
        // This write's reopen fails: no handle is left.
        store.write(vec![insert("lost-too")]).await.unwrap_err();
        assert!(store.list().await.is_err(), "no handle to read from");
        // A flush with nothing to write still tries, and fails while the disk does.
        assert!(store.flush().await.is_err());
        backend.fail.store(false, Ordering::SeqCst);
        store.flush().await.unwrap();
        assert_eq!(names(&store).await, ["kept"]);
        assert!(store.stats().reopens >= 1);
        store.close().await.unwrap();
    }

    /// F6 through the heartbeat flusher: a flush that failed poisons the handle as a
    /// failed commit does, and the next flush reopens the file and writes.
    #[tokio::test]
    async fn a_flush_after_a_failed_one_reopens_the_file_and_writes() {
        let backend = FailingBackend::default();
        let options = RedbOptions::default();
        let store = RedbStore::on_backend(&backend, &options).unwrap();
        store.write(vec![insert("beating")]).await.unwrap();
        let beating = LlmName::parse("beating").unwrap();
        let first = Timestamp::from_millis(1_000_000);
        store
            .touch(std::slice::from_ref(&beating), first)
            .await
            .unwrap();
        backend.fail.store(true, Ordering::SeqCst);
        let err = store.flush().await.unwrap_err();
        assert!(chain(&err).contains(INJECTED), "{}", chain(&err));
        backend.fail.store(false, Ordering::SeqCst);
        store.flush().await.unwrap();
        assert_eq!(store.stats().reopens, 1);
        assert_eq!(store.stats().pending_heartbeats, 0);
        store.write(vec![insert("later")]).await.unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = RedbStore::on_backend(&backend, &options).unwrap();
        let row = store.get(&beating).await.unwrap().unwrap();
        assert_eq!(
            row.last_heartbeat_at,
            Some(first),
            "the heartbeat reached the disk"
        );
        assert_eq!(names(&store).await, ["beating", "later"]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_commit_fails_every_batch_of_its_group_and_writes_none() {
        logged(); // records from here on
        let backend = FailingBackend::default();
        let options = RedbOptions::default();
        let store = RedbStore::on_backend(&backend, &options).unwrap();
        store.write(vec![insert("seed")]).await.unwrap();
        let before = store.stats();
        let held = hold(&store);
        let mut writes: Vec<_> = (0..5)
            .map(|i| store.write(vec![insert(&format!("lost-{i}"))]))
            .collect();
        for w in &mut writes {
            assert!(poll_once(w).await.is_pending());
        }
        backend.fail.store(true, Ordering::SeqCst);
        held.release();
        for w in writes {
            let err = w.await.expect_err("the group's commit failed");
            assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
            // The failure itself, not redb's "a previous I/O error" of a later group:
            // all five were in the group that failed.
            assert!(chain(&err).contains(INJECTED), "{}", chain(&err));
        }
        assert!(
            logged().iter().any(|l| is_writer(l, tracing::Level::WARN)
                && l.fields.contains(INJECTED)
                && l.fields.contains("batches=5")),
            "an engine failure is a warning"
        );
        let after = store.stats();
        assert_eq!(
            (after.commits, after.batches),
            (before.commits, before.batches)
        );
        assert_eq!(after.writes_waiting, 0);
        // The writer goes on: the next batch is answered (redb refuses a handle after a
        // failed write until it is reopened), not left waiting.
        let err = store.write(vec![insert("after")]).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");

        // Closing a failed handle may fail too; either way, the bytes hold no batch
        // of the failed group.
        let _ = store.close().await;
        drop(store);
        backend.fail.store(false, Ordering::SeqCst);
        let store = RedbStore::on_backend(&backend, &options).unwrap();
        assert_eq!(names(&store).await, ["seed"]);
        store.close().await.unwrap();
    }
}
