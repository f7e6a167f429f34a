//! The conformance suite's harness: a gateway on `127.0.0.1:0` with token auth and an
//! in-memory store, HTTP client helpers that speak to it as an OpenAI client would,
//! and providers instrumented to show what reached them.

use std::future::Future;
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
    Completion, Config, Error, Gateway, LlmName, MemoryStore, Principal, Provider, PublishedLlm,
    Publisher, PublisherOptions, Reply, Role, SessionId, StaticTokens, TaskId,
};

/// A transport under test: how a publisher reaches a gateway at `url`.
pub trait Transport: Send + Sync {
    /// The publisher's wire to the gateway at `url`, with a bearer token.
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire>;
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
    pub gateway: Gateway,
    http: reqwest::Client,
    _server: Arc<Server>,
}

impl TestGateway {
    pub async fn start(config: Config) -> Self {
        let auth = StaticTokens::new()
            .with(token("alice"), Principal::new("alice", [Role::Publisher]))
            .with(
                token("mallory"),
                Principal::new("mallory", [Role::Publisher]),
            )
            .with(token("client"), Principal::new("client", [Role::Client]));
        let gateway = Gateway::builder(Arc::new(MemoryStore::new()))
            .config(config)
            .authenticator(Arc::new(auth))
            .start()
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, mut stop) = watch::channel(false);
        let routes =
            virtual_llm::sse::routes_with(gateway.clone(), virtual_llm::ws::route(gateway.clone()));
        let closing = gateway.clone();
        tokio::spawn(virtual_llm::sse::serve(
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
        let publisher = Publisher::spawn(t.wire(&self.url, Some(token(who))), llms, options);
        tokio::time::timeout(Duration::from_secs(10), publisher.connected())
            .await
            .expect("the publisher connects");
        publisher
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
            .header(virtual_llm::sse::SESSION_HEADER, session)
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
