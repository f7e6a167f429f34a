//! The gateway side: the warp filter at `{base}/_provider-ws`.
//!
//! The caller is authenticated before the upgrade (a bad token is a plain 401, answered
//! by `virtual-llm-http`'s `error_response` like every other refusal). The
//! upgrade itself is done here rather than with `warp::ws()`, which cannot set
//! tungstenite's buffer sizes; the socket then belongs to a
//! [`session`](crate::session) loop.

use std::sync::Arc;

use http::StatusCode;
use http::header::{
    CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use virtual_llm_core::{Error, Gateway, Role};
use virtual_llm_http::{authorization, base_path, error_response, principal};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::config::{CREDITS_HEADER, gateway_socket_config};

/// The WebSocket control channel, `GET {base}/_provider-ws` under the gateway's
/// configured base path. Mount it with `virtual-llm-http`'s routes:
///
/// ```no_run
/// # fn run(gateway: virtual_llm_core::Gateway) {
/// let routes = virtual_llm_http::routes(gateway.clone(), [virtual_llm_ws::route(gateway)]);
/// # }
/// ```
pub fn route(gateway: Gateway) -> BoxedFilter<(Response,)> {
    let base = base_path(&gateway.config().base_path);
    let gateway = Arc::new(gateway);
    base.and(warp::path!("_provider-ws"))
        .and(warp::get())
        .and(warp::any().map(move || gateway.clone()))
        .and(authorization())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .then(upgrade)
        .boxed()
}

async fn upgrade(
    gateway: Arc<Gateway>,
    authorization: Option<String>,
    headers: HeaderMap,
    on_upgrade: Option<OnUpgrade>,
) -> Response {
    let principal = match principal(&gateway, authorization.as_deref())
        .await
        .and_then(|p| p.require(Role::Publisher).map(|()| p))
    {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let is_upgrade = headers
        .get(CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && headers
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && headers
            .get("sec-websocket-version")
            .is_some_and(|v| v == "13");
    let (Some(key), Some(on_upgrade), true) =
        (headers.get(SEC_WEBSOCKET_KEY), on_upgrade, is_upgrade)
    else {
        return error_response(&Error::invalid(
            "this route takes a WebSocket upgrade (version 13)",
        ));
    };
    let accept = derive_accept_key(key.as_bytes());
    let config = gateway_socket_config(gateway.config().max_body_bytes);
    // Per-task flow control for a publisher that asks for it: the window is the
    // task's buffer, so a publisher within its credits never overflows it.
    let window = headers
        .contains_key(CREDITS_HEADER)
        .then(|| gateway.config().task_buffer);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    WsRole::Server,
                    Some(config),
                )
                .await;
                crate::session::run((*gateway).clone(), principal, socket, window).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(window) = window {
        h.insert(CREDITS_HEADER, HeaderValue::from(window));
    }
    response
}
