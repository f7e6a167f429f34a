//! The gateway's active agents as MCP tools (SPEC §13), over Streamable HTTP at
//! `/mcp`, with the official Rust MCP SDK ([`rmcp`]). Feature `mcp`.
//!
//! Each active agent is a tool named `agent-<name>`, described by the agent's
//! description, taking `{"message": "…"}`; calling it sends the message to the agent
//! as a one-message chat through [`Gateway::infer`] (the agent's persona, its model's
//! pool, queue and wake, exactly as on `/v1/chat/completions`) and answers the
//! model's text as the tool's text content. An answer that is not a success (the agent
//! is offline, its queue is full, its model answered an error) is a tool result with
//! `isError` and the error's message: the MCP client's model reads it.
//!
//! The tool list follows the registry: a session's `tools/list` reads it then, and
//! every session whose client said it was initialized is sent
//! `notifications/tools/list_changed` when the set of active agents changes
//! ([`Gateway::registry_changes`], so nothing polls).
//!
//! Every request to `/mcp` authenticates like every other route (a bearer token with
//! the client role; 401 otherwise, before the SDK sees it). The SDK's `Host`
//! allow-list (a guard against DNS rebinding for unauthenticated local servers) is
//! off: the gateway is reached under whatever name its operator gives it, and the
//! token is the guard. Its body limit is the gateway's `max_body_bytes`.
//!
//! The SDK's service is a tower service over `http` types; [`routes`] wraps it in a
//! warp filter, so it is served by the same server loop, on the same port, as the
//! other routes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use bytes::Buf;
use futures::{Stream, StreamExt};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Frame;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, Peer, RoleServer, ServerHandler};
use serde_json::{Value, json};
use virtual_llm_core::agent::AgentView;
use virtual_llm_core::sync::lock;
use virtual_llm_core::{Gateway, InferRequest, LlmStatus, Principal, Reply};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::error::respond;
use crate::extract::{authorization, principal};

/// What ends the MCP surface; see [`routes`].
pub use tokio_util::sync::CancellationToken;

/// The prefix of every agent's tool name.
pub const TOOL_PREFIX: &str = "agent-";

/// The MCP route, `/mcp` (every method the Streamable HTTP transport uses), serving
/// `gateway`'s active agents as tools until `shutdown` is cancelled (cancel it when
/// the gateway shuts down: it ends the sessions' event streams and the task that
/// tells sessions of changes). Combine it with the other routes (`a.or(b)`), before
/// [`recover`](crate::recover). Must be called inside a tokio runtime (it spawns that
/// task).
///
/// ```no_run
/// # async fn run(gateway: virtual_llm_core::Gateway) {
/// let shutdown = virtual_llm_http::mcp::CancellationToken::new();
/// let routes = virtual_llm_http::routes_with(
///     gateway.clone(),
///     [],
///     virtual_llm_http::mcp::routes(gateway, shutdown.clone()),
/// );
/// # }
/// ```
pub fn routes(gateway: Gateway, shutdown: CancellationToken) -> BoxedFilter<(Response,)> {
    let peers = Peers::default();
    tokio::spawn(tell_of_changes(
        gateway.clone(),
        peers.clone(),
        shutdown.clone(),
    ));
    let mut config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    config.max_request_body_bytes = gateway.config().max_body_bytes;
    config.cancellation_token = shutdown;
    let tools = AgentTools {
        gateway: gateway.clone(),
        peers,
    };
    let service: StreamableHttpService<AgentTools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    let gw = warp::any().map(move || gateway.clone());
    warp::path("mcp")
        .and(warp::path::end())
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(gw)
        .and(authorization())
        .and(warp::body::stream())
        .then(
            move |method,
                  path: warp::path::FullPath,
                  query: String,
                  headers,
                  gw: Gateway,
                  auth: Option<String>,
                  body| {
                let service = service.clone();
                async move {
                    let who = match principal(&gw, auth.as_deref()).await {
                        Ok(who) => who,
                        Err(e) => return respond(Err(e)),
                    };
                    let uri = if query.is_empty() {
                        path.as_str().to_owned()
                    } else {
                        format!("{}?{query}", path.as_str())
                    };
                    serve(service, method, &uri, headers, who, body).await
                }
            },
        )
        .boxed()
}

/// One request through the SDK's service: the principal rides in the request's
/// extensions (the SDK hands the handler the request's parts).
async fn serve<S, B>(
    service: StreamableHttpService<AgentTools, LocalSessionManager>,
    method: http::Method,
    uri: &str,
    headers: HeaderMap,
    who: Principal,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send + 'static,
{
    use tower_service::Service as _;
    let body = http_body_util::StreamBody::new(
        body.map(|chunk| chunk.map(|mut b| Frame::data(b.copy_to_bytes(b.remaining())))),
    );
    let mut request = http::Request::new(body);
    *request.method_mut() = method;
    *request.headers_mut() = headers;
    match uri.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return respond(Err(virtual_llm_core::Error::invalid("a bad request uri"))),
    }
    request.extensions_mut().insert(who);
    let mut service = service;
    let response = match service.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    // warp wants a `Sync` body; the stream is only ever polled from one place.
    let events = sync_wrapper::SyncStream::new(body.into_data_stream());
    let mut reply = warp::reply::Reply::into_response(warp::reply::stream(events));
    *reply.status_mut() = parts.status;
    *reply.headers_mut() = parts.headers;
    reply
}

/// The sessions to tell of a change of the tool list: each client that said it was
/// initialized. A closed session is dropped at the next change, or when another starts.
#[derive(Clone, Debug, Default)]
struct Peers(Arc<Mutex<Vec<Peer<RoleServer>>>>);

/// Tells every session when the set of active agents changes, until `shutdown`. The
/// registry is read only while a session is open; changes that come faster than it is
/// read are taken together (the watch keeps only the latest). With no set known (no
/// session was open at the last change), any change is told: a client that is told
/// once too often lists the tools again, nothing worse.
async fn tell_of_changes(gateway: Gateway, peers: Peers, shutdown: CancellationToken) {
    let mut changes = gateway.registry_changes();
    let mut tools: Option<BTreeSet<String>> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let open: Vec<Peer<RoleServer>> = {
            let mut peers = lock(&peers.0);
            peers.retain(|p| !p.is_transport_closed());
            peers.clone()
        };
        if open.is_empty() {
            tools = None;
            continue;
        }
        let now = active_tool_names(&gateway).await;
        if tools.as_ref() == Some(&now) {
            continue;
        }
        tools = Some(now);
        for peer in open {
            if let Err(e) = peer.notify_tool_list_changed().await {
                tracing::debug!(error = %e, "an mcp session was not told of the tool list change");
            }
        }
    }
}

/// The names of the tools of the active agents; empty when the registry cannot be
/// read (the next change reads it again).
async fn active_tool_names(gateway: &Gateway) -> BTreeSet<String> {
    // Every agent, whoever may see it: a session told of a change it cannot see
    // lists its tools again, nothing worse.
    let everyone = Principal::new("mcp", [virtual_llm_core::Role::Admin]);
    match gateway.agents(&everyone).await {
        Ok(agents) => agents
            .iter()
            .filter(|a| a.status == LlmStatus::Active)
            .map(tool_name)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the agents for the mcp tool list failed");
            BTreeSet::new()
        }
    }
}

fn tool_name(agent: &AgentView) -> String {
    format!("{TOOL_PREFIX}{}", agent.name)
}

/// The tool of an agent.
fn tool(agent: &AgentView) -> Tool {
    let schema = json!({
        "type": "object",
        "properties": {
            "message": {
                "type": "string",
                "description": "What to ask the agent.",
            },
        },
        "required": ["message"],
    });
    let description = agent.description.clone().unwrap_or_else(|| {
        format!(
            "Ask the agent {}, which answers through {}",
            agent.name, agent.llm
        )
    });
    let schema = match schema {
        Value::Object(object) => object,
        _ => serde_json::Map::new(),
    };
    Tool::new(tool_name(agent), description, Arc::new(schema))
}

/// The MCP server of one session: the gateway's agents as tools.
#[derive(Clone, Debug)]
struct AgentTools {
    gateway: Gateway,
    peers: Peers,
}

/// The principal the gateway authenticated the request as.
fn caller(extensions: &rmcp::model::Extensions) -> Result<Principal, ErrorData> {
    extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Principal>())
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("the request was not authenticated", None))
}

impl ServerHandler for AgentTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "virtual-llm",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(
            "Each tool is an agent published to this gateway: a persona over a model. \
             Call it with {\"message\": \"...\"}; the answer is the agent's reply.",
        )
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        let mut peers = lock(&self.peers.0);
        peers.retain(|p| !p.is_transport_closed());
        peers.push(context.peer);
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let who = caller(&context.extensions)?;
        let agents = self
            .gateway
            .agents(&who)
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        let tools = agents
            .iter()
            .filter(|a| a.status == LlmStatus::Active)
            .map(tool)
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let who = caller(&context.extensions)?;
        let unknown = || ErrorData::invalid_params(format!("no tool {}", request.name), None);
        let agent = request.name.strip_prefix(TOOL_PREFIX).ok_or_else(unknown)?;
        let view = self
            .gateway
            .agent(&who, agent)
            .await
            .map_err(|_| unknown())?;
        let message = match request.arguments.as_ref().and_then(|a| a.get("message")) {
            Some(Value::String(message)) => message.clone(),
            _ => {
                return Err(ErrorData::invalid_params(
                    "the tool takes {\"message\": string}",
                    None,
                ));
            }
        };
        let body = json!({"messages": [{"role": "user", "content": message}]});
        let request = InferRequest::for_llm(view.name.as_str(), body)
            .map_err(|e| ErrorData::invalid_params(e.to_string(), None))?;
        let result = match self.gateway.infer(&who, request).await {
            Ok(Reply::Complete(c)) if (200..300).contains(&c.status) => {
                let text = c.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                CallToolResult::success(vec![ContentBlock::text(text)])
            }
            Ok(Reply::Complete(c)) => {
                let message = c.json()["error"]["message"]
                    .as_str()
                    .map_or_else(|| c.body.to_string(), str::to_owned);
                CallToolResult::error(vec![ContentBlock::text(format!(
                    "the agent's model answered {}: {message}",
                    c.status
                ))])
            }
            Ok(Reply::Stream(_)) => CallToolResult::error(vec![ContentBlock::text(
                "the agent's model answered with a stream",
            )]),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
        };
        Ok(result.into())
    }
}
