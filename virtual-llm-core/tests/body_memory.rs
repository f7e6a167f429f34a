//! Red-team finding F1: a client's body costs the gateway its bytes, not its JSON shape.
//!
//! A body just under 8 MiB made of tiny values (`[0,0,0,…]`) took 12–19 times its size
//! once parsed into a `serde_json::Value`, for as long as its task frame waited in the
//! publisher's queue. The gateway now keeps the body as its text from the HTTP read to
//! the frame ([`virtual_llm_core::RawBody`]).
//!
//! Measured with a counting global allocator (this test binary's own, `stats_alloc`):
//! the bytes still allocated while the frame waits in the channel, less those allocated
//! before the body was read. Deterministic: the one test of this binary runs on a
//! current-thread runtime, and the figure counts bytes, not time. The same measure of
//! the old representation (the body parsed into a `Value`) is taken too, so the test
//! shows it would catch that representation.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::alloc::System;

use common::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use virtual_llm_core::protocol::{Endpoint, GatewayFrame};
use virtual_llm_core::{Config, InferRequest};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The bytes allocated and not freed since `region` began.
fn held(region: &Region<'_, System>) -> isize {
    let change = region.change();
    change.bytes_allocated as isize - change.bytes_deallocated as isize
}

/// A chat body of `len` bytes whose messages are `0,0,0,…`: the shape that cost most as
/// a `Value` (32 bytes and more per two bytes of text).
fn zeros_body(len: usize) -> Vec<u8> {
    let head = br#"{"model":"llm","messages":["#;
    let mut body = head.to_vec();
    while body.len() + 4 < len {
        body.extend_from_slice(b"0,");
    }
    body.extend_from_slice(b"0]}");
    body
}

#[test]
fn an_8_mib_body_of_tiny_values_waits_for_its_publisher_at_about_its_size() {
    const LEN: usize = 8 * 1024 * 1024 - 1024;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let o = fixture_with(Config::default()).await;
        let (_session, _binding, channel) = o.online("alice", &["llm"]).await;
        let row = o.row("llm").await;
        // The old representation, for comparison: the same bytes as a `Value`.
        let bytes = zeros_body(LEN);
        let len = bytes.len();
        assert!(len <= LEN && len > LEN - 8);
        let region = Region::new(GLOBAL);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let as_value = held(&region);
        drop((value, bytes));
        assert!(
            as_value > 8 * len as isize,
            "a Value of the body holds {as_value} bytes: the measure would catch it"
        );

        // The body as the HTTP layer hands it over (its read buffer, counted), checked,
        // and sent as a task frame that waits in the publisher's queue.
        let region = Region::new(GLOBAL);
        let bytes = zeros_body(LEN);
        let request = InferRequest::read(Endpoint::ChatCompletions, None, bytes).unwrap();
        assert_eq!(request.llm, "llm");
        let handle = o.gw.start_task(&client(), &row, request).unwrap();
        let waiting = held(&region);
        eprintln!(
            "body {len} B: as a Value {as_value} B ({:.1}x), as a waiting task frame {waiting} B ({:.2}x)",
            as_value as f64 / len as f64,
            waiting as f64 / len as f64
        );
        assert!(
            waiting < (len + len / 8) as isize,
            "a task frame for a body of {len} bytes holds {waiting} bytes while it waits \
             ({:.2}x the body; as a Value it was {:.1}x)",
            waiting as f64 / len as f64,
            as_value as f64 / len as f64,
        );
        assert!(
            waiting >= len as isize,
            "the frame holds the body ({waiting} bytes)"
        );

        // The frame as the publisher gets it: the body spliced in as the client sent it.
        let frame = channel.next_task().await;
        assert_eq!(frame.body.len(), len);
        let wire = serde_json::to_string(&GatewayFrame::Task(frame)).unwrap();
        assert!(wire.contains(r#""body":{"model":"llm","messages":[0,0,0,"#));
        drop(handle);
    });
}
