//! Durability across versions: `tests/fixtures/registry-v1.redb`, written by the
//! release before schema version 2 (see `tests/fixtures/README.md`), opens with this
//! code: it is upgraded in place, once, and every row comes back with every field as
//! the old code wrote it; the new index works on it from then on.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::path::{Path, PathBuf};

use common::name;
use redb::{Database, ReadableDatabase, TableDefinition, TableHandle};
use tempfile::TempDir;
use virtual_llm_core::{
    ChannelBinding, LlmId, LlmKind, LlmRecord, LlmStatus, ReplicaId, SessionId, Store, Timestamp,
    Write,
};
use virtual_llm_redb::{RedbStore, SCHEMA_VERSION};

const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

/// The fixture, as committed; tests open a copy, never this file.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/registry-v1.redb")
}

/// A copy of the fixture in a temporary directory.
fn copy_of_fixture() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    std::fs::copy(fixture(), &path).unwrap();
    (dir, path)
}

/// 2025-12-02T00:00:00Z plus `ms`, as the fixture writer counted.
fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_764_633_600_000 + ms)
}

fn session(s: &str) -> SessionId {
    SessionId::parse(s).unwrap()
}

/// Every row of the fixture, ordered by name, with the values the writer wrote (and
/// the revisions the store gave them).
fn expected_rows() -> Vec<LlmRecord> {
    let row = |n: &str, id: &str| LlmRecord {
        id: LlmId::parse(id).unwrap(),
        name: name(n),
        kind: LlmKind::Virtual,
        status: LlmStatus::Active,
        provider_type: "openai".into(),
        model: "model".into(),
        tier: None,
        owner: "publisher-a".into(),
        provider_session_id: None,
        last_heartbeat_at: None,
        inactive_since: None,
        created_at: t(0),
        updated_at: t(0),
        revision: 1,
        binding: None,
        pool: None,
        max_concurrent: None,
    };
    let gone = LlmRecord {
        status: LlmStatus::Inactive,
        model: "mistral-7b".into(),
        provider_session_id: Some(session("ses_fixture_a")),
        last_heartbeat_at: Some(t(1_200)),
        inactive_since: Some(t(3_000)),
        created_at: t(1_100),
        updated_at: t(3_000),
        ..row("gone", "llm_fixture_gone")
    };
    let live = LlmRecord {
        model: "llama-3.1-70b-instruct".into(),
        provider_session_id: Some(session("ses_fixture_a")),
        // The touch, written by the flush.
        last_heartbeat_at: Some(t(9_250)),
        created_at: t(1_000),
        updated_at: t(2_000),
        revision: 2,
        ..row("live-virtual", "llm_fixture_live")
    };
    let public = LlmRecord {
        kind: LlmKind::Public,
        provider_type: "anthropic".into(),
        model: "claude-sonnet".into(),
        tier: Some("fast".into()),
        owner: "admin".into(),
        created_at: t(500),
        updated_at: t(500),
        ..row("public-fast", "llm_fixture_public")
    };
    let sleeping = LlmRecord {
        status: LlmStatus::Hibernating,
        provider_type: "vllm".into(),
        model: "qwen2.5-32b".into(),
        tier: Some("batch".into()),
        owner: "publisher-b".into(),
        provider_session_id: Some(session("ses_fixture_b")),
        inactive_since: Some(t(4_000)),
        created_at: t(1_300),
        updated_at: t(4_000),
        ..row("sleeping", "llm_fixture_sleeping")
    };
    let unicode = LlmRecord {
        model: "modèle-ünïcode-名前-🦀".into(),
        owner: "publisher-b".into(),
        provider_session_id: Some(session("ses_fixture_b")),
        last_heartbeat_at: Some(t(9_500)),
        created_at: t(5_000),
        updated_at: t(5_000),
        ..row("unicode-model", "llm_fixture_unicode")
    };
    vec![gone, live, public, sleeping, unicode]
}

/// The file's `meta` entry `key`, and whether it has the table `rows_by_replica`,
/// read with redb directly (the store is closed).
fn meta_of(path: &Path, key: &str) -> (Option<u64>, bool) {
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let value = txn
        .open_table(META)
        .unwrap()
        .get(key)
        .unwrap()
        .map(|v| v.value());
    let indexed = txn
        .list_tables()
        .unwrap()
        .any(|t| t.name() == "rows_by_replica");
    (value, indexed)
}

fn names(rows: &[LlmRecord]) -> Vec<&str> {
    rows.iter().map(|r| r.name.as_str()).collect()
}

/// What must hold of a store holding the fixture's rows: every field, and every
/// index the queries read.
async fn assert_holds_the_fixture(store: &RedbStore) {
    let expected = expected_rows();
    assert_eq!(
        store.list().await.unwrap(),
        expected,
        "every row, every field"
    );
    for want in &expected {
        assert_eq!(store.get(&want.name).await.unwrap().as_ref(), Some(want));
    }
    let a = store.by_session(&session("ses_fixture_a")).await.unwrap();
    assert_eq!(names(&a), ["gone", "live-virtual"]);
    let b = store.by_session(&session("ses_fixture_b")).await.unwrap();
    assert_eq!(names(&b), ["sleeping", "unicode-model"]);
    let stale = store.stale_virtuals(Timestamp::MAX).await.unwrap();
    assert_eq!(names(&stale), ["live-virtual", "unicode-model"]);
    assert!(store.stale_virtuals(t(9_250)).await.unwrap().is_empty());
    let expired = store.expired_inactives(Timestamp::MAX).await.unwrap();
    assert_eq!(names(&expired), ["gone"]);
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.rows, expected.len());
}

#[tokio::test]
async fn the_v1_fixture_is_upgraded_in_place_once_and_reads_back_every_field() {
    let (_dir, path) = copy_of_fixture();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(1), false),
        "a v1 file"
    );
    assert_eq!(meta_of(&path, "last_stamp"), (Some(3), false));

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade: one transaction");
    assert_holds_the_fixture(&store).await;
    let replica = ReplicaId::parse("gw-1").unwrap();
    assert!(
        store.bound_to(&replica).await.unwrap().is_empty(),
        "no v1 row is bound"
    );
    store.close().await.unwrap();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(SCHEMA_VERSION), true),
        "version 2, with the replica index"
    );
    assert_eq!(
        meta_of(&path, "last_stamp"),
        (Some(3), true),
        "the upgrade is no row write"
    );

    // Opened again: already version 2, so nothing is written.
    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0, "no second upgrade");
    assert_holds_the_fixture(&store).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn an_upgraded_file_takes_bindings_and_keeps_them_across_a_reopen() {
    let (_dir, path) = copy_of_fixture();
    let store = RedbStore::open(&path).await.unwrap();
    let (r1, r2) = (
        ReplicaId::parse("gw-1").unwrap(),
        ReplicaId::parse("gw-2").unwrap(),
    );
    let bind = |mut r: LlmRecord, replica: &ReplicaId, epoch| {
        r.binding = Some(ChannelBinding {
            replica: replica.clone(),
            epoch,
        });
        Write::Update(r)
    };
    let live = store.get(&name("live-virtual")).await.unwrap().unwrap();
    let unicode = store.get(&name("unicode-model")).await.unwrap().unwrap();
    let sleeping = store.get(&name("sleeping")).await.unwrap().unwrap();
    let written = store
        .write(vec![
            bind(live, &r1, 7),
            bind(unicode, &r1, u64::MAX),
            bind(sleeping, &r2, 1),
        ])
        .await
        .unwrap();
    assert_eq!(
        written.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [3, 2, 2],
        "revisions go on from the fixture's"
    );
    let on_r1 = store.bound_to(&r1).await.unwrap();
    assert_eq!(names(&on_r1), ["live-virtual", "unicode-model"]);
    assert_eq!(on_r1, written[..2], "every field, the binding included");
    store.close().await.unwrap();
    assert_eq!(meta_of(&path, "last_stamp").0, Some(4), "stamps go on too");

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0);
    assert_eq!(store.bound_to(&r1).await.unwrap(), written[..2]);
    assert_eq!(store.bound_to(&r2).await.unwrap(), written[2..]);
    // The rows not rebound are as the old code wrote them.
    let mut expected = expected_rows();
    for w in &written {
        let i = expected.iter().position(|e| e.name == w.name).unwrap();
        expected[i] = w.clone();
    }
    assert_eq!(store.list().await.unwrap(), expected);
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    // A binding moved off a replica leaves its index.
    let mut live = store.get(&name("live-virtual")).await.unwrap().unwrap();
    live.binding = None;
    store.write(vec![Write::Update(live)]).await.unwrap();
    assert_eq!(
        names(&store.bound_to(&r1).await.unwrap()),
        ["unicode-model"]
    );
    store.close().await.unwrap();
}
