//! The relay: a client's request becomes a task on the right publisher's channel (or a
//! call to the public backend), and a publisher's results find their way back.

use crate::protocol::TaskResult;
use crate::task::TaskHandle;
use crate::{
    Error, Gateway, InferRequest, LlmKind, LlmName, LlmRecord, LlmStatus, Principal, Reply, Role,
    SessionId, TaskId,
};

impl Gateway {
    /// Answers a client's inference request: public rows through the
    /// [`PublicBackend`](crate::PublicBackend), virtual rows through their publisher.
    /// For a stream, this returns once the first chunk has arrived.
    pub async fn infer(
        &self,
        principal: &Principal,
        request: InferRequest,
    ) -> Result<Reply, Error> {
        principal.require(Role::Client)?;
        if self.is_draining() {
            return Err(Error::Unavailable {
                reason: "the gateway is shutting down".into(),
                retry_after: self.shared.config.retry_after,
            });
        }
        let row = self.route(&request.llm).await?;
        match row.kind {
            LlmKind::Public => match &self.shared.public {
                Some(backend) => backend.infer(&row, request).await,
                None => Err(Error::Unavailable {
                    reason: format!(
                        "llm {} is public but this gateway has no public backend",
                        row.name
                    ),
                    retry_after: self.shared.config.retry_after,
                }),
            },
            LlmKind::Virtual => self.start_task(&row, request)?.into_reply().await,
        }
    }

    /// The row that answers a request for `llm`. The one place a request's row is
    /// chosen, so that pools (several rows per model) change only this.
    pub async fn route(&self, llm: &str) -> Result<LlmRecord, Error> {
        let name = LlmName::parse(llm)?;
        self.shared
            .store
            .get(&name)
            .await?
            .ok_or_else(|| Error::UnknownLlm {
                name: llm.to_owned(),
            })
    }

    /// Sends `request` to the publisher of the virtual row `row` and returns the task's
    /// handle. 503 when the row is not active or its publisher has no channel.
    pub fn start_task(&self, row: &LlmRecord, request: InferRequest) -> Result<TaskHandle, Error> {
        let retry_after = self.shared.config.retry_after;
        if row.status != LlmStatus::Active {
            let since = row
                .inactive_since
                .map(|t| format!(" since {t}"))
                .unwrap_or_default();
            let state = match row.status {
                LlmStatus::Hibernating => "hibernating",
                _ => "inactive",
            };
            return Err(Error::Unavailable {
                reason: format!("llm {} is {state} (publisher offline{since})", row.name),
                retry_after,
            });
        }
        let session = row
            .provider_session_id
            .as_ref()
            .ok_or_else(|| Error::Unavailable {
                reason: format!("llm {} has no publisher session", row.name),
                retry_after,
            })?;
        self.shared
            .tasks
            .start(session, &row.owner, &row.name, request.stream, request.body)
    }

    /// A publisher's result for one of its session's tasks. See
    /// [`TaskTable::deliver`](crate::TaskTable::deliver) for the refusals.
    pub async fn deliver(
        &self,
        principal: &Principal,
        session: &SessionId,
        task: &TaskId,
        result: TaskResult,
    ) -> Result<(), Error> {
        principal.require(Role::Publisher)?;
        self.shared
            .tasks
            .deliver(session, &principal.id, task, result)
            .await
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
