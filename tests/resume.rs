//! Resumable streams between the reference binaries (SPEC §15): the publisher binary
//! reaches the gateway binary through a TCP proxy that the test cuts, while a slow
//! upstream streams a 30-chunk answer. The client's stream pauses through the cut and
//! goes on, every chunk once and in order, over both transports.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use binary::{GatewayProcess, PublisherProcess, free_addr, poll_until, ready, temp_dir, try_row};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use virtual_llm::testkit::Proxy;
use warp::Filter;

const CAP: Duration = Duration::from_secs(30);
const CHUNKS: usize = 30;

/// An OpenAI-compatible upstream that lists model `m` and streams every chat
/// completion as `CHUNKS` chunks, `"0"`, `"1"`…, each only once the test adds a permit
/// to the semaphore it returns.
async fn paced_upstream() -> (SocketAddr, Arc<Semaphore>) {
    let allowed = Arc::new(Semaphore::new(0));
    let permits = allowed.clone();
    let models = warp::get()
        .and(warp::path!("v1" / "models"))
        .map(|| warp::reply::json(&json!({"object": "list", "data": [{"id": "m"}]})));
    let chat = warp::post()
        .and(warp::path!("v1" / "chat" / "completions"))
        .and(warp::body::bytes())
        .map(move |_body: bytes::Bytes| {
            let allowed = permits.clone();
            let chunks = futures::stream::iter(0..CHUNKS)
                .then(move |i| {
                    let allowed = allowed.clone();
                    async move {
                        if let Ok(permit) = allowed.acquire().await {
                            permit.forget();
                        }
                        let chunk = json!({
                            "id": "chatcmpl-paced", "object": "chat.completion.chunk",
                            "created": 0, "model": "m",
                            "choices": [{"index": 0, "delta": {"content": i.to_string()}, "finish_reason": null}],
                        });
                        Ok::<_, Infallible>(bytes::Bytes::from(format!("data: {chunk}\n\n")))
                    }
                })
                .chain(futures::stream::once(async {
                    Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n"))
                }));
            warp::reply::with_header(
                warp::reply::stream(sync_wrapper::SyncStream::new(chunks)),
                "content-type",
                "text/event-stream",
            )
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(models.or(chat)).incoming(listener).run());
    (addr, allowed)
}

/// The delta texts of the client's stream, up to `up_to` of them or `[DONE]`.
async fn words(
    events: &mut (
             impl futures::Stream<Item = Result<eventsource_stream::Event, impl std::fmt::Debug>> + Unpin
         ),
    up_to: usize,
) -> Vec<String> {
    let mut words = Vec::new();
    while words.len() < up_to {
        let event = tokio::time::timeout(CAP, events.next())
            .await
            .expect("the stream goes on")
            .expect("the stream does not end before [DONE]")
            .expect("the stream does not break");
        assert_ne!(event.event, "error", "{}", event.data);
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        if let Some(word) = chunk["choices"][0]["delta"]["content"].as_str() {
            words.push(word.to_owned());
        }
    }
    words
}

async fn a_stream_survives_a_cut_between_the_binaries(transport: &str) {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let proxy = Proxy::start(addr).await;
    let (upstream, allowed) = paced_upstream().await;
    let config = dir.0.join("providers.json");
    std::fs::write(
        &config,
        json!([{"name": "slow", "model": "m", "url": format!("http://{upstream}/v1"), "publish": true}])
            .to_string(),
    )
    .unwrap();
    let publisher = PublisherProcess::start(
        &proxy.url,
        transport,
        &dir.0.join("session"),
        &["--config", config.to_str().unwrap()],
    );
    poll_until("slow is active", CAP, || async {
        try_row(&url, "slow")
            .await
            .is_some_and(|r| r["status"] == "active")
    })
    .await;

    allowed.add_permits(10);
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "slow", "stream": true, "messages": [{"role": "user", "content": "count"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let mut seen = words(&mut events, 10).await;

    proxy.kill();
    // The upstream goes on while the channel is down; the publisher keeps its output.
    allowed.add_permits(10);
    poll_until("the publisher notices the cut", CAP, || async {
        publisher
            .log()
            .iter()
            .any(|l| l.contains("publisher disconnected"))
    })
    .await;
    proxy.revive();
    let revived = std::time::Instant::now();
    seen.extend(words(&mut events, 1).await);
    // A diagnostic, not asserted: the publisher retries every second while its tasks
    // wait, so this is mostly how long its next attempt was away.
    eprintln!(
        "{transport}: first resumed chunk {:?} after the proxy came back",
        revived.elapsed()
    );
    allowed.add_permits(CHUNKS - 20);
    seen.extend(words(&mut events, CHUNKS + 1).await);
    let expected: Vec<String> = (0..CHUNKS).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "every chunk once, in order");
    assert!(
        publisher
            .log()
            .iter()
            .any(|l| l.contains("resuming the tasks of the last channel")),
        "the publisher resumed its task"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_survives_a_cut_between_the_binaries() {
    a_stream_survives_a_cut_between_the_binaries("sse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ws_stream_survives_a_cut_between_the_binaries() {
    a_stream_survives_a_cut_between_the_binaries("ws").await;
}
