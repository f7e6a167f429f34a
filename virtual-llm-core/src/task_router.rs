//! The task router: a publisher's result reaches its task wherever the task lives.
//!
//! A task lives on the replica whose client started it; its id says which (see
//! [`TaskId::replica`](crate::TaskId::replica)). A publisher posts its results to the
//! replica holding its channel, which may be another one. The core delivers to its own
//! tasks itself and hands a result for another replica's task to the [`TaskRouter`];
//! on the far side, the plane gives it to that replica's [`TaskInbound`]. The same goes
//! for a channel that closes: the replica that held it tells the others, whose tasks on
//! that session then fail.

use std::fmt;

use async_trait::async_trait;

use crate::channel::SendError;
use crate::protocol::TaskResult;
use crate::task::TaskTable;
use crate::{Error, ReplicaId, SessionId, TaskId};

/// A publisher's result for one task, with who posted it: checked again by the
/// replica holding the task (the session and principal must be the ones it was sent
/// to).
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The session that posted it.
    pub session: SessionId,
    /// The principal of that session.
    pub owner: String,
    /// The task.
    pub task: TaskId,
    /// The result.
    pub result: TaskResult,
}

/// How results and channel losses reach tasks on other replicas.
///
/// # Contract
/// - [`deliver`](TaskRouter::deliver) hands the delivery to the [`TaskInbound`] of
///   `replica` and answers what it answered: `Ok` once the task took the result (a
///   slow client slows this down: it is the backpressure of the stream), or its error
///   (404 unknown task, 409 finished, 400 a bad chunk). A replica that cannot be
///   reached answers [`Error::UnknownTask`]: its tasks are gone with it.
/// - [`session_closed`](TaskRouter::session_closed) makes every other replica's
///   [`TaskInbound::session_closed`] run for `session`, so no task waits on a channel
///   that no longer exists. It returns when they have been told.
/// - **Bounded in time.** Neither call waits on a peer without a bound: a replica
///   that does not answer within the plane's timeout is given up on (`deliver`
///   answers [`Error::UnknownTask`]; `session_closed` returns), so no publisher's
///   post and no unbind is held by a slow or dead peer.
///
/// The test kit's `plane_suite` (feature `testkit`) checks an
/// implementation against this contract.
#[async_trait]
pub trait TaskRouter: fmt::Debug + Send + Sync + 'static {
    /// Hands `delivery` to its task on `replica` (never this replica).
    async fn deliver(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error>;

    /// Tells every other replica that `session`'s channel closed.
    async fn session_closed(&self, session: &SessionId);
}

/// The task router of a gateway that is the only replica: there is nobody else to
/// deliver to or to tell.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalTaskRouter;

#[async_trait]
impl TaskRouter for LocalTaskRouter {
    async fn deliver(&self, _replica: &ReplicaId, _delivery: Delivery) -> Result<(), Error> {
        Err(Error::UnknownTask)
    }

    async fn session_closed(&self, _session: &SessionId) {}
}

/// The receiving end of a [`TaskRouter`] on one replica: what a plane (NATS, or the
/// test kit's in-memory cluster) calls when a peer forwards a result or a channel loss.
/// Get it from [`Gateway::inbound`](crate::Gateway::inbound). The peer has
/// authenticated the publisher; ownership is checked here again.
#[derive(Clone)]
pub struct TaskInbound {
    pub(crate) tasks: TaskTable,
}

impl fmt::Debug for TaskInbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskInbound").finish_non_exhaustive()
    }
}

impl TaskInbound {
    /// Hands a forwarded result to its task here, with the refusals of a local
    /// delivery.
    pub async fn deliver(&self, delivery: Delivery) -> Result<(), Error> {
        self.tasks
            .deliver(
                &delivery.session,
                &delivery.owner,
                &delivery.task,
                delivery.result,
            )
            .await
    }

    /// `session`'s channel closed on another replica: its tasks here fail with 503.
    /// Returns how many.
    pub fn session_closed(&self, session: &SessionId) -> usize {
        self.tasks.fail_session(session)
    }

    /// The replica holding `session`'s channel refused the frame of `task` (a plane
    /// sends frames in the background, so `start` had returned): the task fails with
    /// the 503 a refusal on this replica gives (`Full`: saturated; `Closed`: offline).
    /// Returns whether the task was still waiting.
    pub fn frame_refused(&self, session: &SessionId, task: &TaskId, error: SendError) -> bool {
        self.tasks.refused(session, task, error)
    }
}
