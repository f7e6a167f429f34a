//! The transport, pool, wake and agent conformance suites over WebSocket (on one gateway and
//! on two replicas linked in memory), and the cases only a socket has: a register
//! that is not first, malformed and oversized frames, a missed pong, and a
//! session moving to a new socket.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use virtual_llm::Config;
use virtual_llm::testkit::socket::{Socket, auth, next, send, socket, ws_url};
use virtual_llm::testkit::{TestGateway, eventually};

mod one_gateway {
    virtual_llm::transport_conformance_tests!(virtual_llm::testkit::WsTransport);
}

mod two_replicas {
    virtual_llm::transport_plane_conformance_tests!(
        virtual_llm::testkit::WsTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

mod pools {
    virtual_llm::pool_conformance_tests!(virtual_llm::testkit::WsTransport);
}

mod pools_on_two_replicas {
    virtual_llm::pool_conformance_tests!(
        virtual_llm::testkit::WsTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

mod wake {
    virtual_llm::wake_conformance_tests!(virtual_llm::testkit::WsTransport);
}

mod wake_on_two_replicas {
    virtual_llm::wake_conformance_tests!(
        virtual_llm::testkit::WsTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

fn register(session: Option<&str>, name: &str) -> Value {
    json!({"type": "register", "providerSessionId": session, "llms": [{"name": name, "type": "openai", "model": "m"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_that_is_not_first_is_refused_and_writes_nothing() {
    let gw = TestGateway::start(Config::default()).await;
    let mut s = socket(&gw, "alice").await;
    send(
        &mut s,
        json!({"type": "heartbeat", "providerSessionId": "ses_x"}),
    )
    .await;
    let error = next(&mut s).await.unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("first frame must be register"),
        "{error}"
    );
    assert!(next(&mut s).await.is_none(), "then the socket closes");
    assert_eq!(gw.list().await, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_gets_an_error_and_a_close() {
    let gw = TestGateway::start(Config::default()).await;
    let mut first = socket(&gw, "alice").await;
    send(&mut first, json!({"type": "bogus"})).await;
    assert_eq!(
        next(&mut first).await.unwrap()["error"]["code"],
        "invalid_request"
    );
    assert!(next(&mut first).await.is_none());
    let mut s = socket(&gw, "alice").await;
    send(&mut s, register(None, "llm")).await;
    assert_eq!(next(&mut s).await.unwrap()["type"], "registered");
    s.send(Message::text("{not json")).await.unwrap();
    let error = next(&mut s).await.unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed frame"),
        "{error}"
    );
    assert!(next(&mut s).await.is_none());
    eventually("the closed socket unbinds", || async {
        gw.row_status("llm").await == "inactive"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_as_too_large() {
    let gw = TestGateway::start(Config {
        max_body_bytes: 4096,
        ..Config::default()
    })
    .await;
    let mut s = socket(&gw, "alice").await;
    let mut big = register(None, "big");
    big["llms"][0]["model"] = json!("m".repeat(8192));
    send(&mut s, big).await;
    let error = next(&mut s).await.unwrap();
    assert_eq!(
        (error["type"].as_str(), error["error"]["code"].as_str()),
        (Some("error"), Some("payload_too_large")),
        "{error}"
    );
    assert_eq!(gw.list().await, json!([]), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_register_gets_a_refused_frame() {
    let gw = TestGateway::start(Config::default()).await;
    let mut alice = socket(&gw, "alice").await;
    send(&mut alice, register(None, "taken")).await;
    assert_eq!(next(&mut alice).await.unwrap()["type"], "registered");
    let mut mallory = socket(&gw, "mallory").await;
    send(&mut mallory, register(None, "taken")).await;
    let refused = next(&mut mallory).await.unwrap();
    assert_eq!(
        (refused["type"].as_str(), refused["status"].as_u64()),
        (Some("refused"), Some(409)),
        "{refused}"
    );
    assert_eq!(refused["error"]["conflicts"][0]["reason"], "ownedByAnother");
    assert!(next(&mut mallory).await.is_none());
    assert_eq!(
        gw.row_status("taken").await,
        "active",
        "alice keeps her row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_401_before_any_upgrade() {
    let gw = TestGateway::start(Config::default()).await;
    let mut request = ws_url(&gw).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401, got {:?}", other.map(|_| ())),
    }
    let mut client = tokio_tungstenite::connect_async({
        let mut r = ws_url(&gw).into_client_request().unwrap();
        r.headers_mut().insert("authorization", auth("client"));
        r
    })
    .await;
    match &mut client {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403, "clients cannot publish")
        }
        other => panic!("expected a 403, got {:?}", other.as_ref().map(|_| ())),
    }
}

#[tokio::test(start_paused = true)]
async fn a_missed_pong_closes_the_socket_and_unbinds() {
    let gw = TestGateway::start(Config::default()).await;
    let mut s = socket(&gw, "alice").await;
    send(&mut s, register(None, "quiet")).await;
    assert_eq!(next(&mut s).await.unwrap()["type"], "registered");
    assert_eq!(gw.row_status("quiet").await, "active");
    // The client stops reading, so it never answers the gateway's pings. Paused time
    // passes two keep-alive periods in no time.
    tokio::time::sleep(Duration::from_secs(41)).await;
    assert_eq!(
        gw.row_status("quiet").await,
        "active",
        "40 s without a pong is still tolerated"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    eventually("the socket is closed and unbound", || async {
        gw.row_status("quiet").await == "inactive"
    })
    .await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_session_on_a_new_socket_replaces_the_old_one() {
    let gw = TestGateway::start(Config::default()).await;
    let mut old = socket(&gw, "alice").await;
    send(&mut old, register(None, "llm")).await;
    let session = next(&mut old).await.unwrap()["providerSessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut new = socket(&gw, "alice").await;
    send(&mut new, register(Some(&session), "llm")).await;
    let registered = next(&mut new).await.unwrap();
    assert_eq!(
        registered["providerSessionId"],
        session.as_str(),
        "the same session"
    );
    let closing = next(&mut old).await.unwrap();
    assert_eq!(closing["type"], "closing", "the old socket is told to go");
    assert!(next(&mut old).await.is_none(), "and closed");
    assert_eq!(
        gw.row_status("llm").await,
        "active",
        "the old socket's close does not unbind the new one"
    );
    drop(new);
    eventually("the new socket's close unbinds", || async {
        gw.row_status("llm").await == "inactive"
    })
    .await;
}

/// A memory store whose session lookups take a while, so anything the gateway does
/// after answering `registered` would visibly come late.
#[derive(Debug, Default)]
struct SlowSessions(virtual_llm::MemoryStore);

#[async_trait::async_trait]
impl virtual_llm::Store for SlowSessions {
    async fn get(
        &self,
        n: &virtual_llm::LlmName,
    ) -> Result<Option<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        self.0.get(n).await
    }
    async fn list(&self) -> Result<Vec<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        self.0.list().await
    }
    async fn by_session(
        &self,
        s: &virtual_llm::SessionId,
    ) -> Result<Vec<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.0.by_session(s).await
    }
    async fn bound_to(
        &self,
        r: &virtual_llm::ReplicaId,
    ) -> Result<Vec<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        self.0.bound_to(r).await
    }
    async fn stale_virtuals(
        &self,
        c: virtual_llm::Timestamp,
    ) -> Result<Vec<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        self.0.stale_virtuals(c).await
    }
    async fn expired_inactives(
        &self,
        c: virtual_llm::Timestamp,
    ) -> Result<Vec<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        self.0.expired_inactives(c).await
    }
    async fn write(
        &self,
        b: Vec<virtual_llm::Write>,
    ) -> Result<Vec<virtual_llm::LlmRecord>, virtual_llm::StoreError> {
        self.0.write(b).await
    }
    async fn touch(
        &self,
        n: &[virtual_llm::LlmName],
        at: virtual_llm::Timestamp,
    ) -> Result<usize, virtual_llm::StoreError> {
        self.0.touch(n, at).await
    }
    async fn flush(&self) -> Result<(), virtual_llm::StoreError> {
        self.0.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_has_its_registered_frame_is_already_reachable() {
    let gateway = virtual_llm::Gateway::builder(Arc::new(SlowSessions::default()))
        .start()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}{}/_provider-ws",
        listener.local_addr().unwrap(),
        gateway.config().base_path
    );
    let routes = virtual_llm::http::routes(
        gateway.clone(),
        [
            virtual_llm::sse::route(gateway.clone()),
            virtual_llm::ws::route(gateway.clone()),
        ],
    );
    let server = tokio::spawn(virtual_llm::http::serve(
        listener,
        routes,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    for round in 0..3 {
        let (mut s, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        send(&mut s, register(None, &format!("llm-{round}"))).await;
        let registered = next(&mut s).await.unwrap();
        assert_eq!(registered["type"], "registered");
        let session =
            virtual_llm::SessionId::parse(registered["providerSessionId"].as_str().unwrap())
                .unwrap();
        assert!(
            gateway.is_bound(&session),
            "round {round}: bound before `registered` is sent"
        );
    }
    server.abort();
}

/// A raw socket to the gateway, as `who`, asking for per-task flow control; the
/// window the gateway granted, if any.
async fn socket_with_credits(gw: &TestGateway, who: &str) -> (Socket, Option<usize>) {
    let mut request = ws_url(gw).into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("authorization", auth(who));
    headers.insert(virtual_llm::ws::CREDITS_HEADER, "1".parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    let window = response
        .headers()
        .get(virtual_llm::ws::CREDITS_HEADER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (socket, window)
}

fn chunk_frame(task: &Value, i: usize, padding: &str) -> Value {
    let data = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": format!("{i} {padding}")}}]});
    json!({"type": "chunk", "taskId": task["taskId"], "data": data.to_string(), "done": false})
}

/// Flow control is negotiated on the upgrade: the window is the task buffer, and the
/// gateway grants credit half a window at a time as results reach the client. A
/// publisher that sends past its credit while its client is stalled is cut off, as one
/// without flow control is: the client gets an error, the publisher a `cancel`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_follow_the_client_and_a_publisher_past_its_credit_is_cut_off() {
    let gw = TestGateway::start(Config::default()).await;
    let (mut s, window) = socket_with_credits(&gw, "alice").await;
    let window = window.expect("the gateway grants credits when asked");
    assert_eq!(window, gw.gateway.config().task_buffer);
    send(&mut s, register(None, "flow")).await;
    assert_eq!(next(&mut s).await.unwrap()["type"], "registered");

    // A client that reads: a window's worth of results earns a window of credit.
    let reading = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.chat_stream("client", "flow", "x").await.text().await })
    };
    let task = next(&mut s).await.unwrap();
    assert_eq!(task["type"], "task");
    for i in 0..window {
        send(&mut s, chunk_frame(&task, i, "")).await;
    }
    let mut granted = 0;
    while granted < window {
        let credit = next(&mut s).await.unwrap();
        assert_eq!(
            (credit["type"].as_str(), &credit["taskId"]),
            (Some("credit"), &task["taskId"])
        );
        granted += usize::try_from(credit["results"].as_u64().unwrap()).unwrap();
    }
    assert_eq!(
        granted, window,
        "credit for exactly what reached the client"
    );
    let done = json!({"type": "chunk", "taskId": task["taskId"], "data": "", "done": true});
    send(&mut s, done).await;
    let text = reading.await.unwrap();
    assert!(text.starts_with("0 1 2 ") && text.ends_with(&format!("{} ", window - 1)));

    // A client that reads one chunk and stalls, and a publisher that ignores its
    // credit: once the gateway holds a whole buffer for the task, it is cut off.
    let stalled = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let mut stream = gw
                .chat_stream_with_recv_buffer("client", "flow", "y", 4096)
                .await;
            assert!(stream.next_event().await.is_some());
            stream
        })
    };
    let task = next(&mut s).await.unwrap();
    assert_eq!(task["type"], "task");
    send(&mut s, chunk_frame(&task, 0, "")).await;
    let mut stalled = stalled.await.unwrap();
    // Eight megabytes: more than the sockets and buffers between here and the
    // stalled client can take.
    let padding = "z".repeat(1000);
    for i in 1..8000 {
        send(&mut s, chunk_frame(&task, i, &padding)).await;
    }
    let cancelled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = next(&mut s).await.unwrap();
            if frame["type"] == "cancel" {
                return frame;
            }
        }
    })
    .await
    .expect("the task is cut off");
    assert_eq!(cancelled["taskId"], task["taskId"]);
    let error = loop {
        match stalled.next_event().await {
            Some((event, data)) if event == "error" => break data,
            Some(_) => continue,
            None => panic!("the stalled stream ended without an error"),
        }
    };
    assert!(error.contains("llm_unavailable"), "{error}");
    assert_eq!(gw.gateway.in_flight(), 0);
}

/// A publisher that stops reading, its socket open: once the socket is full the
/// gateway cannot even send a ping, so taking no frame for two keep-alive periods
/// counts as a missed pong: the socket is closed, the session unbinds, and the tasks
/// waiting on it fail with 503 rather than wait for their deadlines.
///
/// Real time until the socket is full (it fills in milliseconds: the channel then
/// refuses a task at once), then paused time, so that the keep-alive periods pass
/// without waiting. (Paused from the start, time would jump to the first ping while
/// the requests are still on their way, before the socket is full.)
#[tokio::test]
async fn a_publisher_that_stops_reading_is_closed_after_two_keepalive_periods() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtual_llm::testkit::WsTransport;
    use virtual_llm::testkit::raw::RawTransport;
    let gw = TestGateway::start(Config {
        channel_buffer: 4,
        keepalive: Duration::from_secs(5),
        task_deadline: Duration::from_secs(60),
        ..Config::default()
    })
    .await;
    // Reads nothing after the channel is bound; a 4 KiB receive buffer fills at once.
    let stalled = WsTransport
        .raw(&gw, "alice", None, &["stuck"], Some(4096))
        .await;
    // Sixteen megabytes in all: more than the socket buffers on the way can take
    // (the kernel grows the gateway's send buffer up to a few megabytes).
    let big = "y".repeat(400 * 1024);
    let refused = Arc::new(AtomicUsize::new(0));
    let requests: Vec<_> = (0..40)
        .map(|_| {
            let (gw, big, refused) = (gw.clone(), big.clone(), refused.clone());
            tokio::spawn(async move {
                let body =
                    json!({"model": "stuck", "messages": [{"role": "user", "content": big}]});
                let response = gw.post_chat("client", body).await;
                let status = response.status().as_u16();
                if status == 503 {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                let body: Value = response.json().await.unwrap();
                (status, body["error"]["code"].as_str().unwrap().to_owned())
            })
        })
        .collect();
    eventually("the full channel refuses a task", || async {
        refused.load(Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    for r in requests {
        let (status, code) = r.await.unwrap();
        assert_eq!((status, code.as_str()), (503, "llm_unavailable"));
    }
    let waited = started.elapsed();
    assert!(
        waited < gw.gateway.config().task_deadline,
        "no task waited for its deadline ({waited:?})"
    );
    eventually("the stalled socket is closed and unbound", || async {
        gw.row_status("stuck").await == "inactive"
    })
    .await;
    assert!(!gw.gateway.is_bound(stalled.session()));
    assert_eq!(gw.gateway.in_flight(), 0);
}

mod agents {
    virtual_llm::agent_conformance_tests!(virtual_llm::testkit::WsTransport);
}

mod agents_on_two_replicas {
    virtual_llm::agent_conformance_tests!(
        virtual_llm::testkit::WsTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}
