//! What the core measures: task outcomes by code, latency histograms, cancellations,
//! and the gauges `refresh_gauges` sets, read back through a debugging recorder.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::json;
use virtual_llm_core::metrics::{
    PUBLISHERS_CONNECTED, ROWS, TASK_DURATION, TASK_FIRST_EVENT, TASK_OUTCOMES, TASKS_IN_FLIGHT,
};
use virtual_llm_core::protocol::TaskResult;
use virtual_llm_core::{InferRequest, Reply};

type Snapshot = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// One snapshot: taking it resets the recorder's counters, so a test takes it once.
fn snapshot(snapshotter: &Snapshotter) -> Snapshot {
    snapshotter.snapshot().into_vec()
}

fn value<'a>(
    snapshot: &'a Snapshot,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let same_labels = labels
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
        (key.name() == name && same_labels).then_some(value)
    })
}

#[test]
fn tasks_and_gauges_are_measured() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let f = fixture().await;
            let (session, _binding, channel) = f.online("alice", &["llm"]).await;
            let body = json!({"model": "llm", "messages": []});
            // One completed task, one upstream error status, one cancelled.
            let infer = |body: serde_json::Value| {
                let gw = f.gw.clone();
                tokio::spawn(async move {
                    gw.infer(&client(), InferRequest::for_llm("llm", body).unwrap())
                        .await
                })
            };
            for status in [200, 429] {
                let reply = infer(body.clone());
                let task = channel.next_task().await;
                let result = TaskResult::Completed {
                    status,
                    body: json!({}).into(),
                    retry_after: None,
                };
                f.gw.deliver(&publisher("alice"), &session, &task.task_id, result)
                    .await
                    .unwrap();
                assert!(matches!(reply.await.unwrap(), Ok(Reply::Complete(_))));
            }
            let reply = infer(body);
            let task = channel.next_task().await;
            // The client goes away: its task is cancelled.
            reply.abort();
            assert_eq!(channel.next_cancel().await.task_id, task.task_id);
            f.gw.refresh_gauges().await.unwrap();
        });
    });
    let snapshot = snapshot(&snapshotter);
    let counter = |code| value(&snapshot, TASK_OUTCOMES, &[("code", code)]);
    assert_eq!(counter("ok"), Some(&DebugValue::Counter(1)));
    assert_eq!(counter("upstream_429"), Some(&DebugValue::Counter(1)));
    assert_eq!(counter("cancelled"), Some(&DebugValue::Counter(1)));
    let histogram_len = |name| match value(&snapshot, name, &[]) {
        Some(DebugValue::Histogram(samples)) => samples.len(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(
        histogram_len(TASK_DURATION),
        2,
        "one duration per finished task"
    );
    assert_eq!(histogram_len(TASK_FIRST_EVENT), 2);
    let gauge = |name, labels: &[(&str, &str)]| match value(&snapshot, name, labels) {
        Some(DebugValue::Gauge(g)) => g.into_inner(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(gauge(PUBLISHERS_CONNECTED, &[]), 1.0);
    assert_eq!(gauge(TASKS_IN_FLIGHT, &[]), 0.0);
    assert_eq!(
        gauge(ROWS, &[("kind", "virtual"), ("status", "active")]),
        1.0
    );
    assert_eq!(
        gauge(ROWS, &[("kind", "public"), ("status", "active")]),
        0.0
    );
}
