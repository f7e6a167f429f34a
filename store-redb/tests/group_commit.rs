//! Group commit through the public API: many concurrent batches all succeed in far
//! fewer write transactions than batches; two batches racing for one revision in the
//! same burst have exactly one winner while unrelated batches all go through; a write
//! racing a close is either committed or refused, never lost; writes after close are
//! `Unavailable`; and point reads, now inline on the async thread, still see every
//! heartbeat while flushes commit. (The exact grouping, a group's order, its refused
//! batches and a failed commit are unit tests of the writer, which can hold it.)

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TempStore, name};
use tokio::sync::Barrier;
use virtual_llm_core::testkit::{at, record};
use virtual_llm_core::{LlmRecord, Store, StoreError, Timestamp, Write};
use virtual_llm_redb::{RedbOptions, RedbStore};

/// Runs `batches` as concurrent tasks released together by a barrier; returns each
/// task's outcome, in the order given.
async fn burst(
    store: &Arc<RedbStore>,
    batches: Vec<Vec<Write>>,
) -> Vec<Result<Vec<LlmRecord>, StoreError>> {
    let start = Arc::new(Barrier::new(batches.len()));
    let tasks: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                store.write(batch).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_all_succeed_in_far_fewer_commits() {
    const TASKS: usize = 200;
    let store = TempStore::new().await;
    let before = store.stats();
    let batches = (0..TASKS)
        .map(|i| vec![Write::Insert(record(&format!("row-{i:03}")))])
        .collect();
    for outcome in burst(&store.store, batches).await {
        assert_eq!(outcome.unwrap()[0].revision, 1);
    }
    let after = store.stats();
    let (commits, batches) = (
        after.commits - before.commits,
        after.batches - before.batches,
    );
    assert_eq!(batches, TASKS as u64, "every batch committed");
    // One transaction per batch would be 200 commits. The writer takes everything
    // queued while the previous group's fsync ran, and 200 tasks queue much faster
    // than the disk syncs, so the groups are large.
    assert!(
        commits <= batches / 2,
        "{commits} commits for {batches} batches: no grouping"
    );
    assert_eq!(after.writes_waiting, 0);
    assert_eq!(store.list().await.unwrap().len(), TASKS);
    let store = store.reopen().await;
    assert_eq!(store.list().await.unwrap().len(), TASKS, "all durable");
    assert!(store.check_integrity().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_updates_in_one_burst_have_exactly_one_winner() {
    const UNRELATED: usize = 50;
    let store = TempStore::new().await;
    let contested = store
        .write(vec![Write::Insert(record("contested"))])
        .await
        .unwrap()
        .remove(0);
    for round in 0..10 {
        // Both updates expect the revision the row is at now.
        let current = store.get(&contested.name).await.unwrap().unwrap();
        let update = |model: &str| {
            let mut r = current.clone();
            r.model = model.to_owned();
            vec![Write::Update(r)]
        };
        let mut batches = vec![update("a"), update("b")];
        batches.extend(
            (0..UNRELATED).map(|i| vec![Write::Insert(record(&format!("r{round}-{i:02}")))]),
        );
        let mut outcomes = burst(&store.store, batches).await.into_iter();
        let (a, b) = (outcomes.next().unwrap(), outcomes.next().unwrap());
        let winner = match (a, b) {
            (Ok(won), Err(StoreError::Conflict { name }))
            | (Err(StoreError::Conflict { name }), Ok(won)) => {
                assert_eq!(name, "contested");
                won.into_iter().next().unwrap()
            }
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        assert_eq!(winner.revision, current.revision + 1);
        for (i, outcome) in outcomes.enumerate() {
            assert!(
                outcome.is_ok(),
                "round {round}: unrelated batch {i}: {outcome:?}"
            );
        }
        let stored = store.get(&contested.name).await.unwrap().unwrap();
        assert_eq!(stored, winner, "round {round}: the winner's row is stored");
    }
    assert_eq!(store.list().await.unwrap().len(), 1 + 10 * UNRELATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_racing_close_is_committed_or_refused_never_lost() {
    const WRITES: usize = 100;
    let store = TempStore::new().await;
    let start = Arc::new(Barrier::new(WRITES + 1));
    let writes: Vec<_> = (0..WRITES)
        .map(|i| {
            let (store, start) = (store.arc(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let n = format!("row-{i:03}");
                (
                    n.clone(),
                    store.write(vec![Write::Insert(record(&n))]).await,
                )
            })
        })
        .collect();
    start.wait().await;
    store.close().await.unwrap();
    let mut committed = Vec::new();
    for w in writes {
        match w.await.unwrap() {
            (n, Ok(_)) => committed.push(n),
            (_, Err(StoreError::Unavailable { .. })) => {}
            (n, Err(e)) => panic!("{n}: {e:?}"),
        }
    }
    // After close, every write is refused at once.
    let late = store.write(vec![Write::Insert(record("late"))]).await;
    assert!(
        matches!(late, Err(StoreError::Unavailable { .. })),
        "{late:?}"
    );
    let store = RedbStore::open(store.path()).await.unwrap();
    let stored: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(stored, committed, "exactly the answered writes are on disk");
    store.close().await.unwrap();
}

#[tokio::test]
async fn writes_after_close_are_unavailable() {
    let store = TempStore::closed_with_one_row().await;
    for _ in 0..3 {
        let err = store
            .write(vec![Write::Insert(record("other"))])
            .await
            .expect_err("closed");
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    }
    assert_eq!(store.stats().writes_waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_gets_see_every_heartbeat_while_flushes_commit() {
    let store = Arc::new(
        TempStore::with(RedbOptions::default().flush_every(Duration::from_secs(3600))).await,
    );
    let mut r = record("row");
    r.last_heartbeat_at = Some(at(1));
    let row = store.write(vec![Write::Insert(r)]).await.unwrap().remove(0);
    let session = virtual_llm_core::SessionId::generate();
    let mut bound = record("bound");
    bound.provider_session_id = Some(session.clone());
    bound.last_heartbeat_at = Some(at(1));
    store.write(vec![Write::Insert(bound)]).await.unwrap();
    let names = vec![row.name.clone(), name("bound")];
    let heartbeats = {
        let (store, names) = (store.clone(), names.clone());
        tokio::spawn(async move {
            for t in 2..300u64 {
                store.touch(&names, at(t)).await.unwrap();
                if t % 3 == 0 {
                    store.flush().await.unwrap();
                }
            }
        })
    };
    let (mut seen, mut seen_bound) = (Timestamp::EPOCH, Timestamp::EPOCH);
    let mut reads = 0;
    while !heartbeats.is_finished() {
        let got = store.get(&row.name).await.unwrap().unwrap();
        let beat = got.last_heartbeat_at.unwrap();
        assert!(beat >= seen, "get went back: {beat} < {seen}");
        seen = beat;
        let rows = store.by_session(&session).await.unwrap();
        let beat = rows[0].last_heartbeat_at.unwrap();
        assert!(
            beat >= seen_bound,
            "by_session went back: {beat} < {seen_bound}"
        );
        seen_bound = beat;
        reads += 1;
    }
    heartbeats.await.unwrap();
    assert!(reads > 1);
    let got = store.get(&row.name).await.unwrap().unwrap();
    assert_eq!(got.last_heartbeat_at, Some(at(299)));
    assert_eq!(got.revision, 1, "heartbeats never change a revision");
    assert!(store.stats().flushes > 0, "the reads raced real flushes");
}
