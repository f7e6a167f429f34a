//! Faults, each on both transports (issue 8 §3), against a real gateway on
//! `127.0.0.1:0`: a publisher killed mid-stream, a publisher that stops reading with its
//! socket open, a slow client on a fast stream, a channel replaced while tasks are in
//! flight, a store that fails, and a wall clock that jumps. (The gateway killed with
//! SIGKILL under load is in `restart.rs`, beside the other gateway-process tests.)
//!
//! Each case is an `async fn` over the transport; `on_both_transports!` stamps out one
//! test per transport.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use virtual_llm::protocol::{GatewayFrame, LlmSpec, RegisterRequest, TaskResult};
use virtual_llm::publisher::WireError;
use virtual_llm::testkit::raw::RawTransport;
use virtual_llm::testkit::*;
use virtual_llm::testkit::{FailingStore, ManualClock, at};
use virtual_llm::{
    Config, EchoProvider, LlmName, LlmStatus, MemoryStore, PublisherOptions, Store, SweepReport,
};

/// The OpenAI error body of a failed stream's `error` event.
fn error_event(event: Option<(String, String)>) -> Value {
    let (name, data) = event.expect("an error event, not a silent end of the stream");
    assert_eq!(name, "error", "{data}");
    serde_json::from_str(&data).unwrap()
}

/// A publisher killed mid-stream (its connections cut without a goodbye): the client's
/// stream ends with an error event, and the row goes inactive. How long the gateway
/// took to notice is printed, not asserted: it is the machine's scheduling as much as
/// the gateway's (the 5 s timeout only stops a hang). The publisher does not resume
/// (the version 1 rule: its tasks fail at once); a resuming publisher's tasks wait for
/// the resume window first, which the transport suite's resume cases test.
async fn a_publisher_killed_mid_stream_fails_the_stream(t: &dyn RawTransport) {
    let gw = TestGateway::start(Config::default()).await;
    let proxy = gw.proxy().await;
    let hanging = Arc::new(Hanging::default());
    let p = gw
        .publish_at(
            &proxy.url,
            t,
            "alice",
            &["slow"],
            hanging,
            PublisherOptions {
                resume: false,
                ..PublisherOptions::default()
            },
        )
        .await;
    let mut stream = gw.chat_stream("client", "slow", "x").await;
    let (_, first) = stream.next_event().await.unwrap();
    assert!(first.contains("first"), "{first}");

    let killed = Instant::now();
    proxy.kill();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.next_event())
        .await
        .expect("the stream does not hang");
    let noticed = killed.elapsed();
    eprintln!("{}: stream failed {noticed:?} after the kill", t.name());
    let body = error_event(event);
    assert_eq!(body["error"]["code"], "llm_unavailable", "{body}");
    assert!(
        stream.next_event().await.is_none(),
        "then the stream closes"
    );
    eventually("the row goes inactive", || async {
        gw.row_status("slow").await == "inactive"
    })
    .await;
    assert_eq!(gw.gateway.in_flight(), 0);
    assert_eq!(gw.gateway.local_channels(), 0);
    p.stop().await;
}

/// A publisher that stops reading, its socket open: once its channel's bounded queue
/// (and the socket buffers under it) are full, new tasks are refused with 503 at once,
/// and the tasks already queued time out with 504. Waves of requests soon get only
/// 503s: what the gateway holds for the channel does not grow with the requests.
///
/// Paused time: the 10 s deadline passes without waiting. The keep-alive is set beyond
/// the test, so that the gateway's ping (a different fault, tested in `ws.rs`) does not
/// close the socket first; the stale timeout goes beyond it, as `Config::validate`
/// asks. So is the server's write timeout, which closes a channel whose publisher
/// stopped reading (a different fault, tested in `hostile.rs`): here the channel stays
/// stalled for the whole test.
async fn a_publisher_that_stops_reading_gets_503s_then_504s(t: &dyn RawTransport) {
    const REQUESTS: usize = 100;
    let config = Config {
        channel_buffer: 4,
        task_deadline: Duration::from_secs(10),
        keepalive: Duration::from_secs(3600),
        stale_after: Duration::from_secs(7200),
        ..Config::default()
    };
    let mut options = virtual_llm::http::ServeOptions::default();
    options.write_timeout = Duration::from_secs(3600);
    let gw = TestGateway::start_serving(config, options).await;
    // Reads nothing after the channel is bound; a 4 KiB receive buffer fills at once.
    let stalled = t.raw(&gw, "alice", None, &["stuck"], Some(4096)).await;
    let wave = || async {
        let big = "y".repeat(64 * 1024);
        let requests: Vec<_> = (0..REQUESTS)
            .map(|_| {
                let (gw, big) = (gw.clone(), big.clone());
                tokio::spawn(async move {
                    let body =
                        json!({"model": "stuck", "messages": [{"role": "user", "content": big}]});
                    let response = gw.post_chat("client", body).await;
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap();
                    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                    (status, code)
                })
            })
            .collect();
        let (mut refused, mut timed_out) = (0, 0);
        for r in requests {
            match r.await.unwrap() {
                (503, code) if code == "llm_unavailable" => refused += 1,
                (504, code) if code == "deadline_exceeded" => timed_out += 1,
                other => panic!("{}: unexpected outcome {other:?}", t.name()),
            }
        }
        assert_eq!(gw.gateway.in_flight(), 0, "no task lingers");
        (refused, timed_out)
    };
    // Wave after wave, until the channel takes nothing more. Between waves the kernel
    // may grow the gateway's socket send buffer (autotuning, up to `tcp_wmem`'s max),
    // which takes a few more frames; then nothing.
    let (mut accepted, mut waves) = (0, 0);
    loop {
        let (refused, timed_out) = wave().await;
        assert_eq!(refused + timed_out, REQUESTS);
        assert!(refused > 0, "{}: a full channel refuses at once", t.name());
        waves += 1;
        accepted += timed_out;
        if timed_out == 0 {
            break;
        }
        assert!(waves < 20, "{}: the channel keeps taking tasks", t.name());
    }
    // What one channel can hold: its queue, one frame in the writer, the socket
    // buffers (the gateway's send buffer at its largest, the publisher's small receive
    // buffer) and, for SSE, hyper's write buffer of at most ~400 KiB.
    let (wmem, _) = kernel_socket_buffers();
    let frame = 64 * 1024;
    let bound = gw.gateway.config().channel_buffer + 1 + (wmem + (8 << 10) + (512 << 10)) / frame;
    eprintln!(
        "{}: {accepted} tasks accepted (each then timed out with 504) over {waves} waves of {REQUESTS}; bound {bound}",
        t.name()
    );
    assert!(
        (1..=bound).contains(&accepted),
        "{}: {accepted} tasks were accepted; at most {bound} fit",
        t.name()
    );
    assert!(
        gw.gateway.is_bound(stalled.session()),
        "the channel is still open"
    );
    drop(stalled);
}

/// The most a TCP socket buffers in the kernel, sending and receiving (Linux sysctls;
/// generous defaults elsewhere).
fn kernel_socket_buffers() -> (usize, usize) {
    let max = |path: &str, default: usize| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse().ok())
            .unwrap_or(default)
    };
    (
        max("/proc/sys/net/ipv4/tcp_wmem", 16 << 20),
        max("/proc/sys/net/ipv4/tcp_rmem", 16 << 20),
    )
}

/// A slow client on a fast stream: the gateway holds a bounded part of its answer (the
/// publisher is made to wait, or the stream is cut off), and another client's stream on
/// the same publisher completes meanwhile. Its time beside the slow stream and alone
/// are printed, not compared: on a shared machine they say more about the load.
async fn a_slow_client_holds_bounded_memory_and_slows_no_other_stream(t: &dyn RawTransport) {
    let gw = TestGateway::start(Config::default()).await;
    let firehose = Arc::new(Firehose::default());
    let p = gw
        .publish(t, "alice", &["firehose"], firehose.clone())
        .await;
    // A fast model: a thousand 1 KiB chunks, about two a millisecond.
    let other = |label: &'static str| {
        let gw = gw.clone();
        async move {
            let started = Instant::now();
            let text = gw
                .chat_stream("client", "firehose", &format!("{label} n=1000 every=2"))
                .await
                .text()
                .await;
            assert_eq!(text.len(), 1000 * 1000);
            started.elapsed()
        }
    };
    let alone = other("alone").await;

    // A million chunks (a gigabyte) asked for as fast as they come; the client reads one
    // and stops.
    let mut slow = gw
        .chat_stream_with_recv_buffer("client", "firehose", "slow n=1000000", 4096)
        .await;
    assert!(slow.next_event().await.is_some());
    let beside = tokio::time::timeout(Duration::from_secs(20), other("beside"))
        .await
        .expect("the other stream is not held up by the slow one");

    // The slow stream's producer stops: it waits for its client (or was cut off). Polled
    // until its count holds still for 200 ms, at most 10 s.
    let (mut last, mut steady) = (usize::MAX, 0);
    for _ in 0..500 {
        let now = firehose.produced("slow");
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
        if steady == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(steady, 10, "the slow stream's producer never stopped");
    // Between the producer and the stalled client: the kernel buffers of the sockets on
    // the way (publisher to gateway, gateway to client), the task's buffer and the
    // transports' own few hundred kilobytes. Tens of megabytes at most, never the
    // gigabyte asked for.
    let (wmem, rmem) = kernel_socket_buffers();
    let bound = (2 * wmem + rmem + (4 << 20)) / 1000;
    eprintln!(
        "{}: the other stream took {beside:?} beside the slow one, {alone:?} alone; \
         the slow stream ran {last} chunks ahead of its client (bound {bound})",
        t.name()
    );
    assert!(
        last < bound,
        "{}: {last} chunks produced for a client that read one",
        t.name()
    );
    // Held up behind the stalled client, the other stream would not finish at all
    // (the timeout above). How much slower it ran is the diagnostic printed above.
    let cancelled = firehose.dropped.notified();
    drop(slow);
    cancelled.await;
    eventually("no task left", || async { gw.gateway.in_flight() == 0 }).await;
    p.stop().await;
}

/// A stream faster than its client (a provider producing as fast as it can, a client
/// reading as fast as it can but slower): the stream is slowed to the client's pace,
/// never cut off, and arrives whole.
async fn a_stream_faster_than_its_client_is_slowed_not_cut_off(t: &dyn RawTransport) {
    let gw = TestGateway::start(Config::default()).await;
    let firehose = Arc::new(Firehose::default());
    let p = gw
        .publish(t, "alice", &["firehose"], firehose.clone())
        .await;
    let streams: Vec<_> = (0..2)
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move {
                gw.chat_stream("client", "firehose", &format!("flat-out-{i} n=3000"))
                    .await
                    .text()
                    .await
            })
        })
        .collect();
    for s in streams {
        assert_eq!(s.await.unwrap().len(), 3000 * 1000, "{}", t.name());
    }
    assert_eq!(gw.gateway.in_flight(), 0);
    p.stop().await;
}

/// A channel replaced while tasks are in flight (the same session binds a new
/// channel): the tasks are the session's, not the socket's, so they survive the old
/// channel's close, and their results reach the clients through the new channel.
async fn a_replaced_channel_keeps_the_sessions_tasks(t: &dyn RawTransport) {
    let gw = TestGateway::start(Config::default()).await;
    let mut old = t.raw(&gw, "alice", None, &["echo"], None).await;
    let session = old.session().clone();

    let streamed = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.chat_stream("client", "echo", "s").await.text().await })
    };
    let Some(GatewayFrame::Task(streaming)) = old.next_frame().await else {
        panic!("expected a task")
    };
    let first = TaskResult::Chunk {
        data: chunk_data("first "),
        done: false,
        seq: None,
    };
    assert_eq!(old.send_result(&streaming.task_id, first).await, 204);
    let whole = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.chat("client", "echo", "w", false).await })
    };
    let Some(GatewayFrame::Task(completing)) = old.next_frame().await else {
        panic!("expected a task")
    };

    let mut new = t.raw(&gw, "alice", Some(&session), &["echo"], None).await;
    assert_eq!(new.session(), &session, "the same session");
    assert!(
        matches!(old.next_frame().await, Some(GatewayFrame::Closing(_))),
        "the old channel is told to close"
    );
    assert!(old.next_frame().await.is_none(), "and it closes");
    drop(old);
    assert_eq!(
        gw.gateway.in_flight(),
        2,
        "{}: the old channel's close failed none of the session's tasks",
        t.name()
    );

    let rest = TaskResult::Chunk {
        data: chunk_data("second"),
        done: true,
        seq: None,
    };
    assert_eq!(new.send_result(&streaming.task_id, rest).await, 204);
    let answer = TaskResult::Completed {
        status: 200,
        body: json!({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}}]}).into(),
        retry_after: None,
    };
    assert_eq!(new.send_result(&completing.task_id, answer).await, 204);
    assert_eq!(streamed.await.unwrap(), "first second");
    let (status, body) = whole.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "whole");

    // New tasks go to the new channel.
    let next = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.chat("client", "echo", "n", false).await })
    };
    let Some(GatewayFrame::Task(task)) = new.next_frame().await else {
        panic!("expected a task on the new channel")
    };
    let answer = TaskResult::Completed {
        status: 200,
        body: json!({"ok": true}).into(),
        retry_after: None,
    };
    assert_eq!(new.send_result(&task.task_id, answer).await, 204);
    assert_eq!(next.await.unwrap().0, 200);
    assert_eq!(gw.gateway.in_flight(), 0);
    assert_eq!(gw.row_status("echo").await, "active");
}

fn chunk_data(text: &str) -> String {
    json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]})
        .to_string()
}

/// The store failing: a register is a clear 500 that writes nothing (a re-register
/// that would change several rows too), failing reads are a clear 500 to clients (for
/// rows the gateway's registry view does not hold; those it holds are served), and a
/// failing heartbeat neither drops a connected publisher nor its rows. Once the store
/// recovers, everything works again.
async fn a_failing_store_is_a_clear_5xx_and_writes_nothing(t: &dyn RawTransport) {
    let store = Arc::new(FailingStore::new(Arc::new(MemoryStore::new())));
    let config = Config {
        heartbeat_interval: Duration::from_millis(100),
        // What the registry view keeps stays fresh for the whole test.
        registry_staleness: Duration::from_secs(3600),
        ..Config::default()
    };
    let gw = TestGateway::start_with(config, store.clone(), None).await;
    let p = gw
        .publish(
            t,
            "alice",
            &["echo", "echo-2"],
            Arc::new(EchoProvider::new()),
        )
        .await;
    let session = p.connected().await;
    // The rows as writes leave them: heartbeats (touches, not writes) go on meanwhile.
    let rows = || async {
        let mut rows = store.inner().list().await.unwrap();
        for r in &mut rows {
            r.last_heartbeat_at = None;
        }
        rows
    };
    let before = rows().await;

    store.fail_writes(true);
    let request = |session: Option<&virtual_llm::SessionId>, names: &[&str]| RegisterRequest {
        agents: Vec::new(),
        provider_session_id: session.cloned(),
        protocol_version: None,
        llms: names
            .iter()
            .map(|n| LlmSpec {
                name: LlmName::parse(n).unwrap(),
                provider_type: "openai".into(),
                model: "m".into(),
                tier: None,
                pool: None,
                max_concurrent: None,
                state: None,
                access: Default::default(),
            })
            .collect(),
        capabilities: Vec::new(),
    };
    // A new publisher, over the transport: refused with a 5xx.
    match t
        .wire(&gw.url, Some(token("mallory")))
        .connect(request(None, &["fresh", "other"]))
        .await
    {
        Err(WireError::Connection(message)) => assert!(
            message.starts_with("503") && message.contains("cannot be reached"),
            "{}: {message}",
            t.name()
        ),
        other => panic!("{}: expected a 503, got {other:?}", t.name()),
    }
    // A re-register that would update one row and detach another: all or nothing.
    let response = reqwest::Client::new()
        .post(format!(
            "{}{}/_provider-register",
            gw.url,
            gw.gateway.config().base_path
        ))
        .bearer_auth(token("alice"))
        .json(&request(Some(&session), &["echo"]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "registry_unavailable");
    assert!(
        !body.to_string().contains("injected"),
        "internals stay in the log: {body}"
    );
    assert!(store.injected() >= 2);
    assert_eq!(rows().await, before, "the failed registers wrote nothing");
    // Reads still work, so clients are still served.
    assert_eq!(gw.chat("client", "echo", "still", false).await.0, 200);
    store.fail_writes(false);

    store.fail_reads(true);
    // A row the gateway's registry view does not hold is read from the store: 503.
    let (status, body) = gw.chat("client", "echo-2", "x", false).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("registry_unavailable"))
    );
    // One it routed a moment ago is still served from the view.
    assert_eq!(gw.chat("client", "echo", "kept", false).await.0, 200);
    store.fail_reads(false);

    // Heartbeats failing: the publisher stays connected and served.
    let injected = store.injected();
    store.fail_touches(true);
    eventually("two heartbeats fail", || async {
        store.injected() >= injected + 2
    })
    .await;
    assert!(
        gw.gateway.is_bound(&session),
        "{}: a failed heartbeat dropped the publisher's channel",
        t.name()
    );
    assert_eq!(gw.chat("client", "echo", "beating", false).await.0, 200);
    store.fail_touches(false);

    assert_eq!(store.inner().list().await.unwrap().len(), 2);
    assert_eq!(gw.row_status("echo").await, "active");
    let fresh = gw
        .publish(t, "mallory", &["fresh"], Arc::new(EchoProvider::new()))
        .await;
    assert_eq!(gw.chat("client", "fresh", "recovered", false).await.0, 200);
    fresh.stop().await;
    p.stop().await;
}

/// The wall clock jumping forward and back, publishers connected: no row is lost, a
/// backward jump marks nothing stale and reaps nothing (times from the "future" count
/// as fresh), a forward jump makes stale what the clock says is stale and the next
/// heartbeat of a connected publisher revives it, and retention counts from when a row
/// went inactive.
async fn clock_jumps_lose_no_row_and_keep_stale_detection_sane(t: &dyn RawTransport) {
    const T0: u64 = 1_000_000;
    let clock = ManualClock::new(at(T0));
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    // The publishers' own heartbeats (30 s) do not fire during the test; the test sends
    // each heartbeat itself, so every sweep sees exactly what it is meant to.
    let gw = TestGateway::start_with(
        Config::default(),
        store.clone(),
        Some(Arc::new(clock.clone())),
    )
    .await;
    let live = gw
        .publish(t, "alice", &["live"], Arc::new(EchoProvider::new()))
        .await;
    let session = live.connected().await;
    let gone = gw
        .publish(t, "alice", &["gone"], Arc::new(EchoProvider::new()))
        .await;
    gone.stop().await;
    eventually("the stopped publisher's row goes inactive", || async {
        gw.row_status("gone").await == "inactive"
    })
    .await;
    let row = |name: &'static str| {
        let store = store.clone();
        async move {
            store
                .get(&LlmName::parse(name).unwrap())
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("row {name} was lost"))
        }
    };
    let (live_id, gone_id) = (row("live").await.id, row("gone").await.id);
    let heartbeat = || async {
        let response = reqwest::Client::new()
            .post(format!(
                "{}{}/_provider-heartbeat",
                gw.url,
                gw.gateway.config().base_path
            ))
            .bearer_auth(token("alice"))
            .json(&json!({"providerSessionId": session}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    let sweep = || async { gw.gateway.sweep().await.unwrap() };

    // Back an hour: everything is "from the future"; nothing is stale or expired.
    clock.set(at(T0 - 3600));
    assert_eq!(sweep().await, SweepReport::default());
    heartbeat().await;
    assert_eq!(
        row("live").await.last_heartbeat_at,
        Some(at(T0 - 3600)),
        "a heartbeat re-anchors the row in the new time"
    );
    assert_eq!(gw.chat("client", "live", "back", false).await.0, 200);

    // Forward two hours: the clock says the heartbeat is three hours old.
    clock.set(at(T0 + 7200));
    assert_eq!(
        sweep().await,
        SweepReport {
            marked_inactive: 1,
            deleted: 0,
        },
        "stale by the clock; the row that went inactive two hours ago is kept"
    );
    assert_eq!(gw.chat("client", "live", "x", false).await.0, 503);
    heartbeat().await;
    assert_eq!(
        row("live").await.status,
        LlmStatus::Active,
        "the connected publisher's next heartbeat revives its row"
    );
    assert_eq!(gw.chat("client", "live", "forward", false).await.0, 200);

    // Back to T0, then time catches up: retention counts from when "gone" went
    // inactive (T0), not from the jumps.
    clock.set(at(T0));
    assert_eq!(sweep().await, SweepReport::default());
    clock.set(at(T0 + 4 * 3600 - 1));
    heartbeat().await;
    assert_eq!(sweep().await, SweepReport::default());
    clock.set(at(T0 + 4 * 3600 + 1));
    assert_eq!(
        sweep().await,
        SweepReport {
            marked_inactive: 0,
            deleted: 1,
        }
    );
    assert!(
        store
            .get(&LlmName::parse("gone").unwrap())
            .await
            .unwrap()
            .is_none(),
        "four hours after its publisher left, by the clock"
    );
    assert_ne!(gone_id, live_id);
    let kept = row("live").await;
    assert_eq!((kept.id, kept.status), (live_id, LlmStatus::Active));
    assert_eq!(gw.chat("client", "live", "caught up", false).await.0, 200);
    live.stop().await;
}

/// Stamps out one test per transport for each case, with the case's test attribute.
macro_rules! on_both_transports {
    ($($(#[$attr:meta])* $case:ident,)*) => {
        mod sse {
            use super::*;
            $( $(#[$attr])* async fn $case() { super::$case(&SseTransport).await; } )*
        }
        mod ws {
            use super::*;
            $( $(#[$attr])* async fn $case() { super::$case(&WsTransport).await; } )*
        }
    };
}

on_both_transports! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_publisher_killed_mid_stream_fails_the_stream,
    #[tokio::test(start_paused = true)]
    a_publisher_that_stops_reading_gets_503s_then_504s,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_slow_client_holds_bounded_memory_and_slows_no_other_stream,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_stream_faster_than_its_client_is_slowed_not_cut_off,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_replaced_channel_keeps_the_sessions_tasks,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_failing_store_is_a_clear_5xx_and_writes_nothing,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    clock_jumps_lose_no_row_and_keep_stale_detection_sane,
}
