//! Task correlation: from a client request pushed down a channel to its one outcome.
//!
//! [`TaskTable::start`] registers a task, sends its `task` frame on the session's
//! channel and returns a [`TaskHandle`]. The publisher's results come back through
//! [`TaskTable::deliver`], which checks that they come from the session the task was
//! sent to, and hands them to the handle through a bounded buffer. The handle yields
//! exactly one outcome (a completion, a finished stream, or an error) and then nothing;
//! dropping it before the outcome cancels the task and sends a `cancel` frame.
//!
//! Deadlines live in the handle: a total deadline for a non-streaming task, an idle
//! deadline between events for a streaming one. Both are tokio timers, so tests drive
//! them with `tokio::time::pause`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::channel::{Channels, SendError};
use crate::protocol::{CancelFrame, GatewayFrame, TaskFrame, TaskKind, TaskResult};
use crate::sync::lock;
use crate::{ChunkStream, Completion, Config, Error, LlmName, Reply, SessionId, TaskId};

/// What a task handle yields, in order: chunks then `Done` for a stream, or one
/// `Completed`.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    /// One streamed chunk (an SSE `data:` payload).
    Chunk(String),
    /// The stream ended normally.
    Done,
    /// The whole answer.
    Completed(Completion),
}

/// What travels from `deliver` to the handle.
#[derive(Debug)]
enum Event {
    Chunk { data: String, done: bool },
    Completed(Completion),
    Failed(Error),
}

impl From<TaskResult> for Event {
    fn from(r: TaskResult) -> Self {
        match r {
            TaskResult::Completed { status, body } => Event::Completed(Completion { status, body }),
            TaskResult::Chunk { data, done } => Event::Chunk { data, done },
            TaskResult::Failed { message } => Event::Failed(Error::Upstream { message }),
        }
    }
}

struct Live {
    session: SessionId,
    owner: String,
    stream: bool,
    tx: mpsc::Sender<Event>,
    /// A buffer slot kept free for the task's error, so a failure reaches the client
    /// with its reason even when a slow client has let the buffer fill up.
    reserved: mpsc::OwnedPermit<Event>,
}

impl Live {
    fn fail(self, error: Error) {
        self.reserved.send(Event::Failed(error));
    }
}

#[derive(Default)]
struct State {
    live: HashMap<TaskId, Live>,
    /// Recently finished tasks with their session and owner, so that a replayed result
    /// is a 409 for them and a 404 for anyone else.
    finished: HashMap<TaskId, (SessionId, String)>,
    finished_order: VecDeque<TaskId>,
}

struct Inner {
    channels: Arc<Channels>,
    state: Mutex<State>,
    buffer: usize,
    deadline: Duration,
    idle: Duration,
    retry_after: Duration,
    remembered: usize,
    /// The largest task frame, encoded: a publisher refuses a bigger one (a WebSocket
    /// publisher by closing its socket, failing every task on it).
    max_frame: usize,
}

impl Inner {
    /// Removes a live task and, if it was live, tells its publisher to stop.
    fn cancel(&self, id: &TaskId) -> bool {
        let removed = lock(&self.state).live.remove(id);
        let Some(live) = removed else { return false };
        if let Some(sink) = self.channels.sink(&live.session) {
            let frame = GatewayFrame::Cancel(CancelFrame {
                task_id: id.clone(),
            });
            if let Err(e) = sink.send(frame) {
                // The publisher is gone or saturated; it will find the task unknown
                // when it posts, which stops it just the same.
                tracing::debug!(task = %id, error = %e, "cancel frame not sent");
            }
        }
        true
    }

    fn offline(&self) -> Error {
        Error::Unavailable {
            reason: "the publisher of this llm disconnected".to_owned(),
            retry_after: self.retry_after,
        }
    }
}

/// The in-flight tasks of a gateway.
#[derive(Clone)]
pub struct TaskTable {
    inner: Arc<Inner>,
}

impl fmt::Debug for TaskTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskTable")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl TaskTable {
    /// An empty table routing frames through `channels`.
    pub fn new(channels: Arc<Channels>, config: &Config) -> Self {
        TaskTable {
            inner: Arc::new(Inner {
                channels,
                state: Mutex::new(State::default()),
                buffer: config.task_buffer.max(1),
                deadline: config.task_deadline,
                idle: config.stream_idle_timeout,
                retry_after: config.retry_after,
                remembered: config.finished_tasks_remembered,
                max_frame: config.max_body_bytes,
            }),
        }
    }

    /// Starts a task for `llm` on `session`'s channel. `owner` is the principal whose
    /// session it is; only it may post the results.
    ///
    /// Fails with 503 when the session has no channel, or its channel is full; with 413
    /// when the encoded task frame would be over the configured frame limit
    /// (`max_body_bytes`: a body under the limit may still make a frame over it).
    pub fn start(
        &self,
        session: &SessionId,
        owner: &str,
        llm: &LlmName,
        stream: bool,
        body: Value,
    ) -> Result<TaskHandle, Error> {
        let sink = self
            .inner
            .channels
            .sink(session)
            .ok_or_else(|| self.inner.offline())?;
        let id = TaskId::generate();
        let frame = GatewayFrame::Task(TaskFrame {
            task_id: id.clone(),
            kind: TaskKind::Infer,
            llm: llm.clone(),
            stream,
            body,
        });
        if encoded_len(&frame)? > self.inner.max_frame {
            return Err(Error::PayloadTooLarge {
                limit: self.inner.max_frame,
            });
        }
        let (tx, rx) = mpsc::channel(self.inner.buffer + 1);
        let reserved = tx
            .clone()
            .try_reserve_owned()
            .map_err(|_| Error::invalid("a new task's buffer cannot be full"))?;
        let live = Live {
            session: session.clone(),
            owner: owner.to_owned(),
            stream,
            tx,
            reserved,
        };
        // Registered before the frame goes out, so even an instant result finds it.
        lock(&self.inner.state).live.insert(id.clone(), live);
        if let Err(e) = sink.send(frame) {
            lock(&self.inner.state).live.remove(&id);
            let reason = match e {
                SendError::Full => "the publisher of this llm is saturated",
                SendError::Closed => "the publisher of this llm disconnected",
            };
            return Err(Error::Unavailable {
                reason: reason.to_owned(),
                retry_after: self.inner.retry_after,
            });
        }
        Ok(TaskHandle {
            id,
            started: Instant::now(),
            seen_event: false,
            stream,
            rx,
            deadline: Instant::now() + self.inner.deadline,
            inner: self.inner.clone(),
            state: HandleState::Running,
        })
    }

    /// Hands a publisher's result to its task.
    ///
    /// Refused with 404 when the task is unknown, was cancelled, or was sent to another
    /// session or principal (the caller learns nothing about other sessions' tasks);
    /// 409 when it already had its final result, told only to the session and principal
    /// it was sent to (anyone else gets the same 404); 400 for a chunk of a non-streaming
    /// task. When the task's buffer is full this waits: a slow client slows down its
    /// own publisher stream, and nothing else.
    pub async fn deliver(
        &self,
        session: &SessionId,
        owner: &str,
        task: &TaskId,
        result: TaskResult,
    ) -> Result<(), Error> {
        result.validate()?;
        let tx = {
            let mut state = lock(&self.inner.state);
            let Some(live) = state.live.get(task) else {
                return Err(match state.finished.get(task) {
                    Some((s, o)) if s == session && o == owner => Error::TaskFinished,
                    _ => Error::UnknownTask,
                });
            };
            if live.session != *session || live.owner != owner {
                return Err(Error::UnknownTask);
            }
            if !live.stream && matches!(result, TaskResult::Chunk { .. }) {
                return Err(Error::invalid(
                    "this task is not streaming: post {status, body}",
                ));
            }
            if result.is_final() {
                match state.live.remove(task) {
                    Some(live) => {
                        remember(
                            &mut state,
                            task.clone(),
                            (live.session, live.owner),
                            self.inner.remembered,
                        );
                        // The final result takes the reserved slot's place.
                        drop(live.reserved);
                        live.tx
                    }
                    None => return Err(Error::UnknownTask),
                }
            } else {
                live.tx.clone()
            }
        };
        // The client went away while we waited: the task is cancelled.
        tx.send(Event::from(result))
            .await
            .map_err(|_| Error::UnknownTask)
    }

    /// Fails every in-flight task of `session` with 503 (its channel closed). Late
    /// results for them are then unknown (404). Returns how many failed.
    pub fn fail_session(&self, session: &SessionId) -> usize {
        let failed: Vec<Live> = {
            let mut state = lock(&self.inner.state);
            state
                .live
                .extract_if(|_, t| t.session == *session)
                .map(|(_, t)| t)
                .collect()
        };
        let count = failed.len();
        for task in failed {
            task.fail(self.inner.offline());
        }
        count
    }

    /// Fails every in-flight task now with `error()`: for a gateway shutting down,
    /// whose channels close next (their publishers then abort the tasks), so that
    /// clients hear why rather than that their publisher disconnected. Late results
    /// for them are then unknown (404). Returns how many failed.
    pub fn fail_all(&self, error: impl Fn() -> Error) -> usize {
        let failed: Vec<Live> = lock(&self.inner.state)
            .live
            .drain()
            .map(|(_, t)| t)
            .collect();
        let count = failed.len();
        for task in failed {
            task.fail(error());
        }
        count
    }

    /// Fails one task now with `error`, and tells its publisher to stop: for a
    /// transport that must cut off a task (e.g. a client too slow to keep up on a
    /// socket shared with other tasks). Only the task's own session and principal may.
    /// Returns whether the task was live.
    pub fn fail(&self, session: &SessionId, owner: &str, task: &TaskId, error: Error) -> bool {
        let live = {
            let mut state = lock(&self.inner.state);
            match state.live.get(task) {
                Some(t) if t.session == *session && t.owner == owner => state.live.remove(task),
                _ => None,
            }
        };
        let Some(live) = live else { return false };
        if let Some(sink) = self.inner.channels.sink(&live.session) {
            let frame = GatewayFrame::Cancel(CancelFrame {
                task_id: task.clone(),
            });
            if let Err(e) = sink.send(frame) {
                tracing::debug!(%task, error = %e, "cancel frame not sent");
            }
        }
        live.fail(error);
        true
    }

    /// How many tasks are waiting for their outcome.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.state).live.len()
    }
}

/// The size of `frame` as JSON, counted without building the text.
fn encoded_len(frame: &GatewayFrame) -> Result<usize, Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, frame)
        .map_err(|e| Error::invalid(format!("the request cannot be encoded: {e}")))?;
    Ok(count.0)
}

fn remember(state: &mut State, id: TaskId, by: (SessionId, String), cap: usize) {
    if cap == 0 {
        return;
    }
    while state.finished_order.len() >= cap {
        match state.finished_order.pop_front() {
            Some(old) => {
                state.finished.remove(&old);
            }
            None => break,
        }
    }
    state.finished_order.push_back(id.clone());
    state.finished.insert(id, by);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandleState {
    Running,
    /// A `done` chunk carried data: the data was yielded, `Done` comes next.
    DonePending,
    Finished,
}

/// The client's end of a task: yields its one outcome, cancels it when dropped early.
pub struct TaskHandle {
    id: TaskId,
    started: Instant,
    seen_event: bool,
    stream: bool,
    rx: mpsc::Receiver<Event>,
    deadline: Instant,
    inner: Arc<Inner>,
    state: HandleState,
}

impl fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.id)
            .field("stream", &self.stream)
            .field("state", &self.state)
            .finish()
    }
}

impl TaskHandle {
    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// The next event, or `None` after the outcome. The outcome is `Completed`, `Done`
    /// or an error; 504 when a deadline passes (the task is then cancelled), 503 when
    /// the publisher disconnects, 502 when it reports an error.
    pub async fn next(&mut self) -> Option<Result<TaskEvent, Error>> {
        let was_running = self.state != HandleState::Finished;
        let item = self.next_event().await?;
        if !self.seen_event && item.is_ok() {
            self.seen_event = true;
            crate::metrics::first_event(self.started.elapsed());
        }
        if was_running && self.state == HandleState::Finished {
            let result = match &item {
                Ok(TaskEvent::Completed(c)) => Ok(Some(c.status)),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            crate::metrics::outcome(self.started.elapsed(), result);
        }
        Some(item)
    }

    async fn next_event(&mut self) -> Option<Result<TaskEvent, Error>> {
        match self.state {
            HandleState::Finished => return None,
            HandleState::DonePending => {
                self.state = HandleState::Finished;
                return Some(Ok(TaskEvent::Done));
            }
            HandleState::Running => {}
        }
        let (until, limit) = if self.stream {
            (Instant::now() + self.inner.idle, self.inner.idle)
        } else {
            (self.deadline, self.inner.deadline)
        };
        let event = match tokio::time::timeout_at(until, self.rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                self.state = HandleState::Finished;
                return Some(Err(self.inner.offline()));
            }
            Err(_elapsed) => {
                self.state = HandleState::Finished;
                self.inner.cancel(&self.id);
                return Some(Err(Error::DeadlineExceeded { deadline: limit }));
            }
        };
        Some(match event {
            Event::Chunk { data, done: false } => Ok(TaskEvent::Chunk(data)),
            Event::Chunk { data, done: true } if data.is_empty() => {
                self.state = HandleState::Finished;
                Ok(TaskEvent::Done)
            }
            Event::Chunk { data, done: true } => {
                self.state = HandleState::DonePending;
                Ok(TaskEvent::Chunk(data))
            }
            Event::Completed(c) => {
                self.state = HandleState::Finished;
                Ok(TaskEvent::Completed(c))
            }
            Event::Failed(e) => {
                self.state = HandleState::Finished;
                Err(e)
            }
        })
    }

    /// Waits for the first event and shapes the answer: a completion (also what a
    /// streaming task answers when the upstream refused with an error status), or a
    /// stream whose first chunk has arrived. Waiting for it lets a transport choose
    /// the right status line before it commits to an event stream.
    pub async fn into_reply(mut self) -> Result<Reply, Error> {
        match self.next().await {
            Some(Ok(TaskEvent::Completed(c))) => Ok(Reply::Complete(c)),
            Some(Ok(TaskEvent::Done)) => Ok(Reply::Stream(futures::stream::empty().boxed())),
            Some(Ok(TaskEvent::Chunk(first))) => {
                let rest = self.into_chunk_stream();
                Ok(Reply::Stream(
                    futures::stream::once(async { Ok(first) })
                        .chain(rest)
                        .boxed(),
                ))
            }
            Some(Err(e)) => Err(e),
            None => Err(self.inner.offline()),
        }
    }

    /// The remaining chunks as a stream; it ends after `Done`, or with one error.
    pub fn into_chunk_stream(self) -> ChunkStream {
        futures::stream::unfold(self, |mut handle| async move {
            let item = match handle.next().await? {
                Ok(TaskEvent::Chunk(data)) => Ok(data),
                Ok(TaskEvent::Done) => return None,
                Ok(TaskEvent::Completed(_)) => Err(Error::Upstream {
                    message: "the publisher sent a final result in the middle of a stream".into(),
                }),
                Err(e) => Err(e),
            };
            Some((item, handle))
        })
        .boxed()
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        match self.state {
            HandleState::Finished => {}
            // The stream had ended; only its `Done` was not read yet.
            HandleState::DonePending => crate::metrics::outcome(self.started.elapsed(), Ok(None)),
            HandleState::Running => {
                if self.inner.cancel(&self.id) {
                    crate::metrics::cancelled();
                }
            }
        }
    }
}
