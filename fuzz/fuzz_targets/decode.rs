//! Feeds arbitrary bytes to every decoder of the wire protocol, as
//! `virtual-llm-core/tests/decoders.rs` does with proptest: `serde_json::from_slice`
//! into each type a peer can send, `PublisherFrame::from_text` (a WebSocket text frame,
//! runs as lines too), and `InferRequest::read` (the client body's reader). Nothing may
//! panic, and whatever decodes must re-encode and decode to the same value.
//!
//! Run with: `cargo +nightly fuzz run decode fuzz/corpus/decode fuzz/seeds/decode -- -dict=fuzz/decode.dict`

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use virtual_llm_core::protocol::{
    Endpoint, GatewayFrame, HeartbeatRequest, PublisherFrame, RegisterRequest, TaskFrame,
};
use virtual_llm_core::{InferRequest, TaskResult};

/// Decodes `bytes` as `T`; what decodes must re-encode and decode to itself.
fn round_trip<T>(bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value = serde_json::from_slice::<T>(bytes).ok()?;
    let encoded = match serde_json::to_vec(&value) {
        Ok(encoded) => encoded,
        Err(e) => panic!("{value:?} does not encode: {e}"),
    };
    match serde_json::from_slice::<T>(&encoded) {
        Ok(again) => assert_eq!(again, value, "{}", String::from_utf8_lossy(&encoded)),
        Err(e) => panic!(
            "{value:?} encodes to {} which does not decode: {e}",
            String::from_utf8_lossy(&encoded)
        ),
    }
    Some(value)
}

fuzz_target!(|bytes: &[u8]| {
    if let Some(request) = round_trip::<RegisterRequest>(bytes) {
        for spec in &request.llms {
            let _ = spec.validate();
        }
    }
    round_trip::<HeartbeatRequest>(bytes);
    if let Some(result) = round_trip::<TaskResult>(bytes) {
        let _ = result.validate();
    }
    round_trip::<PublisherFrame>(bytes);
    // A WebSocket text frame, JSON or a run as lines: it re-encodes both ways.
    if let Ok(frame) = std::str::from_utf8(bytes).map(PublisherFrame::from_text) {
        if let Ok(frame) = frame {
            for lines in [false, true] {
                let text = match frame.to_text(lines) {
                    Ok(text) => text,
                    Err(e) => panic!("{frame:?} does not encode: {e}"),
                };
                match PublisherFrame::from_text(&text) {
                    Ok(again) => assert_eq!(again, frame, "{text}"),
                    Err(e) => panic!("{frame:?} encodes to {text} which does not decode: {e}"),
                }
            }
        }
    }
    round_trip::<GatewayFrame>(bytes);
    round_trip::<TaskFrame>(bytes);
    // The gateway reads a client's body as its text: it accepts what parsing into a
    // `Value` and checking accepts, and keeps the same value.
    let parsed = round_trip::<Value>(bytes);
    let raw = InferRequest::read(Endpoint::ChatCompletions, None, bytes.to_vec());
    let via_value = parsed.clone().map(InferRequest::from_chat_body);
    assert_eq!(raw.is_ok(), matches!(via_value, Some(Ok(_))), "{raw:?} {via_value:?}");
    if let (Ok(request), Some(body)) = (raw, parsed) {
        assert_eq!(Some(request.llm.as_str()), body["model"].as_str());
        assert_eq!(request.stream, body["stream"].as_bool().unwrap_or(false));
        assert_eq!(request.body.to_value().ok(), Some(body));
        let again = InferRequest::read(Endpoint::ChatCompletions, None, request.body.get().into());
        assert_eq!(again.ok().as_ref(), Some(&request));
    }
});
