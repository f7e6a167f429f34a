//! Task correlation: from a client request pushed down a channel to its one outcome.
//!
//! The gateway's task table registers a task, sends its `task` frame through the
//! channel directory and returns a [`TaskHandle`]. The publisher's results come back
//! through [`Gateway::deliver`](crate::Gateway::deliver) (or, from another replica, a
//! [`TaskInbound`](crate::TaskInbound)), which checks that they come from the session
//! the task was sent to, and hands them to the handle through a bounded buffer. The
//! handle yields exactly one outcome (a completion, a finished stream, or an error) and
//! then nothing; dropping it before the outcome cancels the task and sends a `cancel`
//! frame.
//!
//! Deadlines live in the handle: a total deadline for a non-streaming task, an idle
//! deadline between events for a streaming one. Both are tokio timers, so tests drive
//! them with `tokio::time::pause`.
//!
//! When the channel of a session that resumes (SPEC §15) closes, its tasks are *held*
//! rather than failed: they stay live, their deadlines running, until the publisher's
//! `resume` for each comes back through the session's next channel, or the gateway's
//! resume window ends and `TaskTable::expire_hold` fails those still held. A client
//! that gives up on a held task has its cancel kept for the session's next channel.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::admission::Slot;
use crate::channel::SendError;
use crate::directory::ChannelDirectory;
use crate::protocol::{
    CancelFrame, GatewayFrame, MAX_RETRY_AFTER_SECS, TaskFrame, TaskKind, TaskResult,
};
use crate::sync::lock;
use crate::{
    ChunkStream, Completion, Config, Error, InferRequest, LlmName, Reply, SessionId, TaskId,
    UnavailableKind,
};

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

/// What travels from `deliver` to the handle: each event takes a place in the task's
/// buffer, so the buffer bounds the chunks a slow client leaves waiting.
#[derive(Debug)]
enum Event {
    Chunk { data: String, done: bool },
    Completed(Completion),
    Failed(Error),
}

/// How a delivery's segment ended.
enum End {
    /// Every result was taken; the task goes on.
    Open,
    /// A result ended the task: this event is its outcome.
    Final(Event),
    /// The publisher skipped these chunks: the task fails, and the publisher hears
    /// the error.
    Lost(std::ops::Range<u64>, Error),
    /// A result was refused; the task goes on without it and what followed it.
    Refused(Error),
}

impl From<TaskResult> for Event {
    fn from(r: TaskResult) -> Self {
        match r {
            TaskResult::Completed {
                status,
                body,
                retry_after,
            } => Event::Completed(Completion {
                status,
                body,
                retry_after: retry_after
                    .map(|secs| Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS))),
            }),
            TaskResult::Chunk { data, done, .. } => Event::Chunk { data, done },
            TaskResult::Failed { message } => Event::Failed(Error::Upstream { message }),
            // Never handed to a task: `deliver` consumes it.
            TaskResult::Resume { .. } => Event::Failed(Error::invalid("a resume is no result")),
        }
    }
}

struct Live {
    session: SessionId,
    owner: String,
    stream: bool,
    tx: mpsc::Sender<Event>,
    /// The `seq` the next numbered chunk must carry (protocol 2).
    next_seq: u64,
    /// A buffer slot kept free for the task's error, so a failure reaches the client
    /// with its reason even when a slow client has let the buffer fill up.
    reserved: mpsc::OwnedPermit<Event>,
    /// While its session's channel is down and the publisher may resume it: the hold
    /// it waits in (see [`TaskTable::hold_session`]).
    held: Option<u64>,
    /// A result came while held: the publisher still works on it (an SSE publisher
    /// posts results while its stream is down), so the hold's end spares it.
    heard: bool,
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
    /// The last hold number given out.
    holds: u64,
    /// Cancels of held tasks, sent when their session's channel is back.
    cancels: HashMap<SessionId, Vec<TaskId>>,
}

struct Inner {
    directory: Arc<dyn ChannelDirectory>,
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
    /// Removes a live task and, if it was live, tells its publisher to stop: now, or
    /// for a held task whose session has no channel yet, when it has one again.
    fn cancel(&self, id: &TaskId) -> bool {
        let (removed, later) = {
            let mut state = lock(&self.state);
            let removed = state.live.remove(id);
            let later = removed.as_ref().is_some_and(|live| {
                live.held.is_some() && self.directory.current(&live.session).is_none()
            });
            if let (Some(live), true) = (&removed, later) {
                state
                    .cancels
                    .entry(live.session.clone())
                    .or_default()
                    .push(id.clone());
            }
            (removed, later)
        };
        let Some(live) = removed else { return false };
        if !later {
            self.send_cancel(&live.session, id);
        }
        true
    }

    /// Tells a task's publisher to stop working on it.
    fn send_cancel(&self, session: &SessionId, id: &TaskId) {
        let frame = GatewayFrame::Cancel(CancelFrame {
            task_id: id.clone(),
        });
        if let Err(e) = self.directory.send(session, frame) {
            // The publisher is gone or saturated; it will find the task unknown when
            // it posts, which stops it just the same.
            tracing::debug!(task = %id, error = %e, "cancel frame not sent");
        }
    }

    /// What a task whose frame its channel refused answers.
    fn refused(&self, e: SendError) -> Error {
        match e {
            SendError::Full => Error::unavailable(
                UnavailableKind::Saturated,
                "the publisher of this llm is saturated",
                self.retry_after,
            ),
            SendError::Closed => self.offline(),
        }
    }

    fn offline(&self) -> Error {
        Error::unavailable(
            UnavailableKind::Offline,
            "the publisher of this llm disconnected",
            self.retry_after,
        )
    }
}

/// The in-flight tasks of a gateway replica. Reached only through the
/// [`Gateway`](crate::Gateway), which checks roles and ownership first, and through a
/// [`TaskInbound`](crate::TaskInbound) for a plane's forwarded results.
#[derive(Clone)]
pub(crate) struct TaskTable {
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
    /// An empty table sending frames through `directory`; task ids name its replica.
    pub(crate) fn new(directory: Arc<dyn ChannelDirectory>, config: &Config) -> Self {
        TaskTable {
            inner: Arc::new(Inner {
                directory,
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

    /// Starts `request` as a task for `llm` on `session`'s channel. `owner` is the principal whose
    /// session it is; only it may post the results. The handle holds `slot` (the
    /// task's place in its row's in-flight count) until the task's outcome.
    ///
    /// Fails with 503 when the session has no channel, or its channel is full; with 413
    /// when the encoded task frame would be over the configured frame limit
    /// (`max_body_bytes`: a body under the limit may still make a frame over it).
    pub(crate) fn start(
        &self,
        session: &SessionId,
        owner: &str,
        llm: &LlmName,
        request: InferRequest,
        slot: Option<Slot>,
        deadline: Instant,
    ) -> Result<TaskHandle, Error> {
        let InferRequest {
            stream,
            body,
            endpoint,
            ..
        } = request;
        let directory = &self.inner.directory;
        if directory.current(session).is_none() {
            return Err(self.inner.offline());
        }
        let id = TaskId::on(directory.replica());
        let frame = GatewayFrame::Task(TaskFrame {
            task_id: id.clone(),
            kind: TaskKind::Infer,
            endpoint,
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
            next_seq: 0,
            reserved,
            held: None,
            heard: false,
        };
        // Registered before the frame goes out, so even an instant result finds it.
        lock(&self.inner.state).live.insert(id.clone(), live);
        if let Err(e) = directory.send(session, frame) {
            lock(&self.inner.state).live.remove(&id);
            return Err(self.inner.refused(e));
        }
        Ok(TaskHandle {
            id,
            started: Instant::now(),
            seen_event: false,
            stream,
            rx,
            deadline: deadline.min(Instant::now() + self.inner.deadline),
            inner: self.inner.clone(),
            state: HandleState::Running,
            slot,
        })
    }

    /// Hands a publisher's results for one task to it, in order, taking the table's
    /// lock once for as many of them as the task's buffer has room for (not once per
    /// result).
    ///
    /// Refused with 404 when the task is unknown, was cancelled, or was sent to another
    /// session or principal (the caller learns nothing about other sessions' tasks);
    /// 409 when it already had its final result, told only to the session and principal
    /// it was sent to (anyone else gets the same 404); 400 for a chunk of a non-streaming
    /// task, or one that is not one SSE payload. The first result refused stops the
    /// rest; those before it are delivered. When the task's buffer is full this waits:
    /// a slow client slows down its own publisher stream, and nothing else. Room is
    /// reserved before anything is taken, so a delivery given up while it waits (its
    /// publisher's request cut off) has changed nothing it did not hand over, and a
    /// replay of the rest is taken.
    ///
    /// Numbered chunks (protocol 2) must come in order: a chunk whose `seq` was seen
    /// already is dropped (nothing delivered), and one that skips a `seq` fails the
    /// task (502 for the client, 400 for the publisher).
    pub(crate) async fn deliver(
        &self,
        session: &SessionId,
        owner: &str,
        task: &TaskId,
        mut results: Vec<TaskResult>,
    ) -> Result<(), Error> {
        // Checked before the lock, which every task shares: the first bad result and
        // what follows it are not taken.
        let refused = results
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.validate().err().map(|e| (i, e)));
        let refused = refused.map(|(bad, e)| {
            results.truncate(bad);
            e
        });
        let mut results = results.into_iter().peekable();
        while results.peek().is_some() {
            // A segment: the results up to as many chunks as the buffer holds.
            let mut segment = Vec::new();
            let mut chunks = 0;
            while let Some(next) = results.peek() {
                let chunk = matches!(next, TaskResult::Chunk { done: false, .. });
                if chunk && chunks == self.inner.buffer {
                    break;
                }
                chunks += usize::from(chunk);
                segment.extend(results.next());
            }
            // A segment without chunks (a whole answer, an error, a resume) needs no
            // room: the outcome has its place kept.
            let tx = match chunks {
                0 => None,
                _ => Some(self.sender(session, owner, task)?),
            };
            let mut permits = match &tx {
                // Err: the client went away while we waited, and the task is cancelled.
                Some(tx) => Some(
                    tx.reserve_many(chunks)
                        .await
                        .map_err(|_| Error::UnknownTask)?,
                ),
                None => None,
            };
            let mut guard = lock(&self.inner.state);
            let state = &mut *guard;
            let Some(live) = state.live.get_mut(task) else {
                // It ended while we waited for room, or it is not known at all.
                return Err(gone(state, session, owner, task));
            };
            if live.session != *session || live.owner != owner {
                return Err(Error::UnknownTask);
            }
            let mut end = End::Open;
            let mut segment = segment.into_iter();
            for result in segment.by_ref() {
                match result {
                    TaskResult::Chunk { .. } if !live.stream => {
                        end = End::Refused(Error::invalid(
                            "this task is not streaming: post {status, body}",
                        ));
                        break;
                    }
                    TaskResult::Resume { from_seq } => {
                        // The publisher replays from `from_seq`: a chunk the task has
                        // not had before it is lost for good.
                        let expected = live.next_seq;
                        if from_seq > expected {
                            crate::metrics::resume_lost(1);
                            end = End::Lost(
                                expected..from_seq,
                                Error::invalid(format!(
                                    "resuming from chunk {from_seq} skips chunk {expected}; the task failed"
                                )),
                            );
                            break;
                        }
                        if live.held.take().is_some() {
                            crate::metrics::task_resumed();
                        }
                    }
                    TaskResult::Chunk { data, done, seq } => {
                        if let Some(seq) = seq {
                            let expected = live.next_seq;
                            if seq < expected {
                                // A replay of a chunk the task has: the client sees
                                // every chunk once.
                                continue;
                            }
                            if seq > expected {
                                end = End::Lost(
                                    expected..seq,
                                    Error::invalid(format!(
                                        "chunk {seq} skips chunk {expected}; the task failed"
                                    )),
                                );
                                break;
                            }
                            live.next_seq = seq + 1;
                        }
                        live.heard = true;
                        if done {
                            end = End::Final(Event::Chunk { data, done });
                            break;
                        }
                        // Room was reserved for every chunk of the segment.
                        if let Some(permit) = permits.as_mut().and_then(Iterator::next) {
                            permit.send(Event::Chunk { data, done });
                        }
                    }
                    other => {
                        live.heard = true;
                        end = End::Final(Event::from(other));
                        break;
                    }
                }
            }
            // The outcome takes the place kept for it, and the task leaves the table:
            // a result after it is a 409.
            match end {
                End::Open => {}
                End::Final(event) => {
                    self.finish(state, task, |live| live.reserved.send(event));
                    if segment.next().is_some() || results.peek().is_some() {
                        return Err(Error::TaskFinished);
                    }
                    return refused.map_or(Ok(()), Err);
                }
                End::Lost(lost, e) => {
                    self.finish(state, task, |live| {
                        live.fail(Error::Upstream {
                            message: format!(
                                "the publisher's stream lost chunks {} to {}",
                                lost.start,
                                lost.end - 1
                            ),
                        })
                    });
                    return Err(e);
                }
                End::Refused(e) => return Err(e),
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// The sender of `task`'s buffer, for the results of `session` and `owner`.
    fn sender(
        &self,
        session: &SessionId,
        owner: &str,
        task: &TaskId,
    ) -> Result<mpsc::Sender<Event>, Error> {
        let state = lock(&self.inner.state);
        match state.live.get(task) {
            Some(live) if live.session == *session && live.owner == owner => Ok(live.tx.clone()),
            Some(_) => Err(Error::UnknownTask),
            None => Err(gone(&state, session, owner, task)),
        }
    }

    /// Removes a live task, remembers it as finished (a replayed result is then a 409
    /// for its own session), and hands it to `then`.
    fn finish<T>(
        &self,
        state: &mut State,
        task: &TaskId,
        then: impl FnOnce(Live) -> T,
    ) -> Option<T> {
        let live = state.live.remove(task)?;
        remember(
            state,
            task.clone(),
            (live.session.clone(), live.owner.clone()),
            self.inner.remembered,
        );
        Some(then(live))
    }

    /// Fails every in-flight task of `session` with 503 (its channel closed). Late
    /// results for them are then unknown (404). Returns how many failed.
    pub(crate) fn fail_session(&self, session: &SessionId) -> usize {
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

    /// Holds every in-flight task of `session` (its channel closed, and it resumes):
    /// they wait for the publisher's `resume` on the session's next channel. Returns how
    /// many, and the hold's number for [`TaskTable::expire_hold`].
    pub(crate) fn hold_session(&self, session: &SessionId) -> (usize, u64) {
        let mut state = lock(&self.inner.state);
        state.holds += 1;
        let hold = state.holds;
        let mut held = 0;
        for live in state.live.values_mut().filter(|t| t.session == *session) {
            live.held = Some(hold);
            live.heard = false;
            held += 1;
        }
        (held, hold)
    }

    /// The resume window of hold `hold` on `session` is over: its tasks still held fail
    /// with 503 (as a channel loss without resume would have) unless a result came for
    /// them meanwhile (they are let go of the hold), and the cancels kept for
    /// the session are dropped (a channel that came back had them sent; without one,
    /// the tasks are gone with it, and a late replay of one is refused and cancelled).
    /// Returns how many failed.
    pub(crate) fn expire_hold(&self, session: &SessionId, hold: u64) -> usize {
        let failed: Vec<Live> = {
            let mut state = lock(&self.inner.state);
            state.cancels.remove(session);
            for live in state.live.values_mut() {
                if live.session == *session && live.held == Some(hold) && live.heard {
                    live.held = None;
                }
            }
            state
                .live
                .extract_if(|_, t| t.session == *session && t.held == Some(hold))
                .map(|(_, t)| t)
                .collect()
        };
        let count = failed.len();
        for task in failed {
            task.fail(Error::unavailable(
                UnavailableKind::Offline,
                "the publisher of this llm disconnected and did not resume the task in time",
                self.inner.retry_after,
            ));
        }
        if count > 0 {
            crate::metrics::resume_lost(count);
        }
        count
    }

    /// `session` has a channel again: the cancels kept for its held tasks go to it.
    /// Returns how many.
    pub(crate) fn rebound(&self, session: &SessionId) -> usize {
        let cancels = lock(&self.inner.state)
            .cancels
            .remove(session)
            .unwrap_or_default();
        for id in &cancels {
            self.inner.send_cancel(session, id);
        }
        cancels.len()
    }

    /// Fails every in-flight task now with `error()` and tells each publisher to stop
    /// (a cancel frame): for a gateway shutting down, so that clients hear why rather
    /// than that their publisher disconnected. Late results
    /// for them are then unknown (404). Returns how many failed.
    pub(crate) fn fail_all(&self, error: impl Fn() -> Error) -> usize {
        let failed: Vec<(TaskId, Live)> = lock(&self.inner.state).live.drain().collect();
        let count = failed.len();
        for (id, task) in failed {
            // Told even though a drain closes this replica's channels next: the
            // publisher may sit on another replica, whose channel stays open.
            self.inner.send_cancel(&task.session, &id);
            task.fail(error());
        }
        count
    }

    /// Fails one task now with `error`, and tells its publisher to stop: for a
    /// transport that must cut off a task (e.g. a client too slow to keep up on a
    /// socket shared with other tasks). Only the task's own session and principal may.
    /// Returns whether the task was live.
    pub(crate) fn fail(
        &self,
        session: &SessionId,
        owner: &str,
        task: &TaskId,
        error: Error,
    ) -> bool {
        let live = {
            let mut state = lock(&self.inner.state);
            match state.live.get(task) {
                Some(t) if t.session == *session && t.owner == owner => state.live.remove(task),
                _ => None,
            }
        };
        let Some(live) = live else { return false };
        self.inner.send_cancel(&live.session, task);
        live.fail(error);
        true
    }

    /// Fails one task of `session` whose frame its channel refused after `start`
    /// returned (a replica plane hears of it from the replica holding the channel):
    /// 503 as `start` would have answered. Returns whether the task was live.
    pub(crate) fn refused(&self, session: &SessionId, task: &TaskId, e: SendError) -> bool {
        let live = {
            let mut state = lock(&self.inner.state);
            match state.live.get(task) {
                Some(t) if t.session == *session => state.live.remove(task),
                _ => None,
            }
        };
        let Some(live) = live else { return false };
        live.fail(self.inner.refused(e));
        true
    }

    /// Whether `task` waits here for results from `session`, of the principal `owner`:
    /// the only results that count for it.
    pub(crate) fn sent_to(&self, session: &SessionId, owner: &str, task: &TaskId) -> bool {
        lock(&self.inner.state)
            .live
            .get(task)
            .is_some_and(|t| t.session == *session && t.owner == owner)
    }

    /// How many tasks are waiting for their outcome.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.inner.state).live.len()
    }
}

/// The size of `frame` as JSON, counted without building the text.
fn encoded_len(frame: &GatewayFrame) -> Result<usize, Error> {
    crate::protocol::json_len(frame)
        .map_err(|e| Error::invalid(format!("the request cannot be encoded: {e}")))
}

/// Why a result for `task`, which is not live, is refused: 409 for its own session and
/// principal when it finished, 404 otherwise.
fn gone(state: &State, session: &SessionId, owner: &str, task: &TaskId) -> Error {
    match state.finished.get(task) {
        Some((s, o)) if s == session && o == owner => Error::TaskFinished,
        _ => Error::UnknownTask,
    }
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
    /// The task's slot on its row, freed at the outcome.
    slot: Option<Slot>,
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
        if self.state != HandleState::Running {
            // The outcome is in: the row's slot frees now, not when the handle drops.
            self.slot = None;
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
            (
                self.deadline,
                self.deadline.saturating_duration_since(self.started),
            )
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
