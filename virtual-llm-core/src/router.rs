//! The router: which rows may answer a request, and which of them takes it.
//!
//! It is the one place a request's row is chosen, in two steps. The [`Router`] seam
//! resolves the client's `model` into a [`Route`]: the rows of a pool (SPEC §10), or
//! the one member a client pinned by its own name. Then [`choose`] picks among the
//! route's rows that can take a task now (active, with a channel, not cooling down,
//! with a free slot): the lowest in-flight / capacity, ties broken round-robin. The
//! [`Admission`](crate::Admission) calls [`choose`] under its lock, so picking a row
//! and taking its slot are one step; it queues the request when nothing is free.

use std::fmt;

use async_trait::async_trait;

use crate::protocol::MAX_CONCURRENT;
use crate::{Error, LlmKind, LlmName, LlmRecord, LlmStatus, Principal, Store};

/// What a client's `model` resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The pool the request is for: its queue, its round-robin turn.
    pub pool: LlmName,
    /// The rows that may answer, in any status: every member of the pool, or the one
    /// member named. The admission decides which can take a task now.
    pub rows: Vec<LlmRecord>,
    /// Set when the model named one member by its own name rather than a pool: only
    /// that row may answer.
    pub pinned: Option<LlmName>,
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
/// - It reads the registry through `store` and never writes it.
///
/// The test kit's `router_suite` (feature `testkit`) checks an implementation against
/// this contract.
#[async_trait]
pub trait Router: fmt::Debug + Send + Sync + 'static {
    /// The rows that may answer `principal`'s request for `model`.
    async fn route(
        &self,
        store: &dyn Store,
        principal: &Principal,
        model: &str,
    ) -> Result<Route, Error>;
}

/// The router of SPEC §10: a pool key names its pool (a row without a pool is the
/// pool of one named after it); any other row name pins that member.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolRouter;

#[async_trait]
impl Router for PoolRouter {
    async fn route(
        &self,
        store: &dyn Store,
        _principal: &Principal,
        model: &str,
    ) -> Result<Route, Error> {
        let name = LlmName::parse(model)?;
        let rows = store.by_pool(&name).await?;
        if !rows.is_empty() {
            return Ok(Route {
                pool: name,
                rows,
                pinned: None,
            });
        }
        match store.get(&name).await? {
            Some(row) => Ok(Route {
                pool: row.pool_key().clone(),
                rows: vec![row],
                pinned: Some(name),
            }),
            None => Err(Error::UnknownLlm {
                name: model.to_owned(),
            }),
        }
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

impl Load {
    /// Whether one more task fits.
    pub fn has_room(self) -> bool {
        self.capacity.is_none_or(|c| self.in_flight < c)
    }

    /// Whether `self` is strictly less loaded than `other`, by in-flight / capacity
    /// (compared exactly, by cross-multiplying).
    fn lighter_than(self, other: Load) -> bool {
        let cap = |l: Load| l.capacity.map_or(UNLIMITED, u64::from);
        u64::from(self.in_flight) * cap(other) < u64::from(other.in_flight) * cap(self)
    }
}

/// Picks the row to send a task to: among the rows `load` returns `Some` for (the
/// candidates: serving, not cooling down) and that have room, the lowest in-flight /
/// capacity. The scan starts at `cursor` and wraps, and only a strictly lighter row
/// replaces the best so far, so equally loaded rows take turns when the caller moves
/// the cursor past each pick. `None` when no candidate has room.
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
    let mut best: Option<(usize, Load)> = None;
    for i in (start..n).chain(0..start) {
        let Some(l) = load(&members[i]) else { continue };
        if !l.has_room() {
            continue;
        }
        match best {
            Some((_, b)) if !l.lighter_than(b) => {}
            _ => best = Some((i, l)),
        }
    }
    best.map(|(i, _)| i)
}
