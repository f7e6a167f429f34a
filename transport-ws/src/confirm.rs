//! Delivery confirmations on a WebSocket: what tells a publisher that the gateway has
//! read the results it sent.
//!
//! A WebSocket is one ordered byte stream, so when the gateway answers a ping, it has
//! read every frame sent before that ping. A resumable task's sender asks for a
//! confirmation after its last result (`Outbox::delivered`); the task stays replayable
//! until then, in case the socket was already dead.
//!
//! Pings are shared. The first asker with no ping on its way gathers the asks that
//! come in the next [`GATHER`], then sends one ping for all of them; the askers who
//! came after it was sent send the next one when its pong is back. A busy socket so
//! carries a ping every `GATHER` plus a round trip, not one per task, and the tasks
//! held for it are those of that time.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use virtual_llm_core::sync::lock;

/// How long a ping waits for more asks to cover before it is sent.
pub(crate) const GATHER: Duration = Duration::from_millis(50);

/// The confirmations of one socket; shared by its outbox and its frame reader.
pub(crate) struct Confirmations {
    state: Mutex<State>,
    /// The highest ping number answered, and whether the socket ended.
    answered: watch::Sender<Answered>,
}

#[derive(Clone, Copy, Default)]
struct Answered {
    number: u64,
    /// The socket ended: nothing will be answered any more.
    closed: bool,
}

#[derive(Default)]
struct State {
    /// The last confirmation number given out.
    asked: u64,
    /// A ping is being gathered or is on its way; `sent` is its number once sent.
    pinging: bool,
    sent: u64,
}

/// What a caller of [`Confirmations::next_step`] does next.
pub(crate) enum Step<'a> {
    /// Everything sent before the ask reached the gateway.
    Confirmed,
    /// Gather asks for [`GATHER`], then send the ping [`Pinger::ping`] makes.
    Ping(Pinger<'a>),
    /// Wait for the ping on its way.
    Wait,
}

/// The one asker sending the next ping. Dropped before the ping is sent, it lets
/// another asker send it.
pub(crate) struct Pinger<'a> {
    confirmations: &'a Confirmations,
    sent: bool,
}

impl Pinger<'_> {
    /// The ping covering every ask so far.
    pub(crate) fn ping(&self) -> Message {
        let mut state = self.confirmations.state();
        state.sent = state.asked;
        Message::Ping(state.sent.to_be_bytes().to_vec().into())
    }

    /// The ping is queued on the socket.
    pub(crate) fn sent(mut self) {
        self.sent = true;
    }
}

impl Drop for Pinger<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.confirmations.state().pinging = false;
            // The waiters look again: one of them pings.
            self.confirmations.answered.send_modify(|_| {});
        }
    }
}

impl Confirmations {
    pub(crate) fn new() -> Self {
        Confirmations {
            state: Mutex::default(),
            answered: watch::Sender::new(Answered::default()),
        }
    }

    /// A new confirmation's number: it is confirmed by the pong of a ping sent after
    /// this call.
    pub(crate) fn ask(&self) -> u64 {
        let mut state = self.state();
        state.asked += 1;
        state.asked
    }

    /// Changes with every pong and at the socket's end: subscribe before asking
    /// [`next_step`](Confirmations::next_step), then wait for a change.
    pub(crate) fn changes(&self) -> watch::Receiver<impl Sized + use<>> {
        self.answered.subscribe()
    }

    /// What confirmation `number` needs now; `None` when the socket ended.
    pub(crate) fn next_step(&self, number: u64) -> Option<Step<'_>> {
        let answered = *self.answered.borrow();
        if answered.number >= number {
            return Some(Step::Confirmed);
        }
        if answered.closed {
            return None;
        }
        let mut state = self.state();
        if state.pinging {
            return Some(Step::Wait);
        }
        state.pinging = true;
        Some(Step::Ping(Pinger {
            confirmations: self,
            sent: false,
        }))
    }

    /// A pong arrived with `payload`.
    pub(crate) fn pong(&self, payload: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let number = u64::from_be_bytes(bytes);
        {
            let mut state = self.state();
            if state.pinging && number >= state.sent && state.sent > 0 {
                state.pinging = false;
            }
        }
        self.answered.send_if_modified(|answered| {
            let newer = number > answered.number;
            if newer {
                answered.number = number;
            }
            newer
        });
    }

    /// The socket ended: every wait ends unconfirmed.
    pub(crate) fn close(&self) {
        self.answered.send_modify(|answered| answered.closed = true);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}
