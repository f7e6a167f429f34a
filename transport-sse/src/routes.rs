//! The gateway's HTTP routes as warp filters, over a core [`Gateway`].
//!
//! Every route authenticates through the gateway's `Authenticator`, reads its body
//! under the configured limit, calls the core, and answers with the core's statuses.
//! The handlers hold no lifecycle rule of their own: they decode, call, encode.
//!
//! | route | handler |
//! |---|---|
//! | `POST {base}/_provider-register` | [`Gateway::register`] |
//! | `GET {base}/_provider-stream` | [`Gateway::bind`], then the SSE control channel |
//! | `POST {base}/_provider-heartbeat` | [`Gateway::heartbeat`] |
//! | `POST {base}/_provider-task/{taskId}/result` | [`Gateway::deliver`], JSON or NDJSON |
//! | `GET {base}` · `GET {base}/{name}` | [`Gateway::list`] · [`Gateway::get`] |
//! | `POST {base}/{name}/infer` | [`Gateway::infer`] |
//! | `POST /v1/chat/completions` · `GET /v1/models` | the OpenAI-compatible pair |

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Buf;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use virtual_llm_core::protocol::{
    GatewayFrame, HeartbeatRequest, PROTOCOL_HEADER, PROTOCOL_VERSION, RegisterRequest, TaskResult,
    negotiate,
};
use virtual_llm_core::{Error, Gateway, InferRequest, Principal, Reply, SessionId, TaskId};
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::sse::Event;
use warp::{Filter, Rejection};

use crate::{body, reply};

/// The header that names the publisher's session on the stream and result routes.
pub const SESSION_HEADER: &str = "x-provider-session";

/// Every route of the SPEC §5 table except the WebSocket one, under the gateway's
/// configured base path, with OpenAI-shaped 404/405 answers for anything else.
///
/// ```no_run
/// # async fn run(gateway: virtual_llm_core::Gateway) {
/// let routes = virtual_llm_sse::routes(gateway);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
/// virtual_llm_sse::serve(listener, routes, std::future::pending(), std::time::Duration::from_secs(10)).await;
/// # }
/// ```
pub fn routes(gateway: Gateway) -> BoxedFilter<(Response,)> {
    api_routes(gateway).recover(rejection).unify().boxed()
}

/// The routes with `extra` routes mounted beside them (e.g. the WebSocket route of
/// `virtual-llm-ws`), and the OpenAI-shaped 404/405 for anything neither matches.
pub fn routes_with(gateway: Gateway, extra: BoxedFilter<(Response,)>) -> BoxedFilter<(Response,)> {
    extra
        .or(api_routes(gateway))
        .unify()
        .recover(rejection)
        .unify()
        .boxed()
}

/// The same routes without the final 404/405 answer, to combine with an embedder's own
/// filters (`a.or(b)`), then `.recover(...)` once at the end.
pub fn api_routes(gateway: Gateway) -> BoxedFilter<(Response,)> {
    let base = base_path(&gateway.config().base_path);
    let gw = warp::any().map(move || gateway.clone());
    let auth = warp::header::optional::<String>("authorization");
    let session = warp::header::optional::<String>(SESSION_HEADER);
    let content_type = warp::header::optional::<String>("content-type");

    let register = base
        .clone()
        .and(warp::path!("_provider-register"))
        .and(warp::post())
        .and(gw.clone())
        .and(auth)
        .and(warp::body::stream())
        .then(register);
    let stream = base
        .clone()
        .and(warp::path!("_provider-stream"))
        .and(warp::get())
        .and(gw.clone())
        .and(auth)
        .and(session)
        .and(warp::header::optional::<String>(PROTOCOL_HEADER))
        .then(control_stream);
    let heartbeat = base
        .clone()
        .and(warp::path!("_provider-heartbeat"))
        .and(warp::post())
        .and(gw.clone())
        .and(auth)
        .and(warp::body::stream())
        .then(heartbeat);
    let result = base
        .clone()
        .and(warp::path!("_provider-task" / String / "result"))
        .and(warp::post())
        .and(gw.clone())
        .and(auth)
        .and(session)
        .and(content_type)
        .and(warp::body::stream())
        .then(result);
    let list = base
        .clone()
        .and(warp::path::end())
        .and(warp::get())
        .and(gw.clone())
        .and(auth)
        .then(list);
    let get = base
        .clone()
        .and(warp::path!(String))
        .and(warp::get())
        .and(gw.clone())
        .and(auth)
        .then(get);
    let infer_route = base
        .and(warp::path!(String / "infer"))
        .and(warp::post())
        .and(gw.clone())
        .and(auth)
        .and(warp::body::stream())
        .then(|name: String, gw, auth, body| infer(Some(name), gw, auth, body));
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(gw.clone())
        .and(auth)
        .and(warp::body::stream())
        .then(|gw, auth, body| infer(None, gw, auth, body));
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(gw)
        .and(auth)
        .then(models);

    register
        .or(stream)
        .unify()
        .or(heartbeat)
        .unify()
        .or(result)
        .unify()
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(infer_route)
        .unify()
        .or(chat)
        .unify()
        .or(models)
        .unify()
        .boxed()
}

/// `/api/v1/llms` as a filter matching those segments.
fn base_path(base: &str) -> BoxedFilter<()> {
    base.split('/')
        .filter(|s| !s.is_empty())
        .fold(warp::any().boxed(), |filter, segment| {
            filter.and(warp::path(segment.to_owned())).boxed()
        })
}

/// Anything no route matched: OpenAI-shaped 404 or 405; or a route that matched but
/// whose header could not be read (not visible ASCII): 401 for `Authorization`, which
/// holds no token we issued, else 400. Checked first: only a route whose path and
/// method matched reads headers.
async fn rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        if header.name().eq_ignore_ascii_case("authorization") {
            Error::Unauthenticated
        } else {
            Error::invalid(format!("the {} header is not valid", header.name()))
        }
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        Error::MethodNotAllowed
    } else {
        Error::NoRoute {
            what: "this path".to_owned(),
        }
    };
    Ok(reply::error(&error))
}

async fn principal(gw: &Gateway, authorization: Option<String>) -> Result<Principal, Error> {
    let token = authorization
        .as_deref()
        .and_then(virtual_llm_core::bearer_token);
    gw.authenticate(token).await
}

fn session_id(header: Option<String>) -> Result<SessionId, Error> {
    let header =
        header.ok_or_else(|| Error::invalid(format!("the {SESSION_HEADER} header is required")))?;
    SessionId::parse(&header)
}

async fn register<S, B>(gw: Gateway, auth: Option<String>, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let request: RegisterRequest = body::json(&bytes)?;
            Ok(reply::json(200, &gw.register(&who, request).await?))
        }
        .await,
    )
}

async fn heartbeat<S, B>(gw: Gateway, auth: Option<String>, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let request: HeartbeatRequest = body::json(&bytes)?;
            Ok(reply::json(
                200,
                &gw.heartbeat(&who, &request.provider_session_id).await?,
            ))
        }
        .await,
    )
}

/// The SSE control channel: `hello`, then `task`, `cancel` and `closing` events as the
/// core sends them, with keep-alive comments. The response body owns the binding, so
/// the moment the connection closes, the session unbinds.
async fn control_stream(
    gw: Gateway,
    auth: Option<String>,
    session: Option<String>,
    protocol: Option<String>,
) -> Response {
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            let session = session_id(session)?;
            let requested = match protocol {
                Some(text) => Some(text.trim().parse::<u32>().map_err(|_| {
                    Error::invalid(format!("the {PROTOCOL_HEADER} header is a version number"))
                })?),
                None => None,
            };
            let version = negotiate(requested).ok_or(Error::UnsupportedProtocol {
                version: requested.unwrap_or(1),
                supported: PROTOCOL_VERSION,
            })?;
            let (tx, rx) = mpsc::channel::<Box<GatewayFrame>>(gw.config().channel_buffer);
            let binding = gw.bind(&who, &session, Arc::new(tx)).await?;
            let hello = GatewayFrame::Hello(gw.hello(&session, version));
            let first = futures::stream::once(async move { Some(hello) });
            let rest = futures::stream::unfold((rx, binding), |(mut rx, binding)| async move {
                rx.recv().await.map(|frame| (Some(*frame), (rx, binding)))
            });
            // After a `closing` frame the stream ends: the publisher reconnects.
            let frames = first.chain(rest).scan(false, |closed, frame| {
                let next = if *closed { None } else { frame };
                if let Some(GatewayFrame::Closing(_)) = &next {
                    *closed = true;
                }
                futures::future::ready(next)
            });
            let events = frames.filter_map(|frame| async move {
                match frame.payload_json() {
                    Ok(data) => Some(Ok::<_, Infallible>(
                        Event::default().event(frame.event_name()).data(data),
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, "could not encode a frame");
                        None
                    }
                }
            });
            let keep_alive = warp::sse::keep_alive()
                .interval(gw.config().keepalive)
                .text("ping");
            Ok(reply::event_stream(warp::sse::reply(
                keep_alive.stream(events),
            )))
        }
        .await,
    )
}

/// One result as JSON, or many as NDJSON (`application/x-ndjson`), each delivered as
/// it arrives: a slow client makes this request wait, and only this one.
async fn result<S, B>(
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
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            let session = session_id(session)?;
            let task = TaskId::parse(&task)?;
            let limit = gw.config().max_body_bytes;
            let ndjson = content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/x-ndjson"));
            if !ndjson {
                let bytes = body::read(body, limit).await?;
                let result: TaskResult = body::json(&bytes)?;
                gw.deliver(&who, &session, &task, result).await?;
                return Ok(reply::no_content());
            }
            let mut lines = body::Lines::new(Box::pin(body), limit);
            while let Some(line) = lines.next().await {
                let result: TaskResult = body::json(&line?)?;
                gw.deliver(&who, &session, &task, result).await?;
            }
            Ok(reply::no_content())
        }
        .await,
    )
}

async fn list(gw: Gateway, auth: Option<String>) -> Response {
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            Ok(reply::json(200, &gw.list(&who).await?))
        }
        .await,
    )
}

async fn get(name: String, gw: Gateway, auth: Option<String>) -> Response {
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            Ok(reply::json(200, &gw.get(&who, &name).await?))
        }
        .await,
    )
}

async fn infer<S, B>(name: Option<String>, gw: Gateway, auth: Option<String>, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            let bytes = body::read(body, gw.config().max_body_bytes).await?;
            let value: Value = body::json(&bytes)?;
            let request = match name {
                Some(name) => InferRequest::for_llm(&name, value)?,
                None => InferRequest::from_chat_body(value)?,
            };
            Ok(match gw.infer(&who, request).await? {
                Reply::Complete(c) => reply::json(c.status, &c.body),
                Reply::Stream(chunks) => reply::chunk_stream(chunks),
            })
        }
        .await,
    )
}

async fn models(gw: Gateway, auth: Option<String>) -> Response {
    reply::respond(
        async {
            let who = principal(&gw, auth).await?;
            let data: Vec<Value> = gw
                .active_models(&who)
                .await?
                .into_iter()
                .map(|r| {
                    json!({
                        "id": r.name,
                        "object": "model",
                        "created": r.created_at.as_millis() / 1000,
                        "owned_by": match r.kind {
                            virtual_llm_core::LlmKind::Public => "public",
                            virtual_llm_core::LlmKind::Virtual => "virtual",
                        },
                    })
                })
                .collect();
            Ok(reply::json(200, &json!({ "object": "list", "data": data })))
        }
        .await,
    )
}
