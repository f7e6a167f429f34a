//! Red-team F9: text a publisher controls reaches the gateway's log escaped. A
//! malformed WebSocket frame (whose parser error quotes it) and a task's error result
//! both carry a newline, a forged log line and terminal escapes; the log must show
//! them as escapes, on the line of the event that logged them.
//!
//! Its own test binary: it installs the process's global log subscriber.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::json;
use virtual_llm::protocol::TaskFrame;
use virtual_llm::testkit::socket::{next, send, socket};
use virtual_llm::testkit::{SseTransport, TestGateway};
use virtual_llm::{Config, Error, Provider, Reply};

/// A newline, then a line that looks like the gateway's own, then terminal escapes.
const EVIL: &str = "x\n2026-12-01T00:00:00.000000Z  INFO gateway: FORGED admin token accepted \u{1b}[2J\u{1b}]0;pwned\u{7}";

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A model whose publisher reports every task failed, with `EVIL` as the message.
#[derive(Debug)]
struct Failing;

#[async_trait]
impl Provider for Failing {
    async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
        Err(Error::Upstream {
            message: EVIL.to_owned(),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_text_reaches_the_log_escaped() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let gw = TestGateway::start(Config::default()).await;

    // A malformed frame: the parser's error quotes the unknown `type`.
    let mut s = socket(&gw, "alice").await;
    send(
        &mut s,
        json!({"type": "register", "llms": [{"name": "ws-llm", "type": "t", "model": "m"}]}),
    )
    .await;
    assert_eq!(next(&mut s).await.unwrap()["type"], "registered");
    send(&mut s, json!({ "type": EVIL })).await;
    assert_eq!(next(&mut s).await.unwrap()["type"], "error");
    assert!(next(&mut s).await.is_none(), "closed");

    // An error result: the client's 502 is logged with the publisher's message.
    let p = gw
        .publish(&SseTransport, "alice", &["evil"], Arc::new(Failing))
        .await;
    let (status, _) = gw.chat("client", "evil", "hi", false).await;
    assert_eq!(status, 502);
    p.stop().await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let carrying: Vec<&str> = log.lines().filter(|l| l.contains("FORGED")).collect();
    assert_eq!(
        carrying.len(),
        2,
        "both events logged the text, each on its own line:\n{log}"
    );
    for line in &carrying {
        assert!(
            !line.starts_with("2026-12-01T00:00:00.000000Z"),
            "a forged line:\n{log}"
        );
        assert!(
            line.contains("x\\n2026-12-01"),
            "the newline escaped: {line}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "no escape sequence reaches the log:\n{log}"
    );
}
