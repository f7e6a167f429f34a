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
