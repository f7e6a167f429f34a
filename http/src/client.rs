//! The client routes: the OpenAI-compatible ones (`POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`) and
//! the registry's own (`GET {base}`, `GET {base}/{name}`, `POST {base}/{name}/infer`).

use bytes::Buf;
use futures::Stream;
use serde_json::{Value, json};
use virtual_llm_core::openai::parse_request_timeout;
use virtual_llm_core::protocol::Endpoint;
use virtual_llm_core::{Error, Gateway, InferRequest, LlmKind, Model, Reply};
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
            let value: Value = body::json(&bytes)?;
            let request = match target {
                Target::Named(name) => InferRequest::for_llm(&name, value)?,
                Target::Body(endpoint) => InferRequest::from_body(endpoint, value)?,
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
fn model_object(model: &Model) -> Value {
    json!({
        "id": model.id,
        "object": "model",
        "created": model.created_at.as_millis() / 1000,
        "owned_by": match model.kind {
            LlmKind::Public => "public",
            LlmKind::Virtual => "virtual",
        },
    })
}

/// `GET /v1/models`: the active LLMs, as OpenAI lists models.
pub(crate) async fn models(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let data: Vec<Value> = gw
                .active_models(&who)
                .await?
                .iter()
                .map(model_object)
                .collect();
            Ok(reply::json(200, &json!({ "object": "list", "data": data })))
        }
        .await,
    )
}

/// `GET /v1/models/{id}` (the SDKs' `models.retrieve`): one model of the list, or
/// 404 when it is not there (unknown, or with no active member).
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
