//! The redb store against the in-memory store, in the same run: heartbeat throughput
//! through `Gateway::heartbeat`, the GC sweep over 100 000 rows with 1 000 stale,
//! register latency (p50 and p99 from a custom measurement loop, printed, besides
//! criterion's mean), a burst of 1 000 registrations 100 at a time (what group commit
//! is for: many publishers connecting at once), `Store::get`, the one store call on
//! every relayed request, and `Store::by_pool` for a pool of 1 000 rows in a registry
//! of 10 000 (beside the scan of every row it replaces).
//!
//! Run with: `cargo bench -p virtual-llm-redb --bench redb`
//!
//! The redb file lives under the target directory (a real disk, so every commit pays
//! its fsync), not in a RAM-backed temporary directory.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;
use virtual_llm_core::protocol::{LlmSpec, RegisterRequest};
use virtual_llm_core::testkit::{ManualClock, at, record};
use virtual_llm_core::{
    Gateway, LlmName, LlmStatus, MemoryStore, Principal, Role, SessionId, Store, Write,
};
use virtual_llm_redb::RedbStore;

/// Sessions heartbeating in the throughput benchmark, and rows per session.
const SESSIONS: usize = 100;
const ROWS_PER_SESSION: usize = 4;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bench_dir() -> TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// The stores under test; the redb one keeps its directory alive.
struct Stores {
    memory: Arc<dyn Store>,
    redb: Arc<RedbStore>,
    _dir: TempDir,
}

async fn stores() -> Stores {
    let dir = bench_dir();
    let redb = Arc::new(
        RedbStore::open(dir.path().join("bench.redb"))
            .await
            .unwrap(),
    );
    Stores {
        memory: Arc::new(MemoryStore::new()),
        redb,
        _dir: dir,
    }
}

fn request(session: Option<&SessionId>, names: &[String]) -> RegisterRequest {
    RegisterRequest {
        agents: Vec::new(),
        provider_session_id: session.cloned(),
        protocol_version: None,
        llms: names
            .iter()
            .map(|n| LlmSpec {
                name: LlmName::parse(n).unwrap(),
                provider_type: "openai".into(),
                model: "m".into(),
                tier: None,
                pool: None,
                max_concurrent: None,
                state: None,
                access: Default::default(),
            })
            .collect(),
        capabilities: Vec::new(),
    }
}

/// A gateway (system clock) with `SESSIONS` sessions of `ROWS_PER_SESSION` rows.
async fn heartbeating(store: Arc<dyn Store>) -> (Gateway, Vec<SessionId>) {
    let gw = Gateway::builder(store).start().await.unwrap();
    let alice = Principal::new("alice", [Role::Publisher]);
    let mut sessions = Vec::with_capacity(SESSIONS);
    for s in 0..SESSIONS {
        let names: Vec<String> = (0..ROWS_PER_SESSION)
            .map(|r| format!("hb-{s}-{r}"))
            .collect();
        let answer = gw.register(&alice, request(None, &names)).await.unwrap();
        sessions.push(answer.provider_session_id);
    }
    (gw, sessions)
}

/// `publishers` tasks heartbeating their share of the sessions for 3 s; returns the
/// heartbeats done and the time taken.
async fn concurrent_heartbeats(
    gw: &Gateway,
    sessions: &[SessionId],
    publishers: usize,
) -> (usize, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let gw = gw.clone();
            let mine: Vec<SessionId> = sessions
                .iter()
                .skip(p)
                .step_by(publishers)
                .cloned()
                .collect();
            tokio::spawn(async move {
                let alice = Principal::new("alice", [Role::Publisher]);
                let mut count = 0usize;
                while started.elapsed() < Duration::from_secs(3) {
                    gw.heartbeat(&alice, &mine[count % mine.len()])
                        .await
                        .unwrap();
                    count += 1;
                }
                count
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total, started.elapsed())
}

fn heartbeat_throughput(c: &mut Criterion) {
    let rt = runtime();
    let s = rt.block_on(stores());
    let alice = Principal::new("alice", [Role::Publisher]);
    let mut group = c.benchmark_group("heartbeat");
    group.throughput(Throughput::Elements(1));
    let redb: Arc<dyn Store> = s.redb.clone();
    for (label, store) in [("memory", s.memory.clone()), ("redb", redb)] {
        let (gw, sessions) = rt.block_on(heartbeating(store));
        // Sustained: a fixed wall-clock window, the flusher committing as it goes.
        let (count, elapsed) = rt.block_on(async {
            let started = Instant::now();
            let mut count = 0usize;
            while started.elapsed() < Duration::from_secs(3) {
                let session = &sessions[count % sessions.len()];
                gw.heartbeat(&alice, session).await.unwrap();
                count += 1;
            }
            (count, started.elapsed())
        });
        println!(
            "heartbeat/{label}: sustained {:.0} heartbeats/s over {:.1} s, one after another \
             ({} rows each)",
            count as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            ROWS_PER_SESSION
        );
        let (count, elapsed) = rt.block_on(concurrent_heartbeats(&gw, &sessions, 16));
        println!(
            "heartbeat/{label}: sustained {:.0} heartbeats/s over {:.1} s, 16 publishers at once",
            count as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
        );
        let mut next = 0usize;
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| {
                next += 1;
                let session = sessions[next % sessions.len()].clone();
                let (gw, alice) = (gw.clone(), alice.clone());
                async move { gw.heartbeat(&alice, &session).await.unwrap() }
            });
        });
    }
    let stats = s.redb.stats();
    println!(
        "heartbeat/redb: {} flush commits wrote {} row heartbeats in the whole run",
        stats.flushes, stats.heartbeats_flushed
    );
    group.finish();
    rt.block_on(s.redb.close()).unwrap();
}

/// `total` live virtual rows, the first `stale` with an old heartbeat, and a gateway
/// over them (started first, so its restart recovery leaves them alone).
async fn registry(store: Arc<dyn Store>, total: usize, stale: usize) -> Gateway {
    let gw = Gateway::builder(store.clone())
        .clock(Arc::new(ManualClock::new(at(1_000_000))))
        .start()
        .await
        .unwrap();
    let indexes: Vec<usize> = (0..total).collect();
    for chunk in indexes.chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| {
                let mut r = record(&format!("row-{i:06}"));
                r.last_heartbeat_at = Some(if *i < stale { at(1) } else { at(1_000_000) });
                Write::Insert(r)
            })
            .collect();
        store.write(batch).await.unwrap();
    }
    gw
}

/// Makes the first `stale` rows live with an old heartbeat again, undoing a sweep.
async fn restale(store: &dyn Store, stale: usize) {
    let mut writes = Vec::with_capacity(stale);
    for i in 0..stale {
        let name = LlmName::parse(&format!("row-{i:06}")).unwrap();
        let mut r = store.get(&name).await.unwrap().unwrap();
        r.status = LlmStatus::Active;
        r.inactive_since = None;
        r.last_heartbeat_at = Some(at(1));
        writes.push(Write::Update(r));
    }
    for batch in writes.chunks(1000) {
        store.write(batch.to_vec()).await.unwrap();
    }
}

fn gc_sweep(c: &mut Criterion) {
    const TOTAL: usize = 100_000;
    const STALE: usize = 1_000;
    let rt = runtime();
    let s = rt.block_on(stores());
    let mut group = c.benchmark_group("gc_sweep");
    // Each sample also pays an untimed re-stale of 1 000 rows: keep the run short.
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    let redb: Arc<dyn Store> = s.redb.clone();
    for (label, store) in [("memory", s.memory.clone()), ("redb", redb)] {
        let built = Instant::now();
        let gw = rt.block_on(registry(store.clone(), TOTAL, STALE));
        println!(
            "gc_sweep/{label}: built {TOTAL} rows in {:.1} s (not timed)",
            built.elapsed().as_secs_f64()
        );
        group.bench_function(format!("{label}/{TOTAL}_rows_{STALE}_stale"), |b| {
            // Only the sweep is timed; re-staling the rows between sweeps is not.
            b.to_async(&rt).iter_custom(|iters| {
                let (gw, store) = (gw.clone(), store.clone());
                async move {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        restale(&*store, STALE).await;
                        let started = Instant::now();
                        let report = gw.sweep().await.unwrap();
                        timed += started.elapsed();
                        assert_eq!(report.marked_inactive, STALE);
                    }
                    timed
                }
            });
        });
    }
    group.finish();
    rt.block_on(s.redb.close()).unwrap();
}

/// Registers `n` fresh publishers of one new LLM each; returns every latency, sorted.
async fn register_latencies(gw: &Gateway, prefix: &str, n: usize) -> Vec<Duration> {
    let alice = Principal::new("alice", [Role::Publisher]);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = request(None, &[format!("{prefix}-{i}")]);
        let started = Instant::now();
        gw.register(&alice, req).await.unwrap();
        out.push(started.elapsed());
    }
    out.sort();
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn register_latency(c: &mut Criterion) {
    const SAMPLES: usize = 2_000;
    let rt = runtime();
    let s = rt.block_on(stores());
    let mut group = c.benchmark_group("register");
    group.sample_size(30);
    let redb: Arc<dyn Store> = s.redb.clone();
    for (label, store) in [("memory", s.memory.clone()), ("redb", redb)] {
        let gw = rt.block_on(Gateway::builder(store).start()).unwrap();
        let lat = rt.block_on(register_latencies(&gw, "lat", SAMPLES));
        let mean = lat.iter().sum::<Duration>() / u32::try_from(lat.len()).unwrap();
        println!(
            "register/{label}: {SAMPLES} registers: p50 {:?}  p99 {:?}  max {:?}  mean {:?}",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat[lat.len() - 1],
            mean
        );
        let mut next = 0usize;
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| {
                next += 1;
                let (gw, req) = (gw.clone(), request(None, &[format!("crit-{next}")]));
                async move {
                    let alice = Principal::new("alice", [Role::Publisher]);
                    gw.register(&alice, req).await.unwrap()
                }
            });
        });
    }
    group.finish();
    rt.block_on(s.redb.close()).unwrap();
}

/// Registers `total` fresh publishers of one new LLM each from `in_flight` tasks
/// registering one after another, so `in_flight` registrations are always under way;
/// returns the time until the last one is in.
async fn register_burst(gw: &Gateway, round: usize, total: usize, in_flight: usize) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let alice = Principal::new("alice", [Role::Publisher]);
                for i in (t..total).step_by(in_flight) {
                    let req = request(None, &[format!("burst-{round}-{i}")]);
                    gw.register(&alice, req).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

fn register_concurrent(c: &mut Criterion) {
    const TOTAL: usize = 1_000;
    const IN_FLIGHT: usize = 100;
    let rt = runtime();
    let s = rt.block_on(stores());
    let mut group = c.benchmark_group("register_burst");
    // One iteration is 1 000 durable registrations: a few seconds per sample at worst.
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(TOTAL as u64));
    let redb: Arc<dyn Store> = s.redb.clone();
    for (label, store) in [("memory", s.memory.clone()), ("redb", redb)] {
        let gw = rt.block_on(Gateway::builder(store).start()).unwrap();
        let before = s.redb.stats();
        let mut round = 0usize;
        group.bench_function(format!("{label}/{TOTAL}_by_{IN_FLIGHT}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let gw = gw.clone();
                let first = round;
                round += usize::try_from(iters).unwrap();
                async move {
                    let mut total = Duration::ZERO;
                    for r in first..first + usize::try_from(iters).unwrap() {
                        total += register_burst(&gw, r, TOTAL, IN_FLIGHT).await;
                    }
                    total
                }
            });
        });
        if label == "redb" {
            let after = s.redb.stats();
            println!(
                "register_burst/redb: {} registrations, {} write transactions committed",
                round * TOTAL,
                after.commits - before.commits
            );
        }
    }
    group.finish();
    rt.block_on(s.redb.close()).unwrap();
}

fn get_latency(c: &mut Criterion) {
    const ROWS: usize = 1_000;
    let rt = runtime();
    let s = rt.block_on(stores());
    let names: Vec<LlmName> = (0..ROWS)
        .map(|i| LlmName::parse(&format!("get-{i:04}")).unwrap())
        .collect();
    let mut group = c.benchmark_group("get");
    let redb: Arc<dyn Store> = s.redb.clone();
    for (label, store) in [("memory", s.memory.clone()), ("redb", redb)] {
        let batch = names
            .iter()
            .map(|n| Write::Insert(record(n.as_str())))
            .collect();
        rt.block_on(store.write(batch)).unwrap();
        let mut next = 0usize;
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| {
                next = (next + 7) % ROWS;
                let (store, name) = (store.clone(), names[next].clone());
                async move { store.get(&name).await.unwrap().unwrap() }
            });
        });
    }
    group.finish();
    rt.block_on(s.redb.close()).unwrap();
}

/// `Store::by_pool` for a pool of 1 000 rows in a registry of 10 000 (ten pools of
/// 1 000, queried in turn). `redb_list_scan` is what the trait's default does, a
/// `list` of every row filtered by pool key, on the same redb file: the cost the index
/// saves.
fn by_pool_latency(c: &mut Criterion) {
    const ROWS: usize = 10_000;
    const POOLS: usize = 10;
    const PER_POOL: usize = ROWS / POOLS;
    let rt = runtime();
    let s = rt.block_on(stores());
    let pools: Vec<LlmName> = (0..POOLS)
        .map(|p| LlmName::parse(&format!("pool-{p}")).unwrap())
        .collect();
    let mut group = c.benchmark_group("by_pool");
    let redb: Arc<dyn Store> = s.redb.clone();
    for (label, store) in [("memory", s.memory.clone()), ("redb", redb.clone())] {
        let indexes: Vec<usize> = (0..ROWS).collect();
        for chunk in indexes.chunks(1000) {
            let batch = chunk
                .iter()
                .map(|i| {
                    let mut r = record(&format!("pooled-{i:05}"));
                    r.pool = Some(pools[i % POOLS].clone());
                    Write::Insert(r)
                })
                .collect();
            rt.block_on(store.write(batch)).unwrap();
        }
        let mut next = 0usize;
        group.bench_function(format!("{label}/{PER_POOL}_of_{ROWS}"), |b| {
            b.to_async(&rt).iter(|| {
                next = (next + 1) % POOLS;
                let (store, pool) = (store.clone(), pools[next].clone());
                async move {
                    let rows = store.by_pool(&pool).await.unwrap();
                    assert_eq!(rows.len(), PER_POOL);
                    rows
                }
            });
        });
    }
    let mut next = 0usize;
    group.bench_function(format!("redb_list_scan/{PER_POOL}_of_{ROWS}"), |b| {
        b.to_async(&rt).iter(|| {
            next = (next + 1) % POOLS;
            let (store, pool) = (redb.clone(), pools[next].clone());
            async move {
                let mut rows = store.list().await.unwrap();
                rows.retain(|r| r.pool_key() == &pool);
                assert_eq!(rows.len(), PER_POOL);
                rows
            }
        });
    });
    group.finish();
    rt.block_on(s.redb.close()).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = heartbeat_throughput, gc_sweep, register_latency, register_concurrent, get_latency,
        by_pool_latency
}
criterion_main!(benches);
