//! The reference gateway binary keeps its registry across restarts: after SIGKILL the
//! redb file reopens, no virtual row reads active until its publisher is back, and the
//! publisher comes back with its session to the same rows; after SIGTERM the gateway
//! tells publishers it is closing, flushes, and they reconnect on their own.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use binary::{GatewayProcess, free_addr, ready, row, temp_dir};
use serde_json::Value;
use virtual_llm::protocol::LlmSpec;
use virtual_llm::publisher::{PublisherState, Wire};
use virtual_llm::{EchoProvider, LlmName, PublishedLlm, Publisher, PublisherOptions, SessionId};

fn publisher(wire: Arc<dyn Wire>, session_file: &Path) -> Publisher {
    let llm = PublishedLlm {
        spec: LlmSpec {
            name: LlmName::parse("echo").unwrap(),
            provider_type: "echo".into(),
            model: "echo".into(),
            tier: None,
        },
        provider: Arc::new(EchoProvider::new()),
    };
    let options = PublisherOptions {
        session_file: Some(session_file.to_owned()),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
        ..PublisherOptions::default()
    };
    Publisher::spawn(wire, vec![llm], options)
}

async fn connected(p: &Publisher) -> SessionId {
    tokio::time::timeout(Duration::from_secs(10), p.connected())
        .await
        .expect("the publisher connects")
}

async fn answer(url: &str) -> String {
    let body = serde_json::json!({"model": "echo", "messages": [{"role": "user", "content": "still here"}]});
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn survives_sigkill(make_wire: fn(&str) -> Arc<dyn Wire>) {
    let dir = temp_dir();
    let (addr, data, session_file) = (free_addr(), dir.0.join("data"), dir.0.join("session"));
    let url = format!("http://{addr}");
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    let p = publisher(make_wire(&url), &session_file);
    let session = connected(&p).await;
    let before = row(&url, "echo").await;
    assert_eq!(before["status"], "active");

    gateway.sigkill();
    p.stop().await; // it cannot tell the dead gateway; the row stays "active" on disk
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    let after = row(&url, "echo").await;
    assert_eq!(after["id"], before["id"], "the row survived the SIGKILL");
    assert_eq!(
        after["status"], "inactive",
        "no virtual row reads active after a restart"
    );

    let p = publisher(make_wire(&url), &session_file);
    assert_eq!(
        connected(&p).await,
        session,
        "the publisher comes back with its session"
    );
    let revived = row(&url, "echo").await;
    assert_eq!(
        (&revived["id"], &revived["status"]),
        (&before["id"], &Value::from("active"))
    );
    assert_eq!(answer(&url).await, "still here");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for line in [
        "virtual_llm_publishers_connected 1",
        "virtual_llm_task_outcomes_total{code=\"ok\"} 1",
        "virtual_llm_rows{kind=\"virtual\",status=\"active\"} 1",
    ] {
        assert!(text.contains(line), "/metrics lacks {line}:\n{text}");
    }
    p.stop().await;
    drop(gateway);
}

async fn survives_sigterm(make_wire: fn(&str) -> Arc<dyn Wire>) {
    let dir = temp_dir();
    let (addr, data, session_file) = (free_addr(), dir.0.join("data"), dir.0.join("session"));
    let url = format!("http://{addr}");
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    let p = publisher(make_wire(&url), &session_file);
    let session = connected(&p).await;
    let id = row(&url, "echo").await["id"].clone();
    let mut state = p.state();

    gateway.sigterm();
    state
        .wait_for(|s| !matches!(s, PublisherState::Connected { .. }))
        .await
        .unwrap();
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    // The publisher was told the gateway was closing, and reconnects by itself.
    state
        .wait_for(|s| matches!(s, PublisherState::Connected { .. }))
        .await
        .unwrap();
    assert_eq!(connected(&p).await, session);
    let revived = row(&url, "echo").await;
    assert_eq!(
        (&revived["id"], &revived["status"]),
        (&id, &Value::from("active"))
    );
    assert_eq!(answer(&url).await, "still here");
    p.stop().await;
    drop(gateway);
}

fn sse(url: &str) -> Arc<dyn Wire> {
    Arc::new(virtual_llm::sse::SseWire::new(url, None).unwrap())
}

fn ws(url: &str) -> Arc<dyn Wire> {
    Arc::new(virtual_llm::ws::WsWire::new(url, None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_sigkill_over_sse() {
    survives_sigkill(sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_sigkill_over_ws() {
    survives_sigkill(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_come_back_after_a_sigterm_over_sse() {
    survives_sigterm(sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_come_back_after_a_sigterm_over_ws() {
    survives_sigterm(ws).await;
}
