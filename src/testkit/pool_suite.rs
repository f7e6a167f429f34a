//! The pool conformance suite: pools, capacity, failover and the admission queue of
//! SPEC §10 and §11, end to end over a transport. A real gateway serves on
//! `127.0.0.1:0`; publishers connect through the transport's `Wire`, each publishing
//! one member of a pool; clients speak HTTP.
//!
//! Each case is a `pub async fn` taking the transport and an optional replica plane;
//! [`pool_conformance_tests!`](crate::pool_conformance_tests) stamps out one
//! `#[tokio::test]` per case.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::gateway::TestGateway;
use super::plane::Plane;
use super::providers::{Answers, Counting};
use super::support::eventually;
use super::transport::Transport;
use crate::{Config, LlmName};

fn pool(name: &str) -> LlmName {
    LlmName::parse(name).unwrap()
}

/// Requests to a pool spread over its members: with nothing in flight, members take
/// turns, so 30 requests over 3 members give each 10, and over 2 each 15: no member
/// starves and none is "the first row".
pub async fn a_pool_spreads_requests_over_its_members(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Config::default()).await;
    let members: Vec<Arc<Counting>> = (0..3).map(|_| Arc::new(Counting::new(true))).collect();
    let mut publishers = Vec::new();
    for (i, provider) in members.iter().enumerate() {
        let name = format!("box-{i}");
        publishers.push(
            gw.publish_member(t, "alice", &name, "llama", Some(4), provider.clone())
                .await,
        );
    }
    for _ in 0..30 {
        let (status, body) = gw.chat("client", "llama", "spread", false).await;
        assert_eq!(status, 200, "{body}");
    }
    let calls: Vec<usize> = members.iter().map(|m| m.calls()).collect();
    assert_eq!(calls, [10, 10, 10], "three members take turns");
    publishers.pop().unwrap().stop().await;
    let before: Vec<usize> = members.iter().map(|m| m.calls()).collect();
    for _ in 0..30 {
        let (status, body) = gw.chat("client", "llama", "spread", false).await;
        assert_eq!(status, 200, "{body}");
    }
    let two: Vec<usize> = members[..2]
        .iter()
        .zip(&before)
        .map(|(m, b)| m.calls() - b)
        .collect();
    assert_eq!(two, [15, 15], "two members take turns");
    for p in publishers {
        p.stop().await;
    }
}

/// A member whose upstream answers 503 costs the clients nothing: each request it
/// fails goes to another member before any byte reached the client, and after three
/// failures in a row the member is passed over (the cooldown), so it sees exactly
/// three requests.
pub async fn failover_hides_a_member_answering_503(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let config = Config {
        cooldown: Duration::from_secs(3600),
        ..Config::default()
    };
    let gw = TestGateway::start_on(t, plane, config).await;
    let loading =
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}});
    let broken = Arc::new(Answers::new(503, loading));
    let healthy = Arc::new(Counting::new(true));
    let a = gw
        .publish_member(t, "alice", "box-a", "llama", Some(4), broken.clone())
        .await;
    let b = gw
        .publish_member(t, "alice", "box-b", "llama", Some(4), healthy.clone())
        .await;
    for i in 0..10 {
        let (status, body) = gw.chat("client", "llama", &format!("q{i}"), false).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], format!("q{i}"));
    }
    assert_eq!(
        broken.calls(),
        3,
        "passed over after three failures in a row"
    );
    assert_eq!(healthy.calls(), 10);
    a.stop().await;
    b.stop().await;
}

/// When every member answers 503, the client gets the last answer as it came (the
/// upstream's own status and body), after at most `poolRetries` more tries.
pub async fn when_every_member_fails_the_last_answer_is_the_clients(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Config::default()).await;
    let loading =
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}});
    let providers: Vec<Arc<Answers>> = (0..4)
        .map(|_| Arc::new(Answers::new(503, loading.clone())))
        .collect();
    let mut publishers = Vec::new();
    for (i, provider) in providers.iter().enumerate() {
        let name = format!("box-{i}");
        publishers.push(
            gw.publish_member(t, "alice", &name, "llama", None, provider.clone())
                .await,
        );
    }
    let (status, body) = gw.chat("client", "llama", "x", false).await;
    assert_eq!(status, 503);
    assert_eq!(body, loading, "the upstream's own answer");
    let tries: usize = providers.iter().map(|p| p.calls()).sum();
    assert_eq!(tries, 3, "one try and poolRetries (2) more");
    for p in publishers {
        p.stop().await;
    }
}

/// A 4xx from a member's upstream is the client's answer: passed through untouched
/// and never retried on another member.
pub async fn a_4xx_passes_through_and_is_not_retried(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Config::default()).await;
    let too_long = json!({"error": {"code": 400, "message": "the request exceeds the available context size", "type": "invalid_request_error"}});
    let a = Arc::new(Answers::new(400, too_long.clone()));
    let b = Arc::new(Answers::new(400, too_long.clone()));
    let pa = gw
        .publish_member(t, "alice", "box-a", "llama", Some(4), a.clone())
        .await;
    let pb = gw
        .publish_member(t, "alice", "box-b", "llama", Some(4), b.clone())
        .await;
    let (status, body) = gw
        .chat("client", "llama", "a very long prompt", false)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body, too_long);
    assert_eq!(a.calls() + b.calls(), 1, "not retried");
    pa.stop().await;
    pb.stop().await;
}

/// A pool never has more tasks on a member than its `maxConcurrent`: 12 concurrent
/// requests on two members of capacity 2 put 2 on each, the other 8 wait in the
/// queue (the pool's load says so), and every one is answered once slots free.
pub async fn capacity_is_never_exceeded_and_the_rest_wait(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Config::default()).await;
    let members = [
        Arc::new(Counting::new(false)),
        Arc::new(Counting::new(false)),
    ];
    let pa = gw
        .publish_member(t, "alice", "box-a", "llama", Some(2), members[0].clone())
        .await;
    let pb = gw
        .publish_member(t, "alice", "box-b", "llama", Some(2), members[1].clone())
        .await;
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let gw = gw.clone_handle();
            tokio::spawn(async move { gw.chat("client", "llama", &format!("q{i}"), false).await })
        })
        .collect();
    eventually("four tasks run and eight wait", || async {
        let load = gw.gateway.pool_load(&pool("llama"));
        members.iter().map(|m| m.holding()).sum::<usize>() == 4
            && load.queued == 8
            && load.in_flight == 4
    })
    .await;
    let (status, view) = gw.get_registry("client", "/box-a").await;
    assert_eq!(status, 200);
    assert_eq!(view["pool"], "llama");
    assert_eq!(view["maxConcurrent"], 2);
    assert_eq!(view["inFlight"], 2);
    assert_eq!(view["queued"], 8);
    for m in &members {
        m.open();
    }
    for (i, request) in requests.into_iter().enumerate() {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], format!("q{i}"));
    }
    for m in &members {
        assert!(m.most() <= 2, "a member held {} tasks at once", m.most());
    }
    assert_eq!(members[0].calls() + members[1].calls(), 12);
    eventually("every slot is free", || async {
        gw.gateway.pool_load(&pool("llama")).in_flight == 0
    })
    .await;
    pa.stop().await;
    pb.stop().await;
}

/// A full queue refuses at once: 429 `queue_full`, OpenAI-shaped, with `Retry-After`;
/// the requests already waiting are unharmed.
pub async fn a_full_queue_is_429_with_retry_after(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let config = Config {
        queue_depth: 1,
        ..Config::default()
    };
    let gw = TestGateway::start_on(t, plane, config).await;
    let member = Arc::new(Counting::new(false));
    let p = gw
        .publish_member(t, "alice", "box-a", "llama", Some(1), member.clone())
        .await;
    let running = {
        let gw = gw.clone_handle();
        tokio::spawn(async move { gw.chat("client", "llama", "first", false).await })
    };
    eventually("the first request runs", || async { member.holding() == 1 }).await;
    let waiting = {
        let gw = gw.clone_handle();
        tokio::spawn(async move { gw.chat("client", "llama", "second", false).await })
    };
    eventually("the second request waits", || async {
        gw.gateway.pool_load(&pool("llama")).queued == 1
    })
    .await;
    let response = gw
        .post_chat(
            "client",
            json!({"model": "llama", "messages": [{"role": "user", "content": "third"}]}),
        )
        .await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    member.open();
    for (request, text) in [(running, "first"), (waiting, "second")] {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], text);
    }
    assert_eq!(
        member.calls(),
        2,
        "the refused request never reached a member"
    );
    p.stop().await;
}

/// A pool's key lists its members (`GET {base}/{pool}/members`), `/v1/models` lists
/// the pool once and not its members, and a member's own name pins it.
pub async fn members_models_and_pinning(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Config::default()).await;
    let a = Arc::new(Counting::new(true));
    let b = Arc::new(Counting::new(true));
    let pa = gw
        .publish_member(t, "alice", "box-a", "llama", Some(3), a.clone())
        .await;
    let pb = gw
        .publish_member(t, "alice", "box-b", "llama", Some(5), b.clone())
        .await;
    let (status, members) = gw.get_registry("client", "/llama/members").await;
    assert_eq!(status, 200, "{members}");
    let names: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["box-a", "box-b"]);
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["pool"] == "llama")
    );
    assert_eq!(members[1]["maxConcurrent"], 5);
    let (status, _) = gw.get_registry("client", "/no-such-pool/members").await;
    assert_eq!(status, 404);
    let models = gw.get_json("client", "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama"], "the pool once, its members not");
    for _ in 0..4 {
        let (status, body) = gw.chat("client", "box-b", "pinned", false).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        (a.calls(), b.calls()),
        (0, 4),
        "a pinned member takes them all"
    );
    pa.stop().await;
    pb.stop().await;
}

/// Stamps out one `#[tokio::test]` per case of the pool suite for a transport (an
/// expression of a type implementing [`Transport`](crate::testkit::Transport)), on one
/// gateway; or, with a second argument (a [`Plane`](crate::testkit::Plane)), on two
/// replicas linked by it, publishers on one and clients on the other.
///
/// ```no_run
/// mod sse_pools {
///     virtual_llm::pool_conformance_tests!(virtual_llm::testkit::SseTransport);
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! pool_conformance_tests {
    ($transport:expr) => {
        $crate::__pool_suite_cases!($transport, ::core::option::Option::None);
    };
    ($transport:expr, $plane:expr) => {
        $crate::__pool_suite_cases!(
            $transport,
            ::core::option::Option::Some(&$plane as &dyn $crate::testkit::Plane)
        );
    };
}

/// The cases, for the macro above.
#[doc(hidden)]
#[macro_export]
macro_rules! __pool_suite_cases {
    ($transport:expr, $plane:expr) => {
        $crate::__pool_suite_cases!(@cases $transport, $plane;
            a_pool_spreads_requests_over_its_members,
            failover_hides_a_member_answering_503,
            when_every_member_fails_the_last_answer_is_the_clients,
            a_4xx_passes_through_and_is_not_retried,
            capacity_is_never_exceeded_and_the_rest_wait,
            a_full_queue_is_429_with_retry_after,
            members_models_and_pinning,
        );
    };
    (@cases $transport:expr, $plane:expr; $($case:ident,)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testkit::pool_suite::$case(&$transport, $plane).await;
            }
        )*
    };
}
