//! Hand-driven publisher connections, for the fault tests: register and open the
//! control channel over either transport, then read frames and answer tasks by hand —
//! or stop reading altogether. The socket's receive buffer can be made small, so that a
//! publisher that stops reading fills it after a few frames rather than megabytes.

use std::sync::Arc;

use super::gateway::TestGateway;
use super::support::{connect_with_recv_buffer, token};
use super::transport::{SseTransport, Transport, WsTransport};
use crate::protocol::{GatewayFrame, PublisherFrame, TaskResult};
use crate::{SessionId, TaskId};
use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyDataStream, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A publisher's control channel, driven by hand.
#[async_trait]
pub trait RawChannel: Send {
    /// The session the gateway knows this publisher by.
    fn session(&self) -> &SessionId;
    /// The next frame from the gateway (`hello` and `registered` skipped); `None` once
    /// the channel closed.
    async fn next_frame(&mut self) -> Option<GatewayFrame>;
    /// Sends one result for `task` the way this transport does (SSE: a POST with the
    /// session header; WebSocket: a frame on this socket); the gateway's status, 204
    /// when taken (always 204 on a socket, which has no per-frame answer).
    async fn send_result(&mut self, task: &TaskId, result: TaskResult) -> u16;
}

/// A transport the fault tests can also drive by hand.
#[async_trait]
pub trait RawTransport: Transport {
    /// Registers `names` as `who` (resuming `session` if given), opens the control
    /// channel and waits until it is bound. `recv_buffer` sets the socket's receive
    /// buffer (`SO_RCVBUF`) before it connects.
    async fn raw(
        &self,
        gw: &TestGateway,
        who: &str,
        session: Option<&SessionId>,
        names: &[&str],
        recv_buffer: Option<u32>,
    ) -> Box<dyn RawChannel>;
}

fn register_body(session: Option<&SessionId>, names: &[&str]) -> Value {
    let llms: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "type": "openai", "model": format!("{n}-model")}))
        .collect();
    json!({"providerSessionId": session, "llms": llms})
}

async fn connect(gw: &TestGateway, recv_buffer: Option<u32>) -> TcpStream {
    connect_with_recv_buffer(gw.publisher_addr, recv_buffer).await
}

struct RawSse {
    gw: TestGateway,
    who: String,
    session: SessionId,
    frames: BoxStream<'static, GatewayFrame>,
}

#[async_trait]
impl RawTransport for SseTransport {
    async fn raw(
        &self,
        gw: &TestGateway,
        who: &str,
        session: Option<&SessionId>,
        names: &[&str],
        recv_buffer: Option<u32>,
    ) -> Box<dyn RawChannel> {
        let answer = gw.register_raw(who, register_body(session, names)).await;
        let session = SessionId::parse(answer["providerSessionId"].as_str().unwrap()).unwrap();
        let stream = connect(gw, recv_buffer).await;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get(format!(
            "{}/_provider-stream",
            gw.gateway.config().base_path
        ))
        .header("host", gw.publisher_addr.to_string())
        .header("authorization", format!("Bearer {}", token(who)))
        .header(crate::protocol::SESSION_HEADER, session.as_str())
        .header("accept", "text/event-stream")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let frames = BodyDataStream::new(response.into_body())
            .eventsource()
            .filter_map(|event| async move {
                let event = event.ok()?;
                let mut payload: Value = serde_json::from_str(&event.data).unwrap();
                payload["type"] = Value::from(event.event);
                Some(serde_json::from_value::<GatewayFrame>(payload).unwrap())
            })
            .boxed();
        let mut raw = RawSse {
            gw: gw.clone(),
            who: who.to_owned(),
            session,
            frames,
        };
        // The stream opens with `hello`, sent once the channel is bound.
        match raw.frames.next().await {
            Some(GatewayFrame::Hello(_)) => {}
            other => panic!("expected hello, got {other:?}"),
        }
        Box::new(raw)
    }
}

#[async_trait]
impl RawChannel for RawSse {
    fn session(&self) -> &SessionId {
        &self.session
    }

    async fn next_frame(&mut self) -> Option<GatewayFrame> {
        self.frames.next().await
    }

    async fn send_result(&mut self, task: &TaskId, result: TaskResult) -> u16 {
        self.gw
            .post_result(&self.who, self.session.as_str(), task, &result)
            .await
    }
}

type WsSocket = tokio_tungstenite::WebSocketStream<TcpStream>;

struct RawWs {
    session: SessionId,
    socket: WsSocket,
}

#[async_trait]
impl RawTransport for WsTransport {
    async fn raw(
        &self,
        gw: &TestGateway,
        who: &str,
        session: Option<&SessionId>,
        names: &[&str],
        recv_buffer: Option<u32>,
    ) -> Box<dyn RawChannel> {
        let url = format!(
            "ws://{}{}/_provider-ws",
            gw.publisher_addr,
            gw.gateway.config().base_path
        );
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token(who)).parse().unwrap(),
        );
        let stream = connect(gw, recv_buffer).await;
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        let mut register = register_body(session, names);
        register["type"] = Value::from("register");
        socket
            .send(Message::text(register.to_string()))
            .await
            .unwrap();
        let mut raw = RawWs {
            session: SessionId::generate(),
            socket,
        };
        match raw.read().await {
            Some(GatewayFrame::Registered(answer)) => raw.session = answer.provider_session_id,
            other => panic!("expected registered, got {other:?}"),
        }
        // `registered` goes out before the bind; wait until the channel is bound.
        for _ in 0..500 {
            if gw.publisher_gateway.is_bound(&raw.session) {
                return Box::new(raw);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the socket's session was never bound");
    }
}

impl RawWs {
    async fn read(&mut self) -> Option<GatewayFrame> {
        loop {
            match self.socket.next().await? {
                Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

#[async_trait]
impl RawChannel for RawWs {
    fn session(&self) -> &SessionId {
        &self.session
    }

    async fn next_frame(&mut self) -> Option<GatewayFrame> {
        self.read().await
    }

    async fn send_result(&mut self, task: &TaskId, result: TaskResult) -> u16 {
        let frame = PublisherFrame::for_result(task.clone(), result);
        self.socket
            .send(Message::text(serde_json::to_string(&frame).unwrap()))
            .await
            .unwrap();
        204
    }
}

/// Both transports, for tests that loop over them.
pub fn transports() -> [Arc<dyn RawTransport>; 2] {
    [Arc::new(SseTransport), Arc::new(WsTransport)]
}
