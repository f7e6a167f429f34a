//! What the store refuses to open: a registry of an unknown schema version (a future
//! one included), a redb file that is not a registry, a file that is not redb; how it
//! upgrades a version-1 file that holds a bound row; and what it reports for a torn
//! row or an index (the replica and pool indexes included) that disagrees with the
//! rows.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use common::{TempStore, downgrade, name};
use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use virtual_llm_core::testkit::record;
use virtual_llm_core::{ChannelBinding, ReplicaId, Store, StoreError, Write};
use virtual_llm_redb::{RedbStore, SCHEMA_VERSION};

const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const ROWS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("rows");
const LIVE: TableDefinition<'static, (u64, &str), u64> = TableDefinition::new("live_by_heartbeat");
const BY_REPLICA: TableDefinition<'static, (&str, &str), ()> =
    TableDefinition::new("rows_by_replica");
const BY_POOL: TableDefinition<'static, (&str, &str), ()> = TableDefinition::new("rows_by_pool");

fn version_of(path: &std::path::Path) -> Option<u64> {
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    meta.get("schema_version").unwrap().map(|v| v.value())
}

fn set_version(path: &std::path::Path, version: u64) {
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("schema_version", version)
        .unwrap();
    txn.commit().unwrap();
}

#[tokio::test]
async fn an_unknown_schema_version_is_incompatible_and_nothing_is_read() {
    let file = TempStore::closed_with_one_row().await;
    set_version(&file.path(), SCHEMA_VERSION + 98);
    let err = RedbStore::open(file.path())
        .await
        .expect_err("unknown version");
    let StoreError::Incompatible { message } = &err else {
        panic!("expected Incompatible, got {err:?}");
    };
    assert!(
        message.contains(&format!("schema version {}", SCHEMA_VERSION + 98))
            && message.contains(&format!("reads version {SCHEMA_VERSION}"))
            && message.contains("newer"),
        "the message names both versions: {message}"
    );
    // The refusal changed nothing: with the version back, the row is there.
    set_version(&file.path(), SCHEMA_VERSION);
    let store = RedbStore::open(file.path()).await.unwrap();
    assert!(store.get(&name("row")).await.unwrap().is_some());
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_next_schema_version_is_refused_and_the_file_left_alone() {
    assert_eq!(SCHEMA_VERSION, 5);
    let file = TempStore::closed_with_one_row().await;
    set_version(&file.path(), 6);
    let err = RedbStore::open(file.path()).await.expect_err("version 6");
    assert!(
        matches!(&err, StoreError::Incompatible { message }
            if message.contains("schema version 6") && message.contains("newer")),
        "{err:?}"
    );
    assert_eq!(
        version_of(&file.path()),
        Some(6),
        "not downgraded, not touched"
    );
}

#[tokio::test]
async fn an_older_schema_version_is_incompatible_too() {
    let file = TempStore::closed_with_one_row().await;
    set_version(&file.path(), 0);
    let err = RedbStore::open(file.path()).await.expect_err("old version");
    assert!(
        matches!(&err, StoreError::Incompatible { message } if message.contains("no migration")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_redb_file_that_is_not_a_registry_is_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let other: TableDefinition<'static, u64, u64> = TableDefinition::new("something_else");
        txn.open_table(other).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    let err = RedbStore::open(&path).await.expect_err("foreign file");
    assert!(
        matches!(&err, StoreError::Incompatible { message } if message.contains("something_else")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_file_that_is_not_redb_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let text = "these are not the pages you are looking for\n".repeat(200);
    std::fs::write(&path, &text).unwrap();
    let err = RedbStore::open(&path).await.expect_err("not redb");
    assert!(
        matches!(&err, StoreError::Incompatible { message } if message.contains("not a redb file")),
        "a foreign file is Incompatible, got {err:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "the file was left alone"
    );
}

#[tokio::test]
async fn a_torn_row_is_corruption_and_the_check_names_it() {
    let file = TempStore::closed_with_one_row().await;
    {
        let db = Database::open(file.path()).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(ROWS)
            .unwrap()
            .insert("row", b"{\"id\":\"llm_x\",\"na".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(file.path()).await.unwrap();
    let err = store.get(&name("row")).await.expect_err("torn row");
    assert!(matches!(err, StoreError::Corrupted { .. }), "{err:?}");
    let err = store.list().await.expect_err("torn row");
    assert!(matches!(err, StoreError::Corrupted { .. }), "{err:?}");
    let report = store.check_integrity().await.unwrap();
    assert!(!report.is_ok());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("\"row\" does not decode")),
        "{report:?}"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_check_reports_an_index_that_disagrees_with_the_rows() {
    let file = TempStore::closed_with_one_row().await;
    {
        let db = Database::open(file.path()).unwrap();
        let read = db.begin_read().unwrap();
        assert_eq!(
            read.open_table(LIVE).unwrap().len().unwrap(),
            1,
            "the live row is indexed"
        );
        drop(read);
        let txn = db.begin_write().unwrap();
        {
            let mut live = txn.open_table(LIVE).unwrap();
            live.remove((0, "row")).unwrap();
            live.insert((5, "ghost"), 9).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = RedbStore::open(file.path()).await.unwrap();
    let report = store.check_integrity().await.unwrap();
    assert_eq!(report.rows, 1);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("lacks") && p.contains("\"row\"")),
        "{report:?}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("holds") && p.contains("\"ghost\"")),
        "{report:?}"
    );
    // The stale query trusts the index, and refuses an entry without its row.
    let err = store
        .stale_virtuals(virtual_llm_core::Timestamp::MAX)
        .await
        .expect_err("dangling index entry");
    assert!(matches!(err, StoreError::Corrupted { .. }), "{err:?}");
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_upgrade_from_version_1_indexes_a_row_that_has_a_binding() {
    // A v1 build never wrote a binding; the upgrade indexes one anyway. The file is
    // made a v1 file by hand: the replica and pool indexes dropped and the version
    // set back.
    let file = TempStore::new().await;
    let replica = ReplicaId::parse("gw-1").unwrap();
    let mut bound = record("bound");
    bound.binding = Some(ChannelBinding {
        replica: replica.clone(),
        epoch: 3,
    });
    let written = file
        .write(vec![Write::Insert(bound), Write::Insert(record("unbound"))])
        .await
        .unwrap();
    file.close().await.unwrap();
    downgrade(&file.path(), 1);

    let store = RedbStore::open(file.path()).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade");
    assert_eq!(store.bound_to(&replica).await.unwrap(), written[..1]);
    assert_eq!(store.by_pool(&name("bound")).await.unwrap(), written[..1]);
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    store.close().await.unwrap();
    assert_eq!(version_of(&file.path()), Some(SCHEMA_VERSION));
}

#[tokio::test]
async fn the_check_reports_a_replica_index_that_disagrees_with_the_rows() {
    let file = TempStore::new().await;
    let mut bound = record("bound");
    bound.binding = Some(ChannelBinding {
        replica: ReplicaId::parse("gw-1").unwrap(),
        epoch: 1,
    });
    file.write(vec![Write::Insert(bound)]).await.unwrap();
    file.close().await.unwrap();
    {
        let db = Database::open(file.path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut index = txn.open_table(BY_REPLICA).unwrap();
            assert!(index.remove(("gw-1", "bound")).unwrap().is_some());
            index.insert(("gw-2", "ghost"), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = RedbStore::open(file.path()).await.unwrap();
    let report = store.check_integrity().await.unwrap();
    let named = |what: &str, row: &str| {
        report
            .problems
            .iter()
            .any(|p| p.starts_with("rows_by_replica") && p.contains(what) && p.contains(row))
    };
    assert!(named("lacks", "\"bound\""), "{report:?}");
    assert!(named("holds", "\"ghost\""), "{report:?}");
    let err = store
        .bound_to(&ReplicaId::parse("gw-2").unwrap())
        .await
        .expect_err("dangling index entry");
    assert!(matches!(err, StoreError::Corrupted { .. }), "{err:?}");
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_check_reports_a_pool_index_that_disagrees_with_the_rows() {
    let file = TempStore::new().await;
    let mut member = record("member");
    member.pool = Some(name("llama"));
    file.write(vec![Write::Insert(member), Write::Insert(record("solo"))])
        .await
        .unwrap();
    file.close().await.unwrap();
    {
        let db = Database::open(file.path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut index = txn.open_table(BY_POOL).unwrap();
            assert!(index.remove(("llama", "member")).unwrap().is_some());
            assert!(index.remove(("solo", "solo")).unwrap().is_some());
            index.insert(("llama", "ghost"), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = RedbStore::open(file.path()).await.unwrap();
    let report = store.check_integrity().await.unwrap();
    let named = |what: &str, row: &str| {
        report
            .problems
            .iter()
            .any(|p| p.starts_with("rows_by_pool") && p.contains(what) && p.contains(row))
    };
    assert!(named("lacks", "\"member\""), "{report:?}");
    assert!(
        named("lacks", "\"solo\""),
        "a row without a pool: {report:?}"
    );
    assert!(named("holds", "\"ghost\""), "{report:?}");
    let err = store
        .by_pool(&name("llama"))
        .await
        .expect_err("dangling index entry");
    assert!(matches!(err, StoreError::Corrupted { .. }), "{err:?}");
    store.close().await.unwrap();
}
