//! Two gateway replicas on a real PostgreSQL and a real `nats-server`, under what the
//! registry must hold across replicas (SPEC §14): two principals racing for one name
//! through two replicas leave exactly one owner; and PostgreSQL restarted under a
//! steady load of requests: while it is down requests are still routed from each
//! replica's view of the registry, or fail with a clear error, never hang; once it is
//! back every request succeeds again. Skipped, loudly, where PostgreSQL or
//! `nats-server` is not installed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use virtual_llm::nats::testing as nats;
use virtual_llm::nats::{NatsOptions, NatsPlane};
use virtual_llm::postgres::testing::{PgServer, StopMode, available};
use virtual_llm::postgres::{PgOptions, PgStore};
use virtual_llm::protocol::{LlmSpec, PROTOCOL_VERSION, RegisterRequest};
use virtual_llm::testkit::LoopbackWire;
use virtual_llm::{
    EchoProvider, Error, Gateway, InferRequest, LlmName, Principal, PublishedLlm, Publisher,
    PublisherOptions, ReplicaId, Reply, Role, Store,
};

const CAP: Duration = Duration::from_secs(30);

fn publisher(id: &str) -> Principal {
    Principal::new(id, [Role::Publisher])
}

fn carol() -> Principal {
    Principal::new("carol", [Role::Client])
}

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CAP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {CAP:?}"))
}

/// Replicas `gw-a` and `gw-b` on the database at `db` (each with connections of its
/// own, as two processes) and the test binary's `nats-server`.
async fn replicas(
    db: &str,
    config: virtual_llm::Config,
) -> Option<(Gateway, Gateway, (NatsPlane, NatsPlane))> {
    let server = nats::shared()?;
    let options = NatsOptions::default().with_prefix(nats::fresh_prefix());
    let mut joined = Vec::new();
    for id in ["gw-a", "gw-b"] {
        let plane = NatsPlane::connect(
            &server.url(),
            ReplicaId::parse(id).unwrap(),
            options.clone(),
        )
        .await
        .unwrap();
        joined.push(plane);
    }
    for p in &joined {
        assert!(
            p.wait_for_peers(1, CAP).await,
            "{} hears its peer",
            p.replica()
        );
    }
    let pg = PgOptions::default().connect_timeout(Duration::from_secs(2));
    let mut gateways = Vec::new();
    for plane in &joined {
        let store = PgStore::connect_with(db, pg.clone()).await.unwrap();
        let builder = Gateway::builder(Arc::new(store)).config(config.clone());
        gateways.push(plane.join(builder).await.unwrap());
    }
    let b = gateways.pop().unwrap();
    let a = gateways.pop().unwrap();
    let pb = joined.pop().unwrap();
    let pa = joined.pop().unwrap();
    Some((a, b, (pa, pb)))
}

fn register(llm: &str) -> RegisterRequest {
    RegisterRequest {
        agents: Vec::new(),
        provider_session_id: None,
        protocol_version: Some(PROTOCOL_VERSION),
        capabilities: Vec::new(),
        llms: vec![LlmSpec::new(name(llm), "openai", "m")],
    }
}

/// Alice through replica A and Bob through replica B register the same names at the
/// same moment: for each name exactly one of them owns it, the other is refused with
/// 409 (nothing written for it), and both replicas read the one owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_principals_racing_for_one_name_on_two_replicas_leave_one_owner() {
    let Some(db) = virtual_llm::postgres::testing::fresh_database().await else {
        return;
    };
    let Some((a, b, _planes)) = replicas(&db, virtual_llm::Config::default()).await else {
        return;
    };
    let (alice, bob) = (publisher("alice"), publisher("bob"));
    let mut wins = [0usize; 2];
    for i in 0..20 {
        let llm = format!("contested-{i}");
        let (by_a, by_b) = tokio::join!(
            a.register(&alice, register(&llm)),
            b.register(&bob, register(&llm))
        );
        let owner = match (&by_a, &by_b) {
            (Ok(_), Err(Error::Conflict { .. })) => "alice",
            (Err(Error::Conflict { .. }), Ok(_)) => "bob",
            other => panic!("{llm}: exactly one owner, the other refused: {other:?}"),
        };
        wins[usize::from(owner == "bob")] += 1;
        for (replica, gateway) in [("a", &a), ("b", &b)] {
            let row = gateway.store().get(&name(&llm)).await.unwrap().unwrap();
            assert_eq!(row.owner, owner, "{llm} as replica {replica} reads it");
        }
    }
    assert_eq!(wins.iter().sum::<usize>(), 20);
}

/// One request from a client on `on` for the echo model; its outcome.
async fn ask(on: &Gateway, n: usize) -> Result<(), Error> {
    let text = format!("request {n}");
    let request = InferRequest::from_chat_body(json!({
        "model": "echo", "stream": false,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap();
    match on.infer(&carol(), request).await? {
        Reply::Complete(c) => {
            assert_eq!(c.json()["choices"][0]["message"]["content"], text.as_str());
            Ok(())
        }
        Reply::Stream(_) => panic!("a whole answer"),
    }
}

/// PostgreSQL stops (fast shutdown: every connection cut) under a steady load of
/// requests from a client of replica A to a publisher connected to replica B. The
/// replicas route from their views of the registry meanwhile: every request is still
/// answered, none hangs, while a write (a register) fails at once with the store's
/// error. Once the server is back, every request is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_under_load_keeps_requests_flowing_and_recovers() {
    let Some(mut server) = available(PgServer::start()) else {
        return;
    };
    let db = server.create_database().await.unwrap();
    // Views that read the store again after 20 ms: the load below outlasts that many
    // times over, so what is answered while the database is down comes from the rows
    // read last, not from a view still fresh.
    let config = virtual_llm::Config {
        registry_staleness: Duration::from_millis(20),
        ..virtual_llm::Config::default()
    };
    let Some((a, b, _planes)) = replicas(&db, config).await else {
        return;
    };
    let wire = Arc::new(LoopbackWire::new(b.clone(), publisher("alice")));
    let llms = vec![PublishedLlm::new(
        LlmSpec::new(name("echo"), "openai", "echo-model"),
        Arc::new(EchoProvider::new()),
    )];
    let echo = Publisher::spawn(wire, llms, PublisherOptions::default());
    within("the publisher connects", echo.connected()).await;
    for n in 0..20 {
        within("a request before the stop", ask(&a, n))
            .await
            .unwrap();
    }

    server.stop(StopMode::Fast);
    within("the replicas find the database gone", async {
        while a.ready().await.is_ok() || b.ready().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A steady load, one request every 10 ms: every one is answered (none hangs:
    // each is bounded).
    let mut failures = Vec::new();
    for n in 0..50 {
        if let Err(e) = within("a request while PostgreSQL is down", ask(&a, n)).await {
            failures.push(format!("{}: {e}", e.status()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failures.is_empty(),
        "requests are routed from the replicas' views while the database is down: \
         {failures:?}"
    );
    // What needs the database fails at once, and says so.
    let err = within(
        "a register while PostgreSQL is down",
        b.register(&publisher("bob"), register("newcomer")),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");

    server.restart().unwrap();
    let mut recovered = false;
    for n in 0..300 {
        if within("a request after the restart", ask(&a, n))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "requests are answered again after the restart");
    for n in 0..50 {
        within("a request after recovery", ask(&a, n))
            .await
            .unwrap();
    }
    // The registry is written again: the store is the authority once more.
    let row = b.store().get(&name("echo")).await.unwrap().unwrap();
    assert_eq!(row.status, virtual_llm::LlmStatus::Active);
    echo.stop().await;
}
