//! The transport conformance suite over SSE: publishers connect with `SseWire`, results
//! travel as NDJSON.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod conformance;

use std::sync::Arc;

use conformance::harness::Transport;
use virtual_llm::publisher::Wire;

struct Sse;

impl Transport for Sse {
    fn wire(&self, url: &str, token: Option<String>) -> Arc<dyn Wire> {
        Arc::new(virtual_llm::sse::SseWire::new(url, token).unwrap())
    }
}

conformance_tests!(Sse);
