//! The core's Store conformance suite on a file-backed `RedbStore`, directly and
//! through `Arc<dyn Store>` (the forwarding impl must keep every guarantee).

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::ops::Deref;
use std::sync::Arc;

use common::TempStore;
use tempfile::TempDir;
use virtual_llm_core::Store;
use virtual_llm_redb::RedbStore;

mod direct {
    use super::*;

    async fn setup() -> TempStore {
        TempStore::new().await
    }

    virtual_llm_core::store_conformance_tests!(setup);
}

mod through_arc_dyn {
    use super::*;

    /// The store under test is the `Arc<dyn Store>`; the guard keeps its directory.
    struct DynStore {
        store: Arc<dyn Store>,
        _dir: TempDir,
    }

    impl Deref for DynStore {
        type Target = Arc<dyn Store>;
        fn deref(&self) -> &Arc<dyn Store> {
            &self.store
        }
    }

    async fn setup() -> DynStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(dir.path().join("registry.redb"))
            .await
            .expect("open");
        DynStore {
            store: Arc::new(store),
            _dir: dir,
        }
    }

    virtual_llm_core::store_conformance_tests!(setup);
}
