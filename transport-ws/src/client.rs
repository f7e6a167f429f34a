//! The publisher's side of the WebSocket transport: a [`Wire`] that dials
//! `{base}/_provider-ws`, registers with the first frame, and then reads tasks and
//! writes heartbeats and results on the same socket.
//!
//! One writer task owns the socket's sending half; heartbeats and results reach it
//! through a bounded queue, so a provider streaming faster than the network can carry
//! is slowed down rather than buffered without end. The wire asks for per-task flow
//! control on the upgrade; when the gateway grants it, each task sends no more results
//! than the gateway has given it `credit` for, so a provider streaming faster than its
//! client reads is slowed down too, without holding up the socket's other tasks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use http::header::{AUTHORIZATION, HeaderValue};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use virtual_llm_core::batch::{gather_ready, ready_batches};
use virtual_llm_core::protocol::{
    CHUNK_LINES, CHUNK_RUNS, ErrorBody, GatewayFrame, HeartbeatRequest, LlmState, MAX_RUN_CHUNKS,
    PublisherFrame, RegisterRequest, TaskResult,
};
use virtual_llm_core::publisher::{Connected, Outbox, Wire, WireError, silence_limit};
use virtual_llm_core::{Config, SessionId, TaskId};

use crate::config::{CREDITS_HEADER, PUBLISHER_WRITE_BUFFER, socket_config};
use crate::confirm::{Confirmations, GATHER, Step};

/// Connects a publisher to a gateway over one WebSocket.
#[derive(Clone, Debug)]
pub struct WsWire {
    url: String,
    token: Option<String>,
    max_frame: usize,
}

impl WsWire {
    /// A wire to the gateway at `gateway_url` (`http://…` or `https://…`, or already
    /// `ws://…`/`wss://…`), default base path `/api/v1/llms`.
    pub fn new(gateway_url: &str, token: Option<String>) -> Result<Self, WireError> {
        Self::with_base_path(gateway_url, &Config::default().base_path, token)
    }

    /// A wire to a gateway that mounts the routes under `base_path`.
    pub fn with_base_path(
        gateway_url: &str,
        base_path: &str,
        token: Option<String>,
    ) -> Result<Self, WireError> {
        let base = gateway_url.trim_end_matches('/');
        let url = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if base.starts_with("ws://") || base.starts_with("wss://") {
            base.to_owned()
        } else {
            return Err(WireError::Connection(format!(
                "not an http(s) or ws(s) URL: {gateway_url}"
            )));
        };
        Ok(WsWire {
            url: format!("{url}{base_path}/_provider-ws"),
            token,
            max_frame: Config::default().max_body_bytes,
        })
    }
}

fn protocol(e: impl std::fmt::Display) -> WireError {
    WireError::Protocol(e.to_string())
}

#[async_trait]
impl Wire for WsWire {
    async fn connect(&self, mut request: RegisterRequest) -> Result<Connected, WireError> {
        // This wire can send a run's chunks as lines (the publisher declared runs).
        if request.declares(CHUNK_RUNS) && !request.declares(CHUNK_LINES) {
            request.capabilities.push(CHUNK_LINES.to_owned());
        }
        let mut http_request = self.url.as_str().into_client_request().map_err(protocol)?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(protocol)?;
            http_request.headers_mut().insert(AUTHORIZATION, value);
        }
        http_request
            .headers_mut()
            .insert(CREDITS_HEADER, HeaderValue::from_static("1"));
        let (mut socket, upgraded) = tokio_tungstenite::connect_async_with_config(
            http_request,
            Some(
                socket_config(self.max_frame)
                    .write_buffer_size(PUBLISHER_WRITE_BUFFER)
                    // Above the write buffer (tungstenite requires it), by two frames.
                    .max_write_buffer_size(
                        PUBLISHER_WRITE_BUFFER + self.max_frame.saturating_mul(2),
                    ),
            ),
            true,
        )
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(response) => {
                let body = response.body().as_deref().unwrap_or_default();
                let message = serde_json::from_slice::<ErrorBody>(body)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
                WireError::from_status(response.status().as_u16(), message)
            }
            other => WireError::Connection(other.to_string()),
        })?;
        let register =
            serde_json::to_string(&PublisherFrame::Register(request)).map_err(protocol)?;
        socket
            .send(Message::text(register))
            .await
            .map_err(|e| WireError::Connection(e.to_string()))?;
        let answer = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<GatewayFrame>(&text).map_err(protocol)? {
                        GatewayFrame::Registered(answer) => break answer,
                        GatewayFrame::Refused(r) => {
                            return Err(WireError::from_status(r.status, r.error.message));
                        }
                        GatewayFrame::Error(e) => {
                            return Err(WireError::from_status(400, e.error.message));
                        }
                        other => {
                            return Err(WireError::Protocol(format!(
                                "expected registered, got {}",
                                other.event_name()
                            )));
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    return Err(WireError::Connection(
                        "the gateway closed the socket".into(),
                    ));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(WireError::Connection(e.to_string())),
            }
        };
        let session = answer.provider_session_id.clone();
        // The gateway pings every keep-alive period; a socket silent for three of them
        // is dead (a NAT dropped it) even if TCP has not noticed. Heartbeats go the
        // other way and do not matter here. An older gateway does not say how often it
        // pings: then TCP alone notices, as before.
        let silence = answer.keep_alive_ms.map(silence_limit);
        // The gateway's window, if it grants credits (an older one does not answer).
        let windows = Arc::new(Windows::new(
            upgraded
                .headers()
                .get(CREDITS_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|w| *w > 0),
        ));
        let (sink, stream) = socket.split();
        let (outgoing, queue) = mpsc::channel::<Message>(64);
        let (close, closed) = oneshot::channel();
        tokio::spawn(write_loop(sink, queue, closed));
        // The frame stream owns the close signal: when the publisher lets go of the
        // connection, the writer sends a Close frame and the gateway unbinds at once.
        // Credits are taken here, on their way to the tasks waiting for them; when the
        // socket ends, every task still waiting is told.
        let confirmations = Arc::new(Confirmations::new());
        let state = (stream, Some(close), windows.clone(), confirmations.clone());
        let frames = futures::stream::unfold(
            state,
            move |(mut stream, close, windows, confirmations)| async move {
                loop {
                    let next = match silence {
                        Some(limit) => match tokio::time::timeout(limit, stream.next()).await {
                            Ok(next) => next,
                            Err(_) => {
                                windows.close_all();
                                confirmations.close();
                                let error = Err(WireError::Connection(format!(
                                    "no keep-alive from the gateway for {limit:?}"
                                )));
                                return Some((error, (stream, None, windows, confirmations)));
                            }
                        },
                        None => stream.next().await,
                    };
                    let Some(message) = next else {
                        windows.close_all();
                        confirmations.close();
                        return None;
                    };
                    match message {
                        Ok(Message::Text(text)) => {
                            match serde_json::from_str::<GatewayFrame>(&text) {
                                Ok(GatewayFrame::Credit(c)) => windows.grant(&c.task_id, c.results),
                                frame => {
                                    return Some((
                                        frame.map_err(protocol),
                                        (stream, close, windows, confirmations),
                                    ));
                                }
                            }
                        }
                        Ok(Message::Pong(payload)) => confirmations.pong(&payload),
                        Ok(Message::Close(_)) => {
                            windows.close_all();
                            confirmations.close();
                            return None;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            windows.close_all();
                            confirmations.close();
                            let error = Err(WireError::Connection(e.to_string()));
                            return Some((error, (stream, None, windows, confirmations)));
                        }
                    }
                }
            },
        );
        // A gateway that takes runs of chunks gets the chunks ready together as one.
        let runs = answer.capabilities.iter().any(|c| c == CHUNK_RUNS);
        // …and as lines, when it reads them.
        let lines = runs && answer.capabilities.iter().any(|c| c == CHUNK_LINES);
        let outbox = WsOutbox {
            outgoing,
            session,
            windows,
            confirmations,
            runs,
            lines,
        };
        Ok(Connected {
            answer,
            frames: frames.boxed(),
            outbox: Arc::new(outbox),
        })
    }
}

/// Most frames written with one flush.
const FRAMES_PER_WRITE: usize = 64;

/// Sends what the queue brings; the frames ready together (see [`ready_batches`]) go
/// out with one flush, one write on the socket.
async fn write_loop<S>(
    mut sink: S,
    mut queue: mpsc::Receiver<Message>,
    mut closed: oneshot::Receiver<()>,
) where
    S: futures::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let queue = futures::stream::poll_fn(move |cx| queue.poll_recv(cx));
    let mut batches = std::pin::pin!(ready_batches(queue, FRAMES_PER_WRITE));
    loop {
        tokio::select! {
            batch = batches.next() => match batch {
                Some(batch) => {
                    let mut frames = futures::stream::iter(batch.into_iter().map(Ok));
                    if let Err(e) = sink.send_all(&mut frames).await {
                        tracing::debug!(error = %e, "socket write failed");
                        return;
                    }
                }
                None => break,
            },
            // Fires when the frame stream (which holds the sender) is dropped.
            _ = &mut closed => break,
        }
    }
    if let Err(e) = sink.close().await {
        tracing::debug!(error = %e, "socket closed uncleanly");
    }
}

/// The send windows of one connection's tasks, when the gateway grants credits.
struct Windows {
    /// The gateway's window; `None`: no flow control on this connection.
    window: Option<usize>,
    open: Mutex<HashMap<TaskId, Arc<Semaphore>>>,
}

impl Windows {
    fn new(window: Option<usize>) -> Self {
        Windows {
            window,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<Semaphore>>> {
        virtual_llm_core::sync::lock(&self.open)
    }

    /// A full window for `task`, or `None` without flow control.
    fn open(self: &Arc<Self>, task: &TaskId) -> Option<WindowGuard> {
        let window = self.window?;
        let permits = Arc::new(Semaphore::new(window));
        self.tasks().insert(task.clone(), permits.clone());
        Some(WindowGuard {
            windows: self.clone(),
            task: task.clone(),
            permits,
        })
    }

    /// More room for `task`; never more than a window (a gateway cannot make a task
    /// buffer without end here either).
    fn grant(&self, task: &TaskId, results: u32) {
        let Some(window) = self.window else { return };
        if let Some(permits) = self.tasks().get(task) {
            let room = window.saturating_sub(permits.available_permits());
            permits.add_permits(usize::try_from(results).unwrap_or(room).min(room));
        }
    }

    /// The socket ended: tasks waiting for credit stop waiting.
    fn close_all(&self) {
        for (_, permits) in self.tasks().drain() {
            permits.close();
        }
    }
}

/// One task's window, given back when its results are sent (or abandoned).
struct WindowGuard {
    windows: Arc<Windows>,
    task: TaskId,
    permits: Arc<Semaphore>,
}

impl Drop for WindowGuard {
    fn drop(&mut self) {
        self.windows.tasks().remove(&self.task);
    }
}

struct WsOutbox {
    outgoing: mpsc::Sender<Message>,
    session: SessionId,
    windows: Arc<Windows>,
    confirmations: Arc<Confirmations>,
    /// The gateway granted [`CHUNK_RUNS`].
    runs: bool,
    /// The gateway granted [`CHUNK_LINES`] too.
    lines: bool,
}

impl WsOutbox {
    async fn send_frame(&self, frame: &PublisherFrame) -> Result<(), WireError> {
        let text = frame.to_text(self.lines).map_err(protocol)?;
        self.outgoing
            .send(Message::text(text))
            .await
            .map_err(|_| WireError::Connection("the socket is closed".into()))
    }
}

#[async_trait]
impl Outbox for WsOutbox {
    async fn heartbeat(&self, llms: Option<Vec<LlmState>>) -> Result<(), WireError> {
        self.send_frame(&PublisherFrame::Heartbeat(HeartbeatRequest {
            provider_session_id: self.session.clone(),
            llms,
        }))
        .await
    }

    async fn send(
        &self,
        task: TaskId,
        mut results: BoxStream<'static, TaskResult>,
    ) -> Result<(), WireError> {
        let window = self.windows.open(&task);
        loop {
            // With flow control, a result is taken from the provider only when the
            // gateway has room for it.
            if let Some(window) = &window {
                match window.permits.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Err(WireError::Connection("the socket is closed".into())),
                }
            }
            let Some(first) = results.next().await else {
                break;
            };
            let mut batch = vec![first];
            let mut ended = false;
            if self.runs {
                // The results the provider has ready go with it, as far as the window
                // lets them: each takes its credit.
                let room = window
                    .as_ref()
                    .map_or(MAX_RUN_CHUNKS, |w| w.permits.available_permits());
                ended =
                    gather_ready(&mut results, &mut batch, room.min(MAX_RUN_CHUNKS - 1) + 1).await;
                if let Some(window) = &window
                    && let Some(taken) = u32::try_from(batch.len() - 1).ok().filter(|n| *n > 0)
                {
                    match window.permits.try_acquire_many(taken) {
                        Ok(permits) => permits.forget(),
                        Err(_) => return Err(WireError::Connection("the socket is closed".into())),
                    }
                }
            }
            for frame in PublisherFrame::for_results(&task, batch, self.runs) {
                self.send_frame(&frame).await?;
            }
            if ended {
                break;
            }
        }
        Ok(())
    }

    /// Confirmed by the pong of a ping sent after the results (see `confirm`).
    async fn delivered(&self) -> Result<(), WireError> {
        let closed = || WireError::Connection("the socket is closed".into());
        let number = self.confirmations.ask();
        let mut changes = self.confirmations.changes();
        loop {
            match self.confirmations.next_step(number) {
                None => return Err(closed()),
                Some(Step::Confirmed) => return Ok(()),
                Some(Step::Ping(pinger)) => {
                    tokio::time::sleep(GATHER).await;
                    let ping = pinger.ping();
                    self.outgoing.send(ping).await.map_err(|_| closed())?;
                    pinger.sent();
                }
                Some(Step::Wait) => {}
            }
            changes.changed().await.map_err(|_| closed())?;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A sink that records what it is given and each flush that had something to send.
    #[derive(Default)]
    struct Recorder {
        pending: Vec<Message>,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl futures::Sink<Message> for Recorder {
        type Error = tungstenite::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.pending.push(item);
            Ok(())
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            if !self.pending.is_empty() {
                let n = self.pending.len();
                self.pending.clear();
                self.writes.lock().unwrap().push(n);
            }
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.poll_flush(cx)
        }
    }

    /// A protocol 2 register with no LLM.
    fn register_v2() -> RegisterRequest {
        RegisterRequest {
            agents: Vec::new(),
            provider_session_id: None,
            protocol_version: Some(2),
            llms: vec![],
            capabilities: Vec::new(),
        }
    }

    /// A gateway on `127.0.0.1:0` that answers a register with `answer` and then
    /// sends `then`; every frame the publisher sends (the register too) comes out of
    /// the receiver, and its text out of `texts`.
    async fn fake_gateway(
        answer: serde_json::Value,
        then: Vec<&'static str>,
    ) -> (
        std::net::SocketAddr,
        mpsc::UnboundedReceiver<PublisherFrame>,
    ) {
        let (addr, received, _texts) = fake_gateway_with_texts(answer, then).await;
        (addr, received)
    }

    /// [`fake_gateway`], and the text of each frame.
    async fn fake_gateway_with_texts(
        answer: serde_json::Value,
        then: Vec<&'static str>,
    ) -> (
        std::net::SocketAddr,
        mpsc::UnboundedReceiver<PublisherFrame>,
        mpsc::UnboundedReceiver<String>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frames_tx, received) = mpsc::unbounded_channel::<PublisherFrame>();
        let (texts_tx, texts) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let frame = PublisherFrame::from_text(&text).unwrap();
                let _ = texts_tx.send(text.to_string());
                if matches!(frame, PublisherFrame::Register(_)) {
                    socket
                        .send(Message::text(answer.to_string()))
                        .await
                        .unwrap();
                    for frame in &then {
                        socket.send(Message::text(*frame)).await.unwrap();
                    }
                }
                frames_tx.send(frame).unwrap();
            }
        });
        (addr, received, texts)
    }

    /// A gateway that speaks protocol 2 over a real socket: its `wake` frame reaches
    /// the publisher, and a heartbeat frame carries every LLM's state with
    /// `wakeFailed`.
    #[tokio::test]
    async fn the_ws_wire_delivers_wake_and_sends_heartbeat_states() {
        use virtual_llm_core::protocol::{UpstreamState, WakeFrame};
        let session = SessionId::generate();
        let answer = serde_json::json!({
            "type": "registered", "providerSessionId": session, "heartbeatIntervalMs": 30000,
            "protocolVersion": 2, "llms": [],
        });
        let (addr, mut received) =
            fake_gateway(answer, vec![r#"{"type":"wake","llm":"vllm-a"}"#]).await;

        let wire = WsWire::new(&format!("http://{addr}"), None).unwrap();
        let mut connected = wire.connect(register_v2()).await.unwrap();
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
            wake_failed: Some("HTTP 503 Service Unavailable".into()),
        }];
        connected
            .outbox
            .heartbeat(Some(states.clone()))
            .await
            .unwrap();
        assert!(matches!(
            received.recv().await.unwrap(),
            PublisherFrame::Register(_)
        ));
        assert_eq!(
            received.recv().await.unwrap(),
            PublisherFrame::Heartbeat(HeartbeatRequest {
                provider_session_id: session,
                llms: Some(states),
            })
        );
    }

    /// A stream's chunks that the provider hands over together leave as one `chunks`
    /// frame when the gateway granted runs, and as a `chunk` frame each when it did not
    /// (an older gateway); the results read back are the same either way.
    #[tokio::test]
    async fn chunks_ready_together_leave_as_one_run_only_when_granted() {
        for (granted, lines) in [(true, true), (true, false), (false, false)] {
            let capabilities = match (granted, lines) {
                (true, true) => vec![CHUNK_RUNS, CHUNK_LINES],
                (true, false) => vec![CHUNK_RUNS],
                _ => vec![],
            };
            let answer = serde_json::json!({
                "type": "registered", "providerSessionId": SessionId::generate(),
                "heartbeatIntervalMs": 30000, "protocolVersion": 2, "llms": [],
                "capabilities": capabilities,
            });
            let (addr, mut received, mut texts) = fake_gateway_with_texts(answer, Vec::new()).await;
            let wire = WsWire::new(&format!("http://{addr}"), None).unwrap();
            // As the publisher declares them: runs, and so the wire adds lines.
            let mut register = register_v2();
            register.capabilities = vec![CHUNK_RUNS.to_owned()];
            let connected = wire.connect(register).await.unwrap();
            let task = TaskId::generate();
            // 20 chunks and `done`, handed over one per scheduling turn, as hyper hands
            // over an upstream's burst.
            let (tx, rx) = mpsc::channel::<TaskResult>(1);
            tokio::spawn(async move {
                for result in virtual_llm_core::testkit::burst(20) {
                    tx.send(result).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            connected
                .outbox
                .send(
                    task.clone(),
                    futures::stream::unfold(rx, |mut rx| async move {
                        rx.recv().await.map(|r| (r, rx))
                    })
                    .boxed(),
                )
                .await
                .unwrap();
            let mut frames = Vec::new();
            let mut results = Vec::new();
            while results.last().is_none_or(|r: &TaskResult| !r.is_final()) {
                let frame = received.recv().await.unwrap();
                let text = texts.recv().await.unwrap();
                if let PublisherFrame::Register(r) = &frame {
                    assert!(r.declares(CHUNK_LINES), "the wire offers lines");
                    continue;
                }
                // A run goes as lines exactly when they were granted.
                let as_lines = !text.starts_with('{') || text.contains('\n');
                assert_eq!(as_lines, lines, "{text}");
                frames.push(frame.clone());
                results.extend(frame.into_task_results().unwrap().1);
            }
            let seqs: Vec<_> = results
                .iter()
                .map(|r| match r {
                    TaskResult::Chunk { seq: Some(seq), .. } => *seq,
                    other => panic!("a chunk: {other:?}"),
                })
                .collect();
            assert_eq!(seqs, (0..21).collect::<Vec<_>>());
            if granted {
                assert!(
                    frames.len() < 4
                        && frames
                            .iter()
                            .all(|f| matches!(f, PublisherFrame::Chunks { .. })),
                    "one run or a few: {} frames",
                    frames.len()
                );
            } else {
                assert_eq!(frames.len(), 21);
                assert!(
                    frames
                        .iter()
                        .all(|f| matches!(f, PublisherFrame::Chunk { .. }))
                );
            }
        }
    }

    /// A result is confirmed delivered once the gateway answered a ping sent after it,
    /// so it has read the result; once the socket is gone, nothing is confirmed.
    #[tokio::test]
    async fn delivery_is_confirmed_by_the_gateways_pong_and_not_after_the_socket_ends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let session = SessionId::generate();
        let (frames_tx, mut received) = mpsc::unbounded_channel::<PublisherFrame>();
        let (hang_up, hung_up) = oneshot::channel::<()>();
        let answer = serde_json::json!({
            "type": "registered", "providerSessionId": session, "heartbeatIntervalMs": 30000,
            "protocolVersion": 2, "llms": [],
        });
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let mut hung_up = hung_up;
            loop {
                // Reading is what answers a ping (tungstenite queues the pong).
                let message = tokio::select! {
                    message = socket.next() => message,
                    _ = &mut hung_up => break,
                };
                let Some(Ok(Message::Text(text))) = message else {
                    continue;
                };
                let frame: PublisherFrame = serde_json::from_str(&text).unwrap();
                if matches!(frame, PublisherFrame::Register(_)) {
                    socket
                        .send(Message::text(answer.to_string()))
                        .await
                        .unwrap();
                }
                frames_tx.send(frame).unwrap();
            }
            drop(socket);
        });

        let wire = WsWire::new(&format!("http://{addr}"), None).unwrap();
        let mut connected = wire.connect(register_v2()).await.unwrap();
        // The frame reader reads the pongs: keep it running, as the publisher does.
        let reader = tokio::spawn(async move { while connected.frames.next().await.is_some() {} });
        let outbox = connected.outbox;
        assert!(matches!(
            received.recv().await.unwrap(),
            PublisherFrame::Register(_)
        ));
        let task = TaskId::generate();
        let result = TaskResult::Chunk {
            data: "{}".into(),
            done: true,
            seq: Some(0),
        };
        outbox
            .send(task.clone(), futures::stream::iter([result]).boxed())
            .await
            .unwrap();
        // Several askers at once: all confirmed.
        let (a, b) = tokio::join!(outbox.delivered(), outbox.delivered());
        a.unwrap();
        b.unwrap();
        // Confirmed means read: the gateway already has the result.
        assert!(matches!(
            received.try_recv(),
            Ok(PublisherFrame::Chunk { task_id, .. }) if task_id == task
        ));
        hang_up.send(()).unwrap();
        reader.await.unwrap();
        assert!(outbox.delivered().await.is_err());
    }

    /// Frames handed over one per scheduling turn (as a provider streaming an
    /// upstream's burst hands them over) leave with one flush.
    #[tokio::test]
    async fn frames_ready_together_leave_with_one_flush() {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let sink = Recorder {
            writes: writes.clone(),
            ..Recorder::default()
        };
        let (tx, queue) = mpsc::channel::<Message>(64);
        let (_close, closed) = oneshot::channel();
        let writer = tokio::spawn(write_loop(sink, queue, closed));
        for i in 0..20 {
            tx.send(Message::text(format!("frame {i}"))).await.unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        writer.await.unwrap();
        assert_eq!(*writes.lock().unwrap(), vec![20]);
    }
}
