//! [`Transport`]: what the transport conformance suite needs of a transport — a
//! publisher's wire to a gateway — with the two bundled ones, [`SseTransport`] and
//! [`WsTransport`].

use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::Gateway;
use crate::publisher::Wire;

/// A transport under test: the gateway's side (its control-channel route) and the
/// publisher's (its wire). A third transport implements this to run the transport
/// conformance suite.
pub trait Transport: Send + Sync {
    /// A short name (`sse`, `ws`), for messages.
    fn name(&self) -> &'static str;

    /// The publisher's wire to the gateway at `url`, with a bearer token.
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire>;

    /// The gateway's control-channel route for this transport, mounted next to the
    /// HTTP surface with [`routes`](crate::http::routes).
    fn route(&self, gateway: Gateway) -> BoxedFilter<(Response,)>;
}

/// The SSE transport: `SseWire`, results posted as NDJSON.
pub struct SseTransport;

impl Transport for SseTransport {
    fn name(&self) -> &'static str {
        "sse"
    }

    fn route(&self, gateway: Gateway) -> BoxedFilter<(Response,)> {
        crate::sse::route(gateway)
    }

    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(crate::sse::SseWire::new(url, token).unwrap())
    }
}

/// The WebSocket transport: `WsWire`, everything on one socket.
pub struct WsTransport;

impl Transport for WsTransport {
    fn name(&self) -> &'static str {
        "ws"
    }

    fn route(&self, gateway: Gateway) -> BoxedFilter<(Response,)> {
        crate::ws::route(gateway)
    }

    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(crate::ws::WsWire::new(url, token).unwrap())
    }
}
