//! The admission conformance suite: one function per rule of the [`Admission`]
//! contract.
//!
//! Each function takes `setup`, which builds a fresh admission from a [`Config`] (a
//! case sets the queue depth or the cooldown it needs), and drives it with rows built
//! here: active, bound to a channel, in a pool, with a capacity. Waiting requests are
//! spawned tasks, so a grant must wake them.
//!
//! The cases expect tokio's clock paused (`#[tokio::test(start_paused = true)]`, which
//! needs tokio's `test-util` feature in the test crate): a case moves time with
//! `tokio::time::sleep`, which a paused runtime completes at once by advancing the
//! clock, so nothing waits for real time, and a grant that never comes fails the case
//! when its far deadline passes instead of hanging it. Run them all with
//! [`admission_conformance_tests!`](crate::admission_conformance_tests), which does
//! that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admission::{Ask, Grant, Outcome, PoolLoad};
use crate::router::Route;
use crate::testkit::record;
use crate::{
    Admission, ChannelBinding, Config, Error, LlmName, LlmRecord, LlmStatus, ReplicaId, Slot,
    UnavailableKind,
};

/// Builds the admission under test from a configuration.
pub type Setup<'a> = &'a (dyn Fn(&Config) -> Arc<dyn Admission> + Sync);

/// How many times the helpers yield to the runtime, at most, waiting for spawned
/// requests to reach a state.
const PATIENCE: usize = 1_000;

fn name(s: &str) -> LlmName {
    LlmName::parse(s).expect("test names are valid")
}

/// A row of `pool` that serves (active, bound to a channel) with room for `capacity`
/// tasks (`None`: no limit).
pub fn member(row: &str, pool: &str, capacity: Option<u32>) -> LlmRecord {
    let mut r = record(row);
    r.pool = Some(name(pool));
    r.max_concurrent = capacity;
    r.binding = Some(ChannelBinding {
        replica: ReplicaId::generate(),
        epoch: 1,
    });
    r.revision = 1;
    assert!(Route::serving(&r), "a member built to serve serves");
    r
}

/// `row` as the registry writes it when its channel goes away: inactive, unbound, at
/// the next revision.
fn stopped(row: &LlmRecord) -> LlmRecord {
    let mut r = row.clone();
    r.status = LlmStatus::Inactive;
    r.binding = None;
    r.revision += 1;
    r
}

/// `row` bound to a channel again, at the next revision.
fn started(row: &LlmRecord) -> LlmRecord {
    let mut r = row.clone();
    r.status = LlmStatus::Active;
    r.binding = Some(ChannelBinding {
        replica: ReplicaId::generate(),
        epoch: 2,
    });
    r.revision += 1;
    r
}

/// Every row of `pool`.
fn route(pool: &str, rows: &[LlmRecord]) -> Route {
    Route {
        agent: None,
        pool: name(pool),
        rows: rows.into(),
        pinned: None,
    }
}

/// A deadline no test reaches.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// What `admit` answers without waiting; panics if it would wait.
async fn admit_now(
    adm: &Arc<dyn Admission>,
    principal: &str,
    route: &Route,
    exclude: &[LlmName],
) -> Result<Grant, Error> {
    try_admit_now(adm, principal, route, exclude)
        .await
        .expect("admit answers at once here, without waiting")
}

/// What `admit` answers without waiting, or `None` if it would wait (the request is
/// then dropped, and leaves the queue).
async fn try_admit_now(
    adm: &Arc<dyn Admission>,
    principal: &str,
    route: &Route,
    exclude: &[LlmName],
) -> Option<Result<Grant, Error>> {
    let ask = Ask {
        principal,
        route,
        exclude,
        until: far(),
        waking: false,
    };
    adm.admit(ask).now_or_never()
}

/// A request admitted in a task of its own, so that it may wait.
fn spawn_admit(
    adm: &Arc<dyn Admission>,
    principal: &str,
    route: &Route,
    exclude: &[LlmName],
    until: Instant,
) -> JoinHandle<Result<Grant, Error>> {
    let (adm, principal, route, exclude) = (
        adm.clone(),
        principal.to_owned(),
        route.clone(),
        exclude.to_vec(),
    );
    tokio::spawn(async move {
        let ask = Ask {
            principal: &principal,
            route: &route,
            exclude: &exclude,
            until,
            waking: false,
        };
        adm.admit(ask).await
    })
}

/// Lets spawned requests run until nothing more happens without an event.
async fn settle() {
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
}

/// Yields until `pool` has `n` requests queued; panics if it never does.
async fn queued(adm: &Arc<dyn Admission>, pool: &str, n: u32) {
    let pool = name(pool);
    for _ in 0..PATIENCE {
        if adm.load(&pool).queued == n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!(
        "expected {n} requests queued in {pool}, found {:?}",
        adm.load(&pool)
    );
}

/// A waiting request spawned by `principal`, queued before the next one is.
async fn enqueue(
    adm: &Arc<dyn Admission>,
    principal: &str,
    route: &Route,
    exclude: &[LlmName],
    until: Instant,
) -> JoinHandle<Result<Grant, Error>> {
    let before = adm.load(&route.pool).queued;
    let handle = spawn_admit(adm, principal, route, exclude, until);
    queued(adm, route.pool.as_str(), before + 1).await;
    assert!(!handle.is_finished(), "a queued request waits");
    handle
}

/// The outcome of a request that must have finished by now.
async fn finished(handle: JoinHandle<Result<Grant, Error>>) -> Result<Grant, Error> {
    settle().await;
    assert!(handle.is_finished(), "the request has its outcome");
    handle.await.expect("the admit task ran to its end")
}

fn grant_on(grant: Result<Grant, Error>, what: &str) -> Grant {
    grant.unwrap_or_else(|e| panic!("{what}: expected a slot, got {e}"))
}

fn assert_unavailable(err: &Error, what: &str) {
    assert!(
        matches!(err, Error::Unavailable { .. }),
        "{what}: expected Unavailable, got {err:?}"
    );
    assert_eq!(err.status(), 503, "{what}");
    assert!(err.retry_after().is_some(), "{what}: a Retry-After");
}

/// Tasks in flight per row, as the admission reports them.
fn counts(adm: &Arc<dyn Admission>, rows: &[LlmRecord]) -> Vec<u32> {
    rows.iter().map(|r| adm.in_flight(r)).collect()
}

/// Many concurrent requests never put more tasks on a row than its capacity; the
/// ones without a slot wait, and each freed slot goes to one of them; once all are
/// released every count is back to zero.
pub async fn capacity_is_never_exceeded(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let rows = [
        member("cap-a", "cap", Some(1)),
        member("cap-b", "cap", Some(2)),
        member("cap-c", "cap", Some(3)),
    ];
    let caps = [1, 2, 3];
    let route = route("cap", &rows);
    let mut waiting: Vec<JoinHandle<Result<Grant, Error>>> = (0..20)
        .map(|i| spawn_admit(&adm, &format!("p{}", i % 3), &route, &[], far()))
        .collect();
    queued(&adm, "cap", 14).await;
    assert_eq!(
        adm.load(&route.pool),
        PoolLoad {
            in_flight: 6,
            capacity: Some(6),
            queued: 14
        }
    );
    let mut held: Vec<Grant> = Vec::new();
    let mut served = 0;
    let mut release_by_drop = false;
    while !(waiting.is_empty() && held.is_empty()) {
        settle().await;
        let (done, still): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|h| h.is_finished());
        waiting = still;
        for h in done {
            held.push(grant_on(h.await.expect("admit task"), "a granted request"));
            served += 1;
        }
        let mut per_row: HashMap<&LlmName, u32> = HashMap::new();
        for g in &held {
            *per_row.entry(&g.row).or_default() += 1;
        }
        for (row, cap) in rows.iter().zip(caps) {
            let on_row = per_row.get(&row.name).copied().unwrap_or(0);
            assert!(on_row <= cap, "{}: {on_row} tasks over {cap}", row.name);
            assert_eq!(adm.in_flight(row), on_row, "{}: its count", row.name);
        }
        let load = adm.load(&route.pool);
        assert_eq!(load.in_flight as usize, held.len());
        assert_eq!(load.queued as usize, waiting.len());
        assert!(
            waiting.is_empty() || held.len() == 6,
            "while requests wait, every slot is taken"
        );
        if !held.is_empty() {
            let g = held.remove(0);
            // Half the slots are freed by dropping a `Slot`, the rest by `release`.
            if release_by_drop {
                drop(Slot::new(adm.clone(), g));
            } else {
                adm.release(&g);
            }
            release_by_drop = !release_by_drop;
        }
    }
    assert_eq!(served, 20, "every request was served");
    assert_eq!(counts(&adm, &rows), [0, 0, 0]);
    assert_eq!(
        adm.load(&route.pool),
        PoolLoad {
            in_flight: 0,
            capacity: Some(6),
            queued: 0
        }
    );
}

/// Each grant goes to a row with room whose in-flight / capacity is the lowest.
pub async fn the_least_loaded_row_is_picked(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let rows = [
        member("light-a", "light", Some(4)),
        member("light-b", "light", Some(2)),
        member("light-c", "light", Some(8)),
    ];
    let route = route("light", &rows);
    for _ in 0..14 {
        let loads = counts(&adm, &rows);
        let grant = grant_on(admit_now(&adm, "p", &route, &[]).await, "a free slot");
        let ratio = |i: usize| {
            let cap = rows[i].max_concurrent.expect("limited");
            (u64::from(loads[i]), u64::from(cap))
        };
        let picked = rows
            .iter()
            .position(|r| r.name == grant.row)
            .expect("a row of the route");
        let (pi, pc) = ratio(picked);
        assert!(pi < pc, "{} had room", grant.row);
        for (i, other) in rows.iter().enumerate() {
            let (oi, oc) = ratio(i);
            if oi < oc {
                assert!(
                    pi * oc <= oi * pc,
                    "{} ({pi}/{pc}) picked over the lighter {} ({oi}/{oc})",
                    grant.row,
                    other.name
                );
            }
        }
    }
    assert_eq!(counts(&adm, &rows), [4, 2, 8], "every slot taken");
    assert!(
        try_admit_now(&adm, "p", &route, &[]).await.is_none(),
        "a full pool makes a request wait"
    );
    assert_eq!(adm.load(&route.pool).queued, 0, "the dropped request left");
}

/// Equally loaded rows take turns: in pools of 2 and of 3, successive grants cycle
/// through every member, so none starves, whether slots are held or freed at once.
pub async fn equal_rows_take_turns(setup: Setup<'_>) {
    for k in [2usize, 3] {
        let adm = setup(&Config::default());
        let pool = format!("turns-{k}");
        let rows: Vec<LlmRecord> = (0..k)
            .map(|i| member(&format!("{pool}-{i}"), &pool, None))
            .collect();
        let route = route(&pool, &rows);
        // Freed at once: every request finds all rows equally idle.
        let mut tally: HashMap<LlmName, usize> = HashMap::new();
        let mut last: Option<LlmName> = None;
        for _ in 0..k * 10 {
            let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
            assert_ne!(
                last.as_ref(),
                Some(&g.row),
                "pool of {k}: a tie repeats a row"
            );
            *tally.entry(g.row.clone()).or_default() += 1;
            last = Some(g.row.clone());
            adm.release(&g);
        }
        for r in &rows {
            assert_eq!(tally.get(&r.name), Some(&10), "pool of {k}: {tally:?}");
        }
        // Held: the least in flight is picked, and the rows fill evenly.
        let mut held = Vec::new();
        for _ in 0..k * 5 {
            held.push(grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot"));
            let c = counts(&adm, &rows);
            let (lo, hi) = (c.iter().min(), c.iter().max());
            assert!(
                hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
                "pool of {k}: uneven {c:?}"
            );
        }
        assert_eq!(counts(&adm, &rows), vec![5; k]);
        for g in &held {
            adm.release(g);
        }
        assert_eq!(counts(&adm, &rows), vec![0; k]);
    }
}

/// With the queue at its depth, a request is refused at once with 429 `queue_full`
/// and a Retry-After, and nothing changes; a depth of 0 refuses whenever no slot is
/// free.
pub async fn a_full_queue_refuses_at_once(setup: Setup<'_>) {
    let adm = setup(&Config {
        queue_depth: 2,
        ..Config::default()
    });
    let rows = [member("full-a", "full", Some(1))];
    let route = route("full", &rows);
    let held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let w1 = enqueue(&adm, "p", &route, &[], far()).await;
    let w2 = enqueue(&adm, "q", &route, &[], far()).await;
    let before = adm.load(&route.pool);
    assert_eq!(before.queued, 2);
    for who in ["p", "r"] {
        let err = admit_now(&adm, who, &route, &[])
            .await
            .expect_err("the queue is full");
        assert!(
            matches!(err, Error::QueueFull { .. }),
            "expected QueueFull, got {err:?}"
        );
        assert_eq!((err.status(), err.code()), (429, "queue_full"));
        assert!(err.retry_after().is_some_and(|d| d > Duration::ZERO));
        assert_eq!(adm.load(&route.pool), before, "a refusal changes nothing");
    }
    // A slot frees: the first waiter takes it, and the queue has room for one more.
    adm.release(&held);
    let g1 = grant_on(finished(w1).await, "the first waiter");
    let w3 = enqueue(&adm, "r", &route, &[], far()).await;
    assert_eq!(adm.load(&route.pool).queued, 2);
    w2.abort();
    w3.abort();
    queued(&adm, "full", 0).await;
    adm.release(&g1);

    let adm = setup(&Config {
        queue_depth: 0,
        ..Config::default()
    });
    let _held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let err = admit_now(&adm, "p", &route, &[])
        .await
        .expect_err("no queue");
    assert_eq!((err.status(), err.code()), (429, "queue_full"));
}

/// A request still without a slot at `until` fails with 503 `queue_timeout` and a
/// Retry-After, and leaves the queue; a slot freed later is not granted to it.
pub async fn the_wait_ends_at_until(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let rows = [member("slow-a", "slow", Some(1))];
    let route = route("slow", &rows);
    let held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let w = enqueue(
        &adm,
        "p",
        &route,
        &[],
        Instant::now() + Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(9_900)).await;
    settle().await;
    assert!(!w.is_finished(), "still within its wait");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = finished(w).await.expect_err("no slot freed in time");
    assert!(
        matches!(err, Error::QueueTimeout { .. }),
        "expected QueueTimeout, got {err:?}"
    );
    assert_eq!((err.status(), err.code()), (503, "queue_timeout"));
    assert!(err.retry_after().is_some_and(|d| d > Duration::ZERO));
    assert_eq!(
        adm.load(&route.pool),
        PoolLoad {
            in_flight: 1,
            capacity: Some(1),
            queued: 0
        }
    );
    adm.release(&held);
    settle().await;
    assert_eq!(adm.load(&route.pool).in_flight, 0, "nothing granted to it");
    // A deadline already passed fails at once when no slot is free.
    let _held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let ask = Ask {
        principal: "p",
        route: &route,
        exclude: &[],
        until: Instant::now(),
        waking: false,
    };
    let err = adm.admit(ask).await.expect_err("no wait left and no slot");
    assert_eq!(err.code(), "queue_timeout");
    assert_eq!(adm.load(&route.pool).queued, 0);
}

/// A waiter whose `admit` future is dropped leaves the queue at once; a slot granted
/// to it as it left goes back (to the next waiter, or free), never leaked.
pub async fn a_waiter_that_leaves_is_gone(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let rows = [member("gone-a", "gone", Some(1))];
    let route = route("gone", &rows);
    let held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let w = enqueue(&adm, "p", &route, &[], far()).await;
    w.abort();
    queued(&adm, "gone", 0).await;
    adm.release(&held);
    settle().await;
    assert_eq!(adm.load(&route.pool).in_flight, 0, "nothing granted to it");

    // Granted as it leaves: the slot is freed.
    let held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let w = enqueue(&adm, "p", &route, &[], far()).await;
    adm.release(&held);
    w.abort();
    settle().await;
    assert_eq!(
        adm.load(&route.pool),
        PoolLoad {
            in_flight: 0,
            capacity: Some(1),
            queued: 0
        },
        "the slot granted to a leaving waiter is not leaked"
    );

    // Granted as it leaves, with another waiter behind it: the other one gets it.
    let held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    let w1 = enqueue(&adm, "p", &route, &[], far()).await;
    let w2 = enqueue(&adm, "p", &route, &[], far()).await;
    adm.release(&held);
    w1.abort();
    let g2 = grant_on(finished(w2).await, "the waiter behind");
    assert_eq!(
        adm.load(&route.pool),
        PoolLoad {
            in_flight: 1,
            capacity: Some(1),
            queued: 0
        }
    );
    adm.release(&g2);
    assert_eq!(adm.load(&route.pool).in_flight, 0);
}

/// Frees the held slot and returns which waiter got it, by label; panics unless
/// exactly one did.
async fn serve_next(
    adm: &Arc<dyn Admission>,
    held: &Grant,
    waiters: &mut Vec<(String, JoinHandle<Result<Grant, Error>>)>,
) -> (String, Grant) {
    adm.release(held);
    settle().await;
    let done: Vec<usize> = (0..waiters.len())
        .filter(|i| waiters[*i].1.is_finished())
        .collect();
    assert_eq!(done.len(), 1, "one freed slot serves one waiter");
    let (label, handle) = waiters.remove(done[0]);
    let grant = grant_on(handle.await.expect("admit task"), &label);
    (label, grant)
}

/// Principals take turns: with principal A's five requests queued before B's one, B
/// is served second, not sixth; A's are served in the order they came.
pub async fn principals_take_turns(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let rows = [member("fair-a", "fair", Some(1))];
    let route = route("fair", &rows);
    let mut held = grant_on(admit_now(&adm, "x", &route, &[]).await, "the only slot");
    let mut waiters = Vec::new();
    for i in 0..5 {
        waiters.push((
            format!("A{i}"),
            enqueue(&adm, "A", &route, &[], far()).await,
        ));
    }
    waiters.push(("B0".into(), enqueue(&adm, "B", &route, &[], far()).await));
    let mut order = Vec::new();
    while !waiters.is_empty() {
        let (label, grant) = serve_next(&adm, &held, &mut waiters).await;
        order.push(label);
        held = grant;
    }
    assert_eq!(order, ["A0", "B0", "A1", "A2", "A3", "A4"]);
    adm.release(&held);
    assert_eq!(adm.load(&route.pool).in_flight, 0);
}

/// One principal's requests are served first come, first served; two principals'
/// alternate, each in its own order.
pub async fn each_principal_is_served_in_order(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let rows = [member("fifo-a", "fifo", Some(1))];
    let route = route("fifo", &rows);
    let mut held = grant_on(admit_now(&adm, "x", &route, &[]).await, "the only slot");
    let mut waiters = Vec::new();
    for (who, n) in [("A", 3), ("B", 3)] {
        for i in 0..n {
            waiters.push((
                format!("{who}{i}"),
                enqueue(&adm, who, &route, &[], far()).await,
            ));
        }
    }
    let mut order = Vec::new();
    while !waiters.is_empty() {
        let (label, grant) = serve_next(&adm, &held, &mut waiters).await;
        order.push(label);
        held = grant;
    }
    assert_eq!(order, ["A0", "B0", "A1", "B1", "A2", "B2"]);
    for i in 0..4 {
        waiters.push((
            format!("C{i}"),
            enqueue(&adm, "C", &route, &[], far()).await,
        ));
    }
    let mut order = Vec::new();
    while !waiters.is_empty() {
        let (label, grant) = serve_next(&adm, &held, &mut waiters).await;
        order.push(label);
        held = grant;
    }
    assert_eq!(order, ["C0", "C1", "C2", "C3"]);
    adm.release(&held);
}

/// A row of the pool that starts serving (`observe`) wakes a waiter at once: it is
/// granted a slot there without any slot freeing and without time passing.
pub async fn a_row_that_starts_serving_wakes_a_waiter(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let busy = member("wake-a", "wake", Some(1));
    let asleep = stopped(&member("wake-b", "wake", Some(1)));
    let route = route("wake", &[busy.clone(), asleep.clone()]);
    let held = grant_on(admit_now(&adm, "p", &route, &[]).await, "the only slot");
    assert_eq!(held.row, busy.name);
    let w = enqueue(&adm, "p", &route, &[], far()).await;
    settle().await;
    assert!(!w.is_finished());
    let awake = started(&asleep);
    adm.observe(&awake);
    let g = grant_on(finished(w).await, "woken by the row that binds");
    assert_eq!(g.row, awake.name);
    assert_eq!(adm.in_flight(&awake), 1);
    assert_eq!(adm.in_flight(&busy), 1, "the held slot was not freed");
    adm.release(&g);
    adm.release(&held);
    assert_eq!(adm.load(&route.pool).in_flight, 0);
}

/// Waiters keep waiting while a row of their pool serves; when the last serving row
/// stops (or is deleted), they fail at once with 503, and a new request too.
pub async fn waiters_fail_when_the_pool_stops_serving(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let a = member("dead-a", "dead", Some(1));
    let b = member("dead-b", "dead", Some(1));
    let route1 = route("dead", &[a.clone(), b.clone()]);
    let ga = grant_on(admit_now(&adm, "p", &route1, &[]).await, "a slot");
    let gb = grant_on(admit_now(&adm, "p", &route1, &[]).await, "a slot");
    let w1 = enqueue(&adm, "p", &route1, &[], far()).await;
    let w2 = enqueue(&adm, "q", &route1, &[], far()).await;
    adm.observe(&stopped(&a));
    settle().await;
    assert!(
        !w1.is_finished() && !w2.is_finished(),
        "a member still serves: they wait"
    );
    adm.observe(&stopped(&b));
    for w in [w1, w2] {
        let err = finished(w).await.expect_err("the pool stopped serving");
        assert_unavailable(&err, "a waiter of a pool that stopped");
    }
    assert_eq!(adm.load(&route1.pool).queued, 0);
    let route2 = route("dead", &[stopped(&a), stopped(&b)]);
    let err = admit_now(&adm, "p", &route2, &[])
        .await
        .expect_err("nothing serves");
    assert_unavailable(&err, "a request to a pool that serves nowhere");
    // The tasks in flight end later: the counts come back to zero.
    adm.release(&ga);
    adm.release(&gb);
    assert_eq!(adm.load(&route1.pool).in_flight, 0);

    // Deleted rather than stopped.
    let c = member("deleted-a", "deleted", Some(1));
    let route3 = route("deleted", std::slice::from_ref(&c));
    let gc = grant_on(admit_now(&adm, "p", &route3, &[]).await, "a slot");
    let w = enqueue(&adm, "p", &route3, &[], far()).await;
    adm.forget(&c.name, &c.id);
    let err = finished(w).await.expect_err("its last row was deleted");
    assert_unavailable(&err, "a waiter of a deleted row");
    adm.release(&gc);
    assert_eq!(adm.load(&route3.pool).in_flight, 0);
}

/// A row whose last `cooldown_after` dispatches failed is passed over (another member
/// takes the requests; alone, it is 503 at once) until `cooldown` has passed; an
/// answer resets the count.
pub async fn a_failing_row_cools_down(setup: Setup<'_>) {
    let adm = setup(&Config {
        cooldown_after: 3,
        cooldown: Duration::from_secs(5),
        ..Config::default()
    });
    let a = member("cool-a", "cool", None);
    let b = member("cool-b", "cool", None);
    let route = route("cool", &[a.clone(), b.clone()]);
    let only_a = [b.name.clone()];
    let dispatch = |outcome: Outcome| {
        let (adm, route, only_a) = (adm.clone(), route.clone(), only_a.clone());
        async move {
            let g = admit_now(&adm, "p", &route, &only_a).await?;
            assert_eq!(g.row.as_str(), "cool-a");
            adm.report(&g, outcome);
            adm.release(&g);
            Ok::<(), Error>(())
        }
    };
    // Two failures, an answer, two failures: never three in a row.
    for outcome in [
        Outcome::Failed,
        Outcome::Failed,
        Outcome::Answered,
        Outcome::Failed,
        Outcome::Failed,
    ] {
        dispatch(outcome).await.expect("not cooling down yet");
    }
    let mut tally = HashMap::new();
    for _ in 0..4 {
        let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
        *tally.entry(g.row.clone()).or_insert(0) += 1;
        adm.release(&g);
    }
    assert_eq!(tally.get(&a.name), Some(&2), "a still takes its turn");
    // The third failure in a row.
    dispatch(Outcome::Failed)
        .await
        .expect("not cooling down yet");
    for _ in 0..6 {
        let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
        assert_eq!(g.row, b.name, "a cooling row is passed over");
        adm.release(&g);
    }
    let err = dispatch(Outcome::Answered)
        .await
        .expect_err("alone, a cooling row is unavailable");
    assert_unavailable(&err, "a request only a cooling row could take");
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
    assert_eq!(g.row, b.name, "still cooling");
    adm.release(&g);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tally = HashMap::new();
    for _ in 0..4 {
        let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
        *tally.entry(g.row.clone()).or_insert(0) += 1;
        adm.release(&g);
    }
    assert_eq!(
        tally.get(&a.name),
        Some(&2),
        "back in turn after the cooldown"
    );
    dispatch(Outcome::Answered).await.expect("serving again");
}

/// An excluded row is never granted: the request takes another member, waits for
/// one (a slot freeing on the excluded row does not serve it), or fails at once when
/// every serving row is excluded.
pub async fn excluded_rows_are_never_granted(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let a = member("skip-a", "skip", Some(1));
    let b = member("skip-b", "skip", Some(1));
    let route = route("skip", &[a.clone(), b.clone()]);
    let not_a = [a.name.clone()];
    for _ in 0..3 {
        let g = grant_on(admit_now(&adm, "p", &route, &not_a).await, "b");
        assert_eq!(g.row, b.name);
        adm.release(&g);
    }
    let gb = grant_on(admit_now(&adm, "p", &route, &not_a).await, "b");
    let w = enqueue(&adm, "p", &route, &not_a, far()).await;
    let ga = grant_on(admit_now(&adm, "q", &route, &[]).await, "a");
    assert_eq!(ga.row, a.name, "a has room for others");
    adm.release(&ga);
    settle().await;
    assert!(
        !w.is_finished(),
        "a slot on the excluded row does not serve it"
    );
    assert_eq!(adm.in_flight(&a), 0);
    adm.release(&gb);
    let g = grant_on(finished(w).await, "b freed");
    assert_eq!(g.row, b.name);
    adm.release(&g);
    let both = [a.name.clone(), b.name.clone()];
    let err = admit_now(&adm, "p", &route, &both)
        .await
        .expect_err("everything excluded");
    assert_unavailable(&err, "every serving row excluded");
    assert_eq!(adm.load(&route.pool).in_flight, 0);
}

/// A route pinned to one member is only ever granted that member: it waits for it
/// even when another member has room.
pub async fn a_pinned_member_is_the_only_one_granted(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let a = member("pin-a", "pin", Some(1));
    let b = member("pin-b", "pin", Some(1));
    let pool = route("pin", &[a.clone(), b.clone()]);
    let pinned = Route {
        agent: None,
        pool: pool.pool.clone(),
        rows: Arc::from([b.clone()]),
        pinned: Some(b.name.clone()),
    };
    for _ in 0..3 {
        let g = grant_on(admit_now(&adm, "p", &pinned, &[]).await, "b");
        assert_eq!(g.row, b.name);
        adm.release(&g);
    }
    let gb = grant_on(admit_now(&adm, "p", &pinned, &[]).await, "b");
    let w = enqueue(&adm, "p", &pinned, &[], far()).await;
    let ga = grant_on(admit_now(&adm, "q", &pool, &[]).await, "a");
    assert_eq!(ga.row, a.name);
    adm.release(&ga);
    settle().await;
    assert!(
        !w.is_finished(),
        "a slot on another member does not serve it"
    );
    adm.release(&gb);
    let g = grant_on(finished(w).await, "b freed");
    assert_eq!(g.row, b.name);
    adm.release(&g);
    assert_eq!(counts(&adm, &[a, b]), [0, 0]);
}

/// `try_admit` answers at once: a slot while the row has room (sharing the counts of
/// `admit`), 503 saturated when it has none.
pub async fn try_admit_never_waits(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let row = member("try-a", "try", Some(2));
    let route = route("try", std::slice::from_ref(&row));
    let g1 = adm.try_admit(&row).expect("room");
    let g2 = grant_on(admit_now(&adm, "p", &route, &[]).await, "room");
    assert_eq!(
        (g1.row.clone(), g2.row.clone()),
        (row.name.clone(), row.name.clone())
    );
    let err = adm.try_admit(&row).expect_err("full");
    assert!(
        matches!(
            err,
            Error::Unavailable {
                kind: UnavailableKind::Saturated,
                ..
            }
        ),
        "expected Saturated, got {err:?}"
    );
    assert_eq!(err.status(), 503);
    assert_eq!(
        adm.load(&route.pool),
        PoolLoad {
            in_flight: 2,
            capacity: Some(2),
            queued: 0
        },
        "a refused try_admit takes nothing and queues nothing"
    );
    assert!(try_admit_now(&adm, "p", &route, &[]).await.is_none());
    adm.release(&g1);
    let g3 = adm.try_admit(&row).expect("a slot freed");
    for g in [g2, g3] {
        adm.release(&g);
    }
    assert_eq!(adm.in_flight(&row), 0);
}

/// Counts never go below zero: releasing more than was granted leaves them at zero,
/// and the capacity is still enforced after.
pub async fn counts_never_go_below_zero(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let row = member("zero-a", "zero", Some(1));
    let route = route("zero", std::slice::from_ref(&row));
    let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "room");
    adm.release(&g);
    adm.release(&g);
    adm.release(&g);
    assert_eq!(adm.in_flight(&row), 0);
    assert_eq!(adm.load(&route.pool).in_flight, 0);
    let g = grant_on(admit_now(&adm, "p", &route, &[]).await, "room");
    assert!(
        try_admit_now(&adm, "p", &route, &[]).await.is_none(),
        "one slot, taken: extra releases made no room"
    );
    assert!(adm.try_admit(&row).is_err());
    adm.release(&g);
    assert_eq!(adm.in_flight(&row), 0);
}

/// What the route says of a row counts when it is newer than what the admission
/// holds (a write it was not told of, e.g. by another replica), and never when it is
/// older: a row the route shows stopped is not granted, a row the route shows serving
/// is granted rather than a request waiting, and a stale route does not bring back a
/// row observed stopped since.
pub async fn the_newest_word_on_a_row_wins(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let a = member("news-a", "news", Some(1));
    let b = member("news-b", "news", Some(1));
    let both = route("news", &[a.clone(), b.clone()]);
    for _ in 0..2 {
        let g = grant_on(admit_now(&adm, "p", &both, &[]).await, "a slot");
        adm.release(&g);
    }
    // a stopped elsewhere: the route says so, at a newer revision.
    let a_stopped = stopped(&a);
    let newer = route("news", &[a_stopped.clone(), b.clone()]);
    for _ in 0..4 {
        let g = grant_on(admit_now(&adm, "p", &newer, &[]).await, "b");
        assert_eq!(g.row, b.name, "the route's newer word: a stopped");
        adm.release(&g);
    }
    // ... and came back elsewhere, while b is busy: granted, not queued.
    let gb = grant_on(admit_now(&adm, "p", &newer, &[]).await, "b");
    let a_back = started(&a_stopped);
    let newest = route("news", &[a_back.clone(), b.clone()]);
    let ga = grant_on(admit_now(&adm, "p", &newest, &[]).await, "a, back");
    assert_eq!(ga.row, a.name);
    adm.release(&ga);
    adm.release(&gb);
    // Observed stopped here; an older route saying it serves does not bring it back.
    let a_gone = stopped(&a_back);
    adm.observe(&a_gone);
    for _ in 0..4 {
        let g = grant_on(admit_now(&adm, "p", &newest, &[]).await, "b");
        assert_eq!(
            g.row, b.name,
            "an older route does not undo an observed stop"
        );
        adm.release(&g);
    }
    assert_eq!(counts(&adm, &[a, b]), [0, 0]);
}

/// A row the admission has not seen yet, serving in the route (published or bound
/// through another replica), takes a request before it would wait.
pub async fn a_row_first_seen_in_a_route_is_granted(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let a = member("new-a", "new", Some(1));
    let old = route("new", std::slice::from_ref(&a));
    let ga = grant_on(admit_now(&adm, "p", &old, &[]).await, "a");
    let b = member("new-b", "new", Some(1));
    let grown = route("new", &[a.clone(), b.clone()]);
    let gb = grant_on(admit_now(&adm, "p", &grown, &[]).await, "b, new");
    assert_eq!(gb.row, b.name);
    adm.release(&ga);
    adm.release(&gb);
    assert_eq!(counts(&adm, &[a, b]), [0, 0]);
}

/// Across replicas: what the replica holding a row's channel reports counts toward the
/// row's capacity here (the larger of it and this replica's own count); a lower count
/// heard hands the slot it frees to a waiter, with no release here; a report that ran
/// out counts no more.
pub async fn a_holders_count_fills_a_row_and_a_lower_one_wakes_a_waiter(setup: Setup<'_>) {
    use crate::admission::RowLoad;
    let adm = setup(&Config::default());
    let row = member("held-a", "held", Some(2));
    let route = route("held", std::slice::from_ref(&row));
    let mine = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
    let load = |in_flight| RowLoad {
        pool: name("held"),
        row: row.name.clone(),
        in_flight,
    };
    // The holder counts this replica's task and one of another replica's.
    adm.heard(&load(2), far());
    assert_eq!(
        adm.in_flight(&row),
        2,
        "the holder's count is the row's load"
    );
    let w = enqueue(&adm, "p", &route, &[], far()).await;
    settle().await;
    assert!(!w.is_finished(), "the row is full as its holder counts it");
    // The other replica's task ended there.
    adm.heard(&load(1), far());
    let g = grant_on(finished(w).await, "woken by the slot freed on the holder");
    assert_eq!(g.row, row.name);
    adm.release(&g);
    adm.release(&mine);
    // A report that runs out (its holder went silent) counts no more.
    adm.heard(&load(2), Instant::now() + Duration::from_secs(1));
    assert!(
        try_admit_now(&adm, "p", &route, &[]).await.is_none(),
        "full while the report holds"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = grant_on(
        admit_now(&adm, "p", &route, &[]).await,
        "the report ran out",
    );
    adm.release(&g);
}

/// An admission that tells its counts ([`Admission::follow_loads`]) marks every row
/// whose count changes (a grant, a release), once per change batch, and
/// [`Admission::count`] reads the count. One that does not tell is left alone.
pub async fn followed_counts_mark_the_rows_that_change(setup: Setup<'_>) {
    let adm = setup(&Config::default());
    let Some(changes) = adm.follow_loads() else {
        return;
    };
    let row = member("told-a", "told", Some(4));
    let route = route("told", std::slice::from_ref(&row));
    let g1 = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
    let g2 = grant_on(admit_now(&adm, "p", &route, &[]).await, "a slot");
    assert_eq!(
        changes.take(),
        [(name("told"), row.name.clone())],
        "marked once"
    );
    assert_eq!(adm.count(&name("told"), &row.name), 2);
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .expect("a waiter is told of marks made before it waited");
    assert!(changes.take().is_empty());
    adm.release(&g1);
    assert_eq!(changes.take(), [(name("told"), row.name.clone())]);
    assert_eq!(adm.count(&name("told"), &row.name), 1);
    adm.release(&g2);
    assert_eq!(adm.count(&name("told"), &row.name), 0);
}

/// A row cooling down that is bound to a new channel (its publisher moved to another
/// replica) is a candidate again at once: the failures were the old channel's.
pub async fn a_row_bound_anew_no_longer_cools_down(setup: Setup<'_>) {
    let adm = setup(&Config {
        cooldown_after: 1,
        cooldown: Duration::from_secs(60),
        ..Config::default()
    });
    let row = member("moved-a", "moved", Some(4));
    let before = route("moved", std::slice::from_ref(&row));
    let g = grant_on(admit_now(&adm, "p", &before, &[]).await, "a slot");
    adm.report(&g, Outcome::Failed);
    adm.release(&g);
    let err = admit_now(&adm, "p", &before, &[])
        .await
        .expect_err("the row cools down after its failure");
    assert_unavailable(&err, "cooling down");
    let moved = started(&row);
    adm.observe(&moved);
    let after = route("moved", std::slice::from_ref(&moved));
    let g = grant_on(admit_now(&adm, "p", &after, &[]).await, "bound anew");
    adm.release(&g);
}

/// Stamps out one `#[tokio::test(start_paused = true)]` per case of the admission
/// suite (the test crate needs tokio's `test-util` feature). `$setup` is a fn
/// `(&Config) -> Arc<dyn Admission>` building a fresh admission.
#[macro_export]
macro_rules! admission_conformance_tests {
    ($setup:path) => {
        $crate::admission_conformance_tests!(@cases $setup;
            capacity_is_never_exceeded,
            the_least_loaded_row_is_picked,
            equal_rows_take_turns,
            a_full_queue_refuses_at_once,
            the_wait_ends_at_until,
            a_waiter_that_leaves_is_gone,
            principals_take_turns,
            each_principal_is_served_in_order,
            a_row_that_starts_serving_wakes_a_waiter,
            waiters_fail_when_the_pool_stops_serving,
            a_failing_row_cools_down,
            excluded_rows_are_never_granted,
            a_pinned_member_is_the_only_one_granted,
            try_admit_never_waits,
            counts_never_go_below_zero,
            the_newest_word_on_a_row_wins,
            a_row_first_seen_in_a_route_is_granted,
            a_holders_count_fills_a_row_and_a_lower_one_wakes_a_waiter,
            followed_counts_mark_the_rows_that_change,
            a_row_bound_anew_no_longer_cools_down,
        );
    };
    (@cases $setup:path; $($case:ident,)*) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $case() {
                $crate::testkit::admission_suite::$case(&$setup).await;
            }
        )*
    };
}
