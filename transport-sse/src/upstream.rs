//! Calling an OpenAI-compatible HTTP server: vLLM, llama.cpp's server, Ollama, LM Studio.
//!
//! All of these answer `POST {base_url}/chat/completions` the way OpenAI does: a JSON
//! `chat.completion`, or with `"stream": true` a server-sent event stream of
//! `chat.completion.chunk`s ending in `data: [DONE]`. This module is the one client of
//! that API in the project, used on both sides of the gateway:
//!
//! - [`OpenAiUpstream`] is the HTTP client for one such server. Its
//!   [`chat`](OpenAiUpstream::chat) relays a request and hands back a [`Reply`]: the
//!   whole completion, or a stream that yields each upstream SSE `data:` payload the
//!   moment it arrives (real per-token streaming, nothing is collected).
//! - [`OpenAiProvider`] is a publisher's local model: a
//!   [`Provider`](virtual_llm_core::Provider) that answers relayed tasks.
//! - [`OpenAiBackend`] is the gateway's answer for `kind=public` rows: a
//!   [`PublicBackend`](virtual_llm_core::PublicBackend) routing each public LLM name to
//!   its upstream.
//!
//! Clients call the gateway with the registry name as `model`; both the provider and the
//! backend replace it with the upstream's own model name before sending.
//!
//! Errors follow the core's contract: a non-2xx answer, an unreachable server and a
//! stream that breaks midway are all [`Error::Upstream`] (502) carrying the upstream's
//! own message, never a panic. Cancelling is dropping: dropping the future returned by
//! `chat`, or the stream it returned, drops the HTTP request and closes its connection,
//! so the upstream stops generating.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt, stream};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use virtual_llm_core::protocol::TaskFrame;
use virtual_llm_core::{
    ChunkStream, Completion, Error, InferRequest, LlmName, LlmRecord, Provider, PublicBackend,
    Reply,
};

/// How long to wait for a TCP (and TLS) connection to the upstream.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unknown public LLM should wait before retrying.
const UNKNOWN_LLM_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The most of an error answer's body read to find its message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of an upstream message kept in an [`Error::Upstream`].
const MAX_MESSAGE_CHARS: usize = 1000;
/// The largest non-streamed completion accepted, so a broken upstream cannot exhaust
/// memory.
const MAX_COMPLETION_BODY: usize = 32 * 1024 * 1024;
/// The payload that ends an OpenAI stream; it is not forwarded.
const DONE: &str = "[DONE]";

/// A client for one OpenAI-compatible server.
///
/// Cheap to clone: clones share one connection pool. Requests go to
/// `{base_url}/chat/completions`; an API key, when set, is sent as
/// `Authorization: Bearer <key>`. There is no overall request timeout (a stream can
/// run for minutes), only a connect timeout; callers bound a request by dropping it.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), virtual_llm_core::Error> {
/// use futures::StreamExt;
/// use serde_json::json;
/// use virtual_llm_core::Reply;
/// use virtual_llm_sse::OpenAiUpstream;
///
/// let vllm = OpenAiUpstream::new("http://127.0.0.1:8000/v1")?.with_api_key("sk-local")?;
/// let body = json!({
///     "model": "Qwen/Qwen2.5-7B-Instruct",
///     "messages": [{"role": "user", "content": "Hello"}],
/// });
/// if let Reply::Stream(mut chunks) = vllm.chat(body, true).await? {
///     while let Some(chunk) = chunks.next().await {
///         println!("{}", chunk?); // one serialized chat.completion.chunk
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct OpenAiUpstream {
    /// The base URL as configured, for logs and [`OpenAiUpstream::base_url`].
    base_url: String,
    /// `{base_url}/chat/completions`, computed once.
    endpoint: Url,
    /// `host:port` of the server: the only detail of it that error messages name.
    host: String,
    /// `Bearer <key>`, marked sensitive so that it never shows in logs.
    authorization: Option<HeaderValue>,
    /// Built once and shared by clones: one connection pool per upstream.
    client: reqwest::Client,
}

impl fmt::Debug for OpenAiUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiUpstream")
            .field("base_url", &self.base_url)
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl OpenAiUpstream {
    /// A client for the server at `base_url`, e.g. `http://127.0.0.1:8000/v1` (a
    /// trailing slash is fine), with no API key and a 10 s connect timeout.
    ///
    /// Fails with [`Error::InvalidRequest`] when `base_url` is not an `http` or `https`
    /// URL, or when the HTTP client cannot be built.
    pub fn new(base_url: &str) -> Result<Self, Error> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let endpoint = Url::parse(&format!("{trimmed}/chat/completions"))
            .map_err(|e| Error::invalid(format!("invalid upstream url {base_url:?}: {e}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "upstream url {base_url:?} must be http or https"
            )));
        }
        let host = match (endpoint.host_str(), endpoint.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => {
                return Err(Error::invalid(format!(
                    "upstream url {base_url:?} has no host"
                )));
            }
        };
        Ok(OpenAiUpstream {
            base_url: trimmed.to_owned(),
            endpoint,
            host,
            authorization: None,
            client: build_client(DEFAULT_CONNECT_TIMEOUT)?,
        })
    }

    /// Sends `api_key` as `Authorization: Bearer <api_key>` on every request.
    ///
    /// Fails with [`Error::InvalidRequest`] when the key cannot be a header value
    /// (control characters).
    pub fn with_api_key(mut self, api_key: &str) -> Result<Self, Error> {
        let mut value = HeaderValue::from_str(&format!("Bearer {api_key}"))
            .map_err(|_| Error::invalid("the upstream api key contains invalid characters"))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// Gives up connecting (TCP and TLS) after `timeout` instead of 10 s.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        self.client = build_client(timeout)?;
        Ok(self)
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Sends a chat-completions request and relays the answer.
    ///
    /// `body` is an OpenAI request and is sent as it is, except for `stream`:
    /// - `stream: false`: answers [`Reply::Complete`] with status 200 and the upstream's
    ///   `chat.completion` once the whole answer is in.
    /// - `stream: true` (set in the body too): answers [`Reply::Stream`] as soon as the
    ///   response headers arrive. The stream yields each SSE `data:` payload as its own
    ///   item the moment it arrives, skips comments and the final `[DONE]`, and ends
    ///   after one `Err` if the upstream breaks off or reports an error mid-stream.
    ///
    /// A non-2xx answer is [`Error::Upstream`] with the upstream's status and message;
    /// an unreachable server is [`Error::Upstream`] naming only its `host:port`.
    ///
    /// Dropping the returned future, or the stream, aborts the upstream request.
    pub async fn chat(&self, mut body: Value, stream: bool) -> Result<Reply, Error> {
        let Value::Object(fields) = &mut body else {
            return Err(Error::invalid("the request body must be a JSON object"));
        };
        if stream {
            fields.insert("stream".to_owned(), Value::Bool(true));
        } else if fields.contains_key("stream") {
            fields.insert("stream".to_owned(), Value::Bool(false));
        }
        let mut request = self.client.post(self.endpoint.clone()).json(&body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if stream {
            request = request.header(ACCEPT, "text/event-stream");
        }
        let response = request.send().await.map_err(|e| self.send_failed(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.error_answer(response).await);
        }
        if stream {
            self.stream_answer(response).await
        } else {
            self.complete_answer(response).await
        }
    }

    /// The whole `chat.completion` of a 2xx answer.
    async fn complete_answer(&self, response: reqwest::Response) -> Result<Reply, Error> {
        let body = match read_body(response, MAX_COMPLETION_BODY).await {
            Ok(Body::Complete(body)) => body,
            Ok(Body::Truncated(_)) => {
                return Err(upstream(format!(
                    "the answer of upstream {} is over {MAX_COMPLETION_BODY} bytes",
                    self.host
                )));
            }
            Err(e) => return Err(self.broke_off(&e)),
        };
        let body: Value = serde_json::from_slice(&body).map_err(|_| {
            upstream(format!(
                "upstream {} answered with a body that is not JSON",
                self.host
            ))
        })?;
        Ok(Reply::Complete(Completion { status: 200, body }))
    }

    /// The chunk stream of a 2xx answer to a streaming request.
    async fn stream_answer(&self, response: reqwest::Response) -> Result<Reply, Error> {
        let is_json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if is_json {
            // The server ignored `stream: true`, or reported an error with a 2xx.
            let status = response.status();
            let message = match read_body(response, MAX_ERROR_BODY).await {
                Ok(body) => error_message(body.bytes()),
                Err(e) => {
                    tracing::debug!(upstream = %self.host, error = %e, "reading a json answer failed");
                    None
                }
            };
            return Err(upstream(match message {
                Some(m) => format!("{status}: {m}"),
                None => format!(
                    "upstream {} answered a streaming request without an event stream",
                    self.host
                ),
            }));
        }
        Ok(Reply::Stream(chunks(
            response.bytes_stream().eventsource(),
            &self.host,
        )))
    }

    /// The [`Error::Upstream`] of a non-2xx answer, with the upstream's own message.
    async fn error_answer(&self, response: reqwest::Response) -> Error {
        let status = response.status();
        let message = match read_body(response, MAX_ERROR_BODY).await {
            Ok(body) => error_message(body.bytes()).unwrap_or_else(|| raw_message(body.bytes())),
            Err(e) => {
                tracing::debug!(upstream = %self.host, error = %e, "reading an error answer failed");
                String::new()
            }
        };
        tracing::debug!(upstream = %self.host, %status, %message, "upstream answered an error");
        upstream(describe_status(status, &message))
    }

    /// The request could not be sent, or no response came back.
    fn send_failed(&self, error: &reqwest::Error) -> Error {
        tracing::warn!(upstream = %self.host, error = %error, "upstream request failed");
        upstream(if error.is_timeout() {
            format!(
                "upstream {} is unreachable: it did not answer in time",
                self.host
            )
        } else if error.is_connect() {
            format!("upstream {} is unreachable", self.host)
        } else {
            format!("the request to upstream {} failed", self.host)
        })
    }

    /// The response body broke off.
    fn broke_off(&self, error: &reqwest::Error) -> Error {
        tracing::warn!(upstream = %self.host, error = %error, "upstream answer broke off");
        upstream(format!("the answer of upstream {} broke off", self.host))
    }
}

fn build_client(connect_timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        // Nagle plus delayed ACK would hold back small SSE chunks by ~40 ms.
        .tcp_nodelay(true)
        // A redirect of a POST is a misconfigured base URL: report it, do not follow.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("virtual-llm/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::invalid(format!("cannot build the upstream http client: {e}")))
}

fn upstream(message: String) -> Error {
    Error::Upstream { message }
}

/// A body read up to a limit.
enum Body {
    /// All of it.
    Complete(Bytes),
    /// Its first bytes; the rest was not read.
    Truncated(Bytes),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Complete(b) | Body::Truncated(b) => b,
        }
    }
}

/// Reads at most `limit` bytes of `response`'s body.
async fn read_body(mut response: reqwest::Response, limit: usize) -> reqwest::Result<Body> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if buf.len() + chunk.len() > limit {
            let room = limit - buf.len();
            buf.extend_from_slice(&chunk[..room]);
            return Ok(Body::Truncated(buf.freeze()));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Body::Complete(buf.freeze()))
}

/// The message of an error body in one of the shapes OpenAI-compatible servers use:
/// `{"error":{"message":..}}` (OpenAI, newer vLLM, llama.cpp), `{"error":".."}` (Ollama),
/// `{"message":..}` (older vLLM), `{"detail":..}` (FastAPI servers).
fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let message = match value.get("error") {
        Some(Value::Object(error)) => match error.get("message") {
            Some(Value::String(m)) => m.clone(),
            _ => Value::Object(error.clone()).to_string(),
        },
        Some(Value::String(m)) => m.clone(),
        _ => match (value.get("message"), value.get("detail")) {
            (Some(Value::String(m)), _) | (_, Some(Value::String(m))) => m.clone(),
            _ => return None,
        },
    };
    Some(truncate(message.trim()))
}

/// A body that is not a recognised error shape, as text.
fn raw_message(body: &[u8]) -> String {
    truncate(String::from_utf8_lossy(body).trim())
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// `"404 Not Found: the model does not exist"`, or the status alone.
fn describe_status(status: StatusCode, message: &str) -> String {
    if message.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {message}")
    }
}

/// The chunks of an upstream event stream: each event's data, in order, as it
/// arrives. Ends at `[DONE]` or the end of the body; ends after one `Err` when the body
/// breaks off, cannot be parsed, or carries an error.
fn chunks<S, E>(events: S, host: &str) -> ChunkStream
where
    S: Stream<Item = Result<Event, EventStreamError<E>>> + Send + 'static,
    E: fmt::Display,
{
    let host: Arc<str> = Arc::from(host);
    let events = Box::pin(events);
    stream::unfold(Some(events), move |state| {
        let host = Arc::clone(&host);
        async move {
            // `None` once the stream has ended: after `[DONE]` or an error.
            let mut events = state?;
            let item = match events.next().await? {
                Ok(event) if event.data.trim() == DONE => return None,
                Ok(event) => match stream_error(&event) {
                    Some(message) => Err(upstream(message)),
                    None => return Some((Ok(event.data), Some(events))),
                },
                Err(e) => {
                    tracing::warn!(upstream = %host, error = %e, "upstream stream broke off");
                    Err(upstream(format!("the stream of upstream {host} broke off")))
                }
            };
            Some((item, None))
        }
    })
    // Polling past the end answers `None` again rather than panicking.
    .fuse()
    .boxed()
}

/// The message of an error reported inside a stream: an `event: error`, or a data
/// payload shaped as an error instead of a chunk (vLLM's mid-stream errors).
fn stream_error(event: &Event) -> Option<String> {
    if event.event == "error" {
        return Some(error_message(event.data.as_bytes()).unwrap_or_else(|| truncate(&event.data)));
    }
    if !event.data.trim_start().starts_with('{') || !event.data.contains("\"error\"") {
        return None;
    }
    let value: Value = serde_json::from_str(&event.data).ok()?;
    if value.get("error").is_none() || value.get("choices").is_some() {
        return None;
    }
    error_message(event.data.as_bytes())
}

/// Replaces `model` with the upstream's name and relays: the one path of both the
/// provider and the backend.
async fn chat_as(
    upstream: &OpenAiUpstream,
    model: &str,
    mut body: Value,
    stream: bool,
) -> Result<Reply, Error> {
    let Value::Object(fields) = &mut body else {
        return Err(Error::invalid("the request body must be a JSON object"));
    };
    fields.insert("model".to_owned(), Value::String(model.to_owned()));
    upstream.chat(body, stream).await
}

/// A publisher's local model behind an OpenAI-compatible server.
///
/// Answers each task by sending its body upstream with `model` replaced by the
/// upstream's model name (clients call the gateway with the registry name). Streams
/// are relayed chunk by chunk as the model produces them; dropping the reply (a
/// `cancel` frame) aborts the upstream request.
///
/// # Example
///
/// ```no_run
/// # fn run() -> Result<(), virtual_llm_core::Error> {
/// use std::sync::Arc;
/// use virtual_llm_core::Provider;
/// use virtual_llm_sse::{OpenAiProvider, OpenAiUpstream};
///
/// let upstream = OpenAiUpstream::new("http://127.0.0.1:11434/v1")?;
/// let provider: Arc<dyn Provider> = Arc::new(OpenAiProvider::new(upstream, "llama3.2:3b"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct OpenAiProvider {
    upstream: OpenAiUpstream,
    /// The name the upstream knows the model by, sent instead of the registry name.
    model: String,
}

impl OpenAiProvider {
    /// A provider sending tasks to `upstream` as model `model`.
    pub fn new(upstream: OpenAiUpstream, model: impl Into<String>) -> Self {
        OpenAiProvider {
            upstream,
            model: model.into(),
        }
    }

    /// The upstream's model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The upstream server.
    pub fn upstream(&self) -> &OpenAiUpstream {
        &self.upstream
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        chat_as(&self.upstream, &self.model, task.body, task.stream).await
    }
}

/// The gateway's [`PublicBackend`]: each public LLM name routed to an
/// OpenAI-compatible upstream and the model name it knows there.
///
/// A name without a route answers [`Error::Unavailable`] (503) so that a client retries
/// once the configuration is fixed, rather than a 404 for a row that exists.
///
/// # Example
///
/// ```no_run
/// # fn run() -> Result<(), virtual_llm_core::Error> {
/// use virtual_llm_core::LlmName;
/// use virtual_llm_sse::{OpenAiBackend, OpenAiUpstream};
///
/// let openai = OpenAiUpstream::new("https://api.openai.com/v1")?.with_api_key("sk-…")?;
/// let backend = OpenAiBackend::new()
///     .with_llm(LlmName::parse("gpt-mini")?, openai.clone(), "gpt-4o-mini")
///     .with_llm(LlmName::parse("gpt")?, openai, "gpt-4o");
/// assert_eq!(backend.len(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct OpenAiBackend {
    routes: HashMap<LlmName, Route>,
}

/// Where one public LLM is answered.
#[derive(Clone, Debug)]
struct Route {
    upstream: OpenAiUpstream,
    model: String,
}

impl OpenAiBackend {
    /// A backend with no routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes the public LLM `name` to `upstream`, sending `model` as the model name.
    /// A second route for the same name replaces the first.
    pub fn with_llm(
        mut self,
        name: LlmName,
        upstream: OpenAiUpstream,
        model: impl Into<String>,
    ) -> Self {
        self.routes.insert(
            name,
            Route {
                upstream,
                model: model.into(),
            },
        );
        self
    }

    /// The routed LLM names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &LlmName> {
        self.routes.keys()
    }

    /// How many LLMs are routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no LLM is routed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[async_trait]
impl PublicBackend for OpenAiBackend {
    async fn infer(&self, llm: &LlmRecord, request: InferRequest) -> Result<Reply, Error> {
        let Some(route) = self.routes.get(&llm.name) else {
            tracing::warn!(llm = %llm.name, "public llm has no upstream configured");
            return Err(Error::Unavailable {
                kind: virtual_llm_core::UnavailableKind::Offline,
                reason: format!("public llm {} has no upstream configured", llm.name),
                retry_after: UNKNOWN_LLM_RETRY_AFTER,
            });
        };
        chat_as(&route.upstream, &route.model, request.body, request.stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_takes_a_trailing_slash_and_refuses_other_schemes() {
        for url in ["http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/"] {
            let u = OpenAiUpstream::new(url).unwrap();
            assert_eq!(
                u.endpoint.as_str(),
                "http://127.0.0.1:8000/v1/chat/completions"
            );
            assert_eq!(u.base_url(), "http://127.0.0.1:8000/v1");
            assert_eq!(u.host, "127.0.0.1:8000");
        }
        assert_eq!(
            OpenAiUpstream::new("https://api.example.com/v1")
                .unwrap()
                .host,
            "api.example.com:443"
        );
        for bad in ["ftp://x/v1", "not a url", ""] {
            assert_eq!(OpenAiUpstream::new(bad).unwrap_err().status(), 400, "{bad}");
        }
    }

    #[test]
    fn the_api_key_is_checked_and_never_printed() {
        let u = OpenAiUpstream::new("http://h/v1").unwrap();
        assert!(u.clone().with_api_key("bad\nkey").is_err());
        let u = u.with_api_key("sk-secret").unwrap();
        assert!(!format!("{u:?}").contains("sk-secret"));
    }

    #[test]
    fn error_messages_come_from_every_known_shape() {
        let cases: [(&str, Option<&str>); 7] = [
            (
                r#"{"error":{"message":"no such model","type":"x"}}"#,
                Some("no such model"),
            ),
            (
                r#"{"error":"model 'x' not found"}"#,
                Some("model 'x' not found"),
            ),
            (
                r#"{"object":"error","message":"too long","code":400}"#,
                Some("too long"),
            ),
            (
                r#"{"detail":"Not authenticated"}"#,
                Some("Not authenticated"),
            ),
            (r#"{"error":{"code":7}}"#, Some(r#"{"code":7}"#)),
            (r#"{"other":1}"#, None),
            ("<html>bad gateway</html>", None),
        ];
        for (body, want) in cases {
            assert_eq!(error_message(body.as_bytes()).as_deref(), want, "{body}");
        }
        let long = "x".repeat(5000);
        let msg = raw_message(long.as_bytes());
        assert_eq!(msg.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(msg.ends_with('…'));
        assert_eq!(
            describe_status(StatusCode::BAD_GATEWAY, ""),
            "502 Bad Gateway"
        );
    }

    #[test]
    fn errors_inside_a_stream_are_recognised_but_chunks_are_not() {
        let event = |event: &str, data: &str| Event {
            event: event.to_owned(),
            data: data.to_owned(),
            ..Event::default()
        };
        assert_eq!(
            stream_error(&event("message", r#"{"error":{"message":"oom"}}"#)).as_deref(),
            Some("oom")
        );
        assert_eq!(
            stream_error(&event("error", "overloaded")).as_deref(),
            Some("overloaded")
        );
        let chunk = r#"{"choices":[{"delta":{"content":"\"error\""}}],"error":null}"#;
        assert_eq!(stream_error(&event("message", chunk)), None);
        assert_eq!(stream_error(&event("message", r#"{"id":"x"}"#)), None);
    }
}
