//! The access log (SPEC §16): one line per inference request under the target
//! `virtual_llm::access`, with the principal, model, status, duration and bytes, never
//! a body, and the client's text escaped. Alone in its test binary: the log subscriber
//! is the process's.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtual_llm::testkit::{SseTransport as Sse, TestGateway};
use virtual_llm::{Config, EchoProvider};

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn each_inference_request_writes_one_access_log_line_without_bodies() {
    let buffer = LogBuffer::default();
    let sink = buffer.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "off,{}=info",
            virtual_llm::http::ACCESS_LOG_TARGET
        )))
        .init();
    let gw = TestGateway::start(Config::default()).await;
    let _p = gw
        .publish(&Sse, "alice", &["open"], Arc::new(EchoProvider::new()))
        .await;
    let secret = "a prompt nobody may read in a log";
    assert_eq!(gw.chat("client", "open", secret, false).await.0, 200);
    let forged = "ghost\n2026-01-01T00:00:00Z INFO forged line";
    assert_eq!(gw.chat("client", forged, "hi", false).await.0, 400);
    let text = gw
        .chat_stream("client", "open", "one two three")
        .await
        .text()
        .await;
    assert!(text.contains("three"), "{text}");
    // The stream's line is written once the server drops the finished response.
    for _ in 0..500 {
        if buffer.text().lines().count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = buffer.text();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(
        lines.iter().all(|l| l.contains("virtual_llm::access")),
        "{log}"
    );
    assert!(
        lines[0].contains("principal=client")
            && lines[0].contains("model=open")
            && lines[0].contains("status=200")
            && lines[0].contains("stream=false"),
        "{log}"
    );
    let bytes: u64 = lines[0]
        .split("bytes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes > 0, "{log}");
    assert!(
        lines[1].contains("principal=client") && lines[1].contains("status=400"),
        "{log}"
    );
    assert!(
        lines[2].contains("stream=true") && lines[2].contains("status=200"),
        "{log}"
    );
    assert!(!log.contains(secret), "no body in the log: {log}");
}
