//! The router conformance suite: one function per rule of the [`Router`] contract.
//!
//! Each function takes the router under test and a [`RegistryView`] over an empty
//! store it may read (one that keeps nothing, so the store's writes are seen at once);
//! run them all with [`router_conformance_tests!`](crate::router_conformance_tests).

use crate::testkit::record;
use crate::{LlmKind, LlmName, LlmStatus, Principal, RegistryView, Role, Router, Write};

fn client() -> Principal {
    Principal::new("carol", [Role::Client])
}

/// A model that is a row's name has candidates, and the row is among them as stored;
/// public and inactive rows are candidates too (the gateway decides what they answer).
pub async fn a_named_row_is_a_candidate(router: &dyn Router, view: &RegistryView) {
    let mut public = record("public-model");
    public.kind = LlmKind::Public;
    let mut gone = record("gone-model");
    gone.status = LlmStatus::Inactive;
    view.store()
        .write(vec![
            Write::Insert(record("llama")),
            Write::Insert(public),
            Write::Insert(gone),
        ])
        .await
        .expect("insert");
    for name in ["llama", "public-model", "gone-model"] {
        let rows = router
            .route(view, &client(), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .rows;
        assert!(!rows.is_empty(), "{name}: at least one candidate");
        let stored = view
            .store()
            .get(&rows[0].name)
            .await
            .expect("read")
            .expect("a candidate is a stored row");
        assert_eq!(rows[0], stored, "{name}: the row as stored");
    }
}

/// A model nothing answers to is 404 `model_not_found`; one that breaks the name rules
/// is 400; neither is ever an empty list.
pub async fn unknown_and_invalid_models_are_refused(router: &dyn Router, view: &RegistryView) {
    let unknown = router
        .route(view, &client(), "no-such-model")
        .await
        .expect_err("nothing answers to it");
    assert_eq!((unknown.status(), unknown.code()), (404, "model_not_found"));
    for bad in ["", "_private", "has space", &"x".repeat(300)] {
        let invalid = router
            .route(view, &client(), bad)
            .await
            .expect_err("invalid");
        assert_eq!(invalid.status(), 400, "{bad:?}: {invalid}");
    }
}

/// Routing reads the registry and never writes it: rows and revisions are unchanged.
pub async fn routing_writes_nothing(router: &dyn Router, view: &RegistryView) {
    view.store()
        .write(vec![Write::Insert(record("llama"))])
        .await
        .expect("insert");
    let before = view.store().list().await.expect("list");
    for _ in 0..3 {
        router
            .route(view, &client(), "llama")
            .await
            .expect("routed");
        let _ = router.route(view, &client(), "missing").await;
    }
    assert_eq!(view.store().list().await.expect("list"), before);
}

fn name(s: &str) -> LlmName {
    LlmName::parse(s).expect("test names are valid")
}

/// A pool key routes to every member of the pool, the row named like the pool
/// without a pool of its own included; a member's own name pins that member; every
/// row of a route has the route's pool as its pool key.
pub async fn a_pool_key_routes_its_members_and_a_name_pins_one(
    router: &dyn Router,
    view: &RegistryView,
) {
    for (n, pool) in [
        ("box-a", Some("llama")),
        ("box-b", Some("llama")),
        ("llama", None),
    ] {
        let mut r = record(n);
        r.pool = pool.map(name);
        view.store()
            .write(vec![Write::Insert(r)])
            .await
            .expect("insert");
    }
    let route = router
        .route(view, &client(), "llama")
        .await
        .expect("the pool routes");
    assert_eq!(route.pool, name("llama"));
    assert_eq!(route.pinned, None);
    let mut members: Vec<String> = route.rows.iter().map(|r| r.name.to_string()).collect();
    members.sort();
    assert_eq!(members, ["box-a", "box-b", "llama"]);
    let pinned = router
        .route(view, &client(), "box-b")
        .await
        .expect("a member routes by its name");
    assert_eq!(pinned.pool, name("llama"), "a pinned member keeps its pool");
    assert_eq!(pinned.pinned, Some(name("box-b")));
    assert!(
        pinned
            .rows
            .iter()
            .all(|r| r.name == name("box-b") || !pinned.admits(&r.name)),
        "a pinned route admits only the pinned member"
    );
    assert!(pinned.admits(&name("box-b")));
    for route in [route, pinned] {
        assert!(route.rows.iter().all(|r| *r.pool_key() == route.pool));
    }
}

/// A model naming an agent routes to the agent's LLM (a pool key, or a member it
/// pins), with the agent and its persona on the route; an agent's row is never a row
/// of any route.
pub async fn an_agent_routes_to_its_llm_with_its_persona(router: &dyn Router, view: &RegistryView) {
    let persona = |llm: &str| crate::agent::Persona {
        llm: name(llm),
        description: None,
        system_prompt: Some(format!("over {llm}")),
        default_params: None,
    };
    let mut rows = Vec::new();
    for (n, pool) in [("box-a", Some("llama")), ("box-b", Some("llama"))] {
        let mut r = record(n);
        r.pool = pool.map(name);
        rows.push(r);
    }
    for (n, llm) in [("poet", "llama"), ("pinned-poet", "box-b")] {
        let mut r = record(n);
        r.agent = Some(persona(llm));
        rows.push(r);
    }
    view.store()
        .write(rows.into_iter().map(Write::Insert).collect())
        .await
        .expect("insert");
    let route = router
        .route(view, &client(), "poet")
        .await
        .expect("an agent routes");
    assert_eq!(route.pool, name("llama"), "its llm's pool");
    assert_eq!(route.pinned, None);
    let agent = route.agent.as_ref().expect("the agent is on the route");
    assert_eq!(agent.name, name("poet"));
    assert_eq!(agent.status, LlmStatus::Active);
    assert_eq!(agent.persona, persona("llama"));
    let mut members: Vec<String> = route.rows.iter().map(|r| r.name.to_string()).collect();
    members.sort();
    assert_eq!(members, ["box-a", "box-b"], "the pool's llms, no agent");
    let pinned = router
        .route(view, &client(), "pinned-poet")
        .await
        .expect("an agent over a member routes");
    assert_eq!(pinned.pinned, Some(name("box-b")));
    assert_eq!(
        pinned.agent.as_ref().map(|a| a.persona.clone()),
        Some(persona("box-b"))
    );
    let plain = router
        .route(view, &client(), "llama")
        .await
        .expect("the pool routes");
    assert!(
        plain.agent.is_none(),
        "a request for an llm carries no agent"
    );
    assert!(plain.rows.iter().all(|r| r.agent.is_none()));
}

/// Stamps out one `#[tokio::test]` per case of the router suite. `$setup` is an async
/// fn returning `(router, store)`: something that dereferences to a
/// [`Router`](crate::Router) and an empty `Arc<dyn Store>` it reads.
#[macro_export]
macro_rules! router_conformance_tests {
    ($setup:path) => {
        $crate::router_conformance_tests!(@cases $setup;
            a_named_row_is_a_candidate,
            a_pool_key_routes_its_members_and_a_name_pins_one,
            unknown_and_invalid_models_are_refused,
            routing_writes_nothing,
            an_agent_routes_to_its_llm_with_its_persona,
        );
    };
    (@cases $setup:path; $($case:ident,)*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (router, store) = $setup().await;
                let view = $crate::RegistryView::new(store, ::std::time::Duration::ZERO);
                $crate::testkit::router_suite::$case(&*router, &view).await;
            }
        )*
    };
}
