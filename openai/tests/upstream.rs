//! The OpenAI-compatible upstream client, provider and public backend, against a small
//! OpenAI-compatible server served by warp on 127.0.0.1:0 that records every request:
//! non-streamed round trips (model replaced, bearer key sent), real per-chunk
//! streaming (the first chunk is seen while the upstream is still held back), `[DONE]`
//! and comments not forwarded, the upstream's error answers passed through (status,
//! body, `Retry-After`), unreachable upstreams as 502 naming no address, a stream broken
//! midway, cancellation by dropping the future or the stream, routing of public LLMs by
//! name, a provider answering a real task frame, and completions and embeddings tasks
//! sent to the upstream's own paths.
//!
//! Nothing waits on the clock: each step waits on a signal from the other side. The
//! only timer is a generous guard that turns a hang into a failure.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use virtual_llm_core::protocol::{TaskFrame, TaskKind};
use virtual_llm_core::{
    ChunkStream, Completion, Error, InferRequest, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus,
    Provider, PublicBackend, Reply, TaskId, Timestamp,
};
use virtual_llm_openai::{OpenAiBackend, OpenAiProvider, OpenAiUpstream};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply as _, Response};

/// What the upstream saw of one request.
#[derive(Debug)]
struct Recorded {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// One piece of an upstream response body, or a failure that aborts it.
type Piece = Result<Bytes, io::Error>;

/// Fails the test instead of hanging it when an awaited event never comes.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Serves `routes` on 127.0.0.1:0 and returns the address.
async fn serve(routes: BoxedFilter<(Response,)>) -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    addr
}

/// An OpenAI-compatible upstream on `POST /v1/chat/completions`: records each request,
/// then answers with `answer(body)`.
async fn start_upstream<H>(answer: H) -> (SocketAddr, mpsc::UnboundedReceiver<Recorded>)
where
    H: Fn(Value) -> BoxFuture<'static, Response> + Clone + Send + Sync + 'static,
{
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let routes = warp::post()
        .and(warp::path::full())
        .and(
            warp::path!("v1" / "chat" / "completions")
                .or(warp::path!("v1" / "completions"))
                .unify()
                .or(warp::path!("v1" / "embeddings"))
                .unify(),
        )
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::json::<Value>())
        .then(
            move |path: warp::path::FullPath, authorization: Option<String>, body: Value| {
                let answer = answer.clone();
                let seen_tx = seen_tx.clone();
                async move {
                    seen_tx
                        .send(Recorded {
                            path: path.as_str().to_owned(),
                            authorization,
                            body: body.clone(),
                        })
                        .unwrap();
                    answer(body).await
                }
            },
        )
        .boxed();
    (serve(routes).await, seen)
}

fn json_answer(status: StatusCode, body: &Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// A `text/event-stream` answer whose body is whatever the test sends into `pieces`.
fn sse_answer(pieces: mpsc::Receiver<Piece>) -> Response {
    let body = warp::reply::stream(ReceiverStream::new(pieces));
    warp::reply::with_header(body, "content-type", "text/event-stream").into_response()
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/v1")
}

fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

fn chunk(n: usize) -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, "delta": {"content": format!("tok{n}")}, "finish_reason": null}],
    })
    .to_string()
}

fn event(data: &str) -> Piece {
    Ok(Bytes::from(format!("data: {data}\n\n")))
}

fn raw(text: &'static str) -> Piece {
    Ok(Bytes::from_static(text.as_bytes()))
}

/// An upstream whose every streamed answer is driven by the test: each request hands
/// the test the sender of its response body.
async fn start_driven_upstream() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Recorded>,
    mpsc::UnboundedReceiver<mpsc::Sender<Piece>>,
) {
    let (bodies_tx, bodies) = mpsc::unbounded_channel();
    let (addr, seen) = start_upstream(move |_body| {
        let (tx, rx) = mpsc::channel(16);
        bodies_tx.send(tx).unwrap();
        async move { sse_answer(rx) }.boxed()
    })
    .await;
    (addr, seen, bodies)
}

fn expect_stream(reply: Reply) -> ChunkStream {
    match reply {
        Reply::Stream(s) => s,
        Reply::Complete(c) => panic!("expected a stream, got {c:?}"),
    }
}

fn expect_complete(reply: Reply) -> Completion {
    match reply {
        Reply::Complete(c) => c,
        Reply::Stream(_) => panic!("expected a complete answer, got a stream"),
    }
}

fn expect_upstream_error(result: Result<Reply, Error>) -> String {
    match result {
        Err(err @ Error::Upstream { .. }) => {
            assert_eq!(err.status(), 502);
            let Error::Upstream { message } = err else {
                unreachable!()
            };
            message
        }
        other => panic!("expected an upstream error, got {other:?}"),
    }
}

fn public_record(name: &str) -> LlmRecord {
    LlmRecord {
        id: LlmId::generate(),
        name: LlmName::parse(name).unwrap(),
        kind: LlmKind::Public,
        status: LlmStatus::Active,
        provider_type: "openai".into(),
        model: "whatever".into(),
        tier: None,
        owner: "gateway".into(),
        provider_session_id: None,
        last_heartbeat_at: None,
        inactive_since: None,
        created_at: Timestamp::EPOCH,
        updated_at: Timestamp::EPOCH,
        revision: 1,
        binding: None,
        pool: None,
        max_concurrent: None,
        upstream: None,
        agent: None,
        access: Default::default(),
    }
}

/// The upstream answers a completion naming the model it was asked for.
fn completion_answer(body: Value) -> BoxFuture<'static, Response> {
    async move {
        let model = body["model"].as_str().unwrap_or_default().to_owned();
        let completion = json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }],
        });
        json_answer(StatusCode::OK, &completion)
    }
    .boxed()
}

#[tokio::test]
async fn a_complete_answer_round_trips_with_the_model_replaced_and_the_key_sent() {
    let (addr, mut seen) = start_upstream(completion_answer).await;
    // A trailing slash on the base URL is fine.
    let upstream = OpenAiUpstream::new(&format!("{}/", url(addr)))
        .unwrap()
        .with_api_key("sk-test")
        .unwrap();
    let provider = OpenAiProvider::new(upstream, "Qwen/Qwen2.5-7B");
    let task = TaskFrame {
        task_id: TaskId::generate(),
        kind: TaskKind::Infer,
        endpoint: Default::default(),
        llm: LlmName::parse("qwen").unwrap(),
        stream: false,
        body: json!({"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}).into(),
    };

    let completion = expect_complete(within("the answer", provider.infer(task)).await.unwrap());

    assert_eq!(completion.status, 200);
    assert_eq!(completion.json()["model"], "Qwen/Qwen2.5-7B");
    assert_eq!(
        completion.json()["choices"][0]["message"]["content"],
        "hello"
    );
    let got = seen.recv().await.unwrap();
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(got.authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(got.body["model"], "Qwen/Qwen2.5-7B");
    assert_eq!(got.body["temperature"], 0.2, "the rest of the body is kept");
    assert_eq!(got.body["messages"][0]["content"], "hi");
    assert!(got.body.get("stream").is_none(), "{}", got.body);
}

#[tokio::test]
async fn without_a_key_no_authorization_is_sent() {
    let (addr, mut seen) = start_upstream(completion_answer).await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let reply = upstream.chat(chat_body("m", "hi"), false).await.unwrap();
    assert_eq!(expect_complete(reply).status, 200);
    let got = seen.recv().await.unwrap();
    assert_eq!(got.authorization, None);
    assert_eq!(got.body["model"], "m", "chat sends the body as it is");
}

#[tokio::test]
async fn a_stream_yields_each_chunk_as_it_arrives_and_drops_done_and_comments() {
    let (addr, mut seen, mut bodies) = start_driven_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();

    // The reply comes as soon as the headers do: the upstream has sent no chunk yet.
    let reply = within("the headers", upstream.chat(chat_body("m", "hi"), true))
        .await
        .unwrap();
    let mut chunks = expect_stream(reply);
    let body = bodies.recv().await.unwrap();
    assert_eq!(seen.recv().await.unwrap().body["stream"], true);

    // The first chunk reaches the client while the upstream still holds the rest back:
    // it sends the next piece only after the client has seen this one.
    body.send(event(&chunk(1))).await.unwrap();
    assert_eq!(
        within("chunk 1", chunks.next()).await.unwrap().unwrap(),
        chunk(1)
    );

    // Keep-alive comments are skipped; a chunk split across writes is reassembled.
    body.send(raw(": keep-alive\n\n")).await.unwrap();
    let second = chunk(2);
    let (head, tail) = second.split_at(second.len() / 2);
    body.send(Ok(Bytes::from(format!("data: {head}"))))
        .await
        .unwrap();
    body.send(Ok(Bytes::from(format!("{tail}\n\n"))))
        .await
        .unwrap();
    assert_eq!(
        within("chunk 2", chunks.next()).await.unwrap().unwrap(),
        second
    );

    for n in 3..=5 {
        body.send(event(&chunk(n))).await.unwrap();
        assert_eq!(
            within("a chunk", chunks.next()).await.unwrap().unwrap(),
            chunk(n)
        );
    }

    // `[DONE]` ends the stream without being forwarded, and without waiting for the
    // upstream to close its body (the sender is still alive here).
    body.send(event("[DONE]")).await.unwrap();
    assert!(within("the end", chunks.next()).await.is_none());
    assert!(chunks.next().await.is_none(), "an ended stream stays ended");
    drop(body);
}

#[tokio::test]
async fn chunks_sent_at_once_are_yielded_one_by_one() {
    let (addr, _seen, mut bodies) = start_driven_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let chunks = expect_stream(upstream.chat(chat_body("m", "hi"), true).await.unwrap());
    let body = bodies.recv().await.unwrap();
    let all: String = (1..=4)
        .map(|n| format!("data: {}\n\n", chunk(n)))
        .chain(["data: [DONE]\n\n".to_owned()])
        .collect();
    body.send(Ok(Bytes::from(all))).await.unwrap();
    drop(body);
    let got: Vec<String> = within("the chunks", chunks.map(Result::unwrap).collect()).await;
    assert_eq!(got, (1..=4).map(chunk).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stream_that_ends_without_done_just_ends() {
    let (addr, _seen, mut bodies) = start_driven_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let mut chunks = expect_stream(upstream.chat(chat_body("m", "hi"), true).await.unwrap());
    let body = bodies.recv().await.unwrap();
    body.send(event(&chunk(1))).await.unwrap();
    drop(body); // a complete, well-terminated body
    assert_eq!(
        within("chunk 1", chunks.next()).await.unwrap().unwrap(),
        chunk(1)
    );
    assert!(within("the end", chunks.next()).await.is_none());
}

#[tokio::test]
async fn a_stream_broken_midway_yields_one_error_then_ends() {
    let (addr, _seen, mut bodies) = start_driven_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let mut chunks = expect_stream(upstream.chat(chat_body("m", "hi"), true).await.unwrap());
    let body = bodies.recv().await.unwrap();
    body.send(event(&chunk(1))).await.unwrap();
    assert_eq!(
        within("chunk 1", chunks.next()).await.unwrap().unwrap(),
        chunk(1)
    );

    // Half an event, then the upstream dies: the connection is cut mid-body.
    body.send(raw("data: {\"id\":")).await.unwrap();
    body.send(Err(io::Error::other("model crashed")))
        .await
        .unwrap();

    let err = within("the error", chunks.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), 502);
    assert!(
        matches!(&err, Error::Upstream { message } if message.contains("broke off")),
        "{err}"
    );
    assert!(within("the end", chunks.next()).await.is_none());
}

#[tokio::test]
async fn an_error_reported_inside_a_stream_ends_it_with_that_error() {
    let (addr, _seen, mut bodies) = start_driven_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let mut chunks = expect_stream(upstream.chat(chat_body("m", "hi"), true).await.unwrap());
    let body = bodies.recv().await.unwrap();
    body.send(event(&chunk(1))).await.unwrap();
    body.send(event(
        r#"{"error":{"object":"error","message":"CUDA out of memory","code":500}}"#,
    ))
    .await
    .unwrap();
    body.send(event(&chunk(2))).await.unwrap();

    assert_eq!(
        within("chunk 1", chunks.next()).await.unwrap().unwrap(),
        chunk(1)
    );
    let err = within("the error", chunks.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Upstream { message } if message == "CUDA out of memory"),
        "{err}"
    );
    assert!(within("the end", chunks.next()).await.is_none());
}

/// The upstream answers the error named by the user message: an OpenAI error body, a
/// llama.cpp 503 with `Retry-After`, vLLM's and Ollama's shapes, plain text, nothing,
/// a megabyte of text, a 429 with a `Retry-After` date, a redirect.
fn error_answers(body: Value) -> BoxFuture<'static, Response> {
    async move {
        match body["messages"][0]["content"].as_str().unwrap() {
            "openai" => json_answer(StatusCode::BAD_REQUEST, &openai_error()),
            "loading" => warp::reply::with_header(
                json_answer(StatusCode::SERVICE_UNAVAILABLE, &loading()),
                "retry-after",
                "7",
            )
            .into_response(),
            "ollama" => json_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "llama runner process has terminated"}),
            ),
            "vllm" => json_answer(
                StatusCode::BAD_REQUEST,
                &json!({"object": "error", "message": "max_tokens is too large", "code": 400}),
            ),
            "text" => warp::reply::with_status(
                "Internal Server Error\n",
                StatusCode::INTERNAL_SERVER_ERROR,
            )
            .into_response(),
            "huge" => warp::reply::with_status("x".repeat(1 << 20), StatusCode::BAD_GATEWAY)
                .into_response(),
            "empty" => StatusCode::UNAUTHORIZED.into_response(),
            "far" => warp::reply::with_header(
                StatusCode::TOO_MANY_REQUESTS.into_response(),
                "retry-after",
                "Fri, 31 Dec 9999 23:59:59 GMT",
            )
            .into_response(),
            "past" => warp::reply::with_header(
                StatusCode::TOO_MANY_REQUESTS.into_response(),
                "retry-after",
                "Sun, 06 Nov 1994 08:49:37 GMT",
            )
            .into_response(),
            "redirect" => warp::reply::with_header(
                StatusCode::MOVED_PERMANENTLY.into_response(),
                "location",
                "http://10.1.2.3:8000/v1/chat/completions",
            )
            .into_response(),
            other => panic!("unknown scenario {other}"),
        }
    }
    .boxed()
}

fn openai_error() -> Value {
    json!({"error": {
        "message": "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }})
}

fn loading() -> Value {
    json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
}

/// An upstream's 4xx and 5xx answers are answers, not failures: the status, the body
/// as sent when it is a JSON object, and the `Retry-After`, to a streaming request too.
#[tokio::test]
async fn error_answers_pass_through_with_their_status_body_and_retry_after() {
    let (addr, _seen) = start_upstream(error_answers).await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let cases = [
        ("openai", 400, openai_error(), None),
        ("loading", 503, loading(), Some(Duration::from_secs(7))),
        (
            "ollama",
            500,
            json!({"error": "llama runner process has terminated"}),
            None,
        ),
        (
            "vllm",
            400,
            json!({"object": "error", "message": "max_tokens is too large", "code": 400}),
            None,
        ),
    ];
    for stream in [false, true] {
        for (scenario, status, body, retry_after) in cases.clone() {
            let reply = within(scenario, upstream.chat(chat_body("m", scenario), stream))
                .await
                .unwrap();
            assert_eq!(
                expect_complete(reply),
                Completion {
                    status,
                    body: body.into(),
                    retry_after
                },
                "{scenario}, stream: {stream}"
            );
        }
    }
}

/// A body that is not a JSON object is wrapped into OpenAI's error shape, its text
/// kept short, with the upstream's status; an empty one says the status.
#[tokio::test]
async fn other_error_bodies_become_openai_shaped_with_the_upstreams_status() {
    let (addr, _seen) = start_upstream(error_answers).await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    for stream in [false, true] {
        let text = expect_complete(upstream.chat(chat_body("m", "text"), stream).await.unwrap());
        assert_eq!(text.status, 500);
        assert_eq!(
            text.body,
            json!({"error": {"message": "Internal Server Error", "type": "server_error", "code": null}}).into()
        );
        assert_eq!(text.retry_after, None);

        let empty = expect_complete(
            upstream
                .chat(chat_body("m", "empty"), stream)
                .await
                .unwrap(),
        );
        assert_eq!(empty.status, 401);
        assert_eq!(
            empty.body,
            json!({"error": {"message": "401 Unauthorized", "type": "authentication_error", "code": null}}).into()
        );

        let huge = expect_complete(upstream.chat(chat_body("m", "huge"), stream).await.unwrap());
        assert_eq!(huge.status, 502);
        assert_eq!(huge.json()["error"]["type"], "server_error");
        let huge = huge.json();
        let message = huge["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("xxx"), "{message}");
        assert!(
            message.chars().count() < 2000,
            "truncated to a sane length, got {} chars",
            message.chars().count()
        );
    }
}

/// A `Retry-After` given as a date is the time left until then: none for a date that
/// has passed, at most a day for one far ahead.
#[tokio::test]
async fn a_retry_after_date_becomes_seconds() {
    let (addr, _seen) = start_upstream(error_answers).await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    for (scenario, left) in [("past", 0), ("far", 86_400)] {
        let answer = expect_complete(
            upstream
                .chat(chat_body("m", scenario), false)
                .await
                .unwrap(),
        );
        assert_eq!(answer.status, 429);
        assert_eq!(
            answer.retry_after,
            Some(Duration::from_secs(left)),
            "{scenario}"
        );
    }
}

/// A redirect is not followed and not passed on (it would point the client at the
/// upstream): the request failed, 502, naming no address.
#[tokio::test]
async fn a_redirect_is_502_and_not_passed_on() {
    let (addr, _seen) = start_upstream(error_answers).await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    for stream in [false, true] {
        let message =
            expect_upstream_error(upstream.chat(chat_body("m", "redirect"), stream).await);
        assert_eq!(
            message,
            "the upstream answered 301 Moved Permanently instead of a completion"
        );
    }
}

#[tokio::test]
async fn a_json_answer_to_a_streaming_request_is_502() {
    // A server that ignores `stream: true`, or reports an error with a 200.
    let (addr, _seen) = start_upstream(|body: Value| {
        async move {
            match body["messages"][0]["content"].as_str().unwrap() {
                "error" => json_answer(StatusCode::OK, &json!({"error": {"message": "busy"}})),
                _ => completion_answer(body).await,
            }
        }
        .boxed()
    })
    .await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let message = expect_upstream_error(upstream.chat(chat_body("m", "error"), true).await);
    assert_eq!(message, "200 OK: busy");
    let message = expect_upstream_error(upstream.chat(chat_body("m", "ignore"), true).await);
    assert_eq!(
        message,
        "the upstream answered a streaming request without an event stream"
    );
}

/// Nothing listens: 502, saying why in words that name neither the address nor the
/// URL (a client of the gateway must not learn where a publisher's model runs), and
/// never the key.
#[tokio::test]
async fn an_unreachable_upstream_is_502_naming_no_address() {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener); // nothing listens there now
    let upstream = OpenAiUpstream::new(&url(addr))
        .unwrap()
        .with_api_key("sk-secret")
        .unwrap();
    for stream in [false, true] {
        let message = expect_upstream_error(
            within("the error", upstream.chat(chat_body("m", "hi"), stream)).await,
        );
        assert_eq!(message, "the upstream did not answer: connection refused");
        assert!(!message.contains(&addr.port().to_string()), "{message}");
    }

    // Through the backend too.
    let backend = OpenAiBackend::new().with_llm(LlmName::parse("gone").unwrap(), upstream, "m");
    let request = InferRequest::for_llm("gone", chat_body("gone", "hi")).unwrap();
    let err = backend
        .infer(&public_record("gone"), request)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 502);
    let body = err.to_body().error;
    assert_eq!(body.code.as_deref(), Some("upstream_error"));
    assert_eq!(
        body.message, "upstream error: the upstream did not answer: connection refused",
        "said once"
    );
    for secret in ["sk-secret", &addr.port().to_string(), "127.0.0.1"] {
        assert!(
            !body.message.contains(secret),
            "{secret} in {}",
            body.message
        );
    }
}

/// An upstream that accepts the connection and closes it without answering: 502,
/// naming no address.
#[tokio::test]
async fn an_upstream_closing_without_an_answer_is_502_naming_no_address() {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            drop(conn);
        }
    });
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let message = expect_upstream_error(
        within("the error", upstream.chat(chat_body("m", "hi"), false)).await,
    );
    assert!(
        message.starts_with("the upstream did not answer: "),
        "{message}"
    );
    assert!(!message.contains(&addr.port().to_string()), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
}

/// The public backend passes an upstream's answers through the same way.
#[tokio::test]
async fn the_backend_passes_error_answers_through() {
    let (addr, _seen) = start_upstream(error_answers).await;
    let backend = OpenAiBackend::new().with_llm(
        LlmName::parse("pub").unwrap(),
        OpenAiUpstream::new(&url(addr)).unwrap(),
        "up-model",
    );
    for stream in [false, true] {
        let request = InferRequest::for_llm(
            "pub",
            json!({"model": "pub", "stream": stream, "messages": [{"role": "user", "content": "loading"}]}),
        )
        .unwrap();
        let reply = backend.infer(&public_record("pub"), request).await.unwrap();
        assert_eq!(
            expect_complete(reply),
            Completion {
                status: 503,
                body: loading().into(),
                retry_after: Some(Duration::from_secs(7)),
            },
            "stream: {stream}"
        );
    }
}

#[tokio::test]
async fn dropping_the_stream_aborts_the_upstream_request() {
    let (addr, _seen, mut bodies) = start_driven_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let mut chunks = expect_stream(upstream.chat(chat_body("m", "hi"), true).await.unwrap());
    let body = bodies.recv().await.unwrap();
    body.send(event(&chunk(1))).await.unwrap();
    assert_eq!(
        within("chunk 1", chunks.next()).await.unwrap().unwrap(),
        chunk(1)
    );

    drop(chunks);

    // The upstream sees its response body dropped: the connection was closed.
    within("the upstream to see the close", body.closed()).await;
}

/// An upstream that reads each request and never answers it. For each connection it
/// reports when a whole request has arrived, then when the client closed the
/// connection. Raw TCP, so that the test watches the connection itself rather than how
/// an HTTP server reacts to its closing.
async fn start_silent_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<&'static str>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events_tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let events_tx = events_tx.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let mut reported = false;
                loop {
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        events_tx.send("closed").unwrap();
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if !reported && has_whole_request(&seen) {
                        reported = true;
                        events_tx.send("request").unwrap();
                    }
                }
            });
        }
    });
    (addr, events)
}

/// Whether `data` holds a request's head and all of its `content-length` body.
fn has_whole_request(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Some(head_end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length: usize = text[..head_end]
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    data.len() >= head_end + 4 + length
}

#[tokio::test]
async fn dropping_the_future_before_the_answer_aborts_the_upstream_request() {
    let (addr, mut events) = start_silent_upstream().await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();

    for stream in [false, true] {
        // Boxed, so that dropping it really drops the future (`pin!` would keep it).
        let mut call = Box::pin(upstream.chat(chat_body("m", "hi"), stream));
        // Drive the call until the upstream has the whole request and is working on it.
        tokio::select! {
            r = &mut call => panic!("the upstream never answers, got {r:?}"),
            got = within("the request", events.recv()) => assert_eq!(got, Some("request")),
        }

        drop(call);

        assert_eq!(
            within("the upstream to see the close", events.recv()).await,
            Some("closed"),
            "stream: {stream}"
        );
    }
}

#[tokio::test]
async fn the_backend_routes_public_llms_by_name_and_refuses_unknown_ones() {
    let (addr, mut seen) = start_upstream(completion_answer).await;
    let upstream = OpenAiUpstream::new(&url(addr))
        .unwrap()
        .with_api_key("sk-public")
        .unwrap();
    let backend: Arc<dyn PublicBackend> = Arc::new(
        OpenAiBackend::new()
            .with_llm(
                LlmName::parse("fast").unwrap(),
                upstream.clone(),
                "small-model",
            )
            .with_llm(LlmName::parse("smart").unwrap(), upstream, "large-model"),
    );

    for (name, model) in [("fast", "small-model"), ("smart", "large-model")] {
        let request = InferRequest::from_chat_body(chat_body(name, "hi")).unwrap();
        let reply = within(name, backend.infer(&public_record(name), request))
            .await
            .unwrap();
        assert_eq!(expect_complete(reply).json()["model"], model);
        let got = seen.recv().await.unwrap();
        assert_eq!(got.body["model"], model);
        assert_eq!(got.authorization.as_deref(), Some("Bearer sk-public"));
    }

    let request = InferRequest::from_chat_body(chat_body("nope", "hi")).unwrap();
    let err = backend
        .infer(&public_record("nope"), request)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 503);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(seen.try_recv().is_err(), "nothing was sent upstream");
}

#[tokio::test]
async fn the_backend_streams_when_the_request_asks_for_it() {
    let (addr, mut seen, mut bodies) = start_driven_upstream().await;
    let backend = OpenAiBackend::new().with_llm(
        LlmName::parse("pub").unwrap(),
        OpenAiUpstream::new(&url(addr)).unwrap(),
        "up-model",
    );
    let mut body = chat_body("pub", "hi");
    body["stream"] = json!(true);
    let request = InferRequest::from_chat_body(body).unwrap();
    let mut chunks = expect_stream(backend.infer(&public_record("pub"), request).await.unwrap());
    let got = seen.recv().await.unwrap();
    assert_eq!(
        (got.body["model"].as_str(), got.body["stream"].as_bool()),
        (Some("up-model"), Some(true))
    );
    let tx = bodies.recv().await.unwrap();
    tx.send(event(&chunk(1))).await.unwrap();
    tx.send(event("[DONE]")).await.unwrap();
    assert_eq!(
        within("chunk 1", chunks.next()).await.unwrap().unwrap(),
        chunk(1)
    );
    assert!(within("the end", chunks.next()).await.is_none());
}

#[tokio::test]
async fn the_provider_answers_a_streaming_task_frame() {
    let (addr, mut seen, mut bodies) = start_driven_upstream().await;
    let provider: Arc<dyn Provider> = Arc::new(OpenAiProvider::new(
        OpenAiUpstream::new(&url(addr)).unwrap(),
        "llama3.2:3b",
    ));
    // The task as it comes off the wire.
    let frame = json!({
        "taskId": TaskId::generate().as_str(),
        "kind": "infer",
        "llm": "local-llama",
        "stream": true,
        "body": {"model": "local-llama", "messages": [{"role": "user", "content": "hi"}], "stream": true},
    });
    let task: TaskFrame = serde_json::from_value(frame).unwrap();

    let mut chunks = expect_stream(within("the reply", provider.infer(task)).await.unwrap());
    let got = seen.recv().await.unwrap();
    assert_eq!(got.body["model"], "llama3.2:3b");
    assert_eq!(got.body["stream"], true);

    let tx = bodies.recv().await.unwrap();
    for n in 1..=3 {
        tx.send(event(&chunk(n))).await.unwrap();
        assert_eq!(
            within("a chunk", chunks.next()).await.unwrap().unwrap(),
            chunk(n)
        );
    }
    tx.send(event("[DONE]")).await.unwrap();
    assert!(within("the end", chunks.next()).await.is_none());
}

#[tokio::test]
async fn a_task_frame_without_stream_gets_a_complete_answer_even_if_the_body_says_stream() {
    let (addr, mut seen) = start_upstream(completion_answer).await;
    let provider = OpenAiProvider::new(OpenAiUpstream::new(&url(addr)).unwrap(), "up");
    let task = TaskFrame {
        task_id: TaskId::generate(),
        kind: TaskKind::Infer,
        endpoint: Default::default(),
        llm: LlmName::parse("local").unwrap(),
        stream: false,
        body: json!({"model": "local", "messages": [], "stream": true}).into(),
    };
    let reply = provider.infer(task).await.unwrap();
    assert_eq!(expect_complete(reply).json()["model"], "up");
    assert_eq!(seen.recv().await.unwrap().body["stream"], false);
}

#[tokio::test]
async fn a_body_that_is_not_an_object_is_refused_before_sending() {
    let (addr, mut seen) = start_upstream(completion_answer).await;
    let upstream = OpenAiUpstream::new(&url(addr)).unwrap();
    let provider = OpenAiProvider::new(upstream.clone(), "up");
    let err = upstream.chat(json!(["x"]), false).await.unwrap_err();
    assert_eq!(err.status(), 400);
    let task = TaskFrame {
        task_id: TaskId::generate(),
        kind: TaskKind::Infer,
        endpoint: Default::default(),
        llm: LlmName::parse("local").unwrap(),
        stream: true,
        body: json!("not an object").into(),
    };
    assert_eq!(provider.infer(task).await.unwrap_err().status(), 400);
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn completions_and_embeddings_go_to_the_upstreams_own_paths() {
    let (addr, mut seen) = start_upstream(completion_answer).await;
    let provider = OpenAiProvider::new(OpenAiUpstream::new(&url(addr)).unwrap(), "up-model");
    for (endpoint, path, body) in [
        (
            virtual_llm_core::protocol::Endpoint::Embeddings,
            "/v1/embeddings",
            json!({"model": "emb", "input": ["a", "b"], "encoding_format": "float"}),
        ),
        (
            virtual_llm_core::protocol::Endpoint::Completions,
            "/v1/completions",
            json!({"model": "emb", "prompt": "say", "max_tokens": 3}),
        ),
    ] {
        let task = TaskFrame {
            task_id: TaskId::generate(),
            kind: TaskKind::Infer,
            endpoint,
            llm: LlmName::parse("emb").unwrap(),
            stream: false,
            body: body.clone().into(),
        };
        let reply = within("the answer", provider.infer(task)).await.unwrap();
        assert_eq!(expect_complete(reply).status, 200);
        let got = seen.recv().await.unwrap();
        assert_eq!(got.path, path);
        assert_eq!(
            got.body["model"], "up-model",
            "the upstream's model name is sent"
        );
        for key in ["input", "prompt", "encoding_format", "max_tokens"] {
            assert_eq!(got.body.get(key), body.get(key), "{key} is kept");
        }
    }
    // The public backend routes a request by its endpoint too.
    let backend = OpenAiBackend::new().with_llm(
        LlmName::parse("pub").unwrap(),
        OpenAiUpstream::new(&url(addr)).unwrap(),
        "public-model",
    );
    let request = InferRequest::from_body(
        virtual_llm_core::protocol::Endpoint::Embeddings,
        json!({"model": "pub", "input": "x"}),
    )
    .unwrap();
    let row = public_record("pub");
    let reply = within("the answer", backend.infer(&row, request))
        .await
        .unwrap();
    assert_eq!(expect_complete(reply).status, 200);
    assert_eq!(seen.recv().await.unwrap().path, "/v1/embeddings");
}
