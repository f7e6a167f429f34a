//! An upstream's own answers pass through the whole relay (SPEC §12), on both
//! transports: a publisher's real `OpenAiProvider` in front of a small mock
//! OpenAI-compatible upstream (warp on 127.0.0.1:0). Its 400 reaches the client as
//! that 400 with its body, its 503 with its body and `Retry-After`, to a streaming
//! request too; only an upstream nobody can reach is 502 `upstream_error`, said once and
//! naming no address. The mock lists its models, so the publisher's probe finds it
//! ready (SPEC §12).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
use virtual_llm::openai::{OpenAiProvider, OpenAiUpstream};
use virtual_llm::protocol::{TaskFrame, UpstreamState};
use virtual_llm::testkit::{SseTransport, TestGateway, Transport, WsTransport};
use virtual_llm::{Config, Error, Provider, Reply};
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Reply as _;

/// llama.cpp's answer to a prompt over its context.
fn too_long() -> Value {
    json!({"error": {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 9000,
        "n_ctx": 4096,
    }})
}

/// llama.cpp's answer while its model loads.
fn loading() -> Value {
    json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
}

/// A mock upstream on `POST /v1/chat/completions`: the user message `long` gets the
/// 400, `loading` the 503 with `Retry-After: 7`. `GET /v1/models` lists its model.
async fn start_upstream() -> SocketAddr {
    let models = warp::get().and(warp::path!("v1" / "models")).map(|| {
        warp::reply::json(&json!({"object": "list", "data": [{"id": "up-model"}]})).into_response()
    });
    let chat = warp::post()
        .and(warp::path!("v1" / "chat" / "completions"))
        .and(warp::body::json::<Value>())
        .map(
            |body: Value| match body["messages"][0]["content"].as_str().unwrap() {
                "long" => warp::reply::with_status(
                    warp::reply::json(&too_long()),
                    StatusCode::BAD_REQUEST,
                )
                .into_response(),
                "loading" => warp::reply::with_header(
                    warp::reply::with_status(
                        warp::reply::json(&loading()),
                        StatusCode::SERVICE_UNAVAILABLE,
                    ),
                    "retry-after",
                    "7",
                )
                .into_response(),
                other => panic!("unknown scenario {other}"),
            },
        );
    let routes = models.or(chat).unify();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    addr
}

fn provider(addr: SocketAddr) -> Arc<OpenAiProvider> {
    let upstream = OpenAiUpstream::new(&format!("http://{addr}/v1")).unwrap();
    Arc::new(OpenAiProvider::new(upstream, "up-model"))
}

/// An upstream that answered the publisher's last probe and went away since: its row
/// is in service, and the task finds nobody there.
#[derive(Debug)]
struct GoneSinceItsProbe(Arc<OpenAiProvider>);

#[async_trait]
impl Provider for GoneSinceItsProbe {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.0.infer(task).await
    }

    async fn probe(&self) -> bool {
        true
    }
}

/// The client's status, `Retry-After` and body for `text` sent to `model`.
async fn ask(
    gw: &TestGateway,
    model: &str,
    text: &str,
    stream: bool,
) -> (u16, Option<String>, Value) {
    let response = gw
        .post_chat(
            "client",
            json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}),
        )
        .await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, response.json().await.unwrap())
}

async fn upstream_answers_pass_through(t: &dyn Transport) {
    let upstream = start_upstream().await;
    let gw = TestGateway::start_for(t, Config::default()).await;
    let p = gw.publish(t, "alice", &["llama"], provider(upstream)).await;
    let row = gw
        .gateway
        .store()
        .get(&"llama".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.upstream,
        Some(UpstreamState::Ready),
        "the probe found the mock"
    );
    for stream in [false, true] {
        assert_eq!(
            ask(&gw, "llama", "long", stream).await,
            (400, None, too_long()),
            "{}, stream: {stream}",
            t.name()
        );
        assert_eq!(
            ask(&gw, "llama", "loading", stream).await,
            (503, Some("7".to_owned()), loading()),
            "{}, stream: {stream}",
            t.name()
        );
    }
    p.stop().await;
}

async fn an_unreachable_upstream_is_502_naming_no_address(t: &dyn Transport) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let gone = listener.local_addr().unwrap();
    drop(listener); // nothing listens there now
    let gw = TestGateway::start_for(t, Config::default()).await;
    let p = gw
        .publish(
            t,
            "alice",
            &["gone"],
            Arc::new(GoneSinceItsProbe(provider(gone))),
        )
        .await;
    for stream in [false, true] {
        let (status, retry_after, body) = ask(&gw, "gone", "hi", stream).await;
        assert_eq!((status, retry_after), (502, None), "{body}");
        assert_eq!(body["error"]["code"], "upstream_error");
        assert_eq!(
            body["error"]["message"],
            "upstream error: the upstream did not answer: connection refused",
            "said once, {}, stream: {stream}",
            t.name()
        );
        assert!(
            !body.to_string().contains(&gone.port().to_string()),
            "{body}"
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_pass_through_over_sse() {
    upstream_answers_pass_through(&SseTransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_pass_through_over_ws() {
    upstream_answers_pass_through(&WsTransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_naming_no_address_over_sse() {
    an_unreachable_upstream_is_502_naming_no_address(&SseTransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_naming_no_address_over_ws() {
    an_unreachable_upstream_is_502_naming_no_address(&WsTransport).await;
}
