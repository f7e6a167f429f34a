//! The gateway's routes as warp filters over a core [`Gateway`], composed with the
//! control-channel routes the transports supply.
//!
//! Every route authenticates through the gateway's `Authenticator`, reads its body
//! under the configured limit, calls the core, and answers with the core's statuses.
//! The handlers hold no lifecycle rule of their own: they decode, call, encode.
//!
//! | route | handler |
//! |---|---|
//! | `POST {base}/_provider-register` | [`Gateway::register`] |
//! | `POST {base}/_provider-heartbeat` | [`Gateway::heartbeat`] |
//! | `POST {base}/_provider-task/{taskId}/result` | [`Gateway::deliver`], JSON or NDJSON |
//! | `POST {base}/_provider-results` | [`Gateway::deliver_all`] for each task's whole answer, NDJSON |
//! | `GET {base}` · `GET {base}/{name...}` | [`Gateway::list`] (or [`Gateway::list_page`] with `?limit=&after=`) · [`Gateway::get`] |
//! | `DELETE {base}/{name...}` | [`Gateway::evict`] (admins) |
//! | `GET {base}/{poolKey...}/members` | [`Gateway::members`] |
//! | `POST {base}/{name...}/infer` | [`Gateway::infer`] |
//! | `POST /v1/chat/completions` · `/v1/completions` · `/v1/embeddings` | [`Gateway::infer`], routed by `model`; a stream is kept in the [`CompletionLog`] |
//! | `GET /v1/chat/completions/{completionId}/stream` | [`CompletionLog::read`]: the rest of a streamed answer (SPEC §15) |
//! | `GET /v1/models` · `GET /v1/models/{id...}` | the active models and agents, as OpenAI lists them |
//! | `GET /api/v1/agents` · `GET /api/v1/agents/{name...}` | [`Gateway::agents`] · [`Gateway::agent`] |
//! | `GET /api/v1/usage` | [`Gateway::usage`]: requests and tokens per principal and LLM |
//! | `GET /healthz` · `GET /readyz` | alive · ready (not draining, store answers); no token |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of these routes; no token |
//! | `GET /` | the status page: the registry live in a browser; no token |
//!
//! A control channel (`GET {base}/_provider-stream` of `virtual-llm-sse`,
//! `GET {base}/_provider-ws` of `virtual-llm-ws`) is a filter its transport builds; the
//! `channels` given to [`routes`] are tried before the routes above, whose
//! `{base}/{name...}` would otherwise take their paths.
//!
//! A name may contain `/` (SPEC §17), so a route that takes one takes the path's
//! remaining segments (`{name...}`), percent-decoded; a name's last segment is never
//! `infer` or `members`, so `{base}/{name...}/members` and `{base}/{name...}` cannot
//! be confused.

use virtual_llm_core::openai::REQUEST_TIMEOUT_HEADER;
use virtual_llm_core::{CompletionLog, Gateway};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::extract::{authorization, base_path, name_tail, session_header};
use crate::server::CloseConnection;
use crate::{client, error, health, openapi, provider, status};

/// Every route of the gateway: the control `channels` of the transports, the routes of
/// this crate, and the OpenAI-shaped 404/405 for anything none of them matches.
///
/// ```no_run
/// # async fn run(gateway: virtual_llm_core::Gateway) -> std::io::Result<()> {
/// use std::time::Duration;
///
/// // With no transport: publishers cannot connect, but the routes are all there.
/// let routes = virtual_llm_http::routes(gateway, []);
/// let listener = virtual_llm_http::bind(([127, 0, 0, 1], 8080).into())?;
/// virtual_llm_http::serve(listener, routes, std::future::pending(), Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
pub fn routes(
    gateway: Gateway,
    channels: impl IntoIterator<Item = BoxedFilter<(Response,)>>,
) -> BoxedFilter<(Response,)> {
    with_channels(channels, api_routes(gateway))
        .recover(error::recover)
        .unify()
        .boxed()
}

/// [`routes`] with an embedder's own `extra` routes (`/metrics`…) tried first.
pub fn routes_with(
    gateway: Gateway,
    channels: impl IntoIterator<Item = BoxedFilter<(Response,)>>,
    extra: BoxedFilter<(Response,)>,
) -> BoxedFilter<(Response,)> {
    extra
        .or(with_channels(channels, api_routes(gateway)))
        .unify()
        .recover(error::recover)
        .unify()
        .boxed()
}

/// The routes of this crate (client and provider, no control channel) without the
/// final 404/405 answer, to combine with an embedder's own filters and the transports'
/// channels (`a.or(b)`), then [`recover`](crate::recover) once at the end.
///
/// The routes keep the streamed answers for their clients to resume in a
/// [`CompletionLog`] of their own, sized by the gateway's config
/// (`clientResumeWindow`, `clientResumeBytes`, `clientResumeTotalBytes`).
pub fn api_routes(gateway: Gateway) -> BoxedFilter<(Response,)> {
    let base = base_path(&gateway.config().base_path);
    let log = CompletionLog::new(gateway.config());
    let completion_log = warp::any().map(move || log.clone());
    let probes = health::routes(gateway.clone())
        .or(openapi::route(&gateway))
        .unify()
        .or(status::route(&gateway))
        .unify();
    let gw = warp::any().map(move || gateway.clone());
    let content_type = warp::header::optional::<String>("content-type");

    let register = base
        .clone()
        .and(warp::path!("_provider-register"))
        .and(warp::post())
        .and(gw.clone())
        .and(authorization())
        .and(warp::body::stream())
        .then(provider::register);
    let heartbeat = base
        .clone()
        .and(warp::path!("_provider-heartbeat"))
        .and(warp::post())
        .and(gw.clone())
        .and(authorization())
        .and(warp::body::stream())
        .then(provider::heartbeat);
    let result = base
        .clone()
        .and(warp::path!("_provider-task" / String / "result"))
        .and(warp::post())
        .and(gw.clone())
        .and(authorization())
        .and(session_header())
        .and(content_type)
        .and(warp::body::stream())
        .then(provider::result);
    let results = base
        .clone()
        .and(warp::path!("_provider-results"))
        .and(warp::post())
        .and(gw.clone())
        .and(authorization())
        .and(session_header())
        .and(warp::body::stream())
        .then(provider::results);
    let list = base
        .clone()
        .and(warp::path::end())
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .then(client::list);
    let get = base
        .clone()
        .and(name_tail(None))
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .then(client::get);
    let delete = base
        .clone()
        .and(name_tail(None))
        .and(warp::delete())
        .and(gw.clone())
        .and(authorization())
        .then(client::delete);
    let members = base
        .clone()
        .and(name_tail(Some("members")))
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .then(client::members);
    // What every inference route reads, as one tuple (see `client::InferArgs`).
    let infer_args = warp::post()
        .and(gw.clone())
        .and(completion_log.clone())
        .and(authorization())
        .and(warp::header::optional::<String>(REQUEST_TIMEOUT_HEADER))
        .and(warp::ext::optional::<CloseConnection>())
        .and(warp::body::stream())
        .map(|gw, log, auth, timeout, close, body| (gw, log, auth, timeout, close, body));
    let infer = base
        .and(name_tail(Some("infer")))
        .and(infer_args.clone())
        .then(client::named_infer);
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(infer_args.clone())
        .then(client::chat_completions);
    let completions = warp::path!("v1" / "completions")
        .and(infer_args.clone())
        .then(client::completions);
    let resume = warp::path!("v1" / "chat" / "completions" / String / "stream")
        .and(warp::get())
        .and(completion_log)
        .and(gw.clone())
        .and(authorization())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("last-event-id"))
        .and(warp::ext::optional::<CloseConnection>())
        .then(client::resume);
    let embeddings = warp::path!("v1" / "embeddings")
        .and(infer_args)
        .then(client::embeddings);
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .then(client::models);
    let model = warp::path("v1")
        .and(warp::path("models"))
        .and(name_tail(None))
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .then(client::model);
    let agents = warp::path!("api" / "v1" / "agents")
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .then(client::agents);
    let usage = warp::path!("api" / "v1" / "usage")
        .and(warp::get())
        .and(gw.clone())
        .and(authorization())
        .then(client::usage);
    let agent = warp::path("api")
        .and(warp::path("v1"))
        .and(warp::path("agents"))
        .and(name_tail(None))
        .and(warp::get())
        .and(gw)
        .and(authorization())
        .then(client::agent);

    // Tried in this order, in groups each boxed: one `or` chain of every route makes
    // a filter type so deep that type-checking this crate took over ten minutes.
    let provider = register
        .or(heartbeat)
        .unify()
        .or(result)
        .unify()
        .or(results)
        .unify()
        .boxed();
    let registry = list
        .or(members)
        .unify()
        .or(get)
        .unify()
        .or(delete)
        .unify()
        .or(infer)
        .unify()
        .boxed();
    let openai = chat
        .or(resume)
        .unify()
        .or(completions)
        .unify()
        .or(embeddings)
        .unify()
        .or(models)
        .unify()
        .or(model)
        .unify()
        .boxed();
    let api = agents.or(agent).unify().or(usage).unify().boxed();
    provider
        .or(registry)
        .unify()
        .or(openai)
        .unify()
        .or(api)
        .unify()
        .or(probes)
        .unify()
        .boxed()
}

/// `channels`, each tried in turn, then `api`.
fn with_channels(
    channels: impl IntoIterator<Item = BoxedFilter<(Response,)>>,
    api: BoxedFilter<(Response,)>,
) -> BoxedFilter<(Response,)> {
    let mut channels = channels.into_iter();
    let Some(first) = channels.next() else {
        return api;
    };
    channels
        .fold(first, |all, channel| all.or(channel).unify().boxed())
        .or(api)
        .unify()
        .boxed()
}
