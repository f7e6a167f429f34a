//! The relay: a client's request becomes a task on the right publisher's channel (or a
//! call to the public backend), and a publisher's results find their way back to the
//! task, on this replica or through the task router on another.

use crate::protocol::TaskResult;
use crate::task::TaskHandle;
use crate::task_router::Delivery;
use crate::{
    Error, Gateway, InferRequest, LlmKind, LlmRecord, LlmStatus, Principal, Reply, Role, SessionId,
    TaskId, UnavailableKind,
};

impl Gateway {
    /// Answers a client's inference request: public rows through the
    /// [`PublicBackend`](crate::PublicBackend), virtual rows through their publisher.
    /// For a stream, this returns once the first chunk has arrived.
    ///
    /// The [`Router`](crate::Router) names the candidate rows; they are tried in order
    /// while a row is unavailable in a way that lets another serve
    /// ([`UnavailableKind::try_another`]). The last answer is the client's.
    pub async fn infer(
        &self,
        principal: &Principal,
        request: InferRequest,
    ) -> Result<Reply, Error> {
        principal.require(Role::Client)?;
        if self.is_draining() {
            return Err(self.draining());
        }
        let candidates = self.route(principal, &request.llm).await?;
        let Some((last, others)) = candidates.split_last() else {
            return Err(Error::UnknownLlm { name: request.llm });
        };
        for row in others {
            match self.answer(row, request.clone()).await {
                Err(Error::Unavailable { kind, .. }) if kind.try_another() => {
                    tracing::debug!(llm = %row.name, kind = kind.as_str(), "trying the next row");
                }
                outcome => return outcome,
            }
        }
        self.answer(last, request).await
    }

    /// The rows that may answer `principal`'s request for `model`, best first: what the
    /// configured [`Router`](crate::Router) says.
    pub async fn route(&self, principal: &Principal, model: &str) -> Result<Vec<LlmRecord>, Error> {
        let rows = self
            .shared
            .router
            .candidates(&*self.shared.store, principal, model)
            .await?;
        if rows.is_empty() {
            return Err(Error::UnknownLlm {
                name: model.to_owned(),
            });
        }
        Ok(rows)
    }

    async fn answer(&self, row: &LlmRecord, request: InferRequest) -> Result<Reply, Error> {
        match row.kind {
            LlmKind::Public => match &self.shared.public {
                Some(backend) => backend.infer(row, request).await,
                None => Err(Error::unavailable(
                    UnavailableKind::Offline,
                    format!(
                        "llm {} is public but this gateway has no public backend",
                        row.name
                    ),
                    self.shared.config.retry_after,
                )),
            },
            LlmKind::Virtual => self.task(row, request)?.into_reply().await,
        }
    }

    /// Sends `principal`'s `request` to the publisher of the virtual row `row` (one of
    /// the rows [`Gateway::route`] named) and returns the task's handle, without
    /// waiting for its first event: for a caller that drives the events itself. 503
    /// when the gateway is draining, the row is not active or its publisher has no
    /// channel.
    pub fn start_task(
        &self,
        principal: &Principal,
        row: &LlmRecord,
        request: InferRequest,
    ) -> Result<TaskHandle, Error> {
        principal.require(Role::Client)?;
        if self.is_draining() {
            return Err(self.draining());
        }
        self.task(row, request)
    }

    fn draining(&self) -> Error {
        Error::unavailable(
            UnavailableKind::Draining,
            "the gateway is shutting down",
            self.shared.config.retry_after,
        )
    }

    fn task(&self, row: &LlmRecord, request: InferRequest) -> Result<TaskHandle, Error> {
        let retry_after = self.shared.config.retry_after;
        if row.status != LlmStatus::Active {
            let since = row
                .inactive_since
                .map(|t| format!(" since {t}"))
                .unwrap_or_default();
            let (kind, state) = match row.status {
                LlmStatus::Hibernating => (UnavailableKind::Hibernating, "hibernating"),
                _ => (UnavailableKind::Inactive, "inactive"),
            };
            return Err(Error::unavailable(
                kind,
                format!("llm {} is {state} (publisher offline{since})", row.name),
                retry_after,
            ));
        }
        let session = row.provider_session_id.as_ref().ok_or_else(|| {
            Error::unavailable(
                UnavailableKind::Offline,
                format!("llm {} has no publisher session", row.name),
                retry_after,
            )
        })?;
        self.shared
            .tasks
            .start(session, &row.owner, &row.name, request.stream, request.body)
    }

    /// A publisher's result for one of its session's tasks, wherever the task lives:
    /// here, or on the replica its id names, through the
    /// [`TaskRouter`](crate::TaskRouter). Refused with 404 when the task is unknown, was
    /// cancelled, or was sent to another session or principal; 409 when it already had
    /// its final result (told only to its own session); 400 for a chunk of a
    /// non-streaming task, or one that skips a `seq`.
    pub async fn deliver(
        &self,
        principal: &Principal,
        session: &SessionId,
        task: &TaskId,
        result: TaskResult,
    ) -> Result<(), Error> {
        principal.require(Role::Publisher)?;
        match task.replica() {
            Some(replica) if replica != *self.replica() => {
                result.validate()?;
                let delivery = Delivery {
                    session: session.clone(),
                    owner: principal.id.clone(),
                    task: task.clone(),
                    result,
                };
                self.shared.task_router.deliver(&replica, delivery).await
            }
            _ => {
                self.shared
                    .tasks
                    .deliver(session, &principal.id, task, result)
                    .await
            }
        }
    }

    /// Active rows, for `GET /v1/models`.
    pub async fn active_models(&self, _principal: &Principal) -> Result<Vec<LlmRecord>, Error> {
        let rows = self.shared.store.list().await?;
        Ok(rows
            .into_iter()
            .filter(|r| r.status == LlmStatus::Active)
            .collect())
    }
}
