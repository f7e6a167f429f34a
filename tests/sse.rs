//! The transport conformance suite over SSE: publishers connect with `SseWire`, results
//! travel as NDJSON.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

virtual_llm::transport_conformance_tests!(virtual_llm::testkit::SseTransport);
