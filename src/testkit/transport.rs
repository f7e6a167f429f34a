//! [`Transport`]: what the transport conformance suite needs of a transport — a
//! publisher's wire to a gateway — with the two bundled ones, [`SseTransport`] and
//! [`WsTransport`].

use std::sync::Arc;

use crate::publisher::Wire;

/// A transport under test: how a publisher reaches a gateway at `url`.
pub trait Transport: Send + Sync {
    /// The publisher's wire to the gateway at `url`, with a bearer token.
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire>;
}

/// The SSE transport: `SseWire`, results posted as NDJSON.
pub struct SseTransport;

impl Transport for SseTransport {
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(crate::sse::SseWire::new(url, token).unwrap())
    }
}

/// The WebSocket transport: `WsWire`, everything on one socket.
pub struct WsTransport;

impl Transport for WsTransport {
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(crate::ws::WsWire::new(url, token).unwrap())
    }
}
