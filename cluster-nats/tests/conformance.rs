//! The core's conformance suites on the NATS plane: the channel directory suite on two
//! directories of replicas linked through a real `nats-server`, and the replica plane
//! suite on two gateways over one store, the publisher bound to the first and the
//! clients on the second (as `MemoryCluster` runs them in the core). Skipped, loudly,
//! where `nats-server` is not installed.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{gateways, nats_installed, two_planes};
use virtual_llm_core::{ChannelDirectory, Gateway};

mod directory {
    use super::*;

    async fn pair() -> (Arc<dyn ChannelDirectory>, Arc<dyn ChannelDirectory>) {
        let (a, b) = two_planes().await;
        (a.directory(), b.directory())
    }

    virtual_llm_core::cluster_directory_conformance_tests!(pair, if = nats_installed);
}

async fn two_replicas() -> (Gateway, Gateway) {
    gateways(&two_planes().await).await
}

virtual_llm_core::plane_conformance_tests!(two_replicas, if = nats_installed);
