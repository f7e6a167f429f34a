//! The transport conformance suite: end-to-end behaviour every transport must show,
//! written once over [`Transport`]. A real gateway serves on `127.0.0.1:0`; clients
//! speak HTTP to it; publishers connect through the transport's `Wire`.
//!
//! Each case is a `pub async fn` taking the transport;
//! [`transport_conformance_tests!`](crate::transport_conformance_tests) stamps out one
//! `#[tokio::test]` per case for a transport.

use std::sync::Arc;

use serde_json::{Value, json};

use super::gateway::{RawResponse, TestGateway};
use super::plane::Plane;
use super::providers::{Answers, FailsWhenReleased, Gated, Hanging, Paced};
use super::support::{TempDir, eventually};
use super::transport::Transport;
use crate::protocol::{RegisterRequest, TaskResult};
use crate::{Completion, EchoProvider, PublisherOptions};

/// register → task → result, non-streaming: the client gets the publisher's answer.
pub async fn non_streaming_round_trip(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    let (status, body) = gw
        .chat("client", "echo", "hello over the wire", false)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "hello over the wire"
    );
    p.stop().await;
}

/// Streaming: every chunk arrives as an OpenAI `chat.completion.chunk`, then `[DONE]`.
pub async fn streaming_round_trip(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    let mut stream = gw.chat_stream("client", "echo", "one two three four").await;
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(data) = stream.next_data().await {
        if data == "[DONE]" {
            assert!(stream.next_data().await.is_none(), "nothing after [DONE]");
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
        chunks += 1;
    }
    assert_eq!(text, "one two three four");
    assert_eq!(chunks, 5, "one chunk per word and the closing chunk");
    p.stop().await;
}

/// A client stream is framed byte for byte as OpenAI frames it: each event one
/// `data: {…}` line (a space after the colon), the last `data: [DONE]`, so that a
/// hand-written `startswith("data: ")` parser reads every chunk. Each chunk's event
/// starts with its number for a client to resume after (`id: 0`, `id: 1`…, SPEC §15);
/// `[DONE]` has none.
pub async fn streamed_events_are_framed_as_openai_frames_them(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    let response = gw
        .post_chat(
            "client",
            json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": "one two"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(body.ends_with("\n\ndata: [DONE]\n\n"), "{body:?}");
    let events: Vec<&str> = body.trim_end().split("\n\n").collect();
    assert_eq!(
        events.len(),
        4,
        "two words, the closing chunk, [DONE]: {body:?}"
    );
    for (seq, event) in events[..3].iter().enumerate() {
        let event = event
            .strip_prefix(&format!("id: {seq}\n"))
            .unwrap_or_else(|| panic!("not `id: {seq}` first: {event:?}"));
        let data = event
            .strip_prefix("data: {")
            .unwrap_or_else(|| panic!("not `data: {{…}}`: {event:?}"));
        assert!(!data.contains('\n'), "one line per event: {event:?}");
        let chunk: Value = serde_json::from_str(&event["data: ".len()..]).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }
    p.stop().await;
}

/// An upstream's own error answer passes through as it came, to a streaming request
/// too: a 503 with its body and its `Retry-After` (the transport carries
/// `retryAfter`), a 400 with its body and no `Retry-After`.
pub async fn an_upstream_error_answer_passes_through(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let loading =
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}});
    let too_long = json!({"error": {"message": "the request exceeds the available context size", "type": "invalid_request_error", "code": 400}});
    let answer = |status, body: &Value, retry_after| {
        Arc::new(Answers::with(Completion {
            status,
            body: body.clone().into(),
            retry_after,
        }))
    };
    let seven = Some(std::time::Duration::from_secs(7));
    let p = gw
        .publish(t, "alice", &["loading"], answer(503, &loading, seven))
        .await;
    let q = gw
        .publish(t, "alice", &["small"], answer(400, &too_long, None))
        .await;
    for stream in [false, true] {
        for (model, status, body, retry_after) in [
            ("loading", 503, &loading, Some("7")),
            ("small", 400, &too_long, None),
        ] {
            let response = gw
                .post_chat(
                    "client",
                    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}),
                )
                .await;
            assert_eq!(response.status(), status, "{model}, stream: {stream}");
            assert_eq!(
                response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap()),
                retry_after,
                "{model}, stream: {stream}"
            );
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "{model}, stream: {stream}"
            );
            assert_eq!(&response.json::<Value>().await.unwrap(), body);
        }
    }
    p.stop().await;
    q.stop().await;
}

/// The client sees the first chunk while the provider is still working on the next.
pub async fn chunks_reach_the_client_before_the_provider_finishes(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let gated = Arc::new(Gated::default());
    let p = gw.publish(t, "alice", &["gated"], gated.clone()).await;
    let mut stream = gw.chat_stream("client", "gated", "x").await;
    let first = stream.next_data().await.unwrap();
    assert!(first.contains("first"), "{first}");
    assert!(
        !gated.released(),
        "the provider has not produced the rest yet"
    );
    gated.release();
    let second = stream.next_data().await.unwrap();
    assert!(second.contains("second"), "{second}");
    assert_eq!(stream.next_data().await.as_deref(), Some("[DONE]"));
    p.stop().await;
}

/// A stream that fails midway (the publisher reports an error after the first chunk,
/// or its channel is lost) ends with one `error` event, then the response ends and
/// the connection closes: a raw HTTP/1.1 client reading to the end of the connection
/// gets there, rather than waiting on a kept-alive connection. Runs under paused
/// time, so the guard turns a connection left open into a failure at once (it
/// expires before the server's 75 s idle timeout would close the connection).
pub async fn a_stream_failing_midway_ends_and_closes(t: &dyn Transport, plane: Option<&dyn Plane>) {
    /// The error event's OpenAI error code, after checking the response ended (the
    /// last chunk of the chunked body) before the connection closed.
    async fn error_then_close(raw: &mut RawResponse) -> Value {
        let guard = std::time::Duration::from_secs(60);
        let text = tokio::time::timeout(guard, raw.read_to_close())
            .await
            .expect("the connection closes after the error event");
        assert!(text.ends_with("\r\n0\r\n\r\n"), "the body ends: {text:?}");
        let (_, data) = text
            .split_once("event: error\ndata: ")
            .unwrap_or_else(|| panic!("an error event: {text:?}"));
        let data = data.split('\n').next().unwrap();
        serde_json::from_str::<Value>(data).unwrap()["error"]["code"].clone()
    }

    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let failing = Arc::new(FailsWhenReleased::default());
    let p = gw.publish(t, "alice", &["failing"], failing.clone()).await;
    let mut raw = gw.raw_chat_stream("client", "failing").await;
    raw.read_until("first").await;
    failing.release();
    assert_eq!(error_then_close(&mut raw).await, "upstream_error");
    p.stop().await;

    let proxy = gw.proxy().await;
    let hanging = Arc::new(Hanging::default());
    let p = gw
        .publish_at(
            &proxy.url,
            t,
            "alice",
            &["slow"],
            hanging,
            PublisherOptions::default(),
        )
        .await;
    let mut raw = gw.raw_chat_stream("client", "slow").await;
    raw.read_until("first").await;
    proxy.kill();
    assert_eq!(error_then_close(&mut raw).await, "llm_unavailable");
    p.stop().await;
}

/// 200 concurrent clients, streaming and not, each get their own answer.
pub async fn concurrent_clients_get_their_own_answers(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = Arc::new(TestGateway::start_on(t, plane, Default::default()).await);
    clients_get_their_own_answers(&gw, t, 200).await;
}

/// `clients` clients at once on `gw`, half asking for whole answers and half for
/// streams, of a publisher over `t`: each gets its own answer, and no task is left.
/// A case of the suite, and a check for a gateway served differently (its own
/// server, its own runtimes).
pub async fn clients_get_their_own_answers(
    gw: &Arc<TestGateway>,
    t: &dyn Transport,
    clients: usize,
) {
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    let clients: Vec<_> = (0..clients)
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let text = format!("client {i} asks");
                if i % 2 == 0 {
                    let (status, body) = gw.chat("client", "echo", &text, false).await;
                    assert_eq!(status, 200, "{body}");
                    (
                        text,
                        body["choices"][0]["message"]["content"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    )
                } else {
                    let answer = gw.chat_stream("client", "echo", &text).await.text().await;
                    (text, answer)
                }
            })
        })
        .collect();
    for c in clients {
        let (asked, answered) = c.await.unwrap();
        assert_eq!(asked, answered);
    }
    assert_eq!(gw.gateway.in_flight(), 0);
    p.stop().await;
}

/// A publisher that stops: its row goes inactive at once and clients get 503 with
/// `Retry-After`.
pub async fn a_stopped_publisher_is_503_at_once_and_its_row_inactive(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    assert_eq!(gw.row_status("echo").await, "active");
    p.stop().await;
    eventually("the row goes inactive", || async {
        gw.row_status("echo").await == "inactive"
    })
    .await;
    let response = gw
        .post_chat(
            "client",
            json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "llm_unavailable");
}

/// A publisher restarted with its session file revives the same row, same id.
pub async fn a_sticky_reconnect_revives_the_same_row(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let dir = TempDir::new();
    let options = PublisherOptions {
        session_file: Some(dir.path().join("session")),
        ..Default::default()
    };
    let p = gw
        .publish_with(
            t,
            "alice",
            &["echo"],
            Arc::new(EchoProvider::new()),
            options.clone(),
        )
        .await;
    let session = p.connected().await;
    let id = gw.row("echo").await["id"].clone();
    p.stop().await;
    eventually("the row goes inactive", || async {
        gw.row_status("echo").await == "inactive"
    })
    .await;
    let again = gw
        .publish_with(
            t,
            "alice",
            &["echo"],
            Arc::new(EchoProvider::new()),
            options,
        )
        .await;
    assert_eq!(again.connected().await, session);
    assert_eq!(gw.row("echo").await["id"], id);
    assert_eq!(gw.row_status("echo").await, "active");
    let (status, _) = gw.chat("client", "echo", "back", false).await;
    assert_eq!(status, 200);
    again.stop().await;
}

/// A client that goes away cancels the task: the provider's work is dropped.
pub async fn a_client_leaving_cancels_the_provider(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    a_client_leaving_cancels_its_task(&gw, t).await;
}

/// A client that leaves a stream on `gw` after its first chunk cancels its task at
/// the publisher (over `t`), and no task is left. A case of the suite, and a check for
/// a gateway served differently.
pub async fn a_client_leaving_cancels_its_task(gw: &TestGateway, t: &dyn Transport) {
    let hanging = Arc::new(Hanging::default());
    let p = gw.publish(t, "alice", &["slow"], hanging.clone()).await;
    let dropped = hanging.dropped.clone();
    let notified = dropped.notified();
    let mut stream = gw.chat_stream("client", "slow", "x").await;
    assert!(
        stream.next_data().await.is_some(),
        "the first chunk arrives"
    );
    drop(stream);
    notified.await;
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

/// A task past its deadline answers 504, and the publisher is told to cancel. Runs
/// under paused tokio time: the 300 s deadline passes without waiting for it.
pub async fn a_deadline_answers_504_and_cancels(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let hanging = Arc::new(Hanging::default());
    let p = gw.publish(t, "alice", &["slow"], hanging.clone()).await;
    let cancelled = hanging.dropped.notified();
    let (status, body) = gw.chat("client", "slow", "x", false).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "deadline_exceeded");
    cancelled.await;
    p.stop().await;
}

/// Results posted by another session, or by another principal holding the session id,
/// are refused (404) and the task still completes with its own publisher's answer;
/// replaying a finished task's result is 409.
pub async fn foreign_and_replayed_results_are_refused(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let gated = Arc::new(Gated::default());
    let p = gw.publish(t, "alice", &["gated"], gated.clone()).await;
    let session = p.connected().await;
    let other = gw
        .register_raw(
            "alice",
            json!({"llms": [{"name": "other", "type": "openai", "model": "m"}]}),
        )
        .await;
    let other_session = other["providerSessionId"].as_str().unwrap().to_owned();
    let call = {
        let gw = gw.clone_handle();
        tokio::spawn(async move { gw.chat_stream("client", "gated", "x").await.text().await })
    };
    let task = gated.task_id().await;
    let forged = TaskResult::Chunk {
        data: "forged".into(),
        done: true,
        seq: None,
    };
    assert_eq!(
        gw.post_result("alice", &other_session, &task, &forged)
            .await,
        404,
        "another session"
    );
    assert_eq!(
        gw.post_result("mallory", session.as_str(), &task, &forged)
            .await,
        404,
        "another principal"
    );
    assert_eq!(
        gw.post_result("client", session.as_str(), &task, &forged)
            .await,
        403,
        "a client token"
    );
    gated.release();
    let text = call.await.unwrap();
    assert_eq!(
        text, "firstsecond",
        "the genuine answer, untouched by the forgeries"
    );
    let replay = TaskResult::Chunk {
        data: "again".into(),
        done: true,
        seq: None,
    };
    assert_eq!(
        gw.post_result("alice", session.as_str(), &task, &replay)
            .await,
        409,
        "a replay of a finished task"
    );
    p.stop().await;
}

/// Malformed bodies, unknown models, bad names and oversized bodies get their status
/// and write nothing.
pub async fn bad_input_gets_its_status_and_writes_nothing(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let config = crate::Config {
        max_body_bytes: 4096,
        ..Default::default()
    };
    let gw = TestGateway::start_on(t, plane, config).await;
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    let before = gw.list().await;
    assert_eq!(
        gw.post_raw("alice", "_provider-register", "{not json")
            .await,
        400
    );
    assert_eq!(
        gw.post_raw("alice", "_provider-register", r#"{"llms": "nope"}"#)
            .await,
        400
    );
    let bad_name = r#"{"llms":[{"name":"_provider-x","type":"t","model":"m"}]}"#;
    assert_eq!(
        gw.post_raw("alice", "_provider-register", bad_name).await,
        400
    );
    let spaced = r#"{"llms":[{"name":"has space","type":"t","model":"m"}]}"#;
    assert_eq!(
        gw.post_raw("alice", "_provider-register", spaced).await,
        400
    );
    let huge = format!(
        r#"{{"llms":[{{"name":"big","type":"t","model":"{}"}}]}}"#,
        "m".repeat(8192)
    );
    assert_eq!(gw.post_raw("alice", "_provider-register", &huge).await, 413);
    let response = gw
        .post_chat("client", json!({"model": "nope", "messages": []}))
        .await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let response = gw.post_chat("client", json!({"model": "echo"})).await;
    assert_eq!(response.status(), 400, "messages missing");
    assert_eq!(gw.get_status("client", "_provider-x").await, 400);
    assert_eq!(gw.get_status("client", "nope").await, 404);
    assert_eq!(gw.post_raw("nobody", "_provider-register", "{}").await, 401);
    assert_eq!(
        gw.post_raw(
            "client",
            "_provider-register",
            r#"{"llms":[{"name":"c","type":"t","model":"m"}]}"#
        )
        .await,
        403
    );
    let unknown = RegisterRequest {
        agents: Vec::new(),
        provider_session_id: None,
        protocol_version: Some(9),
        llms: vec![],
        capabilities: Vec::new(),
    };
    assert_eq!(
        gw.post_raw(
            "alice",
            "_provider-register",
            &serde_json::to_string(&unknown).unwrap()
        )
        .await,
        426
    );
    assert_eq!(gw.list().await, before, "nothing written");
    assert_eq!(gw.row_status("echo").await, "active");
    p.stop().await;
}

/// `GET /v1/models` lists the active LLMs the way OpenAI SDKs expect.
pub async fn models_lists_active_llms(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish(
            t,
            "alice",
            &["echo", "echo-2"],
            Arc::new(EchoProvider::new()),
        )
        .await;
    let models = gw.get_json("client", "/v1/models").await;
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["echo", "echo-2"]);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "virtual");
    p.stop().await;
    eventually("rows inactive", || async {
        gw.row_status("echo").await == "inactive"
    })
    .await;
    let models = gw.get_json("client", "/v1/models").await;
    assert!(
        models["data"].as_array().unwrap().is_empty(),
        "inactive llms are not listed"
    );
}

/// A gateway shutting down while a stream is in flight: once the grace period is over
/// the stream ends with an error event saying the gateway is shutting down (a 503),
/// not that the publisher disconnected, although the publisher's channel closes
/// with it.
pub async fn a_drain_ends_an_unfinished_stream_saying_the_gateway_is_shutting_down(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let hanging = Arc::new(Hanging::default());
    let p = gw.publish(t, "alice", &["slow"], hanging.clone()).await;
    let mut stream = gw.chat_stream("client", "slow", "x").await;
    let first = stream.next_data().await.unwrap();
    assert!(first.contains("first"), "{first}");
    assert_eq!(gw.gateway.drain(std::time::Duration::ZERO).await, 1);
    let (event, data) = stream.next_event().await.unwrap();
    assert_eq!(event, "error", "{data}");
    let body: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        body["error"]["message"], "the gateway is shutting down",
        "{body}"
    );
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
    assert!(stream.next_event().await.is_none(), "and the stream ends");
    // The publisher is told, and aborts the provider's work.
    hanging.dropped.notified().await;
    p.stop().await;
}

/// The chunk texts of a [`Paced`] stream read from `stream` up to `[DONE]` (or
/// `up_to` of them), in the order they came.
async fn paced_words(stream: &mut super::gateway::SseReader, up_to: Option<usize>) -> Vec<String> {
    let mut words = Vec::new();
    while up_to.is_none_or(|n| words.len() < n) {
        let Some(data) = stream.next_data().await else {
            panic!("the stream ended without [DONE] after {words:?}");
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if let Some(word) = chunk["choices"][0]["delta"]["content"].as_str() {
            words.push(word.to_owned());
        }
    }
    words
}

fn numbers(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

/// A gateway (on `plane`, two replicas), a [`Proxy`](super::Proxy) in front of its
/// publishers' side, and a [`Paced`] LLM `slow` of `chunks` chunks published through
/// the proxy (and, when `then_direct`, failing over to the clients' gateway URL), with
/// `options`: the setting of the resume cases, which cut the proxy.
async fn cut_off(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
    chunks: usize,
    then_direct: bool,
    options: PublisherOptions,
) -> (TestGateway, super::Proxy, Arc<Paced>, crate::Publisher) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let proxy = gw.proxy().await;
    let paced = Arc::new(Paced::new(chunks));
    let urls = if then_direct {
        format!("{},{}", proxy.url, gw.url)
    } else {
        proxy.url.clone()
    };
    let p = gw
        .publish_at(&urls, t, "alice", &["slow"], paced.clone(), options)
        .await;
    (gw, proxy, paced, p)
}

/// A publisher's channel is cut in the middle of a 30-chunk stream, and its next
/// channel comes up within the resume window (SPEC §15): the client's stream pauses
/// and goes on, every chunk once and in order, the ones produced during the cut
/// included.
pub async fn a_stream_survives_a_cut_channel(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let (gw, proxy, paced, p) = cut_off(t, plane, 30, false, PublisherOptions::default()).await;
    paced.allow(10);
    let mut stream = gw.chat_stream("client", "slow", "count").await;
    let mut words = paced_words(&mut stream, Some(10)).await;
    proxy.kill();
    // The upstream goes on while the channel is down.
    paced.allow(10);
    paced.wait_produced(20).await;
    proxy.revive();
    paced.allow(10);
    words.extend(paced_words(&mut stream, None).await);
    assert_eq!(words, numbers(0..30));
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

/// A publisher cut off for good from the gateway it was connected to reconnects to
/// the next one it knows (`publisher --gateway A,B`; on two replicas, the replica the
/// client calls) and resumes its task there: the client's stream goes on, every chunk
/// once and in order.
pub async fn a_stream_survives_its_publisher_moving_to_another_gateway_url(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let (gw, proxy, paced, p) = cut_off(t, plane, 30, true, PublisherOptions::default()).await;
    paced.allow(10);
    let mut stream = gw.chat_stream("client", "slow", "count").await;
    let mut words = paced_words(&mut stream, Some(10)).await;
    proxy.kill();
    paced.allow(20);
    words.extend(paced_words(&mut stream, None).await);
    assert_eq!(words, numbers(0..30));
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

/// A non-streaming task whose publisher's channel is cut while it works gets its
/// answer once the channel is back.
pub async fn a_non_streaming_task_survives_a_cut_channel(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let (gw, proxy, paced, p) = cut_off(t, plane, 3, false, PublisherOptions::default()).await;
    let answer = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.chat("client", "slow", "count", false).await })
    };
    paced.allow(1);
    paced.wait_produced(1).await;
    proxy.kill();
    paced.allow(2);
    paced.wait_produced(3).await;
    proxy.revive();
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "0 1 2");
    p.stop().await;
}

/// A cut longer than the resume window: the client's stream ends with an error event
/// (503 `llm_unavailable`), never a hang, and the publisher stops the upstream call.
/// Runs under paused tokio time: the 10 s window passes without waiting for it.
pub async fn a_cut_longer_than_the_resume_window_fails_the_stream(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let (gw, proxy, paced, p) = cut_off(t, plane, 30, false, PublisherOptions::default()).await;
    let stopped = paced.dropped.notified();
    paced.allow(2);
    let mut stream = gw.chat_stream("client", "slow", "count").await;
    assert_eq!(paced_words(&mut stream, Some(2)).await, numbers(0..2));
    proxy.kill();
    let (event, data) = stream.next_event().await.expect("an error event");
    assert_eq!(event, "error", "{data}");
    let body: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(body["error"]["code"], "llm_unavailable", "{body}");
    assert!(
        stream.next_event().await.is_none(),
        "nothing after the error"
    );
    // The publisher gave the task up too: its upstream call was dropped.
    stopped.await;
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

/// A client that leaves while its publisher's channel is cut: the cancel reaches the
/// publisher when its channel is back, and the upstream call stops.
pub async fn a_cancel_during_a_cut_reaches_the_publisher_after_it_reconnects(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let (gw, proxy, paced, p) = cut_off(t, plane, 30, false, PublisherOptions::default()).await;
    let stopped = paced.dropped.notified();
    paced.allow(2);
    let mut stream = gw.chat_stream("client", "slow", "count").await;
    assert_eq!(paced_words(&mut stream, Some(2)).await, numbers(0..2));
    proxy.kill();
    drop(stream);
    eventually("the task is cancelled", || async {
        gw.gateway.in_flight() == 0
    })
    .await;
    proxy.revive();
    stopped.await;
    assert!(paced.produced() < 30, "the upstream call stopped early");
    p.stop().await;
}

/// A task that produces more than its publisher's `resume_buffer` while the channel
/// is down is lost, and says so: the upstream call stops, and the client's stream ends
/// with an error event once the channel is back.
pub async fn a_task_past_its_resume_buffer_fails_honestly(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let options = PublisherOptions {
        // A few chunks' worth.
        resume_buffer: 2048,
        ..PublisherOptions::default()
    };
    let (gw, proxy, paced, p) = cut_off(t, plane, 30, false, options).await;
    let stopped = paced.dropped.notified();
    paced.allow(2);
    let mut stream = gw.chat_stream("client", "slow", "count").await;
    assert_eq!(paced_words(&mut stream, Some(2)).await, numbers(0..2));
    proxy.kill();
    // Once the publisher knows its channel is gone (before, a sender may still take
    // chunks for the dead socket: then the replay misses them and the task fails on
    // the gap instead).
    p.state()
        .wait_for(|s| !matches!(s, crate::publisher::PublisherState::Connected { .. }))
        .await
        .unwrap();
    paced.allow(28);
    stopped.await;
    assert!(paced.produced() < 30, "the upstream call stopped early");
    proxy.revive();
    let (event, data) = loop {
        let (event, data) = stream.next_event().await.expect("an error event");
        if event == "error" {
            break (event, data);
        }
    };
    let body: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(body["error"]["code"], "upstream_error", "{event}: {body}");
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

/// Stamps out one `#[tokio::test]` per case of the transport conformance suite for
/// a transport value (an expression of a type implementing
/// [`Transport`](crate::testkit::Transport), evaluated once per test), on one
/// gateway.
///
/// The calling crate needs `tokio` with the `macros`, `rt-multi-thread` and
/// `test-util` features (two cases run under paused time).
///
/// ```no_run
/// mod sse {
///     virtual_llm::transport_conformance_tests!(virtual_llm::testkit::SseTransport);
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! transport_conformance_tests {
    ($transport:expr) => {
        $crate::__transport_suite_cases!($transport, ::core::option::Option::None);
    };
}

/// Stamps out one `#[tokio::test]` per case of the transport conformance suite for
/// a transport value on two gateway replicas linked by a plane (an expression of a
/// type implementing [`Plane`](crate::testkit::Plane), evaluated once per test):
/// publishers connect to one replica, clients call the other.
///
/// Stamp it in a module of its own next to
/// [`transport_conformance_tests!`](crate::transport_conformance_tests): both name
/// their tests after the cases.
///
/// ```no_run
/// mod sse_on_two_replicas {
///     virtual_llm::transport_plane_conformance_tests!(
///         virtual_llm::testkit::SseTransport,
///         virtual_llm::testkit::MemoryCluster::new()
///     );
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! transport_plane_conformance_tests {
    ($transport:expr, $plane:expr) => {
        $crate::__transport_suite_cases!(
            $transport,
            ::core::option::Option::Some(&$plane as &dyn $crate::testkit::Plane)
        );
    };
}

/// The cases, for the two macros above.
#[doc(hidden)]
#[macro_export]
macro_rules! __transport_suite_cases {
    ($transport:expr, $plane:expr) => {
        $crate::__transport_suite_cases!(@cases $transport, $plane;
            non_streaming_round_trip,
            streaming_round_trip,
            streamed_events_are_framed_as_openai_frames_them,
            chunks_reach_the_client_before_the_provider_finishes,
            an_upstream_error_answer_passes_through,
            concurrent_clients_get_their_own_answers,
            a_stopped_publisher_is_503_at_once_and_its_row_inactive,
            a_sticky_reconnect_revives_the_same_row,
            a_client_leaving_cancels_the_provider,
            foreign_and_replayed_results_are_refused,
            bad_input_gets_its_status_and_writes_nothing,
            models_lists_active_llms,
            a_drain_ends_an_unfinished_stream_saying_the_gateway_is_shutting_down,
            a_stream_survives_a_cut_channel,
            a_stream_survives_its_publisher_moving_to_another_gateway_url,
            a_non_streaming_task_survives_a_cut_channel,
            a_cancel_during_a_cut_reaches_the_publisher_after_it_reconnects,
            a_task_past_its_resume_buffer_fails_honestly,
        );
    };
    (@cases $transport:expr, $plane:expr; $($case:ident,)*) => {
        #[::tokio::test(start_paused = true)]
        async fn a_deadline_answers_504_and_cancels() {
            $crate::testkit::transport_suite::a_deadline_answers_504_and_cancels(
                &$transport,
                $plane,
            )
            .await;
        }

        #[::tokio::test(start_paused = true)]
        async fn a_cut_longer_than_the_resume_window_fails_the_stream() {
            $crate::testkit::transport_suite::a_cut_longer_than_the_resume_window_fails_the_stream(
                &$transport,
                $plane,
            )
            .await;
        }

        #[::tokio::test(start_paused = true)]
        async fn a_stream_failing_midway_ends_and_closes() {
            $crate::testkit::transport_suite::a_stream_failing_midway_ends_and_closes(
                &$transport,
                $plane,
            )
            .await;
        }

        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testkit::transport_suite::$case(&$transport, $plane).await;
            }
        )*
    };
}
