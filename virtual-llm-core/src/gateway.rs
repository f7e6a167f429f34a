//! The [`Gateway`]: the service a transport drives. It owns the store, the clock, the
//! channel table and the task table; its methods are split by concern across
//! `lifecycle.rs` (register, heartbeat, bind, GC) and `relay.rs` (infer, deliver).

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::channel::Channels;
use crate::task::TaskTable;
use crate::{
    Authenticator, Clock, Config, Error, OpenAccess, Principal, PublicBackend, SessionId, Store,
    SystemClock,
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
    pub(crate) channels: Arc<Channels>,
    pub(crate) tasks: TaskTable,
    pub(crate) locks: SessionLocks,
    /// Set by [`Gateway::drain`]: new requests are refused while in-flight ones finish.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("store", &self.shared.store)
            .field("channels", &self.shared.channels)
            .field("tasks", &self.shared.tasks)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Gateway`]; see [`Gateway::builder`].
#[derive(Debug)]
pub struct GatewayBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Config,
    auth: Arc<dyn Authenticator>,
    public: Option<Arc<dyn PublicBackend>>,
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

    /// Checks the configuration, then recovers from the previous run: every virtual
    /// row still `active` in the store goes inactive, since no channel is bound yet.
    pub async fn start(self) -> Result<Gateway, Error> {
        self.config.validate()?;
        let channels = Arc::new(Channels::default());
        let tasks = TaskTable::new(channels.clone(), &self.config);
        let gateway = Gateway {
            shared: Arc::new(Shared {
                store: self.store,
                clock: self.clock,
                config: self.config,
                auth: self.auth,
                public: self.public,
                channels,
                tasks,
                locks: SessionLocks::default(),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        };
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
        }
    }

    /// The bearer token's principal, through the configured [`Authenticator`].
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, Error> {
        self.shared.auth.authenticate(bearer).await
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

    /// The in-flight tasks.
    pub fn tasks(&self) -> &TaskTable {
        &self.shared.tasks
    }

    /// The bound channels.
    pub fn channels(&self) -> &Channels {
        &self.shared.channels
    }

    /// Persists what the store holds in memory (coalesced heartbeats).
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.shared.store.flush().await?)
    }

    /// Tells every connected publisher the gateway is closing (a `closing` frame), so
    /// their channels end and they reconnect later; part of a graceful shutdown.
    /// Returns how many channels were told.
    pub fn close_channels(&self, reason: &str) -> usize {
        let sinks = self.shared.channels.all();
        for sink in &sinks {
            let frame = crate::protocol::GatewayFrame::Closing(crate::protocol::Closing {
                reason: reason.to_owned(),
            });
            if let Err(e) = sink.send(frame) {
                tracing::debug!(error = %e, "a channel could not be told it is closing");
            }
        }
        sinks.len()
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
        while self.tasks().in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let retry_after = self.shared.config.retry_after;
        let left = self.tasks().fail_all(|| Error::Unavailable {
            reason: "the gateway is shutting down".into(),
            retry_after,
        });
        let told = self.close_channels("gateway shutting down");
        tracing::info!(publishers = told, unfinished = left, "drained");
        left
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
