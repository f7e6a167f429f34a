//! The client routes: the OpenAI-compatible ones (`POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`), the
//! resuming of a streamed answer (`GET /v1/chat/completions/{completionId}/stream`) and
//! the registry's own (`GET {base}`, `GET {base}/{name}`, `POST {base}/{name}/infer`,
//! `GET /api/v1/agents[/{name}]`).

use bytes::Buf;
use futures::Stream;
use virtual_llm_core::agent::AgentView;
use virtual_llm_core::openai::parse_request_timeout;
use virtual_llm_core::protocol::Endpoint;
use virtual_llm_core::usage::UsageReport;
use virtual_llm_core::{
    CompletionLog, Error, Gateway, InferRequest, LlmKind, LlmName, LlmView, Model, Reply, Role,
};
use warp::reply::Response;

use crate::access::AccessLog;
use crate::error::respond;
use crate::extract::principal;
use crate::openapi::{
    ChatCompletionRequest, CompletionRequest, E400, E401, E403, E404, E413, E415, E429, E502, E503,
    E504, EmbeddingRequest, InferBody, NameParam,
};
use crate::server::CloseConnection;
use crate::{body, reply, stream};

/// The most rows one page of `GET {base}` holds: a larger `limit` is cut to it.
pub(crate) const MAX_PAGE: usize = 1000;
/// The rows of a page of `GET {base}` when the request names an `after` but no
/// `limit`.
pub(crate) const DEFAULT_PAGE: usize = 100;

/// The query of `GET {base}`. With neither parameter, the answer is every row as one
/// array (the v1 answer); with either, one page and the cursor of the next.
#[derive(Debug, Default, PartialEq, Eq, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Most rows in the page: 1 to 1000 (larger is cut to 1000). Default 100.
    #[param(minimum = 1, example = 100)]
    limit: Option<usize>,
    /// The page starts after this name: the `next` of the previous page.
    #[param(value_type = Option<virtual_llm_core::LlmName>)]
    after: Option<String>,
}

impl ListParams {
    /// The query string's `limit` and `after` (other parameters are ignored, as v1
    /// ignored every one); 400 for a `limit` that is not a number of at least 1.
    fn parse(query: &str) -> Result<Self, Error> {
        let mut params = ListParams::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| Error::invalid(format!("the {key} parameter is not UTF-8")))?;
            match key {
                "limit" => {
                    let limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| Error::invalid("limit is a number of rows, at least 1"))?;
                    params.limit = Some(limit);
                }
                "after" => params.after = Some(value.into_owned()),
                _ => {}
            }
        }
        Ok(params)
    }
}

/// A page of the registry: its rows, ordered by name, and the cursor of the next.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LlmPage {
    /// At most `limit` rows, after the `after` of the request.
    llms: Vec<LlmView>,
    /// The `after` of the next page; `null` on the last page.
    #[schema(value_type = Option<virtual_llm_core::LlmName>)]
    next: Option<String>,
}

/// The answer of `GET {base}`: every row (no paging parameter: the v1 answer), or a
/// page.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(crate) enum Listing {
    /// Every row, ordered by name.
    All(Vec<LlmView>),
    /// One page.
    Page(LlmPage),
}

/// `GET {base}`: the registry rows the caller may see; every row, or a page of them
/// with `limit` / `after`.
#[utoipa::path(get, path = "/api/v1/llms", tag = "registry", params(ListParams),
    responses((status = 200, description = "Without `limit` and `after`: every row, ordered by name. With either: a page of at most `limit` rows (at most 1000) after `after`, and in `next` the `after` of the next page (`null` on the last)", body = Listing), E400, E401, E403))]
pub(crate) async fn list(gw: Gateway, auth: Option<String>, query: String) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let params = ListParams::parse(&query)?;
            if params == ListParams::default() {
                return Ok(reply::json(200, &Listing::All(gw.list(&who).await?)));
            }
            let after = params.after.as_deref().map(LlmName::parse).transpose()?;
            let limit = params.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
            let (llms, next) = gw.list_page(&who, after.as_ref(), limit).await?;
            let next = next.map(|n| n.to_string());
            Ok(reply::json(200, &Listing::Page(LlmPage { llms, next })))
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

/// `DELETE {base}/{name...}`: removes a row, whoever owns it (admins only).
#[utoipa::path(delete, path = "/api/v1/llms/{name}", tag = "registry", params(NameParam),
    responses((status = 200, description = "The row as it was before it was removed", body = LlmView), E400, E401, E403, E404))]
pub(crate) async fn delete(name: String, gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.evict(&who, &name).await?))
        }
        .await,
    )
}

/// `GET /api/v1/usage`: requests and tokens per principal and LLM on this replica
/// (SPEC §16); an admin's answer has everyone's rows, anyone else's its own.
#[utoipa::path(get, path = "/api/v1/usage", tag = "operations",
    responses((status = 200, description = "Requests and tokens per principal and LLM, ordered by principal then LLM", body = UsageReport), E401))]
pub(crate) async fn usage(gw: Gateway, auth: Option<String>) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            Ok(reply::json(200, &gw.usage(&who)))
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

/// The request of an inference route, as warp hands it over: the gateway and its
/// completion log, the principal's `Authorization`, the client's `x-request-timeout`,
/// the connection's close handle, the body.
pub(crate) type InferArgs<S> = (
    Gateway,
    CompletionLog,
    Option<String>,
    Option<String>,
    Option<CloseConnection>,
    S,
);

/// `POST {base}/{name...}/infer`: a chat completion for the named LLM.
#[utoipa::path(post, path = "/api/v1/llms/{name}/infer", tag = "openai", params(NameParam),
    request_body = InferBody,
    responses((status = 200, description = "The model's answer as it gave it, or with `stream: true` server-sent events of chunks (each with its `id:`, 0, 1, 2…) ending `data: [DONE]`",
        headers(("x-completion-id" = String, description = "A streamed answer's id, to resume it at `GET /v1/chat/completions/{completionId}/stream` (absent when the gateway keeps none)")),
        content((Object = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))), E400, E401, E403, E404, E413, E415, E429, E502, E503, E504))]
pub(crate) async fn named_infer<S, B>(name: String, args: InferArgs<S>) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(Target::Named(name), args).await
}

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
    responses((status = 200, description = "The model's answer as it gave it, or with `stream: true` server-sent events of chunks (each with its `id:`, 0, 1, 2…) ending `data: [DONE]`",
        headers(("x-completion-id" = String, description = "A streamed answer's id, to resume it at `GET /v1/chat/completions/{completionId}/stream` (absent when the gateway keeps none)")),
        content((Object = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))), E400, E401, E403, E404, E413, E415, E429, E502, E503, E504))]
pub(crate) async fn chat_completions<S, B>(args: InferArgs<S>) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(Target::Body(Endpoint::ChatCompletions), args).await
}

/// `POST /v1/completions`.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses((status = 200, description = "The model's answer as it gave it, or with `stream: true` server-sent events of chunks (each with its `id:`, 0, 1, 2…) ending `data: [DONE]`",
        headers(("x-completion-id" = String, description = "A streamed answer's id, to resume it at `GET /v1/chat/completions/{completionId}/stream` (absent when the gateway keeps none)")),
        content((Object = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))), E400, E401, E403, E404, E413, E415, E429, E502, E503, E504))]
pub(crate) async fn completions<S, B>(args: InferArgs<S>) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(Target::Body(Endpoint::Completions), args).await
}

/// `POST /v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequest,
    responses((status = 200, description = "The model's embeddings as it gave them (never streamed: `stream: true` is 400)",
        content((Object = "application/json"))), E400, E401, E403, E404, E413, E415, E429, E502, E503, E504))]
pub(crate) async fn embeddings<S, B>(args: InferArgs<S>) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    infer(Target::Body(Endpoint::Embeddings), args).await
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
/// answer, or its stream, kept in the completion log for its client to resume. The
/// request's `timeout` is the client's `x-request-timeout`; `close` is the
/// connection's, if any, for a stream that fails midway.
pub(crate) async fn infer<S, B>(
    target: Target,
    (gw, completions, auth, timeout, close, body): InferArgs<S>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut log = AccessLog::start(match &target {
        Target::Named(_) => "infer",
        Target::Body(endpoint) => endpoint.as_str(),
    });
    let answer = async {
        let who = principal(&gw, auth.as_deref()).await?;
        log.principal(&who.id);
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
        log.model(&request.llm);
        Ok((gw.infer(&who, request).await?, who))
    }
    .await;
    match answer {
        Ok((Reply::Stream(chunks), who)) => {
            log.streaming(200);
            let (id, reader) = completions.start(&who.id, chunks);
            stream::chunk_stream(reader, id.as_ref(), close, Some(log))
        }
        Ok((Reply::Complete(completion), _)) => {
            let response = reply::completion(&completion);
            finish(log, response)
        }
        Err(e) => finish(log, respond(Err(e))),
    }
}

/// Writes the access log line of a whole `response`, and returns it.
fn finish(log: AccessLog, response: Response) -> Response {
    let bytes = hyper::body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    log.finish(response.status().as_u16(), bytes);
    response
}

/// The query of `GET /v1/chat/completions/{completionId}/stream`.
#[derive(Debug, Default, PartialEq, Eq, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ResumeParams {
    /// The `seq` (the SSE `id:`) of the last chunk the client has: the answer goes on
    /// from the next. Without it (and without `Last-Event-ID`), from the first chunk.
    #[param(minimum = 0, example = 41)]
    starting_after: Option<u64>,
}

impl ResumeParams {
    /// The query's `starting_after`, else the `Last-Event-ID` header's number; 400 for
    /// either that is not a chunk number (a whole number from 0).
    fn parse(query: &str, last_event_id: Option<&str>) -> Result<Self, Error> {
        let seq = |value: &str, what: &str| {
            value.trim().parse::<u64>().map_err(|_| {
                Error::invalid(format!(
                    "{what} is the number of a chunk (its id: a whole number from 0)"
                ))
            })
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "starting_after" {
                let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
                return Ok(ResumeParams {
                    starting_after: Some(seq(&value, "starting_after")?),
                });
            }
        }
        Ok(ResumeParams {
            starting_after: last_event_id
                .map(|id| seq(id, "Last-Event-ID"))
                .transpose()?,
        })
    }
}

/// `GET /v1/chat/completions/{completionId}/stream`: the rest of a streamed answer
/// (SPEC §15), for the principal that asked for it, while it runs and for
/// `clientResumeWindow` after it ended.
#[utoipa::path(get, path = "/v1/chat/completions/{completionId}/stream", tag = "openai",
    params(("completionId" = String, Path, description = "The `x-completion-id` of the streamed answer", example = "cmpl_3f2a9c0d1e4b5a6978c1d2e3f4a5b6c7"), ResumeParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "The last chunk's `id:` the client has, as an `EventSource` sends it; `starting_after` wins over it")),
    responses((status = 200, description = "Server-sent events of the chunks after `starting_after`, each with its `id:`, as the answer went on (following it while it runs), then `data: [DONE]`, or the `event: error` it ended with",
        content((crate::openapi::ServerSentEvent = "text/event-stream"))),
        E400, E401, E403,
        (status = 404, description = "No streamed answer of that id to resume: unknown, expired, outgrown, or another principal's", body = virtual_llm_core::protocol::ErrorBody)))]
pub(crate) async fn resume(
    id: String,
    completions: CompletionLog,
    gw: Gateway,
    auth: Option<String>,
    query: String,
    last_event_id: Option<String>,
    close: Option<CloseConnection>,
) -> Response {
    let mut log = AccessLog::start("resume");
    let reader = async {
        let who = principal(&gw, auth.as_deref()).await?;
        log.principal(&who.id);
        who.require(Role::Client)?;
        let params = ResumeParams::parse(&query, last_event_id.as_deref())?;
        completions.read(&who.id, &id, params.starting_after)
    }
    .await;
    match reader {
        Ok(reader) => {
            log.streaming(200);
            stream::chunk_stream(reader, None, close, Some(log))
        }
        Err(e) => finish(log, respond(Err(e))),
    }
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
