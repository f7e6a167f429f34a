//! The schema on PostgreSQL: a new database gets the current version, recorded; a
//! store connecting again changes nothing; replicas connecting together to a new
//! database migrate it once; a database of a newer version (a later release) is
//! refused, untouched; and every lifecycle query is served by an index.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TempStore, postgres_installed, sql};
use futures::future::join_all;
use virtual_llm_core::StoreError;
use virtual_llm_postgres::{PgStore, SCHEMA_VERSION, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_database_gets_the_current_schema_once() {
    if !postgres_installed() {
        return;
    }
    let url = testing::fresh_database().await.unwrap();
    // Four replicas start together on an empty database.
    let stores = join_all((0..4).map(|_| PgStore::connect(&url))).await;
    for s in &stores {
        assert!(s.is_ok(), "{s:?}");
    }
    let db = sql(&url).await;
    let versions: Vec<i32> = db
        .query(
            "SELECT version FROM virtual_llm_schema ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    drop(stores);
    PgStore::connect(&url).await.unwrap();
    let count: i64 = db
        .query_one("SELECT count(*) FROM virtual_llm_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count,
        i64::from(SCHEMA_VERSION),
        "connecting again applies nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_untouched() {
    if !postgres_installed() {
        return;
    }
    let store = TempStore::new().await;
    let db = sql(&store.url).await;
    db.execute(
        "INSERT INTO virtual_llm_schema (version, description) VALUES ($1, 'from the future')",
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    db.batch_execute("ALTER TABLE virtual_llm_rows ADD COLUMN future text")
        .await
        .unwrap();
    let err = PgStore::connect(&store.url)
        .await
        .expect_err("a newer schema");
    match &err {
        StoreError::Incompatible { message } => {
            assert!(
                message.contains(&format!("version {}", SCHEMA_VERSION + 1)),
                "{message}"
            );
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    let future: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'virtual_llm_rows' AND column_name = 'future'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(future, 1, "the newer layout is left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_a_clear_unavailable() {
    // No server at all: a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/registry");
    let err = PgStore::connect(&url).await.expect_err("nothing listens");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("connecting to PostgreSQL"), "{text}");
    let err = PgStore::connect("postgres://[::1")
        .await
        .expect_err("bad URL");
    assert!(err.to_string().contains("URL"), "{err}");
}

/// The plan PostgreSQL picks for `query` on a registry of 20 000 rows.
async fn plan(db: &tokio_postgres::Client, query: &str) -> String {
    db.query(&format!("EXPLAIN {query}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lifecycle_query_is_served_by_an_index() {
    if !postgres_installed() {
        return;
    }
    let store = TempStore::new().await;
    let db = sql(&store.url).await;
    // 20 000 rows: live ones with heartbeats spread over a day, every tenth inactive,
    // 100 sessions, 200 pools, two replicas.
    db.batch_execute(
        "INSERT INTO virtual_llm_rows (name, id, revision, kind, status, provider_type, model, \
            owner, session, heartbeat_ms, inactive_since_ms, created_ms, updated_ms, \
            binding_replica, binding_epoch, pool_key, live_ms, inactive_ms) \
         SELECT 'row-' || i, 'id-' || i, 1, 'virtual', \
            CASE WHEN i % 10 = 0 THEN 'inactive' ELSE 'active' END, 'openai', 'm', 'o', \
            'session-' || (i % 100), i * 4000, \
            CASE WHEN i % 10 = 0 THEN i * 4000 END, 0, 0, \
            'replica-' || (i % 2), 1, 'pool-' || (i % 200), \
            CASE WHEN i % 10 <> 0 THEN i * 4000 END, \
            CASE WHEN i % 10 = 0 THEN i * 4000 END \
         FROM generate_series(1, 20000) AS i; \
         ANALYZE virtual_llm_rows",
    )
    .await
    .unwrap();
    for (query, index) in [
        (
            "SELECT * FROM virtual_llm_rows WHERE live_ms < 40000 ORDER BY live_ms, name",
            "virtual_llm_rows_live",
        ),
        (
            "SELECT * FROM virtual_llm_rows WHERE inactive_ms < 400000 ORDER BY inactive_ms, name",
            "virtual_llm_rows_inactive",
        ),
        (
            "SELECT * FROM virtual_llm_rows WHERE session = 'session-7' ORDER BY name",
            "virtual_llm_rows_session",
        ),
        (
            "SELECT * FROM virtual_llm_rows WHERE pool_key = 'pool-7' ORDER BY name",
            "virtual_llm_rows_pool",
        ),
        (
            "SELECT * FROM virtual_llm_rows WHERE lower(name) = ANY(ARRAY['row-7'])",
            "virtual_llm_rows_name_ci",
        ),
    ] {
        let plan = plan(&db, query).await;
        assert!(plan.contains(index), "{query}:\n{plan}");
        assert!(!plan.contains("Seq Scan"), "{query}:\n{plan}");
    }
    // The store's own queries answer the same.
    let stale = virtual_llm_core::Store::stale_virtuals(
        &*store.store,
        virtual_llm_core::Timestamp::from_millis(40_000),
    )
    .await
    .unwrap();
    assert_eq!(stale.len(), 9, "rows 1 to 9, heartbeats before 40 s");
}
