//! Providers instrumented to show what reached them: [`Gated`], [`FailsWhenReleased`],
//! [`Hanging`], [`Paced`], [`Firehose`], [`Stepped`], [`Answers`], [`Counting`] and [`Switchable`] (whose
//! readiness the test switches), [`Recording`] (which keeps every request that reached
//! it); and [`CountingRecipe`], a wake or sleep recipe that
//! counts its runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;
use virtual_llm_core::openai::{chunk_body, last_user_text};

use crate::protocol::TaskFrame;
use crate::{Completion, Error, Provider, Recipe, Reply, TaskId};

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
    /// Lets the stream go on to "second".
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.gate.notify_one();
    }

    /// Whether [`Gated::release`] was called.
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
    /// Lets the stream fail.
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
    /// Signalled when a task's work is dropped (cancelled).
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
            return Ok(Reply::Complete(Completion::ok(Value::Null)));
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

/// Answers `count` chunks, `"0"`, `"1"`… (or, not streaming, their text joined by
/// spaces), each only once the test [`allow`](Paced::allow)s it: a long generation
/// whose pace the test sets, to cut its channel at a chosen chunk. Counts the chunks
/// produced; signals `dropped` when a task's work is dropped (finished or cancelled).
#[derive(Debug)]
pub struct Paced {
    count: usize,
    allowed: Arc<tokio::sync::Semaphore>,
    produced: Arc<std::sync::atomic::AtomicUsize>,
    /// Signalled when a task's work is dropped (finished or cancelled).
    pub dropped: Arc<Notify>,
}

impl Paced {
    /// A provider answering `count` chunks, none allowed yet.
    pub fn new(count: usize) -> Self {
        Paced {
            count,
            allowed: Arc::new(tokio::sync::Semaphore::new(0)),
            produced: Arc::default(),
            dropped: Arc::default(),
        }
    }

    /// Lets `n` more chunks out.
    pub fn allow(&self, n: usize) {
        self.allowed.add_permits(n);
    }

    /// How many chunks were produced, over every task.
    pub fn produced(&self) -> usize {
        self.produced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` chunks were produced.
    pub async fn wait_produced(&self, n: usize) {
        super::support::eventually("the chunks are produced", || async { self.produced() >= n })
            .await;
    }
}

#[async_trait]
impl Provider for Paced {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let guard = Arc::new(DropSignal(self.dropped.clone()));
        let (allowed, produced) = (self.allowed.clone(), self.produced.clone());
        let words = futures::stream::iter(0..self.count).then(move |i| {
            let (allowed, produced, _guard) = (allowed.clone(), produced.clone(), guard.clone());
            async move {
                if let Ok(permit) = allowed.acquire().await {
                    permit.forget();
                }
                produced.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                i.to_string()
            }
        });
        if task.stream {
            Ok(Reply::Stream(
                words.map(move |word| Ok(chunk(&task, &word))).boxed(),
            ))
        } else {
            let text = words.collect::<Vec<_>>().await.join(" ");
            Ok(Reply::Complete(Completion::ok(serde_json::json!({
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            }))))
        }
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
    /// Signalled when a stream's work is dropped (finished or cancelled).
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
        let text = last_user_text(&task.body.to_value().unwrap_or_default());
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

/// Streams chunk by chunk as the test lets each out: the user message is
/// `n=<count>` (default 8), and the answer is `count` chunks whose contents are
/// `c0 `, `c1 `, …, each sent once [`Stepped::release`] gave it a turn; with the word
/// `fail` in the message, the stream then fails as an upstream that broke off (once
/// given a turn too). Signals `dropped` when a stream's work is dropped (finished,
/// failed or cancelled).
#[derive(Debug)]
pub struct Stepped {
    turns: Arc<tokio::sync::Semaphore>,
    /// Signalled when a stream's work is dropped (finished, failed or cancelled).
    pub dropped: Arc<Notify>,
}

impl Default for Stepped {
    fn default() -> Self {
        Stepped {
            turns: Arc::new(tokio::sync::Semaphore::new(0)),
            dropped: Arc::default(),
        }
    }
}

impl Stepped {
    /// A provider whose streams wait for their first turn.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `n` more chunks (or a failure) out, across its streams.
    pub fn release(&self, n: usize) {
        self.turns.add_permits(n);
    }
}

#[async_trait]
impl Provider for Stepped {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let text = last_user_text(&task.body.to_value().unwrap_or_default());
        let count = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("n="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(8);
        let fails = text.split_whitespace().any(|w| w == "fail");
        let pieces: Vec<Result<String, Error>> = (0..count)
            .map(|i| Ok(chunk(&task, &format!("c{i} "))))
            .chain(fails.then(|| {
                Err(Error::Upstream {
                    message: "the model crashed".into(),
                })
            }))
            .collect();
        let turns = self.turns.clone();
        let guard = DropSignal(self.dropped.clone());
        let steps = futures::stream::iter(pieces).then(move |piece| {
            let turns = turns.clone();
            let _held = &guard;
            async move {
                if let Ok(turn) = turns.acquire().await {
                    turn.forget();
                }
                piece
            }
        });
        Ok(Reply::Stream(steps.boxed()))
    }
}

/// Answers every task, streaming or not, with one fixed complete answer, as a
/// publisher does with an upstream's own answer (a 400, a 503 with its
/// `Retry-After`), and counts the tasks: a pool member whose upstream is loading, or
/// refuses a request.
#[derive(Debug)]
pub struct Answers {
    answer: Completion,
    calls: std::sync::atomic::AtomicUsize,
}

impl Answers {
    /// Answers `status` with `body`.
    pub fn new(status: u16, body: Value) -> Self {
        Self::with(Completion {
            status,
            body: body.into(),
            retry_after: None,
        })
    }

    /// Answers `answer`, `Retry-After` included.
    pub fn with(answer: Completion) -> Self {
        Answers {
            answer,
            calls: Default::default(),
        }
    }

    /// How many tasks reached it.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Provider for Answers {
    async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Reply::Complete(self.answer.clone()))
    }
}

/// Echoes the last user message as a whole completion, once its gate is open, and
/// counts the tasks it holds at once: how many reached it, how many it has now, and
/// the most it ever had.
#[derive(Debug)]
pub struct Counting {
    open: tokio::sync::watch::Sender<bool>,
    calls: std::sync::atomic::AtomicUsize,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl Counting {
    /// A provider whose gate is open (answers at once) or closed (holds every task
    /// until [`Counting::open`]).
    pub fn new(open: bool) -> Self {
        Counting {
            open: tokio::sync::watch::channel(open).0,
            calls: Default::default(),
            now: Default::default(),
            most: Default::default(),
        }
    }

    /// Lets every held task, and every later one, answer.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// How many tasks reached it.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many tasks it holds now.
    pub fn holding(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most tasks it ever held at once.
    pub fn most(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Provider for Counting {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        use std::sync::atomic::Ordering::SeqCst;
        self.calls.fetch_add(1, SeqCst);
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        let mut open = self.open.subscribe();
        let opened = open.wait_for(|open| *open).await.is_ok();
        self.now.fetch_sub(1, SeqCst);
        if !opened {
            return Err(Error::Upstream {
                message: "the test provider was dropped".into(),
            });
        }
        Ok(Reply::Complete(echo(&task)))
    }
}

/// The last user message of `task`, as a whole completion.
fn echo(task: &TaskFrame) -> Completion {
    let text = last_user_text(&task.body.to_value().unwrap_or_default());
    Completion::ok(virtual_llm_core::openai::completion_body(
        &format!("chatcmpl-{}", task.task_id),
        task.llm.as_str(),
        0,
        &text,
    ))
}

/// An upstream the test switches on and off: its probe passes while it is ready; it
/// echoes the last user message as a whole completion while ready, and answers as a
/// model server that is still loading otherwise (503 "Loading model", `Retry-After`
/// 1 s), so a request that reached it while down would show. Counts the tasks.
#[derive(Debug)]
pub struct Switchable {
    ready: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicUsize,
}

impl Switchable {
    /// An upstream that is `ready` or not.
    pub fn new(ready: bool) -> Self {
        Switchable {
            ready: std::sync::atomic::AtomicBool::new(ready),
            calls: Default::default(),
        }
    }

    /// Switches it on (`true`: its probe passes, it answers) or off.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether it is on.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many tasks reached it.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The answer of a model server still loading its model.
    pub fn loading() -> Completion {
        Completion {
            status: 503,
            body: serde_json::json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}).into(),
            retry_after: Some(Duration::from_secs(1)),
        }
    }
}

#[async_trait]
impl Provider for Switchable {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !self.is_ready() {
            return Ok(Reply::Complete(Self::loading()));
        }
        Ok(Reply::Complete(echo(&task)))
    }

    async fn probe(&self) -> bool {
        self.is_ready()
    }
}

/// What a [`CountingRecipe`] does when it runs.
#[derive(Debug)]
enum Effect {
    /// Switches a [`Switchable`] on or off, and succeeds.
    Switches(Arc<Switchable>, bool),
    /// Fails with this message.
    Fails(String),
    /// Succeeds without changing anything: the upstream stays as it was.
    Nothing,
}

/// A wake or sleep recipe that counts its runs and does one thing: switches a
/// [`Switchable`] on or off, fails with a message, or nothing at all. Held (see
/// [`CountingRecipe::held`]), each run waits for [`CountingRecipe::open`] before it
/// acts, so a test can look at the world while a wake is under way.
#[derive(Debug)]
pub struct CountingRecipe {
    effect: Effect,
    open: tokio::sync::watch::Sender<bool>,
    runs: std::sync::atomic::AtomicUsize,
}

impl CountingRecipe {
    fn new(effect: Effect) -> Self {
        CountingRecipe {
            effect,
            open: tokio::sync::watch::channel(true).0,
            runs: Default::default(),
        }
    }

    /// Switches `upstream` on (`ready`) or off, and succeeds: a wake recipe that
    /// works, or a sleep recipe.
    pub fn switching(upstream: Arc<Switchable>, ready: bool) -> Self {
        Self::new(Effect::Switches(upstream, ready))
    }

    /// Fails with `message`, as a command exiting non-zero does.
    pub fn failing(message: &str) -> Self {
        Self::new(Effect::Fails(message.to_owned()))
    }

    /// Succeeds and changes nothing: a wake after which the upstream never answers.
    pub fn doing_nothing() -> Self {
        Self::new(Effect::Nothing)
    }

    /// The same, each run waiting for [`CountingRecipe::open`] before it acts.
    #[must_use]
    pub fn held(self) -> Self {
        self.open.send_replace(false);
        self
    }

    /// Lets every held run, and every later one, act.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// How many runs started.
    pub fn runs(&self) -> usize {
        self.runs.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Recipe for CountingRecipe {
    async fn run(&self) -> Result<(), String> {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.subscribe();
        if open.wait_for(|open| *open).await.is_err() {
            return Err("the test recipe was dropped".to_owned());
        }
        match &self.effect {
            Effect::Switches(upstream, ready) => {
                upstream.set_ready(*ready);
                Ok(())
            }
            Effect::Fails(message) => Err(message.clone()),
            Effect::Nothing => Ok(()),
        }
    }
}

/// Answers as the [`EchoProvider`](crate::EchoProvider) does, and keeps the body of
/// every task that reached it: what an upstream behind the publisher is sent.
#[derive(Debug, Default)]
pub struct Recording {
    bodies: Mutex<Vec<Value>>,
    echo: crate::EchoProvider,
}

impl Recording {
    /// A recorder that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bodies of the tasks that reached it, in order.
    pub fn bodies(&self) -> Vec<Value> {
        virtual_llm_core::sync::lock(&self.bodies).clone()
    }
}

#[async_trait]
impl Provider for Recording {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let body = task.body.to_value().unwrap_or_default();
        virtual_llm_core::sync::lock(&self.bodies).push(body);
        self.echo.infer(task).await
    }
}
