//! [`MemoryCluster`]: gateway replicas in one process, linked by an in-memory channel
//! directory and task router: the two seams a replica plane fills (NATS in
//! production), filled without a network, so tests can prove that everything the
//! gateway does across replicas goes through them.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use virtual_llm_core::{Gateway, MemoryStore, ReplicaId, Store};
//! use virtual_llm_core::testkit::MemoryCluster;
//!
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let cluster = MemoryCluster::new();
//! let a = cluster.join(Gateway::builder(store.clone()), ReplicaId::parse("a").unwrap()).await.unwrap();
//! let b = cluster.join(Gateway::builder(store), ReplicaId::parse("b").unwrap()).await.unwrap();
//! assert_ne!(a.replica(), b.replica());
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::channel::{ChannelSink, SendError};
use crate::directory::{BindToken, ChannelDirectory, tell_closing};
use crate::protocol::GatewayFrame;
use crate::sync::lock;
use crate::task_router::{Delivery, TaskInbound, TaskRouter};
use crate::{ChannelBinding, Error, Gateway, GatewayBuilder, LlmName, ReplicaId, SessionId};

struct Bound {
    binding: ChannelBinding,
    sink: Arc<dyn ChannelSink>,
}

#[derive(Default)]
struct Plane {
    /// Every session's channel, whichever replica holds it.
    channels: Mutex<HashMap<SessionId, Bound>>,
    /// Each replica's receiving end, by id.
    replicas: Mutex<HashMap<ReplicaId, TaskInbound>>,
    next_epoch: AtomicU64,
    /// Hops of results between replicas ([`TaskRouter::deliver`] calls).
    deliveries: AtomicU64,
}

/// Gateway replicas in one process over one store, linked in memory. Clones share the
/// cluster.
#[derive(Clone, Default)]
pub struct MemoryCluster {
    plane: Arc<Plane>,
}

impl fmt::Debug for MemoryCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCluster")
            .field("channels", &lock(&self.plane.channels).len())
            .field("replicas", &lock(&self.plane.replicas).len())
            .finish()
    }
}

impl MemoryCluster {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times a replica handed results to another (one hop each, whatever
    /// the number of results it carried).
    pub fn deliveries(&self) -> u64 {
        self.plane.deliveries.load(Ordering::Relaxed)
    }

    /// The channel directory replica `replica` binds through.
    pub fn directory(&self, replica: ReplicaId) -> Arc<dyn ChannelDirectory> {
        Arc::new(MemoryDirectory {
            replica,
            plane: self.plane.clone(),
        })
    }

    /// The task router replica `replica` forwards through.
    pub fn task_router(&self, replica: ReplicaId) -> Arc<dyn TaskRouter> {
        Arc::new(MemoryTaskRouter {
            replica,
            plane: self.plane.clone(),
        })
    }

    /// Starts a gateway from `builder` as replica `replica` of this cluster: its
    /// directory and task router are the cluster's, and the cluster delivers to it.
    pub async fn join(
        &self,
        builder: GatewayBuilder,
        replica: ReplicaId,
    ) -> Result<Gateway, Error> {
        let gateway = builder
            .replica(replica.clone())
            .directory(self.directory(replica.clone()))
            .task_router(self.task_router(replica.clone()))
            .start()
            .await?;
        lock(&self.plane.replicas).insert(replica, gateway.inbound());
        Ok(gateway)
    }

    /// Takes `replica` out of the cluster, as if its process died: results for its
    /// tasks no longer reach it, and it hears of no channel loss.
    pub fn leave(&self, replica: &ReplicaId) {
        lock(&self.plane.replicas).remove(replica);
    }
}

/// One replica's view of the cluster's channel table.
struct MemoryDirectory {
    replica: ReplicaId,
    plane: Arc<Plane>,
}

impl fmt::Debug for MemoryDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDirectory")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl ChannelDirectory for MemoryDirectory {
    fn replica(&self) -> &ReplicaId {
        &self.replica
    }

    fn bind(&self, session: &SessionId, sink: Arc<dyn ChannelSink>) -> BindToken {
        let binding = ChannelBinding {
            replica: self.replica.clone(),
            epoch: self.plane.next_epoch.fetch_add(1, Ordering::Relaxed) + 1,
        };
        // The replica of a replaced channel tells no other: their tasks sent through
        // it wait for their publisher (held before the new channel can be given any).
        let replaced = lock(&self.plane.channels)
            .get(session)
            .map(|b| b.binding.replica.clone());
        if let Some(holder) = replaced {
            let others: Vec<TaskInbound> = lock(&self.plane.replicas)
                .iter()
                .filter(|(id, _)| **id != holder)
                .map(|(_, inbound)| inbound.clone())
                .collect();
            for inbound in others {
                inbound.channel_lost(session);
            }
        }
        let older = lock(&self.plane.channels).insert(
            session.clone(),
            Bound {
                binding: binding.clone(),
                sink,
            },
        );
        if let Some(older) = older {
            tell_closing(&*older.sink, "replaced by a newer channel");
        }
        BindToken {
            session: session.clone(),
            binding,
        }
    }

    fn release(&self, token: &BindToken) -> bool {
        let mut channels = lock(&self.plane.channels);
        match channels.get(&token.session) {
            Some(b) if b.binding == token.binding => {
                channels.remove(&token.session);
                true
            }
            _ => false,
        }
    }

    fn is_current(&self, token: &BindToken) -> bool {
        self.current(&token.session).as_ref() == Some(&token.binding)
    }

    fn current(&self, session: &SessionId) -> Option<ChannelBinding> {
        lock(&self.plane.channels)
            .get(session)
            .map(|b| b.binding.clone())
    }

    fn send(&self, session: &SessionId, frame: GatewayFrame) -> Result<(), SendError> {
        let sink = lock(&self.plane.channels)
            .get(session)
            .map(|b| b.sink.clone())
            .ok_or(SendError::Closed)?;
        sink.send(frame)
    }

    fn local_channels(&self) -> usize {
        lock(&self.plane.channels)
            .values()
            .filter(|b| b.binding.replica == self.replica)
            .count()
    }

    fn close_local(&self, reason: &str) -> usize {
        let sinks: Vec<_> = lock(&self.plane.channels)
            .values()
            .filter(|b| b.binding.replica == self.replica)
            .map(|b| b.sink.clone())
            .collect();
        for sink in &sinks {
            tell_closing(&**sink, reason);
        }
        sinks.len()
    }
}

/// One replica's way to the others' tasks.
struct MemoryTaskRouter {
    replica: ReplicaId,
    plane: Arc<Plane>,
}

impl MemoryTaskRouter {
    /// The inbound sides of every other replica.
    fn others(&self) -> Vec<TaskInbound> {
        lock(&self.plane.replicas)
            .iter()
            .filter(|(id, _)| **id != self.replica)
            .map(|(_, inbound)| inbound.clone())
            .collect()
    }
}

impl fmt::Debug for MemoryTaskRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTaskRouter")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TaskRouter for MemoryTaskRouter {
    async fn deliver(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error> {
        self.plane.deliveries.fetch_add(1, Ordering::Relaxed);
        let inbound = lock(&self.plane.replicas).get(replica).cloned();
        match inbound {
            Some(inbound) => inbound.deliver(delivery).await,
            None => Err(Error::UnknownTask),
        }
    }

    async fn session_closed(&self, session: &SessionId) {
        for inbound in self.others() {
            inbound.session_closed(session);
        }
    }

    async fn session_held(&self, session: &SessionId) {
        for inbound in self.others() {
            inbound.channel_lost(session);
        }
    }

    async fn wake_failed(&self, llm: &LlmName, pool: &LlmName, message: &str) {
        for inbound in self.others() {
            inbound.wake_failed(llm, pool, message);
        }
    }
}
