//! Task correlation: one outcome per task, ordered streaming, cancel on drop, deadlines,
//! refusal of foreign and replayed results, bounded buffering, and the relay through
//! `Gateway::infer` with the echo model answering on the publisher side.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use virtual_llm_core::protocol::{GatewayFrame, TaskFrame, TaskResult};
use virtual_llm_core::testkit::FakeChannel;
use virtual_llm_core::{
    Config, EchoProvider, Error, Gateway, InferRequest, LlmStatus, Provider, Reply, SessionId,
    TaskEvent, TaskHandle,
};

fn chat(model: &str, text: &str, stream: bool) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

struct Online {
    f: Fixture,
    session: SessionId,
    channel: FakeChannel,
    _binding: virtual_llm_core::Binding,
}

async fn online_with(config: Config) -> Online {
    let f = fixture_with(config).await;
    let (session, binding, channel) = f.online("alice", &["llm"]).await;
    Online {
        f,
        session,
        channel,
        _binding: binding,
    }
}

async fn online() -> Online {
    online_with(Config::default()).await
}

impl Online {
    async fn start(&self, stream: bool) -> (TaskHandle, TaskFrame) {
        let row = self.f.row("llm").await;
        let handle = self
            .f
            .gw
            .start_task(&client(), &row, chat("llm", "hi", stream))
            .unwrap();
        let frame = self.channel.next_task().await;
        assert_eq!(&frame.task_id, handle.id());
        (handle, frame)
    }

    async fn deliver(&self, frame: &TaskFrame, result: TaskResult) -> Result<(), Error> {
        self.f
            .gw
            .deliver(&publisher("alice"), &self.session, &frame.task_id, result)
            .await
    }
}

fn chunk(data: &str, done: bool) -> TaskResult {
    TaskResult::Chunk {
        data: data.into(),
        done,
        seq: None,
    }
}

fn completed(text: &str) -> TaskResult {
    TaskResult::Completed {
        status: 200,
        body: json!({ "text": text }).into(),
        retry_after: None,
    }
}

#[tokio::test]
async fn a_task_frame_carries_the_clients_request() {
    let o = online().await;
    let (_handle, frame) = o.start(true).await;
    assert_eq!(frame.llm.as_str(), "llm");
    assert!(frame.stream);
    assert_eq!(
        frame.body.to_value().unwrap()["messages"][0]["content"],
        "hi"
    );
    let wire = serde_json::to_value(GatewayFrame::Task(frame)).unwrap();
    assert_eq!(wire["type"], "task");
    assert_eq!(wire["kind"], "infer");
    assert!(wire["taskId"].as_str().unwrap().starts_with("task_"));
}

#[tokio::test]
async fn a_completed_task_has_exactly_one_outcome() {
    let o = online().await;
    let (mut handle, frame) = o.start(false).await;
    o.deliver(&frame, completed("ok")).await.unwrap();
    match handle.next().await {
        Some(Ok(TaskEvent::Completed(c))) => {
            assert_eq!((c.status, c.json()), (200, json!({"text": "ok"})))
        }
        other => panic!("expected the completion, got {other:?}"),
    }
    assert!(handle.next().await.is_none(), "nothing after the outcome");
    assert!(handle.next().await.is_none());
    assert_eq!(o.f.gw.in_flight(), 0, "no task lingers");
    drop(handle);
    assert!(
        o.channel.take().is_empty(),
        "a finished task is not cancelled"
    );
}

#[tokio::test]
async fn chunks_arrive_in_order_each_before_the_next_is_produced() {
    let o = online().await;
    let (mut handle, frame) = o.start(true).await;
    for i in 0..5 {
        o.deliver(&frame, chunk(&format!("c{i}"), false))
            .await
            .unwrap();
        // The client sees chunk i before the publisher has produced chunk i+1.
        assert_eq!(
            handle.next().await.unwrap().unwrap(),
            TaskEvent::Chunk(format!("c{i}"))
        );
    }
    o.deliver(&frame, chunk("last", true)).await.unwrap();
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("last".into())
    );
    assert_eq!(handle.next().await.unwrap().unwrap(), TaskEvent::Done);
    assert!(handle.next().await.is_none());
}

#[tokio::test]
async fn buffered_chunks_keep_their_order() {
    let o = online().await;
    let (handle, frame) = o.start(true).await;
    for i in 0..10 {
        o.deliver(&frame, chunk(&i.to_string(), false))
            .await
            .unwrap();
    }
    o.deliver(&frame, chunk("", true)).await.unwrap();
    let got: Vec<String> = handle
        .into_chunk_stream()
        .map(|c| c.unwrap())
        .collect()
        .await;
    assert_eq!(got, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_dropped_handle_cancels_its_task() {
    let o = online().await;
    let (handle, frame) = o.start(true).await;
    o.deliver(&frame, chunk("a", false)).await.unwrap();
    drop(handle);
    match o.channel.next().await {
        GatewayFrame::Cancel(c) => assert_eq!(c.task_id, frame.task_id),
        other => panic!("expected cancel, got {other:?}"),
    }
    assert_eq!(o.f.gw.in_flight(), 0);
    let late = o.deliver(&frame, chunk("b", false)).await.unwrap_err();
    assert_eq!(
        late.status(),
        404,
        "late results of a cancelled task are unknown"
    );
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_gives_504_and_cancels() {
    let o = online().await;
    let (mut handle, frame) = o.start(false).await;
    let waiting = tokio::spawn(async move { (handle.next().await, handle) });
    tokio::time::advance(Duration::from_secs(299)).await;
    assert!(!waiting.is_finished(), "still within the 300 s deadline");
    tokio::time::advance(Duration::from_secs(2)).await;
    let (outcome, mut handle) = waiting.await.unwrap();
    let err = outcome.unwrap().unwrap_err();
    assert_eq!(err.status(), 504);
    assert!(
        matches!(err, Error::DeadlineExceeded { deadline } if deadline == Duration::from_secs(300))
    );
    assert!(handle.next().await.is_none());
    assert!(
        matches!(o.channel.next().await, GatewayFrame::Cancel(c) if c.task_id == frame.task_id)
    );
    assert_eq!(
        o.deliver(&frame, completed("late"))
            .await
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test(start_paused = true)]
async fn the_idle_deadline_bounds_silence_between_chunks() {
    let o = online_with(Config {
        stream_idle_timeout: Duration::from_secs(10),
        ..Config::default()
    })
    .await;
    let (mut handle, frame) = o.start(true).await;
    for i in 0..5 {
        tokio::time::advance(Duration::from_secs(9)).await;
        o.deliver(&frame, chunk(&i.to_string(), false))
            .await
            .unwrap();
        assert!(
            matches!(handle.next().await, Some(Ok(TaskEvent::Chunk(_)))),
            "45 s in total, never 10 s idle"
        );
    }
    let started = tokio::time::Instant::now();
    let err = handle.next().await.unwrap().unwrap_err();
    assert_eq!(err.status(), 504);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert!(matches!(o.channel.next().await, GatewayFrame::Cancel(_)));
}

#[tokio::test]
async fn a_result_from_another_session_or_principal_is_refused_and_changes_nothing() {
    let o = online().await;
    let (_s2, _b2, _ch2) = o.f.online("alice", &["other"]).await;
    let (_s3, _b3, _ch3) = o.f.online("mallory", &["evil"]).await;
    let (mut handle, frame) = o.start(false).await;
    let other_session = o.f.row("other").await.provider_session_id.unwrap();
    let err =
        o.f.gw
            .deliver(
                &publisher("alice"),
                &other_session,
                &frame.task_id,
                completed("forged"),
            )
            .await
            .unwrap_err();
    assert_eq!(err.status(), 404, "another session's result is refused");
    let err =
        o.f.gw
            .deliver(
                &publisher("mallory"),
                &o.session,
                &frame.task_id,
                completed("forged"),
            )
            .await
            .unwrap_err();
    assert_eq!(
        err.status(),
        404,
        "another principal presenting the right session is refused"
    );
    let err =
        o.f.gw
            .deliver(&client(), &o.session, &frame.task_id, completed("forged"))
            .await
            .unwrap_err();
    assert_eq!(err.status(), 403, "clients cannot post results");
    assert!(
        handle.next().now_or_never().is_none(),
        "the task still waits for its own publisher"
    );
    o.deliver(&frame, completed("genuine")).await.unwrap();
    let Some(Ok(TaskEvent::Completed(c))) = handle.next().await else {
        panic!("no completion")
    };
    assert_eq!(c.json()["text"], "genuine");
}

#[tokio::test]
async fn a_task_frame_over_the_frame_limit_is_413_and_sends_nothing() {
    let o = online_with(Config {
        max_body_bytes: 1024,
        ..Config::default()
    })
    .await;
    let row = o.f.row("llm").await;
    // The body alone is under the limit; with the frame's envelope it is over.
    let request = chat("llm", &"x".repeat(950), false);
    assert!(request.body.to_string().len() < 1024);
    let err = o.f.gw.start_task(&client(), &row, request).unwrap_err();
    assert_eq!(err.status(), 413);
    assert_eq!(o.f.gw.in_flight(), 0, "no task left behind");
    // Nothing went down the channel: the next task is the next frame.
    let (handle, frame) = o.start(false).await;
    o.deliver(&frame, completed("fits")).await.unwrap();
    drop(handle);
}

#[tokio::test]
async fn a_replayed_result_is_409_for_its_session_and_404_for_others() {
    let o = online().await;
    let (_handle, frame) = o.start(false).await;
    o.deliver(&frame, completed("once")).await.unwrap();
    assert_eq!(
        o.deliver(&frame, completed("twice"))
            .await
            .unwrap_err()
            .status(),
        409
    );
    assert_eq!(
        o.deliver(&frame, chunk("x", false))
            .await
            .unwrap_err()
            .status(),
        409
    );
    let stranger = SessionId::generate();
    let err =
        o.f.gw
            .deliver(
                &publisher("alice"),
                &stranger,
                &frame.task_id,
                completed("x"),
            )
            .await
            .unwrap_err();
    assert_eq!(err.status(), 404, "a replay from elsewhere learns nothing");
    let err =
        o.f.gw
            .deliver(
                &publisher("mallory"),
                &o.session,
                &frame.task_id,
                completed("x"),
            )
            .await
            .unwrap_err();
    assert_eq!(
        err.status(),
        404,
        "another principal holding the session id learns nothing either"
    );
}

#[tokio::test]
async fn a_slow_consumer_makes_the_publisher_wait_instead_of_growing_memory() {
    let o = online_with(Config {
        task_buffer: 4,
        ..Config::default()
    })
    .await;
    let (mut handle, frame) = o.start(true).await;
    for i in 0..4 {
        o.deliver(&frame, chunk(&i.to_string(), false))
            .await
            .unwrap();
    }
    let mut fifth = Box::pin(o.deliver(&frame, chunk("4", false)));
    assert!(
        (&mut fifth).now_or_never().is_none(),
        "the buffer holds 4 events; the 5th waits"
    );
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("0".into())
    );
    fifth.await.unwrap();
    // Another task of the same publisher is not stalled by the slow one.
    let (mut other, other_frame) = o.start(false).await;
    o.deliver(&other_frame, completed("fast")).await.unwrap();
    assert!(matches!(
        other.next().await,
        Some(Ok(TaskEvent::Completed(_)))
    ));
    // The buffer is full again (1..=4): the next chunk waits, until the client leaves.
    let mut blocked = Box::pin(o.deliver(&frame, chunk("5", false)));
    assert!(
        (&mut blocked).now_or_never().is_none(),
        "the publisher waits for the slow client"
    );
    drop(handle);
    assert_eq!(
        blocked.await.unwrap_err().status(),
        404,
        "a waiting publisher is released when the client leaves"
    );
}

#[tokio::test]
async fn a_chunk_for_a_non_streaming_task_is_400_and_changes_nothing() {
    let o = online().await;
    let (mut handle, frame) = o.start(false).await;
    assert_eq!(
        o.deliver(&frame, chunk("x", false))
            .await
            .unwrap_err()
            .status(),
        400
    );
    for status in [1000, 101, 103, 199] {
        let bad_status = TaskResult::Completed {
            status,
            body: Value::Null.into(),
            retry_after: None,
        };
        assert_eq!(
            o.deliver(&frame, bad_status).await.unwrap_err().status(),
            400,
            "{status}"
        );
    }
    o.deliver(&frame, completed("fine")).await.unwrap();
    assert!(matches!(
        handle.next().await,
        Some(Ok(TaskEvent::Completed(_)))
    ));
}

/// Red-team F10: chunk data with a line break (`\n`, or a bare `\r`, which SSE also
/// reads as one) would forge fields in the client's stream: 400, and the stream goes
/// on as if it had not been sent.
#[tokio::test]
async fn chunk_data_with_a_line_break_is_400_and_changes_nothing() {
    let o = online().await;
    let (mut handle, frame) = o.start(true).await;
    for forged in [
        "{\"a\":1}\rdata: [DONE]",
        "{\"a\":1}\r\revent: error",
        "{\"a\":1}\n\nretry: 999999",
    ] {
        let refused = o.deliver(&frame, chunk(forged, false)).await.unwrap_err();
        assert_eq!(refused.status(), 400, "{forged:?}");
    }
    o.deliver(&frame, chunk("{\"a\":1}", false)).await.unwrap();
    o.deliver(&frame, chunk("", true)).await.unwrap();
    let first = handle.next().await.unwrap().unwrap();
    assert!(
        matches!(&first, TaskEvent::Chunk(c) if c == "{\"a\":1}"),
        "only the clean chunk reached the client: {first:?}"
    );
    assert!(matches!(handle.next().await, Some(Ok(TaskEvent::Done))));
}

#[tokio::test]
async fn a_publisher_error_is_502_with_its_message() {
    let o = online().await;
    let (mut handle, frame) = o.start(true).await;
    o.deliver(&frame, chunk("partial", false)).await.unwrap();
    o.deliver(
        &frame,
        TaskResult::Failed {
            message: "CUDA out of memory".into(),
        },
    )
    .await
    .unwrap();
    assert!(matches!(handle.next().await, Some(Ok(TaskEvent::Chunk(_)))));
    let err = handle.next().await.unwrap().unwrap_err();
    assert_eq!(err.status(), 502);
    assert!(err.to_string().contains("CUDA out of memory"));
    assert!(handle.next().await.is_none());
}

#[tokio::test]
async fn a_full_or_closed_channel_answers_503_and_leaves_no_task() {
    let o = online().await;
    let row = o.f.row("llm").await;
    o.channel.set_full(true);
    let err =
        o.f.gw
            .start_task(&client(), &row, chat("llm", "x", false))
            .unwrap_err();
    assert_eq!(
        (err.status(), err.retry_after()),
        (503, Some(Duration::from_secs(5)))
    );
    o.channel.set_full(false);
    o.channel.close();
    assert_eq!(
        o.f.gw
            .start_task(&client(), &row, chat("llm", "x", false))
            .unwrap_err()
            .status(),
        503
    );
    assert_eq!(o.f.gw.in_flight(), 0);
}

#[tokio::test]
async fn infer_routes_and_refuses_with_the_right_statuses() {
    let o = online().await;
    let gw = &o.f.gw;
    assert_eq!(
        gw.infer(&client(), chat("nope", "x", false))
            .await
            .unwrap_err()
            .status(),
        404
    );
    assert_eq!(
        gw.infer(&client(), chat("bad name", "x", false))
            .await
            .unwrap_err()
            .status(),
        400
    );
    assert_eq!(
        gw.infer(&publisher("p"), chat("llm", "x", false))
            .await
            .unwrap_err()
            .status(),
        403
    );
    let (_s, binding, _c) = o.f.online("bob", &["gone"]).await;
    binding.release().await.unwrap();
    let err = gw
        .infer(&client(), chat("gone", "x", false))
        .await
        .unwrap_err();
    assert_eq!(err.status(), 503);
    assert!(
        err.to_string()
            .contains("gone is inactive (publisher offline since"),
        "{err}"
    );
    gw.put_public(&admin(), spec("public")).await.unwrap();
    let err = gw
        .infer(&client(), chat("public", "x", false))
        .await
        .unwrap_err();
    assert_eq!(err.status(), 503, "no public backend configured");
    assert_eq!(o.f.row("gone").await.status, LlmStatus::Inactive);
}

/// A publisher loop: answers every task on `channel` with `provider`, chunk by chunk.
fn serve(
    gw: Gateway,
    session: SessionId,
    channel: FakeChannel,
    provider: Arc<dyn Provider>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let GatewayFrame::Task(task) = channel.next().await else {
                continue;
            };
            let (gw, session, provider) = (gw.clone(), session.clone(), provider.clone());
            tokio::spawn(async move {
                let id = task.task_id.clone();
                let post = |r| {
                    let (gw, session, id) = (gw.clone(), session.clone(), id.clone());
                    async move { gw.deliver(&publisher("alice"), &session, &id, r).await }
                };
                match provider.infer(task).await {
                    Ok(Reply::Complete(c)) => post(TaskResult::Completed {
                        status: c.status,
                        retry_after: c.retry_after_secs(),
                        body: c.body,
                    })
                    .await
                    .unwrap(),
                    Ok(Reply::Stream(mut chunks)) => {
                        while let Some(c) = chunks.next().await {
                            post(chunk(&c.unwrap(), false)).await.unwrap();
                        }
                        post(chunk("", true)).await.unwrap();
                    }
                    Err(e) => post(TaskResult::Failed {
                        message: e.to_string(),
                    })
                    .await
                    .unwrap(),
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_relays_to_the_echo_model_streaming_and_not() {
    let o = online().await;
    let _publisher = serve(
        o.f.gw.clone(),
        o.session.clone(),
        o.channel.clone(),
        Arc::new(EchoProvider::new()),
    );
    let Reply::Complete(c) =
        o.f.gw
            .infer(&client(), chat("llm", "hello  relay\nworld", false))
            .await
            .unwrap()
    else {
        panic!("expected a completion")
    };
    assert_eq!(c.status, 200);
    assert_eq!(c.json()["object"], "chat.completion");
    assert_eq!(
        c.json()["choices"][0]["message"]["content"],
        "hello relay world"
    );
    let Reply::Stream(chunks) =
        o.f.gw
            .infer(&client(), chat("llm", "one two three", true))
            .await
            .unwrap()
    else {
        panic!("expected a stream")
    };
    let chunks: Vec<Value> = chunks
        .map(|c| serde_json::from_str(&c.unwrap()).unwrap())
        .collect()
        .await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "one two three");
    assert_eq!(
        chunks.len(),
        4,
        "one chunk per word, then the closing chunk"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_each_get_their_own_answer() {
    let o = online().await;
    let _publisher = serve(
        o.f.gw.clone(),
        o.session.clone(),
        o.channel.clone(),
        Arc::new(EchoProvider::new()),
    );
    let clients = (0..200).map(|i| {
        let gw = o.f.gw.clone();
        tokio::spawn(async move {
            let stream = i % 2 == 0;
            let text = format!("client {i} says hello");
            let reply = gw.infer(&client(), chat("llm", &text, stream)).await;
            let answer = text_of(reply.unwrap()).await;
            (text, answer)
        })
    });
    for c in clients {
        let (asked, answered) = c.await.unwrap();
        assert_eq!(asked, answered);
    }
    assert_eq!(o.f.gw.in_flight(), 0);
}

#[tokio::test]
async fn a_streaming_task_answered_with_an_error_status_becomes_a_completion() {
    let o = online().await;
    let (handle, frame) = o.start(true).await;
    let upstream_error = TaskResult::Completed {
        status: 400,
        body: json!({"error": {"message": "bad"}}).into(),
        retry_after: None,
    };
    o.deliver(&frame, upstream_error).await.unwrap();
    match handle.into_reply().await.unwrap() {
        Reply::Complete(c) => assert_eq!(c.status, 400),
        Reply::Stream(_) => panic!("the status line is chosen from the first event"),
    }
}

/// An upstream's own 503 reaches the client's reply as it came: its status, its body
/// and its `Retry-After`, on a streaming task and on a complete one; at most a day.
#[tokio::test]
async fn an_upstream_answer_keeps_its_status_body_and_retry_after() {
    let o = online().await;
    for stream in [true, false] {
        let (handle, frame) = o.start(stream).await;
        let body = json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}});
        let busy = TaskResult::Completed {
            status: 503,
            body: body.clone().into(),
            retry_after: Some(7),
        };
        o.deliver(&frame, busy).await.unwrap();
        let Reply::Complete(c) = handle.into_reply().await.unwrap() else {
            panic!("a completion, stream: {stream}")
        };
        assert_eq!(
            (c.status, c.json(), c.retry_after),
            (503, body, Some(Duration::from_secs(7))),
            "stream: {stream}"
        );
    }
    // A publisher's absurd retryAfter is cut to a day: no timer built from it overflows.
    let (handle, frame) = o.start(false).await;
    let forever = TaskResult::Completed {
        status: 503,
        body: json!({}).into(),
        retry_after: Some(u64::MAX),
    };
    o.deliver(&frame, forever).await.unwrap();
    let Reply::Complete(c) = handle.into_reply().await.unwrap() else {
        panic!("a completion")
    };
    assert_eq!(c.retry_after, Some(Duration::from_secs(86_400)));
}

#[tokio::test]
async fn a_stream_failing_midway_ends_with_one_error() {
    let o = online().await;
    let (handle, frame) = o.start(true).await;
    o.deliver(&frame, chunk("a", false)).await.unwrap();
    let reply = handle.into_reply();
    let Reply::Stream(mut chunks) = reply.await.unwrap() else {
        panic!("expected a stream")
    };
    assert_eq!(chunks.next().await.unwrap().unwrap(), "a");
    o.deliver(
        &frame,
        TaskResult::Failed {
            message: "upstream died".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(chunks.next().await.unwrap().unwrap_err().status(), 502);
    assert!(
        chunks.next().await.is_none(),
        "the stream closes after its error"
    );
}

#[tokio::test]
async fn the_echo_provider_answers_with_the_last_user_message() {
    let task = TaskFrame {
        task_id: virtual_llm_core::TaskId::generate(),
        kind: virtual_llm_core::protocol::TaskKind::Infer,
        endpoint: Default::default(),
        llm: virtual_llm_core::LlmName::parse("echo").unwrap(),
        stream: false,
        body: json!({"messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "no"},
            {"role": "user", "content": "  the   last\tone "},
        ]})
        .into(),
    };
    let Reply::Complete(c) = EchoProvider::new().infer(task).await.unwrap() else {
        panic!()
    };
    assert_eq!(c.json()["choices"][0]["message"]["content"], "the last one");
    assert_eq!(
        c.json()["model"],
        "echo",
        "the model defaults to the llm name"
    );
}

#[tokio::test]
async fn a_task_failed_by_its_transport_reaches_the_client_even_with_a_full_buffer() {
    let o = online_with(Config {
        task_buffer: 2,
        ..Config::default()
    })
    .await;
    let (mut handle, frame) = o.start(true).await;
    o.deliver(&frame, chunk("a", false)).await.unwrap();
    o.deliver(&frame, chunk("b", false)).await.unwrap();
    let reason = Error::Unavailable {
        kind: virtual_llm_core::UnavailableKind::Saturated,
        reason: "client too slow".into(),
        retry_after: Duration::from_secs(1),
    };
    let stranger = SessionId::generate();
    assert!(
        !o.f.gw
            .fail_task(
                &publisher("alice"),
                &stranger,
                &frame.task_id,
                Error::invalid("x")
            )
            .unwrap(),
        "only its own session"
    );
    assert!(
        !o.f.gw
            .fail_task(
                &publisher("mallory"),
                &o.session,
                &frame.task_id,
                Error::invalid("x")
            )
            .unwrap(),
        "only its own principal"
    );
    assert_eq!(
        o.f.gw
            .fail_task(&client(), &o.session, &frame.task_id, Error::invalid("x"))
            .unwrap_err()
            .status(),
        403,
        "only a publisher"
    );
    assert!(
        o.f.gw
            .fail_task(&publisher("alice"), &o.session, &frame.task_id, reason)
            .unwrap()
    );
    assert!(
        matches!(o.channel.next().await, GatewayFrame::Cancel(c) if c.task_id == frame.task_id)
    );
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("a".into())
    );
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("b".into())
    );
    let err = handle.next().await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("client too slow"),
        "the reason arrives despite the full buffer: {err}"
    );
    assert!(handle.next().await.is_none());
    assert_eq!(
        o.deliver(&frame, chunk("c", false))
            .await
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test]
async fn a_closed_channel_fails_a_task_with_its_reason_even_with_a_full_buffer() {
    let f = fixture_with(Config {
        task_buffer: 1,
        ..Config::default()
    })
    .await;
    let (session, binding, channel) = f.online("alice", &["llm"]).await;
    let row = f.row("llm").await;
    let mut handle =
        f.gw.start_task(&client(), &row, chat("llm", "x", true))
            .unwrap();
    let frame = channel.next_task().await;
    f.gw.deliver(
        &publisher("alice"),
        &session,
        &frame.task_id,
        chunk("a", false),
    )
    .await
    .unwrap();
    binding.release().await.unwrap();
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("a".into())
    );
    let err = handle.next().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("disconnected"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_drain_refuses_new_requests_lets_in_flight_ones_finish_then_closes_channels() {
    let o = online().await;
    let (mut handle, frame) = o.start(false).await;
    let gw = o.f.gw.clone();
    let drain = tokio::spawn(async move { gw.drain(Duration::from_secs(10)).await });
    tokio::task::yield_now().await;
    let refused =
        o.f.gw
            .infer(&client(), chat("llm", "late", false))
            .await
            .unwrap_err();
    assert_eq!(
        (refused.status(), refused.retry_after()),
        (503, Some(Duration::from_secs(5)))
    );
    assert!(
        !drain.is_finished(),
        "the drain waits for the task in flight"
    );
    o.deliver(&frame, completed("finished in time"))
        .await
        .unwrap();
    assert!(matches!(
        handle.next().await,
        Some(Ok(TaskEvent::Completed(_)))
    ));
    assert_eq!(drain.await.unwrap(), 0, "nothing left unfinished");
    assert!(
        matches!(o.channel.next().await, GatewayFrame::Closing(_)),
        "then publishers are told"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_gives_up_after_its_grace_period() {
    let o = online().await;
    let (_handle, frame) = o.start(false).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        o.f.gw.drain(Duration::from_secs(3)).await,
        1,
        "one task still in flight"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3) && started.elapsed() < Duration::from_secs(4)
    );
    assert_eq!(
        o.channel.next_cancel().await.task_id,
        frame.task_id,
        "the publisher is told to stop the failed task"
    );
    assert!(matches!(o.channel.next().await, GatewayFrame::Closing(_)));
}

/// A stream still running when the grace period ends fails with a 503 that says the
/// gateway is shutting down, even once its channel closes behind it (as a transport
/// unbinds it when the publisher hangs up on `closing`): the publisher did not go
/// away of its own accord, and the client must not read that it did.
#[tokio::test(start_paused = true)]
async fn a_drain_fails_unfinished_tasks_saying_the_gateway_is_shutting_down() {
    let f = fixture().await;
    let (session, binding, channel) = f.online("alice", &["llm"]).await;
    let row = f.row("llm").await;
    let mut streaming =
        f.gw.start_task(&client(), &row, chat("llm", "x", true))
            .unwrap();
    let frame = channel.next_task().await;
    let whole =
        f.gw.start_task(&client(), &row, chat("llm", "y", false))
            .unwrap();
    channel.next_task().await;
    f.gw.deliver(
        &publisher("alice"),
        &session,
        &frame.task_id,
        chunk("a", false),
    )
    .await
    .unwrap();
    assert_eq!(
        f.gw.drain(Duration::from_secs(1)).await,
        2,
        "two unfinished"
    );
    let cancelled: std::collections::HashSet<_> = [
        channel.next_cancel().await.task_id,
        channel.next_cancel().await.task_id,
    ]
    .into();
    assert!(
        cancelled.contains(&frame.task_id) && cancelled.len() == 2,
        "each unfinished task's publisher is told to stop"
    );
    assert!(matches!(channel.next().await, GatewayFrame::Closing(_)));
    binding.release().await.unwrap();

    assert_eq!(
        streaming.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("a".into()),
        "what was sent before still arrives"
    );
    for err in [
        streaming.next().await.unwrap().unwrap_err(),
        whole.into_reply().await.unwrap_err(),
    ] {
        assert_eq!(
            (err.status(), err.retry_after()),
            (503, Some(Duration::from_secs(5)))
        );
        assert_eq!(err.to_string(), "the gateway is shutting down");
    }
    assert_eq!(f.gw.in_flight(), 0);
    assert_eq!(
        f.gw.deliver(
            &publisher("alice"),
            &session,
            &frame.task_id,
            chunk("late", false)
        )
        .await
        .unwrap_err()
        .status(),
        404,
        "a late result finds no task"
    );
}

/// After a drain, `settle` waits until every channel is unbound and its rows are
/// written, so that the store may close: not before.
#[tokio::test(start_paused = true)]
async fn settle_waits_until_every_channel_is_unbound_and_its_rows_written() {
    let f = fixture().await;
    let (_session, binding, _channel) = f.online("alice", &["llm"]).await;
    f.gw.drain(Duration::ZERO).await;
    assert!(
        !f.gw.settle(Duration::from_secs(1)).await,
        "a channel is still bound"
    );
    let gw = f.gw.clone();
    let settled = tokio::spawn(async move { gw.settle(Duration::from_secs(10)).await });
    // Unbinds in the background, as a transport's dropped stream does.
    drop(binding);
    assert!(settled.await.unwrap());
    assert_eq!(f.row("llm").await.status, LlmStatus::Inactive);
}

#[tokio::test]
async fn a_task_survives_its_sessions_channel_being_replaced() {
    let o = online().await;
    let (mut streaming, s) = o.start(true).await;
    let (whole, w) = o.start(false).await;
    let (abandoned, a) = o.start(false).await;
    o.deliver(&s, chunk("one", false)).await.unwrap();
    // The same session binds a new channel: the old one is told to close and goes.
    let (newer, newer_channel) = o.f.bind("alice", &o.session).await;
    assert!(matches!(o.channel.next().await, GatewayFrame::Closing(_)));
    assert!(
        !o._binding.is_current(),
        "the old channel is no longer the session's"
    );
    assert_eq!(
        o.f.gw.in_flight(),
        3,
        "tasks belong to the session, not to the channel they were sent on"
    );
    // Results come back under the session, whichever channel carries them.
    o.deliver(&s, chunk("two", true)).await.unwrap();
    o.deliver(&w, completed("whole")).await.unwrap();
    let events: Vec<TaskEvent> = std::iter::from_fn(|| {
        streaming
            .next()
            .now_or_never()
            .flatten()
            .map(Result::unwrap)
    })
    .collect();
    assert_eq!(
        events,
        [
            TaskEvent::Chunk("one".into()),
            TaskEvent::Chunk("two".into()),
            TaskEvent::Done
        ]
    );
    match whole.into_reply().await.unwrap() {
        Reply::Complete(c) => assert_eq!(c.json()["text"], "whole"),
        Reply::Stream(_) => panic!("expected a completion"),
    }
    // A client leaving a task sent on the old channel: the cancel goes to the new one.
    drop(abandoned);
    match newer_channel.next().await {
        GatewayFrame::Cancel(c) => assert_eq!(c.task_id, a.task_id),
        other => panic!("expected a cancel, got {other:?}"),
    }
    assert_eq!(o.f.gw.in_flight(), 0);
    assert!(newer.release().await.unwrap());
}

/// Protocol 2 numbers chunks: a replayed `seq` is dropped (the client sees each chunk
/// once), a gap fails the task for the client (502) and is refused to the publisher
/// (400), and nothing more is delivered after it.
#[tokio::test]
async fn numbered_chunks_drop_duplicates_and_fail_on_a_gap() {
    let o = online().await;
    let (mut handle, frame) = o.start(true).await;
    let numbered = |data: &str, seq| TaskResult::Chunk {
        data: data.into(),
        done: false,
        seq: Some(seq),
    };
    o.deliver(&frame, numbered("a", 0)).await.unwrap();
    o.deliver(&frame, numbered("a again", 0)).await.unwrap();
    o.deliver(&frame, numbered("b", 1)).await.unwrap();
    let gap = o.deliver(&frame, numbered("d", 3)).await.unwrap_err();
    assert_eq!(gap.status(), 400, "{gap}");
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("a".into())
    );
    assert_eq!(
        handle.next().await.unwrap().unwrap(),
        TaskEvent::Chunk("b".into())
    );
    let failed = handle.next().await.unwrap().unwrap_err();
    assert_eq!(failed.status(), 502, "{failed}");
    assert!(
        failed.to_string().contains("lost chunks 2 to 2"),
        "{failed}"
    );
    assert!(handle.next().await.is_none());
    assert_eq!(
        o.deliver(&frame, numbered("e", 4))
            .await
            .unwrap_err()
            .status(),
        409,
        "the task is over"
    );
    assert_eq!(o.f.gw.in_flight(), 0);
}

/// Several results delivered together (a run of chunks from one frame) are handled as
/// one by one: replayed chunks dropped, the chunks before a gap delivered and the task
/// then failed, and anything after a final result a 409 once the rest is delivered.
#[tokio::test]
async fn results_delivered_together_keep_the_rules_of_one_by_one() {
    let numbered = |data: &str, seq, done| TaskResult::Chunk {
        data: data.into(),
        done,
        seq: Some(seq),
    };
    let o = online().await;
    let deliver_all = |frame: &TaskFrame, results: Vec<TaskResult>| {
        let (gw, session, task) = (o.f.gw.clone(), o.session.clone(), frame.task_id.clone());
        async move {
            gw.deliver_all(&publisher("alice"), &session, &task, results)
                .await
        }
    };
    async fn rest(handle: &mut TaskHandle) -> Vec<Result<TaskEvent, u16>> {
        let mut events = Vec::new();
        while let Some(event) = handle.next().await {
            events.push(event.map_err(|e| e.status()));
        }
        events
    }
    let chunk_event = |data: &str| Ok(TaskEvent::Chunk(data.into()));

    // A replayed prefix is dropped; the run's `done` ends the stream after its data.
    let (mut handle, frame) = o.start(true).await;
    deliver_all(
        &frame,
        vec![numbered("a", 0, false), numbered("b", 1, false)],
    )
    .await
    .unwrap();
    deliver_all(
        &frame,
        vec![
            numbered("b again", 1, false),
            numbered("c", 2, false),
            numbered("d", 3, true),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        rest(&mut handle).await,
        vec![
            chunk_event("a"),
            chunk_event("b"),
            chunk_event("c"),
            chunk_event("d"),
            Ok(TaskEvent::Done)
        ]
    );

    // A gap inside a run: the chunks before it reach the client, then the failure.
    let (mut handle, frame) = o.start(true).await;
    let gap = deliver_all(
        &frame,
        vec![
            numbered("a", 0, false),
            numbered("b", 1, false),
            numbered("e", 4, false),
            numbered("f", 5, false),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(gap.status(), 400, "{gap}");
    assert_eq!(
        rest(&mut handle).await,
        vec![chunk_event("a"), chunk_event("b"), Err(502)]
    );

    // A result after the final one: everything up to the end is delivered, the rest
    // is a 409, as it would be alone.
    let (mut handle, frame) = o.start(true).await;
    let late = deliver_all(
        &frame,
        vec![
            numbered("a", 0, false),
            numbered("", 1, true),
            numbered("late", 2, false),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(late.status(), 409, "{late}");
    assert_eq!(
        rest(&mut handle).await,
        vec![chunk_event("a"), Ok(TaskEvent::Done)]
    );

    // A chunk refused inside a run: those before it are delivered, the task goes on.
    let (mut handle, frame) = o.start(true).await;
    let refused = deliver_all(
        &frame,
        vec![numbered("a", 0, false), numbered("x\ny", 1, false)],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.status(), 400, "{refused}");
    deliver_all(&frame, vec![numbered("b", 1, false), numbered("", 2, true)])
        .await
        .unwrap();
    assert_eq!(
        rest(&mut handle).await,
        vec![chunk_event("a"), chunk_event("b"), Ok(TaskEvent::Done)]
    );
    assert_eq!(o.f.gw.in_flight(), 0);
}

/// Results delivered together take the task's buffer as they would one by one: a
/// delivery of more chunks than the buffer holds waits for the client, and one given
/// up while it waits (its publisher's request cut off) has taken nothing it did not
/// hand over, so its replay is taken whole, outcome included.
#[tokio::test]
async fn results_delivered_together_fill_the_buffer_one_by_one_and_can_be_given_up() {
    use futures::FutureExt;
    let numbered = |data: &str, seq| TaskResult::Chunk {
        data: data.into(),
        done: false,
        seq: Some(seq),
    };
    let o = online_with(Config {
        task_buffer: 2,
        ..Config::default()
    })
    .await;
    let deliver_all = |frame: &TaskFrame, results: Vec<TaskResult>| {
        let (gw, session, task) = (o.f.gw.clone(), o.session.clone(), frame.task_id.clone());
        async move {
            gw.deliver_all(&publisher("alice"), &session, &task, results)
                .await
        }
    };

    // Five chunks into a buffer of two: the delivery waits for the client.
    let (mut handle, frame) = o.start(true).await;
    let five: Vec<_> = (0..5).map(|i| numbered(&format!("c{i}"), i)).collect();
    let mut delivery = Box::pin(deliver_all(&frame, five));
    assert!(
        (&mut delivery).now_or_never().is_none(),
        "two chunks fit, five do not"
    );
    let read = async {
        let mut seen = Vec::new();
        for _ in 0..5 {
            match handle.next().await {
                Some(Ok(TaskEvent::Chunk(data))) => seen.push(data),
                other => panic!("a chunk: {other:?}"),
            }
        }
        seen
    };
    let (delivered, seen) = tokio::join!(delivery, read);
    delivered.unwrap();
    assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4"]);
    let done = TaskResult::Chunk {
        data: String::new(),
        done: true,
        seq: Some(5),
    };
    deliver_all(&frame, vec![done]).await.unwrap();
    assert_eq!(handle.next().await.unwrap().unwrap(), TaskEvent::Done);

    // A full buffer, and a delivery ending in a failure given up while it waits.
    let (mut handle, frame) = o.start(true).await;
    deliver_all(&frame, vec![numbered("a", 0), numbered("b", 1)])
        .await
        .unwrap();
    let failure = || {
        vec![
            numbered("c", 2),
            numbered("d", 3),
            TaskResult::Failed {
                message: "oom".into(),
            },
        ]
    };
    assert!(
        Box::pin(deliver_all(&frame, failure()))
            .now_or_never()
            .is_none(),
        "the buffer is full"
    );
    // Its replay is taken whole: nothing of it was taken before.
    let replay = deliver_all(&frame, failure());
    let read = async {
        let mut events = Vec::new();
        while let Some(event) = handle.next().await {
            events.push(event.map_err(|e| e.status()));
        }
        events
    };
    let (replayed, events) = tokio::join!(replay, read);
    replayed.unwrap();
    let chunk = |d: &str| Ok(TaskEvent::Chunk(d.into()));
    assert_eq!(
        events,
        [chunk("a"), chunk("b"), chunk("c"), chunk("d"), Err(502)]
    );
    assert_eq!(o.f.gw.in_flight(), 0);
}
