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
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::admission::{LoadChanges, RowLoad, Slot};
use crate::channel::SendError;
use crate::gateway::Shared;
use crate::protocol::TaskResult;
use crate::task::TaskTable;
use crate::{Error, LlmName, ReplicaId, SessionId, TaskId, UnavailableKind};

/// Most results a transport hands over in one [`Gateway::deliver_all`](crate::Gateway::deliver_all)
/// (and so in one hop to another replica): what came in together, up to this. The
/// results of one frame or line (a run of chunks) are never split, so a delivery may
/// hold up to [`MAX_RUN_CHUNKS`](crate::protocol::MAX_RUN_CHUNKS) − 1 more.
pub const RESULTS_PER_DELIVERY: usize = 64;

/// A publisher's results for one task, with who posted them: checked again by the
/// replica holding the task (the session and principal must be the ones it was sent
/// to). The results the publisher had sent together cross together, in order: a
/// stream's chunks cost one hop per batch, not one per chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The session that posted it.
    pub session: SessionId,
    /// The principal of that session.
    pub owner: String,
    /// The task.
    pub task: TaskId,
    /// The results, in the order the publisher sent them (at least one).
    pub results: Vec<TaskResult>,
}

/// How results and channel losses reach tasks on other replicas.
///
/// # Contract
/// - [`deliver`](TaskRouter::deliver) hands the delivery to the [`TaskInbound`] of
///   `replica` in one hop and answers what it answered: `Ok` once the task took every
///   result of it (a slow client slows this down: it is the backpressure of the
///   stream), or the first refusal (404 unknown task, 409 finished, 400 a bad chunk). A replica that cannot be
///   reached answers [`Error::UnknownTask`]: its tasks are gone with it.
/// - [`session_closed`](TaskRouter::session_closed) makes every other replica's
///   [`TaskInbound::session_closed`] run for `session`, so no task waits on a channel
///   that no longer exists. It returns when they have been told.
/// - [`session_held`](TaskRouter::session_held) makes every other replica's
///   [`TaskInbound::channel_lost`] run for `session` (its channel closed, and it
///   resumes): their tasks on it wait the resume window for the publisher's `resume`
///   or a result, wherever it binds again, then fail. It returns when they have been
///   told.
/// - **Bounded in time.** No call waits on a peer without a bound: a replica that
///   does not answer within the plane's timeout is given up on (`deliver` answers
///   [`Error::UnknownTask`]; `session_closed` and `session_held` return), so no
///   publisher's post and no unbind is held by a slow or dead peer.
///
/// The test kit's `plane_suite` (feature `testkit`) checks an implementation against
/// this contract, except `session_held`, whose effect shows only when a resume window
/// ends: the core's `tests/replicas.rs` (paused time) and the NATS plane's own tests
/// (a short window) check that.
#[async_trait]
pub trait TaskRouter: fmt::Debug + Send + Sync + 'static {
    /// Hands `delivery` to its task on `replica` (never this replica).
    async fn deliver(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error>;

    /// Hands `delivery`, whose last result is its task's final one, to its task on
    /// `replica` for a caller that has no use for the answer (a publisher over a
    /// socket is told nothing of a refused result): a plane may return once the
    /// delivery is on its way, without waiting for `replica` to answer it, saving a
    /// message on every relayed request. What `replica` does with it is what
    /// [`deliver`](TaskRouter::deliver) would do; only the answer is not waited for.
    /// Bounded in time like `deliver`. By default, `deliver` with its answer dropped.
    async fn deliver_last(&self, replica: &ReplicaId, delivery: Delivery) {
        let task = delivery.task.clone();
        if let Err(e) = self.deliver(replica, delivery).await {
            tracing::debug!(%task, error = %e, "a task's last results were refused");
        }
    }

    /// Hands `delivery`, one task's final answer alone (a single
    /// [`Completed`](TaskResult::Completed) or [`Failed`](TaskResult::Failed)), to its
    /// task on `replica`, and answers as [`deliver`](TaskRouter::deliver) does, with
    /// one freedom: a plane that carried the task's frame to `delivery.session`'s
    /// channel here, for `delivery.owner`, and has had no final result for it yet,
    /// may answer `Ok` once the delivery is on its way, without waiting for `replica`.
    /// Every refusal but one is then known here: the task was sent to this session
    /// and principal (else 404), it is not finished (else 409), and a whole answer is
    /// never a bad chunk (400). The one left to `replica` is a task that ended there
    /// while the answer crossed (its client left, its deadline passed), which a
    /// publisher whose answer had come a moment earlier would not have heard of
    /// either: the task's cancel still reaches it. This saves the answer's message on
    /// every relayed request of a publisher that is answered over HTTP. Bounded in
    /// time like `deliver`. By default, `deliver`.
    async fn deliver_final(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error> {
        self.deliver(replica, delivery).await
    }

    /// Tells every other replica that `session`'s channel closed.
    async fn session_closed(&self, session: &SessionId);

    /// Tells every other replica that `session`'s channel closed and that the session
    /// resumes (SPEC §15): their tasks on it are held for the resume window.
    async fn session_held(&self, session: &SessionId);

    /// Tells every other replica that the wake of the row `llm` (of the pool `pool`)
    /// failed with `message`, as its publisher reported here: their
    /// [`TaskInbound::wake_failed`] runs, so their requests waiting for it fail with
    /// 503 `wake_failed` and their cooldown of its wakes starts (SPEC §12, §14).
    /// Returns once they are told, or it is given up on, within the plane's timeout.
    async fn wake_failed(&self, llm: &LlmName, pool: &LlmName, message: &str);
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

    async fn session_held(&self, _session: &SessionId) {}

    async fn wake_failed(&self, _llm: &LlmName, _pool: &LlmName, _message: &str) {}
}

/// A task another replica sent to a channel held here, counted on its row: what
/// [`TaskInbound::hold`] gives the plane to keep until the task ends.
#[derive(Debug)]
pub struct HeldTask {
    /// The task's slot on its row, freed when dropped.
    pub slot: Slot,
    /// The principal whose row it is: the only one whose results the task takes
    /// (see [`TaskRouter::deliver_final`]).
    pub owner: String,
}

/// The receiving end of a [`TaskRouter`] on one replica: what a plane (NATS, or the
/// test kit's in-memory cluster) calls when a peer forwards a result or a channel loss.
/// Get it from [`Gateway::inbound`](crate::Gateway::inbound). The peer has
/// authenticated the publisher; ownership is checked here again.
///
/// It is also where the replica holding a channel counts and wakes for the others
/// (SPEC §14): [`hold`](TaskInbound::hold) takes a slot for a task another replica
/// sends to one of its channels, [`wake`](TaskInbound::wake) shares one wake per row
/// between every replica's requests, and the load methods let a plane report its
/// counts and hear the others'.
#[derive(Clone)]
pub struct TaskInbound {
    pub(crate) tasks: TaskTable,
    /// The gateway, for its registry view, admission and wakes; weak, as the plane
    /// holding this is held by the gateway.
    pub(crate) gateway: Weak<Shared>,
}

impl fmt::Debug for TaskInbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskInbound").finish_non_exhaustive()
    }
}

impl TaskInbound {
    /// Hands forwarded results to their task here, in order, with the refusals of a
    /// local delivery: the first refused stops the rest.
    pub async fn deliver(&self, delivery: Delivery) -> Result<(), Error> {
        self.tasks
            .deliver(
                &delivery.session,
                &delivery.owner,
                &delivery.task,
                delivery.results,
            )
            .await
    }

    /// Whether `delivery` is for a task here that waits for results from its session
    /// and principal: a plane checks this before it takes a delivery as a sign of its
    /// task (that its frame was taken), so that a forged one says nothing.
    pub fn expects(&self, delivery: &Delivery) -> bool {
        self.tasks
            .sent_to(&delivery.session, &delivery.owner, &delivery.task)
    }

    /// `session`'s channel closed on another replica: its tasks here fail with 503.
    /// Returns how many.
    pub fn session_closed(&self, session: &SessionId) -> usize {
        self.tasks.fail_session(session)
    }

    /// The channel of `session` on another replica is gone while the session may
    /// resume: it closed there and the session resumes
    /// ([`TaskRouter::session_held`]), or it was lost without that replica saying so
    /// (it died, and the session bound again elsewhere, or it came back without the
    /// channel). The tasks here sent to it wait the resume window for a sign of life
    /// from the publisher (its `resume`, or a result), then fail with 503. A
    /// publisher that never got a task's frame, or lost it, cannot resume it; without
    /// this, its client would wait until the task's deadline even when the session is
    /// back. Returns how many wait.
    pub fn channel_lost(&self, session: &SessionId) -> usize {
        let Some(shared) = self.gateway.upgrade() else {
            return 0;
        };
        let (held, hold) = self.tasks.hold_session(session);
        if held > 0 {
            let (tasks, session) = (self.tasks.clone(), session.clone());
            let window = shared.config.resume_window;
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                tasks.expire_hold(&session, hold);
            });
        }
        held
    }

    /// Whether `session` registered on this replica with the capability `resume`,
    /// granted: its tasks outlive a dropped channel (SPEC §15). A plane tells the
    /// other replicas with the channel's bind, so that a replica that dies holding it
    /// costs the session's tasks elsewhere no more than a dropped channel does (see
    /// [`channel_lost`](TaskInbound::channel_lost)).
    pub fn resumes(&self, session: &SessionId) -> bool {
        self.gateway
            .upgrade()
            .is_some_and(|shared| shared.versions.resumes(session))
    }

    /// The wake of the row `llm` (of the pool `pool`) failed with `message`, as its
    /// publisher reported to another replica: this replica's requests waiting for it
    /// fail with 503 `wake_failed`, and its wakes of the row are held off for the
    /// cooldown. Returns how many requests failed.
    pub fn wake_failed(&self, llm: &LlmName, pool: &LlmName, message: &str) -> usize {
        let Some(shared) = self.gateway.upgrade() else {
            return 0;
        };
        shared.wakes.fail(&*shared.admission, llm, pool, message)
    }

    /// The replica holding `session`'s channel refused the frame of `task` (a plane
    /// sends frames in the background, so `start` had returned): the task fails with
    /// the 503 a refusal on this replica gives (`Full`: saturated; `Closed`: offline).
    /// Returns whether the task was still waiting.
    pub fn frame_refused(&self, session: &SessionId, task: &TaskId, error: SendError) -> bool {
        self.tasks.refused(session, task, error)
    }

    /// Another replica sends a task for the row `llm` to `session`'s channel, which
    /// this replica holds: takes a slot on the row here, so that its tasks are counted
    /// where its channel is, whoever's client sent them. The slot is held until the
    /// task ends (the caller drops it). 503 saturated when the row has no room: the
    /// frame is to be refused, and the sender tries another row. `Ok(None)` when the
    /// row cannot be read now (the store is away and the view holds nothing): the
    /// task goes uncounted rather than refused.
    pub async fn hold(
        &self,
        session: &SessionId,
        llm: &LlmName,
    ) -> Result<Option<HeldTask>, Error> {
        let Some(shared) = self.gateway.upgrade() else {
            return Ok(None);
        };
        let row = match shared.view.row(llm).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                return Err(Error::unavailable(
                    UnavailableKind::Offline,
                    format!("llm {llm} is not in the registry"),
                    shared.config.retry_after,
                ));
            }
            Err(e) => {
                tracing::debug!(%llm, error = %e, "a carried task goes uncounted");
                return Ok(None);
            }
        };
        if row.provider_session_id.as_ref() != Some(session) {
            return Err(Error::unavailable(
                UnavailableKind::Offline,
                format!("llm {llm} is not served by this channel"),
                shared.config.retry_after,
            ));
        }
        let grant = shared.admission.try_admit(&row)?;
        Ok(Some(HeldTask {
            slot: Slot::new(shared.admission.clone(), grant),
            owner: row.owner,
        }))
    }

    /// Another replica asks for the row `llm` of `session`'s channel, which this
    /// replica holds, to be woken: the wake is started here, or joined if one runs,
    /// so that a row is woken once whichever replicas its requests came to. 503
    /// `wake_failed` during a failed wake's cooldown.
    pub async fn wake(&self, session: &SessionId, llm: &LlmName) -> Result<(), Error> {
        let Some(shared) = self.gateway.upgrade() else {
            return Ok(());
        };
        let row = match shared.view.row(llm).await? {
            Some(row) if row.provider_session_id.as_ref() == Some(session) => row,
            _ => {
                return Err(Error::unavailable(
                    UnavailableKind::Offline,
                    format!("llm {llm} is not served by this channel"),
                    shared.config.retry_after,
                ));
            }
        };
        if !shared.waker.can_wake(&row) {
            // The view holds the row from before it fell asleep: the publisher is
            // asked as it was, without the shared wake.
            let frame = crate::protocol::GatewayFrame::Wake(crate::protocol::WakeFrame {
                llm: llm.clone(),
            });
            return shared.directory.send(session, frame).map_err(|e| {
                Error::unavailable(
                    UnavailableKind::Offline,
                    format!("the wake could not reach the publisher of {llm}: {e}"),
                    shared.config.retry_after,
                )
            });
        }
        shared.wakes.ensure(&*shared.waker, &row).await
    }

    /// The in-flight counts of this replica, followed (see
    /// [`Admission::follow_loads`](crate::Admission::follow_loads)).
    pub fn follow_loads(&self) -> Option<Arc<LoadChanges>> {
        self.gateway.upgrade()?.admission.follow_loads()
    }

    /// The tasks in flight on `row` of `pool` counted here.
    pub fn count(&self, pool: &LlmName, row: &LlmName) -> u32 {
        self.gateway
            .upgrade()
            .map_or(0, |s| s.admission.count(pool, row))
    }

    /// The replica holding a row's channel reported its count (see
    /// [`Admission::heard`](crate::Admission::heard)).
    pub fn heard(&self, load: &RowLoad, until: Instant) {
        if let Some(shared) = self.gateway.upgrade() {
            shared.admission.heard(load, until);
        }
    }
}
