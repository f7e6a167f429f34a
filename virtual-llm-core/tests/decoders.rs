//! A proptest over every decoder of the wire protocol: `serde_json::from_slice` into
//! each type of `virtual_llm_core::protocol` a peer can send (`RegisterRequest`,
//! `HeartbeatRequest`, `TaskResult`, `PublisherFrame`, `GatewayFrame`, `TaskFrame`)
//! and `InferRequest::from_chat_body`, the decoder of client bodies.
//!
//! Arbitrary bytes, arbitrary JSON made of the protocol's own keys and tags, mutated
//! valid frames and well-formed values never panic; whatever decodes re-encodes and
//! decodes to the same value, and a well-formed value survives encode and decode
//! unchanged. The cargo-fuzz target in `fuzz/fuzz_targets/decode.rs` feeds the same
//! decoders coverage-guided input (see docs/security.md).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fmt::Debug;

use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use virtual_llm_core::protocol::{
    CancelFrame, Closing, ConflictReason, CreditFrame, Endpoint, ErrorBody, ErrorDetail,
    GatewayFrame, HeartbeatRequest, Hello, LlmSpec, NameConflict, PublisherFrame, Refusal,
    RegisterRequest, RegisterResponse, TaskFrame, TaskKind,
};
use virtual_llm_core::{
    InferRequest, LlmId, LlmKind, LlmName, LlmStatus, LlmView, SessionId, TaskId, TaskResult,
    Timestamp,
};

// ---------------------------------------------------------------------------------
// The properties.
// ---------------------------------------------------------------------------------

/// Decodes `bytes` as `T`; if that works, the value re-encodes and decodes to itself.
fn round_trip<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(bytes) else {
        return Ok(());
    };
    let encoded = serde_json::to_vec(&value).unwrap();
    let again: T = serde_json::from_slice(&encoded).map_err(|e| {
        TestCaseError::fail(format!(
            "{value:?} encodes to {} which does not decode: {e}",
            String::from_utf8_lossy(&encoded)
        ))
    })?;
    prop_assert_eq!(&again, &value, "{}", String::from_utf8_lossy(&encoded));
    Ok(())
}

/// The client-body decoder: never panics; what it accepts names its model and stream
/// as the body does, and decodes again to the same request.
///
/// The gateway reads a body as its text (`InferRequest::read`, no tree): it accepts
/// exactly what parsing into a `Value` and checking that accepts, and keeps a body that
/// parses to the same value.
fn infer_round_trip(bytes: &[u8]) -> Result<(), TestCaseError> {
    let raw = InferRequest::read(Endpoint::ChatCompletions, None, bytes.to_vec());
    let parsed = serde_json::from_slice::<Value>(bytes).ok();
    let via_value = parsed.clone().map(InferRequest::from_chat_body);
    prop_assert_eq!(
        raw.is_ok(),
        matches!(via_value, Some(Ok(_))),
        "raw {:?}, value {:?}",
        raw,
        via_value
    );
    let (Ok(request), Some(body)) = (raw, parsed) else {
        return Ok(());
    };
    prop_assert_eq!(Some(request.llm.as_str()), body["model"].as_str());
    prop_assert_eq!(request.stream, body["stream"].as_bool().unwrap_or(false));
    prop_assert_eq!(request.body.to_value().unwrap(), body);
    let encoded = serde_json::to_vec(&request.body).unwrap();
    let again = InferRequest::read(Endpoint::ChatCompletions, None, encoded).unwrap();
    prop_assert_eq!(again, request);
    Ok(())
}

/// Every decoder on the same input.
fn all_decoders(bytes: &[u8]) -> Result<(), TestCaseError> {
    round_trip::<RegisterRequest>(bytes)?;
    round_trip::<HeartbeatRequest>(bytes)?;
    round_trip::<TaskResult>(bytes)?;
    round_trip::<PublisherFrame>(bytes)?;
    round_trip::<GatewayFrame>(bytes)?;
    round_trip::<TaskFrame>(bytes)?;
    if let Ok(result) = serde_json::from_slice::<TaskResult>(bytes) {
        // Checking what serde cannot never panics either.
        let _ = result.validate();
    }
    if let Ok(PublisherFrame::Register(request)) = serde_json::from_slice(bytes) {
        for spec in &request.llms {
            let _ = spec.validate();
        }
    }
    text_frame_round_trip(bytes)?;
    infer_round_trip(bytes)
}

/// A WebSocket text frame (JSON, or a run as lines): what decodes re-encodes, as JSON
/// and as lines, and decodes to the same frame.
fn text_frame_round_trip(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(());
    };
    let Ok(frame) = PublisherFrame::from_text(text) else {
        return Ok(());
    };
    for lines in [false, true] {
        let encoded = frame
            .to_text(lines)
            .map_err(|e| TestCaseError::fail(format!("{frame:?} does not encode: {e}")))?;
        let again = PublisherFrame::from_text(&encoded)
            .map_err(|e| TestCaseError::fail(format!("{encoded} does not decode: {e}")))?;
        prop_assert_eq!(&again, &frame, "{}", encoded);
    }
    Ok(())
}

/// A well-formed value: encode then decode gives it back exactly.
fn exact<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let encoded = serde_json::to_vec(value).unwrap();
    let decoded: T = serde_json::from_slice(&encoded).map_err(|e| {
        TestCaseError::fail(format!(
            "{} does not decode: {e}",
            String::from_utf8_lossy(&encoded)
        ))
    })?;
    prop_assert_eq!(&decoded, value);
    all_decoders(&encoded)
}

// ---------------------------------------------------------------------------------
// Strategies: JSON made of the protocol's words, and well-formed values.
// ---------------------------------------------------------------------------------

const KEYS: &[&str] = &[
    "type",
    "llms",
    "name",
    "model",
    "tier",
    "providerSessionId",
    "protocolVersion",
    "taskId",
    "status",
    "body",
    "chunk",
    "data",
    "done",
    "error",
    "message",
    "kind",
    "llm",
    "stream",
    "heartbeatIntervalMs",
    "keepAliveMs",
    "reason",
    "code",
    "conflicts",
    "lastHeartbeatAt",
    "inactiveSince",
    "id",
    "results",
    "messages",
    "role",
    "content",
];
const WORDS: &[&str] = &[
    "register",
    "heartbeat",
    "result",
    "chunk",
    "error",
    "hello",
    "registered",
    "task",
    "cancel",
    "refused",
    "closing",
    "credit",
    "infer",
    "active",
    "inactive",
    "hibernating",
    "virtual",
    "public",
    "openai",
    "publicLlm",
    "ownedByAnother",
    "user",
    "",
    "[DONE]",
    "2025-11-24T16:00:00.123Z",
    "1970-01-01 00:00:00",
    "ses_0123456789abcdef0123456789abcdef",
    "task_0123456789abcdef0123456789abcdef",
    "llm_0123456789abcdef0123456789abcdef",
    "llama3.1:8b",
    "_provider-x",
    "a b",
    "é\u{0}\u{202e}",
];

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(WORDS).prop_map(str::to_owned),
        1 => "[A-Za-z0-9._:_-]{0,70}",
        1 => any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..1000).prop_map(Value::from),
        (99u64..=600).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
    ]
}

/// Any JSON value, with objects keyed by the protocol's own field names.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
                        1 => string(),
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Valid names, with `/` between segments too (SPEC §17): no segment `.` or `..`, the
/// last not `infer` or `members`, at most 64 characters.
fn name() -> impl Strategy<Value = LlmName> {
    "[A-Za-z0-9.:-][A-Za-z0-9._:-]{0,30}(/[A-Za-z0-9._:-]{1,15}){0,2}"
        .prop_filter(
            "a segment that is '.' or '..', or a reserved last segment",
            |s| {
                let segments: Vec<&str> = s.split('/').collect();
                segments.iter().all(|seg| !matches!(*seg, "." | ".."))
                    && !(segments.len() > 1
                        && matches!(segments.last(), Some(&("infer" | "members"))))
            },
        )
        .prop_map(|s| LlmName::parse(&s).unwrap())
}

fn session() -> impl Strategy<Value = SessionId> {
    "[A-Za-z0-9_-]{1,128}".prop_map(|s| SessionId::parse(&s).unwrap())
}

fn task_id() -> impl Strategy<Value = TaskId> {
    prop_oneof![
        Just(()).prop_map(|()| TaskId::generate()),
        "[A-Za-z0-9_-]{1,128}".prop_map(|s| TaskId::parse(&s).unwrap()),
    ]
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    // RFC 3339 as humantime writes it: years 1970 to 9999.
    (0u64..253_402_300_800_000).prop_map(Timestamp::from_millis)
}

/// A body: any JSON value. Its floats come back exactly because the workspace builds
/// serde_json with `float_roundtrip`; without it, a double printed in full may parse
/// one unit in the last place away, and a relayed body would change in transit.
fn body() -> impl Strategy<Value = Value> {
    json()
}

fn spec() -> impl Strategy<Value = LlmSpec> {
    (name(), string(), string(), proptest::option::of(string())).prop_map(
        |(name, provider_type, model, tier)| LlmSpec {
            name,
            provider_type,
            model,
            tier,
            pool: None,
            max_concurrent: None,
            state: None,
            access: Default::default(),
        },
    )
}

/// An agent: any persona, its default parameters any JSON object.
fn agent() -> impl Strategy<Value = virtual_llm_core::agent::AgentSpec> {
    (
        name(),
        name(),
        proptest::option::of(string()),
        proptest::option::of(string()),
        proptest::option::of(proptest::collection::btree_map(string(), body(), 0..4)),
    )
        .prop_map(|(name, llm, description, system_prompt, params)| {
            virtual_llm_core::agent::AgentSpec {
                description,
                system_prompt,
                default_params: params.map(|p| p.into_iter().collect()),
                ..virtual_llm_core::agent::AgentSpec::new(name, llm)
            }
        })
}

fn register() -> impl Strategy<Value = RegisterRequest> {
    (
        proptest::option::of(session()),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(spec(), 0..4),
        proptest::collection::vec(agent(), 0..3),
    )
        .prop_map(
            |(provider_session_id, protocol_version, llms, agents)| RegisterRequest {
                agents,
                provider_session_id,
                protocol_version,
                llms,
                capabilities: Vec::new(),
            },
        )
}

fn result() -> impl Strategy<Value = TaskResult> {
    prop_oneof![
        (any::<u16>(), body(), any::<Option<u64>>()).prop_map(|(status, body, retry_after)| {
            TaskResult::Completed {
                status,
                body: body.into(),
                retry_after,
            }
        }),
        (string(), any::<bool>(), any::<Option<u64>>())
            .prop_map(|(data, done, seq)| TaskResult::Chunk { data, done, seq }),
        "[^\u{0}]{0,100}".prop_map(|message| TaskResult::Failed { message }),
        any::<u64>().prop_map(|from_seq| TaskResult::Resume { from_seq }),
    ]
}

fn task_frame() -> impl Strategy<Value = TaskFrame> {
    (task_id(), name(), any::<bool>(), body()).prop_map(|(task_id, llm, stream, body)| TaskFrame {
        task_id,
        kind: TaskKind::Infer,
        endpoint: Default::default(),
        llm,
        stream,
        body: body.into(),
    })
}

fn publisher_frame() -> impl Strategy<Value = PublisherFrame> {
    prop_oneof![
        register().prop_map(PublisherFrame::Register),
        session().prop_map(|provider_session_id| {
            PublisherFrame::Heartbeat(HeartbeatRequest {
                provider_session_id,
                llms: None,
            })
        }),
        (task_id(), any::<u16>(), body(), any::<Option<u64>>()).prop_map(
            |(task_id, status, body, retry_after)| PublisherFrame::Result {
                task_id,
                status,
                body: body.into(),
                retry_after,
            }
        ),
        (task_id(), string(), any::<bool>(), any::<Option<u64>>()).prop_map(
            |(task_id, data, done, seq)| PublisherFrame::Chunk {
                task_id,
                data,
                done,
                seq,
            }
        ),
        (
            task_id(),
            proptest::collection::vec(string(), 1..=8),
            any::<bool>(),
            any::<Option<u32>>(),
        )
            .prop_map(|(task_id, data, done, seq)| PublisherFrame::Chunks {
                task_id,
                data,
                done,
                seq: seq.map(u64::from),
            }),
        (task_id(), string())
            .prop_map(|(task_id, message)| PublisherFrame::Error { task_id, message }),
        (task_id(), any::<u64>())
            .prop_map(|(task_id, from_seq)| PublisherFrame::Resume { task_id, from_seq }),
    ]
}

fn view() -> impl Strategy<Value = LlmView> {
    (
        name(),
        any::<bool>(),
        0..3u8,
        (string(), string(), proptest::option::of(string())),
        proptest::option::of(timestamp()),
        proptest::option::of(timestamp()),
        (
            proptest::option::of(name()),
            proptest::option::of(1..=10_000u32),
            any::<u32>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                name,
                public,
                status,
                (provider_type, model, tier),
                last,
                since,
                (pool, max_concurrent, in_flight, queued),
            )| LlmView {
                name,
                id: LlmId::generate(),
                kind: if public {
                    LlmKind::Public
                } else {
                    LlmKind::Virtual
                },
                status: match status {
                    0 => LlmStatus::Active,
                    1 => LlmStatus::Inactive,
                    _ => LlmStatus::Hibernating,
                },
                provider_type,
                model,
                tier,
                last_heartbeat_at: last,
                inactive_since: since,
                pool,
                max_concurrent,
                in_flight,
                queued,
            },
        )
}

fn error_detail() -> impl Strategy<Value = ErrorDetail> {
    (
        string(),
        string(),
        proptest::option::of(string()),
        proptest::option::of(proptest::collection::vec(
            (string(), 0..4u8).prop_map(|(name, r)| NameConflict {
                name,
                reason: match r {
                    0 => ConflictReason::PublicLlm,
                    1 => ConflictReason::OwnedByAnother,
                    2 => ConflictReason::ActiveInAnotherSession,
                    _ => ConflictReason::VirtualLlm,
                },
            }),
            0..3,
        )),
    )
        .prop_map(|(message, error_type, code, conflicts)| ErrorDetail {
            message,
            error_type,
            code,
            conflicts,
        })
}

fn gateway_frame() -> impl Strategy<Value = GatewayFrame> {
    prop_oneof![
        (
            session(),
            any::<u64>(),
            any::<Option<u32>>(),
            any::<Option<u64>>()
        )
            .prop_map(
                |(provider_session_id, heartbeat_interval_ms, protocol_version, keep_alive_ms)| {
                    GatewayFrame::Hello(Hello {
                        provider_session_id,
                        heartbeat_interval_ms,
                        protocol_version,
                        keep_alive_ms,
                    })
                }
            ),
        (
            session(),
            any::<u64>(),
            any::<Option<u32>>(),
            any::<Option<u64>>(),
            proptest::collection::vec(view(), 0..3)
        )
            .prop_map(
                |(
                    provider_session_id,
                    heartbeat_interval_ms,
                    protocol_version,
                    keep_alive_ms,
                    llms,
                )| {
                    GatewayFrame::Registered(RegisterResponse {
                        agents: Vec::new(),
                        provider_session_id,
                        heartbeat_interval_ms,
                        protocol_version,
                        keep_alive_ms,
                        llms,
                        capabilities: Vec::new(),
                    })
                }
            ),
        task_frame().prop_map(GatewayFrame::Task),
        task_id().prop_map(|task_id| GatewayFrame::Cancel(CancelFrame { task_id })),
        (any::<u16>(), error_detail())
            .prop_map(|(status, error)| GatewayFrame::Refused(Refusal { status, error })),
        error_detail().prop_map(|error| GatewayFrame::Error(ErrorBody { error })),
        string().prop_map(|reason| GatewayFrame::Closing(Closing { reason })),
        (task_id(), any::<u32>())
            .prop_map(|(task_id, results)| GatewayFrame::Credit(CreditFrame { task_id, results })),
    ]
}

/// A chat-completions body, often well-formed enough to route.
fn chat_body() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(prop_oneof![string().prop_map(Value::String), json()]),
        proptest::option::of(prop_oneof![
            proptest::collection::vec(json(), 0..3).prop_map(Value::Array),
            json()
        ]),
        proptest::option::of(prop_oneof![any::<bool>().prop_map(Value::Bool), json()]),
        proptest::collection::vec((string(), json()), 0..3),
    )
        .prop_map(|(model, messages, stream, extra)| {
            let mut body: Map<String, Value> = extra.into_iter().collect();
            for (key, value) in [("model", model), ("messages", messages), ("stream", stream)] {
                if let Some(value) = value {
                    body.insert(key.to_owned(), value);
                }
            }
            Value::Object(body)
        })
}

/// Some valid encoded frame or body, then a few bytes flipped, inserted or cut.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        publisher_frame().prop_map(|f| serde_json::to_vec(&f).unwrap()),
        gateway_frame().prop_map(|f| serde_json::to_vec(&f).unwrap()),
        result().prop_map(|r| serde_json::to_vec(&r).unwrap()),
        register().prop_map(|r| serde_json::to_vec(&r).unwrap()),
        chat_body().prop_map(|b| serde_json::to_vec(&b).unwrap()),
    ];
    let edits = proptest::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..4);
    (valid, edits).prop_map(|(mut bytes, edits)| {
        for (at, byte, how) in edits {
            if bytes.is_empty() {
                bytes.push(byte);
                continue;
            }
            let at = at % bytes.len();
            match how {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => {
                    bytes.remove(at);
                }
            }
        }
        bytes
    })
}

// ---------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes never panic a decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        all_decoders(&bytes)?;
    }

    /// Arbitrary JSON made of the protocol's words: never a panic, and what decodes
    /// round-trips.
    #[test]
    fn arbitrary_json_round_trips_or_is_refused(value in json()) {
        all_decoders(&serde_json::to_vec(&value).unwrap())?;
    }

    /// Valid frames with a few bytes changed.
    #[test]
    fn mutated_frames_round_trip_or_are_refused(bytes in mutated()) {
        all_decoders(&bytes)?;
    }

    /// Chat bodies: the client decoder routes exactly what it should.
    #[test]
    fn chat_bodies_decode_consistently(body in chat_body()) {
        all_decoders(&serde_json::to_vec(&body).unwrap())?;
    }

    /// Well-formed values of every wire type survive encode and decode unchanged.
    #[test]
    fn well_formed_values_round_trip_exactly(
        register in register(),
        session in session(),
        result in result(),
        publisher in publisher_frame(),
        gateway in gateway_frame(),
        task in task_frame(),
    ) {
        exact(&register)?;
        exact(&HeartbeatRequest { provider_session_id: session, llms: None })?;
        exact(&result)?;
        exact(&publisher)?;
        text_frame_round_trip(serde_json::to_string(&publisher).unwrap().as_bytes())?;
        exact(&gateway)?;
        exact(&task)?;
    }
}

/// A relayed body keeps its floats to the last bit: proptest found
/// `6.686236123193017e-153` coming back as `…018e-153` before serde_json's
/// `float_roundtrip` feature was turned on.
#[test]
fn floats_survive_a_relay_exactly() {
    for text in [
        "6.686236123193017e-153",
        "0.1",
        "0.7",
        "1.7976931348623157e308",
        "5e-324",
        "2.2250738585072014e-308",
        "0.30000000000000004",
        "123456789012345680000.0",
    ] {
        let value: Value = serde_json::from_str(text).unwrap();
        let again: Value = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(again, value, "{text}");
        assert_eq!(
            value.as_f64().unwrap().to_bits(),
            text.parse::<f64>().unwrap().to_bits(),
            "{text} parses to the nearest double"
        );
    }
}

/// Inputs that once mattered, kept as plain cases.
#[test]
fn known_hostile_inputs_are_refused_without_a_panic() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_frame = format!(r#"{{"type":"register","llms":{deep}}}"#);
    let deep_body = format!(r#"{{"status":200,"body":{deep}}}"#);
    for input in [
        deep.as_bytes(),
        deep_frame.as_bytes(),
        deep_body.as_bytes(),
        b"\xff\xfe",
        b"{\"type\":\"register\",\"llms\":[{\"name\":\"\\ud800\"}]}",
        b"{\"status\":1e999}",
        b"{\"status\":-1,\"body\":null}",
        b"{\"error\":null}",
        b"{\"type\":\"result\",\"taskId\":\"../../x\",\"status\":200}",
    ] {
        all_decoders(input).unwrap();
        assert!(serde_json::from_slice::<PublisherFrame>(input).is_err());
    }
}
