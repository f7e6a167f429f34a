//! The lifecycle of SPEC §3: register, heartbeat, bind and unbind, the GC sweep, and
//! restart recovery.
//!
//! Every rule that changes a row's status is one of two pure functions,
//! [`activated`] and [`deactivated`]; every write goes through the store's
//! compare-and-set, re-reading and re-deciding on a lost race. Nothing here holds a
//! process-local lock to make register race-free: two gateways sharing a store resolve
//! a contested name the same way two requests in one process do.

use std::collections::HashSet;
use std::sync::Arc;

use crate::channel::ChannelSink;
use crate::protocol::{
    Closing, ConflictReason, GatewayFrame, HeartbeatResponse, Hello, LlmSpec, NameConflict,
    PROTOCOL_VERSION, RegisterRequest, RegisterResponse,
};
use crate::{
    Error, Gateway, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, LlmView, Principal, Role,
    SessionId, StoreError, Timestamp, Write,
};

/// How often a lost compare-and-set is re-decided before the caller gets a 503.
const MAX_CAS_ATTEMPTS: usize = 16;
/// Rows per store batch in the GC and recovery.
const SWEEP_BATCH: usize = 256;

/// The row, serving: active, heartbeat now, not inactive.
pub fn activated(r: &LlmRecord, now: Timestamp) -> LlmRecord {
    let mut r = r.clone();
    r.status = LlmStatus::Active;
    r.inactive_since = None;
    r.last_heartbeat_at = Some(now);
    r.updated_at = now;
    r
}

/// The row, out of service: an active row goes inactive as of `now`; an inactive row
/// keeps its `inactive_since`, so retention counts from when it first went away.
pub fn deactivated(r: &LlmRecord, now: Timestamp) -> LlmRecord {
    let mut r = r.clone();
    if r.status == LlmStatus::Active {
        r.status = LlmStatus::Inactive;
        r.inactive_since = Some(now);
    }
    r.updated_at = now;
    r
}

/// What one GC sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Active virtual rows whose heartbeat was too old, now inactive.
    pub marked_inactive: usize,
    /// Rows inactive for longer than the retention, now deleted.
    pub deleted: usize,
}

/// Decides a register: the writes, or every conflicting name. Pure, so the rules of
/// SPEC §3 can be read in one place.
fn plan_register(
    owner: &str,
    session: &SessionId,
    session_rows: &[LlmRecord],
    specs: &[LlmSpec],
    current: &[Option<LlmRecord>],
    now: Timestamp,
) -> Result<Vec<Write>, Vec<NameConflict>> {
    let mut writes = Vec::with_capacity(specs.len() + session_rows.len());
    let mut conflicts = Vec::new();
    for (spec, row) in specs.iter().zip(current) {
        let conflict = |reason| NameConflict {
            name: spec.name.to_string(),
            reason,
        };
        match row {
            None => writes.push(Write::Insert(new_row(
                LlmKind::Virtual,
                spec,
                owner,
                Some(session),
                now,
            ))),
            Some(r) if r.kind == LlmKind::Public => {
                conflicts.push(conflict(ConflictReason::PublicLlm))
            }
            Some(r) if r.owner != owner => conflicts.push(conflict(ConflictReason::OwnedByAnother)),
            // Our own row, or (sticky reconnect without the session file) our row that
            // another session of ours left behind.
            Some(r)
                if r.provider_session_id.as_ref() == Some(session)
                    || r.status != LlmStatus::Active =>
            {
                let mut r = activated(r, now);
                r.provider_session_id = Some(session.clone());
                r.provider_type.clone_from(&spec.provider_type);
                r.model.clone_from(&spec.model);
                r.tier.clone_from(&spec.tier);
                writes.push(Write::Update(r));
            }
            Some(_) => conflicts.push(conflict(ConflictReason::ActiveInAnotherSession)),
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    // Names the session held before but no longer publishes: out of service, detached.
    let named: HashSet<&LlmName> = specs.iter().map(|s| &s.name).collect();
    for r in session_rows.iter().filter(|r| !named.contains(&r.name)) {
        let mut r = deactivated(r, now);
        r.provider_session_id = None;
        writes.push(Write::Update(r));
    }
    Ok(writes)
}

fn new_row(
    kind: LlmKind,
    spec: &LlmSpec,
    owner: &str,
    session: Option<&SessionId>,
    now: Timestamp,
) -> LlmRecord {
    LlmRecord {
        id: LlmId::generate(),
        name: spec.name.clone(),
        kind,
        status: LlmStatus::Active,
        provider_type: spec.provider_type.clone(),
        model: spec.model.clone(),
        tier: spec.tier.clone(),
        owner: owner.to_owned(),
        provider_session_id: session.cloned(),
        last_heartbeat_at: session.map(|_| now),
        inactive_since: None,
        created_at: now,
        updated_at: now,
        revision: 0,
    }
}

impl Gateway {
    fn check_register(&self, req: &RegisterRequest) -> Result<(), Error> {
        let version = req.protocol_version.unwrap_or(1);
        if version != PROTOCOL_VERSION {
            return Err(Error::UnsupportedProtocol {
                version,
                supported: PROTOCOL_VERSION,
            });
        }
        let max = self.shared.config.max_llms_per_register;
        if req.llms.is_empty() || req.llms.len() > max {
            return Err(Error::invalid(format!("a register names 1 to {max} llms")));
        }
        let mut seen = HashSet::new();
        for spec in &req.llms {
            spec.validate()?;
            if !seen.insert(&spec.name) {
                return Err(Error::invalid(format!("llm {} is named twice", spec.name)));
            }
        }
        Ok(())
    }

    /// Registers (or re-registers) a publisher's LLMs, atomically: either every name is
    /// written, or none and the answer is a 409 naming each conflict.
    ///
    /// A `providerSessionId` the gateway does not know, or that another principal
    /// owns, gets a fresh session id in the answer; the publisher persists whatever
    /// the answer says.
    pub async fn register(
        &self,
        principal: &Principal,
        req: RegisterRequest,
    ) -> Result<RegisterResponse, Error> {
        principal.require(Role::Publisher)?;
        self.check_register(&req)?;
        let store = &self.shared.store;
        let (session, mut session_rows) = match &req.provider_session_id {
            Some(s) => match self.session_rows(principal, s).await {
                Ok(rows) => (s.clone(), rows),
                Err(Error::UnknownSession) => (SessionId::generate(), Vec::new()),
                Err(e) => return Err(e),
            },
            None => (SessionId::generate(), Vec::new()),
        };
        for attempt in 0..MAX_CAS_ATTEMPTS {
            if attempt > 0 {
                session_rows = store.by_session(&session).await?;
            }
            let mut current = Vec::with_capacity(req.llms.len());
            for spec in &req.llms {
                current.push(store.get(&spec.name).await?);
            }
            let now = self.shared.clock.now();
            let writes = plan_register(
                &principal.id,
                &session,
                &session_rows,
                &req.llms,
                &current,
                now,
            )
            .map_err(|conflicts| Error::Conflict { conflicts })?;
            match store.write(writes).await {
                Ok(written) => {
                    let llms = req
                        .llms
                        .iter()
                        .filter_map(|spec| written.iter().find(|r| r.name == spec.name))
                        .map(LlmRecord::view)
                        .collect();
                    return Ok(RegisterResponse {
                        provider_session_id: session,
                        heartbeat_interval_ms: self.heartbeat_interval_ms(),
                        keep_alive_ms: Some(self.keep_alive_ms()),
                        llms,
                    });
                }
                Err(StoreError::Conflict { .. }) => {
                    tokio::task::yield_now().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            name: "register".into(),
        }
        .into())
    }

    /// A publisher's heartbeat: refreshes every row of the session, and revives its
    /// rows that went inactive while its channel is still bound. 404 for a session the
    /// gateway does not know (the publisher then re-registers).
    pub async fn heartbeat(
        &self,
        principal: &Principal,
        session: &SessionId,
    ) -> Result<HeartbeatResponse, Error> {
        principal.require(Role::Publisher)?;
        let rows = self.session_rows(principal, session).await?;
        let names: Vec<LlmName> = rows.iter().map(|r| r.name.clone()).collect();
        let now = self.shared.clock.now();
        self.shared.store.touch(&names, now).await?;
        let channels = &self.shared.channels;
        if channels.is_bound(session) && rows.iter().any(|r| r.status != LlmStatus::Active) {
            let _serial = self.shared.locks.lock(session).await;
            if channels.is_bound(session) {
                let rows = self.shared.store.by_session(session).await?;
                self.transition(rows, &|r: &LlmRecord| {
                    (r.provider_session_id.as_ref() == Some(session)
                        && r.status != LlmStatus::Active)
                        .then(|| Write::Update(activated(r, now)))
                })
                .await?;
            }
        }
        Ok(HeartbeatResponse { llms: rows.len() })
    }

    /// Binds a control channel to a known session: its rows go active, and a channel
    /// already bound to the session is told to close and replaced. Frames for the
    /// session go to `sink` until the returned [`Binding`] is released or dropped.
    pub async fn bind(
        &self,
        principal: &Principal,
        session: &SessionId,
        sink: Arc<dyn ChannelSink>,
    ) -> Result<Binding, Error> {
        principal.require(Role::Publisher)?;
        self.session_rows(principal, session).await?;
        let _serial = self.shared.locks.lock(session).await;
        let (generation, older) = self.shared.channels.bind(session, sink);
        if let Some(older) = older {
            let closing = GatewayFrame::Closing(Closing {
                reason: "replaced by a newer channel".into(),
            });
            if older.send(closing).is_err() {
                tracing::debug!(%session, "replaced channel was already gone");
            }
        }
        let now = self.shared.clock.now();
        let activate = async {
            let rows = self.shared.store.by_session(session).await?;
            self.transition(rows, &|r: &LlmRecord| {
                (r.provider_session_id.as_ref() == Some(session))
                    .then(|| Write::Update(activated(r, now)))
            })
            .await
        };
        if let Err(e) = activate.await {
            self.shared.channels.unbind(session, generation);
            return Err(e);
        }
        Ok(Binding {
            gateway: self.clone(),
            session: session.clone(),
            generation,
            released: false,
        })
    }

    /// The `hello` a stream opens with.
    pub fn hello(&self, session: &SessionId) -> Hello {
        Hello {
            provider_session_id: session.clone(),
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
            keep_alive_ms: Some(self.keep_alive_ms()),
        }
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        u64::try_from(self.shared.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX)
    }

    fn keep_alive_ms(&self) -> u64 {
        u64::try_from(self.shared.config.keepalive.as_millis()).unwrap_or(u64::MAX)
    }

    /// Unbinds `generation` of `session` if it is still the current channel: fails the
    /// session's in-flight tasks with 503 and takes its rows out of service. Returns
    /// whether it was current (a replaced channel's close changes nothing).
    pub(crate) async fn unbind(&self, session: &SessionId, generation: u64) -> Result<bool, Error> {
        let _serial = self.shared.locks.lock(session).await;
        if !self.shared.channels.unbind(session, generation) {
            return Ok(false);
        }
        let failed = self.shared.tasks.fail_session(session);
        if failed > 0 {
            tracing::info!(%session, tasks = failed, "channel closed; in-flight tasks failed");
        }
        let now = self.shared.clock.now();
        let rows = self.shared.store.by_session(session).await?;
        self.transition(rows, &|r: &LlmRecord| {
            (r.provider_session_id.as_ref() == Some(session) && r.status == LlmStatus::Active)
                .then(|| Write::Update(deactivated(r, now)))
        })
        .await?;
        Ok(true)
    }

    /// One GC pass: active virtual rows without a heartbeat for `stale_after` go
    /// inactive, rows inactive for `reap_after` are deleted. Idempotent; cost grows
    /// with the rows it changes, not with the registry.
    pub async fn sweep(&self) -> Result<SweepReport, Error> {
        let config = &self.shared.config;
        let now = self.shared.clock.now();
        let stale_cutoff = now.saturating_sub(config.stale_after);
        let stale = self.shared.store.stale_virtuals(stale_cutoff).await?;
        let marked_inactive = self
            .transition(stale, &|r: &LlmRecord| {
                r.live_since()
                    .filter(|t| *t < stale_cutoff)
                    .map(|_| Write::Update(deactivated(r, now)))
            })
            .await?;
        let reap_cutoff = now.saturating_sub(config.reap_after);
        let expired = self.shared.store.expired_inactives(reap_cutoff).await?;
        let deleted = self
            .transition(expired, &|r: &LlmRecord| {
                r.inactive_key()
                    .filter(|t| *t < reap_cutoff)
                    .map(|_| Write::Delete {
                        name: r.name.clone(),
                        id: r.id.clone(),
                        revision: r.revision,
                    })
            })
            .await?;
        Ok(SweepReport {
            marked_inactive,
            deleted,
        })
    }

    /// Restart recovery: no channel is bound yet, so no virtual row may read active.
    pub(crate) async fn recover(&self) -> Result<usize, Error> {
        let now = self.shared.clock.now();
        let live = self.shared.store.stale_virtuals(Timestamp::MAX).await?;
        self.transition(live, &|r: &LlmRecord| {
            r.live_since()
                .is_some()
                .then(|| Write::Update(deactivated(r, now)))
        })
        .await
    }

    /// Creates or updates a public LLM (admins only). A virtual row of that name is a 409.
    pub async fn put_public(&self, principal: &Principal, spec: LlmSpec) -> Result<LlmView, Error> {
        principal.require(Role::Admin)?;
        spec.validate()?;
        let store = &self.shared.store;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let now = self.shared.clock.now();
            let write = match store.get(&spec.name).await? {
                Some(r) if r.kind == LlmKind::Virtual => {
                    let conflicts = vec![NameConflict {
                        name: spec.name.to_string(),
                        reason: ConflictReason::VirtualLlm,
                    }];
                    return Err(Error::Conflict { conflicts });
                }
                Some(mut r) => {
                    r.provider_type.clone_from(&spec.provider_type);
                    r.model.clone_from(&spec.model);
                    r.tier.clone_from(&spec.tier);
                    r.updated_at = now;
                    Write::Update(r)
                }
                None => Write::Insert(new_row(LlmKind::Public, &spec, &principal.id, None, now)),
            };
            match store.write(vec![write]).await {
                Ok(mut written) => {
                    if let Some(r) = written.pop() {
                        return Ok(r.view());
                    }
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            name: spec.name.to_string(),
        }
        .into())
    }

    /// Every row, as clients see it.
    pub async fn list(&self, _principal: &Principal) -> Result<Vec<LlmView>, Error> {
        Ok(self
            .shared
            .store
            .list()
            .await?
            .iter()
            .map(LlmRecord::view)
            .collect())
    }

    /// One row, as clients see it; 400 for a bad name, 404 for an unknown one.
    pub async fn get(&self, _principal: &Principal, name: &str) -> Result<LlmView, Error> {
        let name = LlmName::parse(name)?;
        match self.shared.store.get(&name).await? {
            Some(r) => Ok(r.view()),
            None => Err(Error::UnknownLlm {
                name: name.to_string(),
            }),
        }
    }

    /// The rows of `session`, which must exist and belong to `principal`. A session
    /// exists while it holds rows, which is what survives a restart.
    pub(crate) async fn session_rows(
        &self,
        principal: &Principal,
        session: &SessionId,
    ) -> Result<Vec<LlmRecord>, Error> {
        let rows = self.shared.store.by_session(session).await?;
        if rows.is_empty() || rows.iter().any(|r| r.owner != principal.id) {
            return Err(Error::UnknownSession);
        }
        Ok(rows)
    }

    /// Applies `rule` to `rows` through compare-and-set batches. A batch that loses a
    /// race falls back to row by row: re-read, re-decide, write. Returns the number of
    /// writes applied. The single path for every lifecycle transition.
    async fn transition(
        &self,
        rows: Vec<LlmRecord>,
        rule: &(dyn Fn(&LlmRecord) -> Option<Write> + Sync),
    ) -> Result<usize, Error> {
        let store = &self.shared.store;
        let writes: Vec<Write> = rows.iter().filter_map(rule).collect();
        let mut applied = 0;
        for batch in writes.chunks(SWEEP_BATCH) {
            match store.write(batch.to_vec()).await {
                Ok(_) => applied += batch.len(),
                Err(StoreError::Conflict { .. }) => {
                    for w in batch {
                        applied += usize::from(self.transition_one(w.name(), rule).await?);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(applied)
    }

    async fn transition_one(
        &self,
        name: &LlmName,
        rule: &(dyn Fn(&LlmRecord) -> Option<Write> + Sync),
    ) -> Result<bool, Error> {
        let store = &self.shared.store;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(row) = store.get(name).await? else {
                return Ok(false);
            };
            let Some(write) = rule(&row) else {
                return Ok(false);
            };
            match store.write(vec![write]).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            name: name.to_string(),
        }
        .into())
    }
}

/// A bound control channel. Release it when the channel closes; dropping it does the
/// same in the background. Only the current binding of a session unbinds it.
#[derive(Debug)]
pub struct Binding {
    gateway: Gateway,
    session: SessionId,
    generation: u64,
    released: bool,
}

impl Binding {
    /// The bound session.
    pub fn session(&self) -> &SessionId {
        &self.session
    }

    /// This binding's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether this is still the session's channel (a newer one replaces it).
    pub fn is_current(&self) -> bool {
        self.gateway.shared.channels.generation(&self.session) == Some(self.generation)
    }

    /// Unbinds now: fails in-flight tasks, takes the rows out of service. Returns
    /// whether this binding was still current.
    pub async fn release(mut self) -> Result<bool, Error> {
        self.released = true;
        self.gateway.unbind(&self.session, self.generation).await
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let gateway = self.gateway.clone();
        let session = self.session.clone();
        let generation = self.generation;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = gateway.unbind(&session, generation).await {
                        tracing::warn!(%session, error = %e, "unbinding a closed channel failed");
                    }
                });
            }
            Err(_) => {
                // No runtime to write the rows from: drop the channel and fail the
                // tasks now; the GC takes the rows out of service when they go stale.
                if gateway.shared.channels.unbind(&session, generation) {
                    gateway.shared.tasks.fail_session(&session);
                }
            }
        }
    }
}
