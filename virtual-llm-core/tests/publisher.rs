//! The publisher driver over the loopback wire: publishing, answering streamed and
//! whole, cancel aborting the provider, stop taking rows out of service, reconnects,
//! re-registering after the gateway forgot the session, the sticky session file, and
//! the concurrency cap. Then upstream readiness (SPEC §12): the states a register and
//! each heartbeat carry, wakes (one recipe run however many frames, `ready` or
//! `wakeFailed` at once, the ready timeout), and idle LLMs put to sleep and woken
//! again.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use virtual_llm_core::protocol::{
    GatewayFrame, LlmState, RegisterRequest, TaskFrame, TaskKind, UpstreamState, WakeFrame,
};
use virtual_llm_core::publisher::{Connected, Outbox, PublisherState, Wire, WireError};
use virtual_llm_core::testkit::{FakeChannel, LoopbackWire, ManualClock, at};
use virtual_llm_core::{
    CommandRecipe, EchoProvider, Error, Gateway, InferRequest, LOCAL_REPLICA, LlmName, LlmStatus,
    LocalDirectory, MemoryStore, Provider, PublishedLlm, Publisher, PublisherOptions, Recipe,
    ReplicaId, Reply, SessionId, Store, TaskId, TaskResult, Write,
};

fn chat(model: &str, text: &str, stream: bool) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model, "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

fn published(names: &[&str], provider: Arc<dyn Provider>) -> Vec<PublishedLlm> {
    names
        .iter()
        .map(|n| PublishedLlm::new(spec(n), provider.clone()))
        .collect()
}

fn start(f: &Fixture, llms: Vec<PublishedLlm>, options: PublisherOptions) -> Publisher {
    let wire = Arc::new(LoopbackWire::new(f.gw.clone(), publisher("alice")));
    Publisher::spawn(wire, llms, options)
}

#[tokio::test]
async fn a_publisher_publishes_and_answers_whole_and_streamed() {
    let f = fixture().await;
    let p = start(
        &f,
        published(&["echo", "echo2"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    let session = p.connected().await;
    for n in ["echo", "echo2"] {
        let row = f.row(n).await;
        assert_eq!(
            (row.status, row.provider_session_id.as_ref()),
            (LlmStatus::Active, Some(&session))
        );
    }
    let whole =
        f.gw.infer(&client(), chat("echo", "hello there", false))
            .await
            .unwrap();
    assert_eq!(text_of(whole).await, "hello there");
    let streamed =
        f.gw.infer(&client(), chat("echo2", "one two three", true))
            .await
            .unwrap();
    assert_eq!(text_of(streamed).await, "one two three");
    p.stop().await;
}

#[tokio::test]
async fn stop_takes_the_rows_out_of_service_at_once() {
    let f = fixture().await;
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    p.connected().await;
    p.stop().await;
    for _ in 0..100 {
        if f.row("echo").await.status == LlmStatus::Inactive {
            let err =
                f.gw.infer(&client(), chat("echo", "x", false))
                    .await
                    .unwrap_err();
            assert_eq!(err.status(), 503);
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the row stayed active after stop");
}

/// Streams one chunk, then waits for ever; records when its stream is dropped.
#[derive(Debug, Default)]
struct Hanging {
    started: Notify,
    dropped: Arc<Notify>,
}

struct DropSignal(Arc<Notify>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl Provider for Hanging {
    async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
        self.started.notify_one();
        let guard = DropSignal(self.dropped.clone());
        let first = futures::stream::once(async { Ok("{\"choices\":[]}".to_owned()) });
        let forever = futures::stream::once(async move {
            let _guard = guard;
            std::future::pending::<Result<String, Error>>().await
        });
        Ok(Reply::Stream(first.chain(forever).boxed()))
    }
}

#[tokio::test]
async fn a_client_leaving_cancels_the_providers_work() {
    let f = fixture().await;
    let hanging = Arc::new(Hanging::default());
    let p = start(
        &f,
        published(&["slow"], hanging.clone()),
        PublisherOptions::default(),
    );
    p.connected().await;
    let Reply::Stream(mut chunks) =
        f.gw.infer(&client(), chat("slow", "x", true))
            .await
            .unwrap()
    else {
        panic!("expected a stream")
    };
    assert!(
        chunks.next().await.unwrap().is_ok(),
        "the first chunk arrives"
    );
    let dropped = hanging.dropped.notified();
    drop(chunks);
    dropped.await; // the cancel frame reached the publisher, which dropped the upstream stream
    assert_eq!(f.gw.in_flight(), 0);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replaced_channel_makes_the_publisher_reconnect_with_its_session() {
    let f = fixture().await;
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    let session = p.connected().await;
    let id = f.row("echo").await.id;
    // Another connection for the same session replaces the publisher's channel, which is
    // told to close; then that one goes away too.
    let intruder =
        f.gw.bind(&publisher("alice"), &session, Arc::new(FakeChannel::new()))
            .await
            .unwrap();
    let mut state = p.state();
    state
        .wait_for(|s| matches!(s, PublisherState::Backoff { .. }))
        .await
        .unwrap();
    // While the publisher backs off, the intruder's channel is the current one.
    assert!(
        intruder.release().await.unwrap(),
        "the intruder's binding was current"
    );
    assert_eq!(f.row("echo").await.status, LlmStatus::Inactive);
    state
        .wait_for(|s| matches!(s, PublisherState::Connected { .. }))
        .await
        .unwrap();
    assert_eq!(p.connected().await, session, "the same session comes back");
    let row = f.row("echo").await;
    assert_eq!((row.id, row.status), (id, LlmStatus::Active));
    assert_eq!(
        text_of(
            f.gw.infer(&client(), chat("echo", "back again", false))
                .await
                .unwrap()
        )
        .await,
        "back again"
    );
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_404_makes_the_publisher_register_again() {
    let dir = std::env::temp_dir().join(format!("vllm-pub-{}", SessionId::generate()));
    let file = dir.join("session");
    let f = fixture().await;
    let options = PublisherOptions {
        session_file: Some(file.clone()),
        ..PublisherOptions::default()
    };
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        options,
    );
    let first = p.connected().await;
    // The gateway loses the rows (an operator deleted them): the session is unknown.
    let row = f.row("echo").await;
    f.store
        .write(vec![Write::Delete {
            name: row.name.clone(),
            id: row.id.clone(),
            revision: row.revision,
        }])
        .await
        .unwrap();
    let mut state = p.state();
    state
        .wait_for(|s| matches!(s, PublisherState::Backoff { .. }))
        .await
        .unwrap();
    let second = loop {
        state.changed().await.unwrap();
        if let PublisherState::Connected { session } = &*state.borrow() {
            break session.clone();
        }
    };
    assert_ne!(second, first, "an unknown session gets a fresh id");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        second.as_str(),
        "and it is persisted"
    );
    assert_eq!(f.row("echo").await.status, LlmStatus::Active);
    p.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_session_file_makes_a_restarted_publisher_sticky() {
    let dir = std::env::temp_dir().join(format!("vllm-pub-{}", SessionId::generate()));
    let file = dir.join("session");
    let f = fixture().await;
    let options = PublisherOptions {
        session_file: Some(file.clone()),
        ..PublisherOptions::default()
    };
    let p = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        options.clone(),
    );
    let session = p.connected().await;
    let id = f.row("echo").await.id;
    p.stop().await;
    let again = start(
        &f,
        published(&["echo"], Arc::new(EchoProvider::new())),
        options,
    );
    assert_eq!(
        again.connected().await,
        session,
        "the persisted session is reused"
    );
    assert_eq!(f.row("echo").await.id, id, "and revives the same row");
    again.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Answers only when the test hands out a permit; counts how many tasks started.
#[derive(Debug)]
struct Gated {
    gate: Arc<Semaphore>,
    started: AtomicUsize,
}

#[async_trait]
impl Provider for Gated {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        EchoProvider::new().infer(task).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_cap_of_tasks_run_at_once() {
    let f = fixture().await;
    let gated = Arc::new(Gated {
        gate: Arc::new(Semaphore::new(0)),
        started: AtomicUsize::new(0),
    });
    let options = PublisherOptions {
        max_concurrent_tasks: 2,
        ..PublisherOptions::default()
    };
    let p = start(&f, published(&["gated"], gated.clone()), options);
    p.connected().await;
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let gw = f.gw.clone();
            tokio::spawn(async move {
                text_of(
                    gw.infer(&client(), chat("gated", &format!("n{i}"), false))
                        .await
                        .unwrap(),
                )
                .await
            })
        })
        .collect();
    while gated.started.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        gated.started.load(Ordering::SeqCst),
        2,
        "the third task waits for a permit"
    );
    gated.gate.add_permits(3);
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    answers.sort();
    assert_eq!(answers, ["n0", "n1", "n2"]);
    assert_eq!(gated.started.load(Ordering::SeqCst), 3);
    p.stop().await;
}

#[tokio::test]
async fn a_refused_register_backs_off_and_says_why() {
    let f = fixture().await;
    // Bob holds the name, so Alice's publisher is refused with a 409.
    let (_s, _b, _c) = f.online("bob", &["taken"]).await;
    let p = start(
        &f,
        published(&["taken"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    let mut state = p.state();
    let error = loop {
        state.changed().await.unwrap();
        if let PublisherState::Backoff { error, delay } = &*state.borrow() {
            assert!(
                *delay >= Duration::from_millis(2500) && *delay <= Duration::from_secs(5),
                "{delay:?}"
            );
            break error.clone();
        }
    };
    assert!(error.contains("409") && error.contains("taken"), "{error}");
    assert_eq!(f.row("taken").await.owner, "bob");
    p.stop().await;
}

/// A stream that breaks off upstream midway: the client's stream ends with the
/// upstream's message, said once as an upstream error (not "upstream error: upstream
/// error: …"); the chunks before it arrived.
#[tokio::test]
async fn an_upstream_breaking_off_midway_is_reported_once() {
    #[derive(Debug)]
    struct Breaks;
    #[async_trait]
    impl Provider for Breaks {
        async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
            let chunks = futures::stream::iter([
                Ok(r#"{"choices":[{"delta":{"content":"half"}}]}"#.to_owned()),
                Err(Error::Upstream {
                    message: "the stream of upstream x broke off".into(),
                }),
            ]);
            Ok(Reply::Stream(chunks.boxed()))
        }
    }
    let f = fixture().await;
    let p = start(
        &f,
        published(&["breaks"], Arc::new(Breaks)),
        PublisherOptions::default(),
    );
    p.connected().await;
    let Reply::Stream(mut chunks) =
        f.gw.infer(&client(), chat("breaks", "x", true))
            .await
            .unwrap()
    else {
        panic!("a stream")
    };
    assert!(chunks.next().await.unwrap().unwrap().contains("half"));
    let err = chunks.next().await.unwrap().unwrap_err();
    assert_eq!(err.status(), 502);
    assert_eq!(
        err.to_string(),
        "upstream error: the stream of upstream x broke off"
    );
    assert!(chunks.next().await.is_none());
    p.stop().await;
}

/// A provider's error answer (an upstream's own 503 with its `Retry-After`) is posted
/// as an answer, not as a failure: the client gets its status, body and `Retry-After`,
/// on a streaming request too.
#[tokio::test]
async fn an_upstream_error_answer_is_posted_as_it_came() {
    #[derive(Debug)]
    struct Loading;
    #[async_trait]
    impl Provider for Loading {
        async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
            Ok(Reply::Complete(virtual_llm_core::Completion {
                status: 503,
                body: json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}).into(),
                retry_after: Some(Duration::from_secs(7)),
            }))
        }
    }
    let f = fixture().await;
    let p = start(
        &f,
        published(&["loading"], Arc::new(Loading)),
        PublisherOptions::default(),
    );
    p.connected().await;
    for stream in [false, true] {
        let reply = f.gw.infer(&client(), chat("loading", "x", stream)).await;
        let Ok(Reply::Complete(c)) = reply else {
            panic!("a completion, stream: {stream}: {reply:?}")
        };
        assert_eq!(c.status, 503);
        assert_eq!(c.json()["error"]["message"], "Loading model");
        assert_eq!(c.retry_after, Some(Duration::from_secs(7)));
    }
    p.stop().await;
}

// ---------------------------------------------------------------------------------
// Upstream readiness, wake and idle sleep (SPEC §12), in paused time: the recorded
// wire shows what the publisher registers and heartbeats, and the test pushes `wake`
// (and stray `task`) frames down the publisher's channel through the gateway's
// directory, as the gateway would.
// ---------------------------------------------------------------------------------

/// A provider answering like the echo model, whose upstream the test switches up and
/// down; counts probes and tasks.
#[derive(Debug, Default)]
struct Switched {
    up: AtomicBool,
    probes: AtomicUsize,
    tasks: AtomicUsize,
}

impl Switched {
    fn new(up: bool) -> Arc<Self> {
        let s = Switched::default();
        s.up.store(up, Ordering::SeqCst);
        Arc::new(s)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

#[async_trait]
impl Provider for Switched {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        EchoProvider::new().infer(task).await
    }

    async fn probe(&self) -> bool {
        self.probes.fetch_add(1, Ordering::SeqCst);
        self.up.load(Ordering::SeqCst)
    }
}

/// A recipe the test scripts: counts its runs, waits for the test's go when gated,
/// then switches the upstream (if told to) and answers as told.
#[derive(Debug)]
struct Script {
    runs: AtomicUsize,
    started: Notify,
    gate: Semaphore,
    upstream: Option<(Arc<Switched>, bool)>,
    outcome: Result<(), String>,
}

impl Script {
    /// Switches `upstream` to `up` and succeeds.
    fn switching(upstream: &Arc<Switched>, up: bool) -> Self {
        Script {
            runs: AtomicUsize::new(0),
            started: Notify::new(),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            upstream: Some((upstream.clone(), up)),
            outcome: Ok(()),
        }
    }

    /// Succeeds and changes nothing.
    fn doing_nothing() -> Self {
        Script {
            upstream: None,
            ..Script::switching(&Switched::new(false), false)
        }
    }

    /// Fails with `message`.
    fn failing(message: &str) -> Self {
        Script {
            outcome: Err(message.to_owned()),
            ..Script::doing_nothing()
        }
    }

    /// Waits for [`Script::go`] before it does anything.
    fn gated(self) -> Self {
        Script {
            gate: Semaphore::new(0),
            ..self
        }
    }

    fn go(&self) {
        self.gate.add_permits(1);
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Recipe for Script {
    async fn run(&self) -> Result<(), String> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        self.gate.acquire().await.unwrap().forget();
        if let Some((upstream, up)) = &self.upstream {
            upstream.set(*up);
        }
        self.outcome.clone()
    }
}

/// A heartbeat as the wire saw it: when, and the states it carried.
#[derive(Debug)]
struct Beat {
    at: Instant,
    llms: Vec<LlmState>,
}

impl Beat {
    /// `(name, state, wakeFailed)` of each LLM, in order.
    fn states(&self) -> Vec<(String, UpstreamState, Option<String>)> {
        self.llms
            .iter()
            .map(|s| (s.name.to_string(), s.state, s.wake_failed.clone()))
            .collect()
    }

    fn state_of(&self, name: &str) -> UpstreamState {
        self.llms
            .iter()
            .find(|s| s.name.as_str() == name)
            .unwrap_or_else(|| panic!("{name} in {self:?}"))
            .state
    }
}

/// The loopback wire, recording each register and heartbeat on the way.
#[derive(Debug)]
struct Recording {
    inner: LoopbackWire,
    registers: Arc<Mutex<Vec<RegisterRequest>>>,
    beats: mpsc::UnboundedSender<Beat>,
}

struct RecordingOutbox {
    inner: Arc<dyn Outbox>,
    beats: mpsc::UnboundedSender<Beat>,
}

#[async_trait]
impl Wire for Recording {
    async fn connect(&self, request: RegisterRequest) -> Result<Connected, WireError> {
        self.registers.lock().unwrap().push(request.clone());
        let mut connected = self.inner.connect(request).await?;
        connected.outbox = Arc::new(RecordingOutbox {
            inner: connected.outbox,
            beats: self.beats.clone(),
        });
        Ok(connected)
    }
}

#[async_trait]
impl Outbox for RecordingOutbox {
    async fn heartbeat(&self, llms: Option<Vec<LlmState>>) -> Result<(), WireError> {
        let beat = Beat {
            at: Instant::now(),
            llms: llms
                .clone()
                .expect("a protocol 2 heartbeat carries the states"),
        };
        self.beats.send(beat).unwrap();
        self.inner.heartbeat(llms).await
    }

    async fn send(
        &self,
        task: TaskId,
        results: futures::stream::BoxStream<'static, TaskResult>,
    ) -> Result<(), WireError> {
        self.inner.send(task, results).await
    }

    async fn delivered(&self) -> Result<(), WireError> {
        self.inner.delivered().await
    }
}

/// A gateway whose channels the test can push frames into, and a publisher of `llms`
/// on it, connected.
struct Harness {
    gw: Gateway,
    directory: Arc<LocalDirectory>,
    registers: Arc<Mutex<Vec<RegisterRequest>>>,
    beats: mpsc::UnboundedReceiver<Beat>,
    publisher: Publisher,
    session: SessionId,
}

/// Heartbeat interval of the harness's gateway (the default).
const EVERY: Duration = Duration::from_secs(30);

impl Harness {
    async fn start(llms: Vec<PublishedLlm>) -> Harness {
        let directory = Arc::new(LocalDirectory::new(
            ReplicaId::parse(LOCAL_REPLICA).unwrap(),
        ));
        let gw = Gateway::builder(Arc::new(MemoryStore::new()))
            .clock(Arc::new(ManualClock::new(at(START))))
            .directory(directory.clone())
            .start()
            .await
            .unwrap();
        assert_eq!(gw.config().heartbeat_interval, EVERY);
        let registers = Arc::new(Mutex::new(Vec::new()));
        let (beats_tx, beats) = mpsc::unbounded_channel();
        let wire = Recording {
            inner: LoopbackWire::new(gw.clone(), publisher("alice")),
            registers: registers.clone(),
            beats: beats_tx,
        };
        let publisher = Publisher::spawn(Arc::new(wire), llms, PublisherOptions::default());
        let session = publisher.connected().await;
        Harness {
            gw,
            directory,
            registers,
            beats,
            publisher,
            session,
        }
    }

    /// Pushes `frame` down the publisher's channel.
    fn frame(&self, frame: GatewayFrame) {
        self.directory
            .sink(&self.session)
            .expect("the publisher's channel is bound")
            .send(frame)
            .unwrap();
    }

    fn wake(&self, llm: &str) {
        self.frame(GatewayFrame::Wake(WakeFrame {
            llm: LlmName::parse(llm).unwrap(),
        }));
    }

    /// The next heartbeat (time moves on to it).
    async fn beat(&mut self) -> Beat {
        self.beats.recv().await.unwrap()
    }

    /// The register's state of each LLM.
    fn registered(&self, n: usize) -> Vec<(String, Option<UpstreamState>)> {
        self.registers.lock().unwrap()[n]
            .llms
            .iter()
            .map(|s| (s.name.to_string(), s.state))
            .collect()
    }

    /// Lets every task run and the publisher drain its channel, without moving time
    /// by more than a millisecond.
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn llm(name: &str, provider: Arc<dyn Provider>) -> PublishedLlm {
    PublishedLlm::new(spec(name), provider)
}

fn ready(name: &str) -> (String, UpstreamState, Option<String>) {
    (name.to_owned(), UpstreamState::Ready, None)
}

fn state(name: &str, state: UpstreamState) -> (String, UpstreamState, Option<String>) {
    (name.to_owned(), state, None)
}

fn wake_failed(
    name: &str,
    state: UpstreamState,
    message: &str,
) -> (String, UpstreamState, Option<String>) {
    (name.to_owned(), state, Some(message.to_owned()))
}

/// Before registering, the publisher probes each upstream: one that answers is
/// `ready`; one that does not is `asleep` when it has a wake recipe, else
/// `unavailable`. The register carries the states, and the gateway keeps them.
#[tokio::test(start_paused = true)]
async fn the_register_carries_each_upstreams_state_from_its_probe() {
    let up = Switched::new(true);
    let down = Switched::new(false);
    let h = Harness::start(vec![
        llm("up", up.clone()),
        llm("sleeper", down.clone()).with_wake(Arc::new(Script::switching(&down, true))),
        llm("down", down.clone()),
        llm("echo", Arc::new(EchoProvider::new())),
    ])
    .await;
    assert_eq!(
        h.registered(0),
        [
            ("up".to_owned(), Some(UpstreamState::Ready)),
            ("sleeper".to_owned(), Some(UpstreamState::Asleep)),
            ("down".to_owned(), Some(UpstreamState::Unavailable)),
            ("echo".to_owned(), Some(UpstreamState::Ready)),
        ]
    );
    assert_eq!(
        up.probes.load(Ordering::SeqCst),
        1,
        "probed once, before registering"
    );
    for (name, upstream) in [
        ("up", UpstreamState::Ready),
        ("sleeper", UpstreamState::Asleep),
        ("down", UpstreamState::Unavailable),
    ] {
        let row =
            h.gw.store()
                .get(&LlmName::parse(name).unwrap())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(row.upstream, Some(upstream), "{name}");
    }
    h.publisher.stop().await;
}

/// Every heartbeat probes the upstreams again and carries every LLM's state, so a
/// change (down, up, down again) reaches the gateway in the very heartbeat whose
/// probe found it; heartbeats keep their interval.
#[tokio::test(start_paused = true)]
async fn heartbeats_carry_every_state_and_follow_the_probes() {
    let flaky = Switched::new(true);
    let sleeper = Switched::new(true);
    let mut h = Harness::start(vec![
        llm("flaky", flaky.clone()),
        llm("sleeper", sleeper.clone()).with_wake(Arc::new(Script::switching(&sleeper, true))),
    ])
    .await;
    let connected = Instant::now();
    let first = h.beat().await;
    assert_eq!(first.at - connected, EVERY);
    assert_eq!(first.states(), [ready("flaky"), ready("sleeper")]);

    tokio::time::sleep(EVERY / 2).await;
    flaky.set(false);
    sleeper.set(false);
    let second = h.beat().await;
    assert_eq!(
        second.at - first.at,
        EVERY,
        "no beat in between: probes run with them"
    );
    assert_eq!(
        second.states(),
        [
            state("flaky", UpstreamState::Unavailable),
            state("sleeper", UpstreamState::Asleep)
        ]
    );

    flaky.set(true);
    let third = h.beat().await;
    assert_eq!(third.at - second.at, EVERY);
    assert_eq!(
        third.states(),
        [ready("flaky"), state("sleeper", UpstreamState::Asleep)]
    );

    flaky.set(false);
    assert_eq!(
        h.beat().await.states(),
        [
            state("flaky", UpstreamState::Unavailable),
            state("sleeper", UpstreamState::Asleep)
        ]
    );
    h.publisher.stop().await;
}

/// However many `wake` frames come while a wake runs, its recipe runs once;
/// heartbeats go on meanwhile (reporting it asleep, so nothing is reaped), and when
/// the upstream answers a heartbeat says `ready` at once, not at the next interval.
/// A wake for an LLM this publisher does not serve is ignored.
#[tokio::test(start_paused = true)]
async fn five_wake_frames_run_the_recipe_once_then_ready_is_reported_at_once() {
    let upstream = Switched::new(false);
    let wake = Arc::new(Script::switching(&upstream, true).gated());
    let mut h = Harness::start(vec![
        llm("vllm", upstream.clone()).with_wake(wake.clone()),
        llm("echo", Arc::new(EchoProvider::new())),
    ])
    .await;
    let connected = Instant::now();
    assert_eq!(
        h.registered(0),
        [
            ("vllm".to_owned(), Some(UpstreamState::Asleep)),
            ("echo".to_owned(), Some(UpstreamState::Ready)),
        ]
    );
    let started = wake.started.notified();
    h.wake("vllm");
    started.await;
    for _ in 0..4 {
        h.wake("vllm");
    }
    h.wake("not-mine");
    h.settle().await;
    assert_eq!(wake.runs(), 1);

    // The recipe is still running: heartbeats go on, saying it is asleep.
    for _ in 0..2 {
        let beat = h.beat().await;
        assert_eq!(
            beat.states(),
            [state("vllm", UpstreamState::Asleep), ready("echo")]
        );
    }
    // Between two heartbeats, the recipe ends and the upstream answers.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let go = Instant::now();
    wake.go();
    let beat = h.beat().await;
    assert!(
        beat.at - go < Duration::from_secs(1),
        "at once: {:?}",
        beat.at - go
    );
    assert_eq!(beat.states(), [ready("vllm"), ready("echo")]);
    assert_eq!(wake.runs(), 1);
    // One wake, one outcome: the next heartbeat is the periodic one.
    let next = h.beat().await;
    assert_eq!(
        (next.at - connected).as_secs() % EVERY.as_secs(),
        0,
        "{:?} after connecting",
        next.at - connected
    );

    // Awake, a late wake frame finds it ready without running the recipe again.
    h.wake("vllm");
    assert_eq!(h.beat().await.states(), [ready("vllm"), ready("echo")]);
    assert_eq!(wake.runs(), 1);
    h.publisher.stop().await;
}

/// A wake recipe that fails is reported at once as `wakeFailed` with its message, the
/// LLM staying `asleep`; the message goes in one heartbeat only. A later wake runs the
/// recipe again.
#[tokio::test(start_paused = true)]
async fn a_failing_wake_recipe_is_reported_with_its_message() {
    let upstream = Switched::new(false);
    let wake = Arc::new(Script::failing("exit status 3: oops"));
    let mut h = Harness::start(vec![llm("vllm", upstream.clone()).with_wake(wake.clone())]).await;
    let asked = Instant::now();
    h.wake("vllm");
    let beat = h.beat().await;
    assert!(beat.at - asked < Duration::from_secs(1), "at once");
    assert_eq!(
        beat.states(),
        [wake_failed(
            "vllm",
            UpstreamState::Asleep,
            "exit status 3: oops"
        )]
    );
    let next = h.beat().await;
    assert_eq!(
        next.states(),
        [state("vllm", UpstreamState::Asleep)],
        "reported once"
    );
    h.wake("vllm");
    assert_eq!(
        h.beat().await.states(),
        [wake_failed(
            "vllm",
            UpstreamState::Asleep,
            "exit status 3: oops"
        )]
    );
    assert_eq!(wake.runs(), 2);
    h.publisher.stop().await;
}

/// The same through a real command: its exit status and the last line of its stderr.
#[tokio::test]
async fn a_failing_wake_command_is_reported_with_its_status_and_stderr() {
    let upstream = Switched::new(false);
    let command =
        CommandRecipe::new(["sh", "-c", "echo starting >&2; echo oops >&2; exit 3"]).unwrap();
    let mut h = Harness::start(vec![
        llm("vllm", upstream.clone()).with_wake(Arc::new(command)),
    ])
    .await;
    h.wake("vllm");
    assert_eq!(
        h.beat().await.states(),
        [wake_failed(
            "vllm",
            UpstreamState::Asleep,
            "exit status 3: oops"
        )]
    );
    h.publisher.stop().await;
}

/// A recipe that succeeds but leaves the upstream silent is probed every second until
/// the ready timeout, then reported `wakeFailed`; a recipe that does not even finish
/// in time says so.
#[tokio::test(start_paused = true)]
async fn a_wake_that_never_answers_fails_at_the_ready_timeout() {
    let silent = Switched::new(false);
    let hanging = Switched::new(false);
    let stuck = Arc::new(Script::doing_nothing().gated());
    let mut h = Harness::start(vec![
        llm("silent", silent.clone())
            .with_wake(Arc::new(Script::doing_nothing()))
            .with_ready_timeout(Duration::from_secs(20)),
        llm("hanging", hanging.clone())
            .with_wake(stuck.clone())
            .with_ready_timeout(Duration::from_secs(25)),
    ])
    .await;
    let probes_before = silent.probes.load(Ordering::SeqCst);
    let asked = Instant::now();
    h.wake("silent");
    h.wake("hanging");
    let beat = h.beat().await;
    assert_eq!(beat.at - asked, Duration::from_secs(20));
    assert_eq!(
        beat.states(),
        [
            wake_failed("silent", UpstreamState::Asleep, "not ready within 20s"),
            state("hanging", UpstreamState::Asleep)
        ]
    );
    let probes = silent.probes.load(Ordering::SeqCst) - probes_before;
    assert!(
        (20..=22).contains(&probes),
        "about one probe a second for 20 s: {probes}"
    );
    let beat = h.beat().await;
    assert_eq!(beat.at - asked, Duration::from_secs(25));
    assert_eq!(
        beat.states(),
        [
            state("silent", UpstreamState::Asleep),
            wake_failed(
                "hanging",
                UpstreamState::Asleep,
                "the wake recipe did not finish within 25s"
            )
        ]
    );
    assert_eq!(stuck.runs(), 1);
    h.publisher.stop().await;
}

/// An LLM without a wake recipe cannot be woken: a wake frame is answered with
/// `wakeFailed` "no wake recipe", and it stays `unavailable`.
#[tokio::test(start_paused = true)]
async fn a_wake_without_a_recipe_fails_saying_so() {
    let mut h = Harness::start(vec![llm("down", Switched::new(false))]).await;
    assert_eq!(
        h.registered(0),
        [("down".to_owned(), Some(UpstreamState::Unavailable))]
    );
    h.wake("down");
    assert_eq!(
        h.beat().await.states(),
        [wake_failed(
            "down",
            UpstreamState::Unavailable,
            "no wake recipe"
        )]
    );
    h.publisher.stop().await;
}

/// An LLM left without a task for `idle_after` is put to sleep with its recipe and
/// reported `asleep` at once. A task resets the timer. It stays asleep although its
/// upstream still answers probes (vLLM's sleep mode lists its models) and a stray task
/// still runs; a wake runs the wake recipe and it is `ready` again.
#[tokio::test(start_paused = true)]
async fn an_idle_llm_is_put_to_sleep_and_woken_again() {
    const IDLE: Duration = Duration::from_secs(15 * 60);
    let upstream = Switched::new(true);
    let sleep = Arc::new(Script::doing_nothing());
    let wake = Arc::new(Script::doing_nothing());
    let mut h = Harness::start(vec![
        llm("vllm", upstream.clone())
            .with_wake(wake.clone())
            .with_sleep(sleep.clone())
            .with_idle_after(IDLE),
        llm("echo", Arc::new(EchoProvider::new())),
    ])
    .await;
    // Ten minutes in (and off the heartbeats' beat), a task: the timer starts again
    // after it.
    tokio::time::sleep(Duration::from_secs(10 * 60 + 7)).await;
    let answer = text_of(
        h.gw.infer(&client(), chat("vllm", "still needed", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer, "still needed");
    let last_task = Instant::now();
    let asleep = loop {
        let beat = h.beat().await;
        if beat.state_of("vllm") == UpstreamState::Asleep {
            break beat;
        }
        assert_eq!(beat.states(), [ready("vllm"), ready("echo")]);
    };
    let idle = asleep.at - last_task;
    assert!(
        idle >= IDLE && idle < IDLE + Duration::from_secs(1),
        "asleep at once after {IDLE:?} idle, not at a heartbeat: {idle:?}"
    );
    assert_eq!(
        asleep.states(),
        [state("vllm", UpstreamState::Asleep), ready("echo")]
    );
    assert_eq!(sleep.runs(), 1);

    // Its upstream still answers probes, yet it stays asleep; a stray task runs.
    let beat = h.beat().await;
    assert_eq!(
        beat.states(),
        [state("vllm", UpstreamState::Asleep), ready("echo")]
    );
    let tasks = upstream.tasks.load(Ordering::SeqCst);
    h.frame(GatewayFrame::Task(TaskFrame {
        task_id: TaskId::generate(),
        kind: TaskKind::Infer,
        endpoint: Default::default(),
        llm: LlmName::parse("vllm").unwrap(),
        stream: false,
        body: json!({"messages": [{"role": "user", "content": "hi"}]}).into(),
    }));
    h.settle().await;
    assert_eq!(upstream.tasks.load(Ordering::SeqCst), tasks + 1, "it ran");

    // The gateway asks for it: the wake recipe runs (the probe alone does not decide
    // for an LLM this publisher put to sleep), and it is ready at once.
    let asked = Instant::now();
    h.wake("vllm");
    let beat = h.beat().await;
    assert!(beat.at - asked < Duration::from_secs(1), "at once");
    assert_eq!(beat.states(), [ready("vllm"), ready("echo")]);
    assert_eq!((wake.runs(), sleep.runs()), (1, 1));

    // And after another idle period it sleeps again.
    let awake = Instant::now();
    let asleep = loop {
        let beat = h.beat().await;
        if beat.state_of("vllm") == UpstreamState::Asleep {
            break beat;
        }
    };
    assert!(asleep.at - awake >= IDLE);
    assert_eq!(sleep.runs(), 2);
    h.publisher.stop().await;
}

/// A sleep recipe that fails leaves the LLM `ready` (its upstream is up) and is tried
/// again after another idle period.
#[tokio::test(start_paused = true)]
async fn a_failing_sleep_recipe_leaves_the_llm_ready() {
    const IDLE: Duration = Duration::from_secs(60);
    let upstream = Switched::new(true);
    let sleep = Arc::new(Script::failing("exit status 1: unit not found"));
    let mut h = Harness::start(vec![
        llm("vllm", upstream.clone())
            .with_wake(Arc::new(Script::doing_nothing()))
            .with_sleep(sleep.clone())
            .with_idle_after(IDLE),
    ])
    .await;
    let started = Instant::now();
    while Instant::now() - started < IDLE * 3 + IDLE / 2 {
        assert_eq!(h.beat().await.states(), [ready("vllm")]);
    }
    assert_eq!(sleep.runs(), 3, "once per idle period");
    h.publisher.stop().await;
}

/// An idle time too long for the clock to reach never comes, and breaks nothing: the
/// other LLMs still go to sleep on time.
#[tokio::test(start_paused = true)]
async fn an_idle_time_past_the_end_of_time_never_comes() {
    let forever = Arc::new(Script::doing_nothing());
    let short = Arc::new(Script::doing_nothing());
    let mut h = Harness::start(vec![
        llm("forever", Switched::new(true))
            .with_wake(Arc::new(Script::doing_nothing()))
            .with_sleep(forever.clone())
            .with_idle_after(Duration::MAX),
        llm("short", Switched::new(true))
            .with_wake(Arc::new(Script::doing_nothing()))
            .with_sleep(short.clone())
            .with_idle_after(Duration::from_secs(45)),
    ])
    .await;
    assert_eq!(h.beat().await.states(), [ready("forever"), ready("short")]);
    assert_eq!(
        h.beat().await.states(),
        [ready("forever"), state("short", UpstreamState::Asleep)],
        "short fell asleep after 45 s"
    );
    for _ in 0..3 {
        assert_eq!(
            h.beat().await.states(),
            [ready("forever"), state("short", UpstreamState::Asleep)]
        );
    }
    assert_eq!((forever.runs(), short.runs()), (0, 1));
    h.publisher.stop().await;
}

/// A gateway that cannot be reached, or that refuses: counts the connects it saw.
#[derive(Debug, Default)]
struct Unreachable {
    calls: AtomicUsize,
    refuse: bool,
}

#[async_trait]
impl Wire for Unreachable {
    async fn connect(&self, _request: RegisterRequest) -> Result<Connected, WireError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.refuse {
            return Err(WireError::Refused {
                status: 403,
                message: "no".into(),
            });
        }
        Err(WireError::Connection("connection refused".into()))
    }
}

/// `publisher --gateway A,B` (SPEC §14): a publisher whose first gateway is down
/// publishes through the next one at once, keeps using it (the one that worked is
/// tried first), and serves through it.
#[tokio::test]
async fn a_failover_wire_publishes_through_the_next_gateway() {
    use virtual_llm_core::publisher::FailoverWire;

    let f = fixture().await;
    let down = Arc::new(Unreachable::default());
    let wire = Arc::new(
        FailoverWire::new(vec![
            down.clone(),
            Arc::new(LoopbackWire::new(f.gw.clone(), publisher("alice"))),
        ])
        .unwrap(),
    );
    let p = Publisher::spawn(
        wire.clone(),
        published(&["echo"], Arc::new(EchoProvider::new())),
        PublisherOptions::default(),
    );
    p.connected().await;
    assert_eq!(down.calls.load(Ordering::SeqCst), 1, "tried first, once");
    assert_eq!(wire.current(), 1, "the gateway that worked");
    let answer =
        f.gw.infer(&client(), chat("echo", "hi", false))
            .await
            .unwrap();
    assert_eq!(text_of(answer).await, "hi");
    p.stop().await;
    assert!(FailoverWire::new(Vec::new()).is_none(), "no gateway at all");
}

/// A refusal is the shared registry's answer, the same on every replica: the wire
/// returns it without trying the other gateways; a connection failure on every
/// gateway is returned after each was tried once.
#[tokio::test]
async fn a_failover_wire_moves_on_only_when_a_gateway_is_unreachable() {
    use virtual_llm_core::publisher::FailoverWire;

    let request = || RegisterRequest {
        agents: Vec::new(),
        provider_session_id: None,
        protocol_version: None,
        llms: Vec::new(),
        capabilities: Vec::new(),
    };
    let refusing = Arc::new(Unreachable {
        refuse: true,
        ..Unreachable::default()
    });
    let other = Arc::new(Unreachable::default());
    let wire = FailoverWire::new(vec![refusing.clone(), other.clone()]).unwrap();
    let err = wire.connect(request()).await.unwrap_err();
    assert!(
        matches!(err, WireError::Refused { status: 403, .. }),
        "{err:?}"
    );
    assert_eq!(other.calls.load(Ordering::SeqCst), 0, "not tried");

    let (a, b) = (
        Arc::new(Unreachable::default()),
        Arc::new(Unreachable::default()),
    );
    let wire = FailoverWire::new(vec![a.clone(), b.clone()]).unwrap();
    let err = wire.connect(request()).await.unwrap_err();
    assert!(matches!(err, WireError::Connection(_)), "{err:?}");
    assert_eq!(
        (
            a.calls.load(Ordering::SeqCst),
            b.calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(
        wire.current(),
        1,
        "the next round starts with the next gateway"
    );
}
