//! Heartbeat coalescing: touches cost no disk commit, are seen by every read at once,
//! and reach the disk in one transaction per flush: on `flush()`, on the flusher's
//! timer (driven with paused tokio time), and when the overlay fills up. A lifecycle
//! write replaces a touched heartbeat, and no heartbeat outlives its row.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TempStore, name, publisher, request};
use virtual_llm_core::testkit::{ManualClock, at, record};
use virtual_llm_core::{Gateway, LlmName, Store, Timestamp, Write};
use virtual_llm_redb::{RedbOptions, RedbStats};

const HOUR: Duration = Duration::from_secs(3600);

async fn rows(store: &TempStore, n: usize) -> Vec<LlmName> {
    let batch = (0..n)
        .map(|i| {
            let mut r = record(&format!("row-{i}"));
            r.last_heartbeat_at = Some(at(1));
            Write::Insert(r)
        })
        .collect();
    store.write(batch).await.unwrap();
    (0..n).map(|i| name(&format!("row-{i}"))).collect()
}

/// Pauses tokio's clock once a test's rows are written. Not from the start: a write
/// waits for the store's writer thread, which, unlike a blocking-pool task, does not
/// hold the paused clock, so the runtime could jump to the flusher's next tick while
/// the setup commits, and that tick could then flush the test's touches early.
fn pause_after_setup() {
    tokio::time::pause();
}

/// Waits (in paused tokio time) until `done` holds for the store's stats.
async fn until(store: &TempStore, done: impl Fn(RedbStats) -> bool) {
    for _ in 0..10_000 {
        if done(store.stats()) {
            return;
        }
        // Paused time: this returns once the runtime is idle, and never while a
        // blocking flush is running (tokio holds the clock for spawn_blocking).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition never held: {:?}", store.stats());
}

#[tokio::test]
async fn touches_commit_nothing_until_a_flush_writes_them_all_at_once() {
    let store = TempStore::with(RedbOptions::default().flush_every(HOUR)).await;
    let names = rows(&store, 10).await;
    let commits = store.stats().commits;
    for t in 0..1000u64 {
        let i = usize::try_from(t).unwrap() % names.len();
        assert_eq!(store.touch(&names[i..=i], at(100 + t)).await.unwrap(), 1);
    }
    let stats = store.stats();
    assert_eq!(stats.commits, commits, "1000 heartbeats, no commit");
    assert_eq!(
        stats.pending_heartbeats, 10,
        "one pending heartbeat per row"
    );
    // Seen at once by every read.
    let row9 = store.get(&names[9]).await.unwrap().unwrap();
    assert_eq!(row9.last_heartbeat_at, Some(at(100 + 999)));
    assert_eq!(row9.revision, 1);
    assert!(store.stale_virtuals(at(1090)).await.unwrap().is_empty());
    assert_eq!(store.stale_virtuals(at(1091)).await.unwrap().len(), 1);

    store.flush().await.unwrap();
    let stats = store.stats();
    assert_eq!(
        stats.commits,
        commits + 1,
        "one transaction for all of them"
    );
    assert_eq!((stats.flushes, stats.heartbeats_flushed), (1, 10));
    assert_eq!(stats.pending_heartbeats, 0);
    store.flush().await.unwrap();
    assert_eq!(
        store.stats().commits,
        commits + 1,
        "an empty flush commits nothing"
    );

    let store = store.reopen().await;
    let row9 = store.get(&names[9]).await.unwrap().unwrap();
    assert_eq!(
        row9.last_heartbeat_at,
        Some(at(1099)),
        "persisted by the flush"
    );
    assert_eq!(row9.revision, 1, "a flush keeps the revision");
    assert!(store.check_integrity().await.unwrap().is_ok());
}

#[tokio::test]
async fn gateway_heartbeats_are_coalesced() {
    let store = TempStore::with(RedbOptions::default().flush_every(HOUR)).await;
    let clock = ManualClock::new(at(1_000));
    let gw = Gateway::builder(store.arc())
        .clock(Arc::new(clock.clone()))
        .start()
        .await
        .unwrap();
    let alice = publisher("alice");
    let session = gw
        .register(&alice, request(None, &["a", "b", "c"]))
        .await
        .unwrap()
        .provider_session_id;
    let commits = store.stats().commits;
    for _ in 0..200 {
        clock.advance(Duration::from_secs(1));
        assert_eq!(gw.heartbeat(&alice, &session).await.unwrap().llms, 3);
    }
    assert_eq!(
        store.stats().commits,
        commits,
        "200 heartbeats of 3 rows, no commit"
    );
    let row = store.get(&name("b")).await.unwrap().unwrap();
    assert_eq!(row.last_heartbeat_at, Some(at(1_200)));
    gw.flush().await.unwrap();
    assert_eq!(store.stats().commits, commits + 1);
    assert_eq!(store.stats().heartbeats_flushed, 3);
}

#[tokio::test]
async fn the_timer_flushes_without_being_asked() {
    let every = Duration::from_secs(5);
    let store = TempStore::with(RedbOptions::default().flush_every(every)).await;
    let names = rows(&store, 3).await;
    pause_after_setup();
    store.touch(&names, at(50)).await.unwrap();
    assert_eq!(store.stats().flushes, 0);
    tokio::time::advance(every).await;
    until(&store, |s| s.flushes == 1 && s.pending_heartbeats == 0).await;
    assert_eq!(store.stats().heartbeats_flushed, 3);
    // Nothing pending: later ticks commit nothing.
    let commits = store.stats().commits;
    tokio::time::advance(every * 3).await;
    tokio::time::sleep(every).await;
    assert_eq!(store.stats().commits, commits);
    // The next heartbeat goes out with the next tick.
    store.touch(&names[..1], at(60)).await.unwrap();
    tokio::time::advance(every).await;
    until(&store, |s| s.flushes == 2).await;
    let store = store.reopen().await;
    assert_eq!(
        store
            .get(&names[0])
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat_at,
        Some(at(60))
    );
}

#[tokio::test]
async fn a_full_overlay_wakes_the_flusher_early() {
    let store = TempStore::with(RedbOptions::default().flush_every(HOUR).max_pending(8)).await;
    let names = rows(&store, 8).await;
    pause_after_setup();
    store.touch(&names[..7], at(10)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        store.stats().flushes,
        0,
        "under the limit, the timer decides"
    );
    store.touch(&names[7..], at(10)).await.unwrap();
    until(&store, |s| s.flushes == 1).await;
    assert_eq!(store.stats().heartbeats_flushed, 8);
    assert_eq!(store.stats().pending_heartbeats, 0);
}

#[tokio::test]
async fn a_write_replaces_the_touched_heartbeat_as_given() {
    let store = TempStore::with(RedbOptions::default().flush_every(HOUR)).await;
    let mut r = record("row");
    r.last_heartbeat_at = Some(at(5));
    let r = store.write(vec![Write::Insert(r)]).await.unwrap().remove(0);
    store
        .touch(std::slice::from_ref(&r.name), at(50))
        .await
        .unwrap();
    let mut update = r.clone();
    update.model = "m2".into();
    update.last_heartbeat_at = Some(at(7));
    store.write(vec![Write::Update(update)]).await.unwrap();
    let got = store.get(&r.name).await.unwrap().unwrap();
    assert_eq!(
        got.last_heartbeat_at,
        Some(at(7)),
        "the write's heartbeat, as with MemoryStore"
    );
    assert_eq!(
        store.stale_virtuals(at(8)).await.unwrap().len(),
        1,
        "indexed at 7"
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.stats().flushes,
        0,
        "the replaced heartbeat is dropped, not written"
    );
    assert_eq!(store.stats().pending_heartbeats, 0);
    let store = store.reopen().await;
    assert_eq!(
        store.get(&r.name).await.unwrap().unwrap().last_heartbeat_at,
        Some(at(7))
    );
}

#[tokio::test]
async fn a_heartbeat_never_resurfaces_on_a_new_row_of_the_same_name() {
    let store = TempStore::with(RedbOptions::default().flush_every(HOUR)).await;
    let r = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .unwrap()
        .remove(0);
    store
        .touch(std::slice::from_ref(&r.name), at(50))
        .await
        .unwrap();
    store
        .write(vec![Write::Delete {
            name: r.name.clone(),
            id: r.id.clone(),
            revision: 1,
        }])
        .await
        .unwrap();
    assert_eq!(
        store
            .touch(std::slice::from_ref(&r.name), at(60))
            .await
            .unwrap(),
        0,
        "gone"
    );
    let mut again = record("row");
    again.last_heartbeat_at = Some(at(2));
    let again = store
        .write(vec![Write::Insert(again)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.revision, 1, "the same revision as the deleted row");
    let got = store.get(&r.name).await.unwrap().unwrap();
    assert_eq!(got.last_heartbeat_at, Some(at(2)));
    store.flush().await.unwrap();
    assert_eq!(
        store.get(&r.name).await.unwrap().unwrap().last_heartbeat_at,
        Some(at(2))
    );
}

#[tokio::test]
async fn a_heartbeat_moved_back_is_seen_by_the_stale_query() {
    let store = TempStore::with(RedbOptions::default().flush_every(HOUR)).await;
    let mut r = record("row");
    r.last_heartbeat_at = Some(at(100));
    store.write(vec![Write::Insert(r)]).await.unwrap();
    assert!(store.stale_virtuals(at(50)).await.unwrap().is_empty());
    // A clock stepped back: the touch is older than the indexed heartbeat.
    store.touch(&[name("row")], at(10)).await.unwrap();
    let stale = store.stale_virtuals(at(50)).await.unwrap();
    assert_eq!(
        stale.len(),
        1,
        "the in-memory heartbeat is the one that counts"
    );
    assert_eq!(stale[0].last_heartbeat_at, Some(at(10)));
    store.flush().await.unwrap();
    assert_eq!(
        store.stale_virtuals(at(50)).await.unwrap().len(),
        1,
        "and on disk"
    );
    assert!(store.stale_virtuals(at(10)).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_see_a_heartbeat_go_back_while_flushes_run() {
    let store = Arc::new(TempStore::with(RedbOptions::default().flush_every(HOUR)).await);
    let names = rows(&store, 4).await;
    let writer = {
        let (store, names) = (store.clone(), names.clone());
        tokio::spawn(async move {
            for t in 2..150u64 {
                store.touch(&names, at(t)).await.unwrap();
                store.flush().await.unwrap();
            }
        })
    };
    let mut seen = Timestamp::EPOCH;
    let mut reads = 0;
    while !writer.is_finished() {
        for r in store.list().await.unwrap() {
            let beat = r.last_heartbeat_at.unwrap();
            assert!(
                beat >= seen || r.name != names[0],
                "{} went back: {beat} < {seen}",
                r.name
            );
            if r.name == names[0] {
                seen = beat;
            }
        }
        let stale = store.stale_virtuals(seen).await.unwrap();
        assert!(
            stale.is_empty(),
            "a flush made a fresh row look stale: {stale:?}"
        );
        reads += 1;
    }
    writer.await.unwrap();
    // The writer may have made its last touch between the loop's last read and its
    // check: one more read, after the last flush, sees it.
    let row = store.get(&names[0]).await.unwrap().unwrap();
    let last = row.last_heartbeat_at.unwrap();
    assert!(last >= seen, "{} went back: {last} < {seen}", row.name);
    seen = last;
    assert!(reads > 1);
    assert_eq!(seen, at(149));
}
