//! The provider routes that are plain HTTP requests, whatever the control channel:
//! registering, heartbeating, and posting a task's results (one JSON result, or many as
//! NDJSON, each delivered as it arrives).

use bytes::Buf;
use futures::{FutureExt, Stream, StreamExt};
use serde::Deserialize;
use virtual_llm_core::protocol::{
    BatchAnswer, HeartbeatRequest, HeartbeatResponse, MAX_BATCH_TASKS, RefusedResult,
    RegisterRequest, RegisterResponse, TaskResult, TaskResults,
};
use virtual_llm_core::{Error, Principal, RawBody, Role, SessionId};
use virtual_llm_core::{Gateway, RESULTS_PER_DELIVERY, TaskId};
use warp::reply::Response;

use crate::error::respond;
use crate::extract::{principal, session_id};
use crate::openapi::{E400, E401, E403, E404, E409, E413, E415, E426};
use crate::{body, reply};

/// `POST {base}/_provider-register`.
#[utoipa::path(post, path = "/api/v1/llms/_provider-register", tag = "provider",
    request_body = RegisterRequest,
    responses((status = 200, description = "The session and its rows", body = RegisterResponse),
        E400, E401, E403, E409, E413, E415, E426))]
pub(crate) async fn register<S, B>(gw: Gateway, auth: Option<String>, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let mut request: RegisterRequest = body::json(&bytes)?;
            // Runs as lines are WebSocket frames: a publisher registering over HTTP
            // sends its results as NDJSON lines, and is not told they are taken.
            request
                .capabilities
                .retain(|c| c != virtual_llm_core::protocol::CHUNK_LINES);
            Ok(reply::json(200, &gw.register(&who, request).await?))
        }
        .await,
    )
}

/// `POST {base}/_provider-heartbeat`.
#[utoipa::path(post, path = "/api/v1/llms/_provider-heartbeat", tag = "provider",
    request_body = HeartbeatRequest,
    responses((status = 200, description = "How many rows the session holds", body = HeartbeatResponse),
        E400, E401, E403, E404, E413, E415))]
pub(crate) async fn heartbeat<S, B>(gw: Gateway, auth: Option<String>, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let request: HeartbeatRequest = body::json(&bytes)?;
            Ok(reply::json(
                200,
                &gw.heartbeat_with(
                    &who,
                    &request.provider_session_id,
                    request.llms.as_deref().unwrap_or_default(),
                )
                .await?,
            ))
        }
        .await,
    )
}

/// `POST {base}/_provider-task/{taskId}/result`: one result as JSON, or many as NDJSON
/// (`application/x-ndjson`), each delivered as it arrives: a slow client makes this
/// request wait, and only this one.
#[utoipa::path(post, path = "/api/v1/llms/_provider-task/{taskId}/result", tag = "provider",
    params(
        ("taskId" = virtual_llm_core::TaskId, Path, description = "The task"),
        ("x-provider-session" = String, Header, description = "The session the task was sent to"),
    ),
    request_body(content(
        (TaskResult = "application/json"),
        (String = "application/x-ndjson"),
    )),
    responses((status = 204, description = "Delivered"), E400, E401, E403, E404, E409, E413, E415))]
pub(crate) async fn result<S, B>(
    task: String,
    gw: Gateway,
    auth: Option<String>,
    session: Option<String>,
    content_type: Option<String>,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let session = session_id(session.as_deref())?;
            let task = TaskId::parse(&task)?;
            let limit = gw.config().max_body_bytes;
            let ndjson = content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/x-ndjson"));
            if !ndjson {
                let bytes = body::read(body, limit).await?;
                let TaskResults(results) = body::json(&bytes)?;
                gw.deliver_all(&who, &session, &task, results).await?;
                return Ok(reply::no_content());
            }
            // The lines that came in together are delivered together: one hop for
            // them all when the task lives on another replica.
            let mut lines = std::pin::pin!(body::lines(body, limit));
            while let Some(line) = lines.next().await {
                let TaskResults(mut results) = body::json(line?.as_bytes())?;
                let mut refused = None;
                while results.len() < RESULTS_PER_DELIVERY
                    && let Some(Some(line)) = lines.next().now_or_never()
                {
                    match line.and_then(|l| body::json::<TaskResults>(l.as_bytes())) {
                        Ok(TaskResults(more)) => results.extend(more),
                        Err(e) => {
                            refused = Some(e);
                            break;
                        }
                    }
                }
                gw.deliver_all(&who, &session, &task, results).await?;
                if let Some(e) = refused {
                    return Err(e);
                }
            }
            Ok(reply::no_content())
        }
        .await,
    )
}

/// `POST {base}/_provider-results` (capability `resultBatches`): the whole answers of
/// several tasks in one request, an NDJSON line for each, a `result` or `error` frame
/// as on a WebSocket (`{"type":"result","taskId","status","body"}`,
/// `{"type":"error","taskId","message"}`).
///
/// The body is read and every line checked before anything is delivered: a line that
/// is not JSON, not one of those frames, fails the checks a result request makes (a
/// final status, the body's nesting), or names a task twice refuses the request (400)
/// and changes nothing. Then each task's answer is delivered as its own result
/// request would deliver it; the answer lists the tasks refused (another session's
/// task, an unknown or finished one), each with the status its own request would have
/// had. A final answer never waits for its client, so no task here waits on another.
#[utoipa::path(post, path = "/api/v1/llms/_provider-results", tag = "provider",
    params(
        ("x-provider-session" = String, Header, description = "The session the tasks were sent to"),
    ),
    request_body(description = "One line per task: a `result` or `error` frame as on a WebSocket",
        content((Vec<Object> = "application/x-ndjson"))),
    responses((status = 200, description = "Delivered, but for the tasks listed", body = BatchAnswer),
        E400, E401, E403, E413, E415))]
pub(crate) async fn results<S, B>(
    gw: Gateway,
    auth: Option<String>,
    session: Option<String>,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            // Checked here, not only by each delivery: a client's batch is refused whole.
            who.require(Role::Publisher)?;
            let session = session_id(session.as_deref())?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let answers = batch(&bytes)?;
            Ok(reply::json(
                200,
                &deliver_batch(&gw, &who, &session, answers).await,
            ))
        }
        .await,
    )
}

/// One line of a `_provider-results` body: a WebSocket `result` or `error` frame. Read
/// as a struct of its own, not as a `PublisherFrame`, so that the body of an answer
/// stays its raw text whatever the order of the keys (a tagged enum whose `type` does
/// not come first is buffered as a tree of values first).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchLine {
    #[serde(rename = "type")]
    kind: LineKind,
    task_id: TaskId,
    status: Option<u16>,
    body: Option<RawBody>,
    retry_after: Option<u64>,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum LineKind {
    Result,
    Error,
}

impl BatchLine {
    /// The task and its answer, checked as its own result request would check it.
    fn into_answer(self) -> Result<(TaskId, TaskResult), String> {
        let result = match self.kind {
            LineKind::Result => TaskResult::Completed {
                status: self.status.ok_or("a `result` has a `status`")?,
                body: self.body.unwrap_or_default(),
                retry_after: self.retry_after,
            },
            LineKind::Error => TaskResult::Failed {
                message: self.message.ok_or("an `error` has a `message`")?,
            },
        };
        result.validate().map_err(|e| e.to_string())?;
        Ok((self.task_id, result))
    }
}

/// The tasks and their answers in a `_provider-results` body, each line checked.
fn batch(bytes: &[u8]) -> Result<Vec<(TaskId, Vec<TaskResult>)>, Error> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| Error::invalid("the request body is not UTF-8"))?;
    let mut answers: Vec<(TaskId, Vec<TaskResult>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if answers.len() == MAX_BATCH_TASKS {
            return Err(Error::invalid(format!(
                "a batch carries at most {MAX_BATCH_TASKS} tasks"
            )));
        }
        let at = n + 1;
        let bad = |why: String| {
            Error::invalid(format!(
                "line {at}: {why} (a batch carries whole answers, `result` frames, and `error` frames; a stream is posted per task)"
            ))
        };
        let (task, result) = serde_json::from_str::<BatchLine>(line)
            .map_err(|e| bad(e.to_string()))?
            .into_answer()
            .map_err(bad)?;
        if !seen.insert(task.clone()) {
            return Err(bad(format!("task {task} is already in this batch")));
        }
        answers.push((task, vec![result]));
    }
    Ok(answers)
}

/// Delivers each task's answer, all at once (a task on another replica crosses there
/// and back without holding up the others), and says which were refused.
async fn deliver_batch(
    gw: &Gateway,
    who: &Principal,
    session: &SessionId,
    answers: Vec<(TaskId, Vec<TaskResult>)>,
) -> BatchAnswer {
    let deliveries = answers.into_iter().map(|(task, results)| async move {
        match gw.deliver_all(who, session, &task, results).await {
            Ok(()) => None,
            Err(e) => Some(RefusedResult {
                status: crate::error::logged(&e),
                message: e.to_body().error.message,
                task_id: task,
            }),
        }
    });
    BatchAnswer {
        refused: futures::future::join_all(deliveries)
            .await
            .into_iter()
            .flatten()
            .collect(),
    }
}
