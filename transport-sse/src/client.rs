//! The publisher's side of the SSE transport: a [`Wire`] that registers over HTTP,
//! reads the control channel as a server-sent event stream, heartbeats, and posts
//! each task's results as one streamed NDJSON request.
//!
//! The publisher's lifecycle (reconnects, the session file, the task pump) is the
//! core's [`Publisher`](virtual_llm_core::Publisher); this file only moves bytes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio_util::task::AbortOnDropHandle;
use virtual_llm_core::batch::ready_batches;
use virtual_llm_core::protocol::{
    CHUNK_RUNS, ErrorBody, GatewayFrame, HeartbeatRequest, LlmState, Outgoing, PROTOCOL_HEADER,
    RESULT_BATCHES, RegisterRequest, RegisterResponse, TaskResult,
};
use virtual_llm_core::publisher::{Connected, Outbox, Wire, WireError, silence_limit};
use virtual_llm_core::{Config, SessionId, TaskId};

use virtual_llm_core::protocol::SESSION_HEADER;

use crate::batch::{Batcher, batchable};

/// Most results put in one body chunk of a task's NDJSON request.
const RESULTS_PER_WRITE: usize = 64;

/// Connects a publisher to a gateway over HTTP + SSE.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use virtual_llm_core::{EchoProvider, Publisher, PublisherOptions, PublishedLlm};
/// use virtual_llm_core::protocol::LlmSpec;
///
/// let wire = virtual_llm_sse::SseWire::new("http://127.0.0.1:8080", Some("token".into()))?;
/// let llm = PublishedLlm::new(
///     LlmSpec::new("demo".parse()?, "echo", "echo"),
///     Arc::new(EchoProvider::new()),
/// );
/// let publisher = Publisher::spawn(Arc::new(wire), vec![llm], PublisherOptions::default());
/// publisher.connected().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SseWire {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl SseWire {
    /// A wire to the gateway at `gateway_url` (e.g. `http://127.0.0.1:8080`), using the
    /// default base path `/api/v1/llms`.
    pub fn new(gateway_url: &str, token: Option<String>) -> Result<Self, WireError> {
        Self::with_base_path(gateway_url, &Config::default().base_path, token)
    }

    /// A wire to a gateway that mounts the routes under `base_path`.
    pub fn with_base_path(
        gateway_url: &str,
        base_path: &str,
        token: Option<String>,
    ) -> Result<Self, WireError> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| WireError::Connection(format!("cannot build the HTTP client: {e}")))?;
        let base = format!("{}{}", gateway_url.trim_end_matches('/'), base_path);
        Ok(SseWire {
            client,
            base,
            token,
        })
    }

    /// Posts `whole`, the one result of `task`, as one JSON body: a request of its own.
    pub(crate) async fn post_whole(
        &self,
        session: &SessionId,
        task: &TaskId,
        whole: &TaskResult,
    ) -> Result<(), WireError> {
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("_provider-task/{task}/result"),
            )
            .header(SESSION_HEADER, session.as_str())
            .json(whole)
            .send()
            .await
            .map_err(connection)?;
        check(response).await.map(drop)
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, format!("{}/{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }
}

pub(crate) fn connection(e: reqwest::Error) -> WireError {
    WireError::Connection(e.to_string())
}

/// A non-2xx answer as a [`WireError`], with the gateway's own message.
pub(crate) async fn check(response: reqwest::Response) -> Result<reqwest::Response, WireError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.error.message)
        .unwrap_or(text);
    Err(WireError::from_status(status.as_u16(), message))
}

#[async_trait]
impl Wire for SseWire {
    async fn connect(&self, mut request: RegisterRequest) -> Result<Connected, WireError> {
        // This wire can post whole answers several at once (protocol 2).
        if request.protocol_version.is_some_and(|v| v >= 2) && !request.declares(RESULT_BATCHES) {
            request.capabilities.push(RESULT_BATCHES.to_owned());
        }
        let response = self
            .request(reqwest::Method::POST, "_provider-register")
            .json(&request)
            .send()
            .await
            .map_err(connection)?;
        let answer: RegisterResponse = check(response)
            .await?
            .json()
            .await
            .map_err(|e| WireError::Protocol(format!("bad register answer: {e}")))?;
        let session = answer.provider_session_id.clone();
        let response = self
            .request(reqwest::Method::GET, "_provider-stream")
            .header(SESSION_HEADER, session.as_str())
            .header(
                PROTOCOL_HEADER,
                answer.protocol_version.unwrap_or(1).to_string(),
            )
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(connection)?;
        let response = check(response).await?;
        // A connection that went silent (a NAT dropped it) is noticed when neither a
        // frame nor a keep-alive ping arrived for three keep-alive periods. The
        // heartbeat interval says nothing about this stream: heartbeats are posts of
        // their own, and a gateway may ask for them far more often than it pings. An
        // older gateway does not say how often it pings: three heartbeat intervals.
        let silence = match answer.keep_alive_ms {
            Some(keep_alive_ms) => silence_limit(keep_alive_ms),
            None => Duration::from_millis(answer.heartbeat_interval_ms.saturating_mul(3).max(1000)),
        };
        let bytes =
            tokio_stream::StreamExt::timeout(response.bytes_stream(), silence).map(move |item| {
                match item {
                    Ok(Ok(bytes)) => Ok(bytes),
                    Ok(Err(e)) => Err(WireError::Connection(e.to_string())),
                    Err(_) => Err(WireError::Connection(format!(
                        "no keep-alive from the gateway for {silence:?}"
                    ))),
                }
            });
        let mut frames = bytes
            .eventsource()
            .filter_map(|event| async move {
                match event {
                    Ok(event) => decode(&event.event, &event.data).transpose(),
                    Err(eventsource_stream::EventStreamError::Transport(e)) => Some(Err(e)),
                    Err(e) => Some(Err(WireError::Protocol(e.to_string()))),
                }
            })
            .boxed();
        // The stream opens with `hello`: once it is here, the channel is bound.
        match frames.next().await {
            Some(Ok(GatewayFrame::Hello(_))) => {}
            Some(Ok(other)) => {
                return Err(WireError::Protocol(format!(
                    "expected hello, got {}",
                    other.event_name()
                )));
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(WireError::Connection(
                    "the control channel closed at once".into(),
                ));
            }
        }
        // A gateway that takes runs of chunks gets the chunks ready together as one
        // line.
        let runs = answer.capabilities.iter().any(|c| c == CHUNK_RUNS);
        // A gateway that takes batches gets the whole answers ready together in one
        // request.
        let batcher = answer
            .capabilities
            .iter()
            .any(|c| c == RESULT_BATCHES)
            .then(|| Batcher::new(self.clone(), session.clone()));
        let outbox = SseOutbox {
            wire: self.clone(),
            session,
            runs,
            batcher,
        };
        Ok(Connected {
            answer,
            frames,
            outbox: Arc::new(outbox),
        })
    }
}

/// One SSE event as a frame; events this publisher does not know are skipped.
fn decode(event: &str, data: &str) -> Result<Option<GatewayFrame>, WireError> {
    let bad = |e: serde_json::Error| WireError::Protocol(format!("bad {event} event: {e}"));
    Ok(Some(match event {
        "hello" => GatewayFrame::Hello(serde_json::from_str(data).map_err(bad)?),
        "task" => GatewayFrame::Task(serde_json::from_str(data).map_err(bad)?),
        "cancel" => GatewayFrame::Cancel(serde_json::from_str(data).map_err(bad)?),
        "closing" => GatewayFrame::Closing(serde_json::from_str(data).map_err(bad)?),
        "wake" => GatewayFrame::Wake(serde_json::from_str(data).map_err(bad)?),
        other => {
            tracing::debug!(event = other, "unknown event skipped");
            return Ok(None);
        }
    }))
}

struct SseOutbox {
    wire: SseWire,
    session: SessionId,
    /// The gateway granted [`CHUNK_RUNS`].
    runs: bool,
    /// The gateway granted [`RESULT_BATCHES`].
    batcher: Option<Batcher>,
}

#[async_trait]
impl Outbox for SseOutbox {
    async fn heartbeat(&self, llms: Option<Vec<LlmState>>) -> Result<(), WireError> {
        let body = HeartbeatRequest {
            provider_session_id: self.session.clone(),
            llms,
        };
        let response = self
            .wire
            .request(reqwest::Method::POST, "_provider-heartbeat")
            .json(&body)
            .send()
            .await
            .map_err(connection)?;
        check(response).await.map(drop)
    }

    /// The result post is answered once the gateway has taken every line.
    async fn delivered(&self) -> Result<(), WireError> {
        Ok(())
    }

    async fn send(
        &self,
        task: TaskId,
        mut results: BoxStream<'static, TaskResult>,
    ) -> Result<(), WireError> {
        // A whole answer (its first result is final: nothing follows it) goes with
        // the others ready with it to a gateway that takes batches, else in a request
        // of its own as one JSON body; anything else is a request of its own, a stream
        // of NDJSON lines, each sent the moment the provider yields it.
        let first = results.next().await;
        match (first, &self.batcher) {
            (Some(whole), Some(batcher)) if batchable(&whole) => batcher.send(task, whole).await,
            (Some(whole), _) if whole.is_final() => {
                self.wire.post_whole(&self.session, &task, &whole).await
            }
            (first, _) => {
                let results = futures::stream::iter(first).chain(results).boxed();
                let (lines, _pump) = pumped(ndjson(results, self.runs));
                let response = self
                    .wire
                    .request(
                        reqwest::Method::POST,
                        &format!("_provider-task/{task}/result"),
                    )
                    .header(SESSION_HEADER, self.session.as_str())
                    .header("content-type", "application/x-ndjson")
                    .body(reqwest::Body::wrap_stream(lines))
                    .send()
                    .await
                    .map_err(connection)?;
                check(response).await.map(drop)
            }
        }
    }
}

/// `body` read by a task of its own, into a request body.
///
/// The gathering in [`ready_batches`] relies on the upstream's connection task running
/// between two polls of the results. Polled by hyper's connection task as a request
/// body, it does not get that turn (measured: a 20-chunk burst left as 20 writes), so
/// a small task reads the results and hands the request the batches. Dropping the
/// handle (the task was cancelled) stops that task, and with it the upstream call.
fn pumped<S>(
    body: S,
) -> (
    impl futures::Stream<Item = S::Item> + Send + 'static,
    AbortOnDropHandle<()>,
)
where
    S: futures::Stream + Send + 'static,
    S::Item: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let pump = tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        while let Some(item) = body.next().await {
            if tx.send(item).await.is_err() {
                break; // the request is gone
            }
        }
    });
    (
        tokio_stream::wrappers::ReceiverStream::new(rx),
        AbortOnDropHandle::new(pump),
    )
}

/// A task's results as NDJSON body chunks: the results ready together (see
/// [`ready_batches`]) leave as one chunk, one write here and one read on the gateway;
/// with `runs`, the chunks among them that follow one another as one line each run.
fn ndjson(
    results: BoxStream<'static, TaskResult>,
    runs: bool,
) -> impl futures::Stream<Item = Result<Bytes, serde_json::Error>> + Send + 'static {
    ready_batches(results, RESULTS_PER_WRITE).map(move |batch| {
        tracing::trace!(results = batch.len(), "results leave in one write");
        let mut lines = Vec::new();
        for out in Outgoing::group(batch, runs) {
            serde_json::to_writer(&mut lines, &out)?;
            lines.push(b'\n');
        }
        Ok(Bytes::from(lines))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtual_llm_core::protocol::TaskResult;

    use super::*;

    fn lines(bytes: &Bytes) -> Vec<TaskResult> {
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// A gateway that speaks protocol 2 to this wire: a `wake` event down the stream
    /// reaches the publisher as a wake frame (events it does not know are skipped),
    /// and a heartbeat posts every LLM's state with `wakeFailed`.
    #[tokio::test]
    async fn the_sse_wire_delivers_wake_and_posts_heartbeat_states() {
        use virtual_llm_core::protocol::{HeartbeatRequest, UpstreamState, WakeFrame};
        use virtual_llm_core::publisher::Wire;
        use warp::Filter;
        let session = SessionId::generate();
        let answer = serde_json::json!({
            "providerSessionId": session, "heartbeatIntervalMs": 30000,
            "protocolVersion": 2, "keepAliveMs": 20000, "llms": [],
        });
        let register = warp::path!("api" / "v1" / "llms" / "_provider-register")
            .and(warp::post())
            .map(move || warp::reply::json(&answer));
        let hello = serde_json::json!({"providerSessionId": session, "heartbeatIntervalMs": 30000});
        let stream = warp::path!("api" / "v1" / "llms" / "_provider-stream").map(move || {
            let body = format!(
                "event: hello\ndata: {hello}\n\nevent: someday\ndata: {{}}\n\nevent: wake\ndata: {{\"llm\":\"vllm-a\"}}\n\n"
            );
            let events = futures::stream::once(async move {
                Ok::<_, std::convert::Infallible>(Bytes::from(body))
            })
            .chain(futures::stream::pending());
            warp::reply::with_header(
                warp::reply::stream(events),
                "content-type",
                "text/event-stream",
            )
        });
        let (beats_tx, mut beats) = tokio::sync::mpsc::unbounded_channel();
        let heartbeat = warp::path!("api" / "v1" / "llms" / "_provider-heartbeat")
            .and(warp::body::json::<HeartbeatRequest>())
            .map(move |beat: HeartbeatRequest| {
                beats_tx.send(beat).unwrap();
                warp::reply::json(&serde_json::json!({"llms": 1}))
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            warp::serve(register.or(stream).or(heartbeat))
                .incoming(listener)
                .run(),
        );

        let wire = SseWire::new(&format!("http://{addr}"), None).unwrap();
        let request = RegisterRequest {
            agents: Vec::new(),
            provider_session_id: None,
            protocol_version: Some(2),
            llms: vec![],
            capabilities: Vec::new(),
        };
        let mut connected = wire.connect(request).await.unwrap();
        let frame = connected.frames.next().await.unwrap().unwrap();
        assert_eq!(
            frame,
            GatewayFrame::Wake(WakeFrame {
                llm: "vllm-a".parse().unwrap()
            })
        );
        let states = vec![LlmState {
            name: "vllm-a".parse().unwrap(),
            state: UpstreamState::Asleep,
            wake_failed: Some("exit status 3: oops".into()),
        }];
        connected
            .outbox
            .heartbeat(Some(states.clone()))
            .await
            .unwrap();
        let beat = beats.recv().await.unwrap();
        assert_eq!(beat.provider_session_id, session);
        assert_eq!(beat.llms, Some(states));
        connected.outbox.heartbeat(None).await.unwrap();
        assert_eq!(beats.recv().await.unwrap().llms, None, "a v1 heartbeat");
    }

    /// A gateway that grants `resultBatches` (the wire declares it in a protocol 2
    /// register): a whole answer and an error go to `_provider-results`; an answer
    /// over [`MAX_LINE_BYTES`](crate::batch::MAX_LINE_BYTES) goes alone to its task's
    /// route, and so does a stream.
    #[tokio::test]
    async fn a_gateway_granting_batches_gets_whole_answers_in_batches() {
        use warp::Filter;
        let session = SessionId::generate();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, Bytes)>();
        let answer = serde_json::json!({
            "providerSessionId": session, "heartbeatIntervalMs": 30000, "protocolVersion": 2,
            "keepAliveMs": 20000, "llms": [], "capabilities": [RESULT_BATCHES],
        });
        let tx = seen_tx.clone();
        let register = warp::path!("api" / "v1" / "llms" / "_provider-register")
            .and(warp::body::bytes())
            .map(move |body: Bytes| {
                tx.send(("register".into(), body)).unwrap();
                warp::reply::json(&answer)
            });
        let hello = serde_json::json!({"providerSessionId": session, "heartbeatIntervalMs": 30000});
        let stream = warp::path!("api" / "v1" / "llms" / "_provider-stream").map(move || {
            let body = format!("event: hello\ndata: {hello}\n\n");
            let events = futures::stream::once(async move {
                Ok::<_, std::convert::Infallible>(Bytes::from(body))
            })
            .chain(futures::stream::pending());
            warp::reply::with_header(
                warp::reply::stream(events),
                "content-type",
                "text/event-stream",
            )
        });
        let tx = seen_tx.clone();
        let batch = warp::path!("api" / "v1" / "llms" / "_provider-results")
            .and(warp::body::bytes())
            .map(move |body: Bytes| {
                tx.send(("batch".into(), body)).unwrap();
                warp::reply::json(&serde_json::json!({"refused": []}))
            });
        let tx = seen_tx;
        let alone = warp::path!("api" / "v1" / "llms" / "_provider-task" / String / "result")
            .and(warp::body::bytes())
            .map(move |task: String, body: Bytes| {
                tx.send((format!("alone {task}"), body)).unwrap();
                warp::http::StatusCode::NO_CONTENT
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            warp::serve(register.or(stream).or(batch).or(alone))
                .incoming(listener)
                .run(),
        );

        let wire = SseWire::new(&format!("http://{addr}"), None).unwrap();
        let request = RegisterRequest {
            agents: Vec::new(),
            provider_session_id: None,
            protocol_version: Some(2),
            llms: vec![],
            capabilities: Vec::new(),
        };
        let connected = wire.connect(request).await.unwrap();
        let (what, body) = seen.recv().await.unwrap();
        assert_eq!(what, "register");
        let declared: RegisterRequest = serde_json::from_slice(&body).unwrap();
        assert!(
            declared.declares(RESULT_BATCHES),
            "the wire declares batches"
        );

        let whole = |text: String| TaskResult::Completed {
            status: 200,
            body: serde_json::json!({ "text": text }).into(),
            retry_after: None,
        };
        let send = |task: &TaskId, results: Vec<TaskResult>| {
            connected
                .outbox
                .send(task.clone(), futures::stream::iter(results).boxed())
        };
        let small = TaskId::generate();
        send(&small, vec![whole("short".into())]).await.unwrap();
        let (what, body) = seen.recv().await.unwrap();
        assert_eq!(what, "batch");
        let line: serde_json::Value = serde_json::from_slice(body.trim_ascii_end()).unwrap();
        assert_eq!(
            (&line["type"], &line["taskId"], &line["body"]["text"]),
            (&"result".into(), &small.as_str().into(), &"short".into())
        );
        let failed = TaskId::generate();
        let error = TaskResult::Failed {
            message: "the model crashed".into(),
        };
        send(&failed, vec![error]).await.unwrap();
        let (what, body) = seen.recv().await.unwrap();
        assert_eq!(what, "batch");
        let line: serde_json::Value = serde_json::from_slice(body.trim_ascii_end()).unwrap();
        assert_eq!(
            (&line["type"], &line["taskId"]),
            (&"error".into(), &failed.as_str().into())
        );

        let big = TaskId::generate();
        send(&big, vec![whole("x".repeat(crate::batch::MAX_LINE_BYTES))])
            .await
            .unwrap();
        let (what, _) = seen.recv().await.unwrap();
        assert_eq!(what, format!("alone {big}"), "too large for a batch");
        let streamed = TaskId::generate();
        let chunk = TaskResult::Chunk {
            data: "{}".into(),
            done: true,
            seq: Some(0),
        };
        send(&streamed, vec![chunk]).await.unwrap();
        let (what, _) = seen.recv().await.unwrap();
        assert_eq!(what, format!("alone {streamed}"), "a stream goes per task");
    }

    /// A whole answer (a final result first) is posted as one JSON body; a stream's
    /// results as NDJSON lines, in order. Both are what the gateway's result route
    /// takes.
    #[tokio::test]
    async fn a_whole_answer_is_one_json_body_and_a_stream_is_ndjson() {
        use warp::Filter;
        let (posts_tx, mut posts) = tokio::sync::mpsc::unbounded_channel();
        let result = warp::path!("api" / "v1" / "llms" / "_provider-task" / String / "result")
            .and(warp::post())
            .and(warp::header::<String>("content-type"))
            .and(warp::header::<String>(SESSION_HEADER))
            .and(warp::body::bytes())
            .map(
                move |task: String, kind: String, session: String, body: Bytes| {
                    posts_tx.send((task, kind, session, body)).unwrap();
                    warp::http::StatusCode::NO_CONTENT
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(result).incoming(listener).run());
        let session = SessionId::generate();
        let outbox = SseOutbox {
            wire: SseWire::new(&format!("http://{addr}"), None).unwrap(),
            session: session.clone(),
            runs: false,
            batcher: None,
        };

        let whole = TaskResult::Completed {
            status: 200,
            body: serde_json::json!({"answer": 42}).into(),
            retry_after: None,
        };
        let task = TaskId::generate();
        outbox
            .send(task.clone(), futures::stream::iter([whole.clone()]).boxed())
            .await
            .unwrap();
        let (id, kind, from, body) = posts.recv().await.unwrap();
        assert_eq!((id, from), (task.to_string(), session.to_string()));
        assert_eq!(kind, "application/json");
        assert_eq!(serde_json::from_slice::<TaskResult>(&body).unwrap(), whole);

        let chunk = |data: &str, done: bool| TaskResult::Chunk {
            data: data.into(),
            done,
            seq: None,
        };
        let stream = vec![chunk("a", false), chunk("b", true)];
        let task = TaskId::generate();
        outbox
            .send(task.clone(), futures::stream::iter(stream.clone()).boxed())
            .await
            .unwrap();
        let (id, kind, _, body) = posts.recv().await.unwrap();
        assert_eq!(id, task.to_string());
        assert_eq!(kind, "application/x-ndjson");
        assert_eq!(lines(&body), stream);
    }

    /// The real thing: an upstream whose 20 chunks arrive in one read, through
    /// reqwest and the OpenAI provider, leave in one body chunk.
    #[tokio::test]
    async fn an_upstream_burst_read_through_hyper_leaves_in_one_chunk() {
        use virtual_llm_core::Provider;
        use warp::Filter;
        let route = warp::path!("v1" / "chat" / "completions").map(|| {
            let mut events: Vec<Result<Bytes, std::convert::Infallible>> = (0..20)
                .map(|i| Ok(Bytes::from(format!("data: {{\"i\":{i}}}\n\n"))))
                .collect();
            events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
            let body = warp::reply::stream(futures::stream::iter(events));
            warp::reply::with_header(body, "content-type", "text/event-stream")
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let upstream =
            virtual_llm_openai::OpenAiUpstream::new(&format!("http://{addr}/v1")).unwrap();
        let provider = virtual_llm_openai::OpenAiProvider::new(upstream, "m");
        let task: virtual_llm_core::protocol::TaskFrame =
            serde_json::from_value(serde_json::json!({
                "taskId": "task_00000000000000000000000000000000", "kind": "infer", "llm": "demo",
                "stream": true, "body": {"messages": []}
            }))
            .unwrap();
        let virtual_llm_core::Reply::Stream(chunks) = provider.infer(task).await.unwrap() else {
            panic!("a stream")
        };
        let results = chunks
            .map(|c| TaskResult::Chunk {
                data: c.unwrap(),
                done: false,
                seq: None,
            })
            .boxed();
        // Polled by hyper's connection task, as the body of a request.
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let (body, _pump) = pumped(ndjson(results, false));
        let body = body.inspect(move |b| {
            if let Ok(b) = b {
                seen.lock().unwrap().push(lines(b).len());
            }
        });
        let sink = warp::path!("sink")
            .and(warp::body::bytes())
            .map(|_b: Bytes| "ok");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(sink).incoming(listener).run());
        reqwest::Client::new()
            .post(format!("http://{sink_addr}/sink"))
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert_eq!(*sizes.lock().unwrap(), vec![20]);
    }

    /// With runs granted, a stream's chunks ready together go as one `{"chunks"}` line
    /// (without, a line each), and the gateway reads the same results back either way.
    #[tokio::test]
    async fn chunks_ready_together_post_as_one_run_line_only_when_granted() {
        use virtual_llm_core::protocol::TaskResults;
        let results = virtual_llm_core::testkit::burst(20);
        for runs in [true, false] {
            let body: Vec<Bytes> = ndjson(futures::stream::iter(results.clone()).boxed(), runs)
                .map(|b| b.unwrap())
                .collect()
                .await;
            let text: Vec<u8> = body.concat();
            let lines: Vec<&[u8]> = text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            assert_eq!(lines.len(), if runs { 1 } else { 21 }, "runs: {runs}");
            let back: Vec<TaskResult> = lines
                .iter()
                .flat_map(|l| serde_json::from_slice::<TaskResults>(l).unwrap().0)
                .collect();
            assert_eq!(back, results);
        }
    }
}
