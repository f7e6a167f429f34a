//! Core benchmarks: the in-process task round trip (enqueue → deliver → outcome), and
//! the GC sweep over a large registry where few rows are stale.
//!
//! Run with: `cargo bench -p virtual-llm-core --bench core`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use virtual_llm_core::protocol::{GatewayFrame, LlmSpec, RegisterRequest, TaskResult};
use virtual_llm_core::testkit::{ManualClock, at, record};
use virtual_llm_core::{
    ChannelSink, Gateway, InferRequest, LlmName, LlmStatus, MemoryStore, Principal, Role,
    SendError, Store, Write,
};

/// A channel that drops frames, so the benchmark measures the core and not a queue.
#[derive(Debug)]
struct NullSink;

impl ChannelSink for NullSink {
    fn send(&self, frame: GatewayFrame) -> Result<(), SendError> {
        black_box(frame);
        Ok(())
    }
}

fn task_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let alice = Principal::new("alice", [Role::Publisher]);
    let client = Principal::new("carol", [Role::Client]);
    let (gw, session, row, _binding) = rt.block_on(async {
        let gw = Gateway::builder(Arc::new(MemoryStore::new()))
            .start()
            .await
            .unwrap();
        let req = RegisterRequest {
            provider_session_id: None,
            protocol_version: None,
            llms: vec![LlmSpec {
                name: LlmName::parse("llm").unwrap(),
                provider_type: "openai".into(),
                model: "m".into(),
                tier: None,
                pool: None,
                max_concurrent: None,
                state: None,
            }],
        };
        let session = gw.register(&alice, req).await.unwrap().provider_session_id;
        let binding = gw.bind(&alice, &session, Arc::new(NullSink)).await.unwrap();
        let row = gw.route(&client, "llm").await.unwrap().rows.remove(0);
        (gw, session, row, binding)
    });
    let body = json!({"model": "llm", "messages": [{"role": "user", "content": "hi"}]});
    let answer = json!({"choices": [{"message": {"content": "hello"}}]});
    let mut group = c.benchmark_group("task");
    group.throughput(Throughput::Elements(1));
    group.bench_function("round_trip_complete", |b| {
        b.to_async(&rt).iter(|| async {
            let request = InferRequest {
                llm: "llm".into(),
                stream: false,
                body: body.clone(),
                timeout: None,
            };
            let handle = gw.start_task(&client, &row, request).unwrap();
            let id = handle.id().clone();
            let result = TaskResult::Completed {
                status: 200,
                body: answer.clone(),
                retry_after: None,
            };
            gw.deliver(&alice, &session, &id, result).await.unwrap();
            black_box(handle.into_reply().await.unwrap());
        });
    });
    group.bench_function("round_trip_stream_4_chunks", |b| {
        b.to_async(&rt).iter(|| async {
            let request = InferRequest {
                llm: "llm".into(),
                stream: true,
                body: body.clone(),
                timeout: None,
            };
            let mut handle = gw.start_task(&client, &row, request).unwrap();
            let id = handle.id().clone();
            for i in 0..4 {
                let chunk = TaskResult::Chunk {
                    data: "{}".into(),
                    done: i == 3,
                    seq: Some(i),
                };
                gw.deliver(&alice, &session, &id, chunk).await.unwrap();
            }
            while let Some(event) = handle.next().await {
                black_box(event.unwrap());
            }
        });
    });
    group.finish();
}

/// A gateway over `total` live virtual rows, the first `stale` with an old heartbeat.
fn registry(
    rt: &tokio::runtime::Runtime,
    total: usize,
    stale: usize,
) -> (Gateway, Arc<MemoryStore>) {
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let clock = ManualClock::new(at(1_000_000));
        let gw = Gateway::builder(store.clone())
            .clock(Arc::new(clock))
            .start()
            .await
            .unwrap();
        for chunk in (0..total).collect::<Vec<_>>().chunks(1000) {
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
        (gw, store)
    })
}

/// Makes the first `stale` rows live with an old heartbeat again, undoing a sweep.
async fn restale(store: &MemoryStore, stale: usize) {
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("gc_sweep");
    for (total, stale) in [
        (100_000, 1_000),
        (100_000, 0),
        (10_000, 1_000),
        (100_000, 10_000),
    ] {
        let (gw, store) = registry(&rt, total, stale);
        group.bench_function(format!("{total}_rows_{stale}_stale"), |b| {
            // Only the sweep is timed; re-staling the rows between sweeps is not.
            b.to_async(&rt).iter_custom(|iters| {
                let (gw, store) = (gw.clone(), store.clone());
                async move {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        restale(&store, stale).await;
                        let started = Instant::now();
                        let report = gw.sweep().await.unwrap();
                        timed += started.elapsed();
                        assert_eq!(report.marked_inactive, stale);
                    }
                    timed
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, task_round_trip, gc_sweep);
criterion_main!(benches);
