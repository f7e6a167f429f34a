//! The HTTP client of one OpenAI-compatible server (vLLM, llama.cpp's server, Ollama,
//! LM Studio): [`OpenAiUpstream`].
//!
//! All of these answer `POST {base_url}/chat/completions` the way OpenAI does: a JSON
//! `chat.completion`, or with `"stream": true` a server-sent event stream of
//! `chat.completion.chunk`s ending in `data: [DONE]`. [`OpenAiUpstream::chat`] relays a
//! request and hands back a [`Reply`]: the whole completion, or a stream that yields
//! each upstream SSE `data:` payload the moment it arrives (real per-token streaming,
//! nothing is collected; see `chunks`).
//!
//! An upstream's answers pass through (SPEC §12): a 4xx or 5xx answer is a
//! [`Reply::Complete`] with the upstream's own status, its body (see `message`) and its
//! `Retry-After` (see `retry_after`), so a vLLM 400 "context length exceeded" reaches the
//! client as that 400 and a llama.cpp 503 "Loading model" as that 503. Only failing to
//! talk to the upstream (no connection, no answer, a body or stream that breaks off, an
//! answer that is no chat completion) is [`Error::Upstream`] (502), and its message never
//! names the upstream's address: a publisher's client must not learn where its model
//! runs. The address goes to the local log instead. Never a panic. Cancelling is
//! dropping: dropping the future returned by `chat`, or the stream it returned, drops
//! the HTTP request and closes its connection, so the upstream stops generating.

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use reqwest::Url;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::Value;
use virtual_llm_core::protocol::Endpoint;
use virtual_llm_core::{Completion, Error, RawBody, Reply};

use crate::chunks::chunks;
use crate::message::{error_body, error_message, upstream};
use crate::retry_after::retry_after;

/// The endpoints an upstream answers, in the order of [`OpenAiUpstream::endpoints`].
const ENDPOINTS: [Endpoint; 3] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
];

/// How long to wait for a TCP (and TLS) connection to the upstream.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a readiness probe may take, connection and answer together.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of an error answer's body read: passed through whole up to this size, or
/// cut to a message beyond it.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The largest non-streamed completion accepted, so a broken upstream cannot exhaust
/// memory.
const MAX_COMPLETION_BODY: usize = 32 * 1024 * 1024;

/// A client for one OpenAI-compatible server.
///
/// Cheap to clone: clones share one connection pool. Requests go to
/// `{base_url}/chat/completions` (and `/completions`, `/embeddings` through
/// [`call`](OpenAiUpstream::call)); an API key, when set, is sent as
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
/// use virtual_llm_openai::OpenAiUpstream;
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
    /// `{base_url}/chat/completions`, `/completions` and `/embeddings`, computed once,
    /// in the order of [`ENDPOINTS`].
    endpoints: [Url; 3],
    /// `{base_url}/models`, what a readiness probe asks for.
    models: Url,
    /// `host:port` of the server, for the local log only: no error message names it.
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
        let url = |path: &str| {
            Url::parse(&format!("{trimmed}/{path}"))
                .map_err(|e| Error::invalid(format!("invalid upstream url {base_url:?}: {e}")))
        };
        let endpoint = url(Endpoint::ChatCompletions.path())?;
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
        let models = url("models")?;
        let endpoints = [
            endpoint,
            url(Endpoint::Completions.path())?,
            url(Endpoint::Embeddings.path())?,
        ];
        Ok(OpenAiUpstream {
            base_url: trimmed.to_owned(),
            endpoints,
            models,
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

    /// Whether the server answers now (SPEC §12): `GET {base_url}/models` with the API
    /// key, within 5 s, answering 2xx. Anything else (no connection, a timeout, a 503
    /// while the model loads, a redirect) is "not ready", logged at debug level with
    /// the upstream's address and never its key.
    pub async fn probe(&self) -> bool {
        let mut request = self.client.get(self.models.clone()).timeout(PROBE_TIMEOUT);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => true,
            Ok(response) => {
                tracing::debug!(upstream = %self.host, status = %response.status(), "probe: not ready");
                false
            }
            Err(e) => {
                tracing::debug!(upstream = %self.host, error = why_not(&e), "probe: no answer");
                false
            }
        }
    }

    /// The ids of the models the server lists at `GET {base_url}/models` (OpenAI's
    /// `{"data": [{"id": …}]}`), within 5 s. [`Error::Upstream`] when it does not
    /// answer 2xx with such a list.
    pub async fn model_ids(&self) -> Result<Vec<String>, Error> {
        let mut request = self.client.get(self.models.clone()).timeout(PROBE_TIMEOUT);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = request.send().await.map_err(|e| self.send_failed(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(upstream(format!(
                "the upstream's model list answered {status}"
            )));
        }
        let body = match read_body(response, MAX_ERROR_BODY * 16).await {
            Ok(Body::Complete(body)) => body,
            Ok(Body::Truncated(_)) => {
                return Err(upstream("the upstream's model list is too long"));
            }
            Err(e) => return Err(self.broke_off(&e)),
        };
        let list: Value = serde_json::from_slice(&body)
            .map_err(|_| upstream("the upstream's model list is not JSON"))?;
        let data = list
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| upstream("the upstream's model list has no data array"))?;
        Ok(data
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
    }

    /// Sends a chat-completions request and relays the answer (see
    /// [`call`](Self::call) for the other endpoints).
    ///
    /// `body` is an OpenAI request and is sent as it is, except for `stream`:
    /// - `stream: false`: answers [`Reply::Complete`] with status 200 and the upstream's
    ///   `chat.completion` once the whole answer is in.
    /// - `stream: true` (set in the body too): answers [`Reply::Stream`] as soon as the
    ///   response headers arrive. The stream yields each SSE `data:` payload as its own
    ///   item the moment it arrives, skips comments and the final `[DONE]`, and ends
    ///   after one `Err` if the upstream breaks off or reports an error mid-stream.
    ///
    /// A 4xx or 5xx answer, to a streaming request too, is [`Reply::Complete`] with the
    /// upstream's status, its body (as sent when it is a JSON object, else its text in
    /// OpenAI's error shape) and its `Retry-After`. [`Error::Upstream`] is for failing
    /// to talk to it: no connection, no answer, a redirect, a body that breaks off or is
    /// no chat completion; its message never names the upstream's address.
    ///
    /// Dropping the returned future, or the stream, aborts the upstream request.
    pub async fn chat(&self, body: impl Into<RawBody>, stream: bool) -> Result<Reply, Error> {
        self.call(Endpoint::ChatCompletions, body, stream).await
    }

    /// Sends a request to `endpoint` (`{base_url}/chat/completions`, `/completions` or
    /// `/embeddings`) and relays the answer, as [`chat`](Self::chat) does for chat
    /// completions: a streamed completion's SSE `data:` payloads one by one, anything
    /// else whole, a 4xx or 5xx as the upstream's own answer.
    pub async fn call(
        &self,
        endpoint: Endpoint,
        body: impl Into<RawBody>,
        stream: bool,
    ) -> Result<Reply, Error> {
        self.send(endpoint, None, &body.into(), stream).await
    }

    /// Sends `body` to `endpoint` as [`call`](Self::call) does, with `model` (when
    /// given) in place of the body's own. The body is copied as its text with only
    /// `model` and `stream` replaced at the top level, never parsed into a tree.
    async fn send(
        &self,
        endpoint: Endpoint,
        model: Option<&str>,
        body: &RawBody,
        stream: bool,
    ) -> Result<Reply, Error> {
        let stream = stream && endpoint.streams();
        let model = model.map(|m| Value::String(m.to_owned()));
        let mut set: Vec<(&str, &Value)> = Vec::with_capacity(2);
        let mut if_present: Vec<(&str, &Value)> = Vec::with_capacity(1);
        if let Some(model) = &model {
            set.push(("model", model));
        }
        let (yes, no) = (Value::Bool(true), Value::Bool(false));
        if stream {
            set.push(("stream", &yes));
        } else {
            if_present.push(("stream", &no));
        }
        let json = body
            .with_fields(&set, &if_present)
            .map_err(|_| Error::invalid("the request body must be a JSON object"))?;
        let url = &self.endpoints[ENDPOINTS.iter().position(|e| *e == endpoint).unwrap_or(0)];
        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(json);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if stream {
            request = request.header(ACCEPT, "text/event-stream");
        }
        let response = request.send().await.map_err(|e| self.send_failed(&e))?;
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            return self.error_answer(response).await.map(Reply::Complete);
        }
        if !status.is_success() {
            // Redirects are not followed (see `build_client`), and one passed on would
            // point the client at the upstream.
            tracing::warn!(upstream = %self.host, %status, "upstream answered with a redirect; check its base url");
            return Err(upstream(format!(
                "the upstream answered {status} instead of a completion"
            )));
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
                tracing::warn!(upstream = %self.host, "upstream answer over {MAX_COMPLETION_BODY} bytes");
                return Err(upstream(format!(
                    "the upstream's answer is over {MAX_COMPLETION_BODY} bytes"
                )));
            }
            Err(e) => return Err(self.broke_off(&e)),
        };
        // Kept as its text (checked to be one JSON value, its line breaks made
        // spaces): it goes to the gateway as it came, never parsed into a tree.
        let body = RawBody::from_client(body.into()).map_err(|_| {
            tracing::warn!(upstream = %self.host, "upstream answered with a body that is not JSON");
            upstream("the upstream answered with a body that is not JSON")
        })?;
        Ok(Reply::Complete(Completion::ok(body)))
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
                None => {
                    tracing::warn!(upstream = %self.host, "upstream answered a streaming request with json");
                    "the upstream answered a streaming request without an event stream".to_owned()
                }
            }));
        }
        Ok(Reply::Stream(chunks(
            crate::events::events(response.bytes_stream()),
            &self.host,
        )))
    }

    /// A 4xx or 5xx answer as the client gets it: the upstream's status, body and
    /// `Retry-After`.
    async fn error_answer(&self, response: reqwest::Response) -> Result<Completion, Error> {
        let status = response.status();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let body = match read_body(response, MAX_ERROR_BODY).await {
            Ok(Body::Complete(body)) => error_body(status, &body, true),
            Ok(Body::Truncated(head)) => error_body(status, &head, false),
            Err(e) => return Err(self.broke_off(&e)),
        };
        tracing::debug!(upstream = %self.host, %status, ?retry_after, "upstream answered an error; passed through");
        Ok(Completion {
            status: status.as_u16(),
            body: body.into(),
            retry_after,
        })
    }

    /// The request could not be sent, or no response came back. The message says why
    /// in general words (`connection refused`, `timed out`); reqwest's own names the
    /// URL, so it goes to the log only.
    fn send_failed(&self, error: &reqwest::Error) -> Error {
        tracing::warn!(upstream = %self.host, error = ?error, "upstream request failed");
        upstream(format!("the upstream did not answer: {}", why_not(error)))
    }

    /// The response body broke off.
    fn broke_off(&self, error: &reqwest::Error) -> Error {
        tracing::warn!(upstream = %self.host, error = %error, "upstream answer broke off");
        upstream("the upstream's answer broke off")
    }
}

/// Why a request got no answer, in words that name no address: the kind of the I/O
/// error under reqwest's, or whether it was the connect or the exchange that failed.
pub(crate) fn why_not(error: &reqwest::Error) -> &'static str {
    use std::io::ErrorKind;
    if error.is_timeout() {
        return "timed out";
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return "connection refused",
                ErrorKind::ConnectionReset => return "connection reset",
                ErrorKind::ConnectionAborted => return "connection aborted",
                ErrorKind::TimedOut => return "timed out",
                ErrorKind::HostUnreachable => return "host unreachable",
                ErrorKind::NetworkUnreachable => return "network unreachable",
                ErrorKind::AddrNotAvailable => return "address not available",
                ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
                    return "the connection closed";
                }
                _ => {}
            }
        }
        source = cause.source();
    }
    if error.is_connect() {
        "could not connect"
    } else {
        "the connection failed before an answer"
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

/// Replaces `model` with the upstream's name and relays: the one path of both the
/// provider and the backend.
pub(crate) async fn call_as(
    upstream: &OpenAiUpstream,
    endpoint: Endpoint,
    model: &str,
    body: &RawBody,
    stream: bool,
) -> Result<Reply, Error> {
    upstream.send(endpoint, Some(model), body, stream).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_takes_a_trailing_slash_and_refuses_other_schemes() {
        for url in ["http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/"] {
            let u = OpenAiUpstream::new(url).unwrap();
            assert_eq!(
                u.endpoints.each_ref().map(Url::as_str),
                [
                    "http://127.0.0.1:8000/v1/chat/completions",
                    "http://127.0.0.1:8000/v1/completions",
                    "http://127.0.0.1:8000/v1/embeddings",
                ]
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
}
