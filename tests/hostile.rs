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
        let row = stored(&gw, name).await;
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
    // field without recursing, so an HTTP body takes it as it takes any unknown field,
    // and so does a WebSocket frame (read straight into its variant once its `type`
    // came first, not buffered whole). Neither recurses without bound; neither writes
    // anything of it.
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
        .send(Message::text(
            deep.replacen('{', r#"{"type":"register","#, 1)
                .replacen("u-deep", "u-deep-ws", 1),
        ))
        .await
        .unwrap();
    let registered = next(&mut deep_socket).await.unwrap();
    assert_eq!(registered["type"], "registered", "{}", short(&registered));
    for name in ["u-deep", "u-deep-ws"] {
        let row = stored(&gw, name).await;
        assert_eq!(row.status, virtual_llm::LlmStatus::Active, "{name}");
        let stored = serde_json::to_string(&row).unwrap();
        assert!(
            !stored.contains("[[["),
            "{name}: nothing of the extra field"
        );
    }

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

// ---------------------------------------------------------------------------------
// Clients and publishers that stop reading; server limits (SPEC §16).
// ---------------------------------------------------------------------------------

/// Server options with a short write timeout (and the rest as by default).
fn short_write_timeout() -> virtual_llm::http::ServeOptions {
    let mut options = virtual_llm::http::ServeOptions::default();
    options.write_timeout = Duration::from_millis(300);
    options
}

/// The kernel's largest TCP send and receive buffers (`tcp_wmem`, `tcp_rmem`): what a
/// stalled connection can hold outside the gateway's own memory.
fn kernel_socket_buffers() -> (usize, usize) {
    let max = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(8 << 20)
    };
    (
        max("/proc/sys/net/ipv4/tcp_wmem"),
        max("/proc/sys/net/ipv4/tcp_rmem"),
    )
}

/// A client that opens a streaming request and stops reading (its receive buffer
/// full) is disconnected after the write timeout, however long it keeps its TCP
/// connection open: its task is cancelled at the publisher (the stream's producer is
/// dropped before it ran to its end), and the publisher's one concurrency slot is free
/// for the next request (red-team finding F2). The client's connection is still open
/// while this is checked: nothing here depends on the client going away.
async fn a_client_that_stops_reading_a_stream_is_cut_off_and_its_task_cancelled(t: &dyn Transport) {
    let gw = TestGateway::start_serving(Config::default(), short_write_timeout()).await;
    let firehose = Arc::new(virtual_llm::testkit::Firehose::default());
    let options = virtual_llm::PublisherOptions {
        max_concurrent_tasks: 1,
        ..Default::default()
    };
    let p = gw
        .publish_with(t, "alice", &["hose"], firehose.clone(), options)
        .await;
    // A hundred thousand 1 KiB chunks; the client takes the first and stops.
    let mut stalled = gw
        .chat_stream_with_recv_buffer("client", "hose", "stalled n=100000", 4096)
        .await;
    assert!(stalled.next_event().await.is_some());
    tokio::time::timeout(Duration::from_secs(30), firehose.dropped.notified())
        .await
        .unwrap_or_else(|_| panic!("{}: the stalled stream's task is never cancelled", t.name()));
    let produced = firehose.produced("stalled");
    assert!(
        produced < 100_000,
        "{}: the stream ran to its end",
        t.name()
    );
    // The publisher's only slot is free again: the next request is served.
    let next = tokio::time::timeout(Duration::from_secs(30), async {
        gw.chat_stream("client", "hose", "next n=3")
            .await
            .text()
            .await
    })
    .await
    .unwrap_or_else(|_| panic!("{}: the publisher's slot is still taken", t.name()));
    assert_eq!(next.len(), 3000, "{}", t.name());
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    drop(stalled);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_stream_is_cut_off_and_its_task_cancelled_sse() {
    a_client_that_stops_reading_a_stream_is_cut_off_and_its_task_cancelled(&Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_stream_is_cut_off_and_its_task_cancelled_ws() {
    a_client_that_stops_reading_a_stream_is_cut_off_and_its_task_cancelled(&Ws).await;
}

/// A large non-streaming answer (the whole registry, unpaged) that its client never
/// reads is dropped after the write timeout: the client, reading at last, gets only
/// what the kernel's socket buffers held, then the close; before, the gateway held
/// the whole answer for as long as the client kept the connection (red-team F5).
/// Paused time from the request on: the timeout passes without waiting.
#[tokio::test]
async fn an_unread_registry_listing_is_released_after_the_write_timeout() {
    let gw = TestGateway::start_serving(Config::default(), short_write_timeout()).await;
    let (wmem, rmem) = kernel_socket_buffers();
    // Rows of about 300 bytes each, twice what the kernel can hold in between (the
    // gateway's send buffer; the client's receive buffer is 4 KiB).
    let _ = rmem;
    let rows = (2 * wmem / 300).max(10_000);
    let batch = (0..rows)
        .map(|i| {
            let mut r = virtual_llm::testkit::record(&format!("row-{i:06}"));
            r.model = "m".repeat(200);
            virtual_llm::Write::Insert(r)
        })
        .collect();
    gw.gateway.store().write(batch).await.unwrap();
    let whole = http()
        .get(format!("{}{}", gw.url, gw.gateway.config().base_path))
        .bearer_auth(token("client"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    assert!(whole > wmem + MB, "{whole} bytes: not enough rows");

    let mut stalled = virtual_llm::testkit::connect_with_recv_buffer(gw.addr, Some(4096)).await;
    stalled
        .write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                gw.gateway.config().base_path,
                token("client")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::pause();
    // Paused: the gateway answers, fills the socket and waits 300 ms of tokio time
    // for the client, which comes at once once nothing else is left to run.
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::time::resume();
    let received = tokio::time::timeout(Duration::from_secs(30), read_until_closed(&mut stalled))
        .await
        .expect("the connection is closed");
    assert!(
        received < whole,
        "the whole answer ({whole} bytes) was held for the client"
    );
    eprintln!("an unread listing of {whole} bytes: {received} reached the client before the close");
}

/// An SSE publisher that opens its control stream and stops reading is closed after
/// the write timeout, as a WebSocket publisher is after its send timeout: its session
/// unbinds (its row goes inactive), the frames queued for it are dropped with the
/// stream, and the clients whose tasks were sent to it get the usual answer for a
/// lost channel (503) instead of waiting for the task deadline (red-team F1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_publisher_that_stops_reading_is_closed_and_its_tasks_fail() {
    let gw = TestGateway::start_serving(Config::default(), short_write_timeout()).await;
    let registered = gw
        .register_raw(
            "alice",
            json!({"llms": [{"name": "sink", "type": "openai", "model": "m"}]}),
        )
        .await;
    let session = registered["providerSessionId"].as_str().unwrap().to_owned();
    let mut stream = virtual_llm::testkit::connect_with_recv_buffer(gw.addr, Some(4096)).await;
    stream
        .write_all(
            format!(
                "GET {}/_provider-stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 {SESSION}: {session}\r\n\r\n",
                gw.gateway.config().base_path,
                token("alice")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    eventually("the stream is bound", || async {
        gw.row_status("sink").await == "active"
    })
    .await;
    // Task frames of 1 MiB each, far more than the socket buffers on the way hold.
    let (wmem, rmem) = kernel_socket_buffers();
    let clients = (2 * (wmem + rmem) / MB + 4).min(64);
    let text = "w".repeat(MB);
    let calls: Vec<_> = (0..clients)
        .map(|_| {
            let gw = gw.clone_handle();
            let text = text.clone();
            tokio::spawn(async move { gw.chat("client", "sink", &text, false).await })
        })
        .collect();
    for call in calls {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .expect("a client waits for a publisher that stopped reading")
            .unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "llm_unavailable", "{body}");
    }
    assert_eq!(gw.row_status("sink").await, "inactive");
    assert_eq!(gw.gateway.in_flight(), 0);
    // The publisher, reading at last, finds its stream closed.
    tokio::time::timeout(Duration::from_secs(30), read_until_closed(&mut stream))
        .await
        .expect("the stream is closed");
}

/// A body well over the limit sent in one go gets its 413, every time, by a client
/// that does what most do (curl, Python's `http.client`): send the whole request,
/// then read the answer. The gateway answers before the body is in, then reads (and
/// drops) the rest for a moment before it closes: closing at once, with the body
/// still arriving, makes the kernel reset the connection, which fails the client's
/// send and discards the answer. Twenty times, on fresh connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_sent_in_one_go_reliably_reads_its_413() {
    let config = Config {
        max_body_bytes: 64 * 1024,
        ..Config::default()
    };
    let gw = TestGateway::start_serving(config, virtual_llm::http::ServeOptions::default()).await;
    let body = vec![b'x'; 4 * MB];
    for round in 0..20 {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            token("client"),
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        let exchange = async {
            stream.write_all(&request).await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("the answer comes")
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "round {round}: {text}");
        assert!(text.contains("payload_too_large"), "round {round}: {text}");
    }
}

/// One request on `stream` (kept alive), its status line.
async fn get_on(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                token("client")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    read_response_head(stream).await
}

/// Reads one response on `stream` (its head and a `Content-Length` body); its status
/// line.
async fn read_response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head.lines().next().unwrap().to_owned()
}

/// At the connection cap, a new connection waits (in the listen backlog) while the
/// open ones are served as before, and is served once one of them closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_wait_and_open_ones_are_served() {
    let mut options = virtual_llm::http::ServeOptions::default();
    options.max_connections = 2;
    let (addr, _gateway) = serve_with(options).await;
    let mut first = TcpStream::connect(&addr).await.unwrap();
    let mut second = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(get_on(&mut first, "/v1/models").await, "HTTP/1.1 200 OK");
    assert_eq!(get_on(&mut second, "/v1/models").await, "HTTP/1.1 200 OK");

    // A third: its TCP handshake completes (the kernel queues it), its request waits.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                token("client")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Meanwhile the open connections are served, again and again.
    for _ in 0..5 {
        assert_eq!(get_on(&mut first, "/v1/models").await, "HTTP/1.1 200 OK");
        assert_eq!(get_on(&mut second, "/v1/models").await, "HTTP/1.1 200 OK");
    }
    // Without a cap the third would have been answered by now as quickly as these ten;
    // a short look, which can only miss an early answer, never invent one.
    let mut peek = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.peek(&mut peek)).await;
    assert!(early.is_err(), "a connection past the cap was served");
    // One closes: the third is accepted and answered.
    drop(first);
    let answered = tokio::time::timeout(Duration::from_secs(30), read_response_head(&mut third))
        .await
        .expect("the waiting connection is served once a slot frees");
    assert_eq!(answered, "HTTP/1.1 200 OK");
    assert_eq!(get_on(&mut second, "/v1/models").await, "HTTP/1.1 200 OK");
}

/// A client with a valid token that sends part of a body and then nothing is
/// answered (400, naming the body read timeout) and disconnected once the timeout
/// passes, rather than holding its request forever; a publisher's NDJSON result post
/// whose lines come with gaps shorter than the timeout is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_is_cut_off_after_the_body_read_timeout() {
    let mut options = virtual_llm::http::ServeOptions::default();
    options.body_read_timeout = Duration::from_millis(500);
    let (addr, _gateway) = serve_with(options).await;
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"model\":",
                token("client")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut answer))
        .await
        .expect("the stalled body is cut off")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("body read timeout"), "{answer}");
}

/// An HTTP/2 connection (prior knowledge, no proxy in front) with no request in
/// flight is closed (GOAWAY) after the HTTP/2 idle timeout, as an idle HTTP/1
/// keep-alive connection is after the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let mut options = virtual_llm::http::ServeOptions::default();
    options.http2_idle_timeout = Duration::from_millis(300);
    let (addr, _gateway) = serve_with(options).await;
    let stream = TcpStream::connect(&addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    for _ in 0..3 {
        let request = hyper::Request::get(format!("http://{addr}/v1/models"))
            .header("authorization", format!("Bearer {}", token("client")))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), connection)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .unwrap();
}

/// `GET {base}` pages with `limit` and `after`: each page holds at most `limit` rows
/// (at most 1000 whatever is asked), in name order, after the cursor, with the cursor
/// of the next page in `next` (`null` on the last); agent rows are skipped as in the
/// unpaged answer, even where a run of them fills a whole page; walking the pages
/// gives exactly the unpaged answer, which keeps its v1 shape (an array of every row)
/// for a request without paging parameters. A bad `limit` or `after` is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_listing_pages_with_limit_and_after() {
    let gw = TestGateway::start(Config::default()).await;
    let mut batch: Vec<virtual_llm::Write> = (0..1205)
        .map(|i| virtual_llm::Write::Insert(virtual_llm::testkit::record(&format!("row-{i:04}"))))
        .collect();
    // Agents between row-0001 and row-0002, more than a small page.
    for i in 0..7 {
        let mut agent = virtual_llm::testkit::record(&format!("row-0001-agent-{i}"));
        agent.provider_type = virtual_llm::agent::AGENT_TYPE.into();
        agent.agent = Some(virtual_llm::agent::Persona {
            llm: virtual_llm::LlmName::parse("row-0000").unwrap(),
            description: None,
            system_prompt: None,
            default_params: None,
        });
        batch.push(virtual_llm::Write::Insert(agent));
    }
    gw.gateway.store().write(batch).await.unwrap();
    let list = |query: &'static str| {
        let gw = gw.clone_handle();
        async move {
            gw.get_any(
                Some("client"),
                &format!("{}{query}", gw.gateway.config().base_path),
            )
            .await
        }
    };
    let names = |rows: &Value| -> Vec<String> {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };

    // No paging parameter: the v1 answer, every row but the agents.
    let (status, all) = list("").await;
    assert_eq!(status, 200);
    let all = names(&all);
    assert_eq!(all.len(), 1205);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "ordered by name");
    assert_eq!(list("?unrelated=1").await.1.as_array().unwrap().len(), 1205);

    // Small pages across the agents.
    let (status, page) = list("?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(names(&page["llms"]), ["row-0000", "row-0001"]);
    assert_eq!(page["next"], "row-0001");
    let (_, page) = list("?limit=2&after=row-0001").await;
    assert_eq!(names(&page["llms"]), ["row-0002", "row-0003"]);
    assert_eq!(page["next"], "row-0003");
    // A cursor that names no row; the default page size.
    let (_, page) = list("?after=row-0001-agent-3").await;
    assert_eq!(names(&page["llms"]).len(), 100);
    assert_eq!(names(&page["llms"])[0], "row-0002");
    // The last page says so; past the end, an empty page.
    let (_, page) = list("?limit=5&after=row-1200").await;
    assert_eq!(
        names(&page["llms"]),
        ["row-1201", "row-1202", "row-1203", "row-1204"]
    );
    assert_eq!(page["next"], Value::Null);
    let (_, page) = list("?limit=5&after=row-1204").await;
    assert_eq!(page, json!({"llms": [], "next": null}));
    // At most 1000 rows a page, whatever is asked.
    let (_, page) = list("?limit=100000").await;
    assert_eq!(names(&page["llms"]).len(), 1000);
    assert_eq!(page["next"], "row-0999");

    // Walking the pages gives the unpaged answer.
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("{}?limit=333&after={a}", gw.gateway.config().base_path),
            None => format!("{}?limit=333", gw.gateway.config().base_path),
        };
        let (status, page) = gw.get_any(Some("client"), &path).await;
        assert_eq!(status, 200, "{page}");
        walked.extend(names(&page["llms"]));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, all);

    for bad in [
        "?limit=0",
        "?limit=-1",
        "?limit=ten",
        "?after=_bad",
        "?after=%FF",
    ] {
        let (status, body) = list(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{bad}");
    }
}

/// The row `name` as the gateway's store has it (it must exist).
async fn stored(gw: &TestGateway, name: &str) -> LlmRecord {
    gw.gateway
        .store()
        .get(&name.parse().unwrap())
        .await
        .unwrap()
        .unwrap()
}
