//! The [`Gateway`]: the service a transport drives. It owns the store, the clock and
//! the seams (the channel directory, the task router, the row router); its methods are
//! split by concern across `lifecycle.rs` (register, heartbeat, bind, GC) and
//! `relay.rs` (infer, deliver).
//!
//! Callers reach the tasks and the channels only through its methods, which check the
//! caller's role, the ownership of sessions and tasks, and whether the gateway is
//! draining.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::admission::{Admission, LocalAdmission, PoolLoad};
use crate::directory::{ChannelDirectory, LocalDirectory};
use crate::router::{PoolRouter, Router};
use crate::task::TaskTable;
use crate::task_router::{LocalTaskRouter, TaskInbound, TaskRouter};
use crate::wake::{ChannelWaker, Waker, Wakers, Wakes};
use crate::{
    Authenticator, ChannelBinding, Clock, Config, Error, OpenAccess, Principal, PublicBackend,
    RegistryView, ReplicaId, Role, SessionId, Store, SystemClock, TaskId, UnavailableKind,
};

/// The core of a gateway. Cheap to clone: clones share everything.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use virtual_llm_core::{Gateway, MemoryStore};
///
/// let gateway = Gateway::builder(Arc::new(MemoryStore::new())).start().await.unwrap();
/// let _gc = gateway.spawn_gc(); // sweeps every 60 s until dropped
/// # });
/// ```
#[derive(Clone)]
pub struct Gateway {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Config,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) public: Option<Arc<dyn PublicBackend>>,
    pub(crate) directory: Arc<dyn ChannelDirectory>,
    pub(crate) task_router: Arc<dyn TaskRouter>,
    pub(crate) router: Arc<dyn Router>,
    /// What the router reads: the registry's rows, kept in memory between writes.
    pub(crate) view: RegistryView,
    pub(crate) admission: Arc<dyn Admission>,
    pub(crate) waker: Arc<dyn Waker>,
    pub(crate) wakes: Wakes,
    pub(crate) tasks: TaskTable,
    pub(crate) locks: SessionLocks,
    /// The protocol version each session registered with, so that no task a
    /// publisher would not understand is sent to it.
    pub(crate) versions: SessionVersions,
    /// Set by [`Gateway::drain`]: new requests are refused while in-flight ones finish.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Bumped after every registry write this replica makes: see
    /// [`Gateway::registry_changes`].
    pub(crate) changes: tokio::sync::watch::Sender<u64>,
    /// The limits per principal in force on this replica (SPEC §16).
    pub(crate) limiter: crate::limits::RateLimiter,
    /// The usage counts of this replica (SPEC §16).
    pub(crate) usage: crate::usage::UsageLedger,
    /// What each publisher's rows hold, for its quotas (SPEC §16).
    pub(crate) holdings: crate::quota::Holdings,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("store", &self.shared.store)
            .field("directory", &self.shared.directory)
            .field("tasks", &self.shared.tasks)
            .finish_non_exhaustive()
    }
}

/// The replica id of a gateway that is the only one over its store.
pub const LOCAL_REPLICA: &str = "local";

/// Builds a [`Gateway`]; see [`Gateway::builder`].
#[derive(Debug)]
pub struct GatewayBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Config,
    auth: Arc<dyn Authenticator>,
    public: Option<Arc<dyn PublicBackend>>,
    replica: Option<ReplicaId>,
    directory: Option<Arc<dyn ChannelDirectory>>,
    task_router: Arc<dyn TaskRouter>,
    router: Arc<dyn Router>,
    admission: Option<Arc<dyn Admission>>,
    wakers: Vec<Arc<dyn Waker>>,
}

impl GatewayBuilder {
    /// The wall clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Timings and limits (default: [`Config::default`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Who may call (default: [`OpenAccess`], everyone is an admin; loopback only).
    pub fn authenticator(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = auth;
        self
    }

    /// How `kind=public` rows are answered (default: none, they answer 503).
    pub fn public_backend(mut self, backend: Arc<dyn PublicBackend>) -> Self {
        self.public = Some(backend);
        self
    }

    /// This gateway's replica id (default: [`LOCAL_REPLICA`], for a gateway that is
    /// the only one over its store). With a [`directory`](Self::directory), the
    /// directory's replica id must be the same.
    pub fn replica(mut self, replica: ReplicaId) -> Self {
        self.replica = Some(replica);
        self
    }

    /// Where control channels are bound and frames sent (default: a
    /// [`LocalDirectory`] of this process).
    pub fn directory(mut self, directory: Arc<dyn ChannelDirectory>) -> Self {
        self.directory = Some(directory);
        self
    }

    /// How results reach tasks on other replicas (default: [`LocalTaskRouter`]:
    /// there are none).
    pub fn task_router(mut self, router: Arc<dyn TaskRouter>) -> Self {
        self.task_router = router;
        self
    }

    /// Which rows may answer a request (default: [`PoolRouter`]: the pool named by
    /// the request's `model`, or the member it names).
    pub fn router(mut self, router: Arc<dyn Router>) -> Self {
        self.router = router;
        self
    }

    /// Another way to wake a sleeping row (SPEC §12), tried after the publisher's own
    /// channel ([`ChannelWaker`]) and any added before: e.g. a webhook for a host
    /// whose publisher has no channel while it sleeps.
    pub fn waker(mut self, waker: Arc<dyn Waker>) -> Self {
        self.wakers.push(waker);
        self
    }

    /// The in-flight counts and admission queues (default: a [`LocalAdmission`]
    /// bounded by the configuration's `queue_depth`, `cooldown_after` and `cooldown`).
    pub fn admission(mut self, admission: Arc<dyn Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Checks the configuration, then recovers from this replica's previous run: its
    /// rows' channels are gone, so they go inactive until their publishers bind again.
    /// Rows bound to other replicas are theirs and stay as they are.
    pub async fn start(self) -> Result<Gateway, Error> {
        self.config.validate()?;
        let directory = match (self.directory, self.replica) {
            (Some(d), Some(r)) if *d.replica() != r => {
                return Err(Error::invalid(format!(
                    "the channel directory binds on replica {} but the gateway is replica {r}",
                    d.replica()
                )));
            }
            (Some(d), _) => d,
            (None, r) => {
                let replica = match r {
                    Some(r) => r,
                    None => ReplicaId::parse(LOCAL_REPLICA)?,
                };
                Arc::new(LocalDirectory::new(replica)) as Arc<dyn ChannelDirectory>
            }
        };
        let tasks = TaskTable::new(directory.clone(), &self.config);
        let admission = self
            .admission
            .unwrap_or_else(|| Arc::new(LocalAdmission::new(&self.config)));
        let waker = self.wakers.into_iter().fold(
            Wakers::new().with(Arc::new(ChannelWaker::new(directory.clone()))),
            Wakers::with,
        );
        let wakes = Wakes::new(self.config.wake_wait, self.config.wake_cooldown);
        let view = RegistryView::new(self.store.clone(), self.config.registry_staleness);
        let limiter = crate::limits::RateLimiter::new(self.clock.clone());
        let usage = crate::usage::UsageLedger::new(self.config.metric_labels);
        let gateway = Gateway {
            shared: Arc::new(Shared {
                view,
                store: self.store,
                clock: self.clock,
                config: self.config,
                auth: self.auth,
                public: self.public,
                directory,
                task_router: self.task_router,
                router: self.router,
                admission,
                waker: Arc::new(waker),
                wakes,
                tasks,
                locks: SessionLocks::default(),
                versions: SessionVersions::default(),
                draining: std::sync::atomic::AtomicBool::new(false),
                changes: tokio::sync::watch::Sender::new(0),
                limiter,
                usage,
                holdings: crate::quota::Holdings::default(),
            }),
        };
        gateway.follow_changes();
        let demoted = gateway.recover().await?;
        if demoted > 0 {
            tracing::info!(
                rows = demoted,
                "virtual rows inactive until their publishers reconnect"
            );
        }
        Ok(gateway)
    }
}

impl Gateway {
    /// A builder over `store`, with the defaults documented on each setter.
    pub fn builder(store: Arc<dyn Store>) -> GatewayBuilder {
        GatewayBuilder {
            store,
            clock: Arc::new(SystemClock),
            config: Config::default(),
            auth: Arc::new(OpenAccess),
            public: None,
            replica: None,
            directory: None,
            task_router: Arc::new(LocalTaskRouter),
            router: Arc::new(PoolRouter),
            admission: None,
            wakers: Vec::new(),
        }
    }

    /// The bearer token's principal, through the configured [`Authenticator`].
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, Error> {
        self.shared.auth.authenticate(bearer).await
    }

    /// A counter bumped after every registry write this replica makes (register,
    /// bind, unbind, readiness, GC; not heartbeats): for a view that follows the
    /// registry, such as the MCP tool list of the agents, to re-read it when it
    /// changes rather than poll. Writes of other replicas over the same store are not
    /// seen here.
    pub fn registry_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// This gateway's replica id.
    pub fn replica(&self) -> &ReplicaId {
        self.shared.directory.replica()
    }

    /// How many tasks this replica's clients are waiting on.
    pub fn in_flight(&self) -> usize {
        self.shared.tasks.in_flight()
    }

    /// The load of `pool` on this replica: tasks in flight, capacity, queued requests.
    pub fn pool_load(&self, pool: &crate::LlmName) -> PoolLoad {
        self.shared.admission.load(pool)
    }

    /// How many control channels this replica holds.
    pub fn local_channels(&self) -> usize {
        self.shared.directory.local_channels()
    }

    /// The current bind of `session`'s channel, wherever it is; `None` when it has
    /// none.
    pub fn channel_of(&self, session: &SessionId) -> Option<ChannelBinding> {
        self.shared.directory.current(session)
    }

    /// Whether `session` has a control channel, on this replica or another.
    pub fn is_bound(&self, session: &SessionId) -> bool {
        self.channel_of(session).is_some()
    }

    /// The receiving end of the task router on this replica, for a plane adapter that
    /// forwards results and channel losses between replicas (see [`TaskInbound`]).
    pub fn inbound(&self) -> TaskInbound {
        TaskInbound {
            tasks: self.shared.tasks.clone(),
            gateway: Arc::downgrade(&self.shared),
        }
    }

    /// Fails one of `session`'s tasks now with `error` and tells its publisher to
    /// stop: for a transport that must cut a task off (a client too slow to keep up on
    /// a socket shared with other tasks). Only a publisher, for a task of its own
    /// session, may. Returns whether the task was live here.
    pub fn fail_task(
        &self,
        principal: &Principal,
        session: &SessionId,
        task: &TaskId,
        error: Error,
    ) -> Result<bool, Error> {
        principal.require(Role::Publisher)?;
        Ok(self.shared.tasks.fail(session, &principal.id, task, error))
    }

    /// Persists what the store holds in memory (coalesced heartbeats).
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.shared.store.flush().await?)
    }

    /// Tells every publisher connected to this replica the gateway is closing (a
    /// `closing` frame), so their channels end and they reconnect later; part of a
    /// graceful shutdown. Returns how many channels were told.
    pub fn close_channels(&self, reason: &str) -> usize {
        self.shared.directory.close_local(reason)
    }

    /// The first step of a graceful shutdown: refuse new requests (503 with
    /// `Retry-After`), let the tasks in flight finish for at most `grace`, then tell
    /// every publisher the gateway is closing. Returns how many tasks were still in
    /// flight when the grace period ran out: they fail with a 503 saying the gateway
    /// is shutting down.
    pub async fn drain(&self, grace: std::time::Duration) -> usize {
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        // Polled: a shutdown happens once, and a 20 ms step is well below any grace.
        while self.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = self.shared.tasks.fail_all(|| {
            Error::unavailable(
                UnavailableKind::Draining,
                "the gateway is shutting down",
                self.shared.config.retry_after,
            )
        });
        let told = self.close_channels("gateway shutting down");
        tracing::info!(publishers = told, unfinished = left, "drained");
        left
    }

    /// Whether this gateway can take requests now (an orchestrator's readiness
    /// probe): not draining, and its store answers a read of one row. The error says
    /// which: 503 `llm_unavailable` (draining), or the store's own error.
    pub async fn ready(&self) -> Result<(), Error> {
        if self.is_draining() {
            return Err(self.draining());
        }
        // Any valid name: whether the row exists does not matter, the read does.
        let probe = crate::LlmName::parse("readyz-probe")?;
        self.shared.store.get(&probe).await?;
        Ok(())
    }

    /// Whether [`Gateway::drain`] has begun.
    pub fn is_draining(&self) -> bool {
        self.shared
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether `session` is known and owned by `principal`; used by transports that
    /// must answer 404 before upgrading a connection.
    pub async fn check_session(
        &self,
        principal: &Principal,
        session: &SessionId,
    ) -> Result<(), Error> {
        self.session_rows(principal, session).await.map(drop)
    }
}

/// Serializes bind, unbind and revive of one session within this process, so that a
/// channel change and the row writes it implies happen as one step. Striped: bounded
/// memory however many sessions come and go. Cross-process races are the store's
/// compare-and-set's business, not this lock's.
pub(crate) struct SessionLocks {
    pub(crate) stripes: Vec<tokio::sync::Mutex<()>>,
}

const LOCK_STRIPES: usize = 64;

impl Default for SessionLocks {
    fn default() -> Self {
        SessionLocks {
            stripes: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }
}

impl SessionLocks {
    pub(crate) async fn lock(&self, session: &SessionId) -> tokio::sync::MutexGuard<'_, ()> {
        let mut h = DefaultHasher::new();
        session.hash(&mut h);
        let index = usize::try_from(h.finish() % LOCK_STRIPES as u64).unwrap_or(0);
        self.stripes[index].lock().await
    }
}

/// The protocol version each session of this gateway registered with (SPEC §9: a
/// version 1 publisher is sent nothing it would not understand), and whether its
/// tasks wait for it through a dropped channel (SPEC §15). Kept in memory: a
/// publisher registers before it opens its channel, on every (re)connect, so a
/// restarted gateway learns it again before it sends the session a task. A session
/// this gateway has not seen register counts as version 1. Entries go when the GC
/// deletes the session's rows.
#[derive(Default)]
pub(crate) struct SessionVersions {
    versions: std::sync::Mutex<std::collections::HashMap<SessionId, (u32, bool)>>,
}

impl SessionVersions {
    pub(crate) fn set(&self, session: &SessionId, version: u32, resume: bool) {
        crate::sync::lock(&self.versions).insert(session.clone(), (version, resume));
    }

    pub(crate) fn get(&self, session: &SessionId) -> u32 {
        crate::sync::lock(&self.versions)
            .get(session)
            .map_or(crate::protocol::MIN_PROTOCOL_VERSION, |(v, _)| *v)
    }

    /// Whether `session` registered with the capability `resume`, granted.
    pub(crate) fn resumes(&self, session: &SessionId) -> bool {
        crate::sync::lock(&self.versions)
            .get(session)
            .is_some_and(|(_, resume)| *resume)
    }

    pub(crate) fn forget<'a>(&self, sessions: impl IntoIterator<Item = &'a SessionId>) {
        let mut versions = crate::sync::lock(&self.versions);
        for session in sessions {
            versions.remove(session);
        }
    }
}
