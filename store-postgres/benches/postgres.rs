//! The PostgreSQL store on a real server started for the run (`fsync` on, data under
//! the system's temporary directory): heartbeat throughput, sustained over 5 s, at the
//! store (`Store::touch`, one row each) and through `Gateway::heartbeat` (a session of
//! 4 rows each), one publisher after another and many at once, with how many
//! statements carried them; register latency (p50 and p99 from a custom loop, besides
//! criterion's mean); a burst of 1 000 registrations 100 at a time; the GC sweep over
//! 100 000 rows with 1 000 stale; `Store::get`, the one store call on every relayed
//! request.
//!
//! Run with: `cargo bench -p virtual-llm-postgres --bench postgres`
//!
//! Needs `initdb` and `postgres` (PATH or /usr/lib/postgresql/*/bin); without them it
//! says so and measures nothing.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use virtual_llm_core::protocol::{LlmSpec, RegisterRequest};
use virtual_llm_core::testkit::{ManualClock, at, record};
use virtual_llm_core::{Gateway, LlmName, LlmStatus, Principal, Role, SessionId, Store, Write};
use virtual_llm_postgres::testing::{PgServer, available};
use virtual_llm_postgres::{PgOptions, PgStore};

/// How long each sustained heartbeat measurement runs.
const SUSTAINED: Duration = Duration::from_secs(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The server of the run, started once, `fsync` on.
fn server() -> Option<&'static PgServer> {
    static SERVER: std::sync::OnceLock<Option<PgServer>> = std::sync::OnceLock::new();
    SERVER
        .get_or_init(|| available(PgServer::start_durable()))
        .as_ref()
}

/// A store on a new database of the run's server.
async fn store(server: &PgServer) -> Arc<PgStore> {
    let url = server.create_database().await.unwrap();
    Arc::new(
        PgStore::connect_with(&url, PgOptions::default().max_connections(32))
            .await
            .unwrap(),
    )
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

fn publisher() -> Principal {
    Principal::new("alice", [Role::Publisher])
}

/// `tasks` tasks each calling `beat(i)` in a loop for `SUSTAINED`; returns the calls
/// done and the time taken.
async fn sustained<F, Fut>(tasks: usize, beat: F) -> (usize, Duration)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let beat = beat.clone();
            tokio::spawn(async move {
                let mut count = 0usize;
                while started.elapsed() < SUSTAINED {
                    beat(t + count * tasks).await;
                    count += 1;
                }
                count
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    (total, started.elapsed())
}

fn heartbeat_throughput(c: &mut Criterion) {
    const ROWS: usize = 10_000;
    const SESSIONS: usize = 1_000;
    const ROWS_PER_SESSION: usize = 4;
    let Some(server) = server() else { return };
    let rt = runtime();

    // At the store: one row per touch.
    let pg = rt.block_on(store(server));
    let names: Arc<Vec<LlmName>> = Arc::new(
        (0..ROWS)
            .map(|i| LlmName::parse(&format!("hb-{i:05}")).unwrap())
            .collect(),
    );
    rt.block_on(async {
        for chunk in names.chunks(1000) {
            let batch = chunk
                .iter()
                .map(|n| Write::Insert(record(n.as_str())))
                .collect();
            pg.write(batch).await.unwrap();
        }
    });
    for tasks in [1, 16, 256, 1024] {
        let before = pg.stats();
        let (count, elapsed) = rt.block_on(sustained(tasks, {
            let (pg, names) = (pg.clone(), names.clone());
            move |i| {
                let (pg, names) = (pg.clone(), names.clone());
                async move {
                    let n = &names[i % names.len()];
                    assert_eq!(pg.touch(std::slice::from_ref(n), at(5)).await.unwrap(), 1);
                }
            }
        }));
        let after = pg.stats();
        let flushes = after.heartbeat_flushes - before.heartbeat_flushes;
        println!(
            "touch/{tasks}: sustained {:.0} heartbeats/s over {:.1} s, {tasks} publishers at \
             once, {flushes} statements ({:.1} heartbeats each)",
            count as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            count as f64 / flushes.max(1) as f64,
        );
    }

    // Through the gateway: a session's heartbeat reads its rows, then touches them.
    let gw_store = rt.block_on(store(server));
    let gw = rt
        .block_on(Gateway::builder(gw_store.clone()).start())
        .unwrap();
    let sessions: Arc<Vec<SessionId>> = Arc::new(rt.block_on(async {
        let mut sessions = Vec::with_capacity(SESSIONS);
        for s in 0..SESSIONS {
            let names: Vec<String> = (0..ROWS_PER_SESSION)
                .map(|r| format!("gw-{s}-{r}"))
                .collect();
            let answer = gw
                .register(&publisher(), request(None, &names))
                .await
                .unwrap();
            sessions.push(answer.provider_session_id);
        }
        sessions
    }));
    for tasks in [1, 64, 256] {
        let before = gw_store.stats();
        let (count, elapsed) = rt.block_on(sustained(tasks, {
            let (gw, sessions) = (gw.clone(), sessions.clone());
            move |i| {
                let (gw, sessions) = (gw.clone(), sessions.clone());
                async move {
                    gw.heartbeat(&publisher(), &sessions[i % sessions.len()])
                        .await
                        .unwrap();
                }
            }
        }));
        let after = gw_store.stats();
        println!(
            "gateway_heartbeat/{tasks}: sustained {:.0} session heartbeats/s ({:.0} row \
             heartbeats/s, {ROWS_PER_SESSION} rows each) over {:.1} s, {tasks} publishers at \
             once, {} statements",
            count as f64 / elapsed.as_secs_f64(),
            (count * ROWS_PER_SESSION) as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            after.heartbeat_flushes - before.heartbeat_flushes,
        );
    }

    let mut group = c.benchmark_group("heartbeat");
    group.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    group.bench_function("gateway_one_after_another", |b| {
        b.to_async(&rt).iter(|| {
            next += 1;
            let session = sessions[next % sessions.len()].clone();
            let gw = gw.clone();
            async move { gw.heartbeat(&publisher(), &session).await.unwrap() }
        });
    });
    group.finish();
}

/// Registers `n` fresh publishers of one new LLM each; returns every latency, sorted.
async fn register_latencies(gw: &Gateway, prefix: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = request(None, &[format!("{prefix}-{i}")]);
        let started = Instant::now();
        gw.register(&publisher(), req).await.unwrap();
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
    let Some(server) = server() else { return };
    let rt = runtime();
    let pg = rt.block_on(store(server));
    let gw = rt.block_on(Gateway::builder(pg.clone()).start()).unwrap();
    let lat = rt.block_on(register_latencies(&gw, "lat", SAMPLES));
    let mean = lat.iter().sum::<Duration>() / u32::try_from(lat.len()).unwrap();
    println!(
        "register/postgres: {SAMPLES} registers one after another: p50 {:?}  p99 {:?}  max {:?}  \
         mean {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
        mean
    );
    let mut group = c.benchmark_group("register");
    group.sample_size(30);
    let mut next = 0usize;
    group.bench_function("postgres", |b| {
        b.to_async(&rt).iter(|| {
            next += 1;
            let (gw, req) = (gw.clone(), request(None, &[format!("crit-{next}")]));
            async move { gw.register(&publisher(), req).await.unwrap() }
        });
    });
    group.finish();

    // 1 000 registrations, 100 under way at any time.
    const TOTAL: usize = 1_000;
    const IN_FLIGHT: usize = 100;
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|t| {
                let gw = gw.clone();
                tokio::spawn(async move {
                    for i in (t..TOTAL).step_by(IN_FLIGHT) {
                        let req = request(None, &[format!("burst-{i}")]);
                        gw.register(&publisher(), req).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    println!(
        "register_burst/postgres: {TOTAL} registrations, {IN_FLIGHT} in flight: {:?}",
        started.elapsed()
    );
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
    let Some(server) = server() else { return };
    let rt = runtime();
    let pg = rt.block_on(store(server));
    let store: Arc<dyn Store> = pg.clone();
    let built = Instant::now();
    let gw = rt.block_on(registry(store.clone(), TOTAL, STALE));
    println!(
        "gc_sweep/postgres: built {TOTAL} rows in {:.1} s (not timed)",
        built.elapsed().as_secs_f64()
    );
    let mut reads = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let stale = rt
            .block_on(store.stale_virtuals(at(1_000_000 - 90)))
            .unwrap();
        reads.push(started.elapsed());
        assert_eq!(stale.len(), STALE);
    }
    reads.sort();
    println!(
        "gc_sweep/postgres: the stale query alone (1 000 of {TOTAL} rows): median {:?}",
        percentile(&reads, 0.5)
    );
    let mut writes = Vec::new();
    for _ in 0..20 {
        let rows = rt
            .block_on(store.stale_virtuals(at(1_000_000 - 90)))
            .unwrap();
        let batch: Vec<Write> = rows[..256]
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.model = format!("{}x", r.model.len() % 7);
                Write::Update(r)
            })
            .collect();
        let started = Instant::now();
        rt.block_on(store.write(batch)).unwrap();
        writes.push(started.elapsed());
    }
    writes.sort();
    println!(
        "gc_sweep/postgres: one batch of 256 updates alone: median {:?}",
        percentile(&writes, 0.5)
    );
    let mut sweeps = Vec::new();
    for _ in 0..20 {
        rt.block_on(restale(&*store, STALE));
        let started = Instant::now();
        let report = rt.block_on(gw.sweep()).unwrap();
        sweeps.push(started.elapsed());
        assert_eq!(report.marked_inactive, STALE);
    }
    sweeps.sort();
    println!(
        "gc_sweep/postgres: 20 sweeps of {TOTAL} rows with {STALE} stale: median {:?}  max {:?}",
        percentile(&sweeps, 0.5),
        sweeps[sweeps.len() - 1]
    );
    let mut group = c.benchmark_group("gc_sweep");
    // Each sample also pays an untimed re-stale of 1 000 rows: keep the run short.
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.bench_function(format!("postgres/{TOTAL}_rows_{STALE}_stale"), |b| {
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
    group.finish();
}

fn get_latency(c: &mut Criterion) {
    let Some(server) = server() else { return };
    let rt = runtime();
    let pg = rt.block_on(store(server));
    let names: Vec<LlmName> = (0..1000)
        .map(|i| LlmName::parse(&format!("get-{i:04}")).unwrap())
        .collect();
    rt.block_on(
        pg.write(
            names
                .iter()
                .map(|n| Write::Insert(record(n.as_str())))
                .collect(),
        ),
    )
    .unwrap();
    let mut group = c.benchmark_group("get");
    let mut next = 0usize;
    group.bench_function("postgres", |b| {
        b.to_async(&rt).iter(|| {
            next += 1;
            let (pg, name) = (pg.clone(), names[next % names.len()].clone());
            async move { pg.get(&name).await.unwrap().unwrap() }
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    gc_sweep,
    heartbeat_throughput,
    register_latency,
    get_latency
);
criterion_main!(benches);
