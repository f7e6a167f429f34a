//! The transport conformance suite on two gateway replicas linked by the NATS plane
//! through a real `nats-server`, publishers on one replica and clients on the other,
//! over SSE and over WebSocket. The two cases that run on paused time (a deadline, a
//! stream failing midway) stay with the in-memory plane (`tests/sse.rs`,
//! `tests/ws.rs`): paused time cannot wait on a real socket. Skipped, loudly, where
//! `nats-server` is not installed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use virtual_llm::nats::testing;
use virtual_llm::nats::{NatsOptions, NatsPlane};
use virtual_llm::testkit::Plane;
use virtual_llm::{Error, Gateway, GatewayBuilder, ReplicaId};

/// Replicas on the test binary's `nats-server`, under a prefix of their own.
struct Nats {
    url: String,
    prefix: String,
    joined: Mutex<Vec<NatsPlane>>,
}

impl Nats {
    fn new() -> Option<Self> {
        let server = testing::shared()?;
        Some(Nats {
            url: server.url(),
            prefix: testing::fresh_prefix(),
            joined: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl Plane for Nats {
    async fn join(&self, builder: GatewayBuilder, replica: ReplicaId) -> Result<Gateway, Error> {
        let options = NatsOptions::default().with_prefix(self.prefix.clone());
        let plane = NatsPlane::connect(&self.url, replica, options)
            .await
            .map_err(|e| Error::invalid(e.to_string()))?;
        // Every replica knows every other before the suite binds a channel.
        let others = {
            let mut joined = self.joined.lock().unwrap();
            joined.push(plane.clone());
            joined.clone()
        };
        let n = others.len() - 1;
        for p in &others {
            assert!(
                p.wait_for_peers(n, Duration::from_secs(10)).await,
                "{} knows the other replicas",
                p.replica()
            );
        }
        plane.join(builder).await
    }
}

macro_rules! cases {
    ($transport:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(plane) = Nats::new() else { return };
                virtual_llm::testkit::transport_suite::$case(&$transport, Some(&plane)).await;
            }
        )*
    };
}

macro_rules! suite {
    ($transport:expr) => {
        cases!($transport;
            non_streaming_round_trip,
            streaming_round_trip,
            streamed_events_are_framed_as_openai_frames_them,
            chunks_reach_the_client_before_the_provider_finishes,
            an_upstream_error_answer_passes_through,
            concurrent_clients_get_their_own_answers,
            a_stopped_publisher_is_503_at_once_and_its_row_inactive,
            a_sticky_reconnect_revives_the_same_row,
            a_client_leaving_cancels_the_provider,
            foreign_and_replayed_results_are_refused,
            bad_input_gets_its_status_and_writes_nothing,
            models_lists_active_llms,
            a_drain_ends_an_unfinished_stream_saying_the_gateway_is_shutting_down,
        );
    };
}

mod sse {
    use super::*;
    suite!(virtual_llm::testkit::SseTransport);
}

mod ws {
    use super::*;
    suite!(virtual_llm::testkit::WsTransport);
}
