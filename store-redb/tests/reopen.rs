//! Durability across a close and reopen of the file: rows, every index and coalesced
//! heartbeats come back as they were, after `close()`, after a drop without `close()`,
//! and the file is held by one handle at a time.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::time::Duration;

use common::{TempStore, name};
use virtual_llm_core::testkit::{at, record};
use virtual_llm_core::{LlmKind, LlmStatus, SessionId, Store, StoreError, Write};
use virtual_llm_redb::{RedbOptions, RedbStore};

/// A registry with a row in every state the indexes distinguish.
async fn populate(store: &RedbStore) -> SessionId {
    let session = SessionId::generate();
    let mut live = record("live");
    live.provider_session_id = Some(session.clone());
    live.last_heartbeat_at = Some(at(10));
    let mut gone = record("gone");
    gone.provider_session_id = Some(session.clone());
    gone.status = LlmStatus::Inactive;
    gone.inactive_since = Some(at(20));
    let mut public = record("public");
    public.kind = LlmKind::Public;
    public.tier = Some("fast".into());
    let mut sleeping = record("sleeping");
    sleeping.status = LlmStatus::Hibernating;
    sleeping.last_heartbeat_at = None;
    // A pool of two: `live` and `sleeping`, which serves in the pool of `live`.
    sleeping.pool = Some(name("live"));
    sleeping.max_concurrent = Some(8);
    store
        .write(vec![
            Write::Insert(live),
            Write::Insert(gone),
            Write::Insert(public),
            Write::Insert(sleeping),
        ])
        .await
        .unwrap();
    // One more revision on a row, and a coalesced heartbeat.
    let mut live = store.get(&name("live")).await.unwrap().unwrap();
    live.model = "m2".into();
    store.write(vec![Write::Update(live)]).await.unwrap();
    assert_eq!(store.touch(&[name("live")], at(40)).await.unwrap(), 1);
    session
}

#[tokio::test]
async fn reopen_after_close_keeps_rows_indexes_and_heartbeats() {
    let store =
        TempStore::with(RedbOptions::default().flush_every(Duration::from_secs(3600))).await;
    let session = populate(&store).await;
    let before = store.list().await.unwrap();
    assert_eq!(
        store.stats().pending_heartbeats,
        1,
        "the touch is still in memory"
    );

    let store = store.reopen().await;
    assert_eq!(store.list().await.unwrap(), before, "every row, as it was");
    let live = store.get(&name("live")).await.unwrap().unwrap();
    assert_eq!(
        live.last_heartbeat_at,
        Some(at(40)),
        "close flushed the heartbeat"
    );
    assert_eq!((live.revision, live.model.as_str()), (2, "m2"));
    let names = |rows: Vec<virtual_llm_core::LlmRecord>| {
        rows.into_iter()
            .map(|r| r.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.by_session(&session).await.unwrap()),
        ["gone", "live"]
    );
    assert_eq!(
        names(store.by_pool(&name("live")).await.unwrap()),
        ["live", "sleeping"]
    );
    assert_eq!(
        names(store.by_pool(&name("public")).await.unwrap()),
        ["public"]
    );
    // A hibernating row is live too (its publisher heartbeats); this one never did,
    // so it counts from the epoch.
    assert_eq!(
        names(store.stale_virtuals(at(41)).await.unwrap()),
        ["sleeping", "live"]
    );
    assert_eq!(
        names(store.stale_virtuals(at(40)).await.unwrap()),
        ["sleeping"]
    );
    assert_eq!(
        names(store.expired_inactives(at(21)).await.unwrap()),
        ["gone"]
    );
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.rows, 4);
    // Writes go on where they stopped: revisions and compare-and-set still hold.
    let mut stale = live.clone();
    stale.revision = 1;
    assert!(matches!(
        store.write(vec![Write::Update(stale)]).await,
        Err(StoreError::Conflict { .. })
    ));
    let updated = store.write(vec![Write::Update(live)]).await.unwrap();
    assert_eq!(updated[0].revision, 3);
}

#[test]
fn heartbeats_survive_a_drop_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let options = RedbOptions::default().flush_every(Duration::from_secs(3600));
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = rt.block_on(RedbStore::open_with(&path, options)).unwrap();
        rt.block_on(async {
            store
                .write(vec![Write::Insert(record("row"))])
                .await
                .unwrap();
            store.touch(&[name("row")], at(77)).await.unwrap();
        });
        assert_eq!(
            store.stats().commits,
            2,
            "schema creation and the insert; no flush yet"
        );
        // Neither close() nor flush(): the store and then its runtime go away.
        drop(store);
        drop(rt);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = RedbStore::open(&path).await.unwrap();
        let row = store.get(&name("row")).await.unwrap().unwrap();
        assert_eq!(row.last_heartbeat_at, Some(at(77)));
        assert_eq!(row.revision, 1, "a heartbeat flush keeps the revision");
        store.close().await.unwrap();
    });
}

#[tokio::test]
async fn the_file_is_held_by_one_handle_until_closed() {
    let store = TempStore::new().await;
    store
        .write(vec![Write::Insert(record("row"))])
        .await
        .unwrap();
    let err = RedbStore::open(store.path())
        .await
        .expect_err("second open");
    assert!(
        matches!(err, StoreError::Unavailable { .. }),
        "a held file is Unavailable, got {err:?}"
    );
    store.close().await.unwrap();
    let again = RedbStore::open(store.path()).await.unwrap();
    assert_eq!(again.list().await.unwrap().len(), 1);
    again.close().await.unwrap();
}

#[tokio::test]
async fn a_closed_store_refuses_calls_and_closes_twice() {
    let store = TempStore::new().await;
    store.close().await.unwrap();
    store.close().await.unwrap();
    let err = store.list().await.expect_err("closed");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    // A write after close is refused with the closed error (not a failed commit).
    let err = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .expect_err("closed");
    let StoreError::Unavailable { source } = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert_eq!(source.to_string(), "the redb store is closed");
    assert!(store.touch(&[name("row")], at(1)).await.is_err());
}
