//! The test kit (feature `testkit`): the core's test kit, re-exported, and the
//! transport conformance suite, so integrators reach everything through one path.
//!
//! - Everything in [`virtual_llm_core::testkit`]: the Store, channel directory and
//!   replica plane suites, [`MemoryCluster`](virtual_llm_core::testkit::MemoryCluster), [`ManualClock`](virtual_llm_core::testkit::ManualClock), [`FakeChannel`](virtual_llm_core::testkit::FakeChannel),
//!   [`FailingStore`](virtual_llm_core::testkit::FailingStore), [`EchoProvider`](virtual_llm_core::testkit::EchoProvider), [`LoopbackWire`](virtual_llm_core::testkit::LoopbackWire).
//! - [`transport_suite`](crate::testkit::transport_suite) with
//!   [`transport_conformance_tests!`](crate::transport_conformance_tests): end-to-end
//!   behaviour every transport must show, over a real gateway served on
//!   `127.0.0.1:0`.
//! - [`agent_suite`](crate::testkit::agent_suite) with
//!   [`agent_conformance_tests!`](crate::agent_conformance_tests): virtual agents
//!   (SPEC §13) end to end over a transport: the persona on what reaches the model,
//!   the views, atomic conflicts, the lifecycle with a killed publisher.
//! - [`pool_suite`](crate::testkit::pool_suite) with
//!   [`pool_conformance_tests!`](crate::pool_conformance_tests): pools, capacity,
//!   failover and the admission queue end to end, over a transport.
//! - [`wake_suite`](crate::testkit::wake_suite) with
//!   [`wake_conformance_tests!`](crate::wake_conformance_tests): upstream readiness and
//!   wake-on-demand end to end over a transport: rows following their upstream,
//!   wakes through the channel and through an embedder's waker, idle sleep, failed
//!   and timed-out wakes.
//! - [`transport_plane_conformance_tests!`](crate::transport_plane_conformance_tests):
//!   the same cases on two gateway replicas linked by a [`Plane`](crate::testkit::Plane) (the core's
//!   [`MemoryCluster`](virtual_llm_core::testkit::MemoryCluster) is one), publishers on one replica, clients on the other.
//! - [`Transport`](crate::testkit::Transport): what the suite needs of a transport, with [`SseTransport`](crate::testkit::SseTransport) and
//!   [`WsTransport`](crate::testkit::WsTransport).
//! - [`TestGateway`](crate::testkit::TestGateway): the gateway under test with HTTP client helpers
//!   ([`SseReader`](crate::testkit::SseReader), [`RawResponse`](crate::testkit::RawResponse)) and publishers.
//! - Instrumented providers: [`Gated`](crate::testkit::Gated), [`FailsWhenReleased`](crate::testkit::FailsWhenReleased), [`Hanging`](crate::testkit::Hanging),
//!   [`Firehose`](crate::testkit::Firehose), [`Stepped`](crate::testkit::Stepped), [`Answers`](crate::testkit::Answers), [`Counting`](crate::testkit::Counting),
//!   [`Switchable`](crate::testkit::Switchable), [`Recording`](crate::testkit::Recording); a recipe that counts its runs,
//!   [`CountingRecipe`](crate::testkit::CountingRecipe).
//! - [`Proxy`](crate::testkit::Proxy): a TCP proxy that cuts a publisher off as a killed process would.
//! - [`raw`](crate::testkit::raw): publisher channels driven by hand; [`socket`](crate::testkit::socket): raw WebSockets.
//! - Helpers: [`token`](crate::testkit::token), [`eventually`](crate::testkit::eventually), [`connect_with_recv_buffer`](crate::testkit::connect_with_recv_buffer), [`TempDir`](crate::testkit::TempDir).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

pub use virtual_llm_core::testkit::*;

pub mod agent_suite;
mod gateway;
mod plane;
pub mod pool_suite;
mod providers;
mod proxy;
pub mod raw;
pub mod socket;
mod support;
mod transport;
pub mod transport_suite;
pub mod wake_suite;

pub use gateway::{RawResponse, SseReader, TestGateway};
pub use plane::Plane;
pub use providers::{
    Answers, Counting, CountingRecipe, FailsWhenReleased, Firehose, Gated, Hanging, Paced,
    Recording, Stepped, Switchable,
};
pub use proxy::Proxy;
pub use support::{TempDir, connect_with_recv_buffer, eventually, token};
pub use transport::{SseTransport, Transport, WsTransport};
