//! The router: which rows may answer a request, and which of them takes it.
//!
//! It is the one place a request's row is chosen, in two steps. The [`Router`] seam
//! resolves the client's `model` into a [`Route`]: the rows of a pool (SPEC §10), or
//! the one member a client pinned by its own name. Then [`choose`] picks among the
//! route's rows that can take a task now (active, with a channel, not cooling down,
//! with a free slot): the lowest in-flight / capacity, ties broken round-robin. The
//! [`Admission`](crate::Admission) picks that way under its lock (the local one over
//! ranks it keeps up to date, with [`choose_ranked`]), so picking a row and taking
//! its slot are one step; it queues the request when nothing is free.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::agent::Persona;
use crate::protocol::MAX_CONCURRENT;
use crate::{Error, LlmKind, LlmName, LlmRecord, LlmStatus, Principal, RegistryView};

/// What a client's `model` resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The pool the request is for: its queue, its round-robin turn.
    pub pool: LlmName,
    /// The rows that may answer, in any status: every member of the pool, or the one
    /// member named. The admission decides which can take a task now. Shared with
    /// the [`RegistryView`] that read them: a route costs no copy of its rows.
    pub rows: Arc<[LlmRecord]>,
    /// Set when the model named one member by its own name rather than a pool: only
    /// that row may answer.
    pub pinned: Option<LlmName>,
    /// Set when the model named an agent (SPEC §13): the route is its LLM's, and the
    /// relay puts the agent's persona on the request first.
    pub agent: Option<Arc<AgentRoute>>,
}

/// The agent a request named, as its route carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRoute {
    /// The agent's name.
    pub name: LlmName,
    /// Its row's own status (its session's lifecycle): a request for an agent that
    /// is not active is a 503, whatever its LLM's status.
    pub status: LlmStatus,
    /// What it puts on a request.
    pub persona: Persona,
}

impl Route {
    /// Whether `row` may answer this route's request at all: a row of the route, and
    /// the pinned one if a member was pinned.
    pub fn admits(&self, row: &LlmName) -> bool {
        self.pinned.as_ref().is_none_or(|p| p == row)
    }

    /// Whether `row` can take a task now as far as the registry says: active, and
    /// (for a published row) with a bound channel.
    pub fn serving(row: &LlmRecord) -> bool {
        row.status == LlmStatus::Active && (row.kind == LlmKind::Public || row.binding.is_some())
    }
}

/// Resolves a request's `model` into the rows that may answer it.
///
/// # Contract
/// - [`route`](Router::route) returns a [`Route`] with at least one row, or an error:
///   [`Error::InvalidName`] for a model that breaks the name rules,
///   [`Error::UnknownLlm`] when nothing answers to it (also when the caller may not see
///   what does: it must not learn that it exists).
/// - Every row of the route has the route's pool as its
///   [`pool_key`](LlmRecord::pool_key).
/// - It reads the registry through `registry` (the store, through the gateway's
///   in-memory [`RegistryView`]) and never writes it.
/// - A `model` naming an agent (SPEC §13) routes to the agent's LLM (its `llm`,
///   resolved as a model is), with [`Route::agent`] set; an agent's row is never a
///   row of a route.
///
/// The test kit's `router_suite` (feature `testkit`) checks an implementation against
/// this contract.
#[async_trait]
pub trait Router: fmt::Debug + Send + Sync + 'static {
    /// The rows that may answer `principal`'s request for `model`.
    async fn route(
        &self,
        registry: &RegistryView,
        principal: &Principal,
        model: &str,
    ) -> Result<Route, Error>;
}

/// The router of SPEC §10, §13 and §16: a pool key names its pool (a row without a
/// pool is the pool of one named after it); any other row name pins that member; an
/// agent's name routes to its LLM, carrying the agent. Rows whose
/// [access](crate::access) does not admit the caller are left out, as if they did not
/// exist: a caller no row admits gets [`Error::UnknownLlm`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolRouter;

impl PoolRouter {
    /// The route of the LLM `name` (a pool key or a member's name), given the rows of
    /// the pool `name` as the registry has them (`None`: no such pool).
    async fn llm_route(
        registry: &RegistryView,
        principal: &Principal,
        name: LlmName,
        pool: Option<Arc<[LlmRecord]>>,
        model: &str,
    ) -> Result<Route, Error> {
        if let Some(rows) = pool {
            // An agent's row is never a row of a route, nor is a row the caller may
            // not see (SPEC §16): a pool serves each caller with the members that
            // admit it.
            let usable = |r: &LlmRecord| !r.is_agent() && r.admits(principal);
            let rows: Arc<[LlmRecord]> = if rows.iter().all(usable) {
                rows
            } else {
                rows.iter().filter(|r| usable(r)).cloned().collect()
            };
            if !rows.is_empty() {
                return Ok(Route {
                    pool: name,
                    rows,
                    pinned: None,
                    agent: None,
                });
            }
        }
        match registry.row(&name).await? {
            Some(row) if !row.is_agent() && row.admits(principal) => Ok(Route {
                pool: row.pool_key().clone(),
                rows: Arc::from([row]),
                pinned: Some(name),
                agent: None,
            }),
            _ => Err(Error::UnknownLlm {
                name: model.to_owned(),
            }),
        }
    }
}

#[async_trait]
impl Router for PoolRouter {
    async fn route(
        &self,
        registry: &RegistryView,
        principal: &Principal,
        model: &str,
    ) -> Result<Route, Error> {
        let name = LlmName::parse(model)?;
        let pool = registry.pool(&name).await?;
        // An agent's row is the pool of one named after it.
        let agent = pool
            .as_ref()
            .and_then(|rows| rows.iter().find(|r| r.is_agent() && r.name == name));
        let Some(row) = agent else {
            return Self::llm_route(registry, principal, name, pool, model).await;
        };
        if !row.admits(principal) {
            return Err(Error::UnknownLlm {
                name: model.to_owned(),
            });
        }
        let (agent, status) = (row.name.clone(), row.status);
        let Some(persona) = row.agent.clone() else {
            return Err(Error::UnknownLlm {
                name: model.to_owned(),
            });
        };
        let llm = persona.llm.clone();
        let members = registry.pool(&llm).await?;
        let mut route = Self::llm_route(registry, principal, llm, members, model).await?;
        route.agent = Some(Arc::new(AgentRoute {
            name: agent,
            status,
            persona,
        }));
        Ok(route)
    }
}

/// The capacity an unlimited row counts with when loads are compared: above any
/// limit a row may declare, so a limited row at its limit is never preferred to it.
const UNLIMITED: u64 = MAX_CONCURRENT as u64 + 1;

/// How loaded a row is, as [`choose`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Tasks in flight on it.
    pub in_flight: u32,
    /// Its `maxConcurrent`; `None`: no limit.
    pub capacity: Option<u32>,
}

/// The most tasks in flight a [rank](Load::rank) tells apart (2²⁴ − 1); a row with
/// more ranks as if it had this many.
const RANKED_IN_FLIGHT: u32 = (1 << 24) - 1;

/// The rank of a row that is not a candidate: above every [`Load::rank`].
pub const UNRANKED: u64 = u64::MAX;

impl Load {
    /// Whether one more task fits.
    pub fn has_room(self) -> bool {
        self.capacity.is_none_or(|c| self.in_flight < c)
    }

    /// A key that orders loads as [`choose`] compares them: a lighter load has a
    /// smaller rank, equal loads (1/2 and 2/4) the same. It is in-flight / capacity
    /// in fixed point with 40 fractional bits, which is exact for capacities up to
    /// [`MAX_CONCURRENT`] (an unlimited row counts one above): two different such
    /// fractions differ by at least 1/10 001², far above 2⁻⁴⁰. In-flight counts above
    /// 2²⁴ − 1 rank as 2²⁴ − 1. Always below [`UNRANKED`].
    ///
    /// ```
    /// use virtual_llm_core::router::Load;
    ///
    /// let load = |in_flight, capacity| Load { in_flight, capacity: Some(capacity) };
    /// assert!(load(1, 3).rank() < load(1, 2).rank());
    /// assert_eq!(load(1, 2).rank(), load(2, 4).rank());
    /// assert!(load(0, 1).rank() < Load { in_flight: 1, capacity: None }.rank());
    /// ```
    pub fn rank(self) -> u64 {
        let cap = self.capacity.map_or(UNLIMITED, u64::from).max(1);
        (u64::from(self.in_flight.min(RANKED_IN_FLIGHT)) << 40) / cap
    }
}

/// Picks the row to send a task to: among the rows `load` returns `Some` for (the
/// candidates: serving, not cooling down) and that have room, the lowest in-flight /
/// capacity. The scan starts at `cursor` and wraps, and only a strictly lighter row
/// replaces the best so far, so equally loaded rows take turns when the caller moves
/// the cursor past each pick. `None` when no candidate has room. The scan stops at
/// the first idle candidate (nothing is lighter), so in a pool with idle rows a pick
/// costs less than a pass over the pool.
///
/// ```
/// use virtual_llm_core::router::{Load, choose};
///
/// let loads = [
///     Load { in_flight: 2, capacity: Some(4) },
///     Load { in_flight: 1, capacity: Some(4) },
///     Load { in_flight: 1, capacity: Some(4) },
/// ];
/// assert_eq!(choose(&loads, 0, |l| Some(*l)), Some(1));
/// assert_eq!(choose(&loads, 2, |l| Some(*l)), Some(2), "ties go round-robin");
/// assert_eq!(choose(&loads, 0, |_| None), None);
/// ```
pub fn choose<T>(members: &[T], cursor: usize, load: impl Fn(&T) -> Option<Load>) -> Option<usize> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = cursor % n;
    // The lightest candidate so far, with its in-flight and capacity: loads are
    // compared exactly, by cross-multiplying. It starts as "infinitely loaded" (1/0),
    // which any candidate with room is lighter than.
    let mut best = None;
    let (mut best_in, mut best_cap) = (1u64, 0u64);
    // Scans `slice`, the members from `base` on; `true` when an idle candidate was
    // found: nothing after it can be strictly lighter, so the scan may stop there.
    let mut scan = |base: usize, slice: &[T]| -> bool {
        for (j, m) in slice.iter().enumerate() {
            let Some(l) = load(m) else { continue };
            let (cap, room) = match l.capacity {
                Some(c) => (u64::from(c), l.in_flight < c),
                None => (UNLIMITED, true),
            };
            let in_flight = u64::from(l.in_flight);
            if room && in_flight * best_cap < best_in * cap {
                best = Some(base + j);
                (best_in, best_cap) = (in_flight, cap);
                if in_flight == 0 {
                    return true;
                }
            }
        }
        false
    };
    let (before, from) = members.split_at(start);
    if !scan(start, from) {
        scan(0, before);
    }
    best
}

/// [`choose`] over ranks kept up to date by the caller: `ranks[i]` is member `i`'s
/// [`Load::rank`] when it is a candidate with room, else [`UNRANKED`]. Picks the
/// same member [`choose`] would: the lowest rank, ties to the first from `cursor` on
/// (wrapping). A pass over plain integers, for large pools.
///
/// ```
/// use virtual_llm_core::router::{UNRANKED, choose_ranked};
///
/// let ranks = [7, 3, UNRANKED, 3];
/// assert_eq!(choose_ranked(&ranks, 0), Some(1));
/// assert_eq!(choose_ranked(&ranks, 2), Some(3), "ties go round-robin");
/// assert_eq!(choose_ranked(&[UNRANKED], 0), None);
/// ```
pub fn choose_ranked(ranks: &[u64], cursor: usize) -> Option<usize> {
    let lowest = ranks.iter().copied().min().filter(|r| *r != UNRANKED)?;
    let start = cursor % ranks.len();
    let (before, from) = ranks.split_at(start);
    match from.iter().position(|r| *r == lowest) {
        Some(j) => Some(start + j),
        None => before.iter().position(|r| *r == lowest),
    }
}
