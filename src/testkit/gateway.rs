//! [`TestGateway`]: a real gateway served on `127.0.0.1:0` with token auth and an
//! in-memory store (or a store and clock of the test's choosing), with HTTP client
//! helpers that speak to it as an OpenAI client would ([`SseReader`],
//! [`RawResponse`]) and publishers connected through a [`Transport`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use tokio::sync::watch;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use super::plane::Plane;
use super::proxy::Proxy;
use super::support::{connect_with_recv_buffer, token};
use super::transport::Transport;
use crate::protocol::{LlmSpec, TaskResult};
use crate::{
    Clock, Config, Gateway, GatewayBuilder, LlmName, MemoryStore, Principal, Provider,
    PublishedLlm, Publisher, PublisherOptions, ReplicaId, Role, StaticTokens, Store, TaskId,
};

struct Server {
    shutdown: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A gateway builder with the test principals' tokens (`alice` and `mallory` publish,
/// `client` and `bob` call), `config` and, if given,
/// `clock`.
fn builder(config: Config, store: Arc<dyn Store>, clock: Option<Arc<dyn Clock>>) -> GatewayBuilder {
    let auth = StaticTokens::new()
        .with(token("alice"), Principal::new("alice", [Role::Publisher]))
        .with(
            token("mallory"),
            Principal::new("mallory", [Role::Publisher]),
        )
        .with(token("client"), Principal::new("client", [Role::Client]))
        .with(token("bob"), Principal::new("bob", [Role::Client]));
    let mut builder = Gateway::builder(store)
        .config(config)
        .authenticator(Arc::new(auth));
    if let Some(clock) = clock {
        builder = builder.clock(clock);
    }
    builder
}

/// Serves `gateway` on `127.0.0.1:0` with the HTTP surface and `channels`: its URL,
/// its address, and the server, which stops (telling publishers) when dropped.
async fn serve(
    gateway: &Gateway,
    channels: Vec<BoxedFilter<(Response,)>>,
) -> (String, SocketAddr, Server) {
    let mut options = crate::http::ServeOptions::default();
    options.grace = Duration::from_secs(1);
    serve_with(gateway, channels, options).await
}

/// [`serve`] with the server's `options`.
async fn serve_with(
    gateway: &Gateway,
    channels: Vec<BoxedFilter<(Response,)>>,
    options: crate::http::ServeOptions,
) -> (String, SocketAddr, Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let (shutdown, mut stop) = watch::channel(false);
    let routes = crate::http::routes(gateway.clone(), channels);
    let closing = gateway.clone();
    tokio::spawn(crate::http::serve_with(
        listener,
        routes,
        async move {
            let _ = stop.wait_for(|s| *s).await;
            closing.close_channels("test over");
        },
        options,
    ));
    (url, addr, Server { shutdown })
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

/// A replica id unique in this process, starting with `prefix`.
fn replica(prefix: &str) -> ReplicaId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ReplicaId::parse(&format!("{prefix}-{}-{n}", std::process::id())).unwrap()
}

/// A running gateway (or, on a [`Plane`], two replicas: one for publishers, one for
/// clients). Clones share it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct TestGateway {
    /// The gateway's base URL, `http://127.0.0.1:<port>`: where clients call.
    pub url: String,
    /// The address clients connect to.
    pub addr: SocketAddr,
    /// The gateway clients call.
    pub gateway: Gateway,
    /// Where publishers connect: [`TestGateway::url`], or on a plane the other
    /// replica's URL.
    pub publisher_url: String,
    /// The address publishers connect to.
    pub publisher_addr: SocketAddr,
    /// The gateway publishers connect to: [`TestGateway::gateway`], or on a plane the
    /// other replica.
    pub publisher_gateway: Gateway,
    http: reqwest::Client,
    _servers: Arc<Vec<Server>>,
}

impl TestGateway {
    /// A gateway with `config` over a fresh in-memory store, serving both bundled
    /// transports' control channels.
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, Arc::new(MemoryStore::new()), None).await
    }

    /// A gateway with `config` over a fresh in-memory store, serving only transport
    /// `t`'s control channel: the gateway the transport conformance suite runs on.
    pub async fn start_for(t: &dyn Transport, config: Config) -> Self {
        Self::start_on_with(t, None, config, &|b| b).await
    }

    /// A gateway over `store`, reading wall-clock time from `clock` (default: the
    /// system clock), serving both bundled transports' control channels.
    pub async fn start_with(
        config: Config,
        store: Arc<dyn Store>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Self {
        let gateway = builder(config, store, clock).start().await.unwrap();
        let channels = vec![
            crate::sse::route(gateway.clone()),
            crate::ws::route(gateway.clone()),
        ];
        Self::serving(gateway, channels).await
    }

    /// A gateway with `config` over a fresh in-memory store, serving both bundled
    /// transports' control channels, its server run with `options` (a short write
    /// timeout, a connection cap…).
    pub async fn start_serving(config: Config, options: crate::http::ServeOptions) -> Self {
        let gateway = builder(config, Arc::new(MemoryStore::new()), None)
            .start()
            .await
            .unwrap();
        let channels = vec![
            crate::sse::route(gateway.clone()),
            crate::ws::route(gateway.clone()),
        ];
        let (url, addr, server) = serve_with(&gateway, channels, options).await;
        TestGateway {
            publisher_url: url.clone(),
            publisher_addr: addr,
            publisher_gateway: gateway.clone(),
            url,
            addr,
            gateway,
            http: http_client(),
            _servers: Arc::new(vec![server]),
        }
    }

    /// The gateway the transport conformance suite runs on: with no plane, one
    /// gateway as [`TestGateway::start_for`]; on `plane`, two replicas over one
    /// in-memory store, each served on its own port with `t`'s control channel, linked
    /// by the plane: publishers connect to the first
    /// ([`TestGateway::publisher_gateway`]), clients call the second
    /// ([`TestGateway::gateway`]).
    pub async fn start_on(t: &dyn Transport, plane: Option<&dyn Plane>, config: Config) -> Self {
        Self::start_on_with(t, plane, config, &|b| b).await
    }

    /// Like [`TestGateway::start_on`], with `hook` applied to each gateway's builder
    /// (each replica's, on a plane) before it starts: to add a
    /// [`Waker`](crate::Waker) with [`GatewayBuilder::waker`], say.
    pub async fn start_on_with(
        t: &dyn Transport,
        plane: Option<&dyn Plane>,
        config: Config,
        hook: &(dyn Fn(GatewayBuilder) -> GatewayBuilder + Sync),
    ) -> Self {
        let Some(plane) = plane else {
            let gateway = hook(builder(config, Arc::new(MemoryStore::new()), None))
                .start()
                .await
                .unwrap();
            let channels = vec![t.route(gateway.clone())];
            return Self::serving(gateway, channels).await;
        };
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let publisher_side = plane
            .join(
                hook(builder(config.clone(), store.clone(), None)),
                replica("a"),
            )
            .await
            .unwrap();
        let client_side = plane
            .join(hook(builder(config, store, None)), replica("b"))
            .await
            .unwrap();
        let publisher_channels = vec![t.route(publisher_side.clone())];
        let (publisher_url, publisher_addr, publisher_server) =
            serve(&publisher_side, publisher_channels).await;
        let client_channels = vec![t.route(client_side.clone())];
        let (url, addr, client_server) = serve(&client_side, client_channels).await;
        TestGateway {
            url,
            addr,
            gateway: client_side,
            publisher_url,
            publisher_addr,
            publisher_gateway: publisher_side,
            http: http_client(),
            _servers: Arc::new(vec![client_server, publisher_server]),
        }
    }

    /// Serves `gateway` with the HTTP surface and `channels`.
    async fn serving(gateway: Gateway, channels: Vec<BoxedFilter<(Response,)>>) -> Self {
        let (url, addr, server) = serve(&gateway, channels).await;
        TestGateway {
            publisher_url: url.clone(),
            publisher_addr: addr,
            publisher_gateway: gateway.clone(),
            url,
            addr,
            gateway,
            http: http_client(),
            _servers: Arc::new(vec![server]),
        }
    }

    /// Another handle to the same gateway.
    pub fn clone_handle(&self) -> Self {
        self.clone()
    }

    fn base(&self) -> String {
        format!("{}{}", self.url, self.gateway.config().base_path)
    }

    /// The base of the provider routes, on the publishers' replica.
    fn publisher_base(&self) -> String {
        format!("{}{}", self.publisher_url, self.gateway.config().base_path)
    }

    /// Publishes `names` as `who` through transport `t`, all served by `provider`, and
    /// waits until connected.
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

    /// Like [`TestGateway::publish`], with publisher options (a session file…).
    pub async fn publish_with(
        &self,
        t: &dyn Transport,
        who: &str,
        names: &[&str],
        provider: Arc<dyn Provider>,
        options: PublisherOptions,
    ) -> Publisher {
        self.publish_at(&self.publisher_url, t, who, names, provider, options)
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
    /// waiting for the connection. Several URLs separated by commas fail over from one
    /// to the next, as `publisher --gateway A,B` does.
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
            .map(|n| {
                PublishedLlm::new(
                    LlmSpec {
                        name: LlmName::parse(n).unwrap(),
                        provider_type: "openai".into(),
                        model: format!("{n}-model"),
                        tier: None,
                        pool: None,
                        max_concurrent: None,
                        state: None,
                        access: Default::default(),
                    },
                    provider.clone(),
                )
            })
            .collect();
        let mut wires: Vec<Arc<dyn crate::publisher::Wire>> = url
            .split(',')
            .map(|url| t.wire(url, Some(token(who))))
            .collect();
        let wire = match wires.len() {
            1 => wires.remove(0),
            _ => Arc::new(crate::publisher::FailoverWire::new(wires).expect("URLs")),
        };
        Publisher::spawn(wire, llms, options)
    }

    /// Publishes one LLM `name` in `pool` with capacity `max_concurrent` as `who`
    /// through transport `t`, served by `provider`, and waits until connected.
    pub async fn publish_member(
        &self,
        t: &dyn Transport,
        who: &str,
        name: &str,
        pool: &str,
        max_concurrent: Option<u32>,
        provider: Arc<dyn Provider>,
    ) -> Publisher {
        let mut spec = LlmSpec::new(LlmName::parse(name).unwrap(), "openai", "m");
        spec.pool = Some(LlmName::parse(pool).unwrap());
        spec.max_concurrent = max_concurrent;
        let llms = vec![PublishedLlm::new(spec, provider)];
        let wire = t.wire(&self.publisher_url, Some(token(who)));
        let publisher = Publisher::spawn(wire, llms, PublisherOptions::default());
        tokio::time::timeout(Duration::from_secs(10), publisher.connected())
            .await
            .expect("the publisher connects");
        publisher
    }

    /// Publishes `llms`, built by the test (with recipes, an idle timer, a ready
    /// timeout…), as `who` through transport `t`, and waits until connected.
    pub async fn publish_llms(
        &self,
        t: &dyn Transport,
        who: &str,
        llms: Vec<PublishedLlm>,
    ) -> Publisher {
        let wire = t.wire(&self.publisher_url, Some(token(who)));
        let publisher = Publisher::spawn(wire, llms, PublisherOptions::default());
        tokio::time::timeout(Duration::from_secs(10), publisher.connected())
            .await
            .expect("the publisher connects");
        publisher
    }

    /// `GET <base><path>` as `who`: the status, the `Retry-After` header and the
    /// JSON body.
    pub async fn get_registry(&self, who: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(token(who))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Starts a [`Proxy`] to this gateway.
    pub async fn proxy(&self) -> Proxy {
        Proxy::start(self.publisher_addr).await
    }

    /// Posts a chat-completion request `body` as `who`. A streamed one goes on a
    /// connection of its own: a stream that fails midway ends with its connection
    /// closed by the gateway (after the `error` event, when the status line is long
    /// sent), and a request of the test's that reused that connection from the pool
    /// would race the close (`IncompleteMessage`).
    pub async fn post_chat(&self, who: &str, body: Value) -> reqwest::Response {
        let client = if body["stream"] == Value::Bool(true) {
            http_client()
        } else {
            self.http.clone()
        };
        client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(token(who))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A one-message chat as `who`: the status and the JSON body (the whole answer, or
    /// an error).
    pub async fn chat(&self, who: &str, model: &str, text: &str, stream: bool) -> (u16, Value) {
        let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]});
        let response = self.post_chat(who, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// A streaming one-message chat as `who`; asserts a 200 event stream.
    pub async fn chat_stream(&self, who: &str, model: &str, text: &str) -> SseReader {
        let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": text}]});
        let response = self.post_chat(who, body).await;
        SseReader::of(response)
    }

    /// `GET /v1/chat/completions/{id}/stream` as `who`, on a connection of its own,
    /// with the query `query` (`starting_after=3`) and a `Last-Event-ID` header, if
    /// given: the response, whatever its status ([`SseReader::of`] reads a 200).
    pub async fn resume(
        &self,
        who: &str,
        id: &str,
        query: Option<&str>,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut url = format!("{}/v1/chat/completions/{id}/stream", self.url);
        if let Some(query) = query {
            url = format!("{url}?{query}");
        }
        let mut request = http_client().get(url).bearer_auth(token(who));
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last);
        }
        request.send().await.unwrap()
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
        let completion_id = completion_id(response.headers());
        let events = http_body_util::BodyDataStream::new(response.into_body())
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string()));
        SseReader {
            events: events.boxed(),
            completion_id,
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

    /// `GET <url><path>` as `who`; asserts 200 and returns the JSON body.
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

    /// `GET <url><path>` as `who` (`None`: without a token): the status and the JSON
    /// body, whatever the status.
    pub async fn get_any(&self, who: Option<&str>, path: &str) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.url));
        if let Some(who) = who {
            request = request.bearer_auth(token(who));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `POST <url><path>` of `body` as `who`: the status and the JSON body.
    pub async fn post_any(&self, who: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token(who))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The status of `GET <base>/<name>` (one row of the registry) as `who`.
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

    /// The registry row `name`, as the client sees it.
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

    /// The status (`active`, `inactive`) of the registry row `name`.
    pub async fn row_status(&self, name: &str) -> String {
        self.row(name).await["status"].as_str().unwrap().to_owned()
    }

    /// The whole registry, as the client sees it.
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

    /// The status of `POST <base>/<path>` (a provider route: on the publishers'
    /// replica) with `body` as `who`; an error must be
    /// OpenAI-shaped.
    pub async fn post_raw(&self, who: &str, path: &str, body: &str) -> u16 {
        let response = self
            .http
            .post(format!("{}/{path}", self.publisher_base()))
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

    /// Registers by hand (`POST <base>/_provider-register`) as `who`; asserts 200 and
    /// returns the answer.
    pub async fn register_raw(&self, who: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/_provider-register", self.publisher_base()))
            .bearer_auth(token(who))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Posts one `result` for `task` as `who` with session header `session`, as an SSE
    /// publisher does; the status.
    pub async fn post_result(
        &self,
        who: &str,
        session: &str,
        task: &TaskId,
        result: &TaskResult,
    ) -> u16 {
        let response = self
            .http
            .post(format!(
                "{}/_provider-task/{task}/result",
                self.publisher_base()
            ))
            .bearer_auth(token(who))
            .header(crate::protocol::SESSION_HEADER, session)
            .json(result)
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    }
}

/// The `x-completion-id` header of a response, if any.
fn completion_id(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get("x-completion-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Reads a chat-completion event stream.
pub struct SseReader {
    events: BoxStream<'static, Result<eventsource_stream::Event, String>>,
    completion_id: Option<String>,
}

impl SseReader {
    /// Reads `response`, asserting a 200 event stream.
    pub fn of(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let completion_id = completion_id(response.headers());
        let events = response
            .bytes_stream()
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string()));
        SseReader {
            events: events.boxed(),
            completion_id,
        }
    }

    /// The stream's `x-completion-id` header: the id to resume it with.
    pub fn completion_id(&self) -> Option<&str> {
        self.completion_id.as_deref()
    }

    /// The next event's data (`[DONE]` included); `None` when the stream ends.
    pub async fn next_data(&mut self) -> Option<String> {
        Some(self.next_event().await?.1)
    }

    /// The next event's name (`message` unless the gateway named it, e.g. `error`) and
    /// data; `None` when the stream ends.
    pub async fn next_event(&mut self) -> Option<(String, String)> {
        let (event, data, _) = self.next_with_id().await?;
        Some((event, data))
    }

    /// The next event's name, data and last event id (the SSE `id:` of this event, or
    /// the one before it if it has none); `None` when the stream ends.
    pub async fn next_with_id(&mut self) -> Option<(String, String, String)> {
        match self.events.next().await? {
            Ok(e) => Some((e.event, e.data, e.id)),
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
    /// Everything received so far.
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

    /// Everything received so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}
