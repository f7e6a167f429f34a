//! The client routes: the OpenAI-compatible ones (`POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`) and
//! the registry's own (`GET {base}`, `GET {base}/{name}`, `POST {base}/{name}/infer`,
//! `GET /api/v1/agents[/{name}]`).

use bytes::Buf;
use futures::Stream;
use virtual_llm_core::agent::AgentView;
use virtual_llm_core::openai::parse_request_timeout;
use virtual_llm_core::protocol::Endpoint;
use virtual_llm_core::{Error, Gateway, InferRequest, LlmKind, LlmView, Model, Reply};
use warp::reply::Response;

use crate::error::respond;
use crate::extract::principal;
use crate::openapi::{
    ChatCompletionRequest, CompletionRequest, E400, E401, E403, E404, E413, E429, E502, E503, E504,
    EmbeddingRequest, InferBody, NameParam,
};
use crate::server::CloseConnection;
use crate::{body, reply, stream};

/// `GET {base}`: the registry rows the caller may see.
#[utoipa::path(get, path = "/api/v1/llms", tag = "registry",
    responses((status = 200, description = "The rows, ordered by name", body = [LlmView]), E401, E403))]
pub(crate) async fn list(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.list(&who).await?))
        }
        .await,
    )
}

/// `GET {base}/{name...}`: one row.
#[utoipa::path(get, path = "/api/v1/llms/{name}", tag = "registry", params(NameParam),
    responses((status = 200, description = "The row", body = LlmView), E400, E401, E403, E404))]
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
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents",
    responses((status = 200, description = "The agents, ordered by name", body = [AgentView]), E401, E403))]
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
#[utoipa::path(get, path = "/api/v1/agents/{name}", tag = "agents", params(NameParam),
    responses((status = 200, description = "The agent", body = AgentView), E400, E401, E403, E404))]
pub(crate) async fn agent(name: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.agent(&who, &name).await?))
        }
        .await,
    )
}

/// `GET {base}/{poolKey...}/members`: the rows of a pool.
#[utoipa::path(get, path = "/api/v1/llms/{name}/members", tag = "registry", params(NameParam),
    responses((status = 200, description = "The pool's rows, ordered by name", body = [LlmView]), E400, E401, E403, E404))]
pub(crate) async fn members(pool: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.members(&who, &pool).await?))
        }
        .await,
    )
}

/// The request of an inference route, as warp hands it over: the principal's
/// `Authorization`, the client's `x-request-timeout`, the connection's close handle, the
/// body.
pub(crate) type InferArgs<S> = (
    Gateway,
    Option<String>,
    Option<String>,
    Option<CloseConnection>,
    S,
);

/// `POST {base}/{name...}/infer`: a chat completion for the named LLM.
#[utoipa::path(post, path = "/api/v1/llms/{name}/infer", tag = "openai", params(NameParam),
    request_body = InferBody,
    responses((status = 200, description = "The model's answer as it gave it, or with `stream: true` server-sent events of chunks ending `data: [DONE]`",
        content((Object = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))), E400, E401, E403, E404, E413, E429, E502, E503, E504))]
pub(crate) async fn named_infer<S, B>(
    name: String,
    (gw, auth, timeout, close, body): InferArgs<S>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(Target::Named(name), gw, auth, timeout, close, body).await
}

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
    responses((status = 200, description = "The model's answer as it gave it, or with `stream: true` server-sent events of chunks ending `data: [DONE]`",
        content((Object = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))), E400, E401, E403, E404, E413, E429, E502, E503, E504))]
pub(crate) async fn chat_completions<S, B>(
    (gw, auth, timeout, close, body): InferArgs<S>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(
        Target::Body(Endpoint::ChatCompletions),
        gw,
        auth,
        timeout,
        close,
        body,
    )
    .await
}

/// `POST /v1/completions`.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses((status = 200, description = "The model's answer as it gave it, or with `stream: true` server-sent events of chunks ending `data: [DONE]`",
        content((Object = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))), E400, E401, E403, E404, E413, E429, E502, E503, E504))]
pub(crate) async fn completions<S, B>((gw, auth, timeout, close, body): InferArgs<S>) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(
        Target::Body(Endpoint::Completions),
        gw,
        auth,
        timeout,
        close,
        body,
    )
    .await
}

/// `POST /v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequest,
    responses((status = 200, description = "The model's embeddings as it gave them (never streamed: `stream: true` is 400)",
        content((Object = "application/json"))), E400, E401, E403, E404, E413, E429, E502, E503, E504))]
pub(crate) async fn embeddings<S, B>((gw, auth, timeout, close, body): InferArgs<S>) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(
        Target::Body(Endpoint::Embeddings),
        gw,
        auth,
        timeout,
        close,
        body,
    )
    .await
}

/// What an inference route answers: a chat completion for the LLM its path names
/// (`POST {base}/{name}/infer`), or the OpenAI `endpoint` of the body's `model`.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// `POST {base}/{name}/infer`.
    Named(String),
    /// `POST /v1/chat/completions`, `/v1/completions` or `/v1/embeddings`.
    Body(Endpoint),
}

/// `POST {base}/{name}/infer` or one of the OpenAI routes (see [`Target`]): the
/// answer, or its stream. `timeout` is the client's `x-request-timeout`; `close` is
/// the connection's, if any, for a stream that fails midway.
pub(crate) async fn infer<S, B>(
    target: Target,
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
            // Kept as its text: the body costs its bytes while it waits for the
            // publisher, whatever its JSON shape (red-team finding F1).
            let request = match target {
                Target::Named(name) => {
                    InferRequest::read(Endpoint::ChatCompletions, Some(&name), bytes.into())?
                }
                Target::Body(endpoint) => InferRequest::read(endpoint, None, bytes.into())?,
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

/// A model as OpenAI lists it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ModelObject {
    /// The name clients call it by (a pool key).
    id: String,
    /// Always `model`.
    object: &'static str,
    /// When it was first published, in seconds since the epoch.
    created: u64,
    /// `virtual` (published) or `public`.
    owned_by: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ModelList {
    /// Always `list`.
    object: &'static str,
    /// The models.
    data: Vec<ModelObject>,
}

fn model_object(model: &Model) -> ModelObject {
    ModelObject {
        id: model.id.to_string(),
        object: "model",
        created: model.created_at.as_millis() / 1000,
        owned_by: match model.kind {
            LlmKind::Public => "public",
            LlmKind::Virtual => "virtual",
        },
    }
}

/// `GET /v1/models`: the active LLMs, as OpenAI lists models.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "Each pool key with an active member", body = ModelList), E401, E403))]
pub(crate) async fn models(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let data = gw
                .active_models(&who)
                .await?
                .iter()
                .map(model_object)
                .collect();
            Ok(reply::json(
                200,
                &ModelList {
                    object: "list",
                    data,
                },
            ))
        }
        .await,
    )
}

/// `GET /v1/models/{id...}` (the SDKs' `models.retrieve`): one model of the list, or
/// 404 when it is not there (unknown, or with no active member).
#[utoipa::path(get, path = "/v1/models/{name}", tag = "openai", params(NameParam),
    responses((status = 200, description = "The model", body = ModelObject), E401, E403, E404))]
pub(crate) async fn model(id: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let models = gw.active_models(&who).await?;
            match models.iter().find(|m| m.id.as_str() == id) {
                Some(model) => Ok(reply::json(200, &model_object(model))),
                None => Err(Error::UnknownLlm { name: id }),
            }
        }
        .await,
    )
}
