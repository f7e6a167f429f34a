//! Whole answers of several tasks in one request (`POST {base}/_provider-results`,
//! capability `resultBatches`): granted only to a protocol 2 publisher that declares
//! it; each task's answer reaches its own client; a bad line refuses the whole request
//! and delivers nothing; another session's task, an unknown task and a finished one
//! are refused one by one, the others delivered.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use virtual_llm::protocol::{RESULT_BATCHES, TaskFrame};
use virtual_llm::testkit::socket::auth;
use virtual_llm::testkit::{Counting, SseTransport, TestGateway};
use virtual_llm::{Config, Error, Provider, Reply, TaskId};

const SESSION: &str = virtual_llm::protocol::SESSION_HEADER;

/// Hands each task's id to the test and never answers: the test answers by hand.
#[derive(Debug)]
struct Held(mpsc::UnboundedSender<TaskId>);

#[async_trait]
impl Provider for Held {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let _ = self.0.send(task.task_id.clone());
        std::future::pending().await
    }
}

fn base(gw: &TestGateway) -> String {
    format!("{}{}", gw.url, gw.gateway.config().base_path)
}

/// Posts `lines` as a batch; the status and the JSON answer.
async fn post_batch(
    gw: &TestGateway,
    who: &str,
    session: Option<&str>,
    lines: &[Value],
) -> (u16, Value) {
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    post_raw_batch(gw, who, session, body).await
}

async fn post_raw_batch(
    gw: &TestGateway,
    who: &str,
    session: Option<&str>,
    body: String,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/_provider-results", base(gw)))
        .header("authorization", auth(who))
        .header("content-type", "application/x-ndjson")
        .body(body);
    if let Some(session) = session {
        request = request.header(SESSION, session);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn whole(task: &TaskId, text: &str) -> Value {
    json!({"type": "result", "taskId": task, "status": 200, "body": {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "alpha",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }})
}

fn refused(answer: &Value) -> Vec<(String, u64)> {
    let mut refused: Vec<(String, u64)> = answer["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["taskId"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    refused.sort();
    refused
}

/// Batches are granted to a protocol 2 publisher that asks, and to no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_granted_to_a_protocol_2_publisher_that_declares_them() {
    let gw = TestGateway::start(Config::default()).await;
    let llms = json!([{"name": "alpha", "type": "openai", "model": "m"}]);
    let granted = |answer: &Value| {
        answer["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == RESULT_BATCHES))
    };
    let asks = gw
        .register_raw(
            "alice",
            json!({"protocolVersion": 2, "llms": llms, "capabilities": [RESULT_BATCHES]}),
        )
        .await;
    assert!(granted(&asks), "{asks}");
    let session = asks["providerSessionId"].clone();
    let silent = gw
        .register_raw(
            "alice",
            json!({"providerSessionId": session, "protocolVersion": 2, "llms": llms}),
        )
        .await;
    assert!(!granted(&silent), "not declared: {silent}");
    let v1 = gw
        .register_raw(
            "alice",
            json!({"providerSessionId": session, "llms": llms, "capabilities": [RESULT_BATCHES]}),
        )
        .await;
    assert!(!granted(&v1), "protocol 1: {v1}");
}

/// Three clients wait on three tasks. Bad batches (a chunk line, a task twice, a
/// line that is no frame, no session, another principal) deliver nothing; a good one
/// answers two tasks and names the unknown task it refused; the same task again is
/// refused as finished; each client gets its own answer, and the third task waits on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_of_a_batch_is_answered_or_refused_on_its_own() {
    let gw = TestGateway::start(Config::default()).await;
    let (tx, mut tasks) = mpsc::unbounded_channel();
    let p = gw
        .publish(&SseTransport, "alice", &["alpha"], Arc::new(Held(tx)))
        .await;
    let session = p.connected().await;
    let session = session.as_str();
    let mut chats = Vec::new();
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        let gw = gw.clone_handle();
        chats.push(tokio::spawn(async move {
            gw.chat("client", "alpha", text, false).await
        }));
        ids.push(tasks.recv().await.unwrap());
    }
    let (t1, t2, t3) = (&ids[0], &ids[1], &ids[2]);

    // Refused whole: nothing of these reaches a client.
    let chunk = json!({"type": "chunk", "taskId": t2, "data": "{}", "done": true});
    let (status, body) =
        post_batch(&gw, "alice", Some(session), &[whole(t1, "forged"), chunk]).await;
    assert_eq!(status, 400, "a chunk in a batch: {body}");
    let (status, body) = post_batch(
        &gw,
        "alice",
        Some(session),
        &[whole(t1, "forged"), whole(t1, "again")],
    )
    .await;
    assert_eq!(status, 400, "a task twice: {body}");
    let mut informational = whole(t2, "forged");
    informational["status"] = json!(101);
    let (status, body) = post_batch(
        &gw,
        "alice",
        Some(session),
        &[whole(t1, "forged"), informational],
    )
    .await;
    assert_eq!(status, 400, "a status no answer has: {body}");
    let text = format!("{}\nnot json\n", whole(t1, "forged"));
    let (status, body) = post_raw_batch(&gw, "alice", Some(session), text).await;
    assert_eq!(status, 400, "a line that is no frame: {body}");
    let mut many: Vec<Value> = vec![whole(t1, "forged")];
    many.extend(
        (0..virtual_llm::protocol::MAX_BATCH_TASKS).map(|_| whole(&TaskId::generate(), "lost")),
    );
    let (status, body) = post_batch(&gw, "alice", Some(session), &many).await;
    assert_eq!(status, 400, "one task more than a batch carries: {body}");
    let (status, body) = post_batch(&gw, "alice", None, &[whole(t1, "forged")]).await;
    assert_eq!(status, 400, "no session: {body}");
    let (status, body) = post_batch(&gw, "nobody", Some(session), &[whole(t1, "forged")]).await;
    assert_eq!(status, 401, "no such token: {body}");
    let (status, body) = post_batch(&gw, "client", Some(session), &[whole(t1, "forged")]).await;
    assert_eq!(status, 403, "a client's token: {body}");
    // Another principal naming alice's session: each task refused, as unknown.
    let (status, body) = post_batch(&gw, "mallory", Some(session), &[whole(t1, "forged")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refused(&body), [(t1.to_string(), 404)], "{body}");
    assert!(
        chats.iter().all(|c| !c.is_finished()),
        "no client was answered"
    );

    // A good batch: two answers and a task nobody knows.
    let unknown = TaskId::generate();
    let failed = json!({"type": "error", "taskId": t2, "message": "the model crashed"});
    let (status, body) = post_batch(
        &gw,
        "alice",
        Some(session),
        &[whole(t1, "the answer"), failed, whole(&unknown, "lost")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refused(&body), [(unknown.to_string(), 404)], "{body}");
    let mut chats = chats.into_iter();
    let (status, answer) = chats.next().unwrap().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "the answer");
    let (status, answer) = chats.next().unwrap().await.unwrap();
    assert_eq!(status, 502, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the model crashed"),
        "{answer}"
    );

    // The same task again: finished.
    let (status, body) = post_batch(&gw, "alice", Some(session), &[whole(t1, "again")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(refused(&body), [(t1.to_string(), 409)], "{body}");
    let third = chats.next().unwrap();
    assert!(!third.is_finished(), "task {t3} was in no batch");
    third.abort();
    p.stop().await;
}

/// Through the reference SSE publisher: answers that are ready together (a held
/// provider, then opened) each reach their own client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_ready_together_each_reach_their_client_over_sse() {
    let gw = TestGateway::start(Config::default()).await;
    let counting = Arc::new(Counting::new(false));
    let p = gw
        .publish(&SseTransport, "alice", &["alpha"], counting.clone())
        .await;
    p.connected().await;
    let chats: Vec<_> = (0..16)
        .map(|i| {
            let gw = gw.clone_handle();
            tokio::spawn(async move {
                gw.chat("client", "alpha", &format!("question {i}"), false)
                    .await
            })
        })
        .collect();
    virtual_llm::testkit::eventually("every task reached the provider", || {
        let counting = counting.clone();
        async move { counting.holding() == 16 }
    })
    .await;
    counting.open();
    for (i, chat) in chats.into_iter().enumerate() {
        let (status, answer) = chat.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            format!("question {i}")
        );
    }
    p.stop().await;
}
