//! Upstream readiness and wake-on-demand on the gateway side (SPEC §12): rows follow
//! the state their publisher reports; a request for a hibernating row sends one `wake`
//! frame however many requests wait, waits in the queue, and is served when the row
//! reports ready; a failed wake fails the waiters and holds off new wakes for the
//! cooldown; a wake that outlasts the wake wait is 503 `wake_timeout`; a `Waker` of
//! the embedder's wakes a row with no channel. Time is paused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use serde_json::json;
use virtual_llm_core::protocol::{GatewayFrame, LlmState, RegisterRequest, UpstreamState};
use virtual_llm_core::testkit::FakeChannel;
use virtual_llm_core::{
    Config, Error, Gateway, InferRequest, LlmName, LlmRecord, LlmStatus, MemoryStore, Reply,
    SessionId, Store, TaskResult, Waker,
};

fn chat(model: &str) -> InferRequest {
    InferRequest::from_chat_body(
        json!({"model": model, "messages": [{"role": "user", "content": "wake up"}]}),
    )
    .unwrap()
}

fn state(name: &str, state: UpstreamState) -> LlmState {
    LlmState {
        name: LlmName::parse(name).unwrap(),
        state,
        wake_failed: None,
    }
}

fn register(session: Option<&SessionId>, name: &str, upstream: UpstreamState) -> RegisterRequest {
    let mut spec = spec(name);
    spec.state = Some(upstream);
    RegisterRequest {
        agents: Vec::new(),
        provider_session_id: session.cloned(),
        protocol_version: Some(2),
        llms: vec![spec],
        capabilities: Vec::new(),
    }
}

/// Registers `name` asleep for alice and binds a channel.
async fn asleep(f: &Fixture, name: &str) -> (SessionId, virtual_llm_core::Binding, FakeChannel) {
    let answer =
        f.gw.register(
            &publisher("alice"),
            register(None, name, UpstreamState::Asleep),
        )
        .await
        .unwrap();
    let session = answer.provider_session_id;
    let (binding, channel) = f.bind("alice", &session).await;
    (session, binding, channel)
}

fn wakes(channel: &FakeChannel) -> Vec<String> {
    channel
        .take()
        .into_iter()
        .filter_map(|f| match f {
            GatewayFrame::Wake(w) => Some(w.llm.to_string()),
            _ => None,
        })
        .collect()
}

async fn answer_next_task(f: &Fixture, session: &SessionId, channel: &FakeChannel, text: &str) {
    let task = channel.next_task().await;
    f.gw.deliver(
        &publisher("alice"),
        session,
        &task.task_id,
        TaskResult::Completed {
            status: 200,
            body: json!({"choices": [{"message": {"content": text}}]}).into(),
            retry_after: None,
        },
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn rows_follow_the_reported_state_while_bound() {
    let f = fixture().await;
    let answer =
        f.gw.register(
            &publisher("alice"),
            register(None, "llm", UpstreamState::Unavailable),
        )
        .await
        .unwrap();
    let session = answer.provider_session_id;
    let (_binding, _channel) = f.bind("alice", &session).await;
    let row = f.row("llm").await;
    assert_eq!(row.status, LlmStatus::Inactive, "unavailable: inactive");
    assert!(row.inactive_since.is_some());
    assert!(f.gw.active_models(&client()).await.unwrap().is_empty());
    let err = f.gw.infer(&client(), chat("llm")).await.unwrap_err();
    assert_eq!(
        err.status(),
        503,
        "no request reaches a model that cannot answer"
    );

    for (reported, status) in [
        (UpstreamState::Ready, LlmStatus::Active),
        (UpstreamState::Unavailable, LlmStatus::Inactive),
        (UpstreamState::Asleep, LlmStatus::Hibernating),
        (UpstreamState::Ready, LlmStatus::Active),
    ] {
        f.gw.heartbeat_with(&publisher("alice"), &session, &[state("llm", reported)])
            .await
            .unwrap();
        let row = f.row("llm").await;
        assert_eq!(row.status, status, "{reported:?}");
        assert_eq!(row.inactive_since.is_some(), status == LlmStatus::Inactive);
    }
    let listed = f.gw.active_models(&client()).await.unwrap();
    assert_eq!(listed.len(), 1, "active again, listed again");
    // A heartbeat without states changes nothing.
    let before = f.row("llm").await;
    f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
    assert_eq!(f.row("llm").await.revision, before.revision);
}

#[tokio::test(start_paused = true)]
async fn five_requests_share_one_wake_and_are_served_when_the_row_is_ready() {
    let f = fixture().await;
    let (session, _binding, channel) = asleep(&f, "llm").await;
    assert_eq!(f.row("llm").await.status, LlmStatus::Hibernating);
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let gw = f.gw.clone();
            tokio::spawn(async move { gw.infer(&client(), chat("llm")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wakes(&channel), ["llm"], "one wake for five requests");
    assert_eq!(f.gw.pool_load(&LlmName::parse("llm").unwrap()).queued, 5);
    f.gw.heartbeat_with(
        &publisher("alice"),
        &session,
        &[state("llm", UpstreamState::Ready)],
    )
    .await
    .unwrap();
    assert_eq!(f.row("llm").await.status, LlmStatus::Active);
    for i in 0..5 {
        answer_next_task(&f, &session, &channel, &format!("a{i}")).await;
    }
    for request in requests {
        let reply = request.await.unwrap().unwrap();
        assert!(matches!(reply, Reply::Complete(ref c) if c.status == 200));
    }
    assert!(wakes(&channel).is_empty(), "no second wake");
}

#[tokio::test(start_paused = true)]
async fn a_failed_wake_fails_its_waiters_and_holds_off_wakes_for_the_cooldown() {
    let config = Config {
        wake_cooldown: Duration::from_secs(30),
        ..Config::default()
    };
    let f = fixture_with(config).await;
    let (session, _binding, channel) = asleep(&f, "llm").await;
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let gw = f.gw.clone();
            tokio::spawn(async move { gw.infer(&client(), chat("llm")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wakes(&channel), ["llm"]);
    let mut failed = state("llm", UpstreamState::Asleep);
    failed.wake_failed = Some("exit status 1: vllm: CUDA out of memory".into());
    f.gw.heartbeat_with(&publisher("alice"), &session, &[failed])
        .await
        .unwrap();
    for request in requests {
        let err = request.await.unwrap().unwrap_err();
        assert_eq!((err.status(), err.code()), (503, "wake_failed"));
        assert!(err.to_string().contains("CUDA out of memory"), "{err}");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let err = f.gw.infer(&client(), chat("llm")).await.unwrap_err();
    assert_eq!(err.code(), "wake_failed", "within the cooldown: at once");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(20)));
    assert!(wakes(&channel).is_empty(), "and no new wake");
    tokio::time::sleep(Duration::from_secs(21)).await;
    let again = {
        let gw = f.gw.clone();
        tokio::spawn(async move { gw.infer(&client(), chat("llm")).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wakes(&channel), ["llm"], "after the cooldown, a new wake");
    f.gw.heartbeat_with(
        &publisher("alice"),
        &session,
        &[state("llm", UpstreamState::Ready)],
    )
    .await
    .unwrap();
    answer_next_task(&f, &session, &channel, "awake").await;
    assert!(again.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_wake_that_outlasts_the_wake_wait_is_503_wake_timeout() {
    let config = Config {
        wake_wait: Duration::from_secs(60),
        ..Config::default()
    };
    let f = fixture_with(config).await;
    let (_session, _binding, channel) = asleep(&f, "llm").await;
    let started = tokio::time::Instant::now();
    let err = f.gw.infer(&client(), chat("llm")).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (503, "wake_timeout"));
    assert!(err.retry_after().is_some());
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    assert_eq!(wakes(&channel), ["llm"]);
    // A client's own x-request-timeout bounds the wait too.
    let started = tokio::time::Instant::now();
    let short = chat("llm").with_timeout(Some(Duration::from_secs(5)));
    let err = f.gw.infer(&client(), short).await.unwrap_err();
    assert_eq!(err.code(), "wake_timeout");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_hibernating_row_is_live_for_the_gc_and_never_reaped_while_bound() {
    let f = fixture().await;
    let (session, _binding, _channel) = asleep(&f, "llm").await;
    for _ in 0..10 {
        f.clock.advance(Duration::from_secs(3600));
        f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
        f.gw.sweep().await.unwrap();
    }
    assert_eq!(f.row("llm").await.status, LlmStatus::Hibernating);
    // An unavailable upstream behind a bound, heartbeating publisher is not reaped.
    f.gw.heartbeat_with(
        &publisher("alice"),
        &session,
        &[state("llm", UpstreamState::Unavailable)],
    )
    .await
    .unwrap();
    for _ in 0..10 {
        f.clock.advance(Duration::from_secs(3600));
        f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
        f.gw.sweep().await.unwrap();
    }
    assert_eq!(f.row("llm").await.status, LlmStatus::Inactive);
    // Heartbeats stop: stale, then reaped after the retention.
    f.clock.advance(Duration::from_secs(5 * 3600));
    f.gw.sweep().await.unwrap();
    f.clock.advance(Duration::from_secs(5 * 3600));
    f.gw.sweep().await.unwrap();
    assert!(f.try_row("llm").await.is_none());
}

/// An embedder's waker for rows with no channel: records what it was asked to wake.
#[derive(Debug, Default)]
struct Webhook {
    fired: Mutex<Vec<String>>,
}

#[async_trait]
impl Waker for Webhook {
    fn can_wake(&self, row: &LlmRecord) -> bool {
        row.binding.is_none() && row.name.as_str() == "far-away"
    }

    async fn wake(&self, row: &LlmRecord) -> Result<(), String> {
        self.fired.lock().unwrap().push(row.name.to_string());
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_waker_wakes_a_host_whose_publisher_connects_only_afterwards() {
    let store = Arc::new(MemoryStore::new());
    let hook = Arc::new(Webhook::default());
    let gw = Gateway::builder(store.clone())
        .waker(hook.clone())
        .start()
        .await
        .unwrap();
    let session = gw
        .register(
            &publisher("alice"),
            register(None, "far-away", UpstreamState::Ready),
        )
        .await
        .unwrap()
        .provider_session_id;
    // Bound once, then the host went to sleep: its channel closed.
    let channel = FakeChannel::new();
    let binding = gw
        .bind(&publisher("alice"), &session, Arc::new(channel.clone()))
        .await
        .unwrap();
    binding.release().await.unwrap();
    let name = LlmName::parse("far-away").unwrap();
    assert_eq!(
        store.get(&name).await.unwrap().unwrap().status,
        LlmStatus::Inactive
    );
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.infer(&client(), chat("far-away")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(*hook.fired.lock().unwrap(), ["far-away"], "fired once");
    // The host woke: its publisher connects and its channel binds.
    let channel = FakeChannel::new();
    let _binding = gw
        .bind(&publisher("alice"), &session, Arc::new(channel.clone()))
        .await
        .unwrap();
    for _ in 0..3 {
        let task = channel.next_task().await;
        gw.deliver(
            &publisher("alice"),
            &session,
            &task.task_id,
            TaskResult::Completed {
                status: 200,
                body: json!({"ok": true}).into(),
                retry_after: None,
            },
        )
        .await
        .unwrap();
    }
    for request in requests {
        assert!(request.await.unwrap().is_ok());
    }
    assert_eq!(hook.fired.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_row_nothing_can_wake_fails_at_once() {
    let f = fixture().await;
    let _ = f.online("alice", &["llm"]).await;
    let gw: &Gateway = &f.gw;
    let session = f.row("llm").await.provider_session_id.unwrap();
    gw.heartbeat_with(
        &publisher("alice"),
        &session,
        &[state("llm", UpstreamState::Unavailable)],
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let err: Error = gw.infer(&client(), chat("llm")).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (503, "llm_unavailable"));
    assert_eq!(started.elapsed(), Duration::ZERO, "no waiting");
}

/// A waker that never returns.
#[derive(Debug)]
struct Hangs;

#[async_trait]
impl Waker for Hangs {
    fn can_wake(&self, row: &LlmRecord) -> bool {
        row.binding.is_none()
    }

    async fn wake(&self, _row: &LlmRecord) -> Result<(), String> {
        std::future::pending().await
    }
}

/// Asking for a wake is bounded by the wake wait: a waker that hangs fails the wake
/// (503 `wake_failed`) instead of holding the request for ever.
#[tokio::test(start_paused = true)]
async fn a_waker_that_hangs_fails_the_wake_within_the_wake_wait() {
    let config = Config {
        wake_wait: Duration::from_secs(20),
        ..Config::default()
    };
    let gw = Gateway::builder(Arc::new(MemoryStore::new()))
        .config(config)
        .waker(Arc::new(Hangs))
        .start()
        .await
        .unwrap();
    let session = gw
        .register(
            &publisher("alice"),
            register(None, "far", UpstreamState::Ready),
        )
        .await
        .unwrap()
        .provider_session_id;
    let binding = gw
        .bind(&publisher("alice"), &session, Arc::new(FakeChannel::new()))
        .await
        .unwrap();
    binding.release().await.unwrap();
    let started = tokio::time::Instant::now();
    let err = gw.infer(&client(), chat("far")).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (503, "wake_failed"));
    assert_eq!(started.elapsed(), Duration::from_secs(20));
}
