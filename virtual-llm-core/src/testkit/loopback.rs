//! A [`Wire`] that talks to an in-process [`Gateway`]: the whole publisher lifecycle,
//! with no network. For testing providers and the publisher driver.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use tokio::sync::mpsc;

use crate::protocol::{LlmState, RegisterRequest, TaskResult};
use crate::publisher::{Connected, Outbox, Wire, WireError};
use crate::{Gateway, Principal, SessionId, TaskId};

/// Connects a [`Publisher`](crate::Publisher) straight to `gateway` as `principal`.
#[derive(Clone, Debug)]
pub struct LoopbackWire {
    gateway: Gateway,
    principal: Principal,
}

impl LoopbackWire {
    /// A wire into `gateway`, authenticated as `principal`.
    pub fn new(gateway: Gateway, principal: Principal) -> Self {
        LoopbackWire { gateway, principal }
    }
}

#[async_trait]
impl Wire for LoopbackWire {
    async fn connect(&self, request: RegisterRequest) -> Result<Connected, WireError> {
        let answer = self
            .gateway
            .register(&self.principal, request)
            .await
            .map_err(|e| WireError::from(&e))?;
        let session = answer.provider_session_id.clone();
        let (tx, rx) = mpsc::channel(self.gateway.config().channel_buffer);
        let binding = self
            .gateway
            .bind(&self.principal, &session, Arc::new(tx))
            .await
            .map_err(|e| WireError::from(&e))?;
        // The stream owns the binding: when the publisher lets go of the channel, the
        // gateway sees it close, as it would a dropped connection.
        let frames = stream::unfold((rx, binding), |(mut rx, binding)| async move {
            rx.recv().await.map(|frame| (Ok(frame), (rx, binding)))
        });
        let outbox = LoopbackOutbox {
            gateway: self.gateway.clone(),
            principal: self.principal.clone(),
            session,
        };
        Ok(Connected {
            answer,
            frames: frames.boxed(),
            outbox: Arc::new(outbox),
        })
    }
}

struct LoopbackOutbox {
    gateway: Gateway,
    principal: Principal,
    session: SessionId,
}

#[async_trait]
impl Outbox for LoopbackOutbox {
    /// Results go straight to the gateway's tasks.
    async fn delivered(&self) -> Result<(), WireError> {
        Ok(())
    }

    async fn heartbeat(&self, llms: Option<Vec<LlmState>>) -> Result<(), WireError> {
        self.gateway
            .heartbeat_with(&self.principal, &self.session, &llms.unwrap_or_default())
            .await
            .map(drop)
            .map_err(|e| WireError::from(&e))
    }

    async fn send(
        &self,
        task: TaskId,
        mut results: BoxStream<'static, TaskResult>,
    ) -> Result<(), WireError> {
        while let Some(result) = results.next().await {
            self.gateway
                .deliver(&self.principal, &self.session, &task, result)
                .await
                .map_err(|e| WireError::from(&e))?;
        }
        Ok(())
    }
}
