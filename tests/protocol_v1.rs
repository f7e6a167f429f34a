//! Wire compatibility: a version 1 publisher, speaking exactly what version 1 spoke,
//! still works against this gateway on both transports, and is sent nothing new — the
//! register answer, the SSE `hello` and the WebSocket `registered` carry exactly the
//! version 1 fields, and its chunks without `seq` are relayed as they come; it is sent
//! no completions or embeddings task (the client gets a 400 saying why). A version 2
//! publisher is answered in version 2, and its task frames name their endpoint.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use virtual_llm::{Gateway, MemoryStore};

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

const V1_ANSWER: [&str; 3] = ["heartbeatIntervalMs", "llms", "providerSessionId"];
const V1_HELLO: [&str; 2] = ["heartbeatIntervalMs", "providerSessionId"];

struct Served {
    url: String,
    gateway: Gateway,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve() -> Served {
    let gateway = Gateway::builder(Arc::new(MemoryStore::new()))
        .start()
        .await
        .unwrap();
    let routes = virtual_llm::http::routes(
        gateway.clone(),
        [
            virtual_llm::sse::route(gateway.clone()),
            virtual_llm::ws::route(gateway.clone()),
        ],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(virtual_llm::http::serve(
        listener,
        routes,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    Served {
        url,
        gateway,
        _stop: stop,
    }
}

/// A client's streamed chat request to `model`, answered in the background: the whole
/// body, once the stream ends.
fn stream_in_background(url: &str, model: &str) -> tokio::task::JoinHandle<String> {
    let (url, model) = (url.to_owned(), model.to_owned());
    tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

fn register_v1(name: &str) -> Value {
    // Byte for byte what a version 1 publisher sent: no protocolVersion.
    json!({"llms": [{"name": name, "type": "openai", "model": "m"}]})
}

type Body = std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Reads SSE events from a response until `want` events arrived; the rest of the body
/// is handed back, so the channel stays open while the caller holds it.
async fn read_events(response: reqwest::Response, want: usize) -> (Vec<(String, String)>, Body) {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut body: Body = Box::pin(response.bytes_stream());
    while events.len() < want {
        let bytes = body.next().await.unwrap().unwrap();
        buffer.push_str(std::str::from_utf8(&bytes).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !data.is_empty() {
                events.push((event, data));
            }
        }
    }
    (events, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_sse_publisher_is_sent_only_version_1_frames() {
    let gw = serve().await;
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/llms", gw.url);
    let answer: Value = http
        .post(format!("{base}/_provider-register"))
        .json(&register_v1("old-sse"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(keys(&answer), V1_ANSWER, "{answer}");
    let session = answer["providerSessionId"].as_str().unwrap().to_owned();
    // Opened as version 1 did: no protocol header.
    let stream = http
        .get(format!("{base}/_provider-stream"))
        .header("x-provider-session", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let client = stream_in_background(&gw.url, "old-sse");
    let (events, _open) = read_events(stream, 2).await;
    assert_eq!(events[0].0, "hello");
    let hello: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(keys(&hello), V1_HELLO, "a v1 hello: {hello}");
    assert_eq!(events[1].0, "task");
    let task: Value = serde_json::from_str(&events[1].1).unwrap();
    assert_eq!(
        keys(&task),
        ["body", "kind", "llm", "stream", "taskId"],
        "a v1 task frame: {task}"
    );
    let task_id = task["taskId"].as_str().unwrap();
    // Version 1 chunks: no seq.
    let ndjson = [
        json!({"chunk": {"data": "{\"choices\":[{\"delta\":{\"content\":\"v1\"}}]}"}}),
        json!({"chunk": {"data": "", "done": true}}),
    ]
    .iter()
    .map(|v| format!("{v}\n"))
    .collect::<String>();
    let posted = http
        .post(format!("{base}/_provider-task/{task_id}/result"))
        .header("x-provider-session", &session)
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .unwrap();
    let status = posted.status();
    assert_eq!(status, 204, "{}", posted.text().await.unwrap());
    let body = client.await.unwrap();
    assert!(body.contains("\"content\":\"v1\""), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(gw.gateway.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_ws_publisher_is_sent_only_version_1_frames() {
    let gw = serve().await;
    let url = format!(
        "{}/api/v1/llms/_provider-ws",
        gw.url.replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut register = register_v1("old-ws");
    register["type"] = json!("register");
    socket
        .send(Message::text(register.to_string()))
        .await
        .unwrap();
    let registered: Value = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(t) => break serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(registered["type"], "registered");
    let mut fields = registered.clone();
    fields.as_object_mut().unwrap().remove("type");
    assert_eq!(keys(&fields), V1_ANSWER, "a v1 registered: {registered}");
    let session = registered["providerSessionId"].as_str().unwrap().to_owned();
    for _ in 0..500 {
        if gw
            .gateway
            .is_bound(&virtual_llm::SessionId::parse(&session).unwrap())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = stream_in_background(&gw.url, "old-ws");
    let task: Value = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(t) => break serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(task["type"], "task");
    let task_id = task["taskId"].as_str().unwrap().to_owned();
    for frame in [
        json!({"type": "chunk", "taskId": task_id, "data": "{\"choices\":[{\"delta\":{\"content\":\"v1\"}}]}"}),
        json!({"type": "chunk", "taskId": task_id, "data": "", "done": true}),
    ] {
        socket.send(Message::text(frame.to_string())).await.unwrap();
    }
    let body = client.await.unwrap();
    assert!(body.contains("\"content\":\"v1\""), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_publisher_is_answered_in_version_2_and_an_unknown_one_is_426() {
    let gw = serve().await;
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/llms", gw.url);
    let mut v2 = register_v1("new");
    v2["protocolVersion"] = json!(2);
    let answer: Value = http
        .post(format!("{base}/_provider-register"))
        .json(&v2)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["protocolVersion"], 2, "{answer}");
    let session = answer["providerSessionId"].as_str().unwrap().to_owned();
    let stream = http
        .get(format!("{base}/_provider-stream"))
        .header("x-provider-session", &session)
        .header("x-provider-protocol", "2")
        .send()
        .await
        .unwrap();
    let (events, _open) = read_events(stream, 1).await;
    let hello: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(hello["protocolVersion"], 2, "{hello}");
    assert!(hello["keepAliveMs"].is_u64(), "{hello}");
    for unknown in [0, 3] {
        let mut bad = register_v1("newer");
        bad["protocolVersion"] = json!(unknown);
        let refused = http
            .post(format!("{base}/_provider-register"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 426, "version {unknown}");
    }
    let refused = http
        .get(format!("{base}/_provider-stream"))
        .header("x-provider-session", &session)
        .header("x-provider-protocol", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 426);
}

/// A client's `endpoint` request to `model`, answered in the background: status and
/// body.
fn call_in_background(url: &str, path: &str, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = format!("{url}{path}");
    tokio::spawn(async move {
        let response = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_publisher_is_sent_no_completions_or_embeddings_task() {
    let gw = serve().await;
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/llms", gw.url);
    let answer: Value = http
        .post(format!("{base}/_provider-register"))
        .json(&register_v1("old-chat-only"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = answer["providerSessionId"].as_str().unwrap().to_owned();
    let stream = http
        .get(format!("{base}/_provider-stream"))
        .header("x-provider-session", &session)
        .send()
        .await
        .unwrap();
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"model": "old-chat-only", "input": "x"}),
        ),
        (
            "/v1/completions",
            json!({"model": "old-chat-only", "prompt": "x", "stream": true}),
        ),
    ] {
        let (status, error) = call_in_background(&gw.url, path, body).await.unwrap();
        assert_eq!(status, 400, "{path}: {error}");
        assert_eq!(error["error"]["code"], "unsupported_endpoint", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("old-chat-only") && message.contains("protocol version 1"),
            "{message}"
        );
    }
    // The next task the publisher sees is the chat request that follows: nothing was
    // sent for the two refused ones.
    let client = stream_in_background(&gw.url, "old-chat-only");
    let (events, _open) = read_events(stream, 2).await;
    assert_eq!(events[1].0, "task");
    let task: Value = serde_json::from_str(&events[1].1).unwrap();
    assert!(task["body"]["messages"].is_array(), "{task}");
    assert_eq!(task.get("endpoint"), None, "{task}");
    client.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_publisher_is_sent_the_endpoint() {
    let gw = serve().await;
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/llms", gw.url);
    let mut register = register_v1("new-embedder");
    register["protocolVersion"] = json!(2);
    let answer: Value = http
        .post(format!("{base}/_provider-register"))
        .json(&register)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = answer["providerSessionId"].as_str().unwrap().to_owned();
    let stream = http
        .get(format!("{base}/_provider-stream"))
        .header("x-provider-session", &session)
        .header("x-provider-protocol", "2")
        .send()
        .await
        .unwrap();
    let client = call_in_background(
        &gw.url,
        "/v1/embeddings",
        json!({"model": "new-embedder", "input": ["x"]}),
    );
    let (events, _open) = read_events(stream, 2).await;
    assert_eq!(events[1].0, "task");
    let task: Value = serde_json::from_str(&events[1].1).unwrap();
    assert_eq!(task["endpoint"], "embeddings", "{task}");
    assert_eq!(task["stream"], false, "{task}");
    let task_id = task["taskId"].as_str().unwrap();
    let result = json!({"status": 200, "body": {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [1.0]}], "model": "new-embedder", "usage": {"prompt_tokens": 1, "total_tokens": 1}}});
    let posted = http
        .post(format!("{base}/_provider-task/{task_id}/result"))
        .header("x-provider-session", &session)
        .json(&result)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 204);
    let (status, body) = client.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["embedding"], json!([1.0]), "{body}");
}
