//! The lifecycle table of SPEC §3, one test per row, plus bind generations, register
//! races, GC idempotence, restart recovery and the background GC, on the memory store
//! with a manual clock. No real sleeps.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use std::sync::atomic::Ordering::SeqCst;
use virtual_llm_core::protocol::{ConflictReason, GatewayFrame, LlmSpec};
use virtual_llm_core::{
    Config, Error, Gateway, InferRequest, LlmKind, LlmName, LlmRecord, LlmStatus, MemoryStore,
    Principal, ReplicaId, Role, SessionId, Store, StoreError, SweepReport, Timestamp, Write,
};

fn conflicts(err: Error) -> Vec<(String, ConflictReason)> {
    match err {
        Error::Conflict { conflicts } => {
            conflicts.into_iter().map(|c| (c.name, c.reason)).collect()
        }
        other => panic!("expected a 409 conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn register_new_name_inserts_an_active_virtual_row_owned_by_the_caller() {
    let f = fixture().await;
    let answer = f.register("alice", None, &["llama"]).await;
    let row = f.row("llama").await;
    assert_eq!(row.kind, LlmKind::Virtual);
    assert_eq!(row.status, LlmStatus::Active);
    assert_eq!(row.owner, "alice");
    assert_eq!(
        row.provider_session_id.as_ref(),
        Some(&answer.provider_session_id)
    );
    assert_eq!(row.last_heartbeat_at, Some(f.now()));
    assert_eq!(row.model, "llama-model");
    assert_eq!(
        answer.llms,
        vec![row.view()],
        "the answer shows the rows written"
    );
    assert_eq!(answer.heartbeat_interval_ms, 30_000);
}

/// The register answer (also the WebSocket `registered` frame) and the SSE `hello`
/// tell the publisher how often the gateway pings an idle channel, so that its
/// watchdog follows the keep-alive and not the heartbeat interval.
#[tokio::test]
async fn register_and_hello_carry_the_keep_alive_period() {
    let f = fixture_with(Config {
        heartbeat_interval: Duration::from_secs(1),
        keepalive: Duration::from_millis(2500),
        ..Config::default()
    })
    .await;
    let mut v2 = request(None, &["llama"]);
    v2.protocol_version = Some(2);
    let answer = f.gw.register(&publisher("alice"), v2).await.unwrap();
    assert_eq!(
        (answer.heartbeat_interval_ms, answer.keep_alive_ms),
        (1000, Some(2500))
    );
    let hello = f.gw.hello(&answer.provider_session_id, 2);
    assert_eq!(
        (hello.heartbeat_interval_ms, hello.keep_alive_ms),
        (1000, Some(2500))
    );
    // A version 1 publisher is sent nothing new; its watchdog keeps the v1 rule.
    let v1 = f.register("alice", None, &["old"]).await;
    assert_eq!(v1.keep_alive_ms, None);
    assert_eq!(f.gw.hello(&v1.provider_session_id, 1).keep_alive_ms, None);
}

#[tokio::test]
async fn register_of_own_session_row_updates_in_place_and_reactivates() {
    let f = fixture().await;
    let (session, binding, _ch) = f.online("alice", &["llama"]).await;
    binding.release().await.unwrap();
    let before = f.row("llama").await;
    assert_eq!(before.status, LlmStatus::Inactive);
    f.clock.advance(Duration::from_secs(10));
    let mut req = request(Some(&session), &["llama"]);
    req.llms[0].model = "llama-3.1".into();
    req.llms[0].tier = Some("fast".into());
    let answer = f.gw.register(&publisher("alice"), req).await.unwrap();
    assert_eq!(
        answer.provider_session_id, session,
        "a known session keeps its id"
    );
    let after = f.row("llama").await;
    assert_eq!(after.id, before.id, "updated in place");
    assert_eq!(
        (after.model.as_str(), after.tier.as_deref()),
        ("llama-3.1", Some("fast"))
    );
    assert_eq!(after.status, LlmStatus::Active);
    assert_eq!(after.inactive_since, None);
    assert!(after.revision > before.revision);
}

#[tokio::test]
async fn register_adopts_an_inactive_row_of_another_session_of_the_same_owner() {
    let f = fixture().await;
    let (old_session, binding, _ch) = f.online("alice", &["llama"]).await;
    binding.release().await.unwrap();
    let id = f.row("llama").await.id;
    // The publisher lost its session file and registers afresh.
    let answer = f.register("alice", None, &["llama"]).await;
    assert_ne!(answer.provider_session_id, old_session);
    let row = f.row("llama").await;
    assert_eq!(row.id, id, "sticky: the same row is adopted");
    assert_eq!(row.provider_session_id, Some(answer.provider_session_id));
    assert_eq!(row.status, LlmStatus::Active);
}

#[tokio::test]
async fn register_refuses_a_public_row_atomically() {
    let f = fixture().await;
    f.gw.put_public(&admin(), spec("gpt-4o")).await.unwrap();
    let err =
        f.gw.register(&publisher("alice"), request(None, &["fresh", "gpt-4o"]))
            .await
            .unwrap_err();
    assert_eq!(err.status(), 409);
    assert_eq!(
        conflicts(err),
        vec![("gpt-4o".to_owned(), ConflictReason::PublicLlm)]
    );
    assert!(
        f.try_row("fresh").await.is_none(),
        "nothing of a refused request is written"
    );
    assert_eq!(f.row("gpt-4o").await.kind, LlmKind::Public);
}

#[tokio::test]
async fn register_refuses_an_active_row_of_another_session_naming_every_conflict() {
    let f = fixture().await;
    let _online = f.online("alice", &["a", "b"]).await;
    let before = f.store.list().await.unwrap();
    let err =
        f.gw.register(&publisher("alice"), request(None, &["a", "new", "b"]))
            .await
            .unwrap_err();
    assert_eq!(
        conflicts(err),
        vec![
            ("a".to_owned(), ConflictReason::ActiveInAnotherSession),
            ("b".to_owned(), ConflictReason::ActiveInAnotherSession)
        ]
    );
    assert_eq!(f.store.list().await.unwrap(), before, "nothing written");
}

#[tokio::test]
async fn register_refuses_any_row_of_another_owner_even_inactive() {
    let f = fixture().await;
    let (_, binding, _ch) = f.online("alice", &["a"]).await;
    binding.release().await.unwrap();
    let before = f.row("a").await;
    assert_eq!(before.status, LlmStatus::Inactive);
    let err =
        f.gw.register(&publisher("mallory"), request(None, &["a"]))
            .await
            .unwrap_err();
    assert_eq!(
        conflicts(err),
        vec![("a".to_owned(), ConflictReason::OwnedByAnother)]
    );
    assert_eq!(f.row("a").await, before, "another owner cannot adopt");
}

/// Names are unique ignoring letter case (F13 of the red team's report): beside
/// alice's `llama-8b`, nobody — mallory, nor alice in another session — registers
/// `LLAMA-8B` or `Llama-8b` (409 `nameTakenIgnoringCase`, nothing written), a register
/// naming `x` and `X` is one name twice (400), and a public LLM cannot take a
/// look-alike either. The row keeps its own name: `get` stays exact.
#[tokio::test]
async fn a_lookalike_of_a_taken_name_is_refused() {
    let f = fixture().await;
    let _online = f.online("alice", &["llama-8b"]).await;
    let before = f.store.list().await.unwrap();
    for (who, lookalike) in [("mallory", "LLAMA-8B"), ("alice", "Llama-8b")] {
        let err =
            f.gw.register(&publisher(who), request(None, &["fresh", lookalike]))
                .await
                .unwrap_err();
        assert_eq!(
            conflicts(err),
            vec![(lookalike.to_owned(), ConflictReason::NameTakenIgnoringCase)],
            "{who}"
        );
        assert_eq!(f.store.list().await.unwrap(), before, "nothing written");
    }
    let err =
        f.gw.register(&publisher("bob"), request(None, &["qwen", "QWEN"]))
            .await
            .unwrap_err();
    assert_eq!(err.status(), 400, "{err}");
    let err =
        f.gw.put_public(
            &Principal::new("ops", [Role::Admin]),
            LlmSpec {
                name: LlmName::parse("LLaMA-8b").unwrap(),
                provider_type: "openai".into(),
                model: "m".into(),
                tier: None,
                pool: None,
                max_concurrent: None,
                state: None,
                access: Default::default(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        conflicts(err),
        vec![("LLaMA-8b".to_owned(), ConflictReason::NameTakenIgnoringCase)]
    );
    assert_eq!(f.store.list().await.unwrap(), before, "nothing written");
}

/// Two principals registering look-alike names at once, each having read the
/// registry before either writes: exactly one gets the name, the other a 409 after
/// the store refused its insert. Every round, so the race is always run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_racing_for_lookalike_names_get_one_owner() {
    for round in 0..20 {
        let store = Arc::new(ReadAllThenWrite {
            inner: MemoryStore::new(),
            barrier: tokio::sync::Barrier::new(2),
            held: 2.into(),
        });
        let gw = Gateway::builder(store.clone()).start().await.unwrap();
        let racers = [("alice", "model"), ("mallory", "MODEL")].map(|(who, name)| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.register(&publisher(who), request(None, &[name])).await })
        });
        let mut wins = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Ok(_) => wins += 1,
                Err(e) => assert_eq!(
                    conflicts(e)[0].1,
                    ConflictReason::NameTakenIgnoringCase,
                    "round {round}"
                ),
            }
        }
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(store.list().await.unwrap().len(), 1, "round {round}");
    }
}

#[tokio::test]
async fn reregister_without_a_name_deactivates_and_detaches_that_row() {
    let f = fixture().await;
    let (session, _binding, _ch) = f.online("alice", &["a", "b"]).await;
    f.clock.advance(Duration::from_secs(5));
    f.register("alice", Some(&session), &["a"]).await;
    let b = f.row("b").await;
    assert_eq!(b.status, LlmStatus::Inactive);
    assert_eq!(b.inactive_since, Some(f.now()));
    assert_eq!(b.provider_session_id, None, "detached from the session");
    assert_eq!(f.row("a").await.status, LlmStatus::Active);
    let names: Vec<_> = f
        .store
        .by_session(&session)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(names, ["a"]);
}

#[tokio::test]
async fn unknown_or_foreign_session_id_gets_a_fresh_session() {
    let f = fixture().await;
    let made_up = SessionId::generate();
    let answer = f.register("alice", Some(&made_up), &["a"]).await;
    assert_ne!(
        answer.provider_session_id, made_up,
        "the gateway issues its own ids"
    );
    // Mallory presents Alice's session id: she gets a fresh one and Alice's rows stay hers.
    let alice_session = answer.provider_session_id;
    let answer = f.register("mallory", Some(&alice_session), &["m"]).await;
    assert_ne!(answer.provider_session_id, alice_session);
    assert_eq!(f.row("a").await.provider_session_id, Some(alice_session));
    assert_eq!(f.row("a").await.owner, "alice");
}

#[tokio::test]
async fn bind_makes_the_sessions_rows_active() {
    let f = fixture().await;
    let (session, binding, _ch) = f.online("alice", &["a", "b"]).await;
    binding.release().await.unwrap();
    assert_eq!(f.row("a").await.status, LlmStatus::Inactive);
    f.clock.advance(Duration::from_secs(3));
    let (_binding, _ch) = f.bind("alice", &session).await;
    for n in ["a", "b"] {
        let r = f.row(n).await;
        assert_eq!(
            (r.status, r.inactive_since, r.last_heartbeat_at),
            (LlmStatus::Active, None, Some(f.now()))
        );
    }
    assert!(f.gw.is_bound(&session));
}

#[tokio::test]
async fn bind_of_an_unknown_or_foreign_session_is_404_and_binds_nothing() {
    let f = fixture().await;
    let (session, _b, _ch) = f.online("alice", &["a"]).await;
    let sink = Arc::new(virtual_llm_core::testkit::FakeChannel::new());
    let err =
        f.gw.bind(&publisher("alice"), &SessionId::generate(), sink.clone())
            .await
            .unwrap_err();
    assert_eq!(err.status(), 404);
    let err =
        f.gw.bind(&publisher("mallory"), &session, sink)
            .await
            .unwrap_err();
    assert_eq!(
        err.status(),
        404,
        "another principal cannot bind Alice's session"
    );
    assert_eq!(f.gw.local_channels(), 1);
}

#[tokio::test]
async fn heartbeat_bumps_every_row_and_revives_inactive_rows_while_bound() {
    let f = fixture().await;
    let (session, _binding, _ch) = f.online("alice", &["a", "b"]).await;
    f.clock.advance(Duration::from_secs(91));
    assert_eq!(
        f.gw.sweep().await.unwrap().marked_inactive,
        2,
        "stale while the channel is bound"
    );
    f.clock.advance(Duration::from_secs(1));
    let answer = f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
    assert_eq!(answer.llms, 2);
    for n in ["a", "b"] {
        let r = f.row(n).await;
        assert_eq!(
            (r.status, r.last_heartbeat_at),
            (LlmStatus::Active, Some(f.now())),
            "{n} revived"
        );
    }
}

#[tokio::test]
async fn heartbeat_without_a_channel_bumps_but_does_not_revive() {
    let f = fixture().await;
    let (session, binding, _ch) = f.online("alice", &["a"]).await;
    binding.release().await.unwrap();
    f.clock.advance(Duration::from_secs(7));
    f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
    let r = f.row("a").await;
    assert_eq!(r.status, LlmStatus::Inactive, "no channel, no revival");
    assert_eq!(r.last_heartbeat_at, Some(f.now()));
}

#[tokio::test]
async fn heartbeat_of_an_unknown_or_foreign_session_is_404() {
    let f = fixture().await;
    let (session, _b, _ch) = f.online("alice", &["a"]).await;
    let err =
        f.gw.heartbeat(&publisher("alice"), &SessionId::generate())
            .await
            .unwrap_err();
    assert!(matches!(err, Error::UnknownSession), "{err:?}");
    let before = f.row("a").await;
    f.clock.advance(Duration::from_secs(1));
    let err =
        f.gw.heartbeat(&publisher("mallory"), &session)
            .await
            .unwrap_err();
    assert_eq!(err.status(), 404);
    assert_eq!(
        f.row("a").await,
        before,
        "a foreign heartbeat changes nothing"
    );
    let err = f.gw.heartbeat(&client(), &session).await.unwrap_err();
    assert_eq!(err.status(), 403, "clients cannot heartbeat");
}

#[tokio::test]
async fn channel_close_deactivates_at_once_and_fails_in_flight_tasks_with_503() {
    let f = fixture().await;
    let (_session, binding, ch) = f.online("alice", &["a", "b"]).await;
    let row = f.row("a").await;
    let body = serde_json::json!({"model": "a", "messages": []});
    let mut handle =
        f.gw.start_task(&client(), &row, InferRequest::for_llm("a", body).unwrap())
            .unwrap();
    ch.next_task().await;
    f.clock.advance(Duration::from_secs(2));
    assert!(
        binding.release().await.unwrap(),
        "the current binding unbinds"
    );
    let outcome = handle.next().await.unwrap().unwrap_err();
    assert_eq!(outcome.status(), 503);
    assert!(outcome.retry_after().is_some());
    assert!(handle.next().await.is_none(), "exactly one outcome");
    for n in ["a", "b"] {
        let r = f.row(n).await;
        assert_eq!(
            (r.status, r.inactive_since),
            (LlmStatus::Inactive, Some(f.now()))
        );
    }
    assert_eq!(f.gw.in_flight(), 0);
}

#[tokio::test]
async fn gc_marks_rows_stale_after_90s_and_deletes_them_after_4h_inactive() {
    let f = fixture().await;
    let _online = f.online("alice", &["a"]).await;
    f.clock.advance(Duration::from_secs(90));
    assert_eq!(
        f.gw.sweep().await.unwrap(),
        SweepReport::default(),
        "exactly 90 s is not stale yet"
    );
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(f.gw.sweep().await.unwrap().marked_inactive, 1);
    let r = f.row("a").await;
    assert_eq!(
        (r.status, r.inactive_since),
        (LlmStatus::Inactive, Some(f.now()))
    );
    f.clock.advance(Duration::from_secs(4 * 3600));
    assert_eq!(
        f.gw.sweep().await.unwrap().deleted,
        0,
        "exactly 4 h is kept"
    );
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        f.gw.sweep().await.unwrap(),
        SweepReport {
            marked_inactive: 0,
            deleted: 1
        }
    );
    assert!(f.try_row("a").await.is_none());
}

#[tokio::test]
async fn gc_leaves_public_rows_and_fresh_rows_alone() {
    let f = fixture().await;
    f.gw.put_public(&admin(), spec("pub")).await.unwrap();
    let (session, _b, _ch) = f.online("alice", &["fresh"]).await;
    for _ in 0..10 {
        f.clock.advance(Duration::from_secs(30));
        f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
        f.gw.sweep().await.unwrap();
    }
    f.clock.advance(Duration::from_secs(5 * 3600));
    f.gw.sweep().await.unwrap();
    assert_eq!(
        f.row("pub").await.status,
        LlmStatus::Active,
        "public rows never go stale"
    );
    assert_eq!(
        f.row("fresh").await.status,
        LlmStatus::Inactive,
        "until heartbeats stop"
    );
}

#[tokio::test]
async fn gc_sweep_is_idempotent() {
    let f = fixture().await;
    let _online = f.online("alice", &["a", "b"]).await;
    let (_, binding, _ch) = f.online("bob", &["c"]).await;
    binding.release().await.unwrap();
    f.clock.advance(Duration::from_secs(4 * 3600 + 1));
    let first = f.gw.sweep().await.unwrap();
    assert_eq!(
        first,
        SweepReport {
            marked_inactive: 2,
            deleted: 1
        }
    );
    let after_first = f.store.list().await.unwrap();
    assert_eq!(f.gw.sweep().await.unwrap(), SweepReport::default());
    assert_eq!(
        f.store.list().await.unwrap(),
        after_first,
        "a second sweep changes nothing"
    );
}

#[tokio::test]
async fn gateway_restart_leaves_no_virtual_row_active() {
    let f = fixture().await;
    f.gw.put_public(&admin(), spec("pub")).await.unwrap();
    let (session, _binding, _ch) = f.online("alice", &["a", "b"]).await;
    f.clock.advance(Duration::from_secs(1));
    // A second gateway process over the same store: no channel is bound there.
    let restarted = Gateway::builder(f.store.clone())
        .clock(Arc::new(f.clock.clone()))
        .start()
        .await
        .unwrap();
    for n in ["a", "b"] {
        let r = f.row(n).await;
        assert_eq!(
            (r.status, r.inactive_since),
            (LlmStatus::Inactive, Some(f.now())),
            "{n}"
        );
    }
    assert_eq!(f.row("pub").await.status, LlmStatus::Active);
    // The publisher comes back with its session: same rows, active again.
    let ids = (f.row("a").await.id, f.row("b").await.id);
    let answer = restarted
        .register(&publisher("alice"), request(Some(&session), &["a", "b"]))
        .await
        .unwrap();
    assert_eq!(
        answer.provider_session_id, session,
        "sticky session survives the restart"
    );
    let channel = Arc::new(virtual_llm_core::testkit::FakeChannel::new());
    let _binding = restarted
        .bind(&publisher("alice"), &session, channel)
        .await
        .unwrap();
    assert_eq!((f.row("a").await.id, f.row("b").await.id), ids);
    assert_eq!(f.row("a").await.status, LlmStatus::Active);
}

#[tokio::test]
async fn an_old_channels_close_does_not_unbind_a_newer_channel() {
    let f = fixture().await;
    let (session, old, old_ch) = f.online("alice", &["a"]).await;
    let (new, new_ch) = f.bind("alice", &session).await;
    assert!(
        matches!(old_ch.next().await, GatewayFrame::Closing(_)),
        "the replaced channel is told to close"
    );
    assert!(!old.is_current() && new.is_current());
    assert!(
        !old.release().await.unwrap(),
        "the old binding is no longer current"
    );
    assert_eq!(f.row("a").await.status, LlmStatus::Active);
    assert!(f.gw.is_bound(&session));
    let row = f.row("a").await;
    let body = serde_json::json!({"model": "a", "messages": []});
    let _task =
        f.gw.start_task(&client(), &row, InferRequest::for_llm("a", body).unwrap())
            .unwrap();
    assert!(
        matches!(new_ch.next().await, GatewayFrame::Task(_)),
        "tasks go to the newer channel"
    );
    assert!(new.release().await.unwrap());
    assert_eq!(f.row("a").await.status, LlmStatus::Inactive);
}

#[tokio::test]
async fn a_dropped_binding_unbinds_in_the_background() {
    let f = fixture().await;
    let (session, binding, _ch) = f.online("alice", &["a"]).await;
    drop(binding);
    for _ in 0..100 {
        if !f.gw.is_bound(&session) && f.row("a").await.status == LlmStatus::Inactive {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the dropped binding did not unbind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_principals_racing_for_one_name_end_with_exactly_one_owner() {
    for round in 0..50 {
        let f = fixture().await;
        let name = format!("contested-{round}");
        let racers = ["alice", "bob", "carol", "dave"].map(|who| {
            let gw = f.gw.clone();
            let req = request(None, &[name.as_str()]);
            tokio::spawn(async move { (who, gw.register(&publisher(who), req).await) })
        });
        let mut winners = Vec::new();
        for racer in racers {
            let (who, result) = racer.await.unwrap();
            match result {
                Ok(_) => winners.push(who),
                Err(e) => assert_eq!(e.status(), 409, "losers get 409, got {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(f.row(&name).await.owner, winners[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sessions_of_one_owner_racing_for_one_name_end_with_one_session() {
    for round in 0..50 {
        let f = fixture().await;
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let gw = f.gw.clone();
                tokio::spawn(async move {
                    gw.register(&publisher("alice"), request(None, &["llm"]))
                        .await
                })
            })
            .collect();
        let mut sessions = Vec::new();
        for r in racers {
            if let Ok(answer) = r.await.unwrap() {
                sessions.push(answer.provider_session_id);
            }
        }
        assert_eq!(sessions.len(), 1, "round {round}");
        assert_eq!(
            f.row("llm").await.provider_session_id.as_ref(),
            Some(&sessions[0])
        );
    }
}

#[tokio::test]
async fn bad_registers_are_refused_and_write_nothing() {
    let f = fixture().await;
    let alice = publisher("alice");
    for unsupported in [
        0,
        virtual_llm_core::protocol::PROTOCOL_VERSION + 1,
        u32::MAX,
    ] {
        let mut bad = request(None, &["a"]);
        bad.protocol_version = Some(unsupported);
        assert_eq!(
            f.gw.register(&alice, bad).await.unwrap_err().status(),
            426,
            "version {unsupported}"
        );
    }
    assert_eq!(
        f.gw.register(&alice, request(None, &[]))
            .await
            .unwrap_err()
            .status(),
        400
    );
    assert_eq!(
        f.gw.register(&alice, request(None, &["a", "a"]))
            .await
            .unwrap_err()
            .status(),
        400
    );
    let many: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        f.gw.register(&alice, request(None, &many))
            .await
            .unwrap_err()
            .status(),
        400
    );
    let mut bad_model = request(None, &["a"]);
    bad_model.llms[0].model = "x\u{7}y".into();
    assert_eq!(
        f.gw.register(&alice, bad_model).await.unwrap_err().status(),
        400
    );
    let mut huge_type = request(None, &["a"]);
    huge_type.llms[0].provider_type = "t".repeat(65);
    assert_eq!(
        f.gw.register(&alice, huge_type).await.unwrap_err().status(),
        400
    );
    assert_eq!(
        f.gw.register(&client(), request(None, &["a"]))
            .await
            .unwrap_err()
            .status(),
        403
    );
    assert!(f.store.list().await.unwrap().is_empty());
    let mut v1 = request(None, &["a"]);
    v1.protocol_version = Some(1);
    f.gw.register(&alice, v1).await.unwrap();
}

#[tokio::test]
async fn public_rows_are_admin_only_and_never_take_a_virtual_name() {
    let f = fixture().await;
    let _online = f.online("alice", &["a"]).await;
    assert_eq!(
        f.gw.put_public(&publisher("alice"), spec("p"))
            .await
            .unwrap_err()
            .status(),
        403
    );
    let err = f.gw.put_public(&admin(), spec("a")).await.unwrap_err();
    assert_eq!(
        conflicts(err),
        vec![("a".to_owned(), ConflictReason::VirtualLlm)]
    );
    let view = f.gw.put_public(&admin(), spec("p")).await.unwrap();
    assert_eq!(
        (view.kind, view.status),
        (LlmKind::Public, LlmStatus::Active)
    );
    let mut changed = spec("p");
    changed.model = "p2".into();
    let again = f.gw.put_public(&admin(), changed).await.unwrap();
    assert_eq!(
        (again.id, again.model.as_str()),
        (view.id, "p2"),
        "updated in place"
    );
}

#[tokio::test]
async fn a_clock_jumping_back_never_makes_fresh_rows_stale() {
    let f = fixture().await;
    let (session, _b, _ch) = f.online("alice", &["a"]).await;
    f.clock.advance(Duration::from_secs(60));
    f.gw.heartbeat(&publisher("alice"), &session).await.unwrap();
    f.clock.set(virtual_llm_core::testkit::at(START - 3600));
    assert_eq!(
        f.gw.sweep().await.unwrap(),
        SweepReport::default(),
        "a heartbeat from the future is fresh"
    );
    f.clock.set(virtual_llm_core::testkit::at(START + 60 + 91));
    assert_eq!(
        f.gw.sweep().await.unwrap().marked_inactive,
        1,
        "and ages normally once time catches up"
    );
}

#[tokio::test(start_paused = true)]
async fn the_background_gc_sweeps_every_tick_until_its_guard_is_dropped() {
    let f = fixture().await;
    let _online = f.online("alice", &["a"]).await;
    let guard = f.gw.spawn_gc();
    // Wall clock and tokio clock move together, one GC tick at a time.
    let tick = async |f: &Fixture| {
        f.clock.advance(Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    };
    tick(&f).await;
    assert_eq!(
        f.row("a").await.status,
        LlmStatus::Active,
        "60 s: not stale yet"
    );
    tick(&f).await;
    assert_eq!(
        f.row("a").await.status,
        LlmStatus::Inactive,
        "120 s: swept by the background GC"
    );
    guard.shutdown().await;
    f.clock.advance(Duration::from_secs(5 * 3600));
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(
        f.try_row("a").await.is_some(),
        "no sweep after the guard stopped the GC"
    );
}

#[tokio::test]
async fn list_and_get_show_views_and_check_names() {
    let f = fixture().await;
    let _online = f.online("alice", &["b", "a"]).await;
    let who = Principal::new("viewer", [Role::Client]);
    let names: Vec<_> =
        f.gw.list(&who)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name.to_string())
            .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(f.gw.get(&who, "a").await.unwrap(), f.row("a").await.view());
    assert_eq!(f.gw.get(&who, "zzz").await.unwrap_err().status(), 404);
    assert_eq!(
        f.gw.get(&who, "_provider-x").await.unwrap_err().status(),
        400
    );
    let json = serde_json::to_value(f.gw.get(&who, "a").await.unwrap()).unwrap();
    assert!(
        json.get("owner").is_none() && json.get("providerSessionId").is_none(),
        "{json}"
    );
    assert_eq!(json["type"], "openai");
}

#[tokio::test]
async fn config_is_validated_at_start() {
    let bad = Config {
        stale_after: Duration::from_secs(1),
        ..Config::default()
    };
    let store = Arc::new(virtual_llm_core::MemoryStore::new());
    let err = Gateway::builder(store)
        .config(bad)
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
}

/// The gateway speaks every version from 1 to its own and answers with the one it will
/// speak: nothing new for a version 1 publisher, `protocolVersion` for version 2.
#[tokio::test]
async fn register_and_hello_speak_the_publishers_version() {
    let f = fixture().await;
    let alice = publisher("alice");
    let v1 =
        f.gw.register(&alice, request(None, &["old"]))
            .await
            .unwrap();
    assert_eq!(v1.protocol_version, None);
    let text = serde_json::to_value(&v1).unwrap();
    assert!(
        text.get("protocolVersion").is_none(),
        "a v1 answer has no v2 field: {text}"
    );
    let hello = serde_json::to_value(f.gw.hello(&v1.provider_session_id, 1)).unwrap();
    assert_eq!(
        hello.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["heartbeatIntervalMs", "providerSessionId"],
        "a v1 hello is the v1 frame"
    );
    let mut req = request(None, &["new"]);
    req.protocol_version = Some(2);
    let v2 = f.gw.register(&alice, req).await.unwrap();
    assert_eq!(v2.protocol_version, Some(2));
    assert_eq!(
        f.gw.hello(&v2.provider_session_id, 2).protocol_version,
        Some(2)
    );
    assert!(v2.capabilities.is_empty(), "nothing asked, nothing granted");
}

/// Runs of chunks (capability `chunks`) are granted to a version 2 publisher that asks
/// for them, and never to a version 1 one, whose answer stays the v1 shape.
#[tokio::test]
async fn runs_of_chunks_are_granted_to_a_version_2_publisher_that_asks() {
    use virtual_llm_core::protocol::CHUNK_RUNS;
    let f = fixture().await;
    let alice = publisher("alice");
    let mut req = request(None, &["new"]);
    req.protocol_version = Some(2);
    req.capabilities = vec!["unknown".into(), CHUNK_RUNS.into()];
    let v2 = f.gw.register(&alice, req).await.unwrap();
    assert_eq!(v2.capabilities, [CHUNK_RUNS]);
    let mut req = request(None, &["old"]);
    req.capabilities = vec![CHUNK_RUNS.into()];
    let v1 = f.gw.register(&alice, req).await.unwrap();
    assert!(v1.capabilities.is_empty());
    assert!(
        serde_json::to_value(&v1)
            .unwrap()
            .get("capabilities")
            .is_none()
    );
}

/// Runs as lines (capability `chunkLines`) are granted with runs, to a version 2
/// publisher that asks for both; never alone, never to version 1.
#[tokio::test]
async fn runs_as_lines_are_granted_only_with_runs() {
    use virtual_llm_core::protocol::{CHUNK_LINES, CHUNK_RUNS};
    let f = fixture().await;
    let alice = publisher("alice");
    let ask = |name: &str, version: Option<u32>, capabilities: &[&str]| {
        let mut req = request(None, &[name]);
        req.protocol_version = version;
        req.capabilities = capabilities.iter().map(|c| (*c).to_owned()).collect();
        req
    };
    let both =
        f.gw.register(&alice, ask("both", Some(2), &[CHUNK_LINES, CHUNK_RUNS]))
            .await
            .unwrap();
    assert_eq!(both.capabilities, [CHUNK_RUNS, CHUNK_LINES]);
    let alone =
        f.gw.register(&alice, ask("alone", Some(2), &[CHUNK_LINES]))
            .await
            .unwrap();
    assert!(alone.capabilities.is_empty(), "{:?}", alone.capabilities);
    let v1 =
        f.gw.register(&alice, ask("old", None, &[CHUNK_RUNS, CHUNK_LINES]))
            .await
            .unwrap();
    assert!(v1.capabilities.is_empty());
}

/// A store whose first `n` writes wait for each other: every racer has read the
/// registry before any of them writes, so a race decided after the write is run
/// every time.
#[derive(Debug)]
struct ReadAllThenWrite {
    inner: MemoryStore,
    barrier: tokio::sync::Barrier,
    held: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for ReadAllThenWrite {
    async fn get(&self, n: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        self.inner.get(n).await
    }
    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.list().await
    }
    async fn by_session(&self, s: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.by_session(s).await
    }
    async fn by_pool(&self, p: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.by_pool(p).await
    }
    async fn bound_to(&self, r: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.bound_to(r).await
    }
    async fn stale_virtuals(&self, c: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.stale_virtuals(c).await
    }
    async fn expired_inactives(&self, c: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.inner.expired_inactives(c).await
    }
    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
        let waits = self
            .held
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if waits {
            self.barrier.wait().await;
        }
        self.inner.write(batch).await
    }
    async fn touch(&self, n: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        self.inner.touch(n, at).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

/// Four principals publishing different names into one new pool at once, each
/// having read the empty pool before any writes: the pool never ends with two
/// owners. Each register either succeeds, its principal then the pool's only owner,
/// or is 409 `poolOwnedByAnother` and leaves no row behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn principals_racing_to_create_one_pool_never_share_it() {
    const RACERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
    for round in 0..20 {
        let store = Arc::new(ReadAllThenWrite {
            inner: MemoryStore::new(),
            barrier: tokio::sync::Barrier::new(RACERS.len()),
            held: RACERS.len().into(),
        });
        let gw = Gateway::builder(store.clone()).start().await.unwrap();
        let pool = LlmName::parse(&format!("pool-{round}")).unwrap();
        let racers = RACERS.map(|who| {
            let gw = gw.clone();
            let mut req = request(None, &[format!("{who}-{round}").as_str()]);
            req.llms[0].pool = Some(pool.clone());
            tokio::spawn(async move { (who, gw.register(&publisher(who), req).await) })
        });
        let mut winners = Vec::new();
        for racer in racers {
            let (who, result) = racer.await.unwrap();
            match result {
                Ok(_) => winners.push(who),
                Err(e) => assert_eq!(
                    conflicts(e),
                    [(format!("{who}-{round}"), ConflictReason::PoolOwnedByAnother)],
                    "round {round}"
                ),
            }
        }
        assert!(winners.len() <= 1, "round {round}: winners {winners:?}");
        let owners: Vec<String> = store
            .by_pool(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.owner)
            .collect();
        assert_eq!(owners, winners, "round {round}: the losers' rows are gone");
    }
}
