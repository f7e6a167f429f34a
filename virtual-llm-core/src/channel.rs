//! Control channels: the sink a transport hands the core for each connected publisher,
//! and the table of which session is bound to which sink.
//!
//! A transport (SSE stream, WebSocket) calls [`Gateway::bind`](crate::Gateway::bind)
//! with a [`ChannelSink`]; the core pushes `task` and `cancel` frames into it. Binding a
//! session that is already bound replaces the older channel; each binding carries a
//! generation, so the older channel's close cannot unbind the newer one.
//!
//! [`Channels::sink`] is the one place the core looks a session's channel up. Today the
//! channel lives in this process; a multi-replica gateway replaces this lookup with one
//! that forwards to the replica holding the channel.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::SessionId;
use crate::protocol::GatewayFrame;
use crate::sync::lock;

/// Why a frame could not be queued on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The channel is gone.
    #[error("channel closed")]
    Closed,
    /// The channel's queue is full: the publisher is not reading fast enough.
    #[error("channel full")]
    Full,
}

/// The gateway→publisher half of a control channel.
///
/// # Contract
/// `send` never blocks and never waits: it queues the frame or says why it cannot. The
/// queue is bounded (a publisher that stops reading must not grow gateway memory);
/// [`SendError::Full`] makes the core fail that task with 503. Frames are delivered in
/// the order they were queued.
pub trait ChannelSink: fmt::Debug + Send + Sync + 'static {
    /// Queues one frame for the publisher.
    fn send(&self, frame: GatewayFrame) -> Result<(), SendError>;
}

/// A bounded tokio channel is the usual sink: the transport's writer task drains it.
///
/// The channel may carry the frames themselves or `Box<GatewayFrame>`. Boxed is
/// what the bundled transports use: tokio allocates a channel's first block of 32
/// slots when the channel is made, so an idle publisher's queue costs 32 × 8 bytes
/// instead of 32 frames (~3.4 KiB), which matters at 10 000 idle publishers.
impl<T> ChannelSink for mpsc::Sender<T>
where
    T: From<GatewayFrame> + Send + 'static,
{
    fn send(&self, frame: GatewayFrame) -> Result<(), SendError> {
        self.try_send(T::from(frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }
}

struct Bound {
    generation: u64,
    sink: Arc<dyn ChannelSink>,
}

/// Which session is bound to which channel, by generation.
#[derive(Default)]
pub struct Channels {
    bound: Mutex<HashMap<SessionId, Bound>>,
    next_generation: AtomicU64,
}

impl fmt::Debug for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channels")
            .field("bound", &self.len())
            .finish()
    }
}

impl Channels {
    /// Binds `sink` to `session`, replacing any older channel, which is returned so the
    /// caller can tell it to close. Returns the new binding's generation.
    pub fn bind(
        &self,
        session: &SessionId,
        sink: Arc<dyn ChannelSink>,
    ) -> (u64, Option<Arc<dyn ChannelSink>>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let old = lock(&self.bound).insert(session.clone(), Bound { generation, sink });
        (generation, old.map(|b| b.sink))
    }

    /// Unbinds `session` if `generation` is still its current binding; returns whether
    /// it was. A replaced channel's close is therefore a no-op.
    pub fn unbind(&self, session: &SessionId, generation: u64) -> bool {
        let mut bound = lock(&self.bound);
        match bound.get(session) {
            Some(b) if b.generation == generation => {
                bound.remove(session);
                true
            }
            _ => false,
        }
    }

    /// The channel `session` is bound to now: the seam through which every frame for
    /// a session is routed.
    pub fn sink(&self, session: &SessionId) -> Option<Arc<dyn ChannelSink>> {
        lock(&self.bound).get(session).map(|b| b.sink.clone())
    }

    /// Whether `session` has a channel.
    pub fn is_bound(&self, session: &SessionId) -> bool {
        lock(&self.bound).contains_key(session)
    }

    /// The current generation of `session`'s binding.
    pub fn generation(&self, session: &SessionId) -> Option<u64> {
        lock(&self.bound).get(session).map(|b| b.generation)
    }

    /// How many sessions are bound.
    pub fn len(&self) -> usize {
        lock(&self.bound).len()
    }

    /// Whether no session is bound.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every bound sink, e.g. to tell them all the gateway is closing.
    pub fn all(&self) -> Vec<Arc<dyn ChannelSink>> {
        lock(&self.bound).values().map(|b| b.sink.clone()).collect()
    }
}
