//! Durability across versions: `tests/fixtures/registry-v1.redb`, written by the
//! release before schema version 2 (see `tests/fixtures/README.md`), opens with this
//! code: it is upgraded in place (through version 2 to version 3), once, and every row
//! comes back with every field as the old code wrote it; the new indexes work on it
//! from then on. A version-2 file (made here from a current one, as a version-2 build
//! leaves it: no pool index, rows that may carry a `pool`) is upgraded the same way,
//! and an upgrade that fails leaves the file at its old version. A version-3 file
//! (rows that are never agents) is upgraded to version 4 by its version alone, and
//! takes agents' rows from then on.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::path::{Path, PathBuf};

use common::{TempStore, downgrade, name};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tempfile::TempDir;
use virtual_llm_core::testkit::record;
use virtual_llm_core::{
    ChannelBinding, LlmId, LlmKind, LlmRecord, LlmStatus, ReplicaId, SessionId, Store, StoreError,
    Timestamp, Write,
};
use virtual_llm_redb::{RedbStore, SCHEMA_VERSION};

const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const ROWS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("rows");

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
        upstream: None,
        agent: None,
        access: Default::default(),
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

/// The indexes versions 2, 3 and 5 added: whether a file has `rows_by_replica`,
/// `rows_by_pool` and `rows_by_folded`.
type Added = (bool, bool, bool);
const NONE_ADDED: Added = (false, false, false);
const V2_ADDED: Added = (true, false, false);
const V3_ADDED: Added = (true, true, false);
const ALL_ADDED: Added = (true, true, true);

/// The file's `meta` entry `key`, and which of the indexes later versions added it
/// has, read with redb directly (the store is closed).
fn meta_of(path: &Path, key: &str) -> (Option<u64>, Added) {
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let value = txn
        .open_table(META)
        .unwrap()
        .get(key)
        .unwrap()
        .map(|v| v.value());
    let has = |table: &str| txn.list_tables().unwrap().any(|t| t.name() == table);
    (
        value,
        (
            has("rows_by_replica"),
            has("rows_by_pool"),
            has("rows_by_folded"),
        ),
    )
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
    // Version 3 counts the hibernating row live too: the upgrade indexed it.
    let stale = store.stale_virtuals(Timestamp::MAX).await.unwrap();
    assert_eq!(names(&stale), ["sleeping", "live-virtual", "unicode-model"]);
    let older = store.stale_virtuals(t(9_250)).await.unwrap();
    assert_eq!(
        names(&older),
        ["sleeping"],
        "it has no heartbeat: the epoch"
    );
    let expired = store.expired_inactives(Timestamp::MAX).await.unwrap();
    assert_eq!(names(&expired), ["gone"]);
    // No v1 row has a pool: each is the pool of one named after it.
    for want in &expected {
        assert_eq!(
            store.by_pool(&want.name).await.unwrap(),
            std::slice::from_ref(want),
            "the pool {}",
            want.name
        );
    }
    assert!(store.by_pool(&name("deleted")).await.unwrap().is_empty());
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.rows, expected.len());
}

#[tokio::test]
async fn the_v1_fixture_is_upgraded_in_place_once_and_reads_back_every_field() {
    let (_dir, path) = copy_of_fixture();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(1), NONE_ADDED),
        "a v1 file"
    );
    assert_eq!(meta_of(&path, "last_stamp"), (Some(3), NONE_ADDED));

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade: one transaction");
    assert_holds_the_fixture(&store).await;
    let replica = ReplicaId::parse("gw-1").unwrap();
    assert!(
        store.bound_to(&replica).await.unwrap().is_empty(),
        "no v1 row is bound"
    );
    store.close().await.unwrap();
    assert_eq!(SCHEMA_VERSION, 5);
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(SCHEMA_VERSION), ALL_ADDED),
        "version 5, with the replica, pool and folded-name indexes"
    );
    assert_eq!(
        meta_of(&path, "last_stamp"),
        (Some(3), ALL_ADDED),
        "the upgrade is no row write"
    );

    // Opened again: already version 5, so nothing is written.
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

#[tokio::test]
async fn an_upgraded_file_takes_pools_and_keeps_them_across_a_reopen() {
    let (_dir, path) = copy_of_fixture();
    let store = RedbStore::open(&path).await.unwrap();
    // Two rows join the pool of `sleeping`, which stays the pool of its own name.
    let join = |mut r: LlmRecord| {
        r.pool = Some(name("sleeping"));
        r.max_concurrent = Some(2);
        Write::Update(r)
    };
    let live = store.get(&name("live-virtual")).await.unwrap().unwrap();
    let unicode = store.get(&name("unicode-model")).await.unwrap().unwrap();
    let written = store.write(vec![join(live), join(unicode)]).await.unwrap();
    let sleeping = store.get(&name("sleeping")).await.unwrap().unwrap();
    let pool = vec![written[0].clone(), sleeping.clone(), written[1].clone()];
    assert_eq!(store.by_pool(&name("sleeping")).await.unwrap(), pool);
    assert!(
        store
            .by_pool(&name("live-virtual"))
            .await
            .unwrap()
            .is_empty(),
        "a row that joined a pool leaves the pool of its own name"
    );
    store.close().await.unwrap();

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0);
    assert_eq!(store.by_pool(&name("sleeping")).await.unwrap(), pool);
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    // A row that leaves the pool is the pool of its own name again.
    let mut live = store.get(&name("live-virtual")).await.unwrap().unwrap();
    live.pool = None;
    let live = store
        .write(vec![Write::Update(live)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        names(&store.by_pool(&name("sleeping")).await.unwrap()),
        ["sleeping", "unicode-model"]
    );
    assert_eq!(store.by_pool(&name("live-virtual")).await.unwrap(), [live]);
    store.close().await.unwrap();
}

/// The rows of the version-2 file: `m1` and `m2` in the pool `llama` (with
/// capacities), `llama` and `solo` without a pool, `bound` in the pool `qwen` and
/// bound to the replica `gw-1`.
fn v2_rows() -> Vec<LlmRecord> {
    let mut rows = Vec::new();
    for (n, pool, capacity) in [
        ("bound", Some("qwen"), None),
        ("llama", None, None),
        ("m1", Some("llama"), Some(4)),
        ("m2", Some("llama"), Some(10_000)),
        ("solo", None, Some(1)),
    ] {
        let mut r = record(n);
        r.pool = pool.map(name);
        r.max_concurrent = capacity;
        if n == "bound" {
            r.binding = Some(ChannelBinding {
                replica: ReplicaId::parse("gw-1").unwrap(),
                epoch: 7,
            });
        }
        rows.push(r);
    }
    rows
}

/// A closed version-2 file holding [`v2_rows`], and the rows as stored, ordered by
/// name. Written by this build, then made what a version-2 build leaves: no pool
/// index, version 2; the rows keep their `pool`, which the last version-2 build
/// (the commit before schema version 3) already wrote.
async fn v2_file() -> (TempStore, Vec<LlmRecord>) {
    let file = TempStore::new().await;
    let written = file
        .write(v2_rows().into_iter().map(Write::Insert).collect())
        .await
        .unwrap();
    file.close().await.unwrap();
    downgrade(&file.path(), 2);
    assert_eq!(
        meta_of(&file.path(), "schema_version"),
        (Some(2), V2_ADDED),
        "a v2 file"
    );
    (file, written)
}

/// What must hold of a store holding the version-2 file's rows.
async fn assert_holds_the_v2_rows(store: &RedbStore, rows: &[LlmRecord]) {
    assert_eq!(store.list().await.unwrap(), rows, "every row, every field");
    let llama = store.by_pool(&name("llama")).await.unwrap();
    assert_eq!(names(&llama), ["llama", "m1", "m2"]);
    assert_eq!(llama, rows[1..4], "every field, pool and capacity included");
    assert_eq!(store.by_pool(&name("qwen")).await.unwrap(), rows[..1]);
    assert_eq!(store.by_pool(&name("solo")).await.unwrap(), rows[4..]);
    for in_a_pool in ["bound", "m1", "m2"] {
        assert!(
            store.by_pool(&name(in_a_pool)).await.unwrap().is_empty(),
            "{in_a_pool} is in a pool named otherwise"
        );
    }
    let replica = ReplicaId::parse("gw-1").unwrap();
    assert_eq!(
        store.bound_to(&replica).await.unwrap(),
        rows[..1],
        "the v2 replica index, kept"
    );
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.rows, rows.len());
}

#[tokio::test]
async fn a_v2_file_is_upgraded_in_place_once_and_every_row_is_indexed_by_pool() {
    let (file, rows) = v2_file().await;
    let path = file.path();
    let (stamp, _) = meta_of(&path, "last_stamp");

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade: one transaction");
    assert_holds_the_v2_rows(&store, &rows).await;
    store.close().await.unwrap();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(SCHEMA_VERSION), ALL_ADDED),
        "version 5, with the pool and folded-name indexes"
    );
    assert_eq!(
        meta_of(&path, "last_stamp"),
        (stamp, ALL_ADDED),
        "the upgrade is no row write"
    );

    // Opened again: already version 5, so nothing is written.
    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0, "no second upgrade");
    assert_holds_the_v2_rows(&store, &rows).await;
    // The index follows writes from then on.
    let mut m1 = store.get(&name("m1")).await.unwrap().unwrap();
    m1.pool = Some(name("qwen"));
    store.write(vec![Write::Update(m1)]).await.unwrap();
    assert_eq!(
        names(&store.by_pool(&name("qwen")).await.unwrap()),
        ["bound", "m1"]
    );
    assert_eq!(
        names(&store.by_pool(&name("llama")).await.unwrap()),
        ["llama", "m2"]
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn an_upgrade_that_fails_leaves_the_file_at_its_old_version() {
    let (file, rows) = v2_file().await;
    let path = file.path();
    // A torn row: the upgrade reads every row, and stops at this one.
    let good = {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let good = {
            let mut table = txn.open_table(ROWS).unwrap();
            let good = table.get("m2").unwrap().unwrap().value().to_vec();
            table.insert("m2", &good[..good.len() / 2]).unwrap();
            good
        };
        txn.commit().unwrap();
        good
    };
    let err = RedbStore::open(&path).await.expect_err("a torn row");
    assert!(
        matches!(&err, StoreError::Corrupted { message } if message.contains("\"m2\"")),
        "{err:?}"
    );
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(2), V2_ADDED),
        "still version 2, without a pool index"
    );
    // Mended, the file upgrades whole.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(ROWS)
            .unwrap()
            .insert("m2", good.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade");
    assert_holds_the_v2_rows(&store, &rows).await;
    store.close().await.unwrap();
}

/// A version-3 file (made here from a current one: version 4 added no table, only
/// rows that may carry an `agent`) is upgraded in place by its version alone, in one
/// commit, every row as it was; from then on it stores an agent's row, persona and
/// all, across a reopen.
#[tokio::test]
async fn a_v3_file_is_upgraded_and_takes_agents_rows() {
    let file = TempStore::new().await;
    let rows = file
        .write(v2_rows().into_iter().map(Write::Insert).collect())
        .await
        .unwrap();
    file.close().await.unwrap();
    let path = file.path();
    downgrade(&path, 3);
    assert_eq!(meta_of(&path, "schema_version"), (Some(3), V3_ADDED));
    let (stamp, _) = meta_of(&path, "last_stamp");

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade: one transaction");
    assert_holds_the_v2_rows(&store, &rows).await;
    let mut agent = record("helper");
    agent.agent = Some(virtual_llm_core::agent::Persona {
        llm: name("llama"),
        description: Some("helps".into()),
        system_prompt: Some("You help.".into()),
        default_params: serde_json::json!({"temperature": 0.5}).as_object().cloned(),
    });
    let written = store
        .write(vec![Write::Insert(agent)])
        .await
        .unwrap()
        .remove(0);
    store.close().await.unwrap();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(SCHEMA_VERSION), ALL_ADDED)
    );
    assert!(meta_of(&path, "last_stamp").0 > stamp);

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0, "no second upgrade");
    assert_eq!(
        store.get(&name("helper")).await.unwrap(),
        Some(written),
        "the agent's row, persona and all"
    );
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    store.close().await.unwrap();
}

/// A version-4 file is upgraded to 5 in one commit, every row indexed under its
/// folded name; rows a version-4 build let in beside each other (`llama`, `LLAMA`) are
/// both kept, and while either exists no third look-alike is inserted. Once both are
/// gone the name is free again.
#[tokio::test]
async fn a_v4_file_is_upgraded_to_5_and_keeps_its_lookalikes() {
    let file = TempStore::new().await;
    let mut rows = file
        .write(v2_rows().into_iter().map(Write::Insert).collect())
        .await
        .unwrap();
    file.close().await.unwrap();
    let path = file.path();
    // What a version-4 build allowed: a look-alike of an existing name. Made here by
    // hiding `llama` from the folded index while `LLAMA` is inserted; the downgrade
    // then drops that index.
    let folded: TableDefinition<'static, (&str, &str), ()> = TableDefinition::new("rows_by_folded");
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(folded)
            .unwrap()
            .remove(("llama", "llama"))
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).await.unwrap();
    rows.extend(
        store
            .write(vec![Write::Insert(record("LLAMA"))])
            .await
            .unwrap(),
    );
    store.close().await.unwrap();
    downgrade(&path, 4);
    assert_eq!(meta_of(&path, "schema_version"), (Some(4), V3_ADDED));

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade: one transaction");
    let listed = store.list().await.unwrap();
    assert!(listed.iter().any(|r| r.name.as_str() == "LLAMA"), "kept");
    for r in rows.drain(..) {
        assert_eq!(store.get(&r.name).await.unwrap().map(|g| g.id), Some(r.id));
    }
    assert_eq!(
        store
            .get_ignoring_case(&name("Llama"))
            .await
            .unwrap()
            .map(|r| r.name.to_string()),
        Some("LLAMA".to_owned()),
        "the first by name holds it"
    );
    let err = store
        .write(vec![Write::Insert(record("Llama"))])
        .await
        .expect_err("a third look-alike");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    store.close().await.unwrap();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(SCHEMA_VERSION), ALL_ADDED)
    );
    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0, "no second upgrade");
    for n in ["llama", "LLAMA"] {
        let r = store.get(&name(n)).await.unwrap().unwrap();
        store
            .write(vec![Write::Delete {
                name: r.name.clone(),
                id: r.id.clone(),
                revision: r.revision,
            }])
            .await
            .unwrap();
    }
    store
        .write(vec![Write::Insert(record("Llama"))])
        .await
        .expect("free once both are gone");
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    store.close().await.unwrap();
}

/// A version-4 file (made here from a current one) is upgraded in place in one
/// commit, every row as it was; from then on it stores a row's access across a
/// reopen.
#[tokio::test]
async fn a_v4_file_is_upgraded_to_5_and_keeps_rows_access() {
    let file = TempStore::new().await;
    let rows = file
        .write(v2_rows().into_iter().map(Write::Insert).collect())
        .await
        .unwrap();
    file.close().await.unwrap();
    let path = file.path();
    downgrade(&path, 4);
    assert_eq!(meta_of(&path, "schema_version"), (Some(4), V3_ADDED));

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 1, "the upgrade: one transaction");
    assert_holds_the_v2_rows(&store, &rows).await;
    let mut private = record("private");
    private.access = virtual_llm_core::access::Access::Principals(vec!["team-a".into()]);
    let mut mine = record("mine");
    mine.access = virtual_llm_core::access::Access::Owner;
    let written = store
        .write(vec![Write::Insert(private), Write::Insert(mine)])
        .await
        .unwrap();
    store.close().await.unwrap();
    assert_eq!(
        meta_of(&path, "schema_version"),
        (Some(SCHEMA_VERSION), ALL_ADDED)
    );

    let store = RedbStore::open(&path).await.unwrap();
    assert_eq!(store.stats().commits, 0, "no second upgrade");
    for row in written {
        assert_eq!(
            store.get(&row.name).await.unwrap(),
            Some(row),
            "the row, access and all"
        );
    }
    store.close().await.unwrap();
}
