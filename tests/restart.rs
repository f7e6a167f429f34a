//! The reference gateway binary keeps its registry across restarts: after SIGKILL the
//! redb file reopens, no virtual row reads active until its publisher is back, and the
//! publisher comes back with its session to the same rows; after SIGTERM the gateway
//! tells publishers it is closing, flushes, and they reconnect on their own.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use virtual_llm::protocol::LlmSpec;
use virtual_llm::publisher::{PublisherState, Wire};
use virtual_llm::{EchoProvider, LlmName, PublishedLlm, Publisher, PublisherOptions, SessionId};

/// The gateway example, built next to this test by `cargo test`.
fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds it; with a target filter run `cargo build --examples` first",
        binary.display()
    );
    binary
}

struct GatewayProcess(Child);

impl GatewayProcess {
    fn start(addr: SocketAddr, data: &Path) -> Self {
        let child = Command::new(gateway_binary())
            .args([
                "--listen",
                &addr.to_string(),
                "--data-dir",
                data.to_str().unwrap(),
                "--grace",
                "2s",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        GatewayProcess(child)
    }

    fn sigkill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    fn sigterm(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.0.wait().unwrap();
        assert!(exit.success(), "a SIGTERM'd gateway exits cleanly: {exit}");
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("gateway already gone: {e}");
        }
        if let Err(e) = self.0.wait() {
            eprintln!("could not reap the gateway: {e}");
        }
    }
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn ready(url: &str) {
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if http
            .get(format!("{url}/v1/models"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway did not come up at {url}");
}

async fn row(url: &str, name: &str) -> Value {
    let response = reqwest::get(format!("{url}/api/v1/llms/{name}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

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

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

fn temp_dir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("virtual-llm-restart-{}", SessionId::generate()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
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
