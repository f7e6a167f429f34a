//! The gateway served on worker runtimes (`ServeOptions::workers`, the reference
//! gateway's default): each connection and its tasks stay on one single-threaded
//! runtime, so a client's request and the publisher's session that answers it are
//! often on two threads. Whole answers, streams, many clients at once and a client
//! leaving mid-stream, on both transports.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use virtual_llm::http::{ServeOptions, Workers};
use virtual_llm::testkit::*;
use virtual_llm::{Config, EchoProvider};

/// A gateway whose connections are served on two workers (returned: they stop when
/// dropped).
async fn on_workers() -> (TestGateway, Workers) {
    let workers = Workers::start(2).unwrap();
    let mut options = ServeOptions::default();
    options.workers = workers.handles();
    (
        TestGateway::start_serving(Config::default(), options).await,
        workers,
    )
}

async fn many_clients_get_their_own_answers(t: &dyn Transport) {
    let (gw, _workers) = on_workers().await;
    let gw = Arc::new(gw);
    let p = gw
        .publish(t, "alice", &["echo"], Arc::new(EchoProvider::new()))
        .await;
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let text = format!("client {i} asks");
                let answer = if i % 2 == 0 {
                    let (status, body) = gw.chat("client", "echo", &text, false).await;
                    assert_eq!(status, 200, "{body}");
                    body["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                } else {
                    gw.chat_stream("client", "echo", &text).await.text().await
                };
                (text, answer)
            })
        })
        .collect();
    for c in clients {
        let (asked, answered) = c.await.unwrap();
        assert_eq!(asked, answered);
    }
    assert_eq!(gw.gateway.in_flight(), 0);
    p.stop().await;
}

async fn a_client_leaving_cancels_the_provider(t: &dyn Transport) {
    let (gw, _workers) = on_workers().await;
    let hanging = Arc::new(Hanging::default());
    let p = gw.publish(t, "alice", &["slow"], hanging.clone()).await;
    let notified = hanging.dropped.notified();
    let mut stream = gw.chat_stream("client", "slow", "x").await;
    assert!(
        stream.next_data().await.is_some(),
        "the first chunk arrives"
    );
    drop(stream);
    notified.await;
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

macro_rules! on_both_transports {
    ($($case:ident,)*) => {
        mod sse {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(&SseTransport).await; } )*
        }
        mod ws {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(&WsTransport).await; } )*
        }
    };
}

on_both_transports! {
    many_clients_get_their_own_answers,
    a_client_leaving_cancels_the_provider,
}
