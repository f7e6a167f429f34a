//! Names on PostgreSQL: no two rows share a name ignoring ASCII case (an insert of
//! `Alpha` beside `alpha` is a conflict, also when both race), names sort byte by byte
//! whatever the database's locale, and values PostgreSQL cannot hold are refused as an
//! invalid batch, with nothing written.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TempStore, postgres_installed};
use futures::future::join_all;
use virtual_llm_core::testkit::record;
use virtual_llm_core::{LlmName, Store, StoreError, Write};

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_differing_only_in_case_conflicts() {
    if !postgres_installed() {
        return;
    }
    let store = TempStore::new().await;
    store
        .write(vec![Write::Insert(record("alpha"))])
        .await
        .unwrap();
    for clash in ["Alpha", "ALPHA", "aLpHa"] {
        let err = store
            .write(vec![
                Write::Insert(record("beta")),
                Write::Insert(record(clash)),
            ])
            .await
            .expect_err(clash);
        assert!(
            matches!(&err, StoreError::Conflict { name } if name == clash),
            "{clash}: {err:?}"
        );
    }
    assert_eq!(
        store.get(&name("beta")).await.unwrap(),
        None,
        "the batch wrote nothing"
    );
    assert_eq!(
        store.get(&name("Alpha")).await.unwrap(),
        None,
        "get is exact"
    );
    assert!(store.get(&name("alpha")).await.unwrap().is_some());
    // Once the row is gone, the name is free in any case.
    let alpha = store.get(&name("alpha")).await.unwrap().unwrap();
    store
        .write(vec![Write::Delete {
            name: alpha.name,
            id: alpha.id,
            revision: alpha.revision,
        }])
        .await
        .unwrap();
    store
        .write(vec![Write::Insert(record("ALPHA"))])
        .await
        .unwrap();
    assert_eq!(
        store
            .list()
            .await
            .unwrap()
            .iter()
            .map(|r| r.name.to_string())
            .collect::<Vec<_>>(),
        ["ALPHA"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_inserts_of_one_name_in_different_cases_leave_one_row() {
    if !postgres_installed() {
        return;
    }
    let store = TempStore::new().await;
    let other = store.replica().await;
    let spellings = ["model", "Model", "MODEL", "mOdEl", "modeL", "MoDeL"];
    let attempts = spellings.iter().enumerate().map(|(i, n)| {
        let store: &dyn Store = if i % 2 == 0 { &*store.store } else { &*other };
        store.write(vec![Write::Insert(record(n))])
    });
    let results = join_all(attempts).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one spelling wins: {results:?}"
    );
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::Conflict { .. })),
        "{results:?}"
    );
    assert_eq!(store.list().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_sort_byte_by_byte() {
    if !postgres_installed() {
        return;
    }
    let store = TempStore::new().await;
    // A database with a linguistic collation would sort these b, B-x, c (case folded);
    // the core sorts bytes: upper case first, then `.` `-` `:` digits by code point.
    for n in ["b", "B-x", "c", "a.1", "a-1", "a:1", "A0"] {
        store.write(vec![Write::Insert(record(n))]).await.unwrap();
    }
    let listed: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    let mut bytes = listed.clone();
    bytes.sort();
    assert_eq!(listed, bytes);
    assert_eq!(listed, ["A0", "B-x", "a-1", "a.1", "a:1", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_postgres_cannot_hold_is_an_invalid_batch() {
    if !postgres_installed() {
        return;
    }
    let store = TempStore::new().await;
    let mut nul = record("nul");
    nul.model = "a\0b".into();
    let err = store
        .write(vec![Write::Insert(record("fine")), Write::Insert(nul)])
        .await
        .expect_err("text with a NUL");
    assert!(matches!(err, StoreError::InvalidBatch { .. }), "{err:?}");
    let mut late = record("late");
    late.updated_at = virtual_llm_core::Timestamp::MAX;
    let err = store
        .write(vec![Write::Insert(record("fine")), Write::Insert(late)])
        .await
        .expect_err("a timestamp past bigint");
    assert!(matches!(err, StoreError::InvalidBatch { .. }), "{err:?}");
    assert!(
        store.list().await.unwrap().is_empty(),
        "nothing was written"
    );
    // The store goes on as before.
    store
        .write(vec![Write::Insert(record("fine"))])
        .await
        .unwrap();
}
