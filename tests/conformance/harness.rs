//! The conformance suite's harness: a gateway on `127.0.0.1:0` with token auth and an
//! in-memory store (or a store and clock of the test's choosing), HTTP client helpers
//! that speak to it as an OpenAI client would, providers instrumented to show what
//! reached them, the two transports, and a TCP proxy that cuts a publisher off the way
//! a killed process would.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use virtual_llm::openai::chunk_body;
use virtual_llm::protocol::{LlmSpec, TaskFrame, TaskResult};
use virtual_llm::publisher::Wire;
use virtual_llm::{
    Clock, Completion, Config, Error, Gateway, LlmName, MemoryStore, Principal, Provider,
    PublishedLlm, Publisher, PublisherOptions, Reply, Role, SessionId, StaticTokens, Store, TaskId,
};

/// A transport under test: how a publisher reaches a gateway at `url`.
pub trait Transport: Send + Sync {
    /// The publisher's wire to the gateway at `url`, with a bearer token.
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire>;
}

/// The SSE transport: `SseWire`, results posted as NDJSON.
pub struct SseTransport;

impl Transport for SseTransport {
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(virtual_llm::sse::SseWire::new(url, token).unwrap())
    }
}

/// The WebSocket transport: `WsWire`, everything on one socket.
pub struct WsTransport;

impl Transport for WsTransport {
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(virtual_llm::ws::WsWire::new(url, token).unwrap())
    }
}

/// The bearer token of a test principal: `alice` and `mallory` publish, `client`
/// calls, anyone else has no valid token.
pub fn token(who: &str) -> String {
    format!("{who}-token")
}

struct Server {
    shutdown: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A running gateway. Clones share it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct TestGateway {
    pub url: String,
    pub addr: SocketAddr,
    pub gateway: Gateway,
    http: reqwest::Client,
    _server: Arc<Server>,
}

impl TestGateway {
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, Arc::new(MemoryStore::new()), None).await
    }

    /// A gateway over `store`, reading wall-clock time from `clock` (default: the
    /// system clock).
    pub async fn start_with(
        config: Config,
        store: Arc<dyn Store>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Self {
        let auth = StaticTokens::new()
            .with(token("alice"), Principal::new("alice", [Role::Publisher]))
            .with(
                token("mallory"),
                Principal::new("mallory", [Role::Publisher]),
            )
            .with(token("client"), Principal::new("client", [Role::Client]));
        let mut builder = Gateway::builder(store)
            .config(config)
            .authenticator(Arc::new(auth));
        if let Some(clock) = clock {
            builder = builder.clock(clock);
        }
        let gateway = builder.start().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let (shutdown, mut stop) = watch::channel(false);
        let routes = virtual_llm::http::routes(
            gateway.clone(),
            [
                virtual_llm::sse::route(gateway.clone()),
                virtual_llm::ws::route(gateway.clone()),
            ],
        );
        let closing = gateway.clone();
        tokio::spawn(virtual_llm::http::serve(
            listener,
            routes,
            async move {
                let _ = stop.wait_for(|s| *s).await;
                closing.close_channels("test over");
            },
            Duration::from_secs(1),
        ));
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .unwrap();
        TestGateway {
            url,
            addr,
            gateway,
            http,
            _server: Arc::new(Server { shutdown }),
        }
    }

    pub fn clone_handle(&self) -> Self {
        self.clone()
    }

    fn base(&self) -> String {
        format!("{}{}", self.url, self.gateway.config().base_path)
    }

    pub async fn publish(
        &self,
        t: &dyn Transport,
        who: &str,
        names: &[&str],
        provider: Arc<dyn Provider>,
    ) -> Publisher {
        self.publish_with(t, who, names, provider, PublisherOptions::default())
            .await
    }

    pub async fn publish_with(
        &self,
        t: &dyn Transport,
        who: &str,
        names: &[&str],
        provider: Arc<dyn Provider>,
        options: PublisherOptions,
    ) -> Publisher {
        self.publish_at(&self.url, t, who, names, provider, options)
            .await
    }

    /// Publishes through the gateway reachable at `url` (e.g. a [`Proxy`] in front of
    /// this one), and waits until connected.
    pub async fn publish_at(
        &self,
        url: &str,
        t: &dyn Transport,
        who: &str,
        names: &[&str],
        provider: Arc<dyn Provider>,
        options: PublisherOptions,
    ) -> Publisher {
        let publisher = self.spawn_publisher(url, t, who, names, provider, options);
        tokio::time::timeout(Duration::from_secs(10), publisher.connected())
            .await
            .expect("the publisher connects");
        publisher
    }

    /// Starts publishing `names` through the gateway reachable at `url`, without
    /// waiting for the connection.
    pub fn spawn_publisher(
        &self,
        url: &str,
        t: &dyn Transport,
        who: &str,
        names: &[&str],
        provider: Arc<dyn Provider>,
        options: PublisherOptions,
    ) -> Publisher {
        let llms = names
            .iter()
            .map(|n| PublishedLlm {
                spec: LlmSpec {
                    name: LlmName::parse(n).unwrap(),
                    provider_type: "openai".into(),
                    model: format!("{n}-model"),
                    tier: None,
                },
                provider: provider.clone(),
            })
            .collect();
        Publisher::spawn(t.wire(url, Some(token(who))), llms, options)
    }

    /// Starts a [`Proxy`] to this gateway.
    pub async fn proxy(&self) -> Proxy {
        Proxy::start(self.addr).await
    }

    pub async fn post_chat(&self, who: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(token(who))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn chat(&self, who: &str, model: &str, text: &str, stream: bool) -> (u16, Value) {
        let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]});
        let response = self.post_chat(who, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn chat_stream(&self, who: &str, model: &str, text: &str) -> SseReader {
        let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": text}]});
        let response = self.post_chat(who, body).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let events = response
            .bytes_stream()
            .eventsource()
            .map(|e| e.map(|e| (e.event, e.data)).map_err(|e| e.to_string()));
        SseReader {
            events: events.boxed(),
        }
    }

    /// Like [`TestGateway::chat_stream`], over a connection of its own whose receive
    /// buffer (`SO_RCVBUF`) is `recv_buffer` bytes: a client that stops reading it
    /// stalls the gateway after a few kilobytes rather than megabytes.
    pub async fn chat_stream_with_recv_buffer(
        &self,
        who: &str,
        model: &str,
        text: &str,
        recv_buffer: u32,
    ) -> SseReader {
        let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": text}]});
        let stream = connect_with_recv_buffer(self.addr, Some(recv_buffer)).await;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::post("/v1/chat/completions")
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {}", token(who)))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let events = http_body_util::BodyDataStream::new(response.into_body())
            .eventsource()
            .map(|e| e.map(|e| (e.event, e.data)).map_err(|e| e.to_string()));
        SseReader {
            events: events.boxed(),
        }
    }

    /// A streaming chat request written by hand on a connection of its own, as a raw
    /// HTTP/1.1 client sends it: no `Connection: close`, so the server may keep the
    /// connection open after the response.
    pub async fn raw_chat_stream(&self, who: &str, model: &str) -> RawResponse {
        use tokio::io::AsyncWriteExt;
        let body =
            json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "x"}]})
                .to_string();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            token(who),
            body.len()
        );
        let mut socket = connect_with_recv_buffer(self.addr, None).await;
        socket.write_all(request.as_bytes()).await.unwrap();
        RawResponse {
            socket,
            received: Vec::new(),
        }
    }

    pub async fn get_json(&self, who: &str, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token(who))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn get_status(&self, who: &str, name: &str) -> u16 {
        let response = self
            .http
            .get(format!("{}/{name}", self.base()))
            .bearer_auth(token(who))
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    }

    pub async fn row(&self, name: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/{name}", self.base()))
            .bearer_auth(token("client"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn row_status(&self, name: &str) -> String {
        self.row(name).await["status"].as_str().unwrap().to_owned()
    }

    pub async fn list(&self) -> Value {
        let response = self
            .http
            .get(self.base())
            .bearer_auth(token("client"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn post_raw(&self, who: &str, path: &str, body: &str) -> u16 {
        let response = self
            .http
            .post(format!("{}/{path}", self.base()))
            .bearer_auth(token(who))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status >= 400 {
            let body: Value = response.json().await.unwrap();
            assert!(
                body["error"]["message"].is_string(),
                "OpenAI-shaped error: {body}"
            );
        }
        status
    }

    pub async fn register_raw(&self, who: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/_provider-register", self.base()))
            .bearer_auth(token(who))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn post_result(
        &self,
        who: &str,
        session: &str,
        task: &TaskId,
        result: &TaskResult,
    ) -> u16 {
        let response = self
            .http
            .post(format!("{}/_provider-task/{task}/result", self.base()))
            .bearer_auth(token(who))
            .header(virtual_llm::protocol::SESSION_HEADER, session)
            .json(result)
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    }
}

/// Reads a chat-completion event stream.
pub struct SseReader {
    events: BoxStream<'static, Result<(String, String), String>>,
}

impl SseReader {
    /// The next event's data (`[DONE]` included); `None` when the stream ends.
    pub async fn next_data(&mut self) -> Option<String> {
        match self.events.next().await? {
            Ok((_, data)) => Some(data),
            Err(e) => panic!("the stream broke: {e}"),
        }
    }

    /// The next event's name (`message` unless the gateway named it, e.g. `error`) and
    /// data; `None` when the stream ends.
    pub async fn next_event(&mut self) -> Option<(String, String)> {
        match self.events.next().await? {
            Ok(event) => Some(event),
            Err(e) => panic!("the stream broke: {e}"),
        }
    }

    /// The concatenated delta contents up to `[DONE]`.
    pub async fn text(mut self) -> String {
        let mut text = String::new();
        while let Some(data) = self.next_data().await {
            if data == "[DONE]" {
                return text;
            }
            let chunk: Value = serde_json::from_str(&data).unwrap();
            text.push_str(
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default(),
            );
        }
        panic!("the stream ended without [DONE]")
    }
}

/// The bytes of an HTTP response as they come off the socket, chunked encoding and all.
pub struct RawResponse {
    socket: tokio::net::TcpStream,
    pub received: Vec<u8>,
}

impl RawResponse {
    /// Reads until `needle` has arrived; panics if the connection closes first.
    pub async fn read_until(&mut self, needle: &str) {
        use tokio::io::AsyncReadExt;
        while !String::from_utf8_lossy(&self.received).contains(needle) {
            let mut buf = [0u8; 4096];
            let n = self.socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {needle:?}: {}", self.text());
            self.received.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads until the server closes the connection; everything received, as text.
    pub async fn read_to_close(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        self.socket.read_to_end(&mut self.received).await.unwrap();
        self.text()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// Waits (polling every 10 ms, at most 5 s) for an event the test cannot await
/// directly, such as the gateway noticing a closed connection.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A connection to `addr` whose receive buffer is `recv_buffer` bytes, if given.
pub async fn connect_with_recv_buffer(
    addr: SocketAddr,
    recv_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A TCP proxy in front of the gateway, for one publisher. [`Proxy::kill`] cuts every
/// connection through it at once and refuses new ones: the gateway sees the
/// publisher's sockets close without a goodbye (no WebSocket close frame, an SSE stream
/// and result posts cut mid-body), as when the publisher's process is killed.
/// [`Proxy::freeze`] stops passing bytes either way but keeps the connections open, as
/// when the publisher's host hangs or its network drops packets; [`Proxy::revive`] lets
/// everything through again, for the publisher's restart.
pub struct Proxy {
    pub url: String,
    /// Bumped by each kill; a connection lives only as long as the epoch it began in.
    epoch: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
    accepting: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (epoch, epochs) = watch::channel(0u64);
        let (frozen, freezes) = watch::channel(false);
        let accepting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open = accepting.clone();
        tokio::spawn(async move {
            let mut closed = epochs.clone();
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                    // The proxy was dropped.
                    _ = closed.wait_for(|_| false) => return,
                };
                if !open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped at once: the publisher's connect fails
                }
                let mut epochs = epochs.clone();
                let born = *epochs.borrow_and_update();
                let freezes = freezes.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut from_publisher, mut to_publisher) = inbound.split();
                    let (mut from_gateway, mut to_gateway) = outbound.split();
                    let both = futures::future::join(
                        pump(&mut from_publisher, &mut to_gateway, freezes.clone()),
                        pump(&mut from_gateway, &mut to_publisher, freezes),
                    );
                    tokio::select! {
                        _ = both => {}
                        // Killed (or the proxy dropped): both sockets close here, mid-flight.
                        _ = epochs.wait_for(|e| *e != born) => {}
                    }
                });
            }
        });
        Proxy {
            url,
            epoch,
            frozen,
            accepting,
        }
    }

    /// Cuts every connection now, and refuses new ones until [`Proxy::revive`].
    pub fn kill(&self) {
        self.accepting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Passes no more bytes, either way, until [`Proxy::revive`]; connections stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets new connections and bytes through again.
    pub fn revive(&self) {
        self.frozen.send_replace(false);
        self.accepting
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies bytes one way until end of stream, pausing while `frozen`.
async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin + Send),
    to: &mut (impl tokio::io::AsyncWrite + Unpin + Send),
    mut frozen: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let thawed = frozen.wait_for(|f| !*f).await.is_ok();
        if !thawed {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = async { frozen.wait_for(|f| *f).await.map(|_| ()) } => continue,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("virtual-llm-test-{}", SessionId::generate()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

fn chunk(task: &TaskFrame, text: &str) -> String {
    chunk_body(
        &format!("chatcmpl-{}", task.task_id),
        task.llm.as_str(),
        0,
        Some(text),
        None,
    )
    .to_string()
}

/// Streams "first", then waits until released, then "second". Records task ids.
#[derive(Debug, Default)]
pub struct Gated {
    gate: Arc<Notify>,
    released: std::sync::atomic::AtomicBool,
    tasks: Mutex<Vec<TaskId>>,
    arrived: Notify,
}

impl Gated {
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.gate.notify_one();
    }

    pub fn released(&self) -> bool {
        self.released.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The first task's id, once one arrived.
    pub async fn task_id(&self) -> TaskId {
        loop {
            let arrived = self.arrived.notified();
            if let Some(id) = self.tasks.lock().unwrap().first() {
                return id.clone();
            }
            arrived.await;
        }
    }
}

#[async_trait]
impl Provider for Gated {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.tasks.lock().unwrap().push(task.task_id.clone());
        self.arrived.notify_waiters();
        let gate = self.gate.clone();
        let (first, second) = (chunk(&task, "first"), chunk(&task, "second"));
        let rest = futures::stream::once(async move {
            gate.notified().await;
            Ok(second)
        });
        Ok(Reply::Stream(
            futures::stream::once(async move { Ok(first) })
                .chain(rest)
                .boxed(),
        ))
    }
}

/// Streams "first", then waits until released, then fails as an upstream that broke
/// off would (the publisher reports an error mid-stream).
#[derive(Debug, Default)]
pub struct FailsWhenReleased {
    gate: Arc<Notify>,
}

impl FailsWhenReleased {
    pub fn release(&self) {
        self.gate.notify_one();
    }
}

#[async_trait]
impl Provider for FailsWhenReleased {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let gate = self.gate.clone();
        let first = chunk(&task, "first");
        let failure = futures::stream::once(async move {
            gate.notified().await;
            Err(Error::Upstream {
                message: "the model crashed".into(),
            })
        });
        Ok(Reply::Stream(
            futures::stream::once(async move { Ok(first) })
                .chain(failure)
                .boxed(),
        ))
    }
}

/// Never finishes: streams one chunk then hangs, or hangs outright. Signals `dropped`
/// when its work is dropped (the task was cancelled).
#[derive(Debug, Default)]
pub struct Hanging {
    pub dropped: Arc<Notify>,
}

struct DropSignal(Arc<Notify>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl Provider for Hanging {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let guard = DropSignal(self.dropped.clone());
        if !task.stream {
            let _guard = guard;
            std::future::pending::<()>().await;
            return Ok(Reply::Complete(Completion {
                status: 200,
                body: Value::Null,
            }));
        }
        let first = chunk(&task, "first");
        let forever = futures::stream::once(async move {
            let _guard = guard;
            std::future::pending::<Result<String, Error>>().await
        });
        Ok(Reply::Stream(
            futures::stream::once(async move { Ok(first) })
                .chain(forever)
                .boxed(),
        ))
    }
}

/// Streams as fast as it is asked to: the user message is `<label> n=<count>`, and the
/// answer is `count` chunks of 1000 `x`s; with `every=<k>` it pauses a millisecond
/// after every `k` chunks (a fast model, not an infinitely fast one). Counts the chunks
/// produced per label, so a test sees how far ahead of its client a stream ran;
/// signals `dropped` when a stream's work is dropped (finished or cancelled).
#[derive(Debug, Default)]
pub struct Firehose {
    produced: Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicUsize>>>,
    pub dropped: Arc<Notify>,
}

impl Firehose {
    fn counter(&self, label: &str) -> Arc<std::sync::atomic::AtomicUsize> {
        self.produced
            .lock()
            .unwrap()
            .entry(label.to_owned())
            .or_default()
            .clone()
    }

    /// How many chunks the streams labelled `label` have produced.
    pub fn produced(&self, label: &str) -> usize {
        self.counter(label)
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Provider for Firehose {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let text = virtual_llm::openai::last_user_text(&task.body);
        let mut words = text.split_whitespace();
        let label = words.next().unwrap_or_default().to_owned();
        let words: Vec<&str> = words.collect();
        let param = |name: &str| -> Option<usize> {
            words
                .iter()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|n| n.parse().ok())
        };
        let count = param("n=").unwrap_or(1);
        let every = param("every=");
        let counter = self.counter(&label);
        let piece = chunk(&task, &"x".repeat(1000));
        let guard = DropSignal(self.dropped.clone());
        let chunks = futures::stream::iter(0..count).then(move |i| {
            let counter = counter.clone();
            let piece = piece.clone();
            let _held = &guard;
            async move {
                if every.is_some_and(|k| i > 0 && i % k == 0) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(piece)
            }
        });
        Ok(Reply::Stream(chunks.boxed()))
    }
}
