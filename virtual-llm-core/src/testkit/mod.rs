//! The test kit: what integrators need to test their own stores, transports and
//! gateways against the core's contract.
//!
//! - [`store_suite`] and [`store_conformance_tests!`](crate::store_conformance_tests):
//!   the Store conformance suite.
//! - [`directory_suite`] with
//!   [`directory_conformance_tests!`](crate::directory_conformance_tests) and
//!   [`cluster_directory_conformance_tests!`](crate::cluster_directory_conformance_tests):
//!   the channel directory conformance suite.
//! - [`plane_suite`] with [`plane_conformance_tests!`](crate::plane_conformance_tests):
//!   two gateway replicas over one store, a publisher on one and clients on the
//!   other.
//! - [`router_suite`] with [`router_conformance_tests!`](crate::router_conformance_tests):
//!   checking a [`Router`](crate::Router).
//! - [`admission_suite`] with
//!   [`admission_conformance_tests!`](crate::admission_conformance_tests): checking an
//!   [`Admission`](crate::Admission).
//! - [`MemoryCluster`]: gateway replicas in one process, linked by an in-memory
//!   directory and task router.
//! - [`ManualClock`]: wall-clock time that moves only when told to.
//! - [`FakeChannel`]: a [`ChannelSink`] that records frames and can be closed or
//!   filled on demand.
//! - [`FailingStore`]: a [`Store`](crate::Store) wrapper with atomic switches that
//!   fail reads, writes or heartbeats, for fault-injection tests.
//! - [`EchoProvider`]: the deterministic echo model.
//! - [`LoopbackWire`]: a publisher wire straight into an in-process gateway.
//! - [`record`], [`at`] and [`burst`]: row, time and streamed-result builders for tests.
//! - [`services`]: when a test that needs a real server (PostgreSQL, `nats-server`)
//!   skips, and when it fails.

pub mod admission_suite;
mod cluster;
pub mod directory_suite;
mod failing;
mod loopback;
pub mod plane_suite;
pub mod router_suite;
pub mod services;
pub mod store_suite;

pub use cluster::MemoryCluster;
pub use failing::FailingStore;
pub use loopback::LoopbackWire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::channel::{ChannelSink, SendError};
pub use crate::echo::EchoProvider;
use crate::protocol::{CancelFrame, GatewayFrame, TaskFrame};
use crate::sync::lock;
use crate::{Clock, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, Timestamp};

/// `secs` seconds after the epoch.
pub fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(secs * 1000)
}

/// A stream's results as an upstream's burst brings them: `chunks` small JSON chunks
/// numbered from 0 (`{"n":0}`, `{"n":1}`…), then an empty chunk that ends the stream.
pub fn burst(chunks: u64) -> Vec<crate::TaskResult> {
    (0..=chunks)
        .map(|seq| crate::TaskResult::Chunk {
            data: if seq < chunks {
                format!("{{\"n\":{seq}}}")
            } else {
                String::new()
            },
            done: seq == chunks,
            seq: Some(seq),
        })
        .collect()
}

/// An active virtual row named `name`, owned by `tester`, bound to no session, with a
/// heartbeat at the epoch. Panics on an invalid name.
pub fn record(name: &str) -> LlmRecord {
    LlmRecord {
        id: LlmId::generate(),
        name: LlmName::parse(name).expect("record() needs a valid name"),
        kind: LlmKind::Virtual,
        status: LlmStatus::Active,
        provider_type: "openai".into(),
        model: "test-model".into(),
        tier: None,
        owner: "tester".into(),
        provider_session_id: None,
        last_heartbeat_at: Some(Timestamp::EPOCH),
        inactive_since: None,
        created_at: Timestamp::EPOCH,
        updated_at: Timestamp::EPOCH,
        revision: 0,
        binding: None,
        pool: None,
        max_concurrent: None,
        upstream: None,
        agent: None,
        access: Default::default(),
    }
}

/// A [`Clock`] that moves only when a test moves it. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_core::{Clock, testkit::{ManualClock, at}};
///
/// let clock = ManualClock::new(at(100));
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), at(105));
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            millis: Arc::new(AtomicU64::new(start.as_millis())),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_add(by, Ordering::SeqCst);
    }

    /// Sets the clock, backwards too (clock-jump tests).
    pub fn set(&self, to: Timestamp) {
        self.millis.store(to.as_millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.millis.load(Ordering::SeqCst))
    }
}

/// A [`ChannelSink`] that records every frame, for tests. Clones share the recording.
#[derive(Clone, Debug, Default)]
pub struct FakeChannel {
    inner: Arc<FakeInner>,
}

#[derive(Debug, Default)]
struct FakeInner {
    frames: Mutex<VecDeque<GatewayFrame>>,
    arrived: Notify,
    closed: AtomicBool,
    full: AtomicBool,
}

impl FakeChannel {
    /// An open, empty channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, `send` answers [`SendError::Closed`].
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    /// While set, `send` answers [`SendError::Full`].
    pub fn set_full(&self, full: bool) {
        self.inner.full.store(full, Ordering::SeqCst);
    }

    /// Takes every frame received so far.
    pub fn take(&self) -> Vec<GatewayFrame> {
        lock(&self.inner.frames).drain(..).collect()
    }

    /// Waits for the next frame and takes it.
    pub async fn next(&self) -> GatewayFrame {
        loop {
            let notified = self.inner.arrived.notified();
            if let Some(f) = lock(&self.inner.frames).pop_front() {
                return f;
            }
            notified.await;
        }
    }

    /// Waits for the next frame, which must be a task.
    pub async fn next_task(&self) -> TaskFrame {
        match self.next().await {
            GatewayFrame::Task(t) => t,
            other => panic!("expected a task frame, got {other:?}"),
        }
    }

    /// Waits for the next frame, which must be a cancel.
    pub async fn next_cancel(&self) -> CancelFrame {
        match self.next().await {
            GatewayFrame::Cancel(c) => c,
            other => panic!("expected a cancel frame, got {other:?}"),
        }
    }
}

impl ChannelSink for FakeChannel {
    fn send(&self, frame: GatewayFrame) -> Result<(), SendError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(SendError::Closed);
        }
        if self.inner.full.load(Ordering::SeqCst) {
            return Err(SendError::Full);
        }
        lock(&self.inner.frames).push_back(frame);
        self.inner.arrived.notify_waiters();
        Ok(())
    }
}
