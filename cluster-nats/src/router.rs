//! [`NatsTaskRouter`]: the [`TaskRouter`] of a replica on the NATS plane.
//!
//! The results a publisher sent together for one task go to the replica holding it
//! as one NATS request on `P.r.{replica}.deliver` (cut into pieces past the server's
//! `max_payload`); that replica answers once the task took them, so the answer is
//! the stream's backpressure, and the chunks that came in while one request was on
//! its way make the next. "No responders" (the replica is gone) and no answer within the
//! deliver timeout answer [`Error::UnknownTask`]. A task's last results that the
//! sender has no use for the answer of go as a plain message instead, to replicas that
//! take them so (see [`crate::wire`]). A channel loss is announced to
//! every replica, after the release of its bind; so is a wake that failed.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use virtual_llm_core::{Delivery, Error, LlmName, ReplicaId, SessionId, TaskRouter};

use crate::plane::Shared;
use crate::wire::Announcement;

/// The task router of one replica on the NATS plane; from
/// [`NatsPlane::task_router`](crate::NatsPlane::task_router).
pub(crate) struct NatsTaskRouter {
    shared: Arc<Shared>,
}

impl NatsTaskRouter {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        NatsTaskRouter { shared }
    }
}

impl fmt::Debug for NatsTaskRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTaskRouter")
            .field("replica", &self.shared.replica)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TaskRouter for NatsTaskRouter {
    async fn deliver(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error> {
        self.shared.deliver(replica, delivery).await
    }

    async fn deliver_last(&self, replica: &ReplicaId, delivery: Delivery) {
        self.shared.deliver_last(replica, delivery).await;
    }

    async fn deliver_final(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error> {
        self.shared.deliver_final(replica, delivery).await
    }

    async fn session_closed(&self, session: &SessionId) {
        self.shared.announce(Announcement::Closed {
            from: self.shared.replica.clone(),
            session: session.clone(),
        });
        self.shared.settle().await;
    }

    async fn wake_failed(&self, llm: &LlmName, pool: &LlmName, message: &str) {
        self.shared.announce(Announcement::WakeFailed {
            from: self.shared.replica.clone(),
            llm: llm.clone(),
            pool: pool.clone(),
            message: message.to_owned(),
        });
    }

    async fn session_held(&self, session: &SessionId) {
        self.shared.announce(Announcement::Resuming {
            from: self.shared.replica.clone(),
            session: session.clone(),
        });
        self.shared.settle().await;
    }
}
