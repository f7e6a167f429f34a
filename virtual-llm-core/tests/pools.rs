//! Pools, capacity, failover and the admission queue (SPEC §10 and §11): the admission
//! conformance suite run on `LocalAdmission`, the pool rules as clients and publishers
//! see them through a gateway with `FakeChannel` publishers, and a property test of the
//! in-flight counts through a real gateway.
//!
//! The gateway tests run on paused time: nothing sleeps, and a request that never gets
//! its task fails fast (its deadline passes at once) instead of hanging.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use futures::future::select_all;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use virtual_llm_core::admission::PoolLoad;
use virtual_llm_core::protocol::{ConflictReason, GatewayFrame, TaskFrame, TaskResult};
use virtual_llm_core::testkit::FakeChannel;
use virtual_llm_core::{
    Admission, Binding, Config, Error, InferRequest, LlmName, LocalAdmission, Principal, Reply,
    Role, SessionId,
};

mod local_admission {
    use super::*;

    fn local(config: &Config) -> Arc<dyn Admission> {
        Arc::new(LocalAdmission::new(config))
    }

    virtual_llm_core::admission_conformance_tests!(local);
}

/// A waiter that leaves on one thread while a slot is granted to it on another never
/// leaks the slot: run many times, the count always comes back to zero. (It did leak
/// when the waiter looked for its grant before taking the queue's lock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_racing_a_leaving_waiter_is_never_leaked() {
    use tokio::time::{Duration, Instant};
    use virtual_llm_core::Route;
    use virtual_llm_core::admission::Ask;
    use virtual_llm_core::testkit::admission_suite::member;

    let adm: Arc<dyn Admission> = Arc::new(LocalAdmission::new(&Config::default()));
    let row = member("race-a", "race", Some(1));
    let route = Route {
        agent: None,
        pool: row.pool_key().clone(),
        rows: vec![row.clone()].into(),
        pinned: None,
    };
    let mut leaked = 0;
    for _ in 0..5_000 {
        let held = adm.try_admit(&row).expect("the slot is free");
        let waiter = {
            let (adm, route) = (adm.clone(), route.clone());
            tokio::spawn(async move {
                let ask = Ask {
                    principal: "p",
                    route: &route,
                    exclude: &[],
                    until: Instant::now() + Duration::from_secs(3600),
                    waking: false,
                };
                adm.admit(ask).await
            })
        };
        while adm.load(&route.pool).queued == 0 {
            tokio::task::yield_now().await;
        }
        // Free the slot on another task while the waiter is dropped.
        let releasing = {
            let adm = adm.clone();
            tokio::spawn(async move { adm.release(&held) })
        };
        waiter.abort();
        releasing.await.unwrap();
        if let Ok(Ok(granted)) = waiter.await {
            adm.release(&granted);
        }
        if adm.in_flight(&row) != 0 {
            leaked += 1;
            adm.release(&virtual_llm_core::admission::Grant {
                row: row.name.clone(),
                pool: route.pool.clone(),
            });
        }
    }
    assert_eq!(
        leaked, 0,
        "slots leaked by waiters leaving as they were granted"
    );
    assert_eq!(adm.load(&route.pool).queued, 0);
}

// ---------------------------------------------------------------------------------
// Pools through a gateway, with `FakeChannel` publishers.
// ---------------------------------------------------------------------------------

/// One published row with its own session and channel.
struct Member {
    name: String,
    session: SessionId,
    binding: Option<Binding>,
    channel: FakeChannel,
}

/// A gateway with a pool published by `alice`, each member on a session of its own.
struct Pool {
    f: Fixture,
    key: LlmName,
    members: Vec<Member>,
}

fn alice() -> Principal {
    publisher("alice")
}

fn client_named(id: &str) -> Principal {
    Principal::new(id, [Role::Client])
}

fn chat(model: &str, text: &str, stream: bool) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

/// The user text a task frame carries: which client request it is.
fn text(frame: &TaskFrame) -> String {
    frame.body.to_value().unwrap()["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn answered(status: u16, body: Value) -> TaskResult {
    TaskResult::Completed {
        status,
        body: body.into(),
        retry_after: None,
    }
}

fn ok(by: &str) -> TaskResult {
    answered(200, json!({"choices": [{"message": {"content": by}}]}))
}

/// Lets the gateway's and the clients' tasks run until nothing more happens without
/// an event. Never moves time.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

impl Pool {
    async fn new(config: Config, key: &str, rows: &[(&str, Option<u32>)]) -> Pool {
        let f = fixture_with(config).await;
        let mut members = Vec::new();
        for (name, cap) in rows {
            let (session, binding, channel) = f
                .online_specs(&alice(), vec![pooled(name, Some(key), *cap)])
                .await;
            members.push(Member {
                name: (*name).to_owned(),
                session,
                binding: Some(binding),
                channel,
            });
        }
        Pool {
            f,
            key: LlmName::parse(key).unwrap(),
            members,
        }
    }

    fn index(&self, name: &str) -> usize {
        self.members.iter().position(|m| m.name == name).unwrap()
    }

    /// A client request in a task of its own, so that it may wait.
    fn infer(&self, who: &Principal, request: InferRequest) -> JoinHandle<Result<Reply, Error>> {
        let (gw, who) = (self.f.gw.clone(), who.clone());
        tokio::spawn(async move { gw.infer(&who, request).await })
    }

    /// The next frame any member receives, with the member's index.
    async fn next_frame(&self) -> (usize, GatewayFrame) {
        let waits = self
            .members
            .iter()
            .map(|m| Box::pin(m.channel.next()))
            .collect::<Vec<_>>();
        let (frame, i, _) = select_all(waits).await;
        (i, frame)
    }

    /// The next task any member receives.
    async fn next_task(&self) -> (usize, TaskFrame) {
        match self.next_frame().await {
            (i, GatewayFrame::Task(t)) => (i, t),
            (i, other) => panic!("{}: expected a task, got {other:?}", self.members[i].name),
        }
    }

    /// The task frames member `i` received since last asked (other frames dropped).
    fn tasks(&self, i: usize) -> Vec<TaskFrame> {
        self.members[i]
            .channel
            .take()
            .into_iter()
            .filter_map(|f| match f {
                GatewayFrame::Task(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    /// Member `i`'s publisher posts `result` for `task`.
    async fn post(&self, i: usize, task: &TaskFrame, result: TaskResult) {
        self.f
            .gw
            .deliver(&alice(), &self.members[i].session, &task.task_id, result)
            .await
            .unwrap();
    }

    fn load(&self) -> PoolLoad {
        self.f.gw.pool_load(&self.key)
    }

    /// Yields until `n` requests wait in the pool's queue.
    async fn queued(&self, n: u32) {
        for _ in 0..1_000 {
            if self.load().queued == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("expected {n} queued, found {:?}", self.load());
    }
}

/// The outcome of a client request that must have ended by now.
async fn outcome(handle: JoinHandle<Result<Reply, Error>>) -> Result<Reply, Error> {
    settle().await;
    assert!(handle.is_finished(), "the client has its answer");
    handle.await.unwrap()
}

fn completion(reply: Result<Reply, Error>) -> (u16, Value) {
    match reply {
        Ok(Reply::Complete(c)) => (c.status, c.json()),
        other => panic!("expected a completion, got {other:?}"),
    }
}

/// Requests spread evenly over a pool of 2 and of 3: with nothing in flight, the
/// members take turns, and none starves.
#[tokio::test(start_paused = true)]
async fn requests_spread_over_the_pool() {
    for k in [2usize, 3] {
        let names: Vec<String> = (0..k).map(|i| format!("spread-{i}")).collect();
        let rows: Vec<(&str, Option<u32>)> = names.iter().map(|n| (n.as_str(), Some(4))).collect();
        let p = Pool::new(Config::default(), "spread", &rows).await;
        let mut tally = vec![0; k];
        for n in 0..k * 6 {
            let asked = p.infer(&client(), chat("spread", &format!("r{n}"), false));
            let (i, task) = p.next_task().await;
            p.post(i, &task, ok(&p.members[i].name)).await;
            assert_eq!(completion(outcome(asked).await).0, 200);
            tally[i] += 1;
        }
        assert_eq!(
            tally,
            vec![6; k],
            "pool of {k}: every member takes its turn"
        );
        assert_eq!(p.load().in_flight, 0);
    }
}

/// A member whose task answers 503 (or whose publisher reports an upstream error)
/// before any byte reached the client: the request goes to another member and the
/// client gets its 200. After three failures in a row the member is passed over.
#[tokio::test(start_paused = true)]
async fn a_failing_member_is_failed_over_and_then_passed_over() {
    let p = Pool::new(Config::default(), "fo", &[("fo-a", None), ("fo-b", None)]).await;
    let (a, b) = (p.index("fo-a"), p.index("fo-b"));
    let mut to_a = 0;
    for n in 0..6 {
        let asked = p.infer(&client(), chat("fo", &format!("r{n}"), false));
        loop {
            let (i, task) = p.next_task().await;
            assert_eq!(text(&task), format!("r{n}"));
            if i == a {
                to_a += 1;
                // Alternately an upstream 503 and a publisher's upstream error.
                let failure = if to_a % 2 == 1 {
                    answered(503, json!({"error": {"message": "overloaded"}}))
                } else {
                    TaskResult::Failed {
                        message: "connection refused".into(),
                    }
                };
                p.post(i, &task, failure).await;
            } else {
                p.post(i, &task, ok("fo-b")).await;
                break;
            }
        }
        let (status, body) = completion(outcome(asked).await);
        assert_eq!(
            status, 200,
            "request {n}: the client never sees the failure"
        );
        assert_eq!(body["choices"][0]["message"]["content"], "fo-b");
    }
    assert_eq!(
        to_a, 3,
        "after 3 failures in a row the member is passed over"
    );
    assert!(p.tasks(a).is_empty() && p.tasks(b).is_empty());
    assert_eq!(p.load().in_flight, 0);
    // The cooldown passes: the member takes its turn again.
    tokio::time::advance(Duration::from_secs(5)).await;
    let mut seen = [0, 0];
    for n in 0..2 {
        let asked = p.infer(&client(), chat("fo", &format!("again{n}"), false));
        let (i, task) = p.next_task().await;
        seen[i] += 1;
        p.post(i, &task, ok("any")).await;
        assert_eq!(completion(outcome(asked).await).0, 200);
    }
    assert_eq!(seen, [1, 1]);
}

/// A member whose channel is closed, or full, is failed over: the client gets a 200
/// from another member, and the broken channel never received the task.
#[tokio::test(start_paused = true)]
async fn a_closed_or_full_channel_is_failed_over() {
    for broken in ["closed", "full"] {
        let p = Pool::new(Config::default(), "ch", &[("ch-a", None), ("ch-b", None)]).await;
        let (a, b) = (p.index("ch-a"), p.index("ch-b"));
        match broken {
            "closed" => p.members[a].channel.close(),
            _ => p.members[a].channel.set_full(true),
        }
        for n in 0..4 {
            let asked = p.infer(&client(), chat("ch", &format!("r{n}"), false));
            let (i, task) = p.next_task().await;
            assert_eq!(i, b, "{broken}: only the working member gets tasks");
            p.post(i, &task, ok("ch-b")).await;
            assert_eq!(completion(outcome(asked).await).0, 200, "{broken}");
        }
        p.members[a].channel.set_full(false);
        assert!(p.tasks(a).is_empty(), "{broken}: nothing reached a");
        assert_eq!(p.load().in_flight, 0);
    }
}

/// A 4xx from a member is the client's answer, untouched, and never retried: the
/// other member never sees a task.
#[tokio::test(start_paused = true)]
async fn a_4xx_passes_through_and_is_not_retried() {
    let p = Pool::new(
        Config::default(),
        "bad",
        &[("bad-a", None), ("bad-b", None)],
    )
    .await;
    for n in 0..2 {
        let asked = p.infer(&client(), chat("bad", &format!("r{n}"), false));
        let (i, task) = p.next_task().await;
        let body = json!({"error": {"message": "context too long", "code": "context_length"}});
        p.post(i, &task, answered(400, body.clone())).await;
        assert_eq!(completion(outcome(asked).await), (400, body));
        settle().await;
        for other in 0..2 {
            assert!(
                p.tasks(other).is_empty(),
                "no retry of a 4xx, on any member"
            );
        }
    }
}

/// Once the first chunk of a stream reached the client nothing is retried: a failure
/// after it ends the client's stream with an error, and no other member sees a task.
#[tokio::test(start_paused = true)]
async fn nothing_is_retried_after_the_first_chunk() {
    for failure in ["error", "channel lost"] {
        let mut p = Pool::new(Config::default(), "st", &[("st-a", None), ("st-b", None)]).await;
        let asked = p.infer(&client(), chat("st", "stream me", true));
        let (i, task) = p.next_task().await;
        p.post(
            i,
            &task,
            TaskResult::Chunk {
                data: "{\"first\":true}".into(),
                done: false,
                seq: None,
            },
        )
        .await;
        let Ok(Reply::Stream(mut chunks)) = outcome(asked).await else {
            panic!("a stream starts with its first chunk")
        };
        assert_eq!(chunks.next().await.unwrap().unwrap(), "{\"first\":true}");
        match failure {
            "error" => {
                p.post(
                    i,
                    &task,
                    TaskResult::Failed {
                        message: "upstream reset".into(),
                    },
                )
                .await
            }
            _ => {
                let binding = p.members[i].binding.take().unwrap();
                assert!(binding.release().await.unwrap());
            }
        }
        let err = chunks.next().await.unwrap().unwrap_err();
        assert!(
            matches!(err.status(), 502 | 503),
            "{failure}: the stream ends with an error, got {err}"
        );
        assert!(chunks.next().await.is_none());
        settle().await;
        for m in 0..2 {
            assert!(p.tasks(m).is_empty(), "{failure}: never retried");
        }
        assert_eq!(p.load().in_flight, 0);
    }
}

/// Every member failing: the request is tried `pool_retries` more times (3 tasks with
/// the default 2), then the client gets the last answer as it came.
#[tokio::test(start_paused = true)]
async fn at_most_pool_retries_then_the_last_answer() {
    let rows = [
        ("all-a", None),
        ("all-b", None),
        ("all-c", None),
        ("all-d", None),
    ];
    let p = Pool::new(Config::default(), "all", &rows).await;
    let asked = p.infer(&client(), chat("all", "doomed", false));
    let mut tried = Vec::new();
    for _ in 0..3 {
        let (i, task) = p.next_task().await;
        let name = p.members[i].name.clone();
        p.post(i, &task, answered(503, json!({"error": {"by": name}})))
            .await;
        tried.push(name);
    }
    let (status, body) = completion(outcome(asked).await);
    assert_eq!(status, 503);
    assert_eq!(body, json!({"error": {"by": tried[2]}}), "the last answer");
    tried.sort();
    tried.dedup();
    assert_eq!(tried.len(), 3, "each try on another member");
    for m in 0..4 {
        assert!(p.tasks(m).is_empty(), "no fourth try");
    }
    // With pool_retries 0 the first answer is the client's.
    let p = Pool::new(
        Config {
            pool_retries: 0,
            ..Config::default()
        },
        "one",
        &[("one-a", None), ("one-b", None)],
    )
    .await;
    let asked = p.infer(&client(), chat("one", "once", false));
    let (i, task) = p.next_task().await;
    p.post(i, &task, answered(502, json!({"error": "bad gateway"})))
        .await;
    assert_eq!(completion(outcome(asked).await).0, 502);
    settle().await;
    assert!(p.tasks(0).is_empty() && p.tasks(1).is_empty());
}

/// N concurrent requests over a pool of capacity C: never more than C tasks out at
/// once (per member, never more than its own), the rest wait in the queue, all end
/// with 200 and the counts come back to zero.
#[tokio::test(start_paused = true)]
async fn capacity_is_never_exceeded_under_concurrency() {
    let p = Pool::new(
        Config::default(),
        "cc",
        &[("cc-a", Some(2)), ("cc-b", Some(3))],
    )
    .await;
    let caps = [2, 3];
    let clients: Vec<_> = (0..20)
        .map(|n| {
            p.infer(
                &client_named(&format!("c{}", n % 4)),
                chat("cc", &format!("r{n}"), n % 3 == 0),
            )
        })
        .collect();
    let mut out: Vec<Vec<TaskFrame>> = vec![Vec::new(), Vec::new()];
    let mut answered_tasks = 0;
    let mut turn = 0;
    while answered_tasks < 20 {
        settle().await;
        for (m, tasks) in out.iter_mut().enumerate() {
            tasks.extend(p.tasks(m));
            assert!(
                tasks.len() <= caps[m],
                "{}: over capacity",
                p.members[m].name
            );
        }
        let outstanding = out[0].len() + out[1].len();
        let load = p.load();
        assert_eq!(load.in_flight as usize, outstanding);
        assert_eq!(load.capacity, Some(5));
        assert_eq!(
            load.queued as usize,
            20 - answered_tasks - outstanding,
            "the rest wait"
        );
        if answered_tasks + outstanding < 20 {
            assert_eq!(outstanding, 5, "while requests wait every slot is busy");
        }
        // Answer one task, the members in turn.
        turn = (turn + 1) % 2;
        let m = if out[turn].is_empty() { 1 - turn } else { turn };
        let task = out[m].remove(0);
        let result = if task.stream {
            TaskResult::Chunk {
                data: "{}".into(),
                done: true,
                seq: None,
            }
        } else {
            ok("done")
        };
        p.post(m, &task, result).await;
        answered_tasks += 1;
    }
    for asked in clients {
        match outcome(asked).await.unwrap() {
            Reply::Complete(c) => assert_eq!(c.status, 200),
            Reply::Stream(chunks) => assert_eq!(chunks.count().await, 1),
        }
    }
    assert_eq!(
        p.load(),
        PoolLoad {
            in_flight: 0,
            capacity: Some(5),
            queued: 0
        }
    );
}

/// A full queue answers 429 `queue_full` with a Retry-After at once; the requests in
/// the queue are still served.
#[tokio::test(start_paused = true)]
async fn a_full_queue_is_429() {
    let config = Config {
        queue_depth: 2,
        ..Config::default()
    };
    let p = Pool::new(config, "q", &[("q-a", Some(1))]).await;
    let first = p.infer(&client(), chat("q", "r0", false));
    let (_, t0) = p.next_task().await;
    let waiting: Vec<_> = (1..3)
        .map(|n| p.infer(&client(), chat("q", &format!("r{n}"), false)))
        .collect();
    p.queued(2).await;
    let err =
        p.f.gw
            .infer(&client(), chat("q", "one too many", false))
            .await
            .unwrap_err();
    assert_eq!((err.status(), err.code()), (429, "queue_full"));
    assert!(err.retry_after().is_some());
    assert_eq!(p.load().queued, 2, "the refused request took no place");
    p.post(0, &t0, ok("q-a")).await;
    assert_eq!(completion(outcome(first).await).0, 200);
    for asked in waiting {
        let (_, task) = p.next_task().await;
        p.post(0, &task, ok("q-a")).await;
        assert_eq!(completion(outcome(asked).await).0, 200);
    }
    assert!(p.tasks(0).is_empty(), "no task for the refused request");
}

/// A request that waits longer than `queue_wait` is 503 `queue_timeout`; none of its
/// time passes for nothing: no task was sent for it.
#[tokio::test(start_paused = true)]
async fn a_queue_wait_past_its_limit_is_503() {
    let config = Config {
        queue_wait: Duration::from_secs(10),
        ..Config::default()
    };
    let p = Pool::new(config, "qt", &[("qt-a", Some(1))]).await;
    let busy = p.infer(&client(), chat("qt", "busy", false));
    let (_, t0) = p.next_task().await;
    let late = p.infer(&client(), chat("qt", "late", false));
    p.queued(1).await;
    tokio::time::advance(Duration::from_millis(9_900)).await;
    settle().await;
    assert!(!late.is_finished(), "within its wait");
    tokio::time::advance(Duration::from_millis(200)).await;
    let err = outcome(late).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (503, "queue_timeout"));
    assert!(err.retry_after().is_some());
    assert_eq!(p.load().queued, 0);
    p.post(0, &t0, ok("qt-a")).await;
    assert_eq!(completion(outcome(busy).await).0, 200);
    assert!(
        p.tasks(0).is_empty(),
        "no task for the request that timed out"
    );
    assert_eq!(p.load().in_flight, 0);
}

/// A client's `x-request-timeout` bounds its wait in the queue below `queue_wait`.
#[tokio::test(start_paused = true)]
async fn x_request_timeout_bounds_the_queue_wait() {
    let p = Pool::new(Config::default(), "xt", &[("xt-a", Some(1))]).await;
    let busy = p.infer(&client(), chat("xt", "busy", false));
    let (_, t0) = p.next_task().await;
    let hurried = p.infer(
        &client(),
        chat("xt", "hurried", false).with_timeout(Some(Duration::from_secs(2))),
    );
    p.queued(1).await;
    tokio::time::advance(Duration::from_millis(1_900)).await;
    settle().await;
    assert!(!hurried.is_finished());
    tokio::time::advance(Duration::from_millis(200)).await;
    let err = outcome(hurried).await.unwrap_err();
    assert_eq!(err.code(), "queue_timeout", "2 s, not the gateway's 30 s");
    p.post(0, &t0, ok("xt-a")).await;
    assert_eq!(completion(outcome(busy).await).0, 200);
    assert!(p.tasks(0).is_empty());
}

/// A client that goes away while queued leaves the queue, and no task is ever sent
/// for it, even when a slot frees after.
#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_the_queue_is_never_sent_a_task() {
    let p = Pool::new(Config::default(), "lv", &[("lv-a", Some(1))]).await;
    let busy = p.infer(&client(), chat("lv", "busy", false));
    let (_, t0) = p.next_task().await;
    let leaving = p.infer(&client(), chat("lv", "leaving", false));
    p.queued(1).await;
    leaving.abort();
    p.queued(0).await;
    p.post(0, &t0, ok("lv-a")).await;
    assert_eq!(completion(outcome(busy).await).0, 200);
    settle().await;
    assert!(p.tasks(0).is_empty(), "no task for the client that left");
    assert_eq!(p.load().in_flight, 0, "its slot was not taken");
    let next = p.infer(&client(), chat("lv", "next", false));
    let (_, task) = p.next_task().await;
    assert_eq!(text(&task), "next");
    p.post(0, &task, ok("lv-a")).await;
    assert_eq!(completion(outcome(next).await).0, 200);
}

/// Two principals share a pool's queue by turns: one's burst does not starve the
/// other's single request.
#[tokio::test(start_paused = true)]
async fn principals_take_turns_in_a_pools_queue() {
    let p = Pool::new(Config::default(), "tt", &[("tt-a", Some(1))]).await;
    let first = p.infer(&client_named("x"), chat("tt", "x0", false));
    let (_, mut task) = p.next_task().await;
    let mut clients = vec![first];
    for (who, n) in [("a", 4), ("b", 1)] {
        for i in 0..n {
            clients.push(p.infer(&client_named(who), chat("tt", &format!("{who}{i}"), false)));
            p.queued(p.load().queued + 1).await;
        }
    }
    let mut order = vec![text(&task).to_owned()];
    for _ in 0..5 {
        p.post(0, &task, ok("tt-a")).await;
        task = p.next_task().await.1;
        order.push(text(&task).to_owned());
    }
    p.post(0, &task, ok("tt-a")).await;
    assert_eq!(order, ["x0", "a0", "b0", "a1", "a2", "a3"]);
    for asked in clients {
        assert_eq!(completion(outcome(asked).await).0, 200);
    }
}

fn conflicts(err: Error) -> Vec<(String, ConflictReason)> {
    assert_eq!((err.status(), err.code()), (409, "name_conflict"));
    match err {
        Error::Conflict { conflicts } => {
            conflicts.into_iter().map(|c| (c.name, c.reason)).collect()
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Another principal's row may not join a pool (409 `poolOwnedByAnother`, nothing of
/// the register written) unless the gateway grants it the pool, or it is an admin.
#[tokio::test(start_paused = true)]
async fn joining_another_principals_pool_needs_a_grant() {
    let f = fixture().await;
    f.register_specs(&alice(), vec![pooled("own-a", Some("owned"), Some(2))])
        .await
        .unwrap();
    let bob = publisher("bob");
    let err = f
        .register_specs(
            &bob,
            vec![pooled("own-b", Some("owned"), Some(2)), spec("bob-solo")],
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflicts(err),
        [("own-b".to_owned(), ConflictReason::PoolOwnedByAnother)]
    );
    assert_eq!(
        serde_json::to_value(ConflictReason::PoolOwnedByAnother).unwrap(),
        "poolOwnedByAnother"
    );
    assert!(f.try_row("own-b").await.is_none(), "nothing written");
    assert!(f.try_row("bob-solo").await.is_none(), "not even the rest");
    // Granted the pool by the gateway's configuration.
    let granted = publisher("bob").with_pools(["owned"]);
    f.register_specs(&granted, vec![pooled("own-b", Some("owned"), Some(2))])
        .await
        .unwrap();
    // A grant of another pool does not do.
    let elsewhere = publisher("carl").with_pools(["other"]);
    let err = f
        .register_specs(&elsewhere, vec![pooled("own-c", Some("owned"), None)])
        .await
        .unwrap_err();
    assert_eq!(
        conflicts(err),
        [("own-c".to_owned(), ConflictReason::PoolOwnedByAnother)]
    );
    // An admin may join any pool.
    let root = Principal::new("root", [Role::Admin]);
    f.register_specs(&root, vec![pooled("own-d", Some("owned"), None)])
        .await
        .unwrap();
    let mut members: Vec<String> =
        f.gw.members(&client(), "owned")
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name.to_string())
            .collect();
    members.sort();
    assert_eq!(members, ["own-a", "own-b", "own-d"]);
}

/// Pool keys and row names share one namespace, both ways: a pool may not be named
/// like a row outside it, and a row may not be named like another pool (409
/// `poolNameTaken`, nothing written).
#[tokio::test(start_paused = true)]
async fn a_pool_and_a_row_outside_it_may_not_share_a_name() {
    let f = fixture().await;
    // A row `taken`, serving in another pool.
    f.register_specs(&alice(), vec![pooled("taken", Some("elsewhere"), None)])
        .await
        .unwrap();
    let err = f
        .register_specs(&alice(), vec![pooled("joiner", Some("taken"), None)])
        .await
        .unwrap_err();
    assert_eq!(
        conflicts(err),
        [("joiner".to_owned(), ConflictReason::PoolNameTaken)]
    );
    assert!(f.try_row("joiner").await.is_none());
    // A pool `busy`, and a row named `busy` in another pool.
    f.register_specs(&alice(), vec![pooled("busy-a", Some("busy"), None)])
        .await
        .unwrap();
    let err = f
        .register_specs(&alice(), vec![pooled("busy", Some("other"), None)])
        .await
        .unwrap_err();
    assert_eq!(
        conflicts(err),
        [("busy".to_owned(), ConflictReason::PoolNameTaken)]
    );
    assert!(f.try_row("busy").await.is_none());
    assert_eq!(
        serde_json::to_value(ConflictReason::PoolNameTaken).unwrap(),
        "poolNameTaken"
    );
    // Named like its own pool, without a pool of its own: a member, not a conflict.
    f.register_specs(&alice(), vec![spec("busy")])
        .await
        .unwrap();
    let members = f.gw.members(&client(), "busy").await.unwrap();
    assert_eq!(members.len(), 2);
}

/// A member named by its own name answers alone: the others never see its
/// requests, and it waits for its own slot even when another member has room.
#[tokio::test(start_paused = true)]
async fn a_member_pinned_by_name_answers_alone() {
    let p = Pool::new(
        Config::default(),
        "pn",
        &[("pn-a", Some(1)), ("pn-b", Some(1))],
    )
    .await;
    let b = p.index("pn-b");
    for n in 0..3 {
        let asked = p.infer(&client(), chat("pn-b", &format!("r{n}"), false));
        let (i, task) = p.next_task().await;
        assert_eq!(i, b, "the pinned member");
        assert_eq!(task.llm.as_str(), "pn-b");
        p.post(i, &task, ok("pn-b")).await;
        assert_eq!(completion(outcome(asked).await).0, 200);
    }
    let held = p.infer(&client(), chat("pn-b", "held", false));
    let (_, t_held) = p.next_task().await;
    let waiting = p.infer(&client(), chat("pn-b", "waiting", false));
    p.queued(1).await;
    settle().await;
    assert!(p.tasks(1 - b).is_empty(), "the free member is not used");
    p.post(b, &t_held, ok("pn-b")).await;
    let (i, task) = p.next_task().await;
    assert_eq!((i, text(&task).as_str()), (b, "waiting"));
    p.post(i, &task, ok("pn-b")).await;
    for c in [held, waiting] {
        assert_eq!(completion(outcome(c).await).0, 200);
    }
}

/// A member that binds while requests wait serves them at once, without a slot
/// freeing: one that came back after losing its channel, and one published after
/// the requests were routed.
#[tokio::test(start_paused = true)]
async fn a_member_that_binds_serves_the_queue() {
    let mut p = Pool::new(
        Config::default(),
        "bk",
        &[("bk-a", Some(1)), ("bk-b", Some(1))],
    )
    .await;
    let (a, b) = (p.index("bk-a"), p.index("bk-b"));
    p.members[b]
        .binding
        .take()
        .unwrap()
        .release()
        .await
        .unwrap();
    let busy = p.infer(&client(), chat("bk", "busy", false));
    let (i, t_busy) = p.next_task().await;
    assert_eq!(i, a);
    let waiting = p.infer(&client(), chat("bk", "waiting", false));
    p.queued(1).await;
    // b comes back: a new channel for its session.
    let channel = FakeChannel::new();
    let binding =
        p.f.gw
            .bind(&alice(), &p.members[b].session, Arc::new(channel.clone()))
            .await
            .unwrap();
    p.members[b].binding = Some(binding);
    p.members[b].channel = channel;
    let (i, task) = p.next_task().await;
    assert_eq!(
        (i, text(&task).as_str()),
        (b, "waiting"),
        "served by the member back"
    );
    p.post(i, &task, ok("bk-b")).await;
    assert_eq!(completion(outcome(waiting).await).0, 200);

    // A member published after the request was routed.
    let late = p.infer(&client(), chat("bk", "late", false));
    let (i, t_b) = p.next_task().await;
    assert_eq!(i, b);
    let queued = p.infer(&client(), chat("bk", "queued", false));
    p.queued(1).await;
    let (_, _binding, channel) =
        p.f.online_specs(&alice(), vec![pooled("bk-c", Some("bk"), Some(1))])
            .await;
    let task = channel.next_task().await;
    assert_eq!(text(&task), "queued");
    let session = p.f.row("bk-c").await.provider_session_id.unwrap();
    p.f.gw
        .deliver(&alice(), &session, &task.task_id, ok("bk-c"))
        .await
        .unwrap();
    assert_eq!(completion(outcome(queued).await).0, 200);
    p.post(a, &t_busy, ok("bk-a")).await;
    p.post(b, &t_b, ok("bk-b")).await;
    for c in [busy, late] {
        assert_eq!(completion(outcome(c).await).0, 200);
    }
    assert_eq!(p.load().in_flight, 0);
}

/// `members` lists the pool's rows with their pool, capacity, tasks in flight and
/// the pool's queue; the views serialize them as `pool`, `maxConcurrent`, `inFlight`,
/// `queued`.
#[tokio::test(start_paused = true)]
async fn members_list_the_pool_with_its_load() {
    let p = Pool::new(
        Config::default(),
        "mb",
        &[("mb-a", Some(1)), ("mb-b", Some(1))],
    )
    .await;
    let c1 = p.infer(&client(), chat("mb", "one", false));
    let c2 = p.infer(&client(), chat("mb", "two", false));
    let c3 = p.infer(&client(), chat("mb", "three", false));
    p.queued(1).await;
    let views = p.f.gw.members(&client(), "mb").await.unwrap();
    let mut names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["mb-a", "mb-b"]);
    for v in &views {
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(json["pool"], "mb");
        assert_eq!(json["maxConcurrent"], 1);
        assert_eq!(json["inFlight"], 1);
        assert_eq!(json["queued"], 1);
    }
    let one = p.f.gw.get(&client(), "mb-a").await.unwrap();
    assert_eq!((one.in_flight, one.queued), (1, 1));
    assert_eq!(
        p.f.gw
            .members(&client(), "nope")
            .await
            .unwrap_err()
            .status(),
        404
    );
    // A member's pool key is its pool; a row without a pool is a pool of one.
    let listed = p.f.gw.list(&client()).await.unwrap();
    assert!(
        listed
            .iter()
            .all(|v| v.pool.as_ref().map(|k| k.as_str()) == Some("mb"))
    );
    for _ in 0..3 {
        let (i, task) = p.next_task().await;
        p.post(i, &task, ok("mb")).await;
    }
    for c in [c1, c2, c3] {
        assert_eq!(completion(outcome(c).await).0, 200);
    }
    for v in p.f.gw.members(&client(), "mb").await.unwrap() {
        assert_eq!((v.in_flight, v.queued), (0, 0));
    }
}

/// `/v1/models` lists each pool key with an active member once; members named
/// otherwise are not listed, and a pool with no active member is not either.
#[tokio::test(start_paused = true)]
async fn models_list_each_pool_once() {
    let mut p = Pool::new(
        Config::default(),
        "llama",
        &[("llama-1", None), ("llama-2", None), ("llama-3", None)],
    )
    .await;
    p.f.online("alice", &["solo"]).await;
    let (_, gone, _) =
        p.f.online_specs(&alice(), vec![pooled("gone-1", Some("gone"), None)])
            .await;
    gone.release().await.unwrap();
    let ids = |models: Vec<virtual_llm_core::Model>| -> Vec<String> {
        models.into_iter().map(|m| m.id.to_string()).collect()
    };
    assert_eq!(
        ids(p.f.gw.active_models(&client()).await.unwrap()),
        ["llama", "solo"]
    );
    // One member left is enough; none is not.
    for m in 0..2 {
        p.members[m]
            .binding
            .take()
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    assert_eq!(
        ids(p.f.gw.active_models(&client()).await.unwrap()),
        ["llama", "solo"]
    );
    p.members[2]
        .binding
        .take()
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(
        ids(p.f.gw.active_models(&client()).await.unwrap()),
        ["solo"]
    );
}

// ---------------------------------------------------------------------------------
// The in-flight counts, property-tested through a gateway.
// ---------------------------------------------------------------------------------

mod counts {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use virtual_llm_core::TaskId;

    use super::*;

    /// How a task ends.
    #[derive(Clone, Copy, Debug)]
    enum End {
        /// The publisher answers 200 (or ends the stream).
        Done,
        /// The publisher reports an upstream error: the request may fail over.
        Upstream,
        /// The publisher answers with an error status (503 fails over, the others
        /// are the client's answer).
        Status(u16),
        /// The client goes away: its handle is dropped.
        Cancel,
        /// Time passes beyond the task deadline (every task out then expires).
        Deadline,
        /// The member's channel is lost, and bound again.
        ChannelLoss,
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A client request, from one of three principals.
        Start { stream: bool, who: u8 },
        /// One of the tasks out ends.
        End { pick: usize, how: End },
    }

    fn step() -> impl Strategy<Value = Step> {
        let end = prop_oneof![
            3 => Just(End::Done),
            1 => Just(End::Upstream),
            1 => prop::sample::select(vec![400u16, 500, 503]).prop_map(End::Status),
            1 => Just(End::Cancel),
            1 => Just(End::Deadline),
            1 => Just(End::ChannelLoss),
        ];
        prop_oneof![
            3 => (any::<bool>(), 0u8..3).prop_map(|(stream, who)| Step::Start { stream, who }),
            2 => (any::<usize>(), end).prop_map(|(pick, how)| Step::End { pick, how }),
        ]
    }

    /// What the test knows: the tasks out (seen on a channel, not ended), with their
    /// member and request, and the clients still waiting for an answer.
    #[derive(Default)]
    struct Seen {
        out: HashMap<TaskId, (usize, usize, TaskFrame)>,
        clients: HashMap<usize, JoinHandle<Result<Reply, Error>>>,
        next: usize,
    }

    const DEADLINE: Duration = Duration::from_secs(10);

    async fn run(caps: Vec<u32>, steps: Vec<Step>) {
        let config = Config {
            task_deadline: DEADLINE,
            stream_idle_timeout: DEADLINE,
            queue_wait: Duration::from_secs(25),
            ..Config::default()
        };
        let names: Vec<String> = (0..caps.len()).map(|i| format!("pp-{i}")).collect();
        let rows: Vec<(&str, Option<u32>)> = names
            .iter()
            .zip(&caps)
            .map(|(n, c)| (n.as_str(), Some(*c)))
            .collect();
        let mut p = Pool::new(config, "pp", &rows).await;
        let mut seen = Seen::default();
        for step in steps {
            apply(&mut p, &mut seen, step).await;
            check(&p, &mut seen, &caps).await;
        }
        // Every task ends: the queue drains into the freed slots, then nothing is left.
        for _ in 0..1_000 {
            if seen.clients.is_empty() {
                break;
            }
            match seen.out.keys().next().cloned() {
                Some(id) => end(&mut p, &mut seen, id, End::Done).await,
                None => tokio::time::advance(Duration::from_secs(30)).await,
            }
            check(&p, &mut seen, &caps).await;
        }
        assert!(seen.clients.is_empty(), "every request ended");
        assert_eq!(
            p.load(),
            PoolLoad {
                in_flight: 0,
                capacity: Some(caps.iter().sum()),
                queued: 0
            }
        );
        for v in p.f.gw.members(&client(), "pp").await.unwrap() {
            assert_eq!((v.in_flight, v.queued), (0, 0), "{}", v.name);
        }
    }

    async fn apply(p: &mut Pool, seen: &mut Seen, step: Step) {
        match step {
            Step::Start { stream, who } => {
                let n = seen.next;
                seen.next += 1;
                let request = chat("pp", &n.to_string(), stream);
                let handle = p.infer(&client_named(&format!("c{who}")), request);
                seen.clients.insert(n, handle);
            }
            Step::End {
                how: End::Deadline, ..
            } => tokio::time::advance(DEADLINE).await,
            Step::End { pick, how } => {
                if seen.out.is_empty() {
                    return;
                }
                let mut ids: Vec<&TaskId> = seen.out.keys().collect();
                ids.sort_by_key(|id| id.to_string());
                let id = ids[pick % ids.len()].clone();
                end(p, seen, id, how).await;
            }
        }
    }

    async fn end(p: &mut Pool, seen: &mut Seen, id: TaskId, how: End) {
        let (m, n, task) = seen.out.get(&id).cloned().unwrap();
        match how {
            End::Done if task.stream => {
                let done = TaskResult::Chunk {
                    data: "{}".into(),
                    done: true,
                    seq: None,
                };
                p.post(m, &task, done).await;
            }
            End::Done => p.post(m, &task, ok("done")).await,
            End::Upstream => {
                let failed = TaskResult::Failed {
                    message: "upstream unreachable".into(),
                };
                p.post(m, &task, failed).await;
            }
            End::Status(status) => {
                p.post(m, &task, answered(status, json!({"error": status})))
                    .await
            }
            End::Cancel => {
                if let Some(client) = seen.clients.remove(&n) {
                    client.abort();
                }
            }
            End::Deadline => unreachable!("time moves for every task"),
            End::ChannelLoss => {
                let member = &mut p.members[m];
                let binding = member.binding.take().unwrap();
                assert!(binding.release().await.unwrap());
                // Its tasks failed with it; no cancel frame comes for them.
                seen.out.retain(|_, (on, _, _)| *on != m);
                let channel = FakeChannel::new();
                let binding =
                    p.f.gw
                        .bind(&alice(), &member.session, Arc::new(channel.clone()))
                        .await
                        .unwrap();
                member.binding = Some(binding);
                member.channel = channel;
            }
        }
        if !matches!(how, End::Cancel | End::ChannelLoss) {
            seen.out.remove(&id);
        }
    }

    /// Takes in every frame sent, then checks that each member's count is exactly
    /// its tasks out, within its capacity, and that the queue holds the rest.
    async fn check(p: &Pool, seen: &mut Seen, caps: &[u32]) {
        settle().await;
        for (m, member) in p.members.iter().enumerate() {
            for frame in member.channel.take() {
                match frame {
                    GatewayFrame::Task(t) => {
                        let n: usize = text(&t).parse().unwrap();
                        let id = t.task_id.clone();
                        assert!(seen.out.insert(id, (m, n, t)).is_none(), "a task once");
                    }
                    GatewayFrame::Cancel(c) => {
                        assert!(
                            seen.out.remove(&c.task_id).is_some(),
                            "a cancel for a task out"
                        );
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
        }
        let finished: Vec<usize> = seen
            .clients
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(n, _)| *n)
            .collect();
        for n in finished {
            let answer = seen.clients.remove(&n).unwrap().await.unwrap();
            // A request ends with an answer of some member, or one of the gateway's
            // own errors: never a panic, never a lost request.
            if let Err(e) = answer {
                assert!(matches!(e.status(), 502..=504), "request {n}: {e}");
            }
        }
        let views = p.f.gw.members(&client(), "pp").await.unwrap();
        let mut total = 0;
        for (m, member) in p.members.iter().enumerate() {
            let out = seen.out.values().filter(|(on, _, _)| *on == m).count() as u32;
            assert!(
                out <= caps[m],
                "{}: {out} tasks over {}",
                member.name,
                caps[m]
            );
            let view = views
                .iter()
                .find(|v| v.name.as_str() == member.name)
                .unwrap();
            assert_eq!(
                view.in_flight, out,
                "{}: its count is its tasks out",
                member.name
            );
            total += out;
        }
        let load = p.load();
        assert_eq!(load.in_flight, total);
        assert_eq!(
            load.queued as usize,
            seen.clients.len()
                - seen
                    .out
                    .values()
                    .filter(|(_, n, _)| seen.clients.contains_key(n))
                    .count(),
            "every client without a task waits in the queue"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever ends each task (an answer, an error, a client leaving, a deadline,
        /// a lost channel), a row's count is exactly its tasks out, never over its
        /// capacity, and back to zero when everything ended.
        #[test]
        fn in_flight_counts_follow_every_task_to_its_end(
            caps in prop::collection::vec(1u32..4, 1..4),
            steps in prop::collection::vec(step(), 1..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(run(caps, steps));
        }
    }
}

// ---------------------------------------------------------------------------------
// The pick: `choose`, its ranked form, and `LocalAdmission`'s picks against a model.
// ---------------------------------------------------------------------------------

mod picks {
    use futures::FutureExt;
    use proptest::prelude::*;
    use tokio::time::Instant;
    use virtual_llm_core::admission::{Ask, Grant, Outcome};
    use virtual_llm_core::protocol::MAX_CONCURRENT;
    use virtual_llm_core::router::{Load, UNRANKED, choose, choose_ranked};
    use virtual_llm_core::testkit::admission_suite::member;
    use virtual_llm_core::{LlmRecord, LlmStatus, Route};

    use super::*;

    fn load() -> impl Strategy<Value = Load> {
        let capacity = prop_oneof![
            4 => (1u32..=8).prop_map(Some),
            1 => (1u32..=MAX_CONCURRENT).prop_map(Some),
            1 => Just(None),
        ];
        (capacity, 0u32..=12).prop_map(|(capacity, in_flight)| Load {
            in_flight: capacity.map_or(in_flight, |c| in_flight.min(c)),
            capacity,
        })
    }

    /// Whether `a` is lighter than `b`, by cross-multiplying (an unlimited row counts
    /// with a capacity above any limit).
    fn lighter(a: Load, b: Load) -> bool {
        let cap = |l: Load| l.capacity.map_or(u64::from(MAX_CONCURRENT) + 1, u64::from);
        u64::from(a.in_flight) * cap(b) < u64::from(b.in_flight) * cap(a)
    }

    proptest! {
        /// A rank orders loads exactly as in-flight / capacity does.
        #[test]
        fn ranks_order_loads_exactly(a in load(), b in load()) {
            prop_assert_eq!(a.rank() < b.rank(), lighter(a, b));
            prop_assert_eq!(a.rank() == b.rank(), !lighter(a, b) && !lighter(b, a));
            prop_assert!(a.rank() < UNRANKED);
        }

        /// `choose_ranked` over ranks picks what `choose` picks over loads.
        #[test]
        fn choose_ranked_is_choose(
            loads in prop::collection::vec(prop::option::of(load()), 1..40),
            cursor in any::<usize>(),
        ) {
            let ranks: Vec<u64> = loads
                .iter()
                .map(|l| l.filter(|l| l.has_room()).map_or(UNRANKED, Load::rank))
                .collect();
            prop_assert_eq!(choose_ranked(&ranks, cursor), choose(&loads, cursor, |l| *l));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A request for the pool, excluding the rows of the mask, or pinned to one.
        Admit {
            exclude: u8,
            pinned: Option<usize>,
        },
        Release(usize),
        Report(usize, bool),
        /// The registry writes the row stopped (`false`) or serving again (`true`).
        Serve(usize, bool),
        Wait(u64),
    }

    fn op(rows: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), prop::option::weighted(0.2, 0..rows))
                .prop_map(|(exclude, pinned)| Op::Admit { exclude, pinned }),
            4 => any::<usize>().prop_map(Op::Release),
            2 => (0..rows, prop::bool::weighted(0.7)).prop_map(|(r, failed)| Op::Report(r, failed)),
            1 => (0..rows, any::<bool>()).prop_map(|(r, on)| Op::Serve(r, on)),
            1 => (0u64..3_000).prop_map(Op::Wait),
        ]
    }

    /// What a row is, as the test keeps it.
    struct Row {
        record: LlmRecord,
        in_flight: u32,
        failures: u32,
        cool_until: Option<Instant>,
    }

    impl Row {
        fn serving(&self) -> bool {
            Route::serving(&self.record)
        }

        fn load(&self) -> Load {
            Load {
                in_flight: self.in_flight,
                capacity: self.record.max_concurrent,
            }
        }
    }

    /// A row stopped with nothing in flight is one the admission may forget: it
    /// comes back with a clean slate.
    fn forgotten(row: &mut Row) {
        row.failures = 0;
        row.cool_until = None;
    }

    async fn run(caps: Vec<Option<u32>>, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let config = Config {
            cooldown_after: 2,
            cooldown: Duration::from_secs(2),
            ..Config::default()
        };
        let adm: Arc<dyn Admission> = Arc::new(LocalAdmission::new(&config));
        let mut rows: Vec<Row> = caps
            .iter()
            .enumerate()
            .map(|(i, cap)| Row {
                record: member(&format!("pk-{i}"), "pk", *cap),
                in_flight: 0,
                failures: 0,
                cool_until: None,
            })
            .collect();
        // The registry wrote them: the admission knows them from the start.
        for row in &rows {
            adm.observe(&row.record);
        }
        let mut held: Vec<Grant> = Vec::new();
        for op in ops {
            match op {
                Op::Admit { exclude, pinned } => {
                    let now = Instant::now();
                    let excluded: Vec<LlmName> = (0..rows.len())
                        .filter(|i| exclude & (1 << i) != 0)
                        .map(|i| rows[i].record.name.clone())
                        .collect();
                    let route = Route {
                        agent: None,
                        pool: LlmName::parse("pk").unwrap(),
                        rows: match pinned {
                            Some(p) => vec![rows[p].record.clone()].into(),
                            None => rows.iter().map(|r| r.record.clone()).collect(),
                        },
                        pinned: pinned.map(|p| rows[p].record.name.clone()),
                    };
                    let candidate = |i: usize, r: &Row| {
                        r.serving()
                            && r.cool_until.is_none_or(|t| now >= t)
                            && !excluded.contains(&r.record.name)
                            && pinned.is_none_or(|p| p == i)
                            && r.load().has_room()
                    };
                    let ask = Ask {
                        principal: "p",
                        route: &route,
                        exclude: &excluded,
                        until: now + Duration::from_secs(3600),
                        waking: false,
                    };
                    let answer = adm.admit(ask).now_or_never();
                    let candidates: Vec<usize> = (0..rows.len())
                        .filter(|i| candidate(*i, &rows[*i]))
                        .collect();
                    match answer {
                        Some(Ok(grant)) => {
                            let i = rows
                                .iter()
                                .position(|r| r.record.name == grant.row)
                                .unwrap();
                            prop_assert!(candidates.contains(&i), "{} is no candidate", grant.row);
                            for &c in &candidates {
                                prop_assert!(
                                    !lighter(rows[c].load(), rows[i].load()),
                                    "{} picked over the lighter {}",
                                    grant.row,
                                    rows[c].record.name
                                );
                            }
                            rows[i].in_flight += 1;
                            held.push(grant);
                        }
                        _ => {
                            prop_assert!(candidates.is_empty(), "no grant with {candidates:?} free")
                        }
                    }
                }
                Op::Release(k) if !held.is_empty() => {
                    let grant = held.swap_remove(k % held.len());
                    adm.release(&grant);
                    let row = rows
                        .iter_mut()
                        .find(|r| r.record.name == grant.row)
                        .unwrap();
                    row.in_flight -= 1;
                    if !row.serving() && row.in_flight == 0 {
                        forgotten(row);
                    }
                }
                Op::Release(_) => {}
                Op::Report(i, failed) => {
                    let grant = Grant {
                        row: rows[i].record.name.clone(),
                        pool: LlmName::parse("pk").unwrap(),
                    };
                    // Reports come for rows that serve.
                    if !rows[i].serving() {
                        continue;
                    }
                    let outcome = if failed {
                        Outcome::Failed
                    } else {
                        Outcome::Answered
                    };
                    adm.report(&grant, outcome);
                    let row = &mut rows[i];
                    if failed {
                        row.failures += 1;
                        if row.failures >= 2 {
                            row.failures = 0;
                            row.cool_until = Some(Instant::now() + Duration::from_secs(2));
                        }
                    } else {
                        row.failures = 0;
                    }
                }
                Op::Serve(i, on) => {
                    let row = &mut rows[i];
                    if on == row.serving() {
                        continue;
                    }
                    let mut record = row.record.clone();
                    record.revision += 1;
                    if on {
                        record.status = LlmStatus::Active;
                        record.binding = member("pk-x", "pk", None).binding;
                    } else {
                        record.status = LlmStatus::Inactive;
                        record.binding = None;
                    }
                    adm.observe(&record);
                    row.record = record;
                    // Bound to a new channel, a row's failures are behind it; stopped
                    // with nothing in flight, it may be forgotten.
                    if on || row.in_flight == 0 {
                        forgotten(row);
                    }
                }
                Op::Wait(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            }
            for row in &rows {
                prop_assert_eq!(adm.in_flight(&row.record), row.in_flight);
            }
        }
        for grant in held {
            adm.release(&grant);
        }
        for row in &rows {
            prop_assert_eq!(adm.in_flight(&row.record), 0);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Whatever happened before (grants, releases, failures and cooldowns, rows
        /// stopping and coming back, time passing), `LocalAdmission` grants a
        /// candidate with room whose load is the lowest, and only when there is one.
        #[test]
        fn local_admission_picks_the_lightest_candidate(
            (caps, ops) in prop::collection::vec(
                prop_oneof![3 => (1u32..4).prop_map(Some), 1 => Just(None)], 1..6,
            )
            .prop_flat_map(|caps| {
                let n = caps.len();
                (Just(caps), prop::collection::vec(op(n), 1..80))
            }),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(run(caps, ops))?;
        }
    }
}
