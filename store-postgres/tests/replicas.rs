//! Two stores on one database, as two gateway replicas: a batch written on one reaches
//! the other's change feed (and a refused one does not), a registry view on one
//! follows the other's writes long before its staleness bound, and heartbeats are
//! coalesced into few statements yet read at once by every replica.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TempStore, postgres_installed};
use futures::future::join_all;
use tokio::sync::broadcast::error::RecvError;
use virtual_llm_core::store::RowChange;
use virtual_llm_core::testkit::{at, record};
use virtual_llm_core::{LlmName, RegistryView, Store, StoreError, Write};

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

/// The next change on `feed`, within 10 s (a bound for a broken feed, not a delay).
async fn next(
    feed: &mut tokio::sync::broadcast::Receiver<RowChange>,
) -> Result<RowChange, RecvError> {
    tokio::time::timeout(Duration::from_secs(10), feed.recv())
        .await
        .expect("a change within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_one_replica_reaches_the_others_feed() {
    if !postgres_installed() {
        return;
    }
    let a = TempStore::new().await;
    let b = a.replica().await;
    let mut feed = b.changes().expect("the postgres store has a feed");
    let mut row = record("m1");
    row.pool = Some(name("llama"));
    let written = a.write(vec![Write::Insert(row)]).await.unwrap();
    let refused = a.write(vec![Write::Insert(record("m1"))]).await;
    assert!(matches!(refused, Err(StoreError::Conflict { .. })));
    a.write(vec![Write::Delete {
        name: name("m1"),
        id: written[0].id.clone(),
        revision: 1,
    }])
    .await
    .unwrap();
    assert_eq!(
        next(&mut feed).await.unwrap(),
        RowChange {
            name: name("m1"),
            pool: Some(name("llama"))
        }
    );
    assert_eq!(
        next(&mut feed).await.unwrap(),
        RowChange {
            name: name("m1"),
            pool: None
        },
        "the refused insert reported nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_on_one_replica_follows_the_others_writes() {
    if !postgres_installed() {
        return;
    }
    let a = TempStore::new().await;
    let b: Arc<dyn Store> = a.replica().await;
    // A staleness bound far beyond the test: only the feed can refresh the view.
    let view = RegistryView::new(b, Duration::from_secs(3600));
    let pool = name("llama");
    assert!(view.pool(&pool).await.unwrap().is_none());
    let mut row = record("m1");
    row.pool = Some(pool.clone());
    a.write(vec![Write::Insert(row)]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(rows) = view.pool(&pool).await.unwrap() {
            assert_eq!(rows.len(), 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the view never saw the other replica's insert"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_coalesced_and_read_at_once_by_every_replica() {
    if !postgres_installed() {
        return;
    }
    let a = TempStore::new().await;
    let b = a.replica().await;
    let names: Vec<LlmName> = (0..200).map(|i| name(&format!("row-{i}"))).collect();
    a.write(
        names
            .iter()
            .map(|n| Write::Insert(record(n.as_str())))
            .collect(),
    )
    .await
    .unwrap();
    let before = a.stats();
    // 200 publishers heartbeat at once, plus one for a row that does not exist.
    let ghost = [name("ghost")];
    let touches = names
        .iter()
        .map(|n| a.touch(std::slice::from_ref(n), at(50)))
        .chain([a.touch(&ghost, at(50))]);
    let counts: Vec<usize> = join_all(touches)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        200,
        "only rows that exist count"
    );
    let after = a.stats();
    let flushes = after.heartbeat_flushes - before.heartbeat_flushes;
    assert!(
        (1..=20).contains(&flushes),
        "201 heartbeats took {flushes} statements"
    );
    assert_eq!(after.heartbeats_written - before.heartbeats_written, 201);
    // The other replica reads them at once: no flush interval, no overlay.
    for row in b.list().await.unwrap() {
        assert_eq!(row.last_heartbeat_at, Some(at(50)), "{}", row.name);
        assert_eq!(row.revision, 1, "a heartbeat is no write");
    }
    assert!(b.stale_virtuals(at(50)).await.unwrap().is_empty());
    assert_eq!(b.stale_virtuals(at(51)).await.unwrap().len(), 200);
}
