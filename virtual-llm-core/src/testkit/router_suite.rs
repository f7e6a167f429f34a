//! The router conformance suite: one function per rule of the [`Router`] contract.
//!
//! Each function takes the router under test and an empty store it may read; run them
//! all with [`router_conformance_tests!`](crate::router_conformance_tests).

use crate::testkit::record;
use crate::{LlmKind, LlmStatus, Principal, Role, Router, Store, Write};

fn client() -> Principal {
    Principal::new("carol", [Role::Client])
}

/// A model that is a row's name has candidates, and the row is among them as stored;
/// public and inactive rows are candidates too (the gateway decides what they answer).
pub async fn a_named_row_is_a_candidate(router: &dyn Router, store: &dyn Store) {
    let mut public = record("public-model");
    public.kind = LlmKind::Public;
    let mut gone = record("gone-model");
    gone.status = LlmStatus::Inactive;
    store
        .write(vec![
            Write::Insert(record("llama")),
            Write::Insert(public),
            Write::Insert(gone),
        ])
        .await
        .expect("insert");
    for name in ["llama", "public-model", "gone-model"] {
        let rows = router
            .candidates(store, &client(), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!rows.is_empty(), "{name}: at least one candidate");
        let stored = store
            .get(&rows[0].name)
            .await
            .expect("read")
            .expect("a candidate is a stored row");
        assert_eq!(rows[0], stored, "{name}: the row as stored");
    }
}

/// A model nothing answers to is 404 `model_not_found`; one that breaks the name rules
/// is 400; neither is ever an empty list.
pub async fn unknown_and_invalid_models_are_refused(router: &dyn Router, store: &dyn Store) {
    let unknown = router
        .candidates(store, &client(), "no-such-model")
        .await
        .expect_err("nothing answers to it");
    assert_eq!((unknown.status(), unknown.code()), (404, "model_not_found"));
    for bad in ["", "_private", "has space", &"x".repeat(300)] {
        let invalid = router
            .candidates(store, &client(), bad)
            .await
            .expect_err("invalid");
        assert_eq!(invalid.status(), 400, "{bad:?}: {invalid}");
    }
}

/// Routing reads the registry and never writes it: rows and revisions are unchanged.
pub async fn routing_writes_nothing(router: &dyn Router, store: &dyn Store) {
    store
        .write(vec![Write::Insert(record("llama"))])
        .await
        .expect("insert");
    let before = store.list().await.expect("list");
    for _ in 0..3 {
        router
            .candidates(store, &client(), "llama")
            .await
            .expect("routed");
        let _ = router.candidates(store, &client(), "missing").await;
    }
    assert_eq!(store.list().await.expect("list"), before);
}

/// Stamps out one `#[tokio::test]` per case of the router suite. `$setup` is an async
/// fn returning `(router, store)`: something that dereferences to a
/// [`Router`](crate::Router) and an empty store it reads.
#[macro_export]
macro_rules! router_conformance_tests {
    ($setup:path) => {
        $crate::router_conformance_tests!(@cases $setup;
            a_named_row_is_a_candidate,
            unknown_and_invalid_models_are_refused,
            routing_writes_nothing,
        );
    };
    (@cases $setup:path; $($case:ident,)*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (router, store) = $setup().await;
                $crate::testkit::router_suite::$case(&*router, &*store).await;
            }
        )*
    };
}
