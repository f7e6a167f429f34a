//! The Store conformance suite on `MemoryStore`, directly and through `Arc<dyn Store>`
//! and `Box<dyn Store>` (the forwarding impls must keep every guarantee), and through
//! the test kit's `FailingStore` with its switches off (a fault injector that breaks
//! the contract when it is not injecting would make every fault test meaningless).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use virtual_llm_core::{MemoryStore, Store};

mod direct {
    use super::*;

    async fn setup() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new())
    }

    virtual_llm_core::store_conformance_tests!(setup);
}

mod through_arc_dyn {
    use super::*;

    // The store under test is the `Arc<dyn Store>` itself, via its forwarding impl.
    async fn setup() -> Box<Arc<dyn Store>> {
        Box::new(Arc::new(MemoryStore::new()) as Arc<dyn Store>)
    }

    virtual_llm_core::store_conformance_tests!(setup);
}

mod through_box_dyn {
    use super::*;

    async fn setup() -> Box<Box<dyn Store>> {
        Box::new(Box::new(MemoryStore::new()) as Box<dyn Store>)
    }

    virtual_llm_core::store_conformance_tests!(setup);
}

mod through_failing_store_switched_off {
    use super::*;
    use virtual_llm_core::testkit::FailingStore;

    async fn setup() -> Arc<FailingStore> {
        Arc::new(FailingStore::new(Arc::new(MemoryStore::new())))
    }

    virtual_llm_core::store_conformance_tests!(setup);
}
