//! Durability across versions: `tests/fixtures/registry-v1.redb`, written by the
//! release before schema version 2 (see `tests/fixtures/README.md`), opens with this
//! code, and every row comes back with every field as the old code wrote it.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::path::{Path, PathBuf};

use common::name;
use tempfile::TempDir;
use virtual_llm_core::{LlmId, LlmKind, LlmRecord, LlmStatus, SessionId, Store, Timestamp};
use virtual_llm_redb::RedbStore;

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
async fn the_v1_fixture_reads_back_every_field() {
    let (_dir, path) = copy_of_fixture();
    let store = RedbStore::open(&path).await.unwrap();
    assert_holds_the_fixture(&store).await;
    store.close().await.unwrap();
}
