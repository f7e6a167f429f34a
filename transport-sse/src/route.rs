//! The gateway's side of the SSE transport: the control channel at
//! `GET {base}/_provider-stream`, a server-sent event stream a publisher holds open.
//!
//! It opens with `hello`, then carries `task`, `cancel` and `closing` events as the
//! core sends them, with `: ping` keep-alive comments between. The response body owns
//! the channel's binding, so the moment the connection closes, the session unbinds.
//!
//! A publisher that stops reading its stream is closed by the server's write timeout
//! (`virtual_llm_http::ServeOptions::write_timeout`, 30 s by default), the SSE
//! counterpart of the WebSocket channel's send timeout: the connection fails, the
//! response body drops, and with it the binding and the frames still queued; the
//! session's tasks fail as for any lost channel. Served by another server than
//! `virtual_llm_http::serve`, the stream relies on that server's write timeout.
//! Everything else a publisher does over HTTP (register, heartbeat, results) is a
//! route of `virtual-llm-http`.

use std::convert::Infallible;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use virtual_llm_core::protocol::{GatewayFrame, PROTOCOL_HEADER, PROTOCOL_VERSION, negotiate};
use virtual_llm_core::{Error, Gateway};
use virtual_llm_http::{
    authorization, base_path, event_stream, principal, respond, session_header, session_id,
};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::sse::Event;

/// The SSE control channel, `GET {base}/_provider-stream` under the gateway's
/// configured base path. Mount it with `virtual-llm-http`'s routes:
///
/// ```no_run
/// # fn run(gateway: virtual_llm_core::Gateway) {
/// let routes = virtual_llm_http::routes(gateway.clone(), [virtual_llm_sse::route(gateway)]);
/// # }
/// ```
pub fn route(gateway: Gateway) -> BoxedFilter<(Response,)> {
    base_path(&gateway.config().base_path)
        .and(warp::path!("_provider-stream"))
        .and(warp::get())
        .and(warp::any().map(move || gateway.clone()))
        .and(authorization())
        .and(session_header())
        .and(warp::header::optional::<String>(PROTOCOL_HEADER))
        .then(control_stream)
        .boxed()
}

/// The protocol version the stream speaks: what the publisher registered with, as
/// its `x-provider-protocol` header says (absent: 1).
fn stream_version(header: Option<&str>) -> Result<u32, Error> {
    let requested = match header {
        Some(text) => Some(text.trim().parse::<u32>().map_err(|_| {
            Error::invalid(format!("the {PROTOCOL_HEADER} header is a version number"))
        })?),
        None => None,
    };
    negotiate(requested).ok_or(Error::UnsupportedProtocol {
        version: requested.unwrap_or(1),
        supported: PROTOCOL_VERSION,
    })
}

/// Binds the session's channel and streams its frames; a refusal (401, 403, 404 for
/// an unknown session) is an error answer before any event.
async fn control_stream(
    gw: Gateway,
    auth: Option<String>,
    session: Option<String>,
    protocol: Option<String>,
) -> Response {
    respond(
        async {
            let who = principal(&gw, auth.as_deref()).await?;
            let session = session_id(session.as_deref())?;
            let version = stream_version(protocol.as_deref())?;
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
            Ok(event_stream(warp::sse::reply(keep_alive.stream(events))))
        }
        .await,
    )
}
