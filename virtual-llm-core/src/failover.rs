//! A publisher's way to several gateway replicas (SPEC §14): [`FailoverWire`] holds
//! one [`Wire`] per gateway URL and connects through the one that last worked; when
//! it cannot reach that gateway, it tries the others in turn before the publisher's
//! reconnect backoff applies.
//!
//! Only a connection failure (the gateway unreachable, or answering 5xx) moves on to
//! the next gateway: a refusal (401, 403, 409…) or a session the gateway forgot is
//! the shared registry's answer, the same on every replica, and is returned as it
//! is. The session id travels in the register request, so the publisher keeps its
//! session on whichever replica it reaches (a sticky reconnect across replicas).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use crate::protocol::RegisterRequest;
use crate::publisher::{Connected, Wire, WireError};

/// Several gateways' wires, tried in turn: the one that worked last first, the next
/// only when a gateway cannot be reached.
///
/// ```
/// # use std::sync::Arc;
/// # use virtual_llm_core::publisher::{FailoverWire, Wire};
/// # fn wires(a: Arc<dyn Wire>, b: Arc<dyn Wire>) {
/// let wire = FailoverWire::new(vec![a, b]).expect("at least one gateway");
/// # let _ = wire;
/// # }
/// ```
#[derive(Debug)]
pub struct FailoverWire {
    wires: Vec<Arc<dyn Wire>>,
    /// The wire that connected last (or is tried first).
    current: AtomicUsize,
}

impl FailoverWire {
    /// The wires of `wires`, tried in this order from the first; `None` when empty.
    pub fn new(wires: Vec<Arc<dyn Wire>>) -> Option<Self> {
        (!wires.is_empty()).then(|| FailoverWire {
            wires,
            current: AtomicUsize::new(0),
        })
    }

    /// The index of the wire tried first on the next connect.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Wire for FailoverWire {
    async fn connect(&self, request: RegisterRequest) -> Result<Connected, WireError> {
        let start = self.current();
        let mut last = None;
        for step in 0..self.wires.len() {
            let i = (start + step) % self.wires.len();
            match self.wires[i].connect(request.clone()).await {
                Ok(connected) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(connected);
                }
                Err(WireError::Connection(message)) => {
                    if self.wires.len() > 1 {
                        tracing::warn!(
                            gateway = i,
                            error = %crate::error::Escaped(&message),
                            "gateway unreachable; trying the next one"
                        );
                    }
                    last = Some(WireError::Connection(message));
                }
                Err(other) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Err(other);
                }
            }
        }
        // Next time, start after the one tried first this time.
        self.current
            .store((start + 1) % self.wires.len(), Ordering::Relaxed);
        Err(last.unwrap_or_else(|| WireError::Connection("no gateway to connect to".into())))
    }
}
