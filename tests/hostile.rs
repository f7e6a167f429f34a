//! Hostile input over every route and frame (SPEC §5, "Security and bad input"):
//! malformed JSON, wrong types, huge strings (agents' fields and counts included), deep
//! nesting, invalid UTF-8, unreadable headers, unknown fields, oversized bodies and
//! frames, an NDJSON result stream with a bad line in the middle, slowloris clients,
//! and floods of register and heartbeat.
//!
//! Each case gets a clear, bounded, OpenAI-shaped error (or, for unknown fields, is
//! consistently ignored) and changes nothing: every stored field, the bound channels
//! and the tasks in flight are as before, and a task in flight still completes with
//! its publisher's answer. Timeouts are tested with a small configured value or
//! under paused time, never by sleeping for them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use virtual_llm::error::bounded;
use virtual_llm::openai::chunk_body;
use virtual_llm::protocol::TaskFrame;
use virtual_llm::testkit::socket::{auth, next, send, socket};
use virtual_llm::testkit::{Gated, TestGateway, Transport, eventually, token};
use virtual_llm::{
    Config, EchoProvider, Gateway, LlmRecord, MemoryStore, Principal, Role, SessionId, StaticTokens,
};

// The transports under test, shared with the conformance suite.
use virtual_llm::testkit::{SseTransport as Sse, WsTransport as Ws};

const SESSION: &str = virtual_llm::protocol::SESSION_HEADER;
/// The longest error message a refusal may carry: errors never echo unbounded input.
const MAX_MESSAGE: usize = 1024;
const MB: usize = 1 << 20;

// ---------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn base(gw: &TestGateway) -> String {
    format!("{}{}", gw.url, gw.gateway.config().base_path)
}

/// A refusal's status and JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// Posts raw bytes to `url` as `who`, with the session header and a content type.
async fn post(
    url: &str,
    who: &str,
    session: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Answer {
    let mut request = http()
        .post(url)
        .header("authorization", auth(who))
        .header("content-type", content_type)
        .body(body);
    if let Some(s) = session {
        request = request.header(SESSION, s);
    }
    answer(request.send().await.unwrap()).await
}

/// A refusal with `status`, an OpenAI-shaped body of type `invalid_request_error`, and
/// a bounded message.
fn assert_refused(what: &str, a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{what}: {}", short(&a.body));
    let error = &a.body["error"];
    let message = error["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not OpenAI-shaped: {}", short(&a.body)));
    assert!(!message.is_empty(), "{what}: an empty message");
    assert!(
        message.len() <= MAX_MESSAGE,
        "{what}: a {} byte message echoes the input: {}",
        message.len(),
        bounded(message, 200)
    );
    assert_eq!(error["type"], "invalid_request_error", "{what}: {}", a.body);
    assert!(error["code"].is_string(), "{what}: {}", a.body);
}

fn short(v: &Value) -> String {
    bounded(v.to_string(), 300)
}

/// Everything a refusal must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: Vec<LlmRecord>,
    generations: Vec<Option<virtual_llm::ChannelBinding>>,
    in_flight: usize,
}

async fn snapshot(gw: &TestGateway, sessions: &[&SessionId]) -> Snapshot {
    Snapshot {
        rows: gw.gateway.store().list().await.unwrap(),
        generations: sessions.iter().map(|s| gw.gateway.channel_of(s)).collect(),
        in_flight: gw.gateway.in_flight(),
    }
}

/// Starts a streaming chat on `llm` in the background; its text once it finishes.
fn start_chat(gw: &TestGateway, llm: &str) -> tokio::task::JoinHandle<String> {
    let gw = gw.clone_handle();
    let llm = llm.to_owned();
    tokio::spawn(async move { gw.chat_stream("client", &llm, "x").await.text().await })
}

/// A gateway with a gated streaming publisher over SSE, one task in flight on it.
struct Scene {
    gw: TestGateway,
    gated: Arc<Gated>,
    publisher: virtual_llm::Publisher,
    session: SessionId,
    task: virtual_llm::TaskId,
    chat: tokio::task::JoinHandle<String>,
}

impl Scene {
    async fn start(config: Config) -> Self {
        let gw = TestGateway::start(config).await;
        let gated = Arc::new(Gated::default());
        let publisher = gw.publish(&Sse, "alice", &["alpha"], gated.clone()).await;
        let session = publisher.connected().await;
        let chat = start_chat(&gw, "alpha");
        let task = gated.task_id().await;
        Scene {
            gw,
            gated,
            publisher,
            session,
            task,
            chat,
        }
    }

    async fn snapshot(&self) -> Snapshot {
        snapshot(&self.gw, &[&self.session]).await
    }

    /// Every JSON route, as alice (a publisher) or client would call it: (what, url,
    /// who, session header, content type).
    fn routes(
        &self,
    ) -> Vec<(
        &'static str,
        String,
        &'static str,
        Option<String>,
        &'static str,
    )> {
        let b = base(&self.gw);
        let s = Some(self.session.to_string());
        let json = "application/json";
        vec![
            (
                "register",
                format!("{b}/_provider-register"),
                "alice",
                None,
                json,
            ),
            (
                "heartbeat",
                format!("{b}/_provider-heartbeat"),
                "alice",
                None,
                json,
            ),
            (
                "result",
                format!("{b}/_provider-task/{}/result", self.task),
                "alice",
                s.clone(),
                json,
            ),
            (
                "result (ndjson)",
                format!("{b}/_provider-task/{}/result", self.task),
                "alice",
                s,
                "application/x-ndjson",
            ),
            ("infer", format!("{b}/alpha/infer"), "client", None, json),
            (
                "chat",
                format!("{}/v1/chat/completions", self.gw.url),
                "client",
                None,
                json,
            ),
        ]
    }

    /// Nothing changed, and the task in flight completes with its own answer.
    async fn finish(self, before: Snapshot) {
        assert_eq!(self.snapshot().await, before, "nothing changed");
        self.gated.release();
        assert_eq!(
            self.chat.await.unwrap(),
            "firstsecond",
            "the task completes"
        );
        self.publisher.stop().await;
    }
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

// ---------------------------------------------------------------------------------
// Malformed JSON, wrong types, invalid UTF-8, huge strings, deep nesting over HTTP.
// ---------------------------------------------------------------------------------

/// Malformed JSON, bodies of the wrong shape, wrong field types and invalid UTF-8
/// are a 400 on every JSON route, even posted by the task's own publisher for its
/// live task; nothing changes and the task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_wrong_types_and_invalid_utf8_are_400_everywhere() {
    let scene = Scene::start(Config::default()).await;
    let before = scene.snapshot().await;
    let everywhere: Vec<&[u8]> = vec![
        b"{not json",
        b"",
        b"null",
        b"[]",
        b"\"a string\"",
        b"42",
        b"{\"a\":1}}",
        b"{\"llms\":[{\"name\":\"\xff\xfe\",\"type\":\"t\",\"model\":\"m\"}]}",
        b"{\"model\":\"alpha\xc3\x28\",\"messages\":[]}",
        b"\xef\xbb\xbf{}",
        b"\xff\xff\xff\xff",
        b"{\"providerSessionId\":\"\xed\xa0\x80\"}",
    ];
    let session = scene.session.to_string();
    let wrong_types: Vec<(&str, Value)> = vec![
        ("register", json!({"llms": "nope"})),
        (
            "register",
            json!({"llms": [{"name": 5, "type": "t", "model": "m"}]}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": ["t"], "model": "m"}]}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": null}]}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": "m"}], "protocolVersion": "1"}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": "m"}], "protocolVersion": -1}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": "m"}], "providerSessionId": 7}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": "m"}], "providerSessionId": "../../etc"}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "", "model": "m"}]}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": "m\u{0}"}]}),
        ),
        (
            "register",
            json!({"llms": [{"name": "a", "type": "t", "model": "m", "tier": 3}]}),
        ),
        ("register", json!({"llms": []})),
        ("heartbeat", json!({})),
        ("heartbeat", json!({"providerSessionId": 5})),
        ("heartbeat", json!({"providerSessionId": [session]})),
        ("heartbeat", json!({"providerSessionId": "ses x"})),
        ("result", json!({})),
        ("result", json!({"status": "200", "body": {}})),
        ("result", json!({"status": 70000, "body": {}})),
        ("result", json!({"status": 99, "body": {}})),
        ("result", json!({"status": 600, "body": {}})),
        // Red-team F10: a 1xx is no final answer (a 101 switched the client's
        // connection), and a line break in chunk data forged SSE fields.
        ("result", json!({"status": 101, "body": {}})),
        ("result", json!({"status": 103, "body": {}})),
        (
            "result",
            json!({"chunk": {"data": "{\"a\":1}\rdata: [DONE]\r\revent: error"}}),
        ),
        (
            "result",
            json!({"chunk": {"data": "{\"a\":1}\n\nretry: 999999"}}),
        ),
        ("result", json!({"chunk": "x"})),
        ("result", json!({"chunk": {"data": 5}})),
        ("result", json!({"chunk": {"data": "x", "done": "yes"}})),
        ("result", json!({"error": "e", "status": 200})),
        ("result", json!({"error": "e", "chunk": {"data": "x"}})),
        ("result", json!({"status": 200, "chunk": {"data": "x"}})),
        ("infer", json!({"messages": "x"})),
        ("infer", json!({"messages": [], "stream": "yes"})),
        ("infer", json!({"stream": true})),
        ("chat", json!({"model": 5, "messages": []})),
        ("chat", json!({"model": "alpha", "messages": {}})),
        (
            "chat",
            json!({"model": "alpha", "messages": [], "stream": 1}),
        ),
        (
            "chat",
            json!({"model": "_provider-register", "messages": []}),
        ),
        ("chat", json!({"model": "has space", "messages": []})),
        ("chat", json!({"messages": []})),
    ];
    for (what, url, who, session, content_type) in scene.routes() {
        for body in &everywhere {
            if what == "result (ndjson)" && body.is_empty() {
                // No lines, no results: a 204 that delivers nothing.
                continue;
            }
            let a = post(&url, who, session.as_deref(), content_type, body.to_vec()).await;
            assert_refused(
                &format!("{what} {:?}", String::from_utf8_lossy(body)),
                &a,
                400,
            );
        }
        let base_route = what.trim_end_matches(" (ndjson)");
        for (route, body) in wrong_types.iter().filter(|(r, _)| *r == base_route) {
            let a = post(
                &url,
                who,
                session.as_deref(),
                content_type,
                body.to_string().into(),
            )
            .await;
            assert_refused(&format!("{what} ({route}) {body}"), &a, 400);
        }
    }
    scene.finish(before).await;
}

/// A 1 MB name, model, type, tier, session id or model field, a 1 MB string where a
/// number belongs, 60 KB path segments and a 100 KB header are a 400 whose message
/// echoes at most a bounded part of them; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_strings_are_400_with_a_bounded_message() {
    let scene = Scene::start(Config::default()).await;
    let before = scene.snapshot().await;
    let huge = "x".repeat(MB);
    let b = base(&scene.gw);
    let register = format!("{b}/_provider-register");
    let spec = |field: &str| {
        let mut s = json!({"name": "big", "type": "t", "model": "m"});
        s[field] = json!(huge);
        json!({ "llms": [s] })
    };
    let agents = |agents: Value| json!({"llms": [{"name": "big", "type": "t", "model": "m"}], "agents": agents});
    let cases: Vec<(&str, String, &str, Value)> = vec![
        ("a 1 MB name", register.clone(), "alice", spec("name")),
        ("a 1 MB model", register.clone(), "alice", spec("model")),
        ("a 1 MB type", register.clone(), "alice", spec("type")),
        ("a 1 MB tier", register.clone(), "alice", spec("tier")),
        (
            "a 1 MB session id",
            register.clone(),
            "alice",
            json!({"providerSessionId": huge, "llms": [{"name": "big", "type": "t", "model": "m"}]}),
        ),
        (
            "a 1 MB string for the protocol version",
            register.clone(),
            "alice",
            json!({"protocolVersion": huge, "llms": [{"name": "big", "type": "t", "model": "m"}]}),
        ),
        (
            "a 1 MB string for the llms",
            register.clone(),
            "alice",
            json!({"llms": huge}),
        ),
        (
            "a 1 MB agent system prompt",
            register.clone(),
            "alice",
            agents(json!([{"name": "a", "llm": "big", "systemPrompt": huge}])),
        ),
        (
            "a 1 MB agent description",
            register.clone(),
            "alice",
            agents(json!([{"name": "a", "llm": "big", "description": huge}])),
        ),
        (
            "1 MB of agent default parameters",
            register.clone(),
            "alice",
            agents(json!([{"name": "a", "llm": "big", "defaultParams": {"stop": huge}}])),
        ),
        (
            "a 1 MB agent name",
            register.clone(),
            "alice",
            agents(json!([{"name": huge, "llm": "big"}])),
        ),
        (
            "a 1 MB agent llm",
            register.clone(),
            "alice",
            agents(json!([{"name": "a", "llm": huge}])),
        ),
        (
            "ten thousand agents",
            register.clone(),
            "alice",
            agents(Value::Array(
                (0..10_000)
                    .map(|i| json!({"name": format!("a{i}"), "llm": "big"}))
                    .collect(),
            )),
        ),
        (
            "a 1 MB heartbeat session",
            format!("{b}/_provider-heartbeat"),
            "alice",
            json!({"providerSessionId": huge}),
        ),
        (
            "a 1 MB string for a status",
            format!("{b}/_provider-task/{}/result", scene.task),
            "alice",
            json!({"status": huge, "body": {}}),
        ),
        (
            "a 1 MB model to call",
            format!("{}/v1/chat/completions", scene.gw.url),
            "client",
            json!({"model": huge, "messages": []}),
        ),
        (
            "a 1 MB string for stream",
            format!("{}/v1/chat/completions", scene.gw.url),
            "client",
            json!({"model": "alpha", "messages": [], "stream": huge}),
        ),
    ];
    for (what, url, who, body) in cases {
        let session = scene.session.to_string();
        let a = post(
            &url,
            who,
            Some(&session),
            "application/json",
            body.to_string().into(),
        )
        .await;
        assert_refused(what, &a, 400);
    }
    // Path segments of 60 KB (a URI is at most 64 KiB) and headers of 100 KB (hyper
    // refuses request heads over its buffer, about 400 KB, before any route sees them).
    let long = "y".repeat(60 * 1024);
    let chat = json!({"messages": [{"role": "user", "content": "x"}]}).to_string();
    let a = post(
        &format!("{b}/{long}/infer"),
        "client",
        None,
        "application/json",
        chat.into(),
    )
    .await;
    assert_refused("a 60 KB llm name in the path", &a, 400);
    let response = http()
        .get(format!("{b}/{long}"))
        .header("authorization", auth("client"))
        .send()
        .await
        .unwrap();
    assert_refused("a 60 KB llm name to get", &answer(response).await, 400);
    let result = json!({"chunk": {"data": "x"}}).to_string();
    let a = post(
        &format!("{b}/_provider-task/task_{long}/result"),
        "alice",
        Some(scene.session.as_str()),
        "application/json",
        result.clone().into(),
    )
    .await;
    assert_refused("a 60 KB task id", &a, 400);
    let a = post(
        &format!("{b}/_provider-task/{}/result", scene.task),
        "alice",
        Some(&"s".repeat(100 * 1024)),
        "application/json",
        result.into(),
    )
    .await;
    assert_refused("a 100 KB session header", &a, 400);
    scene.finish(before).await;
}

/// 100 000 nested arrays or objects (serde_json's recursion limit stops at 128) are a
/// 400 on every route, not a stack overflow, including as the body of a result for
/// the live task; the gateway answers the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_is_400_not_a_stack_overflow() {
    let scene = Scene::start(Config::default()).await;
    let before = scene.snapshot().await;
    let depth = 100_000;
    for deep in [nested_arrays(depth), nested_objects(depth)] {
        let bodies = [
            deep.clone(),
            format!(r#"{{"llms": {deep}}}"#),
            format!(r#"{{"providerSessionId": {deep}}}"#),
            format!(r#"{{"status": 200, "body": {deep}}}"#),
            format!(r#"{{"error": {deep}}}"#),
            format!(r#"{{"model": "alpha", "messages": {deep}}}"#),
            format!(r#"{{"model": "alpha", "messages": [], "tools": {deep}}}"#),
        ];
        for (what, url, who, session, content_type) in scene.routes() {
            for body in &bodies {
                let a = post(
                    &url,
                    who,
                    session.as_deref(),
                    content_type,
                    body.clone().into(),
                )
                .await;
                assert_refused(&format!("{what}: {}…", &body[..40]), &a, 400);
            }
        }
    }
    let (status, _) = scene.gw.chat("client", "alpha-missing", "x", false).await;
    assert_eq!(status, 404, "the gateway still answers");
    scene.finish(before).await;
}

/// Headers that are not visible ASCII: the session header and the content type are
/// a 400 naming the header (not a 404 for a route that exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_headers_are_400() {
    let scene = Scene::start(Config::default()).await;
    let before = scene.snapshot().await;
    let url = format!("{}/_provider-task/{}/result", base(&scene.gw), scene.task);
    let body = json!({"chunk": {"data": "x"}}).to_string();
    let response = http()
        .post(&url)
        .header("authorization", auth("alice"))
        .header(SESSION, HeaderValue::from_bytes(b"ses_\xff\xfe").unwrap())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let a = answer(response).await;
    assert_refused("a session header with non-ASCII bytes", &a, 400);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(SESSION)
    );
    let response = http()
        .post(&url)
        .header("authorization", auth("alice"))
        .header(SESSION, scene.session.as_str())
        .header(
            "content-type",
            HeaderValue::from_bytes(b"application/\xffjson").unwrap(),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_refused(
        "a content type with non-ASCII bytes",
        &answer(response).await,
        400,
    );
    let response = http()
        .get(format!("{}/_provider-stream", base(&scene.gw)))
        .header("authorization", auth("alice"))
        .header(SESSION, HeaderValue::from_bytes(b"\x80").unwrap())
        .send()
        .await
        .unwrap();
    assert_refused(
        "a stream with an unreadable session",
        &answer(response).await,
        400,
    );
    scene.finish(before).await;
}

// ---------------------------------------------------------------------------------
// Unknown fields: ignored, consistently, and never stored.
// ---------------------------------------------------------------------------------

/// Unknown fields are ignored on every route and frame (so newer publishers can talk
/// to older gateways), and never reach the registry: a register that smuggles
/// `owner`, `kind`, `status`, `id` stores none of them. The one difference: a value
/// nested deeper than serde_json's recursion limit inside an unknown field is skipped
/// in an HTTP body and refused in a WebSocket frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored_consistently_and_never_stored() {
    let gw = TestGateway::start(Config::default()).await;
    let smuggled = |name: &str| {
        json!({
            "name": name, "type": "t", "model": "m",
            "owner": "mallory", "kind": "public", "status": "inactive",
            "id": "llm_fake", "providerSessionId": "ses_fake", "revision": 99,
            "lastHeartbeatAt": "1970-01-01T00:00:00.000Z",
        })
    };
    let body = json!({
        "llms": [smuggled("u-http")],
        "owner": "mallory", "kind": "public", "session": "ses_fake", "extra": {"deep": [1, 2]},
    });
    let a = post(
        &format!("{}/_provider-register", base(&gw)),
        "alice",
        None,
        "application/json",
        body.to_string().into(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let session = a.body["providerSessionId"].as_str().unwrap().to_owned();
    let a = post(
        &format!("{}/_provider-heartbeat", base(&gw)),
        "alice",
        None,
        "application/json",
        json!({"providerSessionId": session, "rows": 99, "extra": true})
            .to_string()
            .into(),
    )
    .await;
    assert_eq!((a.status, &a.body), (200, &json!({"llms": 1})));
    // `llms` is a heartbeat field since protocol 2 (each LLM's upstream state): a
    // value of the wrong shape is refused, not ignored.
    let a = post(
        &format!("{}/_provider-heartbeat", base(&gw)),
        "alice",
        None,
        "application/json",
        json!({"providerSessionId": session, "llms": 99})
            .to_string()
            .into(),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);

    // The same over a socket.
    let mut s = socket(&gw, "alice").await;
    let mut frame = json!({"type": "register", "llms": [smuggled("u-ws")], "owner": "mallory"});
    frame["extra"] = json!([1, 2, 3]);
    send(&mut s, frame).await;
    let registered = next(&mut s).await.unwrap();
    assert_eq!(registered["type"], "registered", "{registered}");
    let ws_session = registered["providerSessionId"].as_str().unwrap().to_owned();
    send(
        &mut s,
        json!({"type": "heartbeat", "providerSessionId": ws_session, "extra": 1}),
    )
    .await;

    for (name, session) in [("u-http", &session), ("u-ws", &ws_session)] {
        let row = gw
            .gateway
            .store()
            .get(&name.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.owner, "alice", "{name}");
        assert_eq!(row.kind, virtual_llm::LlmKind::Virtual, "{name}");
        assert_eq!(row.status, virtual_llm::LlmStatus::Active, "{name}");
        assert_ne!(row.id.as_str(), "llm_fake", "{name}");
        assert_eq!(
            row.provider_session_id.as_ref().map(SessionId::as_str),
            Some(session.as_str()),
            "{name}"
        );
        assert!(row.last_heartbeat_at.unwrap().as_millis() > 0, "{name}");
    }

    // A value nested 100 000 deep in an unknown field: serde_json skips an unknown
    // field without recursing, so an HTTP body takes it as it takes any unknown field.
    // A WebSocket frame is a tagged enum that serde buffers whole before it reads the
    // tag, so the recursion limit applies and the frame is refused. Neither recurses
    // without bound; neither writes anything of it.
    let deep = format!(
        r#"{{"llms":[{{"name":"u-deep","type":"t","model":"m"}}],"extra":{}}}"#,
        nested_arrays(100_000)
    );
    let a = post(
        &format!("{}/_provider-register", base(&gw)),
        "alice",
        None,
        "application/json",
        deep.clone().into(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", short(&a.body));
    let mut deep_socket = socket(&gw, "alice").await;
    deep_socket
        .send(Message::text(deep.replacen(
            '{',
            r#"{"type":"register","#,
            1,
        )))
        .await
        .unwrap();
    let error = next(&mut deep_socket).await.unwrap();
    assert_eq!(
        error["error"]["code"],
        "invalid_request",
        "{}",
        short(&error)
    );
    assert!(
        next(&mut deep_socket).await.is_none(),
        "then the socket closes"
    );

    // Results with unknown fields reach the right task: posted over HTTP...
    let gated = Arc::new(Gated::default());
    let p = gw.publish(&Sse, "alice", &["gated"], gated.clone()).await;
    let alice = p.connected().await;
    let chat = start_chat(&gw, "gated");
    let task = gated.task_id().await;
    let data = chunk_body("c", "gated", 0, Some("mine"), None).to_string();
    let result = json!({
        "chunk": {"data": data, "done": true, "extra": 1},
        "taskId": "task_other", "extra": {},
    });
    let a = post(
        &format!("{}/_provider-task/{task}/result", base(&gw)),
        "alice",
        Some(alice.as_str()),
        "application/json",
        result.to_string().into(),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(chat.await.unwrap(), "firstmine");
    p.stop().await;
    // ...and as a frame.
    let chat = start_chat(&gw, "u-ws");
    let task: TaskFrame = loop {
        let frame = next(&mut s).await.unwrap();
        if frame["type"] == "task" {
            break serde_json::from_value(frame).unwrap();
        }
    };
    let data = chunk_body("c", "u-ws", 0, Some("framed"), None).to_string();
    send(
        &mut s,
        json!({"type": "chunk", "taskId": task.task_id, "data": data, "done": true, "extra": [1], "status": "x"}),
    )
    .await;
    assert_eq!(chat.await.unwrap(), "framed");
}

// ---------------------------------------------------------------------------------
// Oversized bodies and frames.
// ---------------------------------------------------------------------------------

/// Bodies over the limit are a 413 on every route (a single NDJSON line over it too),
/// whatever their content; nothing changes and the task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413_on_every_route() {
    let limit = 64 * 1024;
    let scene = Scene::start(Config {
        max_body_bytes: limit,
        ..Config::default()
    })
    .await;
    let before = scene.snapshot().await;
    for size in [limit + 1, MB] {
        let filler = "z".repeat(size);
        for (what, url, who, session, content_type) in scene.routes() {
            let body = match what {
                "register" => json!({"llms": [{"name": "big", "type": "t", "model": filler}]}),
                "heartbeat" => json!({"providerSessionId": scene.session, "pad": filler}),
                "infer" | "chat" => {
                    json!({"model": "alpha", "messages": [{"role": "user", "content": filler}]})
                }
                _ => json!({"chunk": {"data": filler}}),
            };
            let a = post(
                &url,
                who,
                session.as_deref(),
                content_type,
                body.to_string().into(),
            )
            .await;
            assert_refused(&format!("{what} of {size} bytes"), &a, 413);
            assert_eq!(a.body["error"]["code"], "payload_too_large");
        }
    }
    scene.finish(before).await;
}

/// A frame over the limit after register is a 413 `error` frame, then that socket
/// closes and its rows go inactive; other publishers are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_only_its_socket() {
    let gw = TestGateway::start(Config {
        max_body_bytes: 64 * 1024,
        ..Config::default()
    })
    .await;
    let p = gw
        .publish(&Ws, "alice", &["alpha"], Arc::new(EchoProvider::new()))
        .await;
    let alpha = p.connected().await;
    let generation = gw.gateway.channel_of(&alpha);
    let mut s = socket(&gw, "mallory").await;
    send(&mut s, register_frame(None, "big")).await;
    let registered = next(&mut s).await.unwrap();
    assert_eq!(registered["type"], "registered");
    let session = registered["providerSessionId"].as_str().unwrap().to_owned();
    send(
        &mut s,
        json!({"type": "heartbeat", "providerSessionId": session, "pad": "z".repeat(MB)}),
    )
    .await;
    let error = next(&mut s).await.unwrap();
    assert_eq!(
        (error["type"].as_str(), error["error"]["code"].as_str()),
        (Some("error"), Some("payload_too_large")),
        "{}",
        short(&error)
    );
    assert!(next(&mut s).await.is_none(), "then the socket closes");
    eventually("the closed socket's row goes inactive", || async {
        gw.row_status("big").await == "inactive"
    })
    .await;
    assert_eq!(gw.gateway.channel_of(&alpha), generation);
    let (status, body) = gw.chat("client", "alpha", "unaffected", false).await;
    assert_eq!(
        (status, &body["choices"][0]["message"]["content"]),
        (200, &json!("unaffected"))
    );
    p.stop().await;
}

/// A client body under the limit whose task frame would be over it (the frame adds
/// its envelope) is a 413 for that client, and the publisher's channel stays up: a
/// WebSocket publisher refuses frames over its own limit (the same default), so
/// sending it would close its socket and fail every task on it.
async fn a_task_frame_over_the_limit_is_413_and_the_publisher_stays(t: &dyn Transport) {
    let gw = TestGateway::start(Config::default()).await;
    let limit = gw.gateway.config().max_body_bytes;
    let p = gw
        .publish(t, "alice", &["alpha"], Arc::new(EchoProvider::new()))
        .await;
    let session = p.connected().await;
    let generation = gw.gateway.channel_of(&session);
    let envelope = json!({"model": "alpha", "messages": [{"role": "user", "content": ""}]})
        .to_string()
        .len();
    let content = "q".repeat(limit - envelope - 16);
    let body = json!({"model": "alpha", "messages": [{"role": "user", "content": content}]});
    assert!(body.to_string().len() <= limit);
    let response = tokio::time::timeout(Duration::from_secs(20), gw.post_chat("client", body))
        .await
        .expect("an answer, not a hang");
    let a = answer(response).await;
    assert_refused("a task frame over the limit", &a, 413);
    assert_eq!(
        gw.gateway.channel_of(&session),
        generation,
        "the channel stays"
    );
    assert_eq!(gw.gateway.in_flight(), 0, "no task left behind");
    let (status, body) = gw.chat("client", "alpha", "still here", false).await;
    assert_eq!(
        (status, &body["choices"][0]["message"]["content"]),
        (200, &json!("still here"))
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_frame_over_the_limit_is_413_and_the_publisher_stays_sse() {
    a_task_frame_over_the_limit_is_413_and_the_publisher_stays(&Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_frame_over_the_limit_is_413_and_the_publisher_stays_ws() {
    a_task_frame_over_the_limit_is_413_and_the_publisher_stays(&Ws).await;
}

// ---------------------------------------------------------------------------------
// WebSocket frames.
// ---------------------------------------------------------------------------------

fn register_frame(session: Option<&str>, name: &str) -> Value {
    json!({"type": "register", "providerSessionId": session, "llms": [{"name": name, "type": "openai", "model": "m"}]})
}

/// Hostile frames: what the socket sends, as a raw message.
fn hostile_frames() -> Vec<(&'static str, Message)> {
    let huge = "x".repeat(MB);
    let text = |s: String| Message::text(s);
    vec![
        ("malformed JSON", text("{not json".into())),
        ("an empty frame", text(String::new())),
        ("a JSON array", text("[]".into())),
        ("no type", text(r#"{"llms":[]}"#.into())),
        ("an unknown type", text(r#"{"type":"bogus"}"#.into())),
        ("a 1 MB type", text(json!({"type": huge}).to_string())),
        ("a number type", text(r#"{"type":5}"#.into())),
        (
            "wrong types",
            text(r#"{"type":"register","llms":"nope"}"#.into()),
        ),
        (
            "a 1 MB string for a number",
            text(json!({"type": "register", "protocolVersion": huge, "llms": []}).to_string()),
        ),
        (
            "a 1 MB name",
            text(
                json!({"type": "register", "llms": [{"name": huge, "type": "t", "model": "m"}]})
                    .to_string(),
            ),
        ),
        (
            "a result for a malformed task id",
            text(json!({"type": "result", "taskId": "../x", "status": 200}).to_string()),
        ),
        (
            "deeply nested arrays",
            text(format!(
                r#"{{"type":"register","llms":{}}}"#,
                nested_arrays(100_000)
            )),
        ),
        (
            "deeply nested objects",
            text(format!(
                r#"{{"type":"register","x":{}}}"#,
                nested_objects(100_000)
            )),
        ),
        (
            "invalid UTF-8 in a text frame",
            Message::Frame(Frame::message(
                b"{\"type\":\"register\",\"llms\":[\xff]}".to_vec(),
                OpCode::Data(Data::Text),
                true,
            )),
        ),
        (
            "a binary frame",
            Message::binary(b"{\"type\":\"heartbeat\"}".to_vec()),
        ),
    ]
}

/// Each hostile frame, first on a socket or after its register, gets one `error`
/// frame with a bounded message and a close; nothing is written (a registered
/// socket's rows go inactive as its socket closes, and nothing else changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_an_error_and_a_close_and_change_nothing() {
    let gw = TestGateway::start(Config::default()).await;
    let gated = Arc::new(Gated::default());
    let p = gw.publish(&Ws, "alice", &["alpha"], gated.clone()).await;
    let alice = p.connected().await;
    let chat = start_chat(&gw, "alpha");
    gated.task_id().await;
    let before = snapshot(&gw, &[&alice]).await;
    for registered in [false, true] {
        for (what, frame) in hostile_frames() {
            let mut s = socket(&gw, "mallory").await;
            let mut session = None;
            if registered {
                send(&mut s, register_frame(None, "m-llm")).await;
                let answer = next(&mut s).await.unwrap();
                assert_eq!(answer["type"], "registered", "{answer}");
                session = answer["providerSessionId"].as_str().map(str::to_owned);
            }
            s.send(frame).await.unwrap();
            let error = next(&mut s)
                .await
                .unwrap_or_else(|| panic!("{what}: no error frame"));
            assert_eq!(error["type"], "error", "{what}: {}", short(&error));
            let message = error["error"]["message"].as_str().unwrap();
            assert!(
                message.len() <= MAX_MESSAGE,
                "{what}: a {} byte message echoes the frame",
                message.len()
            );
            assert!(
                next(&mut s).await.is_none(),
                "{what}: then the socket closes"
            );
            if let Some(session) = session {
                let session = SessionId::parse(&session).unwrap();
                eventually("the socket unbinds", || async {
                    !gw.gateway.is_bound(&session)
                })
                .await;
                assert_eq!(gw.row_status("m-llm").await, "inactive", "{what}");
            }
            let mut now = snapshot(&gw, &[&alice]).await;
            now.rows.retain(|r| r.name.as_str() != "m-llm");
            assert_eq!(now, before, "{what}: nothing else changed");
        }
    }
    gated.release();
    assert_eq!(chat.await.unwrap(), "firstsecond", "the task completes");
    p.stop().await;
}

// ---------------------------------------------------------------------------------
// NDJSON result streams, and a bad frame after good results.
// ---------------------------------------------------------------------------------

/// A raw SSE publisher: its session and its control stream's events.
struct RawSse {
    session: String,
    events: BoxStream<'static, (String, String)>,
}

impl RawSse {
    async fn open(gw: &TestGateway, name: &str) -> Self {
        let response = http()
            .post(format!("{}/_provider-register", base(gw)))
            .header("authorization", auth("alice"))
            .json(&json!({"llms": [{"name": name, "type": "openai", "model": "m"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let registered: Value = response.json().await.unwrap();
        let session = registered["providerSessionId"].as_str().unwrap().to_owned();
        let response = http()
            .get(format!("{}/_provider-stream", base(gw)))
            .header("authorization", auth("alice"))
            .header(SESSION, &session)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut events = response
            .bytes_stream()
            .eventsource()
            .map(|e| {
                let e = e.unwrap();
                (e.event, e.data)
            })
            .boxed();
        assert_eq!(events.next().await.unwrap().0, "hello");
        RawSse { session, events }
    }

    async fn next_task(&mut self) -> TaskFrame {
        loop {
            let (event, data) = self.events.next().await.unwrap();
            if event == "task" {
                return serde_json::from_str(&data).unwrap();
            }
        }
    }
}

fn chunk_line(task: &TaskFrame, text: &str, done: bool) -> String {
    let data = chunk_body("c", task.llm.as_str(), 0, Some(text), None).to_string();
    json!({"chunk": {"data": data, "done": done}}).to_string()
}

/// The data of every event of a chat stream, in order, until it ends.
async fn stream_events(gw: &TestGateway, llm: &str) -> Vec<String> {
    let mut reader = gw.chat_stream("client", llm, "x").await;
    let mut events = Vec::new();
    while let Some(data) = reader.next_data().await {
        events.push(data);
    }
    events
}

fn contents(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// An NDJSON result stream with a malformed line in the middle: the lines before it
/// reach the client, the bad line is a 400, and nothing after it is delivered. The
/// task is still live, and completes with a later post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_stream_with_a_bad_line_delivers_what_came_before_and_nothing_after() {
    let gw = TestGateway::start(Config::default()).await;
    let mut publisher = RawSse::open(&gw, "raw").await;
    let client = {
        let gw = gw.clone_handle();
        tokio::spawn(async move { stream_events(&gw, "raw").await })
    };
    let task = publisher.next_task().await;
    let url = format!("{}/_provider-task/{}/result", base(&gw), task.task_id);
    for bad in [
        "{not json".to_owned(),
        r#"{"status":"200"}"#.to_owned(),
        "\u{0}".to_owned(),
        nested_arrays(100_000),
    ] {
        let body = [
            chunk_line(&task, "a", false),
            chunk_line(&task, "b", false),
            bad.clone(),
            chunk_line(&task, "never", true),
        ]
        .join("\n");
        let a = post(
            &url,
            "alice",
            Some(&publisher.session),
            "application/x-ndjson",
            body.into(),
        )
        .await;
        assert_refused(
            &format!("a bad line {}", &bad[..bad.len().min(20)]),
            &a,
            400,
        );
        assert_eq!(gw.gateway.in_flight(), 1, "the task is still live");
    }
    let a = post(
        &url,
        "alice",
        Some(&publisher.session),
        "application/x-ndjson",
        chunk_line(&task, "end", true).into(),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.body);
    let events = client.await.unwrap();
    assert_eq!(
        contents(&events),
        "abababab".to_owned() + "end",
        "{events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !events.iter().any(|e| e.contains("never")),
        "nothing after a bad line"
    );
}

/// Over a socket, a bad frame after good results: the results before it reach the
/// client; the socket closes, so the task fails with one error event (503), never a
/// hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_after_good_results_delivers_them_then_one_error() {
    let gw = TestGateway::start(Config::default()).await;
    let mut s = socket(&gw, "alice").await;
    send(&mut s, register_frame(None, "raw")).await;
    assert_eq!(next(&mut s).await.unwrap()["type"], "registered");
    let client = {
        let gw = gw.clone_handle();
        tokio::spawn(async move { stream_events(&gw, "raw").await })
    };
    let task: TaskFrame = loop {
        let frame = next(&mut s).await.unwrap();
        if frame["type"] == "task" {
            break serde_json::from_value(frame).unwrap();
        }
    };
    for text in ["a", "b"] {
        let data = chunk_body("c", "raw", 0, Some(text), None).to_string();
        send(
            &mut s,
            json!({"type": "chunk", "taskId": task.task_id, "data": data}),
        )
        .await;
    }
    s.send(Message::text("{bad")).await.unwrap();
    assert_eq!(next(&mut s).await.unwrap()["type"], "error");
    let events = client.await.unwrap();
    assert_eq!(contents(&events), "ab", "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "llm_unavailable", "{events:?}");
}

// ---------------------------------------------------------------------------------
// Slowloris.
// ---------------------------------------------------------------------------------

/// A gateway served with `options`, as the test harness serves one.
async fn serve_with(options: virtual_llm::http::ServeOptions) -> (String, Gateway) {
    let auth = StaticTokens::new()
        .with(token("alice"), Principal::new("alice", [Role::Publisher]))
        .with(token("client"), Principal::new("client", [Role::Client]));
    let gateway = Gateway::builder(Arc::new(MemoryStore::new()))
        .authenticator(Arc::new(auth))
        .start()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let routes = virtual_llm::http::routes(
        gateway.clone(),
        [
            virtual_llm::sse::route(gateway.clone()),
            virtual_llm::ws::route(gateway.clone()),
        ],
    );
    tokio::spawn(virtual_llm::http::serve_with(
        listener,
        routes,
        std::future::pending(),
        options,
    ));
    (addr, gateway)
}

/// Reads until the server closes the connection; how many bytes came first.
async fn read_until_closed(stream: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// Slowloris clients — silent, stuck in the HTTP/2 preface, dribbling headers a byte
/// at a time, idle after one request — hold no other client up, and each is cut off
/// once the header read timeout passes, not before. A slow body without a token is
/// answered 401 at once, without waiting for the body.
///
/// Real time while the slow connections are opened and the other clients served, then
/// paused time, so that the header read timeout passes without waiting. (Paused from
/// the start, time would jump to the timeout while the requests are on their way.)
#[tokio::test]
async fn slowloris_clients_do_not_block_others_and_are_cut_off() {
    let timeout = Duration::from_secs(10);
    let mut options = virtual_llm::http::ServeOptions::default();
    options.header_read_timeout = timeout;
    let (addr, _gateway) = serve_with(options).await;
    let started = tokio::time::Instant::now();

    let silent = TcpStream::connect(&addr).await.unwrap();
    let mut preface = TcpStream::connect(&addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(
        format!(
            "GET /api/v1/llms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            token("client")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let dribbler = TcpStream::connect(&addr).await.unwrap();
    let (mut dribble_read, mut dribble_write) = dribbler.into_split();
    let dribbling = tokio::spawn(async move {
        let head = b"GET /api/v1/llms HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if dribble_write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // An unauthenticated body that never comes: answered without reading it.
    let mut no_body = TcpStream::connect(&addr).await.unwrap();
    no_body
        .write_all(
            b"POST /api/v1/llms/_provider-register HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
        )
        .await
        .unwrap();
    let mut status = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), no_body.read_exact(&mut status))
        .await
        .expect("answered without the body")
        .unwrap();
    assert_eq!(&status, b"HTTP/1.1 401");

    // Meanwhile, everyone else is served: twenty requests, while the slow connections
    // are still open (checked after them, unless a loaded machine took the whole
    // timeout to run twenty local requests).
    let client = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let response = client
            .get(format!("http://{addr}/api/v1/llms"))
            .bearer_auth(token("client"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("slowest of 20 requests beside the slowloris clients: {slowest:?}");
    let mut silent = silent;
    // Checked unless a loaded machine took most of the timeout to get here.
    if started.elapsed() < timeout * 3 / 4 {
        for (what, stream) in [
            ("silent", &silent),
            ("stuck in the HTTP/2 preface", &preface),
            ("idle after a request", &idle),
        ] {
            assert!(
                still_open(stream),
                "a {what} connection was cut off too soon"
            );
        }
    }

    // And each slow connection is cut off, after the timeout and well before forever:
    // in paused time from here, the dribbler's 20 ms steps and the timeout pass at once.
    tokio::time::pause();
    for (what, stream) in [
        ("silent", &mut silent),
        ("stuck in the HTTP/2 preface", &mut preface),
        ("idle after a request", &mut idle),
    ] {
        tokio::time::timeout(timeout * 5, read_until_closed(stream))
            .await
            .unwrap_or_else(|_| panic!("a {what} connection is never closed"));
    }
    tokio::time::timeout(timeout * 5, read_until_closed_half(&mut dribble_read))
        .await
        .expect("a dribbling connection is cut off");
    // Tokio time: the real time until the pause and the paused time after it.
    assert!(started.elapsed() >= timeout, "not before the timeout");
    dribbling.await.unwrap();
}

/// Whether the server still holds `stream` open (drains what it already sent).
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

async fn read_until_closed_half(stream: &mut tokio::net::tcp::OwnedReadHalf) -> usize {
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// The default `serve` has a header read timeout (75 s): a silent connection and an
/// idle keep-alive connection are closed once it passes. Paused time: no waiting.
#[tokio::test(start_paused = true)]
async fn the_default_server_cuts_off_silent_connections() {
    let default = virtual_llm::http::ServeOptions::default().header_read_timeout;
    assert_eq!(default, Duration::from_secs(75));
    let (addr, _gateway) = serve_with(virtual_llm::http::ServeOptions::default()).await;
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    tokio::time::timeout(default * 2, read_until_closed(&mut silent))
        .await
        .expect("a silent connection is closed");
    assert!(started.elapsed() >= default, "{:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------
// Floods.
// ---------------------------------------------------------------------------------

/// Bursts of register and heartbeat from one principal: the gateway stays correct.
/// 300 racing registers of one name leave exactly one owner session; 300 re-registers
/// of that session and 1 000 heartbeats all succeed and leave one row; clients are
/// served meanwhile. There is no rate limiting: 300 registers of new names all
/// succeed (see docs/security.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn floods_of_register_and_heartbeat_keep_the_gateway_correct() {
    let gw = TestGateway::start(Config::default()).await;
    let p = gw
        .publish(&Sse, "alice", &["alpha"], Arc::new(EchoProvider::new()))
        .await;
    let register_url = format!("{}/_provider-register", base(&gw));
    let client = reqwest::Client::new();
    let burst = |bodies: Vec<Value>, url: String| {
        let client = client.clone();
        async move {
            futures::stream::iter(bodies)
                .map(|body| {
                    let client = client.clone();
                    let url = url.clone();
                    async move {
                        let response = client
                            .post(&url)
                            .bearer_auth(token("alice"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        answer(response).await
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<Answer>>()
                .await
        }
    };
    let one = |session: Option<&str>, name: &str| json!({"providerSessionId": session, "llms": [{"name": name, "type": "t", "model": "m"}]});

    // Racing registers of one name, each without a session: one wins.
    let chat = {
        let gw = gw.clone_handle();
        tokio::spawn(async move { gw.chat("client", "alpha", "during the flood", false).await })
    };
    let answers = burst(vec![one(None, "contested"); 300], register_url.clone()).await;
    let winners: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(winners.len(), 1, "exactly one register wins");
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 409, "{}", a.body);
        assert_eq!(
            a.body["error"]["conflicts"][0]["reason"],
            "activeInAnotherSession"
        );
    }
    let session = winners[0].body["providerSessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = winners[0].body["llms"][0]["id"].clone();
    let (status, body) = chat.await.unwrap();
    assert_eq!(
        (status, &body["choices"][0]["message"]["content"]),
        (200, &json!("during the flood"))
    );

    // The winner's session re-registering in a burst: all succeed, one row.
    let answers = burst(
        vec![one(Some(&session), "contested"); 300],
        register_url.clone(),
    )
    .await;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["providerSessionId"], session.as_str());
        assert_eq!(a.body["llms"][0]["id"], id);
    }
    // Heartbeats in a burst.
    let beats = vec![json!({"providerSessionId": session}); 1000];
    let answers = burst(beats, format!("{}/_provider-heartbeat", base(&gw))).await;
    for a in &answers {
        assert_eq!((a.status, &a.body), (200, &json!({"llms": 1})));
    }
    let rows: Vec<LlmRecord> = gw.gateway.store().list().await.unwrap();
    let contested: Vec<&LlmRecord> = rows
        .iter()
        .filter(|r| r.name.as_str() == "contested")
        .collect();
    assert_eq!(contested.len(), 1);
    assert_eq!(contested[0].owner, "alice");
    assert_eq!(
        contested[0].provider_session_id.as_ref().unwrap().as_str(),
        session
    );

    // Heartbeat frames in a burst on one socket: the socket stays, nothing breaks.
    let mut s = socket(&gw, "alice").await;
    send(&mut s, register_frame(None, "ws-flood")).await;
    let registered = next(&mut s).await.unwrap();
    let ws_session = registered["providerSessionId"].as_str().unwrap().to_owned();
    for _ in 0..2000 {
        s.feed(Message::text(
            json!({"type": "heartbeat", "providerSessionId": ws_session}).to_string(),
        ))
        .await
        .unwrap();
    }
    s.flush().await.unwrap();
    let (status, _) = gw.chat("client", "alpha", "after the flood", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        gw.row_status("ws-flood").await,
        "active",
        "the socket is still bound"
    );

    // A burst of new sessions stops at the principal's maxSessions (64 by default,
    // SPEC §16), exactly: the rest are 403 and write nothing.
    let rows = gw.gateway.store().list().await.unwrap();
    let held: std::collections::HashSet<_> = rows
        .iter()
        .filter(|r| r.owner == "alice")
        .filter_map(|r| r.provider_session_id.clone())
        .collect();
    let room = 64 - held.len();
    let fresh: Vec<Value> = (0..300).map(|i| one(None, &format!("flood-{i}"))).collect();
    let answers = burst(fresh, register_url).await;
    let landed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(landed, room, "exactly up to maxSessions");
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(
            (a.status, &a.body["error"]["code"]),
            (403, &json!("quota_exceeded"))
        );
    }
    assert_eq!(
        gw.gateway.store().list().await.unwrap().len(),
        rows.len() + room
    );
    p.stop().await;
}
