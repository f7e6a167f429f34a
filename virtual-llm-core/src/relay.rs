//! The relay: a client's request becomes a task on the right publisher's channel (or a
//! call to the public backend), and a publisher's results find their way back to the
//! task, on this replica or through the task router on another.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::admission::{Ask, Outcome, Slot};
use crate::protocol::{CancelFrame, GatewayFrame, TaskResult};
use crate::router::Route;
use crate::task::TaskHandle;
use crate::task_router::Delivery;
use crate::usage::Accounting;
use crate::{
    Error, Gateway, InferRequest, LlmKind, LlmName, LlmRecord, LlmStatus, Model, Principal, Reply,
    Role, SessionId, TaskId, UnavailableKind,
};

/// Whether an answer that came before any byte reached the client should go to
/// another row of the pool instead (SPEC §10): the row could not take the task (503 of
/// a kind that [lets another row try](UnavailableKind::try_another): its channel
/// closed or full, or it stopped serving since it was picked), the publisher could not
/// reach its upstream (502), or the upstream itself answered 502, 503 or 504. Never a
/// 4xx, never a deadline, never a refusal of the whole gateway.
pub(crate) fn retry_elsewhere(answer: &Result<Reply, Error>) -> bool {
    match answer {
        Ok(Reply::Complete(c)) => matches!(c.status, 502..=504),
        Ok(Reply::Stream(_)) => false,
        Err(Error::Upstream { .. }) => true,
        Err(Error::Unavailable { kind, .. }) => kind.try_another(),
        // Another member's publisher may speak a newer protocol.
        Err(Error::UnsupportedEndpoint { .. }) => true,
        Err(_) => false,
    }
}

/// Whether a publisher's results wait for the answer of the replica holding their
/// task ([`Gateway::deliver_all`]) or, being its last and of no use to the caller,
/// do not ([`Gateway::deliver_last`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Wait,
    Skip,
}

/// How a dispatch went, for its row's cooldown.
fn outcome(answer: &Result<Reply, Error>) -> Outcome {
    // A publisher too old for the endpoint is not failing: no cooldown for it.
    if retry_elsewhere(answer) && !matches!(answer, Err(Error::UnsupportedEndpoint { .. })) {
        Outcome::Failed
    } else {
        Outcome::Answered
    }
}

/// `reply` holding `slot` until its outcome: at once for a completion, at the end of
/// the stream (or when the client drops it) for a stream.
fn hold(reply: Reply, slot: Slot) -> Reply {
    match reply {
        Reply::Complete(c) => Reply::Complete(c),
        Reply::Stream(chunks) => Reply::Stream(
            chunks
                .map(move |chunk| {
                    let _held = &slot;
                    chunk
                })
                .boxed(),
        ),
    }
}

impl Gateway {
    /// Answers a client's inference request: public rows through the
    /// [`PublicBackend`](crate::PublicBackend), virtual rows through their publisher.
    /// For a stream, this returns once the first chunk has arrived.
    ///
    /// The [`Router`](crate::Router) names the rows that may answer; the
    /// [`Admission`](crate::Admission) picks one with a free slot, or queues the
    /// request until one frees. A dispatch that fails before its first byte reaches
    /// the client (the channel closed or full, the upstream unreachable or answering
    /// 502, 503 or 504) goes to another row, at most `pool_retries` times; the last
    /// answer is the client's, as it came.
    ///
    /// The caller's limits (SPEC §16) apply once its `model` is routed: over one, a 429
    /// `rate_limited`; the request's tokens are charged and counted in the usage when
    /// its outcome is known.
    pub async fn infer(
        &self,
        principal: &Principal,
        request: InferRequest,
    ) -> Result<Reply, Error> {
        principal.require(Role::Client)?;
        if self.is_draining() {
            return Err(self.draining());
        }
        let route = self.route(principal, &request.llm).await?;
        let limits = principal.limits(&self.shared.config.limits);
        let admitted = match self.shared.limiter.admit(principal, &limits) {
            Ok(admitted) => admitted,
            Err(e) => {
                self.shared.usage.rate_limited(&principal.id, &e);
                return Err(e);
            }
        };
        let accounting = Accounting::new(
            self.clone(),
            admitted,
            principal,
            &request.llm,
            &request.body,
        );
        accounting.answer(self.dispatch(principal, route, request).await)
    }

    /// [`Gateway::infer`] once routed and admitted.
    async fn dispatch(
        &self,
        principal: &Principal,
        route: Route,
        request: InferRequest,
    ) -> Result<Reply, Error> {
        let config = &self.shared.config;
        let started = Instant::now();
        let timeout = request.timeout;
        let within = |limit: Duration| started + timeout.map_or(limit, |t| t.min(limit));
        let (queue_until, deadline) = (within(config.queue_wait), within(config.task_deadline));
        let request = self.as_agent(&route, request)?;
        // Members of the pool the route left out (the caller may not call them, SPEC
        // §16) are never granted: the admission knows the whole pool.
        let mut tried: Vec<LlmName> = self.left_out(&route).await?;
        let mut last: Option<Result<Reply, Error>> = None;
        for _ in 0..=config.pool_retries {
            let candidates: Vec<&LlmRecord> = route
                .rows
                .iter()
                .filter(|r| route.admits(&r.name) && !tried.contains(&r.name))
                .collect();
            let mut waking = false;
            if !candidates.iter().any(|r| Route::serving(r)) {
                if let Some(answer) = last {
                    return answer;
                }
                // Nothing of the pool serves: wake a row that sleeps, or say why its
                // first row does not serve.
                match self.wake_one(&candidates).await {
                    Some(Ok(())) => waking = true,
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(match candidates.first() {
                            Some(row) => self.not_serving(row),
                            None => Error::UnknownLlm { name: request.llm },
                        });
                    }
                }
            }
            let ask = Ask {
                principal: &principal.id,
                route: &route,
                exclude: &tried,
                until: if waking {
                    within(config.wake_wait)
                } else {
                    queue_until
                },
                waking,
            };
            let grant = match self.shared.admission.admit(ask).await {
                Ok(grant) => grant,
                Err(Error::QueueTimeout { pool, waited, .. }) if waking => {
                    return Err(Error::WakeTimeout {
                        pool,
                        waited,
                        retry_after: config.retry_after,
                    });
                }
                Err(e) => return last.unwrap_or(Err(e)),
            };
            let slot = Slot::new(self.shared.admission.clone(), grant);
            let row = match route.rows.iter().find(|r| r.name == slot.grant().row) {
                Some(row) if Route::serving(row) => row.clone(),
                // A row that started serving after the route was read (published or
                // bound since): as the registry has it now, not as the route saw it.
                _ => match self.shared.store.get(&slot.grant().row).await? {
                    Some(row) if row.admits(principal) => row,
                    _ => continue,
                },
            };
            let answer = self.answer(&row, request.clone(), slot, deadline).await;
            if !retry_elsewhere(&answer) {
                return answer;
            }
            tracing::debug!(llm = %row.name, pool = %route.pool, "dispatch failed before its first byte; trying another member");
            // What the registry view holds of the row may be what made it fail (a
            // channel that moved to another replica): read it again next time.
            self.shared.view.invalidate(&row);
            crate::metrics::failed_over();
            tried.push(row.name.clone());
            last = Some(answer);
        }
        last.unwrap_or_else(|| Err(Error::UnknownLlm { name: request.llm }))
    }

    /// The members of `route`'s pool that are not rows of the route: those the
    /// router left out because the caller may not call them. None for a pinned route,
    /// or one the router did not filter (it shares its rows with the registry view).
    async fn left_out(&self, route: &Route) -> Result<Vec<LlmName>, Error> {
        if route.pinned.is_some() {
            return Ok(Vec::new());
        }
        let Some(all) = self.shared.view.pool(&route.pool).await? else {
            return Ok(Vec::new());
        };
        if std::sync::Arc::ptr_eq(&all, &route.rows) || all.len() == route.rows.len() {
            return Ok(Vec::new());
        }
        let kept: std::collections::HashSet<&LlmName> =
            route.rows.iter().map(|r| &r.name).collect();
        Ok(all
            .iter()
            .filter(|r| !r.is_agent() && !kept.contains(&r.name))
            .map(|r| r.name.clone())
            .collect())
    }

    /// `request` as the agent its route names puts it (SPEC §13): its system prompt
    /// first, its default parameters under the client's own; 503 when the agent's
    /// publisher is gone. A request for an LLM is left as it is.
    fn as_agent(&self, route: &Route, mut request: InferRequest) -> Result<InferRequest, Error> {
        let Some(agent) = &route.agent else {
            return Ok(request);
        };
        if agent.status != LlmStatus::Active {
            let state = match agent.status {
                LlmStatus::Hibernating => "hibernating",
                _ => "inactive",
            };
            return Err(Error::unavailable(
                UnavailableKind::Inactive,
                format!("agent {} is {state} (publisher offline)", agent.name),
                self.shared.config.retry_after,
            ));
        }
        // The one place the gateway parses a client's body whole: a persona rewrites
        // its messages. The result is a new body of its own.
        let mut body = request
            .body
            .to_value()
            .map_err(|e| Error::invalid(format!("invalid JSON body: {e}")))?;
        agent.persona.apply(&mut body);
        request.body = body.into();
        Ok(request)
    }

    /// Wakes the first of `rows` a waker can wake (or joins its wake in progress):
    /// `None` when none can be woken, else whether asking worked (503 `wake_failed`
    /// during a failed wake's cooldown).
    async fn wake_one(&self, rows: &[&LlmRecord]) -> Option<Result<(), Error>> {
        let waker = &*self.shared.waker;
        let mut outcome = None;
        for row in rows.iter().filter(|r| waker.can_wake(r)) {
            match self.shared.wakes.ensure(waker, row).await {
                Ok(()) => return Some(Ok(())),
                Err(e) => outcome = Some(Err(e)),
            }
        }
        outcome
    }

    /// The rows that may answer `principal`'s request for `model`: what the
    /// configured [`Router`](crate::Router) says.
    pub async fn route(&self, principal: &Principal, model: &str) -> Result<Route, Error> {
        let route = self
            .shared
            .router
            .route(&self.shared.view, principal, model)
            .await?;
        if route.rows.is_empty() {
            return Err(Error::UnknownLlm {
                name: model.to_owned(),
            });
        }
        Ok(route)
    }

    /// Sends `request` to `row` holding `slot`, and waits for the first event. The
    /// slot is reported with how the dispatch went, and is held until the outcome.
    async fn answer(
        &self,
        row: &LlmRecord,
        request: InferRequest,
        slot: Slot,
        deadline: Instant,
    ) -> Result<Reply, Error> {
        match row.kind {
            LlmKind::Public => {
                let answer = match &self.shared.public {
                    Some(backend) => backend.infer(row, request).await,
                    None => Err(Error::unavailable(
                        UnavailableKind::Offline,
                        format!(
                            "llm {} is public but this gateway has no public backend",
                            row.name
                        ),
                        self.shared.config.retry_after,
                    )),
                };
                slot.report(outcome(&answer));
                answer.map(|reply| hold(reply, slot))
            }
            LlmKind::Virtual => {
                let grant = slot.grant().clone();
                let answer = match self.task(row, request, Some(slot), deadline) {
                    Ok(handle) => handle.into_reply().await,
                    Err(e) => Err(e),
                };
                self.shared.admission.report(&grant, outcome(&answer));
                answer
            }
        }
    }

    /// Sends `principal`'s `request` to the publisher of the virtual row `row` (one of
    /// the rows of [`Gateway::route`]) and returns the task's handle, without waiting
    /// for its first event: for a caller that drives the events itself. It takes a
    /// slot on the row and never queues: 503 when the row has no free slot, when the
    /// gateway is draining, the row is not active or its publisher has no channel.
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
        let grant = self.shared.admission.try_admit(row)?;
        let slot = Slot::new(self.shared.admission.clone(), grant);
        let deadline = Instant::now() + self.shared.config.task_deadline;
        self.task(row, request, Some(slot), deadline)
    }

    pub(crate) fn draining(&self) -> Error {
        Error::unavailable(
            UnavailableKind::Draining,
            "the gateway is shutting down",
            self.shared.config.retry_after,
        )
    }

    /// Why `row` cannot take a task: it is not active, or has no channel.
    fn not_serving(&self, row: &LlmRecord) -> Error {
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
            return Error::unavailable(
                kind,
                format!("llm {} is {state} (publisher offline{since})", row.name),
                retry_after,
            );
        }
        Error::unavailable(
            UnavailableKind::Offline,
            format!("the publisher of llm {} has no channel", row.name),
            retry_after,
        )
    }

    fn task(
        &self,
        row: &LlmRecord,
        request: InferRequest,
        slot: Option<Slot>,
        deadline: Instant,
    ) -> Result<TaskHandle, Error> {
        if row.status != LlmStatus::Active {
            return Err(self.not_serving(row));
        }
        let session = row.provider_session_id.as_ref().ok_or_else(|| {
            Error::unavailable(
                UnavailableKind::Offline,
                format!("llm {} has no publisher session", row.name),
                self.shared.config.retry_after,
            )
        })?;
        let spoken = self.shared.versions.get(session);
        if spoken < request.endpoint.min_protocol() {
            return Err(Error::UnsupportedEndpoint {
                llm: row.name.to_string(),
                endpoint: request.endpoint,
                protocol: spoken,
            });
        }
        self.shared
            .tasks
            .start(session, &row.owner, &row.name, request, slot, deadline)
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
        self.deliver_all(principal, session, task, vec![result])
            .await
    }

    /// [`deliver`](Gateway::deliver) for results a publisher sent together, in order:
    /// the first refused stops the rest. For a task on another replica they cross in
    /// one hop.
    pub async fn deliver_all(
        &self,
        principal: &Principal,
        session: &SessionId,
        task: &TaskId,
        results: Vec<TaskResult>,
    ) -> Result<(), Error> {
        self.deliver_results(principal, session, task, results, Answer::Wait)
            .await
    }

    /// [`deliver_all`](Gateway::deliver_all) for a task's last results (the last of
    /// them final) when the caller has no use for the answer, as a publisher over a
    /// socket, which is told nothing of a refused result: for a task on another
    /// replica they cross without waiting for that replica's answer
    /// ([`TaskRouter::deliver_last`](crate::TaskRouter::deliver_last)), and `Ok` means
    /// they are on their way. The checks made here (the role, each result's shape)
    /// still answer. Results whose last is not final, or that resume a task, are
    /// delivered as by `deliver_all`: their answer is the stream's backpressure, or
    /// decides a cancel.
    pub async fn deliver_last(
        &self,
        principal: &Principal,
        session: &SessionId,
        task: &TaskId,
        results: Vec<TaskResult>,
    ) -> Result<(), Error> {
        self.deliver_results(principal, session, task, results, Answer::Skip)
            .await
    }

    async fn deliver_results(
        &self,
        principal: &Principal,
        session: &SessionId,
        task: &TaskId,
        results: Vec<TaskResult>,
        answer: Answer,
    ) -> Result<(), Error> {
        principal.require(Role::Publisher)?;
        let Some(first) = results.first() else {
            return Ok(());
        };
        let resuming = matches!(first, TaskResult::Resume { .. });
        let unanswered =
            answer == Answer::Skip && !resuming && results.last().is_some_and(TaskResult::is_final);
        let delivered = match task.replica() {
            Some(replica) if replica != *self.replica() => {
                for result in &results {
                    result.validate()?;
                }
                let delivery = Delivery {
                    session: session.clone(),
                    owner: principal.id.clone(),
                    task: task.clone(),
                    results,
                };
                let router = &self.shared.task_router;
                if unanswered {
                    router.deliver_last(&replica, delivery).await;
                    Ok(())
                } else if let [TaskResult::Completed { .. } | TaskResult::Failed { .. }] =
                    delivery.results[..]
                {
                    router.deliver_final(&replica, delivery).await
                } else {
                    router.deliver(&replica, delivery).await
                }
            }
            _ => {
                self.shared
                    .tasks
                    .deliver(session, &principal.id, task, results)
                    .await
            }
        };
        if resuming
            && matches!(delivered, Err(Error::UnknownTask))
            && self.session_rows(principal, session).await.is_ok()
        {
            // A task resumed after its client gave up (the cancel may have found no
            // channel, here or on the task's replica): its publisher stops it now. A
            // publisher over a socket hears of a refused result no other way.
            let cancel = GatewayFrame::Cancel(CancelFrame {
                task_id: task.clone(),
            });
            if let Err(e) = self.shared.directory.send(session, cancel) {
                tracing::debug!(%task, error = %e, "cancel of a resumed task not sent");
            }
        }
        delivered
    }

    /// What `GET /v1/models` lists: each pool key with an active member, once
    /// (members named otherwise are not listed; they stay reachable by name), and each
    /// active agent (SPEC §13). A row without a pool is the pool of one named after
    /// it. Only what `principal` may see (SPEC §16): a pool is listed while a member
    /// it may call is active. Ordered by id.
    pub async fn active_models(&self, principal: &Principal) -> Result<Vec<Model>, Error> {
        let mut rows = self.shared.store.list().await?;
        rows.retain(|r| r.admits(principal));
        let mut models: std::collections::BTreeMap<&LlmName, Model> = Default::default();
        for r in rows
            .iter()
            .filter(|r| r.status == LlmStatus::Active && !r.is_agent())
        {
            let model = models.entry(r.pool_key()).or_insert_with(|| Model {
                id: r.pool_key().clone(),
                kind: r.kind,
                created_at: r.created_at,
            });
            model.created_at = model.created_at.min(r.created_at);
        }
        // Active agents too, each under its own name (the rows are ordered by name).
        let agents = crate::agent::agent_views(rows.iter().filter(|r| r.is_agent()), &rows);
        for agent in agents.iter().filter(|a| a.status == LlmStatus::Active) {
            if let Ok(i) = rows.binary_search_by(|r| r.name.cmp(&agent.name)) {
                let row = &rows[i];
                models.entry(&row.name).or_insert_with(|| Model {
                    id: row.name.clone(),
                    kind: row.kind,
                    created_at: row.created_at,
                });
            }
        }
        Ok(models.into_values().collect())
    }
}
