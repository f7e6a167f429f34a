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

use crate::agent::{AGENT_TYPE, AgentSpec, MAX_AGENTS_PER_REGISTER, Persona, agent_views};
use crate::channel::ChannelSink;
use crate::directory::BindToken;
use crate::protocol::{
    ConflictReason, HeartbeatResponse, Hello, LlmSpec, LlmState, NameConflict, PROTOCOL_VERSION,
    RegisterRequest, RegisterResponse, UpstreamState, negotiate,
};
use crate::{
    ChannelBinding, Error, Gateway, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, LlmView,
    Principal, ReplicaId, Role, SessionId, StoreError, Timestamp, Write,
};

/// How often a lost compare-and-set is re-decided before the caller gets a 503.
const MAX_CAS_ATTEMPTS: usize = 16;
/// Rows per store batch in the GC and recovery.
const SWEEP_BATCH: usize = 256;

/// The row, in service as its upstream allows (SPEC §12), heartbeat now: `active`
/// when its publisher reports the upstream ready (or reports nothing), `hibernating`
/// when asleep, `inactive` when unavailable (keeping an earlier `inactive_since`).
pub fn activated(r: &LlmRecord, now: Timestamp) -> LlmRecord {
    let mut r = r.clone();
    match r.upstream.unwrap_or_default() {
        UpstreamState::Ready => {
            r.status = LlmStatus::Active;
            r.inactive_since = None;
        }
        UpstreamState::Asleep => {
            r.status = LlmStatus::Hibernating;
            r.inactive_since = None;
        }
        UpstreamState::Unavailable => {
            if r.status != LlmStatus::Inactive {
                r.status = LlmStatus::Inactive;
                r.inactive_since = Some(now);
            }
        }
    }
    r.last_heartbeat_at = Some(now);
    r.updated_at = now;
    r
}

/// The row, out of service: an active or hibernating row goes inactive as of `now`;
/// an inactive row keeps its `inactive_since`, so retention counts from when it first
/// went away.
pub fn deactivated(r: &LlmRecord, now: Timestamp) -> LlmRecord {
    let mut r = r.clone();
    if r.status != LlmStatus::Inactive {
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
///
/// `specs` names every row the register publishes: its LLMs, then its agents (an
/// agent as the spec of its row, see [`agent_row_spec`]); `personas` is aligned with
/// `specs`, set for the agents. An LLM and an agent are decided alike: a name is a
/// name, whichever it was before.
fn plan_register(
    owner: &str,
    session: &SessionId,
    session_rows: &[LlmRecord],
    specs: &[LlmSpec],
    personas: &[Option<Persona>],
    current: &[Option<LlmRecord>],
    now: Timestamp,
) -> Result<Vec<Write>, Vec<NameConflict>> {
    let mut writes = Vec::with_capacity(specs.len() + session_rows.len());
    let mut conflicts = Vec::new();
    // The session's channel, if one is bound: every row of the session records it,
    // including rows this register adds to the session.
    let bound = session_rows.iter().find_map(|r| r.binding.clone());
    for ((spec, row), persona) in specs.iter().zip(current).zip(personas) {
        let conflict = |reason| NameConflict {
            name: spec.name.to_string(),
            reason,
        };
        match row {
            None => {
                let mut r = new_row(LlmKind::Virtual, spec, owner, Some(session), now);
                r.agent.clone_from(persona);
                let mut r = activated(&r, now);
                r.binding.clone_from(&bound);
                writes.push(Write::Insert(r));
            }
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
                let mut r = r.clone();
                r.upstream = spec.state;
                let mut r = activated(&r, now);
                if r.provider_session_id.as_ref() != Some(session) {
                    // Adopted: the other session's channel is not this one's.
                    r.binding.clone_from(&bound);
                }
                r.provider_session_id = Some(session.clone());
                r.provider_type.clone_from(&spec.provider_type);
                r.model.clone_from(&spec.model);
                r.tier.clone_from(&spec.tier);
                r.pool.clone_from(&spec.pool);
                r.max_concurrent = spec.max_concurrent;
                r.agent.clone_from(persona);
                r.access.clone_from(&spec.access);
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
        r.binding = None;
        writes.push(Write::Update(r));
    }
    Ok(writes)
}

/// What the registry holds around one spec's pool, read before a register decides.
struct PoolFacts {
    /// The rows of the spec's pool (its pool key).
    members: Vec<LlmRecord>,
    /// The row named like the spec's pool, when the spec names a pool other than
    /// itself.
    key_row: Option<LlmRecord>,
    /// The rows whose pool is named like the spec, when the spec serves in a pool
    /// other than itself.
    named_pool: Vec<LlmRecord>,
}

/// The pool rules of SPEC §10 for a register: pool keys and row names share one
/// namespace (`poolNameTaken`), and a pool belongs to the principal of its first row
/// unless the caller was granted it (`poolOwnedByAnother`). Pure, like
/// [`plan_register`]; rows the register itself rewrites are judged by their new spec.
fn pool_conflicts(
    principal: &Principal,
    specs: &[LlmSpec],
    facts: &[PoolFacts],
) -> Vec<NameConflict> {
    let in_batch = |name: &LlmName| specs.iter().find(|s| s.name == *name);
    let mut conflicts = Vec::new();
    for (spec, facts) in specs.iter().zip(facts) {
        let (name, key) = (&spec.name, spec.pool_key());
        let conflict = |reason| NameConflict {
            name: name.to_string(),
            reason,
        };
        if key != name {
            // The pool's key must not name a row outside the pool...
            let key_row_outside = match in_batch(key) {
                Some(other) => other.pool_key() != key,
                None => facts
                    .key_row
                    .as_ref()
                    .is_some_and(|r| r.pool_key() != key || r.is_agent()),
            };
            // ...and the spec's own name must not be another pool's key.
            let named_like_a_pool = facts
                .named_pool
                .iter()
                .any(|r| r.name != *name && in_batch(&r.name).is_none())
                || specs
                    .iter()
                    .any(|s| s.name != *name && s.pool_key() == name);
            if key_row_outside || named_like_a_pool {
                conflicts.push(conflict(ConflictReason::PoolNameTaken));
                continue;
            }
        }
        let first = facts
            .members
            .iter()
            .filter(|r| in_batch(&r.name).is_none() && !r.is_agent())
            .min_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        if let Some(first) = first
            && first.owner != principal.id
            && !principal.may_join(key.as_str())
        {
            conflicts.push(conflict(ConflictReason::PoolOwnedByAnother));
        }
    }
    conflicts
}

/// The spec of an agent's row: its name, the type `agent`, and its LLM as the model.
fn agent_row_spec(agent: &AgentSpec) -> LlmSpec {
    let mut spec = LlmSpec::new(
        agent.name.clone(),
        AGENT_TYPE.to_owned(),
        agent.llm.to_string(),
    );
    spec.access = agent.access.clone();
    spec
}

/// The agents of a register named like a pool of LLMs that is not theirs: pool keys,
/// LLM names and agent names share one namespace (`poolNameTaken`). `pools[i]` is the
/// rows whose pool key is agent `i`'s name; rows the register itself rewrites as LLMs
/// are judged by their new spec (which the register's checks keep apart).
fn agent_conflicts(
    agents: &[AgentSpec],
    llms: &[LlmSpec],
    pools: &[Vec<LlmRecord>],
) -> Vec<NameConflict> {
    agents
        .iter()
        .zip(pools)
        .filter(|(agent, pool)| {
            pool.iter().any(|r| {
                r.name != agent.name && !r.is_agent() && llms.iter().all(|s| s.name != r.name)
            })
        })
        .map(|(agent, _)| NameConflict {
            name: agent.name.to_string(),
            reason: ConflictReason::PoolNameTaken,
        })
        .collect()
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
        binding: None,
        pool: spec.pool.clone(),
        max_concurrent: spec.max_concurrent,
        upstream: spec.state,
        agent: None,
        access: spec.access.clone(),
    }
}

impl Gateway {
    /// Two principals creating the same pool at once both find it empty, and both
    /// write. So a register that created a pool reads it again after its write: a
    /// row of another principal there now was written concurrently, and the caller
    /// (without a grant) takes back the rows it just inserted and gets the 409 it
    /// would have had a moment later. Of racers that all see each other, all step
    /// back (and their publishers register again); none ever shares a pool it was
    /// not granted.
    async fn settle_new_pools(
        &self,
        principal: &Principal,
        specs: &[LlmSpec],
        facts: &[PoolFacts],
        writes: &[Write],
        written: &[LlmRecord],
    ) -> Result<(), Error> {
        let store = &self.shared.store;
        let mut lost = Vec::new();
        for (spec, facts) in specs.iter().zip(facts) {
            let key = spec.pool_key();
            let new_pool = facts
                .members
                .iter()
                .all(|r| specs.iter().any(|s| s.name == r.name));
            if !new_pool || principal.may_join(key.as_str()) {
                continue;
            }
            let members = store.by_pool(key).await?;
            if members.iter().any(|r| r.owner != principal.id) {
                lost.push(spec);
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        let inserted = |name: &LlmName| {
            writes
                .iter()
                .any(|w| matches!(w, Write::Insert(r) if r.name == *name))
        };
        let undo: Vec<Write> = written
            .iter()
            .filter(|r| lost.iter().any(|s| s.name == r.name) && inserted(&r.name))
            .map(|r| Write::Delete {
                name: r.name.clone(),
                id: r.id.clone(),
                revision: r.revision,
            })
            .collect();
        if !undo.is_empty() {
            store.write(undo.clone()).await?;
            self.observe(&undo, &[]);
        }
        Err(Error::Conflict {
            conflicts: lost
                .iter()
                .map(|s| NameConflict {
                    name: s.name.to_string(),
                    reason: ConflictReason::PoolOwnedByAnother,
                })
                .collect(),
        })
    }

    /// Checks a register and answers the protocol version to speak.
    fn check_register(&self, req: &RegisterRequest) -> Result<u32, Error> {
        let version = negotiate(req.protocol_version).ok_or(Error::UnsupportedProtocol {
            version: req.protocol_version.unwrap_or(1),
            supported: PROTOCOL_VERSION,
        })?;
        let max = self.shared.config.max_llms_per_register;
        if req.llms.is_empty() || req.llms.len() > max {
            return Err(Error::invalid(format!("a register names 1 to {max} llms")));
        }
        // Names are unique ignoring case: `A` and `a` in one register are one name twice.
        let mut seen = HashSet::new();
        for spec in &req.llms {
            spec.validate()?;
            if !seen.insert(spec.name.folded()) {
                return Err(Error::invalid(format!("llm {} is named twice", spec.name)));
            }
        }
        if req.agents.len() > MAX_AGENTS_PER_REGISTER {
            return Err(Error::invalid(format!(
                "a register names at most {MAX_AGENTS_PER_REGISTER} agents"
            )));
        }
        for agent in &req.agents {
            agent.validate()?;
            if !seen.insert(agent.name.folded()) {
                return Err(Error::invalid(format!(
                    "{} is named twice in one register",
                    agent.name
                )));
            }
            if req.llms.iter().any(|s| *s.pool_key() == agent.name) {
                return Err(Error::invalid(format!(
                    "agent {} is named like a pool of the same register",
                    agent.name
                )));
            }
            if !req
                .llms
                .iter()
                .any(|s| s.name == agent.llm || *s.pool_key() == agent.llm)
            {
                return Err(Error::invalid(format!(
                    "agent {} speaks through {}, which is no llm or pool of the same register",
                    agent.name, agent.llm
                )));
            }
        }
        Ok(version)
    }

    /// Registers (or re-registers) a publisher's LLMs, atomically: either every name is
    /// written, or none and the answer is a 409 naming each conflict (or a 403
    /// `quota_exceeded` when it would take the principal over its `maxNames` or
    /// `maxSessions`).
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
        let version = self.check_register(&req)?;
        let store = &self.shared.store;
        let (session, mut session_rows) = match &req.provider_session_id {
            Some(s) => match self.session_rows(principal, s).await {
                Ok(rows) => (s.clone(), rows),
                Err(Error::UnknownSession) => (SessionId::generate(), Vec::new()),
                Err(e) => return Err(e),
            },
            None => (SessionId::generate(), Vec::new()),
        };
        // Every row the register publishes: its LLMs, then its agents.
        let specs: Vec<LlmSpec> = (req.llms.iter().cloned())
            .chain(req.agents.iter().map(agent_row_spec))
            .collect();
        let personas: Vec<Option<Persona>> = (req.llms.iter().map(|_| None))
            .chain(req.agents.iter().map(|a| Some(a.persona())))
            .collect();
        let names: Vec<&LlmName> = specs.iter().map(|s| &s.name).collect();
        let _quota = self.check_quota(principal, &session, &names).await?;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            if attempt > 0 {
                session_rows = store.by_session(&session).await?;
            }
            let mut current = Vec::with_capacity(specs.len());
            // A free name whose look-alike is taken (`LLAMA-8B` beside `llama-8b`).
            let mut lookalikes = Vec::new();
            for spec in &specs {
                let row = store.get(&spec.name).await?;
                if row.is_none() && store.get_ignoring_case(&spec.name).await?.is_some() {
                    lookalikes.push(NameConflict {
                        name: spec.name.to_string(),
                        reason: ConflictReason::NameTakenIgnoringCase,
                    });
                }
                current.push(row);
            }
            if !lookalikes.is_empty() {
                return Err(Error::Conflict {
                    conflicts: lookalikes,
                });
            }
            let mut agent_pools = Vec::with_capacity(req.agents.len());
            for agent in &req.agents {
                agent_pools.push(store.by_pool(&agent.name).await?);
            }
            let mut facts = Vec::with_capacity(req.llms.len());
            for spec in &req.llms {
                let (name, key) = (&spec.name, spec.pool_key());
                let apart = key != name;
                facts.push(PoolFacts {
                    members: store.by_pool(key).await?,
                    key_row: if apart { store.get(key).await? } else { None },
                    named_pool: if apart {
                        store.by_pool(name).await?
                    } else {
                        Vec::new()
                    },
                });
            }
            let now = self.shared.clock.now();
            let planned = plan_register(
                &principal.id,
                &session,
                &session_rows,
                &specs,
                &personas,
                &current,
                now,
            );
            let mut conflicts = pool_conflicts(principal, &req.llms, &facts);
            conflicts.extend(agent_conflicts(&req.agents, &req.llms, &agent_pools));
            let writes = match planned {
                Ok(writes) if conflicts.is_empty() => writes,
                Ok(_) => return Err(Error::Conflict { conflicts }),
                Err(mut names) => {
                    // One entry per name: the row's own conflict first.
                    conflicts.retain(|c| names.iter().all(|n| n.name != c.name));
                    names.append(&mut conflicts);
                    return Err(Error::Conflict { conflicts: names });
                }
            };
            match store.write(writes.clone()).await {
                Ok(written) => {
                    self.observe(&writes, &written);
                    self.held(principal, &written);
                    // A session resumes its tasks through a dropped channel when it asks
                    // to (protocol 2) and the gateway holds tasks at all.
                    let resume = version >= 2
                        && req.declares(crate::protocol::RESUME)
                        && !self.shared.config.resume_window.is_zero();
                    self.shared.versions.set(&session, version, resume);
                    self.settle_new_pools(principal, &req.llms, &facts, &writes, &written)
                        .await?;
                    let llms = req
                        .llms
                        .iter()
                        .filter_map(|spec| written.iter().find(|r| r.name == spec.name))
                        .map(LlmRecord::view)
                        .collect();
                    let agents = agent_views(
                        req.agents
                            .iter()
                            .filter_map(|a| written.iter().find(|r| r.name == a.name)),
                        &written,
                    );
                    return Ok(RegisterResponse {
                        provider_session_id: session,
                        heartbeat_interval_ms: self.heartbeat_interval_ms(),
                        protocol_version: spoken(version),
                        keep_alive_ms: self.keep_alive_ms(version),
                        llms,
                        agents,
                        // A publisher that sends runs of chunks (protocol 2) is told
                        // they are taken.
                        capabilities: [
                            resume.then_some(crate::protocol::RESUME),
                            (version >= 2 && req.declares(crate::protocol::CHUNK_RUNS))
                                .then_some(crate::protocol::CHUNK_RUNS),
                            // …and runs sent as lines, over a WebSocket.
                            (version >= 2
                                && req.declares(crate::protocol::CHUNK_RUNS)
                                && req.declares(crate::protocol::CHUNK_LINES))
                            .then_some(crate::protocol::CHUNK_LINES),
                            // …and whole answers posted several at once, over HTTP.
                            (version >= 2 && req.declares(crate::protocol::RESULT_BATCHES))
                                .then_some(crate::protocol::RESULT_BATCHES),
                        ]
                        .into_iter()
                        .flatten()
                        .map(str::to_owned)
                        .collect(),
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
    /// rows that went inactive while its channel is still bound (the row says so: its
    /// binding, on whichever replica). 404 for a session the gateway does not know (the
    /// publisher then re-registers).
    pub async fn heartbeat(
        &self,
        principal: &Principal,
        session: &SessionId,
    ) -> Result<HeartbeatResponse, Error> {
        self.heartbeat_with(principal, session, &[]).await
    }

    /// A heartbeat that also reports each LLM's upstream state (protocol 2, SPEC §12):
    /// the rows record it, and a bound session's rows follow it (`ready` → active,
    /// `asleep` → hibernating, `unavailable` → inactive). An LLM reported ready ends
    /// its wake; one whose wake failed fails the requests waiting for it. States of
    /// names the session does not hold are ignored.
    pub async fn heartbeat_with(
        &self,
        principal: &Principal,
        session: &SessionId,
        states: &[LlmState],
    ) -> Result<HeartbeatResponse, Error> {
        principal.require(Role::Publisher)?;
        let max = self.shared.config.max_llms_per_register;
        if states.len() > max {
            return Err(Error::invalid(format!(
                "a heartbeat reports at most {max} llms"
            )));
        }
        let rows = self.session_rows(principal, session).await?;
        let names: Vec<LlmName> = rows.iter().map(|r| r.name.clone()).collect();
        let now = self.shared.clock.now();
        self.shared.store.touch(&names, now).await?;
        // An agent has no upstream of its own: a state named after one is ignored.
        let reported = |r: &LlmRecord| {
            let mut r = r.clone();
            if let Some(s) = states.iter().find(|s| s.name == r.name && !r.is_agent()) {
                r.upstream = (s.state != UpstreamState::Ready).then_some(s.state);
            }
            r
        };
        let ours = |r: &LlmRecord| r.provider_session_id.as_ref() == Some(session);
        // The write a row needs: its new state recorded, and (bound) its status.
        let rule = |r: &LlmRecord| {
            if !ours(r) {
                return None;
            }
            let new = reported(r);
            let new = if r.binding.is_some() {
                activated(&new, now)
            } else {
                new
            };
            (new.upstream != r.upstream || new.status != r.status).then_some(Write::Update(new))
        };
        if rows.iter().any(|r| rule(r).is_some()) {
            let _serial = self.shared.locks.lock(session).await;
            let rows = self.shared.store.by_session(session).await?;
            self.transition(rows, &rule).await?;
        }
        let llm = |name: &LlmName| rows.iter().any(|r| r.name == *name && !r.is_agent());
        for state in states.iter().filter(|s| llm(&s.name)) {
            match (&state.wake_failed, state.state) {
                (Some(message), _) => {
                    if let Some(row) = rows.iter().find(|r| r.name == state.name) {
                        let pool = row.pool_key();
                        let admission = &*self.shared.admission;
                        self.shared.wakes.fail(admission, &row.name, pool, message);
                        // Requests for it may wait on other replicas too.
                        self.shared
                            .task_router
                            .wake_failed(&row.name, pool, message)
                            .await;
                    }
                }
                (None, UpstreamState::Ready) => {
                    if let Some(row) = rows.iter().find(|r| r.name == state.name) {
                        self.shared.wakes.woke(row);
                    }
                }
                (None, _) => {}
            }
        }
        Ok(HeartbeatResponse { llms: rows.len() })
    }

    /// Binds a control channel to a known session: its rows go active and record the
    /// binding, and a channel already bound to the session (on any replica) is told to
    /// close and replaced. Frames for the session go to `sink` until the returned
    /// [`Binding`] is released or dropped.
    pub async fn bind(
        &self,
        principal: &Principal,
        session: &SessionId,
        sink: Arc<dyn ChannelSink>,
    ) -> Result<Binding, Error> {
        principal.require(Role::Publisher)?;
        self.session_rows(principal, session).await?;
        let _serial = self.shared.locks.lock(session).await;
        let token = self.shared.directory.bind(session, sink);
        // Every replica knows of the bind before the rows say where it is.
        self.shared.directory.settled().await;
        let now = self.shared.clock.now();
        let activate = async {
            let rows = self.shared.store.by_session(session).await?;
            self.transition(rows, &|r: &LlmRecord| {
                (r.provider_session_id.as_ref() == Some(session)).then(|| {
                    let mut r = activated(r, now);
                    r.binding = Some(token.binding.clone());
                    Write::Update(r)
                })
            })
            .await
        };
        if let Err(e) = activate.await {
            self.shared.directory.release(&token);
            return Err(e);
        }
        // Clients that gave up on held tasks while the channel was down: the publisher
        // hears of it now.
        self.shared.tasks.rebound(session);
        Ok(Binding {
            gateway: self.clone(),
            token,
            released: false,
        })
    }

    /// The `hello` a stream opens with, in the protocol version the publisher
    /// registered with (see [`negotiate`]); a version 1 publisher gets exactly the
    /// version 1 frame.
    pub fn hello(&self, session: &SessionId, version: u32) -> Hello {
        Hello {
            provider_session_id: session.clone(),
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
            protocol_version: spoken(version),
            keep_alive_ms: self.keep_alive_ms(version),
        }
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        u64::try_from(self.shared.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// The keep-alive period a publisher's watchdog waits for (protocol 2; a version 1
    /// publisher is sent nothing new).
    fn keep_alive_ms(&self, version: u32) -> Option<u64> {
        (version > 1)
            .then(|| u64::try_from(self.shared.config.keepalive.as_millis()).unwrap_or(u64::MAX))
    }

    /// Unbinds `token` if it is still its session's channel and takes the rows still
    /// recording this bind out of service. The session's in-flight tasks (here and,
    /// through the task router, on every other replica) fail with 503; for a session
    /// that resumes (SPEC §15) they wait `resumeWindow` for its next channel first.
    /// Returns whether it was current (a replaced channel's release changes nothing).
    pub(crate) async fn unbind(&self, token: &BindToken) -> Result<bool, Error> {
        let session = &token.session;
        let _serial = self.shared.locks.lock(session).await;
        if !self.shared.directory.release(token) {
            return Ok(false);
        }
        self.shared.directory.settled().await;
        if self.shared.versions.resumes(session) {
            let (held, hold) = self.shared.tasks.hold_session(session);
            if held > 0 {
                crate::metrics::resume_held();
                tracing::info!(%session, tasks = held, "channel closed; in-flight tasks wait for the publisher to resume them");
            }
            // The other replicas' tasks on this session wait the window too, and fail
            // at its end unless the publisher resumes them, wherever it binds again.
            // Awaited (the router bounds it in time): a `resume` the publisher sends
            // after binding again must find its task held, not be overtaken by the hold.
            self.shared.task_router.session_held(session).await;
            let (gateway, closed) = (self.clone(), session.clone());
            let window = self.shared.config.resume_window;
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                gateway.resume_window_over(&closed, hold).await;
            });
        } else {
            let failed = self.shared.tasks.fail_session(session);
            if failed > 0 {
                tracing::info!(%session, tasks = failed, "channel closed; in-flight tasks failed");
            }
            // The other replicas' tasks on this session fail too. Told from a task of
            // its own: a peer may be slow, and the session's lock is not held for it.
            let (router, closed) = (self.shared.task_router.clone(), session.clone());
            tokio::spawn(async move { router.session_closed(&closed).await });
        }
        let now = self.shared.clock.now();
        let rows = self.shared.store.by_session(session).await?;
        self.transition(rows, &|r: &LlmRecord| {
            (r.binding.as_ref() == Some(&token.binding)).then(|| {
                let mut r = deactivated(r, now);
                r.binding = None;
                Write::Update(r)
            })
        })
        .await?;
        Ok(true)
    }

    /// The resume window after `session`'s channel closed (hold `hold`) is over: the
    /// tasks still held here fail, and unless the session has a channel again (on any
    /// replica: its rows record the binding), the other replicas' tasks on it fail too
    /// (they were held by [`TaskRouter::session_held`](crate::TaskRouter::session_held)
    /// and fail on their own timer; this also covers a replica that missed it).
    async fn resume_window_over(&self, session: &SessionId, hold: u64) {
        let lost = self.shared.tasks.expire_hold(session, hold);
        if lost > 0 {
            tracing::info!(%session, tasks = lost, "the publisher did not resume its tasks in time; they failed");
        }
        let bound = match self.shared.store.by_session(session).await {
            Ok(rows) => rows.iter().any(|r| r.binding.is_some()),
            Err(e) => {
                tracing::warn!(%session, error = %e, "could not read whether a closed session came back; its tasks elsewhere fail");
                false
            }
        };
        if !bound {
            self.shared.task_router.session_closed(session).await;
        }
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
        // A row whose upstream is unavailable while its publisher is bound and still
        // heartbeats is not gone: it is not reaped.
        let heartbeating = |r: &LlmRecord| {
            r.binding.is_some() && r.last_heartbeat_at.is_some_and(|t| t >= stale_cutoff)
        };
        let reaped = |r: &LlmRecord| {
            r.inactive_key()
                .is_some_and(|t| t < reap_cutoff && !heartbeating(r))
        };
        // A session whose rows are reaped is long gone: forget its protocol version.
        self.shared.versions.forget(
            expired
                .iter()
                .filter(|r| reaped(r))
                .filter_map(|r| r.provider_session_id.as_ref()),
        );
        let deleted = self
            .transition(expired, &|r: &LlmRecord| {
                r.inactive_key()
                    .filter(|t| *t < reap_cutoff && !heartbeating(r))
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

    /// Restart recovery: the channels this replica held died with its previous run, so
    /// its rows go inactive and lose their binding. Live rows bound to no replica (written
    /// before bindings were recorded) go inactive too. Rows bound to other replicas are
    /// left to them.
    pub(crate) async fn recover(&self) -> Result<usize, Error> {
        let now = self.shared.clock.now();
        let me = self.replica().clone();
        let released = self.unbind_replica(&me, now).await?;
        let live = self.shared.store.stale_virtuals(Timestamp::MAX).await?;
        let unbound = self
            .transition(live, &|r: &LlmRecord| {
                (r.live_since().is_some() && r.binding.is_none())
                    .then(|| Write::Update(deactivated(r, now)))
            })
            .await?;
        Ok(released + unbound)
    }

    /// Takes the rows whose channels `replica` held out of service (inactive, no
    /// binding): its channels are gone (its previous run, or a peer whose lease ran
    /// out). Each write is a compare-and-set on the row as read, so a row another
    /// replica bound in the meantime keeps its new binding.
    pub(crate) async fn unbind_replica(
        &self,
        replica: &ReplicaId,
        now: Timestamp,
    ) -> Result<usize, Error> {
        let held = self.shared.store.bound_to(replica).await?;
        self.transition(held, &|r: &LlmRecord| {
            r.binding
                .as_ref()
                .is_some_and(|b| b.replica == *replica)
                .then(|| {
                    let mut r = deactivated(r, now);
                    r.binding = None;
                    Write::Update(r)
                })
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
            let row = match store.get(&spec.name).await? {
                None => store.get_ignoring_case(&spec.name).await?,
                row => row,
            };
            let write = match row {
                Some(r) if r.name != spec.name => {
                    let conflicts = vec![NameConflict {
                        name: spec.name.to_string(),
                        reason: ConflictReason::NameTakenIgnoringCase,
                    }];
                    return Err(Error::Conflict { conflicts });
                }
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
                    r.pool.clone_from(&spec.pool);
                    r.max_concurrent = spec.max_concurrent;
                    r.access.clone_from(&spec.access);
                    r.updated_at = now;
                    Write::Update(r)
                }
                None => Write::Insert(new_row(LlmKind::Public, &spec, &principal.id, None, now)),
            };
            let batch = vec![write];
            match store.write(batch.clone()).await {
                Ok(mut written) => {
                    self.observe(&batch, &written);
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

    /// Removes the row `name`, whoever owns it (admins only): the operator's way to
    /// take back a name, e.g. one a publisher took before the operator made it a
    /// public LLM. Answers the row as it was. A virtual row's session keeps its other
    /// rows and its channel; its publisher may register the name again (unless it is
    /// a public LLM's by then), as it may any free name. In-flight tasks finish.
    pub async fn evict(&self, principal: &Principal, name: &str) -> Result<LlmView, Error> {
        principal.require(Role::Admin)?;
        let name = LlmName::parse(name)?;
        let store = &self.shared.store;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(row) = store.get(&name).await? else {
                return Err(Error::UnknownLlm {
                    name: name.to_string(),
                });
            };
            let batch = vec![Write::Delete {
                name: row.name.clone(),
                id: row.id.clone(),
                revision: row.revision,
            }];
            match store.write(batch.clone()).await {
                Ok(written) => {
                    self.observe(&batch, &written);
                    return Ok(self.views(std::slice::from_ref(&row)).remove(0));
                }
                Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict {
            name: name.to_string(),
        }
        .into())
    }

    /// Every row `principal` may see (SPEC §16), as clients see it, with its load on
    /// this replica.
    pub async fn list(&self, principal: &Principal) -> Result<Vec<LlmView>, Error> {
        let mut rows = self.shared.store.list().await?;
        rows.retain(|r| !r.is_agent() && r.admits(principal));
        Ok(self.views(&rows))
    }

    /// A page of [`Gateway::list`]: at most `limit` rows (1 at least) whose names
    /// come after `after` (strictly; from the first when `None`), ordered by name, and
    /// the cursor of the next page (the last row's name) when there may be more. The
    /// store reads about one page, not the whole registry.
    pub async fn list_page(
        &self,
        principal: &Principal,
        after: Option<&LlmName>,
        limit: usize,
    ) -> Result<(Vec<LlmView>, Option<LlmName>), Error> {
        let limit = limit.max(1);
        let store = &self.shared.store;
        let mut rows = Vec::with_capacity(limit.min(1024));
        let mut cursor = after.cloned();
        // One more than the page, to tell whether there is a next one; agents are
        // not listed here, so a page of them is read past.
        let more = loop {
            let want = limit + 1 - rows.len();
            let read = store.list_after(cursor.as_ref(), want).await?;
            let exhausted = read.len() < want;
            cursor = read.last().map(|r| r.name.clone()).or(cursor);
            rows.extend(
                read.into_iter()
                    .filter(|r| !r.is_agent() && r.admits(principal)),
            );
            if rows.len() > limit {
                rows.truncate(limit);
                break true;
            }
            if exhausted {
                break false;
            }
        };
        let next = if more {
            rows.last().map(|r| r.name.clone())
        } else {
            None
        };
        Ok((self.views(&rows), next))
    }

    /// One row, as clients see it; 400 for a bad name, 404 for an unknown one or one
    /// `principal` may not see.
    pub async fn get(&self, principal: &Principal, name: &str) -> Result<LlmView, Error> {
        let name = LlmName::parse(name)?;
        match self.shared.store.get(&name).await? {
            Some(r) if !r.is_agent() && r.admits(principal) => {
                Ok(self.views(std::slice::from_ref(&r)).remove(0))
            }
            _ => Err(Error::UnknownLlm {
                name: name.to_string(),
            }),
        }
    }

    /// The rows of the pool `pool` (its members, whatever their status) that
    /// `principal` may see, as clients see them; 400 for a bad name, 404 when it may
    /// see no row with that pool key.
    pub async fn members(&self, principal: &Principal, pool: &str) -> Result<Vec<LlmView>, Error> {
        let pool = LlmName::parse(pool)?;
        let mut rows = self.shared.store.by_pool(&pool).await?;
        rows.retain(|r| !r.is_agent() && r.admits(principal));
        if rows.is_empty() {
            return Err(Error::UnknownLlm {
                name: pool.to_string(),
            });
        }
        Ok(self.views(&rows))
    }

    /// The views of `rows`, each with its tasks in flight and its pool's queue on
    /// this replica.
    fn views(&self, rows: &[LlmRecord]) -> Vec<LlmView> {
        let admission = &self.shared.admission;
        let mut queued = std::collections::HashMap::new();
        rows.iter()
            .map(|r| {
                let mut view = r.view();
                view.in_flight = admission.in_flight(r);
                view.queued = *queued
                    .entry(r.pool_key())
                    .or_insert_with(|| admission.load(r.pool_key()).queued);
                view
            })
            .collect()
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
                Ok(written) => {
                    self.observe(batch, &written);
                    applied += batch.len();
                }
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
            let batch = [write];
            match store.write(batch.to_vec()).await {
                Ok(written) => {
                    self.observe(&batch, &written);
                    return Ok(true);
                }
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

impl Gateway {
    /// Tells the registry view and the admission what a successful write did to rows:
    /// which changed (the view reads them again), which serve now, which left their
    /// pool, which are gone. Every registry write calls it.
    fn observe(&self, batch: &[Write], written: &[LlmRecord]) {
        let (admission, view) = (&self.shared.admission, &self.shared.view);
        for row in written {
            view.invalidate(row);
            if row.is_agent() {
                // An agent is never a pool member; a row that was an LLM leaves its pool.
                admission.forget(&row.name, &row.id);
            } else {
                admission.observe(row);
            }
        }
        for w in batch {
            if let Write::Delete { name, id, .. } = w {
                view.forget(name);
                admission.forget(name, id);
            }
        }
        self.shared.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The `protocolVersion` field of an answer on a session speaking `version`: absent for
/// version 1, whose frames stay exactly as they were.
fn spoken(version: u32) -> Option<u32> {
    (version > 1).then_some(version)
}

/// A bound control channel. Release it when the channel closes; dropping it does the
/// same in the background. Only the current bind of a session unbinds it.
#[derive(Debug)]
pub struct Binding {
    gateway: Gateway,
    token: BindToken,
    released: bool,
}

impl Binding {
    /// The bound session.
    pub fn session(&self) -> &SessionId {
        &self.token.session
    }

    /// The bind: which replica, which epoch.
    pub fn binding(&self) -> &ChannelBinding {
        &self.token.binding
    }

    /// Whether this is still the session's channel (a newer one replaces it).
    pub fn is_current(&self) -> bool {
        self.gateway.shared.directory.is_current(&self.token)
    }

    /// Unbinds now: fails in-flight tasks, takes the rows out of service. Returns
    /// whether this binding was still current.
    pub async fn release(mut self) -> Result<bool, Error> {
        self.released = true;
        self.gateway.unbind(&self.token).await
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let gateway = self.gateway.clone();
        let token = self.token.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = gateway.unbind(&token).await {
                        tracing::warn!(session = %token.session, error = %e, "unbinding a closed channel failed");
                    }
                });
            }
            Err(_) => {
                // No runtime to write the rows from: drop the channel and fail the
                // tasks now; the GC takes the rows out of service when they go stale.
                if gateway.shared.directory.release(&token) {
                    gateway.shared.tasks.fail_session(&token.session);
                }
            }
        }
    }
}
