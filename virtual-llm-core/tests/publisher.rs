//! The publisher driver over the loopback wire: publishing, answering streamed and
//! whole, cancel aborting the provider, stop taking rows out of service, reconnects,
//! re-registering after the gateway forgot the session, the sticky session file, and
//! the concurrency cap.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use virtual_llm_core::protocol::TaskFrame;
use virtual_llm_core::publisher::PublisherState;
use virtual_llm_core::testkit::{FakeChannel, LoopbackWire};
use virtual_llm_core::{
    EchoProvider, Error, InferRequest, LlmStatus, Provider, PublishedLlm, Publisher,
    PublisherOptions, Reply, SessionId, Store, Write,
};

fn chat(model: &str, text: &str, stream: bool) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model, "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

fn published(names: &[&str], provider: Arc<dyn Provider>) -> Vec<PublishedLlm> {
    names
        .iter()
        .map(|n| PublishedLlm {
            spec: spec(n),
            provider: provider.clone(),
        })
        .collect()
}

fn start(f: &Fixture, llms: Vec<PublishedLlm>, options: PublisherOptions) -> Publisher {
    let wire = Arc::new(LoopbackWire::new(f.gw.clone(), publisher("alice")));
    Publisher::spawn(wire, llms, options)
}

#[tokio::test]
async fn a_publisher_publishes_and_answers_whole_and_streamed() {
    let f = fixture().await;
    let p = start(
        &f,
        published(&["echo", "echo2"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    let session = p.connected().await;
    for n in ["echo", "echo2"] {
        let row = f.row(n).await;
        assert_eq!(
            (row.status, row.provider_session_id.as_ref()),
            (LlmStatus::Active, Some(&session))
        );
    }
    let whole =
        f.gw.infer(&client(), chat("echo", "hello there", false))
            .await
            .unwrap();
    assert_eq!(text_of(whole).await, "hello there");
    let streamed =
        f.gw.infer(&client(), chat("echo2", "one two three", true))
            .await
            .unwrap();
    assert_eq!(text_of(streamed).await, "one two three");
    p.stop().await;
}

#[tokio::test]
async fn stop_takes_the_rows_out_of_service_at_once() {
    let f = fixture().await;
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    p.connected().await;
    p.stop().await;
    for _ in 0..100 {
        if f.row("echo").await.status == LlmStatus::Inactive {
            let err =
                f.gw.infer(&client(), chat("echo", "x", false))
                    .await
                    .unwrap_err();
            assert_eq!(err.status(), 503);
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the row stayed active after stop");
}

/// Streams one chunk, then waits for ever; records when its stream is dropped.
#[derive(Debug, Default)]
struct Hanging {
    started: Notify,
    dropped: Arc<Notify>,
}

struct DropSignal(Arc<Notify>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl Provider for Hanging {
    async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
        self.started.notify_one();
        let guard = DropSignal(self.dropped.clone());
        let first = futures::stream::once(async { Ok("{\"choices\":[]}".to_owned()) });
        let forever = futures::stream::once(async move {
            let _guard = guard;
            std::future::pending::<Result<String, Error>>().await
        });
        Ok(Reply::Stream(first.chain(forever).boxed()))
    }
}

#[tokio::test]
async fn a_client_leaving_cancels_the_providers_work() {
    let f = fixture().await;
    let hanging = Arc::new(Hanging::default());
    let p = start(
        &f,
        published(&["slow"], hanging.clone()),
        PublisherOptions::default(),
    );
    p.connected().await;
    let Reply::Stream(mut chunks) =
        f.gw.infer(&client(), chat("slow", "x", true))
            .await
            .unwrap()
    else {
        panic!("expected a stream")
    };
    assert!(
        chunks.next().await.unwrap().is_ok(),
        "the first chunk arrives"
    );
    let dropped = hanging.dropped.notified();
    drop(chunks);
    dropped.await; // the cancel frame reached the publisher, which dropped the upstream stream
    assert_eq!(f.gw.in_flight(), 0);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replaced_channel_makes_the_publisher_reconnect_with_its_session() {
    let f = fixture().await;
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    let session = p.connected().await;
    let id = f.row("echo").await.id;
    // Another connection for the same session replaces the publisher's channel, which is
    // told to close; then that one goes away too.
    let intruder =
        f.gw.bind(&publisher("alice"), &session, Arc::new(FakeChannel::new()))
            .await
            .unwrap();
    let mut state = p.state();
    state
        .wait_for(|s| matches!(s, PublisherState::Backoff { .. }))
        .await
        .unwrap();
    // While the publisher backs off, the intruder's channel is the current one.
    assert!(
        intruder.release().await.unwrap(),
        "the intruder's binding was current"
    );
    assert_eq!(f.row("echo").await.status, LlmStatus::Inactive);
    state
        .wait_for(|s| matches!(s, PublisherState::Connected { .. }))
        .await
        .unwrap();
    assert_eq!(p.connected().await, session, "the same session comes back");
    let row = f.row("echo").await;
    assert_eq!((row.id, row.status), (id, LlmStatus::Active));
    assert_eq!(
        text_of(
            f.gw.infer(&client(), chat("echo", "back again", false))
                .await
                .unwrap()
        )
        .await,
        "back again"
    );
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_404_makes_the_publisher_register_again() {
    let dir = std::env::temp_dir().join(format!("vllm-pub-{}", SessionId::generate()));
    let file = dir.join("session");
    let f = fixture().await;
    let options = PublisherOptions {
        session_file: Some(file.clone()),
        ..PublisherOptions::default()
    };
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        options,
    );
    let first = p.connected().await;
    // The gateway loses the rows (an operator deleted them): the session is unknown.
    let row = f.row("echo").await;
    f.store
        .write(vec![Write::Delete {
            name: row.name.clone(),
            id: row.id.clone(),
            revision: row.revision,
        }])
        .await
        .unwrap();
    let mut state = p.state();
    state
        .wait_for(|s| matches!(s, PublisherState::Backoff { .. }))
        .await
        .unwrap();
    let second = loop {
        state.changed().await.unwrap();
        if let PublisherState::Connected { session } = &*state.borrow() {
            break session.clone();
        }
    };
    assert_ne!(second, first, "an unknown session gets a fresh id");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        second.as_str(),
        "and it is persisted"
    );
    assert_eq!(f.row("echo").await.status, LlmStatus::Active);
    p.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_session_file_makes_a_restarted_publisher_sticky() {
    let dir = std::env::temp_dir().join(format!("vllm-pub-{}", SessionId::generate()));
    let file = dir.join("session");
    let f = fixture().await;
    let options = PublisherOptions {
        session_file: Some(file.clone()),
        ..PublisherOptions::default()
    };
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        options.clone(),
    );
    let session = p.connected().await;
    let id = f.row("echo").await.id;
    p.stop().await;
    let again = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        options,
    );
    assert_eq!(
        again.connected().await,
        session,
        "the persisted session is reused"
    );
    assert_eq!(f.row("echo").await.id, id, "and revives the same row");
    again.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Answers only when the test hands out a permit; counts how many tasks started.
#[derive(Debug)]
struct Gated {
    gate: Arc<Semaphore>,
    started: AtomicUsize,
}

#[async_trait]
impl Provider for Gated {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        EchoProvider::new().infer(task).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_cap_of_tasks_run_at_once() {
    let f = fixture().await;
    let gated = Arc::new(Gated {
        gate: Arc::new(Semaphore::new(0)),
        started: AtomicUsize::new(0),
    });
    let options = PublisherOptions {
        max_concurrent_tasks: 2,
        ..PublisherOptions::default()
    };
    let p = start(&f, published(&["gated"], gated.clone()), options);
    p.connected().await;
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let gw = f.gw.clone();
            tokio::spawn(async move {
                text_of(
                    gw.infer(&client(), chat("gated", &format!("n{i}"), false))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
        .collect();
    while gated.started.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        gated.started.load(Ordering::SeqCst),
        2,
        "the third task waits for a permit"
    );
    gated.gate.add_permits(3);
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    answers.sort();
    assert_eq!(answers, ["n0", "n1", "n2"]);
    assert_eq!(gated.started.load(Ordering::SeqCst), 3);
    p.stop().await;
}

#[tokio::test]
async fn a_refused_register_backs_off_and_says_why() {
    let f = fixture().await;
    // Bob holds the name, so Alice's publisher is refused with a 409.
    let (_s, _b, _c) = f.online("bob", &["taken"]).await;
    let p = start(
        &f,
        published(&["taken"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    let mut state = p.state();
    let error = loop {
        state.changed().await.unwrap();
        if let PublisherState::Backoff { error, delay } = &*state.borrow() {
            assert!(
                *delay >= Duration::from_millis(2500) && *delay <= Duration::from_secs(5),
                "{delay:?}"
            );
            break error.clone();
        }
    };
    assert!(error.contains("409") && error.contains("taken"), "{error}");
    assert_eq!(f.row("taken").await.owner, "bob");
    p.stop().await;
}

/// A stream that breaks off upstream midway: the client's stream ends with the
/// upstream's message, said once as an upstream error (not "upstream error: upstream
/// error: …"); the chunks before it arrived.
#[tokio::test]
async fn an_upstream_breaking_off_midway_is_reported_once() {
    #[derive(Debug)]
    struct Breaks;
    #[async_trait]
    impl Provider for Breaks {
        async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
            let chunks = futures::stream::iter([
                Ok(r#"{"choices":[{"delta":{"content":"half"}}]}"#.to_owned()),
                Err(Error::Upstream {
                    message: "the stream of upstream x broke off".into(),
                }),
            ]);
            Ok(Reply::Stream(chunks.boxed()))
        }
    }
    let f = fixture().await;
    let p = start(
        &f,
        published(&["breaks"], Arc::new(Breaks)),
        PublisherOptions::default(),
    );
    p.connected().await;
    let Reply::Stream(mut chunks) =
        f.gw.infer(&client(), chat("breaks", "x", true))
            .await
            .unwrap()
    else {
        panic!("a stream")
    };
    assert!(chunks.next().await.unwrap().unwrap().contains("half"));
    let err = chunks.next().await.unwrap().unwrap_err();
    assert_eq!(err.status(), 502);
    assert_eq!(
        err.to_string(),
        "upstream error: the stream of upstream x broke off"
    );
    assert!(chunks.next().await.is_none());
    p.stop().await;
}

/// A provider's error answer (an upstream's own 503 with its `Retry-After`) is posted
/// as an answer, not as a failure: the client gets its status, body and `Retry-After`,
/// on a streaming request too.
#[tokio::test]
async fn an_upstream_error_answer_is_posted_as_it_came() {
    #[derive(Debug)]
    struct Loading;
    #[async_trait]
    impl Provider for Loading {
        async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
            Ok(Reply::Complete(virtual_llm_core::Completion {
                status: 503,
                body: json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
                retry_after: Some(Duration::from_secs(7)),
            }))
        }
    }
    let f = fixture().await;
    let p = start(
        &f,
        published(&["loading"], Arc::new(Loading)),
        PublisherOptions::default(),
    );
    p.connected().await;
    for stream in [false, true] {
        let reply = f.gw.infer(&client(), chat("loading", "x", stream)).await;
        let Ok(Reply::Complete(c)) = reply else {
            panic!("a completion, stream: {stream}: {reply:?}")
        };
        assert_eq!(c.status, 503);
        assert_eq!(c.body["error"]["message"], "Loading model");
        assert_eq!(c.retry_after, Some(Duration::from_secs(7)));
    }
    p.stop().await;
}
