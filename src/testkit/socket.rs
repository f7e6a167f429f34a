//! Raw access for the cases a `Wire` cannot express (ws.rs, hostile.rs, security.rs):
//! a bearer header for a principal, and a WebSocket to the gateway's `/_provider-ws`
//! that sends and reads JSON frames.

use futures::{SinkExt, StreamExt};
use reqwest::header::HeaderValue;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::gateway::TestGateway;
use super::support::token;

/// `Authorization: Bearer <token>` of the test principal `who`.
pub fn auth(who: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {}", token(who))).unwrap()
}

/// A client's WebSocket to the gateway.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The gateway's WebSocket route, `ws://…/_provider-ws`.
pub fn ws_url(gw: &TestGateway) -> String {
    format!(
        "{}{}/_provider-ws",
        gw.publisher_url.replace("http://", "ws://"),
        gw.gateway.config().base_path
    )
}

/// A raw socket to the gateway, as `who`.
pub async fn socket(gw: &TestGateway, who: &str) -> Socket {
    let mut request = ws_url(gw).into_client_request().unwrap();
    request.headers_mut().insert("authorization", auth(who));
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// Sends `frame` as a text frame.
pub async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next text frame as JSON; `None` once the socket closed.
pub async fn next(socket: &mut Socket) -> Option<Value> {
    loop {
        match socket.next().await? {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}
