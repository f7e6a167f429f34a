//! The transport, pool, wake and agent conformance suites over SSE: publishers connect with
//! `SseWire`, results travel as NDJSON; on one gateway, and on two replicas linked in
//! memory.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod one_gateway {
    virtual_llm::transport_conformance_tests!(virtual_llm::testkit::SseTransport);
}

mod two_replicas {
    virtual_llm::transport_plane_conformance_tests!(
        virtual_llm::testkit::SseTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

mod pools {
    virtual_llm::pool_conformance_tests!(virtual_llm::testkit::SseTransport);
}

mod pools_on_two_replicas {
    virtual_llm::pool_conformance_tests!(
        virtual_llm::testkit::SseTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

mod wake {
    virtual_llm::wake_conformance_tests!(virtual_llm::testkit::SseTransport);
}

mod wake_on_two_replicas {
    virtual_llm::wake_conformance_tests!(
        virtual_llm::testkit::SseTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

mod agents {
    virtual_llm::agent_conformance_tests!(virtual_llm::testkit::SseTransport);
}

mod agents_on_two_replicas {
    virtual_llm::agent_conformance_tests!(
        virtual_llm::testkit::SseTransport,
        virtual_llm::testkit::MemoryCluster::new()
    );
}

/// Runs as lines are WebSocket frames: a publisher that registers over HTTP asking for
/// them (protocol 2, with runs) is granted runs alone.
#[tokio::test]
async fn an_http_register_is_not_granted_runs_as_lines() {
    use virtual_llm::protocol::{CHUNK_LINES, CHUNK_RUNS};
    let gw = virtual_llm::testkit::TestGateway::start(virtual_llm::Config::default()).await;
    let answer = gw
        .register_raw(
            "alice",
            serde_json::json!({
                "protocolVersion": 2,
                "llms": [{"name": "lines-over-http", "type": "openai", "model": "m"}],
                "capabilities": [CHUNK_RUNS, CHUNK_LINES],
            }),
        )
        .await;
    assert_eq!(answer["capabilities"], serde_json::json!([CHUNK_RUNS]));
}
