//! The channel directory: which session's control channel is where, and the one way the
//! core sends a session a frame.
//!
//! A transport hands the core a [`ChannelSink`] when a publisher's channel opens; the
//! core binds it here and gets a [`BindToken`] back. Every frame for a session (a task,
//! a cancel, a `closing`) then goes through [`ChannelDirectory::send`], wherever the
//! channel is: in this process for the [`LocalDirectory`], on another gateway replica for
//! a clustered directory (the NATS plane). Binding a session that is bound already
//! replaces the older channel and tells it to close; each bind carries a fresh epoch, so
//! the older channel's release cannot unbind the newer one.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::channel::{ChannelSink, SendError};
use crate::protocol::{Closing, GatewayFrame};
use crate::sync::lock;
use crate::{ChannelBinding, ReplicaId, SessionId};

/// One bind of a session's channel: what releasing it takes. The binding is also what
/// the session's rows record (see [`LlmRecord::binding`](crate::LlmRecord::binding)).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BindToken {
    /// The bound session.
    pub session: SessionId,
    /// The replica holding the channel, and the bind's epoch.
    pub binding: ChannelBinding,
}

/// Where every session's control channel is, and how to send it a frame.
///
/// # Contract
/// - **One channel per session.** [`bind`](ChannelDirectory::bind) makes `sink` the
///   session's channel wherever the session was bound before (this replica or another)
///   and sends the older channel a `closing` frame. Each bind returns a token whose
///   epoch is larger than any earlier epoch this replica handed out, across restarts.
/// - **Release by token.** [`release`](ChannelDirectory::release) unbinds the session
///   only while the token is still its current bind, and says whether it was; a
///   replaced channel's release changes nothing.
/// - **Send never waits.** [`send`](ChannelDirectory::send) queues the frame for the
///   session's channel wherever it is, or says why it cannot ([`SendError::Closed`]: no
///   channel; [`SendError::Full`]: its queue is full). It never blocks on a publisher
///   or a peer. Frames to one session arrive in the order they were sent.
/// - **Local knowledge is local.** [`local_channels`](ChannelDirectory::local_channels)
///   and [`close_local`](ChannelDirectory::close_local) see only the channels this
///   replica holds.
/// - **Peers agree once settled.** A clustered directory may tell its peers of a bind
///   or a release in the background; once [`settled`](ChannelDirectory::settled)
///   returns, every peer that answered within the plane's timeout has applied this
///   replica's binds and releases made before the call (its `current` agrees, a
///   channel it held for a session bound here since has been told to close). The
///   gateway waits on it before it writes a bind into the rows and after an unbind.
///
/// The test kit's `directory_suite` (feature `testkit`) checks an
/// implementation against this contract.
#[async_trait]
pub trait ChannelDirectory: fmt::Debug + Send + Sync + 'static {
    /// The replica this directory binds channels on.
    fn replica(&self) -> &ReplicaId;

    /// Makes `sink` `session`'s channel, replacing (and telling to close) any other.
    fn bind(&self, session: &SessionId, sink: Arc<dyn ChannelSink>) -> BindToken;

    /// Unbinds the token's session if the token is still its current bind; returns
    /// whether it was.
    fn release(&self, token: &BindToken) -> bool;

    /// Whether the token is still its session's current bind.
    fn is_current(&self, token: &BindToken) -> bool;

    /// The current bind of `session`, if it has a channel anywhere.
    fn current(&self, session: &SessionId) -> Option<ChannelBinding>;

    /// Queues `frame` for `session`'s channel.
    fn send(&self, session: &SessionId, frame: GatewayFrame) -> Result<(), SendError>;

    /// How many channels this replica holds.
    fn local_channels(&self) -> usize;

    /// Sends every channel this replica holds a `closing` frame with `reason` (a
    /// graceful shutdown); returns how many were told.
    fn close_local(&self, reason: &str) -> usize;

    /// Waits, for at most the plane's timeout, until the other replicas have applied
    /// this replica's binds and releases so far. A directory whose binds are seen
    /// everywhere at once (this process's, the test kit's in-memory cluster) returns
    /// at once.
    async fn settled(&self) {}
}

struct Bound {
    epoch: u64,
    sink: Arc<dyn ChannelSink>,
}

/// The channels of one process: a [`ChannelDirectory`] for a gateway that is the only
/// replica over its store.
pub struct LocalDirectory {
    replica: ReplicaId,
    bound: Mutex<HashMap<SessionId, Bound>>,
    /// Seeded from the wall clock in microseconds, so epochs keep growing across
    /// restarts of a replica that keeps its id.
    next_epoch: AtomicU64,
}

impl fmt::Debug for LocalDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDirectory")
            .field("replica", &self.replica)
            .field("bound", &self.local_channels())
            .finish()
    }
}

impl LocalDirectory {
    /// An empty directory binding channels on `replica`.
    pub fn new(replica: ReplicaId) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        LocalDirectory {
            replica,
            bound: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(seed),
        }
    }

    /// The sink bound to `session` in this process; for a clustered directory that
    /// keeps a local directory for the channels it holds itself.
    pub fn sink(&self, session: &SessionId) -> Option<Arc<dyn ChannelSink>> {
        lock(&self.bound).get(session).map(|b| b.sink.clone())
    }

    fn token(&self, session: &SessionId, epoch: u64) -> BindToken {
        BindToken {
            session: session.clone(),
            binding: ChannelBinding {
                replica: self.replica.clone(),
                epoch,
            },
        }
    }
}

/// Tells a replaced channel to close; it may be gone already.
pub(crate) fn tell_closing(sink: &dyn ChannelSink, reason: &str) -> bool {
    let frame = GatewayFrame::Closing(Closing {
        reason: reason.to_owned(),
    });
    sink.send(frame).is_ok()
}

impl ChannelDirectory for LocalDirectory {
    fn replica(&self) -> &ReplicaId {
        &self.replica
    }

    fn bind(&self, session: &SessionId, sink: Arc<dyn ChannelSink>) -> BindToken {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let older = lock(&self.bound).insert(session.clone(), Bound { epoch, sink });
        if let Some(older) = older
            && !tell_closing(&*older.sink, "replaced by a newer channel")
        {
            tracing::debug!(%session, "replaced channel was already gone");
        }
        self.token(session, epoch)
    }

    fn release(&self, token: &BindToken) -> bool {
        if token.binding.replica != self.replica {
            return false;
        }
        let mut bound = lock(&self.bound);
        match bound.get(&token.session) {
            Some(b) if b.epoch == token.binding.epoch => {
                bound.remove(&token.session);
                true
            }
            _ => false,
        }
    }

    fn is_current(&self, token: &BindToken) -> bool {
        self.current(&token.session).as_ref() == Some(&token.binding)
    }

    fn current(&self, session: &SessionId) -> Option<ChannelBinding> {
        let epoch = lock(&self.bound).get(session).map(|b| b.epoch)?;
        Some(ChannelBinding {
            replica: self.replica.clone(),
            epoch,
        })
    }

    fn send(&self, session: &SessionId, frame: GatewayFrame) -> Result<(), SendError> {
        // Cloned out of the lock: a sink's send may take its own locks.
        let sink = self.sink(session).ok_or(SendError::Closed)?;
        sink.send(frame)
    }

    fn local_channels(&self) -> usize {
        lock(&self.bound).len()
    }

    fn close_local(&self, reason: &str) -> usize {
        let sinks: Vec<_> = lock(&self.bound).values().map(|b| b.sink.clone()).collect();
        for sink in &sinks {
            if !tell_closing(&**sink, reason) {
                tracing::debug!("a channel could not be told it is closing");
            }
        }
        sinks.len()
    }
}
