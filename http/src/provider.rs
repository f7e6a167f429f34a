//! The provider routes that are plain HTTP requests, whatever the control channel:
//! registering, heartbeating, and posting a task's results (one JSON result, or many as
//! NDJSON, each delivered as it arrives).

use bytes::Buf;
use futures::{FutureExt, Stream, StreamExt};
use virtual_llm_core::protocol::{
    HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse, TaskResult, TaskResults,
};
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
