//! The Store conformance suite: one function per behaviour of the [`Store`] contract.
//!
//! Each function takes the store under test and panics with a message naming the broken
//! rule. Run them all with [`store_conformance_tests!`](crate::store_conformance_tests),
//! which stamps out one `#[tokio::test]` per case; or call them one by one.
//! Every function expects an empty store.

use futures::future::join_all;

use crate::testkit::{at, record};
use crate::{
    ChannelBinding, LeaseRenewal, LlmKind, LlmStatus, ReplicaId, SessionId, Store, StoreError,
    Timestamp, Write,
};

/// The names of `rows`, in order, for readable assertions.
fn names(rows: Vec<crate::LlmRecord>) -> Vec<String> {
    rows.into_iter().map(|r| r.name.to_string()).collect()
}

fn name(s: &str) -> crate::LlmName {
    crate::LlmName::parse(s).expect("test names are valid")
}

/// An insert stores revision 1 and `get` returns the row as written.
pub async fn insert_then_get(store: &dyn Store) {
    let row = record("alpha");
    let written = store
        .write(vec![Write::Insert(row.clone())])
        .await
        .expect("insert");
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].revision, 1, "an insert stores revision 1");
    let got = store
        .get(&row.name)
        .await
        .expect("get")
        .expect("row present");
    assert_eq!(got, written[0], "get returns the row as written");
    assert_eq!(store.get(&name("missing")).await.expect("get"), None);
}

/// Inserting a name that exists fails with `Conflict` and leaves the row as it was.
pub async fn insert_existing_conflicts(store: &dyn Store) {
    let row = record("alpha");
    store
        .write(vec![Write::Insert(row.clone())])
        .await
        .expect("insert");
    let mut other = record("alpha");
    other.model = "other".into();
    let err = store
        .write(vec![Write::Insert(other)])
        .await
        .expect_err("second insert");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "expected Conflict, got {err:?}"
    );
    let got = store.get(&row.name).await.expect("get").expect("present");
    assert_eq!(got.model, row.model, "the losing insert wrote nothing");
}

/// Names are unique ignoring ASCII case: an insert of `ALPHA` or `Alpha` beside
/// `alpha` fails with `Conflict` and writes nothing (nor does a batch inserting two
/// such names); `get_ignoring_case` finds the row holding a name in any case, and
/// finds none once it is deleted, when the name is free in every case again. `get`
/// stays exact.
pub async fn names_are_unique_ignoring_case(store: &dyn Store) {
    let written = store
        .write(vec![Write::Insert(record("Meta/Llama-8b"))])
        .await
        .expect("insert");
    for lookalike in ["meta/llama-8b", "META/LLAMA-8B", "Meta/Llama-8B"] {
        let err = store
            .write(vec![Write::Insert(record(lookalike))])
            .await
            .expect_err(lookalike);
        assert!(
            matches!(err, StoreError::Conflict { .. }),
            "{lookalike}: expected Conflict, got {err:?}"
        );
        assert_eq!(
            store.get(&name(lookalike)).await.expect("get"),
            None,
            "{lookalike}"
        );
        let holder = store
            .get_ignoring_case(&name(lookalike))
            .await
            .expect("get_ignoring_case")
            .expect("the row holding the name");
        assert_eq!(holder, written[0], "{lookalike}");
    }
    assert_eq!(
        names(store.list().await.expect("list")),
        ["Meta/Llama-8b"],
        "no look-alike was written"
    );
    let err = store
        .write(vec![
            Write::Insert(record("beta")),
            Write::Insert(record("BETA")),
        ])
        .await
        .expect_err("two look-alikes in one batch");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(
        store.get(&name("beta")).await.expect("get"),
        None,
        "all or nothing"
    );
    assert_eq!(
        store
            .get_ignoring_case(&name("gamma"))
            .await
            .expect("get_ignoring_case"),
        None
    );

    // Updates keep the name; a deleted name is free in every case.
    let mut row = written[0].clone();
    row.model = "other".into();
    let updated = store.write(vec![Write::Update(row)]).await.expect("update");
    store
        .write(vec![Write::Delete {
            name: updated[0].name.clone(),
            id: updated[0].id.clone(),
            revision: updated[0].revision,
        }])
        .await
        .expect("delete");
    assert_eq!(
        store
            .get_ignoring_case(&name("meta/llama-8b"))
            .await
            .expect("get_ignoring_case"),
        None
    );
    store
        .write(vec![Write::Insert(record("META/LLAMA-8B"))])
        .await
        .expect("the name is free once its row is gone");
}

/// Two look-alike inserts at once: exactly one wins.
pub async fn concurrent_lookalike_inserts_one_winner(store: &dyn Store) {
    let attempts = ["contested", "CONTESTED", "Contested", "contesteD"]
        .into_iter()
        .map(|n| store.write(vec![Write::Insert(record(n))]));
    let results = join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one look-alike wins: {results:?}");
    assert_eq!(store.list().await.expect("list").len(), 1);
}

/// Replica leases (SPEC §14), for a store that keeps them: a first renewal starts a
/// lease, later ones extend it; `expired_leases` lists those that ran out before a
/// cutoff, oldest first; `end_lease` ends one only at the expiry it was read with (a
/// renewal in between keeps it) and only once; an ended lease starts again. A store
/// for one process (`LeaseRenewal::Unsupported`) lists and ends none.
pub async fn leases_start_expire_and_end_once(store: &dyn Store) {
    let (a, b) = (
        ReplicaId::parse("gw-a").expect("id"),
        ReplicaId::parse("gw-b").expect("id"),
    );
    let first = store.renew_lease(&a, at(10_000)).await.expect("renew");
    if first == LeaseRenewal::Unsupported {
        assert!(
            store
                .expired_leases(Timestamp::MAX)
                .await
                .expect("expired")
                .is_empty()
        );
        assert!(!store.end_lease(&a, at(10_000)).await.expect("end"));
        return;
    }
    assert_eq!(first, LeaseRenewal::Started);
    assert_eq!(
        store.renew_lease(&a, at(15_000)).await.expect("renew"),
        LeaseRenewal::Renewed
    );
    assert_eq!(
        store.renew_lease(&b, at(12_000)).await.expect("renew"),
        LeaseRenewal::Started
    );
    assert!(
        store
            .expired_leases(at(12_000))
            .await
            .expect("expired")
            .is_empty(),
        "strictly before"
    );
    assert_eq!(
        store.expired_leases(at(20_000)).await.expect("expired"),
        [(b.clone(), at(12_000)), (a.clone(), at(15_000))],
        "oldest first"
    );
    // a renews after a peer read its lease: the peer's end is refused.
    assert_eq!(
        store.renew_lease(&a, at(25_000)).await.expect("renew"),
        LeaseRenewal::Renewed
    );
    assert!(
        !store.end_lease(&a, at(15_000)).await.expect("end"),
        "renewed since"
    );
    // Two peers ending b's lease at once: one does.
    let ends = join_all([
        store.end_lease(&b, at(12_000)),
        store.end_lease(&b, at(12_000)),
    ])
    .await;
    assert_eq!(
        ends.iter().filter(|e| matches!(e, Ok(true))).count(),
        1,
        "{ends:?}"
    );
    assert_eq!(
        store.expired_leases(at(20_000)).await.expect("expired"),
        [],
        "b's lease ended, a's runs"
    );
    assert_eq!(
        store.renew_lease(&b, at(30_000)).await.expect("renew"),
        LeaseRenewal::Started,
        "b learns its lease was ended"
    );
}

/// An update must name the current revision; it then bumps it. A stale one conflicts.
pub async fn update_checks_revision(store: &dyn Store) {
    let row = store
        .write(vec![Write::Insert(record("alpha"))])
        .await
        .expect("insert")
        .remove(0);
    let mut new = row.clone();
    new.model = "m2".into();
    let stored = store
        .write(vec![Write::Update(new.clone())])
        .await
        .expect("update")
        .remove(0);
    assert_eq!(stored.revision, 2, "an update bumps the revision");
    new.model = "m3".into();
    let err = store
        .write(vec![Write::Update(new)])
        .await
        .expect_err("stale update");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "expected Conflict, got {err:?}"
    );
    let got = store.get(&row.name).await.expect("get").expect("present");
    assert_eq!(
        (got.model.as_str(), got.revision),
        ("m2", 2),
        "a stale update wrote nothing"
    );
    let err = store
        .write(vec![Write::Update(record("ghost"))])
        .await
        .expect_err("missing row");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "updating a missing row conflicts"
    );
}

/// A delete must name the current revision; a wrong one or a missing row conflicts.
pub async fn delete_checks_revision(store: &dyn Store) {
    let row = store
        .write(vec![Write::Insert(record("alpha"))])
        .await
        .expect("insert")
        .remove(0);
    let wrong = Write::Delete {
        name: row.name.clone(),
        id: row.id.clone(),
        revision: 7,
    };
    let err = store.write(vec![wrong]).await.expect_err("wrong revision");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "expected Conflict, got {err:?}"
    );
    assert!(
        store.get(&row.name).await.expect("get").is_some(),
        "a failed delete kept the row"
    );
    let ok = Write::Delete {
        name: row.name.clone(),
        id: row.id.clone(),
        revision: 1,
    };
    assert!(
        store
            .write(vec![ok.clone()])
            .await
            .expect("delete")
            .is_empty()
    );
    assert_eq!(store.get(&row.name).await.expect("get"), None);
    assert!(store.list().await.expect("list").is_empty());
    assert!(matches!(
        store.write(vec![ok]).await,
        Err(StoreError::Conflict { .. })
    ));
}

/// One failed expectation fails the whole batch: nothing of it is written.
pub async fn batch_is_atomic(store: &dyn Store) {
    let b = store
        .write(vec![Write::Insert(record("b"))])
        .await
        .expect("insert")
        .remove(0);
    let mut b_changed = b.clone();
    b_changed.model = "changed".into();
    let mut c_stale = record("c");
    c_stale.revision = 3;
    let batch = vec![
        Write::Insert(record("a")),
        Write::Update(b_changed),
        Write::Update(c_stale),
    ];
    let err = store
        .write(batch)
        .await
        .expect_err("batch with a bad expectation");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "expected Conflict, got {err:?}"
    );
    assert_eq!(
        store.get(&name("a")).await.expect("get"),
        None,
        "insert of a failed batch applied"
    );
    assert_eq!(
        store.get(&name("b")).await.expect("get"),
        Some(b),
        "update of a failed batch applied"
    );
    assert_eq!(store.list().await.expect("list").len(), 1);
}

/// A batch naming one row twice is refused as `InvalidBatch`, and writes nothing.
pub async fn batch_rejects_duplicate_names(store: &dyn Store) {
    let batch = vec![Write::Insert(record("a")), Write::Insert(record("a"))];
    let err = store.write(batch).await.expect_err("duplicate names");
    assert!(
        matches!(err, StoreError::InvalidBatch { .. }),
        "expected InvalidBatch, got {err:?}"
    );
    assert!(store.list().await.expect("list").is_empty());
}

/// `write` returns the stored rows in batch order with their new revisions, deletes left out.
pub async fn write_returns_stored_rows(store: &dyn Store) {
    let x = store
        .write(vec![Write::Insert(record("x"))])
        .await
        .expect("insert")
        .remove(0);
    let batch = vec![
        Write::Insert(record("b")),
        Write::Delete {
            name: x.name.clone(),
            id: x.id.clone(),
            revision: x.revision,
        },
        Write::Insert(record("a")),
    ];
    let written = store.write(batch).await.expect("batch");
    let names: Vec<_> = written.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["b", "a"],
        "rows come back in batch order, without deletes"
    );
    assert!(written.iter().all(|r| r.revision == 1));
}

/// `list` returns every row, ordered by name.
pub async fn list_is_ordered_by_name(store: &dyn Store) {
    for n in ["delta", "alpha", "charlie", "bravo"] {
        store
            .write(vec![Write::Insert(record(n))])
            .await
            .expect("insert");
    }
    let names: Vec<_> = store
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta"]);
}

/// `list_after` pages through the rows in name order: each page holds at most
/// `limit` rows, all after the cursor (strictly), whether or not the cursor names a
/// row; the pages together are `list`; touched heartbeats show as in `list`.
pub async fn list_after_pages_in_name_order(store: &dyn Store) {
    for n in ["delta", "alpha", "charlie", "bravo", "echo", "a", "alpha.2"] {
        store
            .write(vec![Write::Insert(record(n))])
            .await
            .expect("insert");
    }
    let at = at(123);
    let touched = name("charlie");
    store.touch(&[touched], at).await.expect("touch");
    let page = |after: Option<&'static str>, limit: usize| async move {
        let after = after.map(name);
        store
            .list_after(after.as_ref(), limit)
            .await
            .expect("list_after")
    };
    assert_eq!(names(page(None, 3).await), ["a", "alpha", "alpha.2"]);
    assert_eq!(
        names(page(Some("alpha.2"), 3).await),
        ["bravo", "charlie", "delta"]
    );
    assert_eq!(names(page(Some("delta"), 3).await), ["echo"]);
    assert!(page(Some("echo"), 3).await.is_empty(), "after the last row");
    assert!(page(None, 0).await.is_empty(), "a page of none");
    // A cursor that names no row: the rows after where it would be.
    assert_eq!(names(page(Some("b"), 2).await), ["bravo", "charlie"]);
    // Walking every page gives `list`, the touched heartbeat included.
    let mut walked = Vec::new();
    let mut after: Option<crate::LlmName> = None;
    loop {
        let rows = store
            .list_after(after.as_ref(), 2)
            .await
            .expect("list_after");
        let Some(last) = rows.last() else { break };
        after = Some(last.name.clone());
        walked.extend(rows);
    }
    assert_eq!(walked, store.list().await.expect("list"));
    let charlie = walked
        .iter()
        .find(|r| r.name.as_str() == "charlie")
        .expect("charlie");
    assert_eq!(charlie.last_heartbeat_at, Some(at));
}

/// `by_session` finds exactly the session's rows and follows moves, detaches and deletes.
pub async fn by_session_follows_rows(store: &dyn Store) {
    let (s1, s2) = (SessionId::generate(), SessionId::generate());
    for (n, s) in [("a", &s1), ("b", &s1), ("c", &s2)] {
        let mut r = record(n);
        r.provider_session_id = Some(s.clone());
        store.write(vec![Write::Insert(r)]).await.expect("insert");
    }
    assert_eq!(
        names(store.by_session(&s1).await.expect("by_session")),
        ["a", "b"]
    );
    let mut b = store.get(&name("b")).await.expect("get").expect("b");
    b.provider_session_id = Some(s2.clone());
    store.write(vec![Write::Update(b)]).await.expect("move b");
    assert_eq!(
        names(store.by_session(&s1).await.expect("by_session")),
        ["a"]
    );
    assert_eq!(
        names(store.by_session(&s2).await.expect("by_session")),
        ["b", "c"]
    );
    let mut a = store.get(&name("a")).await.expect("get").expect("a");
    a.provider_session_id = None;
    store.write(vec![Write::Update(a)]).await.expect("detach a");
    assert!(
        store.by_session(&s1).await.expect("by_session").is_empty(),
        "detached rows leave the index"
    );
    let c = store.get(&name("c")).await.expect("get").expect("c");
    store
        .write(vec![Write::Delete {
            name: c.name,
            id: c.id,
            revision: c.revision,
        }])
        .await
        .expect("delete");
    assert_eq!(
        names(store.by_session(&s2).await.expect("by_session")),
        ["b"]
    );
    assert!(
        store
            .by_session(&SessionId::generate())
            .await
            .expect("by_session")
            .is_empty()
    );
}

/// `bound_to` returns the rows whose binding names the replica, ordered by name, and
/// follows every change of a binding: rebinding to another replica, clearing, delete.
pub async fn bound_to_follows_bindings(store: &dyn Store) {
    let (r1, r2) = (
        ReplicaId::parse("replica-1").expect("valid"),
        ReplicaId::parse("replica-2").expect("valid"),
    );
    let bound = |replica: &ReplicaId, epoch| {
        Some(ChannelBinding {
            replica: replica.clone(),
            epoch,
        })
    };
    for (n, b) in [
        ("b", bound(&r1, 1)),
        ("a", bound(&r1, 2)),
        ("c", bound(&r2, 1)),
    ] {
        let mut r = record(n);
        r.binding = b;
        store.write(vec![Write::Insert(r)]).await.expect("insert");
    }
    store
        .write(vec![Write::Insert(record("unbound"))])
        .await
        .expect("insert");
    assert_eq!(
        names(store.bound_to(&r1).await.expect("bound_to")),
        ["a", "b"]
    );
    let mut b = store.get(&name("b")).await.expect("get").expect("b");
    b.binding = bound(&r2, 7);
    store.write(vec![Write::Update(b)]).await.expect("rebind b");
    assert_eq!(names(store.bound_to(&r1).await.expect("bound_to")), ["a"]);
    let rows = store.bound_to(&r2).await.expect("bound_to");
    assert_eq!(names(rows.clone()), ["b", "c"]);
    assert_eq!(rows[0].binding, bound(&r2, 7), "the binding round-trips");
    let mut a = store.get(&name("a")).await.expect("get").expect("a");
    a.binding = None;
    store.write(vec![Write::Update(a)]).await.expect("clear a");
    assert!(
        store.bound_to(&r1).await.expect("bound_to").is_empty(),
        "a cleared binding leaves the index"
    );
    let c = store.get(&name("c")).await.expect("get").expect("c");
    store
        .write(vec![Write::Delete {
            name: c.name,
            id: c.id,
            revision: c.revision,
        }])
        .await
        .expect("delete");
    assert_eq!(names(store.bound_to(&r2).await.expect("bound_to")), ["b"]);
    store
        .touch(&[name("b")], at(99))
        .await
        .expect("touch keeps the binding");
    assert_eq!(names(store.bound_to(&r2).await.expect("bound_to")), ["b"]);
}

/// `by_pool` returns the rows whose pool key is the pool, ordered by name: members
/// named otherwise, and a row named after the pool with no pool of its own. It follows
/// a row moving to another pool, leaving every pool, and a delete.
pub async fn by_pool_follows_pool_keys(store: &dyn Store) {
    let pool = |p: &str| Some(name(p));
    for (n, p) in [
        ("m2", pool("llama")),
        ("m1", pool("llama")),
        ("llama", None),
        ("other", pool("qwen")),
        ("solo", None),
    ] {
        let mut r = record(n);
        r.pool = p;
        r.max_concurrent = Some(4);
        store.write(vec![Write::Insert(r)]).await.expect("insert");
    }
    assert_eq!(
        names(store.by_pool(&name("llama")).await.expect("by_pool")),
        ["llama", "m1", "m2"]
    );
    assert_eq!(
        names(store.by_pool(&name("solo")).await.expect("by_pool")),
        ["solo"],
        "a row without a pool is the pool of one named after it"
    );
    assert!(
        store
            .by_pool(&name("m1"))
            .await
            .expect("by_pool")
            .is_empty()
    );
    let mut m1 = store.get(&name("m1")).await.expect("get").expect("m1");
    assert_eq!(m1.pool, pool("llama"), "the pool round-trips");
    assert_eq!(m1.max_concurrent, Some(4), "the capacity round-trips");
    m1.pool = pool("qwen");
    store.write(vec![Write::Update(m1)]).await.expect("move m1");
    assert_eq!(
        names(store.by_pool(&name("llama")).await.expect("by_pool")),
        ["llama", "m2"]
    );
    assert_eq!(
        names(store.by_pool(&name("qwen")).await.expect("by_pool")),
        ["m1", "other"]
    );
    let mut m2 = store.get(&name("m2")).await.expect("get").expect("m2");
    m2.pool = None;
    store
        .write(vec![Write::Update(m2)])
        .await
        .expect("m2 leaves");
    assert_eq!(
        names(store.by_pool(&name("m2")).await.expect("by_pool")),
        ["m2"]
    );
    let other = store
        .get(&name("other"))
        .await
        .expect("get")
        .expect("other");
    store
        .write(vec![Write::Delete {
            name: other.name,
            id: other.id,
            revision: other.revision,
        }])
        .await
        .expect("delete");
    store
        .touch(&[name("m1")], at(5))
        .await
        .expect("touch keeps the pool");
    assert_eq!(
        names(store.by_pool(&name("qwen")).await.expect("by_pool")),
        ["m1"]
    );
    assert_eq!(
        names(store.by_pool(&name("llama")).await.expect("by_pool")),
        ["llama"]
    );
}

/// `stale_virtuals` returns live virtual rows (active or hibernating: a sleeping
/// model's publisher heartbeats too) with a heartbeat strictly before the cutoff,
/// oldest first; public and inactive rows never.
pub async fn stale_virtuals_uses_heartbeat_cutoff(store: &dyn Store) {
    for (n, hb) in [("v30", 30), ("v10", 10), ("v20", 20)] {
        let mut r = record(n);
        r.last_heartbeat_at = Some(at(hb));
        store.write(vec![Write::Insert(r)]).await.expect("insert");
    }
    let mut public = record("public");
    public.kind = LlmKind::Public;
    public.last_heartbeat_at = Some(at(1));
    let mut inactive = record("inactive");
    inactive.status = LlmStatus::Inactive;
    inactive.last_heartbeat_at = Some(at(1));
    inactive.inactive_since = Some(at(2));
    let mut sleeping = record("sleeping");
    sleeping.status = LlmStatus::Hibernating;
    sleeping.upstream = Some(crate::protocol::UpstreamState::Asleep);
    sleeping.last_heartbeat_at = Some(at(15));
    store
        .write(vec![
            Write::Insert(public),
            Write::Insert(inactive),
            Write::Insert(sleeping),
        ])
        .await
        .expect("insert");
    assert_eq!(
        names(store.stale_virtuals(at(20)).await.expect("stale")),
        ["v10", "sleeping"],
        "the cutoff is strict; a hibernating row is live"
    );
    assert_eq!(
        names(store.stale_virtuals(at(31)).await.expect("stale")),
        ["v10", "sleeping", "v20", "v30"],
        "oldest first"
    );
    assert!(
        store
            .stale_virtuals(at(10))
            .await
            .expect("stale")
            .is_empty()
    );
}

/// `expired_inactives` returns inactive rows that went inactive strictly before the cutoff.
pub async fn expired_inactives_uses_inactive_since(store: &dyn Store) {
    for (n, since) in [("i30", 30), ("i10", 10), ("i20", 20)] {
        let mut r = record(n);
        r.status = LlmStatus::Inactive;
        r.inactive_since = Some(at(since));
        store.write(vec![Write::Insert(r)]).await.expect("insert");
    }
    let mut active = record("active");
    active.last_heartbeat_at = Some(at(1));
    store
        .write(vec![Write::Insert(active)])
        .await
        .expect("insert");
    assert_eq!(
        names(store.expired_inactives(at(20)).await.expect("expired")),
        ["i10"]
    );
    assert_eq!(
        names(store.expired_inactives(at(100)).await.expect("expired")),
        ["i10", "i20", "i30"]
    );
}

/// Status changes move a row between the live and inactive indexes, in both directions.
pub async fn lifecycle_indexes_follow_status_changes(store: &dyn Store) {
    let mut r = record("row");
    r.last_heartbeat_at = Some(at(5));
    let r = store
        .write(vec![Write::Insert(r)])
        .await
        .expect("insert")
        .remove(0);
    assert_eq!(store.stale_virtuals(at(100)).await.expect("stale").len(), 1);
    let mut off = r.clone();
    off.status = LlmStatus::Inactive;
    off.inactive_since = Some(at(50));
    let off = store
        .write(vec![Write::Update(off)])
        .await
        .expect("deactivate")
        .remove(0);
    assert!(
        store
            .stale_virtuals(at(100))
            .await
            .expect("stale")
            .is_empty(),
        "inactive rows are not live"
    );
    assert_eq!(
        store
            .expired_inactives(at(100))
            .await
            .expect("expired")
            .len(),
        1
    );
    let mut on = off.clone();
    on.status = LlmStatus::Active;
    on.inactive_since = None;
    on.last_heartbeat_at = Some(at(60));
    store
        .write(vec![Write::Update(on)])
        .await
        .expect("reactivate");
    assert!(
        store
            .expired_inactives(at(100))
            .await
            .expect("expired")
            .is_empty(),
        "active rows are not inactive"
    );
    assert_eq!(store.stale_virtuals(at(61)).await.expect("stale").len(), 1);
    assert!(
        store
            .stale_virtuals(at(60))
            .await
            .expect("stale")
            .is_empty(),
        "the new heartbeat is the key"
    );
}

/// `touch` sets the heartbeat of existing rows, counts them, is seen by every read, and
/// does not change the revision (so a concurrent compare-and-set still succeeds).
pub async fn touch_sets_liveness_without_revision(store: &dyn Store) {
    let mut r = record("row");
    r.last_heartbeat_at = Some(at(5));
    let r = store
        .write(vec![Write::Insert(r)])
        .await
        .expect("insert")
        .remove(0);
    let touched = store
        .touch(&[r.name.clone(), name("missing")], at(50))
        .await
        .expect("touch");
    assert_eq!(touched, 1, "touch counts only rows that exist");
    let got = store.get(&r.name).await.expect("get").expect("row");
    assert_eq!(got.last_heartbeat_at, Some(at(50)));
    assert_eq!(
        got.revision, r.revision,
        "a heartbeat does not bump the revision"
    );
    assert!(
        store
            .stale_virtuals(at(50))
            .await
            .expect("stale")
            .is_empty(),
        "the stale query sees the touch"
    );
    assert_eq!(store.stale_virtuals(at(51)).await.expect("stale").len(), 1);
    assert_eq!(
        store.list().await.expect("list")[0].last_heartbeat_at,
        Some(at(50))
    );
    let mut update = r.clone();
    update.model = "m2".into();
    update.last_heartbeat_at = Some(at(50));
    store
        .write(vec![Write::Update(update)])
        .await
        .expect("CAS after a touch succeeds");
}

/// Every field round-trips, `hibernating`, an upstream state, a pool, a capacity, a
/// channel binding, each kind of access, no tier and no session included.
pub async fn all_fields_round_trip(store: &dyn Store) {
    let mut sleeping = record("sleeping");
    sleeping.status = LlmStatus::Hibernating;
    sleeping.upstream = Some(crate::protocol::UpstreamState::Asleep);
    sleeping.pool = Some(name("sleepers"));
    sleeping.max_concurrent = Some(3);
    sleeping.tier = None;
    sleeping.provider_session_id = None;
    sleeping.last_heartbeat_at = None;
    sleeping.inactive_since = Some(at(7));
    sleeping.access = crate::access::Access::Owner;
    let mut public = record("public");
    public.kind = LlmKind::Public;
    public.access = crate::access::Access::Principals(vec!["team-ü".into(), "ci".into()]);
    public.tier = Some("fast".into());
    public.provider_type = "anthropic".into();
    public.model = "claude-ünïcode-名前".into();
    let mut bound = record("bound");
    bound.provider_session_id = Some(SessionId::generate());
    bound.binding = Some(ChannelBinding {
        replica: ReplicaId::parse("gw-7").expect("valid"),
        epoch: u64::MAX - 1,
    });
    let written = store
        .write(vec![
            Write::Insert(sleeping.clone()),
            Write::Insert(public.clone()),
            Write::Insert(bound.clone()),
        ])
        .await
        .expect("insert");
    for (want, got) in [sleeping, public, bound].into_iter().zip(written) {
        let stored = store.get(&want.name).await.expect("get").expect("present");
        assert_eq!(stored, got);
        assert_eq!(
            LlmRecordFields::of(&stored),
            LlmRecordFields::of(&want),
            "{} changed in the store",
            want.name
        );
    }
}

/// An agent's row round-trips with its whole persona (unicode, a long system prompt,
/// nested default parameters), through an update that turns an LLM's row into an
/// agent's and one that turns it back; its session and lifecycle indexes are an LLM
/// row's.
pub async fn agent_rows_round_trip(store: &dyn Store) {
    let session = SessionId::generate();
    let mut agent = record("helper");
    agent.provider_type = crate::agent::AGENT_TYPE.into();
    agent.model = "llama".into();
    agent.provider_session_id = Some(session.clone());
    agent.agent = Some(crate::agent::Persona {
        llm: name("llama"),
        description: Some("Answers briefly — ünïcode 名前".into()),
        system_prompt: Some(format!("You are terse.\n{}", "x".repeat(10_000))),
        default_params: serde_json::json!({
            "temperature": 0.25,
            "max_tokens": 64,
            "stop": ["\n\n"],
            "response_format": {"type": "json_object"},
        })
        .as_object()
        .cloned(),
    });
    let bare = {
        let mut a = record("bare");
        a.agent = Some(crate::agent::Persona {
            llm: name("llama"),
            description: None,
            system_prompt: None,
            default_params: None,
        });
        a
    };
    let llm = record("was-an-llm");
    let written = store
        .write(vec![
            Write::Insert(agent.clone()),
            Write::Insert(bare.clone()),
            Write::Insert(llm.clone()),
        ])
        .await
        .expect("insert");
    for (want, got) in [&agent, &bare].into_iter().zip(&written) {
        let stored = store.get(&want.name).await.expect("get").expect("present");
        assert_eq!(&stored, got);
        assert_eq!(
            LlmRecordFields::of(&stored),
            LlmRecordFields::of(want),
            "agent {} changed in the store",
            want.name
        );
    }
    assert_eq!(
        names(store.by_session(&session).await.expect("by_session")),
        ["helper"],
        "an agent's row is bound to its session like an LLM's"
    );
    // An LLM's row becomes an agent's, and back.
    let mut turned = written[2].clone();
    turned.agent.clone_from(&bare.agent);
    let turned = store
        .write(vec![Write::Update(turned)])
        .await
        .expect("update")
        .remove(0);
    let stored = store.get(&llm.name).await.expect("get").expect("present");
    assert_eq!(stored.agent, bare.agent, "an update writes the persona");
    let mut back = turned.clone();
    back.agent = None;
    store
        .write(vec![Write::Update(back)])
        .await
        .expect("update");
    let stored = store.get(&llm.name).await.expect("get").expect("present");
    assert_eq!(stored.agent, None, "an update clears the persona");
    assert_eq!(
        names(store.list().await.expect("list")),
        ["bare", "helper", "was-an-llm"]
    );
}

/// The fields of a row other than its revision, for comparisons.
#[derive(Debug, PartialEq)]
struct LlmRecordFields(crate::LlmRecord);

impl LlmRecordFields {
    fn of(r: &crate::LlmRecord) -> Self {
        let mut r = r.clone();
        r.revision = 0;
        LlmRecordFields(r)
    }
}

/// Concurrent inserts of one name: exactly one wins, the others conflict.
pub async fn concurrent_inserts_one_winner(store: &dyn Store) {
    let attempts = (0..8).map(|i| {
        let mut r = record("contested");
        r.owner = format!("owner-{i}");
        store.write(vec![Write::Insert(r)])
    });
    let results = join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one insert wins: {results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::Conflict { .. }))
    );
    let winner = results
        .iter()
        .find_map(|r| r.as_ref().ok())
        .expect("a winner")[0]
        .owner
        .clone();
    assert_eq!(
        store
            .get(&name("contested"))
            .await
            .expect("get")
            .expect("row")
            .owner,
        winner
    );
}

/// Concurrent updates from one revision: exactly one wins.
pub async fn concurrent_updates_one_winner(store: &dyn Store) {
    let base = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .expect("insert")
        .remove(0);
    let attempts = (0..8).map(|i| {
        let mut r = base.clone();
        r.model = format!("m{i}");
        store.write(vec![Write::Update(r)])
    });
    let results = join_all(attempts).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one update wins: {results:?}"
    );
    assert_eq!(
        store
            .get(&base.name)
            .await
            .expect("get")
            .expect("row")
            .revision,
        2
    );
}

/// `flush` succeeds and loses nothing, touches included.
pub async fn flush_keeps_everything(store: &dyn Store) {
    let r = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .expect("insert")
        .remove(0);
    store
        .touch(std::slice::from_ref(&r.name), at(99))
        .await
        .expect("touch");
    store.flush().await.expect("flush");
    let got = store.get(&r.name).await.expect("get").expect("row");
    assert_eq!(got.last_heartbeat_at, Some(at(99)));
    assert_eq!(got.revision, r.revision);
}

/// A write that read a row which was deleted and re-inserted since (same name, and
/// the same revision, as revisions start at 1 again) conflicts: it is not that row.
pub async fn a_reinserted_row_is_not_the_row_a_stale_write_read(store: &dyn Store) {
    let old = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .expect("insert")
        .remove(0);
    let delete = Write::Delete {
        name: old.name.clone(),
        id: old.id.clone(),
        revision: old.revision,
    };
    store.write(vec![delete.clone()]).await.expect("delete");
    let new = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .expect("re-insert")
        .remove(0);
    assert_eq!(
        new.revision, old.revision,
        "the re-inserted row starts again at the same revision"
    );
    let mut stale = old.clone();
    stale.owner = "stale-writer".into();
    let err = store
        .write(vec![Write::Update(stale)])
        .await
        .expect_err("stale update");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "expected Conflict, got {err:?}"
    );
    let err = store.write(vec![delete]).await.expect_err("stale delete");
    assert!(
        matches!(err, StoreError::Conflict { .. }),
        "expected Conflict, got {err:?}"
    );
    assert_eq!(
        store.get(&old.name).await.expect("get"),
        Some(new),
        "the new row is untouched"
    );
}

/// A write stores the row as given, heartbeat included, even after a touch.
pub async fn a_write_replaces_a_touched_heartbeat(store: &dyn Store) {
    let mut r = record("row");
    r.last_heartbeat_at = Some(at(5));
    let r = store
        .write(vec![Write::Insert(r)])
        .await
        .expect("insert")
        .remove(0);
    store
        .touch(std::slice::from_ref(&r.name), at(50))
        .await
        .expect("touch");
    let mut update = r.clone();
    update.last_heartbeat_at = Some(at(7));
    store
        .write(vec![Write::Update(update)])
        .await
        .expect("update");
    assert_eq!(
        store
            .get(&r.name)
            .await
            .expect("get")
            .expect("row")
            .last_heartbeat_at,
        Some(at(7))
    );
    assert_eq!(
        names(store.stale_virtuals(at(8)).await.expect("stale")),
        ["row"],
        "the index follows the written heartbeat"
    );
}

/// A heartbeat belongs to the row it was given to, not to a later row of the same name.
pub async fn a_heartbeat_does_not_carry_over_to_a_reinserted_row(store: &dyn Store) {
    let r = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .expect("insert")
        .remove(0);
    store
        .touch(std::slice::from_ref(&r.name), at(50))
        .await
        .expect("touch");
    store
        .write(vec![Write::Delete {
            name: r.name.clone(),
            id: r.id.clone(),
            revision: r.revision,
        }])
        .await
        .expect("delete");
    let mut again = record("row");
    again.last_heartbeat_at = Some(at(2));
    store
        .write(vec![Write::Insert(again)])
        .await
        .expect("re-insert");
    assert_eq!(
        store
            .get(&r.name)
            .await
            .expect("get")
            .expect("row")
            .last_heartbeat_at,
        Some(at(2))
    );
    assert_eq!(
        names(store.stale_virtuals(at(3)).await.expect("stale")),
        ["row"]
    );
}

/// A store with a change feed reports, after each committed batch, every row it
/// inserted, updated or deleted (with the pool key after the write, none for a
/// delete), to every subscriber; a failed batch and a heartbeat report nothing. A store
/// without a feed (`changes()` is `None`) passes as it is.
pub async fn the_change_feed_reports_committed_writes(store: &dyn Store) {
    let Some(mut feed) = store.changes() else {
        return;
    };
    let mut other = store
        .changes()
        .expect("a feed has room for every subscriber");
    let change = |n: &str, pool: Option<&str>| crate::RowChange {
        name: name(n),
        pool: pool.map(name),
    };
    let mut a = record("a");
    a.pool = Some(name("llama"));
    let written = store
        .write(vec![Write::Insert(a), Write::Insert(record("b"))])
        .await
        .expect("insert");
    let refused = store.write(vec![Write::Insert(record("b"))]).await;
    assert!(matches!(refused, Err(StoreError::Conflict { .. })));
    store
        .touch(&[name("a"), name("b")], at(10))
        .await
        .expect("touch");
    let mut moved = written[0].clone();
    moved.pool = None;
    store
        .write(vec![
            Write::Update(moved),
            Write::Delete {
                name: name("b"),
                id: written[1].id.clone(),
                revision: written[1].revision,
            },
        ])
        .await
        .expect("update and delete");
    let expected = [
        change("a", Some("llama")),
        change("b", Some("b")),
        change("a", Some("a")),
        change("b", None),
    ];
    for feed in [&mut feed, &mut other] {
        // A feed may deliver a moment after the write returned (a database's
        // notifications); the bound only keeps a broken feed from hanging the test.
        for want in &expected {
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), feed.recv())
                .await
                .expect("reported within 10 s");
            assert_eq!(
                got.as_ref(),
                Ok(want),
                "every change, in the order committed; no refused batch, no heartbeat"
            );
        }
        assert!(feed.try_recv().is_err(), "nothing else");
    }
}

/// The readiness of a store that needs nothing: always ready.
pub fn always() -> bool {
    true
}

/// Stamps out one `#[tokio::test]` per case of the Store conformance suite.
///
/// `$setup` is an async fn returning something that dereferences to a [`Store`]
/// (`Arc<MyStore>`, `Box<dyn Store>`, or a guard that also owns a temporary directory).
/// The calling crate needs `tokio` (with `macros` and `rt`) as a dev-dependency.
///
/// A store backed by a server the machine may lack passes `if = ready`, a `fn() ->
/// bool`: each case returns at once when it is false (the function says why, loudly).
///
/// ```ignore
/// async fn setup() -> std::sync::Arc<MyStore> { std::sync::Arc::new(MyStore::open_temp()) }
/// virtual_llm_core::store_conformance_tests!(setup);
/// // or, for a store on a server:
/// virtual_llm_core::store_conformance_tests!(setup, if = server_is_installed);
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($setup:path) => {
        $crate::store_conformance_tests!($setup, if = $crate::testkit::store_suite::always);
    };
    ($setup:path, if = $ready:path) => {
        $crate::store_conformance_tests!(@cases $setup, $ready;
            insert_then_get,
            insert_existing_conflicts,
            names_are_unique_ignoring_case,
            concurrent_lookalike_inserts_one_winner,
            update_checks_revision,
            delete_checks_revision,
            batch_is_atomic,
            batch_rejects_duplicate_names,
            write_returns_stored_rows,
            list_is_ordered_by_name,
            list_after_pages_in_name_order,
            by_session_follows_rows,
            bound_to_follows_bindings,
            by_pool_follows_pool_keys,
            the_change_feed_reports_committed_writes,
            leases_start_expire_and_end_once,
            stale_virtuals_uses_heartbeat_cutoff,
            expired_inactives_uses_inactive_since,
            lifecycle_indexes_follow_status_changes,
            touch_sets_liveness_without_revision,
            all_fields_round_trip,
            agent_rows_round_trip,
            concurrent_inserts_one_winner,
            concurrent_updates_one_winner,
            flush_keeps_everything,
            a_reinserted_row_is_not_the_row_a_stale_write_read,
            a_write_replaces_a_touched_heartbeat,
            a_heartbeat_does_not_carry_over_to_a_reinserted_row,
        );
    };
    (@cases $setup:path, $ready:path; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if !$ready() {
                    return;
                }
                let store = $setup().await;
                $crate::testkit::store_suite::$case(&*store).await;
            }
        )*
    };
}
