//! Pools, the queue and wake across two gateway replicas (SPEC §14, "everything else
//! holds across replicas") on a real PostgreSQL and a real `nats-server`: a row's
//! tasks are counted where its channel is, whoever's client sent them, and a task
//! past its capacity is refused there; a request queued on one replica is woken by
//! the slot freeing on the other (an event over NATS, no polling); a sleeping row is
//! woken once, whichever replicas its requests came to. The publisher is a recording
//! channel bound on replica B; clients call both replicas. Skipped, loudly, where
//! PostgreSQL or `nats-server` is not installed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use virtual_llm::admission::{Ask, Grant, LoadChanges, Outcome, PoolLoad, RowLoad};
use virtual_llm::nats::testing as nats;
use virtual_llm::nats::{NatsOptions, NatsPlane};
use virtual_llm::postgres::PgStore;
use virtual_llm::postgres::testing as pg;
use virtual_llm::protocol::{
    GatewayFrame, LlmSpec, LlmState, PROTOCOL_VERSION, RegisterRequest, TaskFrame, TaskResult,
    UpstreamState,
};
use virtual_llm::testkit::FakeChannel;
use virtual_llm::{
    Admission, Binding, Config, Error, Gateway, GatewayBuilder, InferRequest, LlmId, LlmName,
    LlmRecord, LocalAdmission, Principal, ReplicaId, Reply, Role, SessionId, UnavailableKind,
};

/// A bound for a hang, never a delay the test waits out.
const CAP: Duration = Duration::from_secs(15);

fn alice() -> Principal {
    Principal::new("alice", [Role::Publisher])
}

fn carol() -> Principal {
    Principal::new("carol", [Role::Client])
}

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

fn chat(model: &str, text: &str) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model, "stream": false,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CAP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {CAP:?}"))
}

/// Polls `ok` (every 10 ms) until it holds, for at most [`CAP`].
async fn until(what: &str, ok: impl Fn() -> bool + Send + Sync) {
    within(what, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Replicas `gw-a` and `gw-b`, each with its own connections to one fresh database
/// and to the test binary's `nats-server`, as two processes would have.
struct Cluster {
    a: Gateway,
    b: Gateway,
    _planes: (NatsPlane, NatsPlane),
}

async fn cluster(a_admission: Option<Arc<dyn Admission>>) -> Option<Cluster> {
    let db = pg::fresh_database().await?;
    let server = nats::shared()?;
    let options = NatsOptions::default().with_prefix(nats::fresh_prefix());
    let plane = |id: &str| {
        let options = options.clone();
        let url = server.url();
        let id = ReplicaId::parse(id).unwrap();
        async move { NatsPlane::connect(&url, id, options).await.unwrap() }
    };
    let (pa, pb) = (plane("gw-a").await, plane("gw-b").await);
    assert!(pa.wait_for_peers(1, CAP).await, "a hears of b");
    assert!(pb.wait_for_peers(1, CAP).await, "b hears of a");
    let config = Config {
        queue_wait: Duration::from_secs(60),
        wake_wait: Duration::from_secs(60),
        ..Config::default()
    };
    let builder = |admission: Option<Arc<dyn Admission>>| {
        let db = db.clone();
        let config = config.clone();
        async move {
            let store = PgStore::connect(&db).await.unwrap();
            let builder: GatewayBuilder = Gateway::builder(Arc::new(store)).config(config);
            match admission {
                Some(a) => builder.admission(a),
                None => builder,
            }
        }
    };
    let a = pa.join(builder(a_admission).await).await.unwrap();
    let b = pb.join(builder(None).await).await.unwrap();
    Some(Cluster {
        a,
        b,
        _planes: (pa, pb),
    })
}

/// Registers `llm` on `on` (capacity `max`, upstream `state`) and binds a recording
/// channel to it, bound while the [`Binding`] is held.
async fn publish(
    on: &Gateway,
    llm: &str,
    max: u32,
    state: UpstreamState,
) -> (SessionId, FakeChannel, Binding) {
    let mut spec = LlmSpec::new(name(llm), "openai", format!("{llm}-model"));
    spec.max_concurrent = Some(max);
    spec.state = Some(state);
    let answer = on
        .register(
            &alice(),
            RegisterRequest {
                agents: Vec::new(),
                provider_session_id: None,
                protocol_version: Some(PROTOCOL_VERSION),
                capabilities: Vec::new(),
                llms: vec![spec],
            },
        )
        .await
        .unwrap();
    let session = answer.provider_session_id;
    let channel = FakeChannel::new();
    let binding = on
        .bind(&alice(), &session, Arc::new(channel.clone()))
        .await
        .unwrap();
    (session, channel, binding)
}

/// Answers `task` through `on` (the replica the publisher posts to).
async fn answer(on: &Gateway, session: &SessionId, task: &TaskFrame, text: &str) {
    let body = json!({"choices": [{"message": {"content": text}}]});
    on.deliver(
        &alice(),
        session,
        &task.task_id,
        TaskResult::Completed {
            status: 200,
            body: body.into(),
            retry_after: None,
        },
    )
    .await
    .unwrap();
}

fn content(reply: Result<Reply, Error>) -> String {
    match reply.unwrap() {
        Reply::Complete(c) => {
            assert_eq!(c.status, 200, "{:?}", c.body);
            c.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        }
        Reply::Stream(_) => panic!("a whole answer"),
    }
}

fn load(on: &Gateway, pool: &str) -> PoolLoad {
    on.pool_load(&name(pool))
}

/// A replica on the row's pool as an active member, to the other replica's view.
async fn serving_on(on: &Gateway, llm: &str) {
    within("the row serves as the other replica reads it", async {
        loop {
            if let Ok(route) = on.route(&carol(), llm).await
                && route.rows.iter().all(virtual_llm::Route::serving)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A row of capacity 1 whose channel B holds: B's client takes the slot; A's
/// client then waits in A's queue (A sees the row full through B's report, and
/// no second task reaches the channel); when B's task ends, the slot freed on B
/// reaches A over NATS and A's request is sent and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_freed_where_the_channel_is_wakes_a_request_queued_on_the_other_replica() {
    let Some(c) = cluster(None).await else { return };
    let (session, channel, _bound) = publish(&c.b, "solo", 1, UpstreamState::Ready).await;
    serving_on(&c.a, "solo").await;

    let b = c.b.clone();
    let on_b = tokio::spawn(async move { b.infer(&carol(), chat("solo", "from b")).await });
    let first = within("b's task reaches the channel", channel.next_task()).await;
    // B reports the row full; A's view follows.
    until("a sees the row's one slot taken on b", || {
        load(&c.a, "solo").in_flight == 1
    })
    .await;

    let a = c.a.clone();
    let on_a = tokio::spawn(async move { a.infer(&carol(), chat("solo", "from a")).await });
    until("a's request waits in a's queue", || {
        load(&c.a, "solo").queued == 1
    })
    .await;
    assert!(
        channel.take().is_empty(),
        "nothing more reached the channel while the row was full"
    );

    answer(&c.b, &session, &first, "answer b").await;
    assert_eq!(
        content(within("b's answer", on_b).await.unwrap()),
        "answer b"
    );
    let second = within(
        "a's task reaches the channel once b's slot is free",
        channel.next_task(),
    )
    .await;
    assert_eq!(load(&c.a, "solo").queued, 0);
    answer(&c.b, &session, &second, "answer a").await;
    assert_eq!(
        content(within("a's answer", on_a).await.unwrap()),
        "answer a"
    );
    until("both replicas count the row idle again", || {
        load(&c.a, "solo").in_flight == 0 && load(&c.b, "solo").in_flight == 0
    })
    .await;
}

/// A's own admission, deaf to what the holder reports: a replica whose view of the
/// row is as stale as it may be.
#[derive(Debug)]
struct Deaf(LocalAdmission);

#[async_trait::async_trait]
impl Admission for Deaf {
    async fn admit(&self, ask: Ask<'_>) -> Result<Grant, Error> {
        self.0.admit(ask).await
    }
    fn try_admit(&self, row: &LlmRecord) -> Result<Grant, Error> {
        self.0.try_admit(row)
    }
    fn release(&self, grant: &Grant) {
        self.0.release(grant);
    }
    fn fail_waiters(&self, pool: &LlmName, error: &(dyn Fn() -> Error + Sync)) -> usize {
        self.0.fail_waiters(pool, error)
    }
    fn report(&self, grant: &Grant, outcome: Outcome) {
        self.0.report(grant, outcome);
    }
    fn observe(&self, row: &LlmRecord) {
        self.0.observe(row);
    }
    fn forget(&self, name: &LlmName, id: &LlmId) {
        self.0.forget(name, id);
    }
    fn in_flight(&self, row: &LlmRecord) -> u32 {
        self.0.in_flight(row)
    }
    fn load(&self, pool: &LlmName) -> PoolLoad {
        self.0.load(pool)
    }
    fn follow_loads(&self) -> Option<Arc<LoadChanges>> {
        self.0.follow_loads()
    }
    fn count(&self, pool: &LlmName, row: &LlmName) -> u32 {
        self.0.count(pool, row)
    }
    fn heard(&self, _load: &RowLoad, _until: Instant) {}
}

/// However stale a replica's view, the replica holding the channel never lets the
/// row have more tasks than its capacity: A (deaf to B's reports) sends a task to a
/// full row, and B refuses it (503 saturated on A, nothing reaches the channel); once
/// B's task ended, A's next task is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_holding_the_channel_refuses_a_task_past_the_rows_capacity() {
    let deaf = Arc::new(Deaf(LocalAdmission::new(&Config::default())));
    let Some(c) = cluster(Some(deaf)).await else {
        return;
    };
    let (session, channel, _bound) = publish(&c.b, "solo", 1, UpstreamState::Ready).await;
    serving_on(&c.a, "solo").await;

    let b = c.b.clone();
    let on_b = tokio::spawn(async move { b.infer(&carol(), chat("solo", "from b")).await });
    let first = within("b's task reaches the channel", channel.next_task()).await;

    let row = c.a.route(&carol(), "solo").await.unwrap().rows[0].clone();
    let mut refused =
        c.a.start_task(&carol(), &row, chat("solo", "too many"))
            .unwrap();
    let err = within("the refusal", refused.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                kind: UnavailableKind::Saturated,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        channel.take().is_empty(),
        "the refused task never reached the channel"
    );
    assert_eq!(
        load(&c.b, "solo").in_flight,
        1,
        "b counts its own task only"
    );

    answer(&c.b, &session, &first, "answer b").await;
    assert_eq!(
        content(within("b's answer", on_b).await.unwrap()),
        "answer b"
    );
    until("b's slot is free", || load(&c.b, "solo").in_flight == 0).await;
    let mut taken = c.a.start_task(&carol(), &row, chat("solo", "now")).unwrap();
    let task = within("a's task reaches the channel", channel.next_task()).await;
    assert_eq!(&task.task_id, taken.id());
    until("b counts a's task where the channel is", || {
        load(&c.b, "solo").in_flight == 1
    })
    .await;
    answer(&c.b, &session, &task, "answer a").await;
    let event = within("a's answer", taken.next()).await.unwrap().unwrap();
    assert!(
        matches!(event, virtual_llm::TaskEvent::Completed(_)),
        "{event:?}"
    );
    until(
        "b's slot for a's task is freed with its last result",
        || load(&c.b, "solo").in_flight == 0,
    )
    .await;
}

/// The row `llm` as hibernating and bound, to `on`'s view.
async fn hibernating_on(on: &Gateway, llm: &str) {
    within("the row reads hibernating and bound", async {
        loop {
            if let Ok(route) = on.route(&carol(), llm).await
                && route.rows[0].binding.is_some()
                && route.rows[0].status == virtual_llm::LlmStatus::Hibernating
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A request for `sleepy` through A, sent while the row sleeps: it waits for the wake
/// its replica sends to the publisher, whose frame is taken off `channel` here.
async fn ask_a_to_wake(
    c: &Cluster,
    channel: &FakeChannel,
) -> tokio::task::JoinHandle<Result<Reply, Error>> {
    let a = c.a.clone();
    let on_a = tokio::spawn(async move { a.infer(&carol(), chat("sleepy", "from a")).await });
    let wake = within("a's wake reaches the publisher", channel.next()).await;
    assert!(
        matches!(&wake, GatewayFrame::Wake(w) if w.llm == name("sleepy")),
        "{wake:?}"
    );
    until("a's request waits for the wake", || {
        load(&c.a, "sleepy").queued == 1
    })
    .await;
    on_a
}

/// A sleeping row whose channel B holds, asked for through both replicas: one wake
/// frame reaches the publisher (A's wake goes to B, which starts it; B's own request
/// joins it); when the publisher reports the model ready, both requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_row_is_woken_once_whichever_replicas_its_requests_came_to() {
    let Some(c) = cluster(None).await else { return };
    let (session, channel, _bound) = publish(&c.b, "sleepy", 4, UpstreamState::Asleep).await;
    hibernating_on(&c.a, "sleepy").await;

    let on_a = ask_a_to_wake(&c, &channel).await;

    let b = c.b.clone();
    let on_b = tokio::spawn(async move { b.infer(&carol(), chat("sleepy", "from b")).await });
    until("b's request waits for the same wake", || {
        load(&c.b, "sleepy").queued == 1
    })
    .await;
    assert!(
        channel.take().is_empty(),
        "no second wake: the row is woken once across the replicas"
    );

    let ready = LlmState {
        name: name("sleepy"),
        state: UpstreamState::Ready,
        wake_failed: None,
    };
    c.b.heartbeat_with(&alice(), &session, &[ready])
        .await
        .unwrap();
    let mut tasks = [
        within("the first task once awake", channel.next_task()).await,
        within("the second task once awake", channel.next_task()).await,
    ];
    tasks.sort_by_key(|t| t.body.get().contains("from b"));
    answer(&c.b, &session, &tasks[0], "answer a").await;
    answer(&c.b, &session, &tasks[1], "answer b").await;
    assert_eq!(
        content(within("a's answer", on_a).await.unwrap()),
        "answer a"
    );
    assert_eq!(
        content(within("b's answer", on_b).await.unwrap()),
        "answer b"
    );
}

/// A sleeping row whose channel B holds, asked for through A: when its publisher
/// reports to B that the wake failed, A's waiting request fails at once with 503
/// `wake_failed` and the publisher's message (not at the end of the minute-long wake
/// wait), and A holds off waking the row for the cooldown: its next request is
/// refused the same way, and no second wake reaches the publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wake_fails_the_requests_waiting_on_the_other_replica() {
    let Some(c) = cluster(None).await else { return };
    let (session, channel, _bound) = publish(&c.b, "sleepy", 4, UpstreamState::Asleep).await;
    hibernating_on(&c.a, "sleepy").await;

    let on_a = ask_a_to_wake(&c, &channel).await;

    let why = "exit status 5: no GPU left";
    let failed = LlmState {
        name: name("sleepy"),
        state: UpstreamState::Asleep,
        wake_failed: Some(why.to_owned()),
    };
    c.b.heartbeat_with(&alice(), &session, &[failed])
        .await
        .unwrap();
    let refused = within("a's request hears of the failure", on_a)
        .await
        .unwrap();
    match refused {
        Err(Error::WakeFailed { message, .. }) => assert_eq!(message, why),
        other => panic!("503 wake_failed, not {other:?}"),
    }
    assert_eq!(load(&c.a, "sleepy").queued, 0);

    let again = within(
        "a's next request",
        c.a.infer(&carol(), chat("sleepy", "again")),
    )
    .await;
    match again {
        Err(e @ Error::WakeFailed { .. }) => assert_eq!(e.status(), 503),
        other => panic!("503 wake_failed during the cooldown, not {other:?}"),
    }
    assert!(
        channel.take().is_empty(),
        "no second wake during the cooldown"
    );
}
