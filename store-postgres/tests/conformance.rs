//! The core's Store conformance suite on a `PgStore` (each case on a database of its
//! own), directly and through `Arc<dyn Store>` (the forwarding impl must keep every
//! guarantee). Skipped, loudly, where PostgreSQL is not installed.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TempStore, postgres_installed};

mod direct {
    use super::*;

    async fn setup() -> TempStore {
        TempStore::new().await
    }

    virtual_llm_core::store_conformance_tests!(setup, if = postgres_installed);
}

mod through_arc_dyn {
    use super::*;
    use std::sync::Arc;
    use virtual_llm_core::Store;

    async fn setup() -> Arc<dyn Store> {
        TempStore::new().await.store
    }

    virtual_llm_core::store_conformance_tests!(setup, if = postgres_installed);
}
