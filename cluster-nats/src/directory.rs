//! [`NatsDirectory`]: the [`ChannelDirectory`] of a replica on the NATS plane.
//!
//! Channels held here take their frames at once, as in the local directory. A
//! session whose channel another replica holds (as it announced) has its frames
//! queued for that replica and published in order; the answer comes back in the
//! background, and a refused task frame fails its task then (see
//! [`TaskInbound::frame_refused`](virtual_llm_core::TaskInbound::frame_refused)).
//! Binds and releases are announced to every peer; [`settled`](ChannelDirectory::settled)
//! waits until they have applied them.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use virtual_llm_core::protocol::{Closing, GatewayFrame};
use virtual_llm_core::sync::lock;
use virtual_llm_core::{
    BindToken, ChannelBinding, ChannelDirectory, ChannelSink, ReplicaId, SendError, SessionId,
};

use crate::plane::{Local, Shared};
use crate::wire::Announcement;

/// The channel directory of one replica on the NATS plane; from
/// [`NatsPlane::directory`](crate::NatsPlane::directory).
pub(crate) struct NatsDirectory {
    shared: Arc<Shared>,
}

impl NatsDirectory {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        NatsDirectory { shared }
    }
}

impl fmt::Debug for NatsDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsDirectory")
            .field("replica", &self.shared.replica)
            .field("local", &self.local_channels())
            .field("remote", &lock(&self.shared.remote).len())
            .finish()
    }
}

fn closing(reason: &str) -> GatewayFrame {
    GatewayFrame::Closing(Closing {
        reason: reason.to_owned(),
    })
}

#[async_trait]
impl ChannelDirectory for NatsDirectory {
    fn replica(&self) -> &ReplicaId {
        &self.shared.replica
    }

    fn bind(&self, session: &SessionId, sink: Arc<dyn ChannelSink>) -> BindToken {
        let shared = &self.shared;
        let epoch = shared.next_epoch();
        // A channel another replica held is replaced: it hears of it from the
        // announcement and tells its channel to close, but tells nobody else; the
        // tasks here sent through it wait for their publisher (held before the new
        // channel can be given any).
        let replaced = lock(&shared.remote).remove(session);
        if let Some(old) = replaced {
            shared.channel_lost(session, &old.binding);
        }
        // Registered here, the session said whether it resumes; the others hear it
        // with the bind.
        let resumes = shared
            .inbound()
            .is_some_and(|inbound| inbound.resumes(session));
        let local = Local {
            epoch,
            sink,
            resumes,
        };
        let older = lock(&shared.local).insert(session.clone(), local);
        if let Some(older) = older
            && older
                .sink
                .send(closing("replaced by a newer channel"))
                .is_err()
        {
            tracing::debug!(%session, "replaced channel was already gone");
        }
        let binding = ChannelBinding {
            replica: shared.replica.clone(),
            epoch,
        };
        shared.announce(Announcement::Bound {
            session: session.clone(),
            binding: binding.clone(),
            resumes,
        });
        BindToken {
            session: session.clone(),
            binding,
        }
    }

    fn release(&self, token: &BindToken) -> bool {
        let shared = &self.shared;
        if token.binding.replica != shared.replica {
            return false;
        }
        {
            let mut local = lock(&shared.local);
            match local.get(&token.session) {
                Some(l) if l.epoch == token.binding.epoch => {
                    local.remove(&token.session);
                }
                _ => return false,
            }
        }
        shared.drop_carried(|_, s| *s == token.session);
        shared.announce(Announcement::Released {
            session: token.session.clone(),
            binding: token.binding.clone(),
        });
        true
    }

    fn is_current(&self, token: &BindToken) -> bool {
        self.current(&token.session).as_ref() == Some(&token.binding)
    }

    fn current(&self, session: &SessionId) -> Option<ChannelBinding> {
        let shared = &self.shared;
        if let Some(l) = lock(&shared.local).get(session) {
            return Some(ChannelBinding {
                replica: shared.replica.clone(),
                epoch: l.epoch,
            });
        }
        lock(&shared.remote).get(session).map(|r| r.binding.clone())
    }

    fn send(&self, session: &SessionId, frame: GatewayFrame) -> Result<(), SendError> {
        let shared = &self.shared;
        // Cloned out of the lock: a sink's send may take its own locks.
        let sink = lock(&shared.local).get(session).map(|l| l.sink.clone());
        if let Some(sink) = sink {
            shared.note_row(&frame, session);
            return sink.send(frame);
        }
        let to = lock(&shared.remote)
            .get(session)
            .map(|r| r.binding.clone())
            .ok_or(SendError::Closed)?;
        shared.forward(to, session, frame)
    }

    fn local_channels(&self) -> usize {
        lock(&self.shared.local).len()
    }

    fn close_local(&self, reason: &str) -> usize {
        let sinks: Vec<_> = lock(&self.shared.local)
            .values()
            .map(|l| l.sink.clone())
            .collect();
        for sink in &sinks {
            if sink.send(closing(reason)).is_err() {
                tracing::debug!("a channel could not be told it is closing");
            }
        }
        sinks.len()
    }

    async fn settled(&self) {
        self.shared.settle().await;
    }
}
