//! Ownership and authentication, end to end, over both transports (SPEC §3, §5, §6):
//! missing or bad tokens are 401 with `WWW-Authenticate` on every route; a client
//! token cannot publish; a publisher can only register, heartbeat, bind or post
//! results for its own sessions and names, and another principal never adopts its
//! rows, even inactive or detached ones; session, task and row ids carry 128 random
//! bits. After every refusal the registry (every stored field, revisions included),
//! the bound channels and the tasks in flight are exactly as before, and the task in
//! flight still completes with its own publisher's answer.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use virtual_llm::protocol::{TaskFrame, TaskResult};
use virtual_llm::testkit::socket::{auth, next, send, socket, ws_url};
use virtual_llm::testkit::{Gated, TestGateway, Transport, eventually, token};
use virtual_llm::{Config, EchoProvider, Error, LlmRecord, Provider, Reply, SessionId, TaskId};

// The transports under test, shared with the conformance suite.
use virtual_llm::testkit::{SseTransport as Sse, WsTransport as Ws};

const SESSION: &str = virtual_llm::protocol::SESSION_HEADER;

// ---------------------------------------------------------------------------------
// Helpers: raw HTTP and raw WebSocket access, and a snapshot of everything a refusal
// must leave alone.
// ---------------------------------------------------------------------------------

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn base(gw: &TestGateway) -> String {
    format!("{}{}", gw.url, gw.gateway.config().base_path)
}

/// A status, the response headers and the JSON body of a refusal.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

async fn register(gw: &TestGateway, who: &str, body: Value) -> Answer {
    let response = http()
        .post(format!("{}/_provider-register", base(gw)))
        .header("authorization", auth(who))
        .json(&body)
        .send()
        .await
        .unwrap();
    answer(response).await
}

async fn heartbeat(gw: &TestGateway, who: &str, session: &str) -> Answer {
    let response = http()
        .post(format!("{}/_provider-heartbeat", base(gw)))
        .header("authorization", auth(who))
        .json(&json!({ "providerSessionId": session }))
        .send()
        .await
        .unwrap();
    answer(response).await
}

/// Opens `GET _provider-stream` and returns the status; a 200 stream is dropped at once.
async fn stream_status(gw: &TestGateway, who: &str, session: &str) -> Answer {
    let response = http()
        .get(format!("{}/_provider-stream", base(gw)))
        .header("authorization", auth(who))
        .header(SESSION, session)
        .send()
        .await
        .unwrap();
    answer(response).await
}

async fn post_result(
    gw: &TestGateway,
    who: &str,
    session: &str,
    task: &TaskId,
    result: &TaskResult,
) -> Answer {
    let response = http()
        .post(format!("{}/_provider-task/{task}/result", base(gw)))
        .header("authorization", auth(who))
        .header(SESSION, session)
        .json(result)
        .send()
        .await
        .unwrap();
    answer(response).await
}

fn spec(name: &str) -> Value {
    json!({ "name": name, "type": "openai", "model": "m" })
}

fn register_body(session: Option<&str>, names: &[&str]) -> Value {
    let llms: Vec<Value> = names.iter().map(|n| spec(n)).collect();
    match session {
        Some(s) => json!({ "providerSessionId": s, "llms": llms }),
        None => json!({ "llms": llms }),
    }
}

/// The refusal of a WebSocket upgrade with this `Authorization` header (or none).
async fn ws_refusal(gw: &TestGateway, authorization: Option<HeaderValue>) -> Answer {
    let mut request = ws_url(gw).into_client_request().unwrap();
    if let Some(value) = authorization {
        request.headers_mut().insert("authorization", value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            let mut headers = HeaderMap::new();
            for (name, value) in response.headers() {
                headers.insert(name.clone(), value.clone());
            }
            Answer {
                status: response.status().as_u16(),
                headers,
                body,
            }
        }
        other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
    }
}

fn ws_register(session: Option<&str>, names: &[&str]) -> Value {
    let mut frame = register_body(session, names);
    frame["type"] = json!("register");
    frame
}

/// Everything a refusal must leave alone: every stored row (owner, session, revision
/// and timestamps included), which sessions are bound at which generation, and how
/// many tasks are in flight.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: Vec<LlmRecord>,
    view: Value,
    generations: Vec<Option<virtual_llm::ChannelBinding>>,
    in_flight: usize,
}

async fn snapshot(gw: &TestGateway, sessions: &[&SessionId]) -> Snapshot {
    Snapshot {
        rows: gw.gateway.store().list().await.unwrap(),
        view: gw.list().await,
        generations: sessions.iter().map(|s| gw.gateway.channel_of(s)).collect(),
        in_flight: gw.gateway.in_flight(),
    }
}

/// A refusal: its status, and an OpenAI-shaped body of the matching type.
fn assert_refused(what: &str, a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    let error = &a.body["error"];
    assert!(
        error["message"].is_string(),
        "{what}: not OpenAI-shaped: {}",
        a.body
    );
    assert!(error["code"].is_string(), "{what}: no code: {}", a.body);
    let expected_type = match status {
        401 => "authentication_error",
        403 => "permission_error",
        _ => "invalid_request_error",
    };
    assert_eq!(error["type"], expected_type, "{what}: {}", a.body);
    if status == 401 {
        assert_eq!(
            a.headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{what}: a 401 names the scheme"
        );
    }
}

/// Starts a streaming chat on `llm` in the background; its text once it finishes.
fn start_chat(gw: &TestGateway, llm: &str) -> tokio::task::JoinHandle<String> {
    let gw = gw.clone_handle();
    let llm = llm.to_owned();
    tokio::spawn(async move { gw.chat_stream("client", &llm, "x").await.text().await })
}

// ---------------------------------------------------------------------------------
// 401: no token, or a token nobody issued, on every route.
// ---------------------------------------------------------------------------------

/// Every route answers 401 with `WWW-Authenticate: Bearer` to a missing, malformed or
/// unknown token, even one that names a live session and task; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_tokens_are_401_on_every_route_and_change_nothing() {
    let gw = TestGateway::start(Config::default()).await;
    let gated = Arc::new(Gated::default());
    let p = gw.publish(&Sse, "alice", &["alpha"], gated.clone()).await;
    let session = p.connected().await;
    let chat = start_chat(&gw, "alpha");
    let task = gated.task_id().await;
    let before = snapshot(&gw, &[&session]).await;

    let b = base(&gw);
    let result = serde_json::to_string(&TaskResult::Chunk {
        data: "forged".into(),
        done: true,
        seq: None,
    })
    .unwrap();
    let chat_body = json!({"model": "alpha", "messages": [{"role": "user", "content": "x"}]});
    // (method, url, body, the session header)
    let routes: Vec<(&str, String, Option<String>, bool)> = vec![
        (
            "POST",
            format!("{b}/_provider-register"),
            Some(register_body(Some(session.as_str()), &["alpha"]).to_string()),
            false,
        ),
        ("GET", format!("{b}/_provider-stream"), None, true),
        (
            "POST",
            format!("{b}/_provider-heartbeat"),
            Some(json!({"providerSessionId": session}).to_string()),
            false,
        ),
        (
            "POST",
            format!("{b}/_provider-task/{task}/result"),
            Some(result),
            true,
        ),
        ("GET", b.clone(), None, false),
        ("GET", format!("{b}/alpha"), None, false),
        (
            "POST",
            format!("{b}/alpha/infer"),
            Some(chat_body.to_string()),
            false,
        ),
        (
            "POST",
            format!("{}/v1/chat/completions", gw.url),
            Some(chat_body.to_string()),
            false,
        ),
        ("GET", format!("{}/v1/models", gw.url), None, false),
        ("GET", format!("{}/api/v1/agents", gw.url), None, false),
        (
            "GET",
            format!("{}/api/v1/agents/alpha", gw.url),
            None,
            false,
        ),
    ];
    let bad_tokens: Vec<Option<HeaderValue>> = vec![
        None,
        Some(HeaderValue::from_static("Bearer nobody-token")),
        Some(HeaderValue::from_static("Bearer ")),
        Some(HeaderValue::from_static("Bearer alice-token-")),
        Some(HeaderValue::from_static("Bearer alice-tokeN")),
        Some(HeaderValue::from_static("alice-token")),
        Some(HeaderValue::from_static("Basic YWxpY2U6YWxpY2UtdG9rZW4=")),
        Some(HeaderValue::from_bytes(b"Bearer alice-token\xff").unwrap()),
        Some(HeaderValue::from_bytes(b"Bearer \xe9\xff\xfe").unwrap()),
    ];
    for (method, url, body, with_session) in &routes {
        for bad in &bad_tokens {
            let mut request = match *method {
                "GET" => http().get(url),
                _ => http().post(url).header("content-type", "application/json"),
            };
            if let Some(value) = bad {
                request = request.header("authorization", value.clone());
            }
            if *with_session {
                request = request.header(SESSION, session.as_str());
            }
            if let Some(body) = body {
                request = request.body(body.clone());
            }
            let a = answer(request.send().await.unwrap()).await;
            assert_refused(&format!("{method} {url} with {bad:?}"), &a, 401);
            assert_eq!(a.body["error"]["code"], "unauthenticated");
        }
    }
    for bad in &bad_tokens {
        let a = ws_refusal(&gw, bad.clone()).await;
        assert_refused(&format!("the WebSocket upgrade with {bad:?}"), &a, 401);
    }

    assert_eq!(snapshot(&gw, &[&session]).await, before, "nothing changed");
    gated.release();
    assert_eq!(chat.await.unwrap(), "firstsecond", "the task completes");
    p.stop().await;
}

/// The bearer scheme is matched without regard to case, as RFC 9110 says: the check
/// above refuses tokens, not spellings of the scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let gw = TestGateway::start(Config::default()).await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = http()
            .get(base(&gw))
            .header("authorization", format!("{scheme} {}", token("client")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
}

// ---------------------------------------------------------------------------------
// 403: roles.
// ---------------------------------------------------------------------------------

/// A client token cannot publish on any route or transport (register, stream,
/// heartbeat, result, WebSocket upgrade: 403), even naming a live session and task; a
/// publisher-only token cannot call LLMs. Nothing changes, and the task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_and_refusals_change_nothing() {
    let gw = TestGateway::start(Config::default()).await;
    let gated = Arc::new(Gated::default());
    let p = gw.publish(&Ws, "alice", &["alpha"], gated.clone()).await;
    let session = p.connected().await;
    let chat = start_chat(&gw, "alpha");
    let task = gated.task_id().await;
    let before = snapshot(&gw, &[&session]).await;

    let a = register(&gw, "client", register_body(None, &["client-llm"])).await;
    assert_refused("a client registers", &a, 403);
    assert_eq!(a.body["error"]["code"], "forbidden");
    let a = register(
        &gw,
        "client",
        register_body(Some(session.as_str()), &["alpha"]),
    )
    .await;
    assert_refused("a client registers alice's session", &a, 403);
    let a = heartbeat(&gw, "client", session.as_str()).await;
    assert_refused("a client heartbeats", &a, 403);
    let a = stream_status(&gw, "client", session.as_str()).await;
    assert_refused("a client opens a stream", &a, 403);
    let forged = TaskResult::Chunk {
        data: "forged".into(),
        done: true,
        seq: None,
    };
    let a = post_result(&gw, "client", session.as_str(), &task, &forged).await;
    assert_refused("a client posts a result", &a, 403);
    let a = ws_refusal(&gw, Some(auth("client"))).await;
    assert_refused("a client upgrades to a WebSocket", &a, 403);

    // A publisher-only principal cannot call LLMs (`infer` needs the client role).
    let chat_body = json!({"model": "alpha", "messages": [{"role": "user", "content": "x"}]});
    for url in [
        format!("{}/v1/chat/completions", gw.url),
        format!("{}/alpha/infer", base(&gw)),
    ] {
        let response = http()
            .post(&url)
            .header("authorization", auth("mallory"))
            .json(&chat_body)
            .send()
            .await
            .unwrap();
        assert_refused(
            &format!("a publisher calls {url}"),
            &answer(response).await,
            403,
        );
    }

    assert_eq!(snapshot(&gw, &[&session]).await, before, "nothing changed");
    gated.release();
    assert_eq!(chat.await.unwrap(), "firstsecond", "the task completes");
    p.stop().await;
}

// ---------------------------------------------------------------------------------
// Ownership: another publisher and alice's session, names, channel and tasks.
// ---------------------------------------------------------------------------------

/// Mallory, a publisher holding alice's session id and task id, tries everything over
/// HTTP and over a socket of her own: register alice's names or session, heartbeat
/// it, bind it, post results for alice's task. Each is refused (or, for a register
/// naming alice's session with names of her own, answered with a fresh session);
/// alice's rows, channel and task are untouched, and the task completes. After it,
/// mallory's replay is a 404 (she learns nothing), alice's own a 409.
async fn another_publisher_cannot_use_a_session_it_does_not_own(t: &dyn Transport) {
    let gw = TestGateway::start(Config::default()).await;
    let gated = Arc::new(Gated::default());
    let p = gw
        .publish(t, "alice", &["alpha", "beta"], gated.clone())
        .await;
    let session = p.connected().await;
    let chat = start_chat(&gw, "alpha");
    let task = gated.task_id().await;
    let before = snapshot(&gw, &[&session]).await;

    // Over HTTP.
    let a = register(
        &gw,
        "mallory",
        register_body(Some(session.as_str()), &["alpha"]),
    )
    .await;
    assert_refused("mallory registers alice's name with her session", &a, 409);
    assert_eq!(a.body["error"]["conflicts"][0]["reason"], "ownedByAnother");
    let a = register(&gw, "mallory", register_body(None, &["beta", "mallory-1"])).await;
    assert_refused("mallory registers one of alice's names", &a, 409);
    assert_eq!(
        a.body["error"]["conflicts"],
        json!([{"name": "beta", "reason": "ownedByAnother"}]),
        "only the conflicting name is named"
    );
    let a = heartbeat(&gw, "mallory", session.as_str()).await;
    assert_refused("mallory heartbeats alice's session", &a, 404);
    assert_eq!(a.body["error"]["code"], "unknown_session");
    let a = stream_status(&gw, "mallory", session.as_str()).await;
    assert_refused("mallory binds alice's session", &a, 404);
    let forged = TaskResult::Chunk {
        data: "forged".into(),
        done: true,
        seq: None,
    };
    let a = post_result(&gw, "mallory", session.as_str(), &task, &forged).await;
    assert_refused("mallory posts a result for alice's task", &a, 404);
    assert_eq!(a.body["error"]["code"], "unknown_task");

    // Over a socket: a register naming alice's session and names is refused...
    let mut s = socket(&gw, "mallory").await;
    send(&mut s, ws_register(Some(session.as_str()), &["alpha"])).await;
    let refused = next(&mut s).await.unwrap();
    assert_eq!(
        (refused["type"].as_str(), refused["status"].as_u64()),
        (Some("refused"), Some(409)),
        "{refused}"
    );
    assert!(next(&mut s).await.is_none(), "then the socket closes");
    assert_eq!(snapshot(&gw, &[&session]).await, before, "nothing changed");

    // ...and one naming alice's session with a name of mallory's own gets a fresh
    // session: it never binds alice's. Her forged results go nowhere, and a heartbeat
    // for alice's session closes her socket.
    let mut s = socket(&gw, "mallory").await;
    send(&mut s, ws_register(Some(session.as_str()), &["mallory-ws"])).await;
    let registered = next(&mut s).await.unwrap();
    assert_eq!(registered["type"], "registered", "{registered}");
    let mallory_session = registered["providerSessionId"].as_str().unwrap().to_owned();
    assert_ne!(mallory_session, session.as_str(), "a fresh session");
    for frame in [
        json!({"type": "chunk", "taskId": task, "data": "forged", "done": false}),
        json!({"type": "result", "taskId": task, "status": 200, "body": {"forged": true}}),
        json!({"type": "error", "taskId": task, "message": "forged"}),
    ] {
        send(&mut s, frame).await;
    }
    send(
        &mut s,
        json!({"type": "heartbeat", "providerSessionId": session}),
    )
    .await;
    let error = next(&mut s).await.unwrap();
    assert_eq!(error["type"], "error", "{error}");
    assert!(next(&mut s).await.is_none(), "then the socket closes");
    let mallory_row = gw
        .gateway
        .store()
        .get(&"mallory-ws".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mallory_row.owner, "mallory");
    assert_eq!(
        mallory_row
            .provider_session_id
            .as_ref()
            .map(SessionId::as_str),
        Some(mallory_session.as_str())
    );
    // A register over HTTP naming alice's session, with a name of mallory's own: the
    // same, a fresh session.
    let a = register(
        &gw,
        "mallory",
        register_body(Some(session.as_str()), &["mallory-2"]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_ne!(
        a.body["providerSessionId"],
        session.as_str(),
        "a fresh session"
    );

    // Alice's rows, channel and task are as they were; only mallory's rows are new.
    let mut after = snapshot(&gw, &[&session]).await;
    after.rows.retain(|r| r.owner == "alice");
    let mut expected = before;
    expected.view = Value::Null;
    after.view = Value::Null;
    assert_eq!(after, expected, "alice's rows, channel and task untouched");

    gated.release();
    assert_eq!(
        chat.await.unwrap(),
        "firstsecond",
        "the genuine answer, untouched by the forgeries"
    );
    let replay = TaskResult::Chunk {
        data: "again".into(),
        done: true,
        seq: None,
    };
    let a = post_result(&gw, "mallory", session.as_str(), &task, &replay).await;
    assert_refused("mallory replays alice's finished task", &a, 404);
    assert_eq!(
        a.body["error"]["code"], "unknown_task",
        "another principal learns nothing about alice's tasks"
    );
    let a = post_result(&gw, "alice", session.as_str(), &task, &replay).await;
    assert_refused("alice replays her finished task", &a, 409);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_publisher_cannot_use_a_session_it_does_not_own_sse() {
    another_publisher_cannot_use_a_session_it_does_not_own(&Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_publisher_cannot_use_a_session_it_does_not_own_ws() {
    another_publisher_cannot_use_a_session_it_does_not_own(&Ws).await;
}

/// Alice's rows stay hers when she is gone: inactive rows (her publisher stopped) and
/// detached rows (she re-registered without them) are refused to mallory with 409 on
/// both transports and through a real publisher, even when mallory presents alice's
/// old session id. Nothing is written, and alice's sticky reconnect revives the same
/// rows.
async fn inactive_rows_are_never_adopted_by_another_principal(t: &dyn Transport) {
    let gw = TestGateway::start(Config::default()).await;
    let p = gw
        .publish(t, "alice", &["alpha"], Arc::new(EchoProvider::new()))
        .await;
    let session = p.connected().await;
    // A second session of alice's whose re-register drops `beta`: detached, inactive.
    let other = register(&gw, "alice", register_body(None, &["beta", "gamma"])).await;
    assert_eq!(other.status, 200, "{}", other.body);
    let other_session = other.body["providerSessionId"].as_str().unwrap().to_owned();
    let again = register(
        &gw,
        "alice",
        register_body(Some(&other_session), &["gamma"]),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.body);
    p.stop().await;
    eventually("alpha goes inactive", || async {
        gw.row_status("alpha").await == "inactive"
    })
    .await;
    assert_eq!(gw.row_status("beta").await, "inactive");
    let beta = gw
        .gateway
        .store()
        .get(&"beta".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(beta.provider_session_id, None, "beta is detached");
    let before = snapshot(&gw, &[&session]).await;

    for (names, presented) in [
        (vec!["alpha"], None),
        (vec!["alpha"], Some(session.as_str())),
        (vec!["beta"], None),
        (vec!["beta"], Some(other_session.as_str())),
        (vec!["mallory-1", "alpha"], None),
    ] {
        let a = register(&gw, "mallory", register_body(presented, &names)).await;
        assert_refused(&format!("mallory registers {names:?} over HTTP"), &a, 409);
        for c in a.body["error"]["conflicts"].as_array().unwrap() {
            assert_eq!(c["reason"], "ownedByAnother", "{c}");
        }
        let mut s = socket(&gw, "mallory").await;
        send(&mut s, ws_register(presented, &names)).await;
        let refused = next(&mut s).await.unwrap();
        assert_eq!(
            (refused["type"].as_str(), refused["status"].as_u64()),
            (Some("refused"), Some(409)),
            "mallory registers {names:?} over a socket: {refused}"
        );
        assert_eq!(snapshot(&gw, &[&session]).await, before, "nothing written");
    }
    // Through a real publisher: it never connects, and nothing is written.
    let wire = t.wire(&gw.url, Some(token("mallory")));
    let refused = wire
        .connect(serde_json::from_value(register_body(None, &["alpha"])).unwrap())
        .await;
    assert!(refused.is_err(), "mallory's publisher is refused");
    assert_eq!(snapshot(&gw, &[&session]).await, before, "nothing written");

    // Alice comes back with her session: the same rows, active again.
    let id = before
        .rows
        .iter()
        .find(|r| r.name.as_str() == "alpha")
        .unwrap()
        .id
        .clone();
    let a = register(
        &gw,
        "alice",
        register_body(Some(session.as_str()), &["alpha"]),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["providerSessionId"], session.as_str());
    assert_eq!(a.body["llms"][0]["id"], id.as_str(), "the same row");
    // And beta, detached, is adopted by alice's new session, never by mallory.
    let a = register(&gw, "alice", register_body(None, &["beta"])).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_rows_are_never_adopted_by_another_principal_sse() {
    inactive_rows_are_never_adopted_by_another_principal(&Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_rows_are_never_adopted_by_another_principal_ws() {
    inactive_rows_are_never_adopted_by_another_principal(&Ws).await;
}

/// A publisher's own session on a second channel (the same principal) replaces the
/// first, as SPEC §3 says, while another principal's attempt to bind it (an SSE stream
/// with alice's session id) is a 404 that leaves alice's channel bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_can_bind_its_session() {
    let gw = TestGateway::start(Config::default()).await;
    let p = gw
        .publish(&Sse, "alice", &["alpha"], Arc::new(EchoProvider::new()))
        .await;
    let session = p.connected().await;
    let generation = gw.gateway.channel_of(&session);
    assert!(generation.is_some());
    for who in ["mallory", "client"] {
        let a = stream_status(&gw, who, session.as_str()).await;
        assert!(a.status == 404 || a.status == 403, "{who}: {}", a.body);
        assert_eq!(gw.gateway.channel_of(&session), generation);
    }
    let (status, body) = gw.chat("client", "alpha", "still alice", false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "still alice");
    p.stop().await;
}

/// An admin holds every role (it publishes and calls) but no one else's rows: its
/// register of alice's inactive name is a 409 like anyone's, and alice's own
/// publisher cannot adopt the admin's rows either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_publishes_and_calls_but_adopts_no_one_elses_rows() {
    let tokens = virtual_llm::StaticTokens::new()
        .with(
            token("alice"),
            virtual_llm::Principal::new("alice", [virtual_llm::Role::Publisher]),
        )
        .with(
            token("root"),
            virtual_llm::Principal::new("root", [virtual_llm::Role::Admin]),
        );
    let gateway = virtual_llm::Gateway::builder(Arc::new(virtual_llm::MemoryStore::new()))
        .authenticator(Arc::new(tokens))
        .start()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let routes = virtual_llm::http::routes(
        gateway.clone(),
        [
            virtual_llm::sse::route(gateway.clone()),
            virtual_llm::ws::route(gateway.clone()),
        ],
    );
    let server = tokio::spawn(virtual_llm::http::serve(
        listener,
        routes,
        std::future::pending(),
        std::time::Duration::from_secs(1),
    ));
    let b = format!("{url}/api/v1/llms");
    let register = |who: &'static str, session: Option<String>, name: &'static str| {
        let b = b.clone();
        async move {
            let response = http()
                .post(format!("{b}/_provider-register"))
                .header("authorization", auth(who))
                .json(&register_body(session.as_deref(), &[name]))
                .send()
                .await
                .unwrap();
            answer(response).await
        }
    };
    // Alice registers and leaves her row behind, detached and inactive.
    let a = register("alice", None, "alpha").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let alice_session = a.body["providerSessionId"].as_str().unwrap().to_owned();
    let a = register("alice", Some(alice_session.clone()), "alice-2").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let before = gateway.store().list().await.unwrap();

    let a = register("root", None, "alpha").await;
    assert_refused("an admin registers alice's name", &a, 409);
    assert_eq!(a.body["error"]["conflicts"][0]["reason"], "ownedByAnother");
    let a = register("root", Some(alice_session.clone()), "alpha").await;
    assert_refused("an admin presents alice's session", &a, 409);
    let a = heartbeat_at(&b, "root", &alice_session).await;
    assert_refused("an admin heartbeats alice's session", &a, 404);
    assert_eq!(
        gateway.store().list().await.unwrap(),
        before,
        "nothing changed"
    );

    // The admin publishes a name of its own, and alice cannot take it.
    let a = register("root", None, "root-llm").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = register("alice", None, "root-llm").await;
    assert_refused("alice registers the admin's name", &a, 409);
    // And it may call LLMs (the client role): the name is known, its publisher has no
    // channel, so the answer is a 503, not a 403.
    let response = http()
        .post(format!("{url}/v1/chat/completions"))
        .header("authorization", auth("root"))
        .json(&json!({"model": "root-llm", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    server.abort();
}

async fn heartbeat_at(base: &str, who: &str, session: &str) -> Answer {
    let response = http()
        .post(format!("{base}/_provider-heartbeat"))
        .header("authorization", auth(who))
        .json(&json!({ "providerSessionId": session }))
        .send()
        .await
        .unwrap();
    answer(response).await
}

// ---------------------------------------------------------------------------------
// Ids.
// ---------------------------------------------------------------------------------

/// Records the id of every task it answers.
#[derive(Debug, Default)]
struct Recording {
    ids: Mutex<Vec<TaskId>>,
    echo: EchoProvider,
}

#[async_trait]
impl Provider for Recording {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.ids.lock().unwrap().push(task.task_id.clone());
        self.echo.infer(task).await
    }
}

/// `prefix` then 32 lowercase hex digits (128 bits), all distinct, and every one of
/// the 32 digits takes several values across the sample: no counter, no timestamp,
/// no constant part.
fn assert_random_ids(what: &str, prefix: &str, ids: &[String]) {
    assert!(ids.len() >= 100, "{what}: sample too small");
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{what}: ids repeat");
    for id in ids {
        let hex = id
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{what}: {id} lacks {prefix}"));
        assert_eq!(hex.len(), 32, "{what}: {id} is not 128 bits");
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{what}: {id} is not lowercase hex"
        );
    }
    for position in 0..32 {
        let values: HashSet<u8> = ids
            .iter()
            .map(|id| id.as_bytes()[prefix.len() + position])
            .collect();
        assert!(
            values.len() >= 8,
            "{what}: hex digit {position} takes only {} values over {} ids",
            values.len(),
            ids.len()
        );
    }
}

/// Session ids, task ids and row ids carry 128 random bits, on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_task_and_row_ids_carry_128_random_bits() {
    // 150 sessions of one principal: over the default maxSessions (64).
    let config = Config {
        limits: virtual_llm::limits::Limits {
            max_sessions: Some(1000),
            ..Default::default()
        },
        ..Config::default()
    };
    let gw = TestGateway::start(config).await;
    let mut sessions = Vec::new();
    let mut rows = Vec::new();
    for i in 0..150 {
        let a = register(&gw, "alice", register_body(None, &[&format!("llm-{i}")])).await;
        assert_eq!(a.status, 200, "{}", a.body);
        sessions.push(a.body["providerSessionId"].as_str().unwrap().to_owned());
        rows.push(a.body["llms"][0]["id"].as_str().unwrap().to_owned());
    }
    let mut s = socket(&gw, "mallory").await;
    send(&mut s, ws_register(None, &["ws-llm"])).await;
    let registered = next(&mut s).await.unwrap();
    sessions.push(registered["providerSessionId"].as_str().unwrap().to_owned());
    assert_random_ids("session ids", "ses_", &sessions);
    assert_random_ids("row ids", "llm_", &rows);

    let mut tasks = Vec::new();
    for (t, name) in [(&Sse as &dyn Transport, "rec-sse"), (&Ws, "rec-ws")] {
        let recording = Arc::new(Recording::default());
        let p = gw.publish(t, "alice", &[name], recording.clone()).await;
        for i in 0..75 {
            let text = format!("q{i}");
            if i % 2 == 0 {
                let (status, body) = gw.chat("client", name, &text, false).await;
                assert_eq!(status, 200, "{body}");
            } else {
                assert_eq!(
                    gw.chat_stream("client", name, &text).await.text().await,
                    text
                );
            }
        }
        p.stop().await;
        let replica = gw.gateway.replica().clone();
        tasks.extend(recording.ids.lock().unwrap().iter().map(|id| {
            // A task id ends with the replica that started it; the rest is random.
            assert_eq!(id.replica().as_ref(), Some(&replica), "{id}");
            let suffix = format!("_{replica}");
            id.as_str()
                .strip_suffix(&suffix)
                .unwrap_or_else(|| panic!("{id} does not end with {suffix}"))
                .to_owned()
        }));
    }
    assert_random_ids("task ids", "task_", &tasks);
}
