//! Discovery (SPEC §17): a publisher built on `OpenAiCatalog` publishes every model its
//! upstream lists at `GET {url}/models`, named prefix + id, and re-reads the list every
//! heartbeat: a model that appears is published and served, one that goes is dropped
//! from the session's register (its row goes inactive). Over both transports, against
//! a fake OpenAI-compatible upstream whose list the test changes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use virtual_llm::openai::{OpenAiCatalog, OpenAiUpstream};
use virtual_llm::testkit::{SseTransport, TestGateway, Transport, WsTransport, eventually, token};
use virtual_llm::{Config, Publisher, PublisherOptions};
use warp::Filter;

/// A fake OpenAI-compatible server: lists `models` (counting the `reads`), answers a chat with the model it
/// was asked for.
async fn upstream(models: Arc<Mutex<Vec<&'static str>>>, reads: Arc<AtomicUsize>) -> SocketAddr {
    let list = warp::path!("v1" / "models").and(warp::get()).map(move || {
        reads.fetch_add(1, Ordering::SeqCst);
        let data: Vec<Value> = models
            .lock()
            .unwrap()
            .iter()
            .map(|id| json!({"id": id, "object": "model", "owned_by": "test"}))
            .collect();
        warp::reply::json(&json!({"object": "list", "data": data}))
    });
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(warp::body::json::<Value>())
        .map(|body: Value| {
            warp::reply::json(&json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": format!("served by {}", body["model"].as_str().unwrap())}}],
            }))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(list.or(chat)).incoming(listener).run());
    addr
}

async fn status(gw: &TestGateway, name: &str) -> Option<String> {
    let (code, row) = gw.get_registry("client", &format!("/{name}")).await;
    (code == 200).then(|| row["status"].as_str().unwrap().to_owned())
}

async fn models_appear_and_go(t: &dyn Transport) {
    let models = Arc::new(Mutex::new(vec!["m1", "org/m2"]));
    let reads = Arc::new(AtomicUsize::new(0));
    let addr = upstream(models.clone(), reads.clone()).await;
    let config = Config {
        heartbeat_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let gw = TestGateway::start_for(t, config).await;
    let catalog = OpenAiCatalog::new(
        OpenAiUpstream::new(&format!("http://{addr}/v1")).unwrap(),
        "box/",
    );
    let publisher = Publisher::spawn_discovering(
        t.wire(&gw.publisher_url, Some(token("alice"))),
        Arc::new(catalog),
        PublisherOptions::default(),
    );
    tokio::time::timeout(Duration::from_secs(10), publisher.connected())
        .await
        .expect("the publisher connects");
    assert_eq!(status(&gw, "box/m1").await.as_deref(), Some("active"));
    assert_eq!(status(&gw, "box/org/m2").await.as_deref(), Some("active"));
    let (code, answer) = gw.chat("client", "box/org/m2", "hi", false).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "served by org/m2",
        "the upstream is asked for its own model id"
    );

    // A model appears, another goes.
    *models.lock().unwrap() = vec!["m1", "m3 q4"];
    eventually("the new model is published", || async {
        status(&gw, "box/m3-q4").await.as_deref() == Some("active")
    })
    .await;
    eventually("the model that went is dropped", || async {
        status(&gw, "box/org/m2").await.as_deref() == Some("inactive")
    })
    .await;
    // The new set is registered (its rows read active) before the publisher's new
    // channel is bound: it is served once the publisher is connected again.
    tokio::time::timeout(Duration::from_secs(10), publisher.connected())
        .await
        .expect("the publisher connects again");
    assert_eq!(status(&gw, "box/m1").await.as_deref(), Some("active"));
    let (code, answer) = gw.chat("client", "box/m3-q4", "hi", false).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "served by m3 q4"
    );
    let (code, _) = gw.chat("client", "box/org/m2", "hi", false).await;
    assert_eq!(code, 503, "a dropped model is not served");
    let row = gw.row("box/org/m2").await;
    assert!(row["inactiveSince"].is_string(), "{row}");

    // An empty list (the server restarting) drops nothing.
    models.lock().unwrap().clear();
    let session = publisher.connected().await;
    let before = reads.load(Ordering::SeqCst);
    eventually("the empty list is read three times", || async {
        reads.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    assert_eq!(publisher.connected().await, session);
    assert_eq!(status(&gw, "box/m1").await.as_deref(), Some("active"));
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_models_appear_and_go_over_sse() {
    models_appear_and_go(&SseTransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_models_appear_and_go_over_ws() {
    models_appear_and_go(&WsTransport).await;
}
