//! The publisher side of the protocol, independent of the wire.
//!
//! A [`Publisher`] keeps a set of local LLMs published: it registers them (with the
//! session id persisted in the session file, for sticky reconnects), opens the control
//! channel, heartbeats at the interval the gateway asks for, runs each task on its
//! LLM's [`Provider`] (concurrently, up to a cap), streams the results back, aborts a
//! task on `cancel`, re-registers when a heartbeat says the session is unknown, and
//! reconnects with exponential backoff and jitter when the channel drops.
//!
//! It also keeps the gateway told whether each upstream can answer (SPEC §12, see
//! `readiness`): it probes them before each register and every heartbeat, sends each
//! LLM's `state` in both, wakes an LLM on the gateway's `wake` frame with its wake
//! recipe, puts an idle one to sleep with its sleep recipe, and heartbeats at once when
//! a state changes or a wake fails. Wakes and sleeps run beside the frame reader and
//! the heartbeats, never in their way.
//!
//! With the gateway's grant of the capability `resume` (SPEC §15), a dropped channel
//! no longer stops the tasks: their upstream calls go on into each task's log (see
//! `task_log`), the publisher reconnects at once, then after 100 ms doubling up to a
//! second, for the resume window, and on the session's next channel replays each task from its log after a
//! `resume`. A task not resumed within the window is stopped.
//!
//! How bytes travel is a [`Wire`]'s business: the SSE transport posts results as
//! NDJSON and reads an event stream; the WebSocket transport does both on one socket.
//! Everything in this file is the same for both.

pub use crate::failover::FailoverWire;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use rand::RngExt as _;
use tokio::sync::{Semaphore, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::protocol::{
    AgentSpec, GatewayFrame, LlmSpec, LlmState, RegisterRequest, RegisterResponse, TaskFrame,
    TaskResult,
};
use crate::readiness::Upstreams;
use crate::recipe::Recipe;
use crate::sync::lock;
use crate::task_log::TaskLog;
use crate::{Config, Error, LlmName, Provider, Reply, SessionId, TaskId};

/// Why a wire operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The gateway does not know the session (404): register again.
    #[error("the gateway does not know this session")]
    UnknownSession,
    /// The gateway refused (401, 403, 409, 426…): retrying as-is will not help soon.
    #[error("the gateway refused: {status} {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The gateway's message.
        message: String,
    },
    /// The connection failed or broke; retry later.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The gateway sent something this publisher cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl WireError {
    /// Classifies a gateway's HTTP answer: 404 means the session is gone, other 4xx
    /// are refusals, anything else is worth retrying.
    pub fn from_status(status: u16, message: impl Into<String>) -> Self {
        let message = message.into();
        match status {
            404 => WireError::UnknownSession,
            400..=499 => WireError::Refused { status, message },
            _ => WireError::Connection(format!("{status} {message}")),
        }
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        WireError::from_status(e.status(), e.to_string())
    }
}

/// How long a publisher's control channel may stay silent (no frame, no keep-alive
/// ping) before the publisher calls it dead and reconnects, given the gateway's
/// keep-alive period (`keepAliveMs` in the register answer and `hello`).
///
/// Three keep-alive periods, and at least a second: one late ping is a busy gateway
/// or a slow link, three missed in a row is a dead one (the same ratio as the stale
/// timeout to the heartbeat interval). It follows the keep-alive and not the
/// heartbeat interval: an idle channel carries only pings, however often the
/// publisher heartbeats. A gateway that does not send `keepAliveMs` (an older one)
/// leaves the rule to the wire.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_core::publisher::silence_limit;
///
/// assert_eq!(silence_limit(20_000), Duration::from_secs(60));
/// assert_eq!(silence_limit(100), Duration::from_secs(1));
/// ```
pub fn silence_limit(keep_alive_ms: u64) -> Duration {
    Duration::from_millis(keep_alive_ms.saturating_mul(3).max(1000))
}

/// A registered publisher with an open control channel.
pub struct Connected {
    /// The gateway's answer to the register: session id, interval, rows.
    pub answer: RegisterResponse,
    /// Frames from the gateway; ends when the channel closes.
    pub frames: BoxStream<'static, Result<GatewayFrame, WireError>>,
    /// The way back: heartbeats and results.
    pub outbox: Arc<dyn Outbox>,
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("answer", &self.answer)
            .finish_non_exhaustive()
    }
}

/// How a publisher reaches a gateway.
///
/// # Contract
/// `connect` registers and opens the control channel; when it returns, the channel is
/// bound (the rows are active). `frames` ends when the channel closes, for whatever
/// reason.
#[async_trait]
pub trait Wire: fmt::Debug + Send + Sync + 'static {
    /// Registers with `request` and opens the control channel.
    async fn connect(&self, request: RegisterRequest) -> Result<Connected, WireError>;
}

/// The publisher→gateway half of a connection.
///
/// # Contract
/// Both methods may be called concurrently with each other and with reading frames.
/// `send` delivers `results` of one task in order, each as soon as the stream yields
/// it; it returns when the stream has ended and been delivered.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// One heartbeat, carrying each LLM's upstream state (`llms`, protocol 2; `None`
    /// to a version 1 gateway); [`WireError::UnknownSession`] when the gateway forgot
    /// us.
    async fn heartbeat(&self, llms: Option<Vec<LlmState>>) -> Result<(), WireError>;
    /// Streams the results of `task` to the gateway.
    async fn send(
        &self,
        task: TaskId,
        results: BoxStream<'static, TaskResult>,
    ) -> Result<(), WireError>;

    /// Waits until every result this outbox sent before the call is known to have
    /// reached the gateway: at once when a [`send`](Outbox::send) already means it
    /// (an HTTP post answered); on a socket, when the gateway answers a ping sent after
    /// them. An error means they may be lost with the channel. A resumable task stays
    /// replayable until this returns.
    async fn delivered(&self) -> Result<(), WireError>;
}

/// How long a resumable task that has sent its last result waits for the gateway to
/// confirm it (see [`Outbox::delivered`]) before it is let go: past this, the channel
/// is wedged and its own silence limit drops it.
const DELIVERY_CONFIRMATION: Duration = Duration::from_secs(30);

/// Where a discovering publisher reads the LLMs to publish (SPEC §17: `publisher
/// --discover URL` publishes every model its upstream lists).
///
/// # Contract
/// `llms` answers the LLMs to publish now, each with its provider, within a few
/// seconds (the publisher gives up after 10 s and keeps what it publishes). An error,
/// or an empty list, leaves the published set as it is. It is asked before the first
/// register and every heartbeat interval after; when the set of names (or a model) it
/// answers differs from what is published, the publisher registers the new set at
/// once: it reconnects with the same session, so a new name is published and a name
/// that went is dropped from the session's register (its row goes inactive). Requests
/// in flight on that publisher fail with 503, as on any reconnect.
#[async_trait]
pub trait Catalog: fmt::Debug + Send + Sync + 'static {
    /// The LLMs to publish now.
    async fn llms(&self) -> Result<Vec<PublishedLlm>, Error>;
}

/// How long a [`Catalog`] may take to answer.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a wake may take, recipe and readiness together, unless an LLM says
/// otherwise (SPEC §12 `readyTimeout`).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// One published LLM: how it is registered, what answers it, and how its upstream is
/// woken and put to sleep (SPEC §12).
///
/// Built with [`PublishedLlm::new`] and the `with_*` setters, so that a field added
/// later breaks no caller.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use virtual_llm_core::protocol::LlmSpec;
/// use virtual_llm_core::{CommandRecipe, EchoProvider, PublishedLlm};
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let llm = PublishedLlm::new(
///     LlmSpec::new("llama-8b".parse()?, "openai", "meta-llama/Llama-3.1-8B-Instruct"),
///     Arc::new(EchoProvider::new()),
/// )
/// .with_wake(Arc::new(CommandRecipe::new(["systemctl", "--user", "start", "vllm"])?))
/// .with_sleep(Arc::new(CommandRecipe::new(["systemctl", "--user", "stop", "vllm"])?))
/// .with_idle_after(Duration::from_secs(15 * 60))
/// .with_ready_timeout(Duration::from_secs(300));
/// assert_eq!(llm.ready_timeout, Duration::from_secs(300));
/// # Ok(()) }
/// # run().unwrap();
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublishedLlm {
    /// How it is registered. Its `state` is set by the publisher from the probes.
    pub spec: LlmSpec,
    /// What answers its tasks, and whether its upstream is ready
    /// ([`Provider::probe`]).
    pub provider: Arc<dyn Provider>,
    /// Wakes the upstream when the gateway asks (a `wake` frame). With one, an
    /// upstream that does not answer is reported `asleep` (the gateway holds its
    /// requests and asks for a wake); without one, `unavailable`.
    pub wake: Option<Arc<dyn Recipe>>,
    /// Puts the upstream to sleep after `idle_after` without a task.
    pub sleep: Option<Arc<dyn Recipe>>,
    /// How long the LLM may go without a task (none started or running) before it is
    /// put to sleep and reported `asleep`; `None`: it never is. It sleeps with its
    /// `sleep` recipe, or without one (an upstream that unloads its model by itself).
    pub idle_after: Option<Duration>,
    /// How long a wake may take, the recipe and the wait for a passing probe together,
    /// before it is reported failed. Also bounds a sleep recipe. Default
    /// [`DEFAULT_READY_TIMEOUT`].
    pub ready_timeout: Duration,
}

impl PublishedLlm {
    /// `spec` answered by `provider`, with no recipes: never put to sleep, and reported
    /// `unavailable` whenever its upstream does not answer.
    pub fn new(spec: LlmSpec, provider: Arc<dyn Provider>) -> Self {
        PublishedLlm {
            spec,
            provider,
            wake: None,
            sleep: None,
            idle_after: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }

    /// Wakes the upstream with `recipe` when the gateway asks.
    #[must_use]
    pub fn with_wake(mut self, recipe: Arc<dyn Recipe>) -> Self {
        self.wake = Some(recipe);
        self
    }

    /// Puts the upstream to sleep with `recipe` once idle (see
    /// [`with_idle_after`](Self::with_idle_after)).
    #[must_use]
    pub fn with_sleep(mut self, recipe: Arc<dyn Recipe>) -> Self {
        self.sleep = Some(recipe);
        self
    }

    /// Puts the LLM to sleep after `idle` without a task.
    #[must_use]
    pub fn with_idle_after(mut self, idle: Duration) -> Self {
        self.idle_after = Some(idle);
        self
    }

    /// Gives a wake `timeout` to make the upstream answer.
    #[must_use]
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }
}

/// A publisher's settings.
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// Where the session id is kept across restarts; `None` keeps it in memory only.
    /// Two publishers must not share one file (they would keep replacing each other's
    /// channel): hold a [`SessionFileLock`](crate::SessionFileLock) on it while the
    /// publisher runs, as the reference publisher does.
    pub session_file: Option<PathBuf>,
    /// How many tasks run at once; more wait their turn. Default 32.
    ///
    /// Keep it at least the sum of the published LLMs' `maxConcurrent`: the gateway
    /// sends each LLM up to its `maxConcurrent` and counts them all as running, so a
    /// task held back here waits without the gateway knowing (the reference publisher
    /// sets it to that sum). [`Publisher::spawn`] warns when it is lower.
    pub max_concurrent_tasks: usize,
    /// First reconnect delay, doubling up to `reconnect_max` (with jitter). Default 5 s.
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default 60 s.
    pub reconnect_max: Duration,
    /// Agents published with the LLMs (SPEC §13), each speaking through the name or
    /// pool key of one of them. Default none.
    pub agents: Vec<AgentSpec>,
    /// Declare the capability `resume` (SPEC §15): when the gateway grants it, tasks
    /// go on through a dropped channel and are replayed on the next one. Default on.
    pub resume: bool,
    /// How long tasks wait for the next channel before they are stopped; the
    /// publisher reconnects meanwhile (at once, then after 100 ms doubling up to a
    /// second). Match the gateway's
    /// `resumeWindow`. Default 10 s.
    pub resume_window: Duration,
    /// The most bytes of results a task keeps for a replay (`resumeBuffer`). While
    /// the channel is up, a task that outruns its sender by this much waits for it;
    /// while it is down, a task that produces more fails. Default 1 MiB.
    pub resume_buffer: usize,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        let config = Config::default();
        PublisherOptions {
            session_file: None,
            max_concurrent_tasks: 32,
            reconnect_min: config.reconnect_min,
            reconnect_max: config.reconnect_max,
            agents: Vec::new(),
            resume: true,
            resume_window: config.resume_window,
            resume_buffer: 1024 * 1024,
        }
    }
}

/// Where a publisher is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublisherState {
    /// Registering and opening the channel.
    Connecting,
    /// Published; tasks flow.
    Connected {
        /// The session the gateway knows us by.
        session: SessionId,
    },
    /// Waiting before the next attempt, after this error.
    Backoff {
        /// What went wrong.
        error: String,
        /// How long until the next attempt.
        delay: Duration,
    },
    /// Stopped for good.
    Stopped,
}

/// Keeps local LLMs published through a [`Wire`].
#[derive(Debug)]
pub struct Publisher {
    stop: watch::Sender<bool>,
    state: watch::Receiver<PublisherState>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Starts publishing `llms` through `wire`, on the current tokio runtime.
    pub fn spawn(wire: Arc<dyn Wire>, llms: Vec<PublishedLlm>, options: PublisherOptions) -> Self {
        Self::start(wire, llms, None, options)
    }

    /// Starts publishing what `catalog` lists through `wire`, re-read every heartbeat
    /// interval (see [`Catalog`]), on the current tokio runtime. Until the catalog
    /// first lists something, the publisher asks it again every `reconnect_min`.
    pub fn spawn_discovering(
        wire: Arc<dyn Wire>,
        catalog: Arc<dyn Catalog>,
        options: PublisherOptions,
    ) -> Self {
        Self::start(wire, Vec::new(), Some(catalog), options)
    }

    fn start(
        wire: Arc<dyn Wire>,
        llms: Vec<PublishedLlm>,
        catalog: Option<Arc<dyn Catalog>>,
        options: PublisherOptions,
    ) -> Self {
        let declared: Option<usize> = llms
            .iter()
            .map(|l| l.spec.max_concurrent.map(|n| n as usize))
            .sum();
        if let Some(declared) = declared
            && declared > options.max_concurrent_tasks
        {
            tracing::warn!(
                max_concurrent_tasks = options.max_concurrent_tasks,
                declared,
                "the publisher runs fewer tasks at once than its llms' maxConcurrent add up to; the rest wait here while the gateway counts them as running"
            );
        }
        let (stop, stopped) = watch::channel(false);
        let (state_tx, state) = watch::channel(PublisherState::Connecting);
        let driver = Driver {
            wire,
            catalog,
            upstreams: Upstreams::new(&llms),
            specs: llms.iter().map(|l| l.spec.clone()).collect(),
            providers: llms
                .into_iter()
                .map(|l| (l.spec.name, l.provider))
                .collect(),
            permits: Arc::new(Semaphore::new(options.max_concurrent_tasks.max(1))),
            options,
            state: state_tx,
            stopped,
            running: Running::default(),
        };
        Publisher {
            stop,
            state,
            task: tokio::spawn(driver.run()),
        }
    }

    /// The current state; `changed().await` on a clone to follow it.
    pub fn state(&self) -> watch::Receiver<PublisherState> {
        self.state.clone()
    }

    /// Waits until the publisher is connected, and returns its session.
    pub async fn connected(&self) -> SessionId {
        let mut state = self.state.clone();
        loop {
            if let PublisherState::Connected { session } = &*state.borrow_and_update() {
                return session.clone();
            }
            if state.changed().await.is_err() {
                // The driver is gone; wait forever rather than invent a session.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops: closes the channel (the gateway takes the rows out of service at once),
    /// aborts running tasks and waits for the driver to finish.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "publisher driver ended abnormally");
        }
    }
}

struct Driver {
    wire: Arc<dyn Wire>,
    /// Where the LLMs come from, for a discovering publisher.
    catalog: Option<Arc<dyn Catalog>>,
    /// Whether each upstream answers; lives across connections.
    upstreams: Arc<Upstreams>,
    specs: Vec<LlmSpec>,
    providers: HashMap<LlmName, Arc<dyn Provider>>,
    permits: Arc<Semaphore>,
    options: PublisherOptions,
    state: watch::Sender<PublisherState>,
    stopped: watch::Receiver<bool>,
    /// The tasks running, on this connection or (resumable) waiting for the next.
    running: Running,
}

/// Why a connection ended.
enum Ended {
    /// Stop was asked for.
    Stopped,
    /// The channel closed or failed after a successful connect.
    Dropped(String),
    /// The catalog lists another set of LLMs: register it at once.
    Changed(Vec<PublishedLlm>),
}

impl Driver {
    async fn run(mut self) {
        let mut session = read_session(self.options.session_file.as_ref()).await;
        let mut delay = self.options.reconnect_min;
        // When a channel dropped with tasks waiting to resume: when, and how many
        // quick reconnects were tried since.
        let mut waiting_since: Option<(tokio::time::Instant, u32)> = None;
        // Idle LLMs go to sleep whether or not a channel is up. Without an idle timer
        // there is no task for it (a load test runs 10 000 publishers).
        let idle = self
            .upstreams
            .sleep_when_idle()
            .then(|| tokio::spawn(self.upstreams.clone().put_idle_to_sleep()));
        loop {
            if *self.stopped.borrow() {
                break;
            }
            self.state.send_replace(PublisherState::Connecting);
            if self.specs.is_empty()
                && let Some(llms) = self.listed(&[]).await
            {
                self.publish(llms);
            }
            let error = if self.specs.is_empty() {
                "the catalog lists no llm to publish yet".to_owned()
            } else {
                match self.connect(&mut session).await {
                    Ok(connected) => match self.serve(connected).await {
                        Ended::Stopped => break,
                        Ended::Changed(llms) => {
                            tracing::info!(
                                llms = ?llms.iter().map(|l| l.spec.name.as_str()).collect::<Vec<_>>(),
                                "the catalog changed; registering the new set"
                            );
                            self.publish(llms);
                            delay = self.options.reconnect_min;
                            continue;
                        }
                        Ended::Dropped(why) => {
                            // A connection that worked resets the backoff, and the
                            // resume window starts again.
                            delay = self.options.reconnect_min;
                            waiting_since = None;
                            why
                        }
                    },
                    Err(e) => e.to_string(),
                }
            };
            if waiting_since.is_none() && self.running.waiting() > 0 {
                waiting_since = Some((tokio::time::Instant::now(), 0));
            }
            // Tasks wait for the next channel: reconnect at once, then after 100 ms,
            // doubling up to a second (with jitter), until the resume window is over;
            // then they stop. A link that flaps for a moment costs a moment.
            let quick = match &mut waiting_since {
                Some((since, _)) if since.elapsed() >= self.options.resume_window => {
                    let stopped = self.running.abort_all();
                    tracing::warn!(
                        tasks = stopped,
                        "the channel did not come back within the resume window; its tasks stopped"
                    );
                    waiting_since = None;
                    None
                }
                Some((_, tried)) => {
                    let wait = jitter(resume_retry(*tried));
                    *tried = tried.saturating_add(1);
                    Some(wait)
                }
                None => None,
            };
            let wait = quick.unwrap_or_else(|| jitter(delay));
            tracing::warn!(error = %error, retry_in = ?wait, "publisher disconnected");
            self.state
                .send_replace(PublisherState::Backoff { error, delay: wait });
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = self.stopped.wait_for(|s| *s) => break,
            }
            if quick.is_none() {
                delay = (delay * 2).min(self.options.reconnect_max);
            }
        }
        self.running.abort_all();
        if let Some(idle) = idle {
            idle.abort();
        }
        self.upstreams.stop();
        self.state.send_replace(PublisherState::Stopped);
    }

    /// What the catalog lists now, when it answers a non-empty set that differs from
    /// `published` (the specs as registered, without their state).
    async fn listed(&self, published: &[LlmSpec]) -> Option<Vec<PublishedLlm>> {
        let catalog = self.catalog.as_ref()?;
        listed(&**catalog, published).await
    }

    /// Publishes `llms` from the next register on.
    fn publish(&mut self, llms: Vec<PublishedLlm>) {
        self.upstreams.stop();
        self.upstreams = Upstreams::new(&llms);
        self.specs = llms.iter().map(|l| l.spec.clone()).collect();
        self.providers = llms
            .into_iter()
            .map(|l| (l.spec.name, l.provider))
            .collect();
    }

    async fn connect(&self, session: &mut Option<SessionId>) -> Result<Connected, WireError> {
        // Each register says which upstreams answer now.
        self.upstreams.probe_all().await;
        let request = RegisterRequest {
            provider_session_id: session.clone(),
            protocol_version: Some(crate::protocol::PROTOCOL_VERSION),
            llms: self.upstreams.register_specs(&self.specs),
            agents: self.options.agents.clone(),
            capabilities: [
                self.options.resume.then_some(crate::protocol::RESUME),
                Some(crate::protocol::CHUNK_RUNS),
            ]
            .into_iter()
            .flatten()
            .map(str::to_owned)
            .collect(),
        };
        let connected = self.wire.connect(request).await?;
        let granted = connected.answer.provider_session_id.clone();
        if session.as_ref() != Some(&granted) {
            // A new session: the gateway knows none of the old one's tasks.
            self.running.abort_all();
            write_session(self.options.session_file.as_ref(), &granted).await;
            *session = Some(granted);
        }
        Ok(connected)
    }

    async fn serve(&self, connected: Connected) -> Ended {
        let Connected {
            answer,
            mut frames,
            outbox,
        } = connected;
        let session = answer.provider_session_id.clone();
        self.state.send_replace(PublisherState::Connected {
            session: session.clone(),
        });
        tracing::info!(%session, llms = answer.llms.len(), "published");
        let running = &self.running;
        // Protocol 2 numbers the chunks of a task, so the gateway can drop a replayed
        // one and tell a lost one.
        let numbered = answer.protocol_version.unwrap_or(1) >= 2;
        // Tasks outlive the channel only if the gateway holds them for us.
        let resumes = numbered
            && self.options.resume
            && answer
                .capabilities
                .iter()
                .any(|c| c == crate::protocol::RESUME);
        if resumes {
            let resumed = running.resume_all(&outbox);
            if resumed > 0 {
                tracing::info!(tasks = resumed, "resuming the tasks of the last channel");
            }
        } else {
            running.abort_all();
        }
        let interval = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
        // Heartbeats run beside the frame reader, so a slow heartbeat (or probe) never
        // delays a cancel; the task reports only a forgotten session.
        let (forgotten_tx, mut forgotten) = tokio::sync::oneshot::channel::<()>();
        let heartbeats = tokio::spawn(heartbeat_loop(
            outbox.clone(),
            interval,
            self.upstreams.clone(),
            numbered,
            forgotten_tx,
        ));
        // A discovering publisher re-reads its catalog every heartbeat interval.
        let (changed_tx, mut changed) = tokio::sync::oneshot::channel::<Vec<PublishedLlm>>();
        let discovery = self.catalog.clone().map(|catalog| {
            tokio::spawn(watch_catalog(
                catalog,
                self.specs.clone(),
                interval,
                changed_tx,
            ))
        });
        let mut stopped = self.stopped.clone();
        let ended = loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break Ended::Stopped,
                Ok(llms) = &mut changed, if discovery.is_some() => break Ended::Changed(llms),
                _ = &mut forgotten => break Ended::Dropped("session unknown to the gateway; registering again".into()),
                frame = frames.next() => match frame {
                    None => break Ended::Dropped("control channel closed".into()),
                    Some(Err(e)) => break Ended::Dropped(e.to_string()),
                    Some(Ok(GatewayFrame::Task(task))) => self.start_task(task, &outbox, numbered, resumes),
                    Some(Ok(GatewayFrame::Cancel(c))) => running.abort(&c.task_id),
                    Some(Ok(GatewayFrame::Wake(w))) => self.upstreams.wake(&w.llm),
                    Some(Ok(GatewayFrame::Closing(c))) => break Ended::Dropped(format!("gateway closing: {}", c.reason)),
                    Some(Ok(other)) => tracing::debug!(frame = other.event_name(), "ignored frame"),
                },
            }
        };
        heartbeats.abort();
        if let Some(discovery) = discovery {
            discovery.abort();
        }
        match ended {
            // The tasks wait for the next channel.
            Ended::Dropped(_) if resumes => running.detach_all(),
            _ => {
                running.abort_all();
            }
        }
        ended
    }

    fn start_task(&self, task: TaskFrame, outbox: &Arc<dyn Outbox>, numbered: bool, resumes: bool) {
        let id = task.task_id.clone();
        let provider = self.providers.get(&task.llm).cloned();
        // The LLM is not idle from now until the task ends, however it ends. A task for
        // an LLM reported asleep (the gateway should not send one) runs all the same.
        let busy = self.upstreams.busy(&task.llm);
        let permits = self.permits.clone();
        let produce = async move {
            let _busy = busy;
            // Waiting for a permit inside the task keeps the frame reader free for
            // cancels while tasks queue.
            let results: BoxStream<'static, TaskResult> = match permits.acquire_owned().await {
                Ok(permit) => results_of(provider, task)
                    .await
                    .map(move |r| {
                        // The permit lives as long as the results are being produced.
                        let _held = &permit;
                        r
                    })
                    .boxed(),
                Err(_) => stream::once(async { failed("publisher is shutting down") }).boxed(),
            };
            if numbered {
                number_chunks(results)
            } else {
                results
            }
        };
        let running = &self.running;
        if resumes {
            // A sender per channel reads the upstream call and keeps its results in
            // the task's log; between channels a keeper reads on into the log.
            let source = stream::once(produce).flatten().boxed();
            let log = TaskLog::new(self.options.resume_buffer, source);
            running.insert_logged(id.clone(), log);
            running.attach(&id, outbox, false);
        } else {
            let (outbox, finished, task_id) = (outbox.clone(), running.clone(), id.clone());
            let handle = tokio::spawn(async move {
                let results = produce.await;
                if let Err(e) = outbox.send(task_id.clone(), results).await {
                    tracing::warn!(task = %task_id, error = %e, "results not delivered");
                }
                finished.remove(&task_id);
            });
            running.insert(id, handle.abort_handle());
        }
    }
}

/// What `catalog` lists now, when it answers in time a non-empty set that differs
/// from `published` (by name, type, model, tier, pool or capacity).
async fn listed(catalog: &dyn Catalog, published: &[LlmSpec]) -> Option<Vec<PublishedLlm>> {
    let llms = match tokio::time::timeout(CATALOG_TIMEOUT, catalog.llms()).await {
        Ok(Ok(llms)) => llms,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the catalog did not answer; publishing what was published");
            return None;
        }
        Err(_) => {
            tracing::warn!("the catalog did not answer within 10 s; publishing what was published");
            return None;
        }
    };
    if llms.is_empty() {
        tracing::warn!("the catalog lists no llm; publishing what was published");
        return None;
    }
    let same = |a: &LlmSpec, b: &LlmSpec| {
        (
            &a.name,
            &a.provider_type,
            &a.model,
            &a.tier,
            &a.pool,
            a.max_concurrent,
        ) == (
            &b.name,
            &b.provider_type,
            &b.model,
            &b.tier,
            &b.pool,
            b.max_concurrent,
        )
    };
    let unchanged = llms.len() == published.len()
        && llms
            .iter()
            .all(|l| published.iter().any(|p| same(&l.spec, p)));
    (!unchanged).then_some(llms)
}

/// Re-reads `catalog` every `every`; sends the new set once it differs from
/// `published`.
async fn watch_catalog(
    catalog: Arc<dyn Catalog>,
    published: Vec<LlmSpec>,
    every: Duration,
    changed: tokio::sync::oneshot::Sender<Vec<PublishedLlm>>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(llms) = listed(&*catalog, &published).await {
            if changed.send(llms).is_err() {
                tracing::debug!("connection already ended");
            }
            return;
        }
    }
}

/// Heartbeats every `every`, probing the upstreams first, and at once when an
/// upstream's state changes or a wake ends. With `states` (protocol 2) each heartbeat
/// carries every LLM's state; a version 1 gateway gets only the periodic, bare ones.
async fn heartbeat_loop(
    outbox: Arc<dyn Outbox>,
    every: Duration,
    upstreams: Arc<Upstreams>,
    states: bool,
    forgotten: tokio::sync::oneshot::Sender<()>,
) {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => upstreams.probe_all().await,
            () = upstreams.changed(), if states => {}
        }
        let report = states.then(|| upstreams.report());
        match outbox.heartbeat(report.clone()).await {
            Ok(()) => {}
            Err(WireError::UnknownSession) => {
                if forgotten.send(()).is_err() {
                    tracing::debug!("connection already ended");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                if let Some(report) = report {
                    upstreams.unsent(report);
                }
            }
        }
    }
}

/// What a publisher reports of a provider's error: an upstream's own message as it is
/// (the gateway says "upstream error" once, in front of it), anything else in words.
fn failure_message(e: Error) -> String {
    match e {
        Error::Upstream { message } => message,
        other => other.to_string(),
    }
}

/// Gives every chunk of a task its `seq`, 0, 1, 2… in order (protocol 2).
fn number_chunks(results: BoxStream<'static, TaskResult>) -> BoxStream<'static, TaskResult> {
    results
        .scan(0u64, |next, mut result| {
            if let TaskResult::Chunk { seq, .. } = &mut result {
                *seq = Some(*next);
                *next += 1;
            }
            futures::future::ready(Some(result))
        })
        .boxed()
}

fn failed(message: &str) -> TaskResult {
    TaskResult::Failed {
        message: message.to_owned(),
    }
}

/// Runs a task on its provider and turns the answer into the results to send: one
/// final result, or the chunks followed by `done`, or the chunks and an error.
async fn results_of(
    provider: Option<Arc<dyn Provider>>,
    task: TaskFrame,
) -> BoxStream<'static, TaskResult> {
    let Some(provider) = provider else {
        let message = format!("this publisher does not serve {}", task.llm);
        return stream::once(async move { TaskResult::Failed { message } }).boxed();
    };
    match provider.infer(task).await {
        Ok(Reply::Complete(c)) => stream::once(async move {
            TaskResult::Completed {
                status: c.status,
                retry_after: c.retry_after_secs(),
                body: c.body,
            }
        })
        .boxed(),
        Ok(Reply::Stream(chunks)) => {
            let done = stream::once(async {
                TaskResult::Chunk {
                    data: String::new(),
                    done: true,
                    seq: None,
                }
            });
            // Stop after the first error: it is the task's outcome.
            chunks
                .scan(false, |failed_already, item| {
                    if *failed_already {
                        return futures::future::ready(None);
                    }
                    let result = match item {
                        Ok(data) => TaskResult::Chunk {
                            data,
                            done: false,
                            seq: None,
                        },
                        Err(e) => {
                            *failed_already = true;
                            TaskResult::Failed {
                                message: failure_message(e),
                            }
                        }
                    };
                    futures::future::ready(Some(result))
                })
                .chain(done)
                .scan(false, |ended, r| {
                    // No `done` after a failure.
                    if *ended {
                        return futures::future::ready(None);
                    }
                    *ended = r.is_final();
                    futures::future::ready(Some(r))
                })
                .boxed()
        }
        Err(e) => {
            let message = failure_message(e);
            stream::once(async move { TaskResult::Failed { message } }).boxed()
        }
    }
}

/// The running tasks, so a cancel or a disconnect can stop them.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<HashMap<TaskId, Entry>>>);

/// One running task: the whole task, or for a resumable one its log (which holds its
/// upstream call) and, when it has one, the sender reading the log.
struct Entry {
    work: Option<AbortHandle>,
    sender: Option<AbortHandle>,
    log: Option<Arc<TaskLog>>,
}

impl Entry {
    fn abort(&self) {
        if let Some(log) = &self.log {
            log.stop();
        }
        if let Some(work) = &self.work {
            work.abort();
        }
        if let Some(sender) = &self.sender {
            sender.abort();
        }
    }
}

impl Running {
    fn insert(&self, id: TaskId, work: AbortHandle) {
        // A task that already finished removed itself; don't resurrect its entry.
        if !work.is_finished() {
            let entry = Entry {
                work: Some(work),
                sender: None,
                log: None,
            };
            lock(&self.0).insert(id, entry);
        }
    }

    /// A resumable task: it stays until a sender has delivered its final result.
    fn insert_logged(&self, id: TaskId, log: Arc<TaskLog>) {
        let entry = Entry {
            work: None,
            sender: None,
            log: Some(log),
        };
        lock(&self.0).insert(id, entry);
    }

    /// Starts a sender of `id`'s log on `outbox` (after a `resume` when `resume`);
    /// the task is done when it has delivered everything.
    fn attach(&self, id: &TaskId, outbox: &Arc<dyn Outbox>, resume: bool) {
        let mut tasks = lock(&self.0);
        let Some(entry) = tasks.get_mut(id) else {
            return;
        };
        let Some(log) = &entry.log else { return };
        let results = log.replay(resume);
        let (outbox, running, task_id) = (outbox.clone(), self.clone(), id.clone());
        let log = log.clone();
        // Spawned under the lock: the sender cannot remove the entry before it holds
        // the sender's handle.
        let sender = tokio::spawn(async move {
            match outbox.send(task_id.clone(), results).await {
                Ok(()) => {
                    match tokio::time::timeout(DELIVERY_CONFIRMATION, outbox.delivered()).await {
                        Ok(Ok(())) => running.remove_if(&task_id, &log),
                        // Perhaps lost with the channel: kept for the resume on the next.
                        Ok(Err(e)) => {
                            tracing::debug!(task = %task_id, error = %e, "results not confirmed; kept for a resume")
                        }
                        Err(_) => {
                            tracing::debug!(task = %task_id, "the gateway did not confirm the results in 30 s; the task is let go");
                            running.remove_if(&task_id, &log);
                        }
                    }
                }
                // The gateway refused the task (unknown: cancelled, or its resume window
                // ran out): it stops.
                Err(e @ (WireError::UnknownSession | WireError::Refused { .. })) => {
                    tracing::debug!(task = %task_id, error = %e, "the gateway refused the task's results; it stops");
                    running.abort(&task_id);
                }
                // The task waits in its log for the next channel.
                Err(e) => {
                    tracing::debug!(task = %task_id, error = %e, "results not delivered; kept for a resume")
                }
            }
        });
        if let Some(old) = entry.sender.replace(sender.abort_handle()) {
            old.abort();
        }
    }

    /// Resumes every resumable task on a new channel's `outbox`; returns how many.
    fn resume_all(&self, outbox: &Arc<dyn Outbox>) -> usize {
        let waiting: Vec<TaskId> = lock(&self.0)
            .iter()
            .filter(|(_, e)| e.log.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &waiting {
            self.attach(id, outbox, true);
        }
        waiting.len()
    }

    /// The channel dropped: the senders stop, the resumable tasks wait in their logs,
    /// the others stop.
    fn detach_all(&self) {
        lock(&self.0).retain(|_, entry| {
            if let Some(sender) = entry.sender.take() {
                sender.abort();
            }
            match (&entry.log, &entry.work) {
                (Some(log), _) => log.detach(),
                (None, Some(work)) => work.abort(),
                (None, None) => {}
            }
            entry.log.is_some()
        });
    }

    /// How many tasks wait for a channel to resume on.
    fn waiting(&self) -> usize {
        lock(&self.0).values().filter(|e| e.log.is_some()).count()
    }

    fn remove(&self, id: &TaskId) {
        lock(&self.0).remove(id);
    }

    /// Removes `id` if it is still the task of `log`.
    fn remove_if(&self, id: &TaskId, log: &Arc<TaskLog>) {
        let mut tasks = lock(&self.0);
        if tasks
            .get(id)
            .and_then(|e| e.log.as_ref())
            .is_some_and(|l| Arc::ptr_eq(l, log))
        {
            tasks.remove(id);
        }
    }

    fn abort(&self, id: &TaskId) {
        if let Some(entry) = lock(&self.0).remove(id) {
            tracing::debug!(task = %id, "cancelled by the gateway");
            entry.abort();
        }
    }

    /// Stops every task; returns how many there were.
    fn abort_all(&self) -> usize {
        let mut tasks = lock(&self.0);
        let count = tasks.len();
        for (_, entry) in tasks.drain() {
            entry.abort();
        }
        count
    }
}

/// A delay between half and all of `delay`, so that publishers cut off together do
/// not come back together.
/// The delay before quick reconnect number `tried` (from 0) while tasks wait to resume,
/// before jitter: the first at once, then 100 ms doubling up to a second.
fn resume_retry(tried: u32) -> Duration {
    match tried {
        0 => Duration::ZERO,
        n => Duration::from_millis(100)
            .saturating_mul(1 << (n - 1).min(4))
            .min(Duration::from_secs(1)),
    }
}

fn jitter(delay: Duration) -> Duration {
    let factor: f64 = rand::rng().random_range(0.5..=1.0);
    delay.mul_f64(factor)
}

async fn read_session(file: Option<&PathBuf>) -> Option<SessionId> {
    let file = file?;
    match tokio::fs::read_to_string(file).await {
        Ok(text) => match SessionId::parse(text.trim()) {
            Ok(id) => Some(id),
            Err(_) => {
                tracing::warn!(file = %file.display(), "session file holds no valid session id; starting afresh");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "session file unreadable; starting afresh");
            None
        }
    }
}

/// Persists the session id: written to a temporary file and renamed, so a crash never
/// leaves a torn id behind.
async fn write_session(file: Option<&PathBuf>, session: &SessionId) {
    let Some(file) = file else { return };
    let tmp = file.with_extension("tmp");
    let result = async {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::write(&tmp, format!("{session}\n")).await?;
        tokio::fs::rename(&tmp, file).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), error = %e, "could not persist the session id; a restart will register afresh");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_waiting_to_resume_make_reconnects_quick_then_once_a_second() {
        let delays: Vec<u128> = (0..8).map(|n| resume_retry(n).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(resume_retry(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(10),
                "{d:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_session_file_round_trips_and_ignores_garbage() {
        let dir = std::env::temp_dir().join(format!("vllm-session-{}", SessionId::generate()));
        let file = dir.join("nested").join("session");
        assert_eq!(read_session(Some(&file)).await, None, "no file yet");
        let id = SessionId::generate();
        write_session(Some(&file), &id).await;
        assert_eq!(read_session(Some(&file)).await, Some(id));
        std::fs::write(&file, "not a session id!\n").unwrap();
        assert_eq!(read_session(Some(&file)).await, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
