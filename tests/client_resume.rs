//! Resuming a streamed answer as a client (SPEC §15, last bullet), end to end over a
//! served gateway: the `x-completion-id` header and each chunk's `id:`, `GET
//! /v1/chat/completions/{completionId}/stream` with `starting_after` or
//! `Last-Event-ID`, a resumed reader following a live answer after the first
//! connection went, the window, the byte bound, another principal's 404, a broken
//! answer's error, and a client that leaves (its answer is cancelled, SPEC §6).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use virtual_llm::testkit::{SseReader, SseTransport, Stepped, TestGateway, eventually};
use virtual_llm::{Config, Publisher};

/// A gateway with `config` serving `steps`, a [`Stepped`] model published by alice.
async fn stepped_gateway(config: Config) -> (TestGateway, Arc<Stepped>, Publisher) {
    let gw = TestGateway::start(config).await;
    let stepped = Arc::new(Stepped::new());
    let p = gw
        .publish(&SseTransport, "alice", &["steps"], stepped.clone())
        .await;
    (gw, stepped, p)
}

/// The next event of `reader` as its last event id and what it says: a chunk's
/// content, `[DONE]`, or `error: <code>`.
async fn next(reader: &mut SseReader) -> Option<(String, String)> {
    let (event, data, id) = reader.next_with_id().await?;
    let what = if event == "error" {
        let body: Value = serde_json::from_str(&data).unwrap();
        format!("error: {}", body["error"]["code"].as_str().unwrap())
    } else if data == "[DONE]" {
        data
    } else {
        let chunk: Value = serde_json::from_str(&data).unwrap();
        chunk["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    Some((id, what))
}

/// Every event left in `reader`, as [`next`] reads them.
async fn rest(mut reader: SseReader) -> Vec<(String, String)> {
    let mut events = Vec::new();
    while let Some(event) = next(&mut reader).await {
        events.push(event);
    }
    events
}

/// Chunks `seqs` (`c<seq> `, with their ids), then `[DONE]` (which has no id of its
/// own: the last one seen stays).
fn chunks_then_done(seqs: std::ops::Range<u64>) -> Vec<(String, String)> {
    let last = seqs.end.saturating_sub(1).to_string();
    seqs.map(|i| (i.to_string(), format!("c{i} ")))
        .chain([(last, "[DONE]".to_owned())])
        .collect()
}

/// A resume's status and error code, for an answer that is not 200.
async fn refused(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A finished answer of `n` chunks asked by `client`, read whole: its id.
async fn finished(gw: &TestGateway, stepped: &Stepped, n: u64) -> String {
    stepped.release(n as usize);
    let first = gw.chat_stream("client", "steps", &format!("n={n}")).await;
    let id = first.completion_id().unwrap().to_owned();
    assert_eq!(rest(first).await, chunks_then_done(0..n));
    id
}

/// The client's connection dies mid-stream without the gateway knowing yet; the
/// client asks again on a new one, after the last chunk it saw: it gets exactly the
/// missing chunks, the answer carried on by the new reader once the old connection is
/// gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_a_new_connection_with_exactly_the_missing_chunks() {
    let (gw, stepped, p) = stepped_gateway(Config::default()).await;
    // The answer's head comes once its first chunk does.
    stepped.release(3);
    let mut first = gw.chat_stream("client", "steps", "n=6").await;
    let id = first.completion_id().expect("x-completion-id").to_owned();
    assert!(
        id.starts_with("cmpl_") && id.len() == "cmpl_".len() + 32,
        "{id}"
    );
    for i in 0..3 {
        assert_eq!(
            next(&mut first).await,
            Some((i.to_string(), format!("c{i} ")))
        );
    }

    let second = SseReader::of(
        gw.resume("client", &id, Some("starting_after=2"), None)
            .await,
    );
    drop(first);
    stepped.release(3);
    assert_eq!(rest(second).await, chunks_then_done(3..6));
    p.stop().await;
}

/// The chunks a dead connection carried are still there after it closed: the framing
/// (`x-completion-id`, `id:` before each chunk's `data:`, none on `[DONE]`), then a
/// resume from the last chunk the client had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_lost_with_a_closed_connection_are_resumed() {
    let (gw, stepped, p) = stepped_gateway(Config::default()).await;
    stepped.release(8); // `raw_chat_stream` asks for the default 8 chunks
    let mut raw = gw.raw_chat_stream("client", "steps").await;
    raw.read_until("data: [DONE]").await;
    let text = raw.text();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("x-completion-id: "))
        .expect("the x-completion-id header")
        .trim()
        .to_owned();
    for seq in 0..8 {
        assert!(
            text.contains(&format!("id: {seq}\ndata: {{")),
            "chunk {seq} has its id first: {text}"
        );
    }
    assert!(!text.contains("id: 8"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let done = lines.iter().position(|l| *l == "data: [DONE]").unwrap();
    assert!(
        !lines[done - 1].starts_with("id:"),
        "[DONE] has no id: {text}"
    );
    drop(raw);

    // The client had read up to chunk 4 when its connection died.
    let again = SseReader::of(
        gw.resume("client", &id, Some("starting_after=4"), None)
            .await,
    );
    assert_eq!(rest(again).await, chunks_then_done(5..8));
    p.stop().await;
}

/// A finished answer is resumable for `clientResumeWindow`, with `starting_after`,
/// with `Last-Event-ID` (the query wins over it), or from its start; then it is 404.
#[tokio::test(start_paused = true)]
async fn a_finished_answer_is_resumable_within_its_window_and_404_after() {
    let config = Config {
        client_resume_window: Duration::from_secs(5),
        ..Config::default()
    };
    let (gw, stepped, p) = stepped_gateway(config).await;
    let id = finished(&gw, &stepped, 4).await;

    let cases = [
        (Some("starting_after=1"), None, 2..4),
        (None, Some("1"), 2..4),
        (Some("starting_after=0"), Some("2"), 1..4),
        (Some("starting_after=3"), None, 4..4),
        (None, None, 0..4),
    ];
    for (query, last_event_id, expected) in cases {
        let again = SseReader::of(gw.resume("client", &id, query, last_event_id).await);
        let events = rest(again).await;
        if expected.is_empty() {
            // Only `[DONE]`, with no id at all.
            assert_eq!(events, [(String::new(), "[DONE]".to_owned())]);
        } else {
            assert_eq!(events, chunks_then_done(expected), "{query:?}");
        }
    }

    tokio::time::advance(Duration::from_secs(6)).await;
    let (status, body) = refused(
        gw.resume("client", &id, Some("starting_after=1"), None)
            .await,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "completion_not_found");
    p.stop().await;
}

/// Only the principal that asked may resume: another client gets the very 404 an
/// unknown id gets; a publisher's token may not resume at all, nor an unknown token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_principal_gets_the_404_of_an_unknown_id() {
    let (gw, stepped, p) = stepped_gateway(Config::default()).await;
    let id = finished(&gw, &stepped, 2).await;
    let unknown = "cmpl_0123456789abcdef0123456789abcdef";

    let (status, bob) = refused(gw.resume("bob", &id, None, None).await).await;
    assert_eq!(status, 404);
    assert_eq!(bob["error"]["code"], "completion_not_found");
    for (who, id) in [("bob", unknown), ("client", unknown), ("client", "x y")] {
        let (status, body) = refused(gw.resume(who, id, None, None).await).await;
        assert_eq!((status, &body), (404, &bob), "{who} asking for {id:?}");
    }
    let (status, _) = refused(gw.resume("mallory", &id, None, None).await).await;
    assert_eq!(status, 403, "a publisher's token");
    let (status, _) = refused(gw.resume("nobody", &id, None, None).await).await;
    assert_eq!(status, 401);

    let again = SseReader::of(gw.resume("client", &id, None, None).await);
    assert_eq!(rest(again).await, chunks_then_done(0..2));
    p.stop().await;
}

/// A `starting_after` or `Last-Event-ID` that is not the number of a chunk the answer
/// has is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_starting_after_is_400() {
    let (gw, stepped, p) = stepped_gateway(Config::default()).await;
    let id = finished(&gw, &stepped, 2).await;
    let cases = [
        (Some("starting_after=abc"), None),
        (Some("starting_after=-1"), None),
        (Some("starting_after=1.5"), None),
        (Some("starting_after="), None),
        (Some("starting_after=2"), None), // the last chunk is 1
        (None, Some("one")),
        (Some("starting_after=x"), Some("0")),
    ];
    for (query, last_event_id) in cases {
        let (status, body) = refused(gw.resume("client", &id, query, last_event_id).await).await;
        assert_eq!(status, 400, "{query:?} {last_event_id:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
    }
    p.stop().await;
}

/// An answer past `clientResumeBytes` reaches its client whole, every chunk with its
/// id, but cannot be resumed: 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_past_the_byte_bound_reaches_its_client_but_is_not_resumable() {
    let config = Config {
        client_resume_bytes: 1000, // a few chunks of the 12
        ..Config::default()
    };
    let (gw, stepped, p) = stepped_gateway(config).await;
    let id = finished(&gw, &stepped, 12).await;
    let (status, body) = refused(gw.resume("client", &id, None, None).await).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "completion_not_found");

    // A short answer under the same bound is resumable.
    let id = finished(&gw, &stepped, 2).await;
    let again = SseReader::of(gw.resume("client", &id, None, None).await);
    assert_eq!(rest(again).await, chunks_then_done(0..2));
    p.stop().await;
}

/// A stream that broke midway resumes to the very error event its client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_answer_resumes_to_the_same_error_event() {
    let (gw, stepped, p) = stepped_gateway(Config::default()).await;
    stepped.release(3);
    let mut first = gw.chat_stream("client", "steps", "n=2 fail").await;
    let id = first.completion_id().unwrap().to_owned();
    for i in 0..2 {
        assert_eq!(
            next(&mut first).await,
            Some((i.to_string(), format!("c{i} ")))
        );
    }
    let (event, error, _) = first.next_with_id().await.unwrap();
    assert_eq!(event, "error");
    let body: Value = serde_json::from_str(&error).unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(first.next_with_id().await, None);

    let mut again = SseReader::of(
        gw.resume("client", &id, Some("starting_after=0"), None)
            .await,
    );
    assert_eq!(next(&mut again).await, Some(("1".into(), "c1 ".into())));
    assert_eq!(
        again.next_with_id().await,
        Some(("error".to_owned(), error, "1".to_owned()))
    );
    assert_eq!(again.next_with_id().await, None);
    p.stop().await;
}

/// A client that goes away while it is its answer's only reader cancels the answer
/// (SPEC §6: the upstream call is aborted); the answer is kept as broken: resuming it
/// gives its chunks, then a `completion_gone` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_cancels_its_answer_which_resumes_to_an_error() {
    let (gw, stepped, p) = stepped_gateway(Config::default()).await;
    stepped.release(1);
    let mut first = gw.chat_stream("client", "steps", "n=4").await;
    let id = first.completion_id().unwrap().to_owned();
    assert_eq!(next(&mut first).await, Some(("0".into(), "c0 ".into())));
    drop(first);
    stepped.dropped.notified().await;
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;

    let again = SseReader::of(gw.resume("client", &id, None, None).await);
    assert_eq!(
        rest(again).await,
        [
            ("0".to_owned(), "c0 ".to_owned()),
            ("0".to_owned(), "error: completion_gone".to_owned())
        ]
    );
    p.stop().await;
}

/// With `clientResumeWindow` zero nothing is kept: no `x-completion-id`, and the
/// chunks still carry their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_keeps_nothing() {
    let config = Config {
        client_resume_window: Duration::ZERO,
        ..Config::default()
    };
    let (gw, stepped, p) = stepped_gateway(config).await;
    stepped.release(2);
    let first = gw.chat_stream("client", "steps", "n=2").await;
    assert_eq!(first.completion_id(), None);
    assert_eq!(rest(first).await, chunks_then_done(0..2));
    p.stop().await;
}
