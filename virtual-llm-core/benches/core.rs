//! Core benchmarks: the in-process task round trip (enqueue → deliver → outcome), the
//! GC sweep over a large registry where few rows are stale, and pools: choosing a row
//! among 1 000 (from loads, and from the ranks `LocalAdmission` keeps), and a slot
//! admitted and released in pools of 4 and of 1 000; and a streamed answer of 1 000
//! chunks read through the completion log, against the same read directly (resuming
//! off); and a whole answer's way through the relay (the publisher's upstream bytes to
//! its result frame, and that frame to the client's bytes and the usage read), as its
//! text against the same through a `serde_json::Value` tree.
//!
//! Run with: `cargo bench -p virtual-llm-core --bench core`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use serde_json::json;
use virtual_llm_core::admission::Ask;
use virtual_llm_core::protocol::{GatewayFrame, LlmSpec, RegisterRequest, TaskResult};
use virtual_llm_core::router::{Load, UNRANKED, choose, choose_ranked};
use virtual_llm_core::testkit::admission_suite::member;
use virtual_llm_core::testkit::{ManualClock, at, record};
use virtual_llm_core::{
    Admission, ChannelSink, Config, Gateway, InferRequest, LlmName, LlmStatus, LocalAdmission,
    MemoryStore, Principal, Role, Route, SendError, Store, Write,
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
            agents: Vec::new(),
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
                access: Default::default(),
            }],
            capabilities: Vec::new(),
        };
        let session = gw.register(&alice, req).await.unwrap().provider_session_id;
        let binding = gw.bind(&alice, &session, Arc::new(NullSink)).await.unwrap();
        let row = gw.route(&client, "llm").await.unwrap().rows[0].clone();
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
                endpoint: Default::default(),
                stream: false,
                body: body.clone().into(),
                timeout: None,
            };
            let handle = gw.start_task(&client, &row, request).unwrap();
            let id = handle.id().clone();
            let result = TaskResult::Completed {
                status: 200,
                body: answer.clone().into(),
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
                endpoint: Default::default(),
                stream: true,
                body: body.clone().into(),
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

/// A deterministic stream of numbers (an LCG), so every run measures the same loads.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % u64::from(n)) as u32
    }
}

/// Loads of a busy pool: capacities of 4 to 32, each row with one task in flight to
/// full, so that no row is idle and a pick scans the whole pool (with `idle`, rows
/// may be idle too, and a pick stops at the first).
fn busy_loads(n: usize, idle: bool) -> Vec<Load> {
    let mut rng = Lcg(7);
    let least = u32::from(!idle);
    (0..n)
        .map(|_| {
            let capacity = [4, 8, 16, 32][rng.below(4) as usize];
            Load {
                in_flight: least + rng.below(capacity + 1 - least),
                capacity: Some(capacity),
            }
        })
        .collect()
}

fn pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    group.throughput(Throughput::Elements(1));
    for (name, idle) in [("choose_1000", false), ("choose_1000_some_idle", true)] {
        let loads = busy_loads(1_000, idle);
        group.bench_function(name, |b| {
            let mut cursor = 0usize;
            b.iter(|| {
                cursor = cursor.wrapping_add(1);
                black_box(choose(black_box(&loads), cursor, |l| Some(*l)))
            });
        });
    }
    // The same pick over the ranks `LocalAdmission` keeps.
    let ranks: Vec<u64> = busy_loads(1_000, false)
        .into_iter()
        .map(|l| if l.has_room() { l.rank() } else { UNRANKED })
        .collect();
    group.bench_function("choose_ranked_1000", |b| {
        let mut cursor = 0usize;
        b.iter(|| {
            cursor = cursor.wrapping_add(1);
            black_box(choose_ranked(black_box(&ranks), cursor))
        });
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = rt.enter();
    for size in [4usize, 1_000] {
        // A pool where every row has room: the request gets a slot at once.
        let rows: Vec<_> = (0..size)
            .map(|i| member(&format!("m-{i:04}"), "bench", Some(32)))
            .collect();
        let route = Route {
            agent: None,
            pool: LlmName::parse("bench").unwrap(),
            rows: rows.into(),
            pinned: None,
        };
        let adm: Arc<dyn Admission> = Arc::new(LocalAdmission::new(&Config::default()));
        // Some slots held, as in a pool at work.
        let mut held = Vec::new();
        for _ in 0..size * 4 {
            let ask = Ask {
                principal: "p",
                route: &route,
                exclude: &[],
                until: tokio::time::Instant::now() + Duration::from_secs(30),
                waking: false,
            };
            held.push(adm.admit(ask).now_or_never().unwrap().unwrap());
        }
        group.bench_function(format!("admit_release_{size}"), |b| {
            b.iter(|| {
                let ask = Ask {
                    principal: "p",
                    route: &route,
                    exclude: &[],
                    until: tokio::time::Instant::now() + Duration::from_secs(30),
                    waking: false,
                };
                let grant = adm.admit(ask).now_or_never().unwrap().unwrap();
                adm.release(black_box(&grant));
            });
        });
        for g in &held {
            adm.release(g);
        }
    }
    group.finish();
}

/// A streamed answer of 1 000 chunks of 200 bytes, read by its one client through the
/// completion log (every chunk recorded, then sent) and directly (`clientResumeWindow`
/// zero): what keeping an answer resumable costs per chunk.
fn completion_log(c: &mut Criterion) {
    use futures::StreamExt;
    use virtual_llm_core::CompletionLog;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let chunk = "x".repeat(200);
    let mut group = c.benchmark_group("completion_log");
    group.throughput(Throughput::Elements(1000));
    for (name, window) in [("kept_1000_chunks", 60), ("direct_1000_chunks", 0)] {
        let log = CompletionLog::new(&Config {
            client_resume_window: Duration::from_secs(window),
            ..Config::default()
        });
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let chunk = chunk.clone();
                let chunks = (0..1000).map(move |_| Ok(chunk.clone()));
                let (_, mut reader) = log.start("carol", futures::stream::iter(chunks).boxed());
                while let Some(event) = reader.next().await {
                    black_box(event);
                }
            });
        });
    }
    group.finish();
}

/// A chat completion as an upstream answers it: the loadgen mock's (short), and one
/// with 4 KiB of content.
fn upstream_answer(content: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "mock-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}
    }))
    .unwrap()
}

/// What the relay does with a whole answer, both ways: as the text it came as (the
/// relay's way), and through a `Value` tree (the way before: parsed at the publisher,
/// written into the frame, parsed at the gateway, written for the client).
fn answer_relay(c: &mut Criterion) {
    use serde_json::Value;
    use virtual_llm_core::protocol::PublisherFrame;
    use virtual_llm_core::usage::answer_facts;
    use virtual_llm_core::{Completion, RawBody, TaskId};

    /// The old frame, its body a tree.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TreeFrame {
        #[serde(rename = "type")]
        kind: String,
        task_id: String,
        status: u16,
        body: Value,
    }

    let task = TaskId::generate();
    let mut group = c.benchmark_group("answer_relay");
    group.throughput(Throughput::Elements(1));
    for (name, content) in [
        ("short", "Hello! How can I help you today?".to_owned()),
        ("4k", "word ".repeat(820)),
    ] {
        let upstream = upstream_answer(&content);
        group.bench_function(format!("{name}_as_text"), |b| {
            b.iter(|| {
                // Publisher: the upstream's bytes into a frame.
                let body = RawBody::from_client(black_box(&upstream).clone()).unwrap();
                let result = TaskResult::Completed {
                    status: 200,
                    body: Completion::ok(body).body,
                    retry_after: None,
                };
                let frame = PublisherFrame::for_result(task.clone(), result);
                let text = serde_json::to_string(&frame).unwrap();
                // Gateway: the frame to the client's bytes, and the usage read.
                let frame: PublisherFrame = serde_json::from_str(&text).unwrap();
                let (_, mut results) = frame.into_task_results().unwrap();
                let result = results.pop().unwrap();
                result.validate().unwrap();
                let TaskResult::Completed { body, .. } = result else {
                    unreachable!()
                };
                black_box(answer_facts(&body));
                black_box(serde_json::to_vec(&body).unwrap())
            });
        });
        group.bench_function(format!("{name}_as_tree"), |b| {
            b.iter(|| {
                let body: Value = serde_json::from_slice(black_box(&upstream)).unwrap();
                let frame = TreeFrame {
                    kind: "result".into(),
                    task_id: task.to_string(),
                    status: 200,
                    body,
                };
                let text = serde_json::to_string(&frame).unwrap();
                let frame: TreeFrame = serde_json::from_str(&text).unwrap();
                let usage = frame.body.get("usage").and_then(|u| u.get("prompt_tokens"));
                let chars: usize = frame.body["choices"].as_array().map_or(0, |cs| {
                    cs.iter()
                        .filter_map(|c| c.pointer("/message/content")?.as_str())
                        .map(|t| t.chars().count())
                        .sum()
                });
                black_box((usage, chars));
                black_box(serde_json::to_vec(&frame.body).unwrap())
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    task_round_trip,
    gc_sweep,
    pool,
    completion_log,
    answer_relay
);
criterion_main!(benches);
