//! The wake suite: upstream readiness and wake-on-demand of SPEC §12, end to end over
//! a transport. A real gateway serves on `127.0.0.1:0`; a publisher connects through
//! the transport's `Wire`, publishing an LLM whose upstream the test switches on and
//! off ([`Switchable`]) with recipes that count their runs ([`CountingRecipe`]);
//! clients speak HTTP.
//!
//! The time is real (the frames cross real sockets), so every wait is kept short
//! through the configuration: heartbeats every 100 ms, an idle timer of a second, a
//! wake wait of 10 s at most (1 s where the case is the wait running out). Nothing
//! sleeps a fixed time: the cases poll with [`eventually`] for what they cannot
//! await.
//!
//! Each case is a `pub async fn` taking the transport and an optional replica plane;
//! [`wake_conformance_tests!`](crate::wake_conformance_tests) stamps out one
//! `#[tokio::test]` per case.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::gateway::TestGateway;
use super::plane::Plane;
use super::providers::{CountingRecipe, Switchable};
use super::support::{eventually, token};
use super::transport::Transport;
use crate::protocol::LlmSpec;
use crate::{Config, LlmName, LlmRecord, PublishedLlm, Publisher, PublisherOptions, Waker};

fn name(name: &str) -> LlmName {
    LlmName::parse(name).unwrap()
}

fn spec(llm: &str) -> LlmSpec {
    LlmSpec::new(name(llm), "openai", "m")
}

/// A configuration whose heartbeats come every 100 ms, so a state the publisher
/// finds out by probing reaches the gateway quickly, and whose requests wait at most
/// 10 s for a wake (a wake here takes milliseconds), so a wake that never ends fails
/// the case soon.
fn fast() -> Config {
    Config {
        heartbeat_interval: Duration::from_millis(100),
        wake_wait: Duration::from_secs(10),
        ..Config::default()
    }
}

/// A client's answer: its status, its `Retry-After` in seconds (if any) and its body.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }

    fn content(&self) -> &str {
        self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
    }
}

/// A one-message chat with `model` as the client.
async fn ask(gw: &TestGateway, model: &str, text: &str) -> Answer {
    let body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    let response = gw.post_chat("client", body).await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    Answer {
        status,
        retry_after,
        body: response.json().await.unwrap(),
    }
}

/// `count` chats with `model` sent at once, each asking for `<label><i>`.
fn ask_many(
    gw: &TestGateway,
    model: &str,
    label: &str,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Answer>> {
    (0..count)
        .map(|i| {
            let (gw, model, text) = (gw.clone_handle(), model.to_owned(), format!("{label}{i}"));
            tokio::spawn(async move { ask(&gw, &model, &text).await })
        })
        .collect()
}

/// The ids `GET /v1/models` lists.
async fn models(gw: &TestGateway) -> Vec<String> {
    let models = gw.get_json("client", "/v1/models").await;
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that a request for `model` is the gateway's own 503 `llm_unavailable` with
/// `Retry-After`, not an answer relayed from the upstream.
async fn assert_unavailable(gw: &TestGateway, model: &str) {
    let answer = ask(gw, model, "are you there").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.code(), "llm_unavailable", "{}", answer.body);
    assert!(answer.retry_after.is_some_and(|s| s >= 1));
}

/// A row follows its upstream's readiness, as its publisher probes it: down at the
/// start, the row is `inactive` (with `inactiveSince`), not listed, and a request is
/// the gateway's 503 at once, never relayed; up, it is `active`, listed and served;
/// down again, it is back to the first.
pub async fn readiness_moves_a_row_down_up_and_down(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, fast()).await;
    let upstream = Arc::new(Switchable::new(false));
    let p = gw
        .publish_llms(
            t,
            "alice",
            vec![PublishedLlm::new(spec("flaky"), upstream.clone())],
        )
        .await;
    let row = gw.row("flaky").await;
    assert_eq!(row["status"], "inactive", "down from the start: {row}");
    assert!(row["inactiveSince"].is_string(), "{row}");
    assert!(models(&gw).await.is_empty());
    assert_unavailable(&gw, "flaky").await;
    assert_eq!(
        upstream.calls(),
        0,
        "no request reached a model that is down"
    );

    upstream.set_ready(true);
    eventually("the row follows its upstream up", || async {
        gw.row_status("flaky").await == "active"
    })
    .await;
    assert!(gw.row("flaky").await["inactiveSince"].is_null());
    assert_eq!(models(&gw).await, ["flaky"]);
    let answer = ask(&gw, "flaky", "up").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.content(), "up");
    assert_eq!(upstream.calls(), 1);

    upstream.set_ready(false);
    eventually("the row follows its upstream down", || async {
        gw.row_status("flaky").await == "inactive"
    })
    .await;
    assert!(gw.row("flaky").await["inactiveSince"].is_string());
    assert!(models(&gw).await.is_empty());
    assert_unavailable(&gw, "flaky").await;
    assert_eq!(
        upstream.calls(),
        1,
        "no request reached a model that is down"
    );
    p.stop().await;
}

/// Five requests at once for a hibernating row share one wake: the publisher gets one
/// `wake` frame and runs its wake recipe once, the five wait in the queue meanwhile,
/// and all five are served once the upstream answers.
pub async fn five_requests_share_one_wake_and_one_recipe_run(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, fast()).await;
    let upstream = Arc::new(Switchable::new(false));
    let wake = Arc::new(CountingRecipe::switching(upstream.clone(), true).held());
    let llm = PublishedLlm::new(spec("sleepy"), upstream.clone()).with_wake(wake.clone());
    let p = gw.publish_llms(t, "alice", vec![llm]).await;
    assert_eq!(gw.row_status("sleepy").await, "hibernating");
    assert!(models(&gw).await.is_empty());

    let requests = ask_many(&gw, "sleepy", "q", 5);
    eventually("five requests wait for one wake", || async {
        gw.gateway.pool_load(&name("sleepy")).queued == 5 && wake.runs() == 1
    })
    .await;
    assert_eq!(upstream.calls(), 0);
    wake.open();
    for (i, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "request {i}: {}", answer.body);
        assert_eq!(answer.content(), format!("q{i}"));
    }
    assert_eq!(wake.runs(), 1, "one recipe run for five requests");
    assert_eq!(upstream.calls(), 5);
    assert_eq!(gw.row_status("sleepy").await, "active");
    assert_eq!(models(&gw).await, ["sleepy"]);
    p.stop().await;
}

/// An LLM idle for its `idle_after` is put to sleep with its sleep recipe and its row
/// hibernates; a request then wakes it again (a second run of the wake recipe) and is
/// served.
pub async fn an_idle_llm_sleeps_and_a_request_wakes_it_again(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, fast()).await;
    let upstream = Arc::new(Switchable::new(false));
    let wake = Arc::new(CountingRecipe::switching(upstream.clone(), true));
    let sleep = Arc::new(CountingRecipe::switching(upstream.clone(), false));
    let llm = PublishedLlm::new(spec("dozy"), upstream.clone())
        .with_wake(wake.clone())
        .with_sleep(sleep.clone())
        .with_idle_after(Duration::from_secs(1));
    let p = gw.publish_llms(t, "alice", vec![llm]).await;
    assert_eq!(gw.row_status("dozy").await, "hibernating");

    let answer = ask(&gw, "dozy", "first").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.content(), "first");
    assert_eq!((wake.runs(), sleep.runs()), (1, 0));

    eventually(
        "idle, it is put to sleep and its row hibernates",
        || async { sleep.runs() == 1 && gw.row_status("dozy").await == "hibernating" },
    )
    .await;
    assert!(!upstream.is_ready(), "the sleep recipe ran");
    assert!(models(&gw).await.is_empty());

    let answer = ask(&gw, "dozy", "second").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.content(), "second");
    assert_eq!(wake.runs(), 2, "woken again");
    assert_eq!(upstream.calls(), 2);
    p.stop().await;
}

/// A wake recipe that fails fails the requests waiting for it with 503 `wake_failed`
/// carrying the recipe's message and `Retry-After`; during the wake cooldown a new
/// request gets the same 503 at once, and the recipe is not run again.
pub async fn a_failing_wake_recipe_fails_the_waiters_and_holds_off_wakes(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let cooldown = Duration::from_secs(3600);
    let config = Config {
        wake_cooldown: cooldown,
        ..fast()
    };
    let gw = TestGateway::start_on(t, plane, config).await;
    let upstream = Arc::new(Switchable::new(false));
    let why = "exit status 5: no GPU left";
    let wake = Arc::new(CountingRecipe::failing(why).held());
    let llm = PublishedLlm::new(spec("broken"), upstream.clone()).with_wake(wake.clone());
    let p = gw.publish_llms(t, "alice", vec![llm]).await;
    assert_eq!(gw.row_status("broken").await, "hibernating");

    let requests = ask_many(&gw, "broken", "q", 3);
    eventually("three requests wait for the wake", || async {
        gw.gateway.pool_load(&name("broken")).queued == 3 && wake.runs() == 1
    })
    .await;
    wake.open();
    for (i, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 503, "request {i}: {}", answer.body);
        assert_eq!(answer.code(), "wake_failed", "request {i}: {}", answer.body);
        assert!(answer.message().contains(why), "{}", answer.body);
        let retry_after = answer.retry_after.expect("Retry-After");
        assert!(
            (1..=cooldown.as_secs()).contains(&retry_after),
            "{retry_after}"
        );
    }

    let answer = ask(&gw, "broken", "again").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.code(), "wake_failed", "{}", answer.body);
    assert!(answer.message().contains(why), "{}", answer.body);
    let retry_after = answer.retry_after.expect("Retry-After");
    assert!(
        (1..=cooldown.as_secs()).contains(&retry_after),
        "{retry_after}"
    );
    assert_eq!(wake.runs(), 1, "no second run during the cooldown");
    assert_eq!(upstream.calls(), 0);
    assert_eq!(gw.row_status("broken").await, "hibernating");
    p.stop().await;
}

/// A wake that outlasts the gateway's `wake_wait` (the recipe ran, but the upstream
/// does not answer, and the publisher's ready timeout is longer) answers the waiting
/// request 503 `wake_timeout` with `Retry-After`.
pub async fn a_wake_that_outlasts_the_wake_wait_is_503_wake_timeout(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let config = Config {
        wake_wait: Duration::from_secs(1),
        ..fast()
    };
    let gw = TestGateway::start_on(t, plane, config).await;
    let upstream = Arc::new(Switchable::new(false));
    let wake = Arc::new(CountingRecipe::doing_nothing());
    let llm = PublishedLlm::new(spec("slow"), upstream.clone())
        .with_wake(wake.clone())
        .with_ready_timeout(Duration::from_secs(60));
    let p = gw.publish_llms(t, "alice", vec![llm]).await;
    assert_eq!(gw.row_status("slow").await, "hibernating");

    let answer = ask(&gw, "slow", "hello").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.code(), "wake_timeout", "{}", answer.body);
    assert!(answer.retry_after.is_some_and(|s| s >= 1), "Retry-After");
    assert_eq!(wake.runs(), 1);
    assert_eq!(upstream.calls(), 0);
    assert_eq!(gw.row_status("slow").await, "hibernating");
    p.stop().await;
}

/// What a [`Webhook`] starts when it fires.
type Start = Box<dyn Fn() -> Publisher + Send + Sync>;

/// An embedder's waker for a host whose publisher has no channel while it sleeps: it
/// wakes one row, and "waking the host" starts its publisher.
struct Webhook {
    llm: LlmName,
    fired: AtomicUsize,
    start: Mutex<Option<Start>>,
    started: Mutex<Vec<Publisher>>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("llm", &self.llm)
            .field("fired", &self.fired)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    fn new(llm: &str) -> Self {
        Webhook {
            llm: name(llm),
            fired: AtomicUsize::new(0),
            start: Mutex::new(None),
            started: Mutex::new(Vec::new()),
        }
    }

    /// From now on, firing runs `start`.
    fn on_fire(&self, start: Start) {
        *self.start.lock().unwrap() = Some(start);
    }

    fn fired(&self) -> usize {
        self.fired.load(Ordering::SeqCst)
    }

    /// Stops the publishers it started.
    async fn stop(&self) {
        let started: Vec<Publisher> = self.started.lock().unwrap().drain(..).collect();
        for p in started {
            p.stop().await;
        }
    }
}

#[async_trait]
impl Waker for Webhook {
    fn can_wake(&self, row: &LlmRecord) -> bool {
        row.binding.is_none() && row.name == self.llm
    }

    async fn wake(&self, _row: &LlmRecord) -> Result<(), String> {
        self.fired.fetch_add(1, Ordering::SeqCst);
        let publisher = match &*self.start.lock().unwrap() {
            Some(start) => start(),
            None => return Err("the test's webhook has nothing to start".to_owned()),
        };
        self.started.lock().unwrap().push(publisher);
        Ok(())
    }
}

/// A waker of the embedder's (a webhook) wakes a row whose publisher has no channel:
/// the requests for it wait while it fires once and the host's publisher starts,
/// connects and reports ready; then all of them are served.
pub async fn a_webhook_wakes_a_host_whose_publisher_connects_afterwards(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let hook = Arc::new(Webhook::new("far-away"));
    let waker: Arc<dyn Waker> = hook.clone();
    let gw = TestGateway::start_on_with(t, plane, fast(), &|b| b.waker(waker.clone())).await;
    let upstream = Arc::new(Switchable::new(true));
    let llm = PublishedLlm::new(spec("far-away"), upstream.clone());
    // Published once; then the host went to sleep, its publisher with it.
    let first = gw.publish_llms(t, "alice", vec![llm.clone()]).await;
    assert_eq!(gw.row_status("far-away").await, "active");
    first.stop().await;
    eventually("the row goes inactive with its channel", || async {
        gw.row_status("far-away").await == "inactive"
    })
    .await;

    let wire = t.wire(&gw.publisher_url, Some(token("alice")));
    hook.on_fire(Box::new(move || {
        Publisher::spawn(wire.clone(), vec![llm.clone()], PublisherOptions::default())
    }));
    let requests = ask_many(&gw, "far-away", "q", 3);
    for (i, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "request {i}: {}", answer.body);
        assert_eq!(answer.content(), format!("q{i}"));
    }
    assert_eq!(hook.fired(), 1, "the webhook fired once");
    assert_eq!(upstream.calls(), 3);
    assert_eq!(gw.row_status("far-away").await, "active");
    hook.stop().await;
}

/// Stamps out one `#[tokio::test]` per case of the wake suite for a transport (an
/// expression of a type implementing [`Transport`](crate::testkit::Transport)), on one
/// gateway; or, with a second argument (a [`Plane`](crate::testkit::Plane)), on two
/// replicas linked by it, publishers on one and clients on the other.
///
/// On two replicas, requests waiting on one replica hear of a row that wakes or
/// starts serving through the other from the store's change feed, and of a wake that
/// failed through the other from the plane
/// ([`TaskRouter::wake_failed`](crate::TaskRouter::wake_failed)).
///
/// ```no_run
/// mod sse_wake {
///     virtual_llm::wake_conformance_tests!(virtual_llm::testkit::SseTransport);
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! wake_conformance_tests {
    ($transport:expr) => {
        $crate::__wake_suite_cases!($transport, ::core::option::Option::None);
    };
    ($transport:expr, $plane:expr) => {
        $crate::__wake_suite_cases!(
            $transport,
            ::core::option::Option::Some(&$plane as &dyn $crate::testkit::Plane)
        );
    };
}

/// The cases, for the macro above.
#[doc(hidden)]
#[macro_export]
macro_rules! __wake_suite_cases {
    ($transport:expr, $plane:expr) => {
        $crate::__wake_suite_cases!(@cases $transport, $plane;
            readiness_moves_a_row_down_up_and_down,
            five_requests_share_one_wake_and_one_recipe_run,
            an_idle_llm_sleeps_and_a_request_wakes_it_again,
            a_failing_wake_recipe_fails_the_waiters_and_holds_off_wakes,
            a_wake_that_outlasts_the_wake_wait_is_503_wake_timeout,
            a_webhook_wakes_a_host_whose_publisher_connects_afterwards,
        );
    };
    (@cases $transport:expr, $plane:expr; $($case:ident,)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testkit::wake_suite::$case(&$transport, $plane).await;
            }
        )*
    };
}
