//! Pools, capacity, failover and the admission queue (SPEC §10 and §11): the admission
//! conformance suite run on `LocalAdmission`, a property test of the in-flight counts
//! through a real gateway, and the pool rules as clients and publishers see them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;

use virtual_llm_core::{Admission, Config, LocalAdmission};

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
        pool: row.pool_key().clone(),
        rows: vec![row.clone()],
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
