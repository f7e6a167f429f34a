//! The client routes: the OpenAI-compatible pair (`POST /v1/chat/completions`,
//! `GET /v1/models`) and the registry's own (`GET {base}`, `GET {base}/{name}`,
//! `POST {base}/{name}/infer`, `GET /api/v1/agents[/{name}]`).

use bytes::Buf;
use futures::Stream;
use serde_json::{Value, json};
use virtual_llm_core::openai::parse_request_timeout;
use virtual_llm_core::{Gateway, InferRequest, LlmKind, Reply};
use warp::reply::Response;

use crate::error::respond;
use crate::extract::principal;
use crate::server::CloseConnection;
use crate::{body, reply, stream};

/// `GET {base}`: the registry rows the caller may see.
pub(crate) async fn list(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.list(&who).await?))
        }
        .await,
    )
}

/// `GET {base}/{name}`: one row.
pub(crate) async fn get(name: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.get(&who, &name).await?))
        }
        .await,
    )
}

/// `GET /api/v1/agents`: the agents (SPEC §13).
pub(crate) async fn agents(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.agents(&who).await?))
        }
        .await,
    )
}

/// `GET /api/v1/agents/{name}`: one agent.
pub(crate) async fn agent(name: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.agent(&who, &name).await?))
        }
        .await,
    )
}

/// `GET {base}/{poolKey}/members`: the rows of a pool.
pub(crate) async fn members(pool: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.members(&who, &pool).await?))
        }
        .await,
    )
}

/// `POST {base}/{name}/infer` (`name` given) or `POST /v1/chat/completions` (the
/// body's `model`): the completion, or its stream. `timeout` is the client's
/// `x-request-timeout`; `close` is the connection's, if any, for a stream that fails
/// midway.
pub(crate) async fn infer<S, B>(
    name: Option<String>,
    gw: Gateway,
    auth: Option<String>,
    timeout: Option<String>,
    close: Option<CloseConnection>,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let timeout = timeout.as_deref().map(parse_request_timeout).transpose()?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let value: Value = body::json(&bytes)?;
            let request = match name {
                Some(name) => InferRequest::for_llm(&name, value)?,
                None => InferRequest::from_chat_body(value)?,
            }
            .with_timeout(timeout);
            Ok(match gw.infer(&who, request).await? {
                Reply::Complete(c) => reply::completion(&c),
                Reply::Stream(chunks) => stream::chunk_stream(chunks, close),
            })
        }
        .await,
    )
}

/// `GET /v1/models`: the active LLMs, as OpenAI lists models.
pub(crate) async fn models(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let data: Vec<Value> = gw
                .active_models(&who)
                .await?
                .into_iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "object": "model",
                        "created": r.created_at.as_millis() / 1000,
                        "owned_by": match r.kind {
                            LlmKind::Public => "public",
                            LlmKind::Virtual => "virtual",
                        },
                    })
                })
                .collect();
            Ok(reply::json(200, &json!({ "object": "list", "data": data })))
        }
        .await,
    )
}
