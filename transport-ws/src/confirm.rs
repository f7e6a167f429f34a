//! Delivery confirmations on a WebSocket: what tells a publisher that the gateway has
//! read the results it sent.
//!
//! A WebSocket is one ordered byte stream, so when the gateway answers a ping, it has
//! read every frame sent before that ping. A resumable task's sender asks for a
//! confirmation after its last result (`Outbox::delivered`); the task stays replayable
//! until then, in case the socket was already dead. One ping is in flight at a time:
//! it covers every confirmation asked for before it was sent, and the askers who came
//! later send the next one when its pong comes back, so a busy socket carries about one
//! ping per round trip, not one per task.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use virtual_llm_core::sync::lock;

/// The confirmations of one socket; shared by its outbox and its frame reader.
pub(crate) struct Confirmations {
    state: Mutex<State>,
    /// The highest ping number answered (0: none yet).
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
    /// The ping on its way, if any: its number.
    in_flight: Option<u64>,
}

/// What a caller of [`Confirmations::next_step`] does next.
pub(crate) enum Step {
    /// Everything sent before the ask reached the gateway.
    Confirmed,
    /// Send this ping, then wait.
    Send(Message),
    /// Wait for the ping in flight.
    Wait,
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

    /// What confirmation `number` needs now; `None` when the socket ended.
    pub(crate) fn next_step(&self, number: u64) -> Option<Step> {
        let answered = *self.answered.borrow();
        if answered.number >= number {
            return Some(Step::Confirmed);
        }
        if answered.closed {
            return None;
        }
        let mut state = self.state();
        match state.in_flight {
            // The ping in flight was sent after this ask: wait for it.
            Some(ping) if ping >= number => Some(Step::Wait),
            // One older than this ask is in flight: the ask after its pong sends.
            Some(ping) if ping > answered.number => Some(Step::Wait),
            _ => {
                let ping = state.asked;
                state.in_flight = Some(ping);
                Some(Step::Send(Message::Ping(
                    ping.to_be_bytes().to_vec().into(),
                )))
            }
        }
    }

    /// Changes with every pong and at the socket's end: subscribe before asking
    /// [`next_step`](Confirmations::next_step), then wait for a change.
    pub(crate) fn changes(&self) -> watch::Receiver<impl Sized + use<>> {
        self.answered.subscribe()
    }

    /// A pong arrived with `payload`.
    pub(crate) fn pong(&self, payload: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let number = u64::from_be_bytes(bytes);
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
