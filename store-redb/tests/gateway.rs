//! The lifecycle on redb, through `virtual_llm_core::Gateway`: registrations racing
//! for one name end with exactly one owner (two principals; two sessions of one
//! principal; two gateways sharing the store), and a gateway restart over the same
//! file keeps rows and ids, shows no virtual row `active` until its publisher binds
//! again, and revives the same rows when it reconnects with its session.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TempStore, name, publisher, request};
use virtual_llm_core::testkit::{FakeChannel, ManualClock, at};
use virtual_llm_core::{Error, Gateway, LlmId, LlmStatus, Principal, SessionId, Store};
use virtual_llm_redb::RedbStore;

async fn gateway(store: Arc<RedbStore>, clock: &ManualClock) -> Gateway {
    Gateway::builder(store)
        .clock(Arc::new(clock.clone()))
        .start()
        .await
        .unwrap()
}

/// Registers `llm` through `a` and `b` at the same moment, on two runtime threads.
/// Exactly one must win; the loser gets a 409. Returns the winner's principal id and
/// session.
async fn race(
    a: (Gateway, Principal),
    b: (Gateway, Principal),
    llm: &'static str,
) -> (String, SessionId) {
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let spawn = |(gw, who): (Gateway, Principal)| {
        let start = start.clone();
        tokio::spawn(async move {
            start.wait().await;
            let result = gw.register(&who, request(None, &[llm])).await;
            (who.id, result)
        })
    };
    let (ra, rb) = (spawn(a), spawn(b));
    let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
    match (ra, rb) {
        ((winner, Ok(won)), (_, Err(lost))) | ((_, Err(lost)), (winner, Ok(won))) => {
            assert!(
                matches!(lost, Error::Conflict { .. }),
                "the loser of {llm} gets a 409, not {lost:?}"
            );
            assert_eq!(lost.status(), 409);
            (winner, won.provider_session_id)
        }
        ((_, Ok(_)), (_, Ok(_))) => panic!("both registrations of {llm} succeeded"),
        ((_, Err(a)), (_, Err(b))) => panic!("both registrations of {llm} failed: {a:?} / {b:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_principals_racing_for_a_name_end_with_one_owner() {
    let store = TempStore::new().await;
    let clock = ManualClock::new(at(1_000));
    let gw = gateway(store.arc(), &clock).await;
    // A second gateway over the same store: no process-local lock can help them.
    let other = gateway(store.arc(), &clock).await;
    const NAMES: [&str; 12] = [
        "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11",
    ];
    for (i, llm) in NAMES.iter().enumerate() {
        let second = if i % 2 == 0 {
            gw.clone()
        } else {
            other.clone()
        };
        let (winner, session) = race(
            (gw.clone(), publisher("alice")),
            (second, publisher("bob")),
            llm,
        )
        .await;
        let row = store
            .get(&name(llm))
            .await
            .unwrap()
            .expect("the winner's row");
        assert_eq!(row.owner, winner, "the winner owns {llm}");
        assert_eq!(row.provider_session_id.as_ref(), Some(&session));
        assert_eq!(row.revision, 1, "one insert, no second write");
    }
    assert_eq!(store.list().await.unwrap().len(), NAMES.len());
    assert!(store.check_integrity().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_of_one_principal_racing_end_with_one_owner() {
    let store = TempStore::new().await;
    let clock = ManualClock::new(at(1_000));
    let gw = gateway(store.arc(), &clock).await;
    let other = gateway(store.arc(), &clock).await;
    const NAMES: [&str; 12] = [
        "s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
    ];
    for (i, llm) in NAMES.iter().enumerate() {
        let second = if i % 2 == 0 {
            gw.clone()
        } else {
            other.clone()
        };
        // No session id: each registration gets a fresh session of the same owner.
        let (_, session) = race(
            (gw.clone(), publisher("alice")),
            (second, publisher("alice")),
            llm,
        )
        .await;
        let row = store.get(&name(llm)).await.unwrap().unwrap();
        assert_eq!(row.owner, "alice");
        assert_eq!(
            row.provider_session_id.as_ref(),
            Some(&session),
            "the row is bound to the winning session"
        );
        assert_eq!(store.by_session(&session).await.unwrap().len(), 1);
    }
    assert!(store.check_integrity().await.unwrap().is_ok());
}

#[tokio::test]
async fn a_gateway_restart_keeps_ids_and_revives_rows_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let clock = ManualClock::new(at(1_000_000));
    let alice = publisher("alice");

    // First run: register, bind, heartbeat.
    let store = Arc::new(RedbStore::open(&path).await.unwrap());
    let gw = gateway(store.clone(), &clock).await;
    let registered = gw
        .register(&alice, request(None, &["a", "b"]))
        .await
        .unwrap();
    let session = registered.provider_session_id.clone();
    let ids: Vec<LlmId> = registered.llms.iter().map(|v| v.id.clone()).collect();
    let binding = gw
        .bind(&alice, &session, Arc::new(FakeChannel::new()))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30));
    gw.heartbeat(&alice, &session).await.unwrap();
    for llm in ["a", "b"] {
        assert_eq!(gw.get(&alice, llm).await.unwrap().status, LlmStatus::Active);
    }
    // The gateway stops: its store is closed (what the reference gateway does on
    // SIGTERM); the channel's late close cannot reach the closed store.
    store.close().await.unwrap();
    drop(binding);
    drop(gw);

    // Second run, same file. Before recovery the rows still read active on disk.
    let store = Arc::new(RedbStore::open(&path).await.unwrap());
    assert!(
        store
            .list()
            .await
            .unwrap()
            .iter()
            .all(|r| r.status == LlmStatus::Active)
    );
    clock.advance(Duration::from_secs(5));
    let gw = gateway(store.clone(), &clock).await;
    let rows = store.list().await.unwrap();
    assert_eq!(rows.len(), 2, "rows survive the restart");
    for r in &rows {
        assert_ne!(
            r.status,
            LlmStatus::Active,
            "{} reads active before its channel binds",
            r.name
        );
        assert_eq!(
            r.last_heartbeat_at,
            Some(at(1_000_030)),
            "the last heartbeat was flushed on close"
        );
    }
    assert_eq!(
        rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        ids,
        "ids survive"
    );

    // The publisher reconnects with its persisted session: same session, same rows.
    let again = gw
        .register(&alice, request(Some(&session), &["a", "b"]))
        .await
        .unwrap();
    assert_eq!(again.provider_session_id, session, "sticky reconnect");
    assert_eq!(
        again.llms.iter().map(|v| v.id.clone()).collect::<Vec<_>>(),
        ids
    );
    let _binding = gw
        .bind(&alice, &session, Arc::new(FakeChannel::new()))
        .await
        .unwrap();
    for (llm, id) in ["a", "b"].into_iter().zip(&ids) {
        let view = gw.get(&alice, llm).await.unwrap();
        assert_eq!(view.status, LlmStatus::Active, "{llm} is revived");
        assert_eq!(&view.id, id);
    }
    assert!(store.check_integrity().await.unwrap().is_ok());
    store.close().await.unwrap();
}
