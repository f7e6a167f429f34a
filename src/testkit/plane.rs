//! [`Plane`]: how the transport conformance suite links two gateway replicas, so the
//! same cases run with the publisher on one replica and the clients on the other.
//! The core's [`MemoryCluster`] is one; a network plane (NATS…) implements the same
//! trait to run the suite.

use async_trait::async_trait;

use crate::testkit::MemoryCluster;
use crate::{Error, Gateway, GatewayBuilder, ReplicaId};

/// A replica plane: starts gateways as replicas linked by a channel directory and a
/// task router.
#[async_trait]
pub trait Plane: Send + Sync {
    /// Starts a gateway from `builder` (store, config, authenticator already set) as
    /// replica `replica` of this plane.
    async fn join(&self, builder: GatewayBuilder, replica: ReplicaId) -> Result<Gateway, Error>;
}

#[async_trait]
impl Plane for MemoryCluster {
    async fn join(&self, builder: GatewayBuilder, replica: ReplicaId) -> Result<Gateway, Error> {
        MemoryCluster::join(self, builder, replica).await
    }
}
