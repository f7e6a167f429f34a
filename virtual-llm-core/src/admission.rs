//! Admission: between choosing a pool's row and sending it a task (SPEC §10 and §11).
//!
//! Every task holds a slot on its row from the moment it is sent to its one terminal
//! outcome; the slots are the in-flight counts, and a row never has more than its
//! `maxConcurrent`. When no row of the pool has a free slot, the request waits in the
//! pool's queue: bounded in depth and in time, fair between principals (they take
//! turns; one principal's requests are served in order), and woken by events (a slot
//! freeing, a row starting to serve), never by polling. A request that gives up while
//! it waits leaves the queue, and no task is ever sent for it.
//!
//! The [`Admission`] seam holds that state; [`LocalAdmission`] keeps it in this
//! process. A [`Slot`] is the holder's side: dropping it frees the slot.
//!
//! Across replicas (SPEC §14) a row's tasks are counted where its channel is: the
//! replica holding the channel takes a slot for every task sent to it, its own
//! clients' and other replicas', and refuses one past the row's capacity. It reports
//! its counts ([`RowLoad`], followed through [`Admission::follow_loads`]); the other
//! replicas take the larger of that report and their own count as the row's load
//! ([`Admission::heard`]), a view as stale as the report, and a report of slots freed
//! there hands them to the waiters here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::router::{Load, Route, UNRANKED, choose_ranked};
use crate::sync::lock;
use crate::{ChannelBinding, Config, Error, LlmId, LlmName, LlmRecord, UnavailableKind};

/// A request asking for a slot.
#[derive(Debug)]
pub struct Ask<'a> {
    /// Who asks: principals take turns in a queue.
    pub principal: &'a str,
    /// The rows that may answer, from the [`Router`](crate::Router).
    pub route: &'a Route,
    /// Rows already tried for this request (failover): never granted again.
    pub exclude: &'a [LlmName],
    /// How long the request may wait in the queue, at most.
    pub until: Instant,
    /// A row of the route is being woken (SPEC §12): wait for it in the queue even
    /// though no row serves yet, until `until`.
    pub waking: bool,
}

/// A slot on one row, granted by an [`Admission`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The row to send the task to.
    pub row: LlmName,
    /// Its pool.
    pub pool: LlmName,
}

/// How a dispatch went, for the row's cooldown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The row answered (an answer of its own, even an error status of the client's
    /// making).
    Answered,
    /// The dispatch failed in a way that sends the request to another row: the
    /// channel was closed or full, the upstream could not be reached, or it answered
    /// 502, 503 or 504.
    Failed,
}

/// A pool's load on this replica, for views and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLoad {
    /// Tasks in flight on its rows.
    pub in_flight: u32,
    /// The sum of its serving rows' capacities; `None` when one of them has no limit.
    pub capacity: Option<u32>,
    /// Requests waiting in its queue.
    pub queued: u32,
}

/// The tasks in flight on one row, as the replica holding its channel counts them
/// (SPEC §14): its own clients' and every other replica's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowLoad {
    /// The row's pool key.
    pub pool: LlmName,
    /// The row.
    pub row: LlmName,
    /// Its tasks in flight.
    pub in_flight: u32,
}

/// The rows whose in-flight count changed on this replica, as an admission marks
/// them once [followed](Admission::follow_loads): what a plane reports to the other
/// replicas. Marks are coalesced: a row that changed ten times since the last
/// [`take`](LoadChanges::take) is there once.
#[derive(Debug, Default)]
pub struct LoadChanges {
    on: AtomicBool,
    rows: Mutex<HashSet<(LlmName, LlmName)>>,
    notify: Notify,
}

impl LoadChanges {
    /// Marks `row` of `pool` as changed, if followed.
    fn mark(&self, pool: &LlmName, row: &LlmName) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let fresh = lock(&self.rows).insert((pool.clone(), row.clone()));
        if fresh {
            self.notify.notify_one();
        }
    }

    /// The rows marked since the last call, as `(pool, row)`; the marks are cleared.
    pub fn take(&self) -> Vec<(LlmName, LlmName)> {
        lock(&self.rows).drain().collect()
    }

    /// Waits until a row is marked (at once if one was since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// The in-flight counts and admission queues of a gateway.
///
/// # Contract
/// - [`admit`](Admission::admit) grants a slot on a row of the route that serves
///   ([`Route::serving`], or made serving since by [`observe`](Admission::observe)),
///   is admitted by the route ([`Route::admits`]), is not excluded, is not cooling
///   down and has room; it picks as [`choose`](crate::router::choose) does. Of what
///   the route and `observe` say of a row, the newer (by revision) counts. Taking the
///   slot and picking the row are one step: concurrent admits never put more tasks
///   on a row than its capacity. A row that started serving through a write the
///   admission was not told of (another replica's) may be left out of its choice
///   among rows with room for up to a second, never when the request would
///   otherwise wait or fail.
/// - With no such row but one that serves, the request waits in the pool's queue
///   until a slot is granted to it, or until `ask.until` (then
///   [`Error::QueueTimeout`]); with the queue at its depth it is refused at once
///   with [`Error::QueueFull`]. When no row of the route serves (or every one that
///   does is cooling down) it fails at once with [`Error::Unavailable`], and so do
///   the waiters of a pool whose last serving row stops serving.
/// - Waiters are granted slots as they free, principals taking turns (round-robin
///   across principals, first come first served within one), and only by events:
///   [`release`](Admission::release), and [`observe`](Admission::observe) of a row
///   that serves. A waiter whose `admit` future is dropped leaves the queue; a slot
///   granted to it as it left is released, never leaked.
/// - [`release`](Admission::release) frees a slot exactly once per grant; counts
///   never go below zero.
/// - [`report`](Admission::report): a row whose last `cooldown_after` dispatches
///   [failed](Outcome::Failed) is passed over for `cooldown`; an answer resets the
///   count, and so does the row being bound to a new channel (seen through a route
///   or [`observe`](Admission::observe)): the failures were the old channel's.
/// - Across replicas: [`heard`](Admission::heard) makes a row's load the larger of the
///   count heard and this replica's own until the report's expiry, for choosing, for
///   capacity and for queueing; a lower count heard hands the slots it frees to the
///   waiters, as a release does. [`follow_loads`](Admission::follow_loads) marks every
///   row whose count here changes, and [`count`](Admission::count) reads it.
///
/// The test kit's `admission_suite` (feature `testkit`) checks an implementation
/// against this contract.
#[async_trait]
pub trait Admission: fmt::Debug + Send + Sync + 'static {
    /// A slot for `ask`, waiting in the pool's queue while none is free.
    async fn admit(&self, ask: Ask<'_>) -> Result<Grant, Error>;

    /// A slot on `row` now, or an error: [`UnavailableKind::Saturated`] when it has no
    /// room. Never waits; for a caller that picked the row itself.
    fn try_admit(&self, row: &LlmRecord) -> Result<Grant, Error>;

    /// Frees the slot of `grant`; waiters may take it.
    fn release(&self, grant: &Grant);

    /// Fails every request waiting in `pool`'s queue with `error()` (a wake that
    /// failed), and ends the pool's wake. Returns how many there were.
    fn fail_waiters(&self, pool: &LlmName, error: &(dyn Fn() -> Error + Sync)) -> usize;

    /// How a dispatch on `grant`'s row went.
    fn report(&self, grant: &Grant, outcome: Outcome);

    /// The registry wrote `row`: whether it serves, its pool, its capacity. A row that
    /// starts serving wakes its pool's waiters.
    fn observe(&self, row: &LlmRecord);

    /// The registry deleted the row `name` whose id was `id`.
    fn forget(&self, name: &LlmName, id: &LlmId);

    /// Tasks in flight on `row`, as this replica sees them: its own, or what the
    /// replica holding the row's channel reported when that is more.
    fn in_flight(&self, row: &LlmRecord) -> u32;

    /// The load of `pool` as this replica sees it (in flight as
    /// [`in_flight`](Admission::in_flight) counts; queued here).
    fn load(&self, pool: &LlmName) -> PoolLoad;

    /// Follows the in-flight counts of this replica: from the first call on, every
    /// row whose count changes is marked in the [`LoadChanges`] returned (the same
    /// one on every call). `None` (the default): this admission does not tell.
    fn follow_loads(&self) -> Option<Arc<LoadChanges>> {
        None
    }

    /// The tasks in flight on `row` of `pool` counted here.
    fn count(&self, pool: &LlmName, row: &LlmName) -> u32 {
        let _ = (pool, row);
        0
    }

    /// The replica holding `load.row`'s channel counts `load.in_flight` tasks on it
    /// (this replica's among them), believed until `until`: see the contract. The
    /// default ignores it.
    fn heard(&self, load: &RowLoad, until: Instant) {
        let _ = (load, until);
    }
}

/// A granted slot, freed when dropped.
pub struct Slot {
    grant: Grant,
    admission: Arc<dyn Admission>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("grant", &self.grant).finish()
    }
}

impl Slot {
    /// Holds `grant` of `admission` until dropped.
    pub fn new(admission: Arc<dyn Admission>, grant: Grant) -> Self {
        Slot { grant, admission }
    }

    /// The grant held.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Tells the admission how the dispatch on this slot went.
    pub fn report(&self, outcome: Outcome) {
        self.admission.report(&self.grant, outcome);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release(&self.grant);
    }
}

/// The limits of a [`LocalAdmission`], from the [`Config`].
#[derive(Clone, Copy, Debug)]
struct Limits {
    depth: usize,
    cooldown_after: u32,
    cooldown: Duration,
    retry_after: Duration,
    longest_wait: Duration,
}

/// The [`Admission`] of one gateway process.
///
/// Each pool keeps its rows as [`observe`](Admission::observe) reports them, with
/// each row's rank ([`Load::rank`]) kept up to date, so that a pick is a pass over
/// integers ([`choose_ranked`]) rather than over the route's rows. The row picked is
/// checked against its copy in the route (a newer copy counts, and the pick is made
/// again); the whole route is merged when the pool first sees one, when its length
/// changes, at most a second after the last merge, and before a request would wait
/// or fail.
#[derive(Clone)]
pub struct LocalAdmission {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    state: Mutex<State>,
    /// The rows whose count changed, once followed.
    changes: Arc<LoadChanges>,
}

#[derive(Debug, Default)]
struct State {
    pools: HashMap<LlmName, Pool>,
    /// The pool each row's member lives in, so an event on a row finds it at once.
    homes: HashMap<LlmName, LlmName>,
}

impl State {
    /// Removes `key`'s pool if it holds nothing, and the home of a row pruned from it.
    fn tidy(&mut self, key: &LlmName, row: &LlmName) {
        let Some(pool) = self.pools.get(key) else {
            return;
        };
        if !pool.index.contains_key(row) && self.homes.get(row) == Some(key) {
            self.homes.remove(row);
        }
        if pool.is_idle() {
            self.pools.remove(key);
        }
    }
}

impl fmt::Debug for LocalAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAdmission")
            .field("pools", &lock(&self.inner.state).pools.len())
            .finish()
    }
}

impl LocalAdmission {
    /// Queues bounded by `config`'s `queue_depth`; cooldowns by `cooldown_after` and
    /// `cooldown`; `Retry-After` estimates fall back to `retry_after`.
    pub fn new(config: &Config) -> Self {
        LocalAdmission {
            inner: Arc::new(Inner {
                limits: Limits {
                    depth: config.queue_depth,
                    cooldown_after: config.cooldown_after.max(1),
                    cooldown: config.cooldown,
                    retry_after: config.retry_after,
                    longest_wait: config.queue_wait,
                },
                state: Mutex::new(State::default()),
                changes: Arc::new(LoadChanges::default()),
            }),
        }
    }
}

/// One row's share of a pool.
#[derive(Debug)]
struct Member {
    name: LlmName,
    /// The row's id: a row deleted and published again is a new member.
    id: LlmId,
    in_flight: u32,
    /// The tasks the replica holding the row's channel counts on it (this replica's
    /// among them), as it last reported, while the report holds.
    reported: u32,
    reported_until: Option<Instant>,
    capacity: Option<u32>,
    serving: bool,
    /// The revision the state above was read at: an older snapshot never overrides
    /// a newer one.
    revision: u64,
    failures: u32,
    /// The channel the row was bound to when last seen: failures and a cooldown
    /// belong to that channel, and end when the row is bound anew (its publisher
    /// moved to another replica, say).
    binding: Option<ChannelBinding>,
    cool_until: Option<Instant>,
    /// Where the row sat in the last whole route merged, to find its copy in the
    /// next route without a search.
    at: usize,
}

impl Member {
    /// Its load: this replica's tasks, or the holder's count when that is larger.
    fn load(&self) -> Load {
        Load {
            in_flight: self.in_flight.max(self.reported),
            capacity: self.capacity,
        }
    }

    /// One more task here. While a holder's report holds, it counts there too from
    /// now on (the holder will count it): the view stays an upper bound between two
    /// reports.
    fn add_task(&mut self) {
        self.in_flight += 1;
        if self.reported_until.is_some() {
            self.reported = self.reported.saturating_add(1);
        }
    }

    /// One task less here; the holder counts it out as well.
    fn end_task(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.reported_until.is_some() {
            self.reported = self.reported.saturating_sub(1);
        }
    }

    /// Forgets a report that no longer holds.
    fn expire_report(&mut self, now: Instant) {
        if self.reported_until.is_some_and(|t| t <= now) {
            self.reported = 0;
            self.reported_until = None;
        }
    }

    fn cooling(&self, now: Instant) -> bool {
        self.cool_until.is_some_and(|t| now < t)
    }

    /// Its [rank](Load::rank) as a candidate, or [`UNRANKED`] when it is not one:
    /// not serving, cooling down (until [`Pool::expire`] ends the cooldown), or full.
    fn rank(&self) -> u64 {
        let load = self.load();
        if self.serving && self.cool_until.is_none() && load.has_room() {
            load.rank()
        } else {
            UNRANKED
        }
    }
}

/// A request waiting for a slot.
#[derive(Debug)]
struct Waiter {
    principal: Arc<str>,
    pinned: Option<LlmName>,
    exclude: Vec<LlmName>,
    grant: oneshot::Sender<Verdict>,
}

/// What a waiter is told: the row granted, or why it waits no more.
type Verdict = Result<LlmName, Error>;

impl Waiter {
    fn takes(&self, row: &LlmName) -> bool {
        self.pinned.as_ref().is_none_or(|p| p == row) && !self.exclude.contains(row)
    }
}

/// A pool's queue: principals take turns, each one's requests in order.
#[derive(Debug, Default)]
struct Queue {
    waiters: HashMap<u64, Waiter>,
    /// Principals with waiters, the next to be served first.
    turns: VecDeque<Arc<str>>,
    /// Each principal's waiters, oldest first.
    lines: HashMap<Arc<str>, VecDeque<u64>>,
    next_id: u64,
}

impl Queue {
    fn len(&self) -> usize {
        self.waiters.len()
    }

    fn push(&mut self, waiter: Waiter) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let principal = waiter.principal.clone();
        let line = self.lines.entry(principal.clone()).or_default();
        if line.is_empty() {
            self.turns.push_back(principal);
        }
        line.push_back(id);
        self.waiters.insert(id, waiter);
        id
    }

    /// Removes a waiter that gives up; `None` if it was granted already.
    fn remove(&mut self, id: u64) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        if let Some(line) = self.lines.get_mut(&waiter.principal) {
            line.retain(|w| *w != id);
            if line.is_empty() {
                self.lines.remove(&waiter.principal);
                self.turns.retain(|p| *p != waiter.principal);
            }
        }
        Some(waiter)
    }

    /// The next waiter that may take a slot on `row`: the principals in turn, the
    /// oldest request of each. The principal served goes to the back of the turns.
    fn next_for(&mut self, row: &LlmName) -> Option<Waiter> {
        let (turn, id) = self.turns.iter().enumerate().find_map(|(turn, p)| {
            let line = self.lines.get(p)?;
            let id = line
                .iter()
                .find(|id| self.waiters.get(id).is_some_and(|w| w.takes(row)))?;
            Some((turn, *id))
        })?;
        let waiter = self.waiters.remove(&id)?;
        let principal = self.turns.remove(turn)?;
        if let Some(line) = self.lines.get_mut(&principal) {
            line.retain(|w| *w != id);
            if line.is_empty() {
                self.lines.remove(&principal);
            } else {
                self.turns.push_back(principal);
            }
        }
        Some(waiter)
    }

    /// Every waiter, in no particular order; the queue is left empty.
    fn drain(&mut self) -> Vec<Waiter> {
        self.turns.clear();
        self.lines.clear();
        self.waiters.drain().map(|(_, w)| w).collect()
    }
}

/// How fast a pool has been freeing slots: the mean time between two releases,
/// smoothed (an exponentially weighted moving average).
#[derive(Debug, Default)]
struct Pace {
    last: Option<Instant>,
    gap: Option<Duration>,
}

impl Pace {
    fn record(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last);
            self.gap = Some(match self.gap {
                None => gap,
                Some(mean) => mean.mul_f64(0.8) + gap.mul_f64(0.2),
            });
        }
        self.last = Some(now);
    }

    /// How long until `ahead` more slots have freed, at the recent pace: at least a
    /// second, at most `longest`; `fallback` before the pool has freed two slots.
    fn estimate(&self, ahead: usize, fallback: Duration, longest: Duration) -> Duration {
        let Some(gap) = self.gap else {
            return fallback;
        };
        let ahead = u32::try_from(ahead.saturating_add(1)).unwrap_or(u32::MAX);
        gap.saturating_mul(ahead)
            .clamp(Duration::from_secs(1), longest.max(Duration::from_secs(1)))
    }
}

/// How long a pool goes at most without merging a whole route into what it holds.
/// Between merges, a request's route is read only for the row picked; the registry
/// writes of this process reach the pool at once through `observe`, and a merge
/// brings those of other replicas.
const MERGE_EVERY: Duration = Duration::from_secs(1);

/// One pool's rows, turn and queue.
#[derive(Debug, Default)]
struct Pool {
    members: Vec<Member>,
    /// Each member's rank as a candidate, kept with the member: a pick reads only
    /// these ([`choose_ranked`]), so that it costs little in a large pool.
    ranks: Vec<u64>,
    index: HashMap<LlmName, usize>,
    cursor: usize,
    queue: Queue,
    pace: Pace,
    /// When a whole route of the pool was last merged, and how many rows it had: a
    /// route of another length, or a merge older than [`MERGE_EVERY`], is merged
    /// before a pick.
    merged: Option<(Instant, usize)>,
    /// Until when requests wait for a row of the pool being woken: its waiters are
    /// not failed for want of a serving row before.
    waking_until: Option<Instant>,
    /// The earliest end of a member's cooldown, when one cools down.
    cool_ends: Option<Instant>,
}

impl Pool {
    /// Applies `change` to the member `name`, and ranks it again.
    fn update<R>(&mut self, name: &LlmName, change: impl FnOnce(&mut Member) -> R) -> Option<R> {
        let i = *self.index.get(name)?;
        Some(self.update_at(i, change))
    }

    /// Applies `change` to member `i`, and ranks it again.
    fn update_at<R>(&mut self, i: usize, change: impl FnOnce(&mut Member) -> R) -> R {
        let m = &mut self.members[i];
        let out = change(m);
        self.ranks[i] = m.rank();
        if let Some(end) = m.cool_until {
            self.cool_ends = Some(self.cool_ends.map_or(end, |e| e.min(end)));
        }
        out
    }

    /// Ends the cooldowns that are over by `now`: those members are candidates again.
    fn expire(&mut self, now: Instant) {
        if self.cool_ends.is_none_or(|end| now < end) {
            return;
        }
        self.cool_ends = None;
        for i in 0..self.members.len() {
            if self.members[i].cool_until.is_some() {
                self.update_at(i, |m| {
                    if !m.cooling(now) {
                        m.cool_until = None;
                    }
                });
            }
        }
    }

    /// Records what the registry says of `row`, unless what we hold is newer; returns
    /// the row's member.
    fn see(&mut self, row: &LlmRecord) -> usize {
        let serving = Route::serving(row);
        let now = Instant::now();
        if let Some(&i) = self.index.get(&row.name) {
            self.update_at(i, |m| {
                m.expire_report(now);
                if m.id != row.id || m.revision <= row.revision {
                    if m.binding != row.binding {
                        if row.binding.is_some() {
                            // A new channel: what failed was the old one.
                            m.failures = 0;
                            m.cool_until = None;
                        }
                        m.binding.clone_from(&row.binding);
                    }
                    m.id.clone_from(&row.id);
                    m.serving = serving;
                    m.capacity = row.max_concurrent;
                    m.revision = row.revision;
                }
            });
            return i;
        }
        let i = self.members.len();
        self.index.insert(row.name.clone(), i);
        let member = Member {
            name: row.name.clone(),
            id: row.id.clone(),
            in_flight: 0,
            reported: 0,
            reported_until: None,
            capacity: row.max_concurrent,
            serving,
            revision: row.revision,
            failures: 0,
            binding: row.binding.clone(),
            cool_until: None,
            at: 0,
        };
        self.ranks.push(member.rank());
        self.members.push(member);
        i
    }

    /// Whether `route` must be merged before a pick: a pinned route always (it has
    /// one row), a whole one when the pool never merged one, when its length changed
    /// (rows came or went), or after [`MERGE_EVERY`].
    fn needs_merge(&self, route: &Route, now: Instant) -> bool {
        route.pinned.is_some()
            || self.merged.is_none_or(|(at, len)| {
                len != route.rows.len() || now.saturating_duration_since(at) >= MERGE_EVERY
            })
    }

    /// Records every row of `route` (see [`Pool::see`]), and where each sits in it.
    fn merge(&mut self, route: &Route, now: Instant) {
        for (at, row) in route.rows.iter().enumerate() {
            let i = self.see(row);
            if route.pinned.is_none() {
                self.members[i].at = at;
            }
        }
        if route.pinned.is_none() {
            self.merged = Some((now, route.rows.len()));
        }
    }

    /// The candidate a request gets, as [`choose`](crate::router::choose) picks it:
    /// serving, not cooling down, admitted by the route, not excluded, with room, the
    /// lightest, ties in turn. Takes nothing.
    fn pick(&mut self, now: Instant, route: &Route, exclude: &[LlmName]) -> Option<usize> {
        self.expire(now);
        if let Some(pinned) = &route.pinned {
            let i = *self.index.get(pinned)?;
            return (self.ranks[i] != UNRANKED && !exclude.contains(pinned)).then_some(i);
        }
        let excluded: Vec<usize> = exclude
            .iter()
            .filter_map(|name| self.index.get(name).copied())
            .collect();
        for &i in &excluded {
            self.ranks[i] = UNRANKED;
        }
        let picked = choose_ranked(&self.ranks, self.cursor);
        for &i in &excluded {
            self.ranks[i] = self.members[i].rank();
        }
        picked
    }

    /// The copy of member `i` in `route`, if it is newer than what the pool holds.
    fn newer_in<'r>(&self, i: usize, route: &'r Route) -> Option<&'r LlmRecord> {
        let m = &self.members[i];
        let row = route
            .rows
            .get(m.at)
            .filter(|r| r.name == m.name)
            .or_else(|| route.rows.iter().find(|r| r.name == m.name))?;
        (row.id != m.id || row.revision > m.revision).then_some(row)
    }

    /// Takes a slot on member `i`; the next pick starts after it.
    fn take(&mut self, i: usize) -> LlmName {
        self.cursor = i + 1;
        self.update_at(i, |m| {
            m.add_task();
            m.name.clone()
        })
    }

    /// Drops a member with nothing in flight that does not serve: a pool keeps
    /// state only for rows that can take tasks or still hold some.
    fn prune(&mut self, name: &LlmName) {
        let Some(&i) = self.index.get(name) else {
            return;
        };
        let m = &self.members[i];
        if m.serving || m.in_flight > 0 || m.reported_until.is_some() {
            return;
        }
        self.index.remove(name);
        self.members.swap_remove(i);
        self.ranks.swap_remove(i);
        if let Some(moved) = self.members.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
    }

    /// Hands free slots of `row` to waiters, while it has room and they take it;
    /// returns whether it granted any.
    fn hand_over(&mut self, row: &LlmName, now: Instant) -> bool {
        let mut granted = false;
        loop {
            let Some(&i) = self.index.get(row) else {
                return granted;
            };
            let m = &self.members[i];
            if !m.serving || m.cooling(now) || !m.load().has_room() {
                return granted;
            }
            let Some(waiter) = self.queue.next_for(row) else {
                return granted;
            };
            if waiter.grant.send(Ok(row.clone())).is_ok() {
                self.update_at(i, Member::add_task);
                granted = true;
            }
        }
    }

    /// When no member serves any more, the waiters fail at once: dropping their
    /// senders wakes them with nothing granted.
    fn fail_waiters_if_dead(&mut self) {
        let waking = self.waking_until.is_some_and(|t| Instant::now() < t);
        if !waking && !self.members.iter().any(|m| m.serving) {
            drop(self.queue.drain());
        }
    }

    fn is_idle(&self) -> bool {
        self.members.is_empty() && self.queue.len() == 0
    }
}

impl Inner {
    fn release(&self, grant: &Grant) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let Some(pool) = state.pools.get_mut(&grant.pool) else {
            return;
        };
        if pool.update(&grant.row, Member::end_task).is_none() {
            return;
        }
        pool.pace.record(now);
        pool.hand_over(&grant.row, now);
        pool.prune(&grant.row);
        state.tidy(&grant.pool, &grant.row);
        drop(state);
        self.changes.mark(&grant.pool, &grant.row);
    }

    /// A waiter gives up (its wait ran out, or its future was dropped): out of the
    /// queue if it is still there. Decided under the lock that grants are sent under,
    /// so a grant that raced the give-up is seen, never lost: the caller gets the row.
    fn withdraw(
        &self,
        pool_key: &LlmName,
        id: u64,
        rx: &mut oneshot::Receiver<Verdict>,
    ) -> Withdrawn {
        let mut state = lock(&self.state);
        if let Some(pool) = state.pools.get_mut(pool_key)
            && pool.queue.remove(id).is_some()
        {
            if pool.is_idle() {
                state.pools.remove(pool_key);
            }
            return Withdrawn::Left;
        }
        // Out of the queue already: granted a row, or failed with its pool, before
        // this lock was taken.
        match rx.try_recv() {
            Ok(Ok(row)) => Withdrawn::Granted(row),
            Ok(Err(e)) => Withdrawn::FailedWith(e),
            Err(_) => Withdrawn::Failed,
        }
    }

    fn unavailable(
        &self,
        pool: &Pool,
        key: &LlmName,
        now: Instant,
        admits: impl Fn(&LlmName) -> bool,
    ) -> Error {
        let cooling = pool
            .members
            .iter()
            .filter(|m| m.serving && admits(&m.name))
            .filter_map(|m| m.cool_until.filter(|t| now < *t))
            .min();
        match cooling {
            Some(until) => Error::unavailable(
                UnavailableKind::Saturated,
                format!(
                    "every member of {key} failed its last requests and is passed over for now"
                ),
                until
                    .saturating_duration_since(now)
                    .max(Duration::from_secs(1)),
            ),
            None => self.offline(key),
        }
    }

    fn offline(&self, key: &LlmName) -> Error {
        Error::unavailable(
            UnavailableKind::Offline,
            format!("no member of {key} can take requests now"),
            self.limits.retry_after,
        )
    }
}

/// Records `route`'s rows as living in the pool `key`, so that an event on one finds
/// its pool; allocates only for a row that moved.
fn settle_homes(homes: &mut HashMap<LlmName, LlmName>, key: &LlmName, route: &Route) {
    for row in route.rows.iter() {
        if homes.get(&row.name) != Some(key) {
            homes.insert(row.name.clone(), key.clone());
        }
    }
}

/// Leaves the queue when dropped before its grant was taken.
struct Waiting {
    inner: Arc<Inner>,
    pool: LlmName,
    id: u64,
    rx: oneshot::Receiver<Verdict>,
    /// Set once the wait has an outcome: nothing is left to undo.
    done: bool,
}

/// What a waiter that gives up was left with.
enum Withdrawn {
    /// It was still queued, and left the queue.
    Left,
    /// A slot on this row was granted to it as it gave up.
    Granted(LlmName),
    /// Its pool stopped serving: nothing was granted.
    Failed,
    /// It was failed with this error (a wake that failed).
    FailedWith(Error),
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done {
            if let Withdrawn::Granted(row) = self.inner.withdraw(&self.pool, self.id, &mut self.rx)
            {
                self.inner.release(&Grant {
                    row,
                    pool: self.pool.clone(),
                });
            }
            crate::metrics::queue_rejected("left");
        }
    }
}

#[async_trait]
impl Admission for LocalAdmission {
    async fn admit(&self, ask: Ask<'_>) -> Result<Grant, Error> {
        let route = ask.route;
        let key = &route.pool;
        let admits = |row: &LlmName| route.admits(row) && !ask.exclude.contains(row);
        let now = Instant::now();
        let limits = self.inner.limits;
        let (id, rx, depth) = {
            let mut state = lock(&self.inner.state);
            let state = &mut *state;
            let pool = state.pools.entry(key.clone()).or_default();
            let mut merged = pool.needs_merge(route, now);
            if merged {
                pool.merge(route, now);
                settle_homes(&mut state.homes, key, route);
            }
            loop {
                if let Some(i) = pool.pick(now, route, ask.exclude) {
                    // What the route says of the row picked is newer: pick again.
                    if let Some(row) = pool.newer_in(i, route) {
                        pool.see(row);
                        continue;
                    }
                    let row = pool.take(i);
                    self.inner.changes.mark(key, &row);
                    return Ok(Grant {
                        row,
                        pool: key.clone(),
                    });
                }
                // Nothing free as far as the pool knows: learn the whole route (rows
                // other replicas bound) before making the request wait or fail.
                if merged {
                    break;
                }
                pool.merge(route, now);
                settle_homes(&mut state.homes, key, route);
                merged = true;
            }
            let able = pool
                .members
                .iter()
                .any(|m| m.serving && !m.cooling(now) && admits(&m.name));
            if ask.waking {
                pool.waking_until = pool.waking_until.max(Some(ask.until));
            }
            if !able && !ask.waking {
                let err = self.inner.unavailable(pool, key, now, admits);
                for row in route.rows.iter() {
                    if let Some(pool) = state.pools.get_mut(key) {
                        pool.prune(&row.name);
                    }
                    state.tidy(key, &row.name);
                }
                return Err(err);
            }
            let depth = pool.queue.len();
            if depth >= limits.depth {
                crate::metrics::queue_rejected("queue_full");
                return Err(Error::QueueFull {
                    pool: key.to_string(),
                    depth,
                    retry_after: pool
                        .pace
                        .estimate(depth, limits.retry_after, limits.longest_wait),
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = pool.queue.push(Waiter {
                principal: Arc::from(ask.principal),
                pinned: route.pinned.clone(),
                exclude: ask.exclude.to_vec(),
                grant: tx,
            });
            (id, rx, depth)
        };
        let mut waiting = Waiting {
            inner: self.inner.clone(),
            pool: key.clone(),
            id,
            rx,
            done: false,
        };
        let outcome = tokio::time::timeout_at(ask.until, &mut waiting.rx).await;
        waiting.done = true;
        let waited = now.elapsed();
        let granted = match outcome {
            Ok(Ok(Ok(row))) => row,
            // The wake it waited for failed.
            Ok(Ok(Err(e))) => return Err(e),
            // The pool's last serving row went away; nothing was granted.
            Ok(Err(_)) => return Err(self.inner.offline(key)),
            Err(_elapsed) => match self.inner.withdraw(key, id, &mut waiting.rx) {
                // Granted just as the wait ran out: the slot is ours.
                Withdrawn::Granted(row) => row,
                Withdrawn::Failed => return Err(self.inner.offline(key)),
                Withdrawn::FailedWith(e) => return Err(e),
                Withdrawn::Left => {
                    crate::metrics::queue_rejected("queue_timeout");
                    let pace = lock(&self.inner.state).pools.get(key).map(|p| {
                        p.pace
                            .estimate(depth, limits.retry_after, limits.longest_wait)
                    });
                    return Err(Error::QueueTimeout {
                        pool: key.to_string(),
                        waited,
                        retry_after: pace.unwrap_or(limits.retry_after),
                    });
                }
            },
        };
        crate::metrics::queue_waited(waited);
        Ok(Grant {
            row: granted,
            pool: key.clone(),
        })
    }

    fn try_admit(&self, row: &LlmRecord) -> Result<Grant, Error> {
        let key = row.pool_key();
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        let pool = state.pools.entry(key.clone()).or_default();
        let i = pool.see(row);
        pool.expire(now);
        let taken = (pool.ranks[i] != UNRANKED).then(|| pool.take(i));
        pool.prune(&row.name);
        state.homes.insert(row.name.clone(), key.clone());
        state.tidy(key, &row.name);
        drop(state);
        match taken {
            Some(name) => {
                self.inner.changes.mark(key, &name);
                Ok(Grant {
                    row: name,
                    pool: key.clone(),
                })
            }
            None => Err(Error::unavailable(
                UnavailableKind::Saturated,
                format!("llm {} has no free slot", row.name),
                self.inner.limits.retry_after,
            )),
        }
    }

    fn release(&self, grant: &Grant) {
        self.inner.release(grant);
    }

    fn fail_waiters(&self, pool: &LlmName, error: &(dyn Fn() -> Error + Sync)) -> usize {
        let mut state = lock(&self.inner.state);
        let Some(p) = state.pools.get_mut(pool) else {
            return 0;
        };
        p.waking_until = None;
        let waiters = p.queue.drain();
        let failed = waiters.len();
        for waiter in waiters {
            // A waiter that left already has nothing to be told.
            let _ = waiter.grant.send(Err(error()));
        }
        if p.is_idle() {
            state.pools.remove(pool);
        }
        failed
    }

    fn report(&self, grant: &Grant, outcome: Outcome) {
        let limits = self.inner.limits;
        let mut state = lock(&self.inner.state);
        let Some(pool) = state.pools.get_mut(&grant.pool) else {
            return;
        };
        let cooled = pool.update(&grant.row, |m| match outcome {
            Outcome::Answered => {
                m.failures = 0;
                false
            }
            Outcome::Failed => {
                m.failures += 1;
                let cool = m.failures >= limits.cooldown_after;
                if cool {
                    m.failures = 0;
                    m.cool_until = Some(Instant::now() + limits.cooldown);
                }
                cool
            }
        });
        if cooled == Some(true) {
            crate::metrics::cooled_down();
            tracing::info!(llm = %grant.row, pool = %grant.pool, "failing row passed over for a while");
        }
    }

    fn observe(&self, row: &LlmRecord) {
        let now = Instant::now();
        let key = row.pool_key();
        let serving = Route::serving(row);
        let mut state = lock(&self.inner.state);
        let state = &mut *state;
        // A row that moved to another pool stops serving in its old one.
        if let Some(old) = state.homes.get(&row.name).filter(|k| *k != key).cloned() {
            if let Some(pool) = state.pools.get_mut(&old)
                && pool.update(&row.name, |m| m.serving = false).is_some()
            {
                pool.prune(&row.name);
                pool.fail_waiters_if_dead();
            }
            state.homes.remove(&row.name);
            state.tidy(&old, &row.name);
        }
        if !serving && !state.pools.contains_key(key) {
            return;
        }
        let pool = state.pools.entry(key.clone()).or_default();
        pool.see(row);
        if serving {
            if pool.hand_over(&row.name, now) {
                self.inner.changes.mark(key, &row.name);
            }
        } else {
            pool.prune(&row.name);
            pool.fail_waiters_if_dead();
        }
        state.homes.insert(row.name.clone(), key.clone());
        state.tidy(key, &row.name);
    }

    fn forget(&self, name: &LlmName, id: &LlmId) {
        let mut state = lock(&self.inner.state);
        let Some(key) = state.homes.get(name).cloned() else {
            return;
        };
        if let Some(pool) = state.pools.get_mut(&key)
            && pool
                .update(name, |m| {
                    let same = m.id == *id;
                    if same {
                        m.serving = false;
                    }
                    same
                })
                .unwrap_or(false)
        {
            pool.prune(name);
            pool.fail_waiters_if_dead();
        }
        state.tidy(&key, name);
    }

    fn in_flight(&self, row: &LlmRecord) -> u32 {
        lock(&self.inner.state)
            .pools
            .get(row.pool_key())
            .and_then(|p| {
                p.index
                    .get(&row.name)
                    .map(|i| p.members[*i].load().in_flight)
            })
            .unwrap_or(0)
    }

    fn follow_loads(&self) -> Option<Arc<LoadChanges>> {
        self.inner.changes.on.store(true, Ordering::Relaxed);
        Some(self.inner.changes.clone())
    }

    fn count(&self, pool: &LlmName, row: &LlmName) -> u32 {
        lock(&self.inner.state)
            .pools
            .get(pool)
            .and_then(|p| p.index.get(row).map(|i| p.members[*i].in_flight))
            .unwrap_or(0)
    }

    fn heard(&self, load: &RowLoad, until: Instant) {
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        // A pool nobody asked for here has no waiters: its first route brings
        // the row, and the holder reports again.
        let Some(pool) = state.pools.get_mut(&load.pool) else {
            return;
        };
        let lower = pool.update(&load.row, |m| {
            let before = m.load().in_flight;
            m.reported = load.in_flight;
            m.reported_until = Some(until);
            m.load().in_flight < before
        });
        if lower == Some(true) && pool.hand_over(&load.row, now) {
            drop(state);
            self.inner.changes.mark(&load.pool, &load.row);
        }
    }

    fn load(&self, pool: &LlmName) -> PoolLoad {
        let state = lock(&self.inner.state);
        let Some(p) = state.pools.get(pool) else {
            return PoolLoad::default();
        };
        PoolLoad {
            in_flight: p.members.iter().map(|m| m.load().in_flight).sum(),
            capacity: p
                .members
                .iter()
                .filter(|m| m.serving)
                .map(|m| m.capacity)
                .sum(),
            queued: u32::try_from(p.queue.len()).unwrap_or(u32::MAX),
        }
    }
}
