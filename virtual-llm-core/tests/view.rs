//! The registry view (SPEC §18, "no store round trip per request"): what it keeps is
//! served from memory, this gateway's own writes reach it at once, a read under way
//! when a write lands is not kept, another gateway's writes reach it through the
//! store's change feed at once (everything is stale when the feed falls behind),
//! and within `registryStaleness` through a store without a feed; a store that
//! cannot be read is answered with the rows read last. Time is tokio's paused clock.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;
use virtual_llm_core::protocol::{LlmSpec, PROTOCOL_VERSION, RegisterRequest};
use virtual_llm_core::testkit::{FailingStore, record};
use virtual_llm_core::{
    Config, Gateway, LlmName, LlmRecord, MemoryStore, Principal, RegistryView, ReplicaId, Role,
    SessionId, Store, StoreError, Timestamp, Write,
};

const STALENESS: Duration = Duration::from_secs(1);

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

fn member(n: &str, pool: &str) -> LlmRecord {
    let mut r = record(n);
    r.pool = Some(name(pool));
    r
}

fn names(rows: &[LlmRecord]) -> Vec<String> {
    let mut names: Vec<String> = rows.iter().map(|r| r.name.to_string()).collect();
    names.sort();
    names
}

async fn insert(store: &dyn Store, rows: Vec<LlmRecord>) -> Vec<LlmRecord> {
    store
        .write(rows.into_iter().map(Write::Insert).collect())
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn what_the_view_keeps_is_served_without_the_store_until_it_is_stale() {
    let store = Arc::new(FailingStore::new(Arc::new(MemoryStore::new())));
    insert(
        &*store,
        vec![member("a", "p"), member("b", "p"), record("solo")],
    )
    .await;
    let view = RegistryView::new(store.clone(), STALENESS);
    assert_eq!(
        names(&view.pool(&name("p")).await.unwrap().unwrap()),
        ["a", "b"]
    );
    assert_eq!(view.row(&name("a")).await.unwrap().unwrap().name, name("a"));

    store.fail_reads(true);
    let kept = view.pool(&name("p")).await.expect("served from memory");
    assert_eq!(names(&kept.unwrap()), ["a", "b"]);
    assert!(view.row(&name("a")).await.is_ok(), "a row is kept too");
    assert_eq!(store.injected(), 0, "the store was not read");

    tokio::time::advance(STALENESS).await;
    // A stale entry is read from the store again; when that read fails, the rows
    // read last are served rather than the store's error (the store is away).
    let kept = view.pool(&name("p")).await.expect("the rows read last");
    assert_eq!(names(&kept.unwrap()), ["a", "b"]);
    assert_eq!(
        store.injected(),
        1,
        "a stale entry is read from the store again"
    );
    assert_eq!(view.row(&name("a")).await.unwrap().unwrap().name, name("a"));
    assert_eq!(
        store.injected(),
        2,
        "a stale row is read from the store again"
    );
    // What the view never read is the store's error.
    assert!(view.pool(&name("other")).await.is_err());
    assert!(view.row(&name("solo")).await.is_err());
    store.fail_reads(false);
    assert_eq!(
        names(&view.pool(&name("p")).await.unwrap().unwrap()),
        ["a", "b"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_view_with_no_staleness_reads_the_store_every_time() {
    let store = Arc::new(FailingStore::new(Arc::new(MemoryStore::new())));
    insert(&*store, vec![member("a", "p")]).await;
    let view = RegistryView::new(store.clone(), Duration::ZERO);
    assert!(view.pool(&name("p")).await.unwrap().is_some());
    store.fail_reads(true);
    assert!(view.pool(&name("p")).await.is_err());
    assert!(view.row(&name("a")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn an_invalidated_row_is_read_again_with_its_old_and_new_pool() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let rows = insert(&*store, vec![member("a", "p"), member("b", "p")]).await;
    let view = RegistryView::new(store.clone(), STALENESS);
    assert_eq!(
        names(&view.pool(&name("p")).await.unwrap().unwrap()),
        ["a", "b"]
    );
    assert!(
        view.pool(&name("q")).await.unwrap().is_none(),
        "no pool q yet"
    );
    assert!(view.row(&name("b")).await.unwrap().is_some());

    // `b` moves from pool p to pool q: both pools and the row are read again.
    let mut moved = rows[1].clone();
    moved.pool = Some(name("q"));
    let written = store.write(vec![Write::Update(moved)]).await.unwrap();
    view.invalidate(&written[0]);
    assert_eq!(names(&view.pool(&name("p")).await.unwrap().unwrap()), ["a"]);
    assert_eq!(names(&view.pool(&name("q")).await.unwrap().unwrap()), ["b"]);
    assert_eq!(
        view.row(&name("b")).await.unwrap().unwrap().pool,
        Some(name("q"))
    );

    // A new member of a pool the view holds.
    let added = insert(&*store, vec![member("c", "p")]).await;
    view.invalidate(&added[0]);
    assert_eq!(
        names(&view.pool(&name("p")).await.unwrap().unwrap()),
        ["a", "c"]
    );

    // A deleted member.
    let a = store.get(&name("a")).await.unwrap().unwrap();
    store
        .write(vec![Write::Delete {
            name: a.name.clone(),
            id: a.id.clone(),
            revision: a.revision,
        }])
        .await
        .unwrap();
    view.forget(&a.name);
    assert_eq!(names(&view.pool(&name("p")).await.unwrap().unwrap()), ["c"]);
    assert!(view.row(&name("a")).await.unwrap().is_none());
}

/// A store whose `by_pool` waits for a permit while `hold` is set, and counts its
/// reads.
struct Gated {
    inner: MemoryStore,
    gate: Semaphore,
    reads: AtomicUsize,
}

impl fmt::Debug for Gated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gated")
    }
}

#[async_trait]
impl Store for Gated {
    async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        self.inner.get(name).await
    }
    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.list().await
    }
    async fn by_session(&self, s: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.by_session(s).await
    }
    async fn by_pool(&self, p: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let rows = self.inner.by_pool(p).await;
        let _permit = self.gate.acquire().await.unwrap();
        rows
    }
    async fn bound_to(&self, r: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.bound_to(r).await
    }
    async fn stale_virtuals(&self, c: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.stale_virtuals(c).await
    }
    async fn expired_inactives(&self, c: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.expired_inactives(c).await
    }
    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.write(batch).await
    }
    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        self.inner.touch(names, at).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_read_under_way_when_a_write_lands_is_not_kept() {
    let store = gated(0);
    insert(&*store, vec![member("a", "p")]).await;
    let view = Arc::new(RegistryView::new(store.clone(), STALENESS));

    // The read takes the rows as they were, then waits at the gate.
    let reading = tokio::spawn({
        let view = view.clone();
        async move { view.pool(&name("p")).await.unwrap().unwrap() }
    });
    while store.reads.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let added = insert(&*store, vec![member("b", "p")]).await;
    view.invalidate(&added[0]);
    store.gate.add_permits(usize::MAX >> 4);
    assert_eq!(
        names(&reading.await.unwrap()),
        ["a"],
        "read before the write"
    );

    let after = view.pool(&name("p")).await.unwrap().unwrap();
    assert_eq!(names(&after), ["a", "b"], "the older read was not kept");
    assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    view.pool(&name("p")).await.unwrap();
    assert_eq!(
        store.reads.load(Ordering::SeqCst),
        2,
        "the second read is kept"
    );
}

fn alice() -> Principal {
    Principal::new("alice", [Role::Publisher])
}

fn client() -> Principal {
    Principal::new("carol", [Role::Client])
}

async fn publish(on: &Gateway, n: &str, pool: &str) {
    let mut spec = LlmSpec::new(name(n), "openai", "m");
    spec.pool = Some(name(pool));
    on.register(
        &alice(),
        RegisterRequest {
            provider_session_id: None,
            protocol_version: Some(PROTOCOL_VERSION),
            llms: vec![spec],
            agents: Vec::new(),
            capabilities: Vec::new(),
        },
    )
    .await
    .unwrap();
}

async fn routed(on: &Gateway, model: &str) -> Vec<String> {
    names(&on.route(&client(), model).await.unwrap().rows)
}

#[tokio::test(start_paused = true)]
async fn a_gateways_own_writes_reach_its_routes_at_once() {
    let gateway = Gateway::builder(Arc::new(MemoryStore::new()))
        .start()
        .await
        .unwrap();
    publish(&gateway, "box-a", "llama").await;
    assert_eq!(routed(&gateway, "llama").await, ["box-a"]);
    publish(&gateway, "box-b", "llama").await;
    assert_eq!(
        routed(&gateway, "llama").await,
        ["box-a", "box-b"],
        "no time passed: the register itself reached the view"
    );
    assert_eq!(routed(&gateway, "box-b").await, ["box-b"]);
}

fn gated(permits: usize) -> Arc<Gated> {
    Arc::new(Gated {
        inner: MemoryStore::new(),
        gate: Semaphore::new(permits),
        reads: AtomicUsize::new(0),
    })
}

async fn two_gateways(store: Arc<dyn Store>) -> (Gateway, Gateway) {
    let config = Config {
        registry_staleness: STALENESS,
        ..Config::default()
    };
    let start = |replica: &str| {
        Gateway::builder(store.clone())
            .config(config.clone())
            .replica(ReplicaId::parse(replica).unwrap())
            .start()
    };
    (start("gw-a").await.unwrap(), start("gw-b").await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn another_gateways_writes_reach_it_at_once_through_the_change_feed() {
    let (a, b) = two_gateways(Arc::new(MemoryStore::new())).await;
    publish(&a, "box-a", "llama").await;
    assert_eq!(routed(&b, "llama").await, ["box-a"]);
    publish(&a, "box-b", "llama").await;
    assert_eq!(
        routed(&b, "llama").await,
        ["box-a", "box-b"],
        "no time passed: the feed told b"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_feed_another_gateways_writes_reach_it_within_the_staleness_bound() {
    let store = gated(usize::MAX >> 4);
    assert!(store.changes().is_none(), "this store has no feed");
    let (a, b) = two_gateways(store).await;
    publish(&a, "box-a", "llama").await;
    assert_eq!(routed(&b, "llama").await, ["box-a"]);
    publish(&a, "box-b", "llama").await;
    assert_eq!(routed(&a, "llama").await, ["box-a", "box-b"]);
    assert_eq!(
        routed(&b, "llama").await,
        ["box-a"],
        "b routes with what it read, within the bound"
    );
    tokio::time::advance(STALENESS).await;
    assert_eq!(
        routed(&b, "llama").await,
        ["box-a", "box-b"],
        "and no longer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_feed_that_fell_behind_makes_the_view_forget_everything() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    insert(&*store, vec![member("a", "p")]).await;
    let view = RegistryView::new(store.clone(), STALENESS);
    assert_eq!(names(&view.pool(&name("p")).await.unwrap().unwrap()), ["a"]);
    // The change that matters first, then more than the feed holds.
    insert(&*store, vec![member("b", "p")]).await;
    for i in 0..2000 {
        insert(&*store, vec![member(&format!("q-{i}"), "q")]).await;
    }
    assert_eq!(
        names(&view.pool(&name("p")).await.unwrap().unwrap()),
        ["a", "b"],
        "the lost change is not missed"
    );
}
