//! The wire protocol of SPEC §5: every body and frame, as serde types (camelCase JSON).
//!
//! Transports encode these and nothing else. The SSE transport sends a
//! [`GatewayFrame`] as an event named by [`GatewayFrame::event_name`] whose data is the
//! frame's payload; the WebSocket transport sends the frame itself, tagged by `type`.
//! Unknown fields are ignored so that newer publishers can talk to older gateways;
//! everything else is checked, and a body that fails a check is a 400.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::access::Access;
pub use crate::agent::{AgentSpec, AgentView};
use crate::raw_body::RawBody;
use crate::{Error, LlmName, LlmView, SessionId, TaskId};

/// The newest protocol version this crate speaks. A register without `protocolVersion`
/// means 1; the gateway accepts every version from [`MIN_PROTOCOL_VERSION`] to this one
/// and answers with the version it will speak on that session.
///
/// Version 2 adds, all optional on the wire: `protocolVersion` in the register answer,
/// `hello` and `registered`; `seq` on streamed chunks; `endpoint` on task frames (a
/// version 1 publisher is sent chat completions only).
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this crate speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The header an SSE publisher opens its control stream with to say which protocol
/// version it registered with (absent: 1), so the `hello` speaks it.
pub const PROTOCOL_HEADER: &str = "x-provider-protocol";

/// The version a register asks for, if this gateway speaks it: `None` for 0 or for a
/// version newer than [`PROTOCOL_VERSION`].
pub fn negotiate(requested: Option<u32>) -> Option<u32> {
    let version = requested.unwrap_or(MIN_PROTOCOL_VERSION);
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
        .contains(&version)
        .then_some(version)
}

/// The HTTP header naming the publisher's session on the SSE control stream and on
/// posted results.
pub const SESSION_HEADER: &str = "x-provider-session";

/// Longest `type`, `tier` and error message fields accepted from publishers.
const MAX_LABEL_LEN: usize = 64;
/// Longest `model` field accepted from publishers.
const MAX_MODEL_LEN: usize = 256;

/// One LLM a publisher offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct LlmSpec {
    /// Registry name.
    pub name: LlmName,
    /// Provider type, e.g. `openai`.
    #[serde(rename = "type")]
    pub provider_type: String,
    /// Upstream model name.
    pub model: String,
    /// Optional tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The pool this LLM serves in (SPEC §10); absent: a pool of one named after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<LlmName>,
    /// How many tasks it takes at once, 1 to [`MAX_CONCURRENT`]; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Whether its upstream can answer now (SPEC §12); absent: ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<UpstreamState>,
    /// Who may see and call it (SPEC §16); absent: public.
    #[serde(default, skip_serializing_if = "Access::is_public")]
    pub access: Access,
}

/// Whether an LLM's upstream can answer, as its publisher last found out (SPEC §12).
/// A bound session's rows follow it: `ready` → `active`, `asleep` → `hibernating`,
/// `unavailable` → `inactive`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UpstreamState {
    /// It answers: the upstream's model list answered 2xx.
    #[default]
    Ready,
    /// It sleeps and can be woken (its publisher has a wake recipe).
    Asleep,
    /// It cannot answer, and nothing here can wake it.
    Unavailable,
}

impl UpstreamState {
    /// A stable label: `ready`, `asleep`, `unavailable`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamState::Ready => "ready",
            UpstreamState::Asleep => "asleep",
            UpstreamState::Unavailable => "unavailable",
        }
    }
}

/// One LLM's state in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct LlmState {
    /// The LLM.
    pub name: LlmName,
    /// Its upstream's state.
    pub state: UpstreamState,
    /// Set when a wake the gateway asked for failed: why (a command's exit status and
    /// last line of stderr, a URL's status, or the ready timeout). The gateway fails
    /// the requests waiting for the wake with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_failed: Option<String>,
}

/// The longest `retryAfter` kept from an upstream's answer, in seconds (a day): a longer
/// one is cut to it where the gateway takes the answer, so no timer built from it can
/// overflow. A client told to wait a day asks again anyway.
pub const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// The largest `maxConcurrent` an LLM may declare.
pub const MAX_CONCURRENT: u32 = 10_000;

impl LlmSpec {
    /// A spec with no tier, pool or capacity.
    pub fn new(name: LlmName, provider_type: impl Into<String>, model: impl Into<String>) -> Self {
        LlmSpec {
            name,
            provider_type: provider_type.into(),
            model: model.into(),
            tier: None,
            pool: None,
            max_concurrent: None,
            state: None,
            access: Access::Public,
        }
    }

    /// The pool key this spec's row will have: its `pool`, or else its name.
    pub fn pool_key(&self) -> &LlmName {
        self.pool.as_ref().unwrap_or(&self.name)
    }

    /// Checks the free-text fields (bounded length, no control characters) and the
    /// capacity (1 to [`MAX_CONCURRENT`]).
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(n) = self.max_concurrent
            && !(1..=MAX_CONCURRENT).contains(&n)
        {
            return Err(Error::invalid(format!(
                "maxConcurrent of {} is {n}; it must be 1 to {MAX_CONCURRENT}",
                self.name
            )));
        }
        self.access.validate()?;
        check_label("type", &self.provider_type, MAX_LABEL_LEN)?;
        check_label("model", &self.model, MAX_MODEL_LEN)?;
        if let Some(tier) = &self.tier {
            check_label("tier", tier, MAX_LABEL_LEN)?;
        }
        Ok(())
    }
}

fn check_label(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(format!("{field} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(Error::invalid(format!(
            "{field} is at most {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// `POST {base}/_provider-register`, and the WebSocket `register` frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// The session id the publisher persisted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_session_id: Option<SessionId>,
    /// Protocol version; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// The LLMs to publish.
    pub llms: Vec<LlmSpec>,
    /// The agents to publish over them (SPEC §13): each speaks through a name or pool
    /// key of `llms`. Written with the LLMs in one batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentSpec>,
    /// What the publisher can do beyond its protocol version (protocol 2): `resume`
    /// (SPEC §15) keeps its tasks through a dropped channel. Unknown ones are ignored;
    /// at most [`MAX_CAPABILITIES`] are read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// The capability of a publisher whose tasks survive its channel's loss (SPEC §15).
pub const RESUME: &str = "resume";

/// The capability of a publisher that may send a stream's chunks that were ready
/// together as one `chunks` frame (a run), and of a gateway that takes them: one frame,
/// one task id and one hand-off for the run instead of one per chunk. A gateway that
/// does not grant it gets every chunk as a `chunk` frame of its own.
pub const CHUNK_RUNS: &str = "chunks";

/// The capability of a WebSocket publisher that may send a `chunks` frame as lines
/// (see [`PublisherFrame::to_text`]): a header `{"type":"chunks","taskId",…}` without
/// `data`, then each chunk on a line of its own after it. A chunk is one SSE `data:`
/// payload and so has no line break: it crosses as it is, where a JSON string escapes
/// every quote of the JSON chunk inside it, and the gateway unescapes them again.
pub const CHUNK_LINES: &str = "chunkLines";

/// The capability of an HTTP publisher that may post the whole answers of several
/// tasks in one request, `POST {base}/_provider-results` (one NDJSON line per task, a
/// `result` or `error` frame as on a WebSocket), and of a gateway that takes them:
/// one request, one read and one answer for the answers that were ready together,
/// where each would be a request of its own. Streams are still posted per task.
pub const RESULT_BATCHES: &str = "resultBatches";

/// The most tasks one `_provider-results` request may carry; a request with more is
/// refused.
pub const MAX_BATCH_TASKS: usize = 256;

/// The answer to `POST {base}/_provider-results` (capability [`RESULT_BATCHES`]): the
/// tasks whose results were not taken, each with the status and message its own result
/// request would have had (404 for an unknown task or another session's, 409 for a
/// task already finished). Every other task's results were delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BatchAnswer {
    /// The tasks refused, in no particular order.
    pub refused: Vec<RefusedResult>,
}

/// One task of a [`BatchAnswer`] whose results were not taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RefusedResult {
    /// The task.
    pub task_id: TaskId,
    /// The HTTP status its own result request would have had.
    pub status: u16,
    /// Why.
    pub message: String,
}

/// The most chunks one `chunks` frame may carry; a frame with more is refused.
pub const MAX_RUN_CHUNKS: usize = 64;

/// The most payload bytes a publisher puts in one run (a single chunk may be larger,
/// and goes alone): runs stay far below any frame limit.
pub const MAX_RUN_BYTES: usize = 64 * 1024;

/// The most capabilities a register may name.
pub const MAX_CAPABILITIES: usize = 16;

impl RegisterRequest {
    /// Whether the publisher declared `capability` (among its first
    /// [`MAX_CAPABILITIES`]).
    pub fn declares(&self, capability: &str) -> bool {
        self.capabilities
            .iter()
            .take(MAX_CAPABILITIES)
            .any(|c| c == capability)
    }
}

/// The answer to a register, and the WebSocket `registered` frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    /// The session id to persist: the one sent, or a fresh one.
    pub provider_session_id: SessionId,
    /// How often to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The protocol version the gateway speaks on this session (protocol 2; absent
    /// means 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// How often the gateway sends something down an idle control channel (an SSE
    /// `: ping` comment, a WebSocket ping), in milliseconds. A publisher's watchdog
    /// waits for it, not for the heartbeat interval. Absent from older gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<u64>,
    /// The published rows.
    pub llms: Vec<LlmView>,
    /// The published agents (absent when the register carried none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentView>,
    /// The capabilities of the register this gateway grants on the session (protocol
    /// 2): `resume` when it holds the session's tasks through a dropped channel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// The SSE `hello` event, first on every stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The session the stream is bound to.
    pub provider_session_id: SessionId,
    /// How often to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The protocol version the gateway speaks on this stream (protocol 2; absent
    /// means 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// How often the gateway pings an idle stream, in milliseconds; see
    /// [`RegisterResponse::keep_alive_ms`]. Absent from older gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<u64>,
}

/// `POST {base}/_provider-heartbeat`, and the WebSocket `heartbeat` frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest {
    /// The publisher's session.
    pub provider_session_id: SessionId,
    /// Each LLM's upstream state (protocol 2; absent: nothing changes). A publisher
    /// sends a heartbeat at once when a state changes or a wake fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llms: Option<Vec<LlmState>>,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// How many rows the session holds.
    pub llms: usize,
}

/// What a task asks of the publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TaskKind {
    /// An OpenAI chat completion.
    Infer,
}

/// Which OpenAI endpoint a task's body is for (SPEC §17): the publisher calls the same
/// path on its upstream.
///
/// On the wire it is the task frame's `endpoint` (`chat.completions`, `completions`,
/// `embeddings`), absent for chat completions, so a version 1 publisher, which knows
/// only those, gets exactly the version 1 frame. The gateway sends the other endpoints
/// only to publishers that registered with protocol 2 or later.
///
/// ```
/// use virtual_llm_core::protocol::Endpoint;
///
/// assert_eq!(Endpoint::Embeddings.path(), "embeddings");
/// assert_eq!(Endpoint::ChatCompletions.as_str(), "chat.completions");
/// assert!(!Endpoint::Embeddings.streams());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    #[default]
    #[serde(rename = "chat.completions")]
    ChatCompletions,
    /// `POST /v1/completions`: a plain-text prompt.
    #[serde(rename = "completions")]
    Completions,
    /// `POST /v1/embeddings`: vectors, never streamed.
    #[serde(rename = "embeddings")]
    Embeddings,
}

impl Endpoint {
    /// The wire name: `chat.completions`, `completions`, `embeddings`.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    /// The path under an OpenAI base URL (`…/v1/` + this).
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    /// Whether this is chat completions, the endpoint of version 1.
    pub fn is_chat(&self) -> bool {
        *self == Endpoint::ChatCompletions
    }

    /// Whether answers may be streamed (all but embeddings).
    pub fn streams(self) -> bool {
        self != Endpoint::Embeddings
    }

    /// The oldest protocol version whose publishers understand this endpoint.
    pub fn min_protocol(self) -> u32 {
        if self.is_chat() { 1 } else { 2 }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `task` frame: one client request for the publisher to answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskFrame {
    /// Correlates the results.
    pub task_id: TaskId,
    /// What to do.
    pub kind: TaskKind,
    /// Which OpenAI endpoint `body` is for (protocol 2); absent: chat completions.
    #[serde(default, skip_serializing_if = "Endpoint::is_chat")]
    pub endpoint: Endpoint,
    /// Which of the publisher's LLMs.
    pub llm: LlmName,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The client's OpenAI request body, as the JSON text it came in (written into the
    /// frame as it is; see [`RawBody`]).
    pub body: RawBody,
}

/// A `wake` frame (protocol 2): a request waits for this hibernating LLM; run its wake
/// recipe, then report `ready` or `wakeFailed` in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeFrame {
    /// The LLM to wake.
    pub llm: LlmName,
}

/// A `cancel` frame: stop working on the task, its client is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelFrame {
    /// The task to abort.
    pub task_id: TaskId,
}

/// A `credit` frame (WebSocket, when the publisher asked for per-task flow control):
/// the publisher may send `results` more results of the task. The gateway grants them
/// as it hands earlier ones to the client, so a slow client slows its own stream and
/// no other task on the socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreditFrame {
    /// The task.
    pub task_id: TaskId,
    /// How many more results it may send.
    pub results: u32,
}

/// Why a name was refused in a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum ConflictReason {
    /// A public LLM has this name.
    PublicLlm,
    /// Another principal owns it.
    OwnedByAnother,
    /// An active row of another of the caller's sessions holds it.
    ActiveInAnotherSession,
    /// A published (virtual) LLM has this name; a public LLM cannot take it.
    VirtualLlm,
    /// Pool keys and row names share one namespace: the LLM's pool is named like a
    /// row outside that pool, or the LLM is named like another pool.
    PoolNameTaken,
    /// The LLM's pool belongs to another principal, who has not granted this one
    /// its pool.
    PoolOwnedByAnother,
    /// A row whose name differs from this one only in letter case exists: names are
    /// unique ignoring ASCII case (`LLAMA-8B` cannot sit beside `llama-8b`).
    NameTakenIgnoringCase,
}

impl ConflictReason {
    /// A short phrase for messages.
    pub fn describe(self) -> &'static str {
        match self {
            ConflictReason::PublicLlm => "a public llm has this name",
            ConflictReason::OwnedByAnother => "owned by another principal",
            ConflictReason::ActiveInAnotherSession => "active in another session",
            ConflictReason::VirtualLlm => "a published llm has this name",
            ConflictReason::PoolNameTaken => "the name of a pool and of a row outside it",
            ConflictReason::PoolOwnedByAnother => "its pool is owned by another principal",
            ConflictReason::NameTakenIgnoringCase => {
                "a name that differs only in letter case is taken"
            }
        }
    }
}

/// One refused name of a 409.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct NameConflict {
    /// The name.
    pub name: String,
    /// Why.
    pub reason: ConflictReason,
}

/// The OpenAI-shaped error body `{"error":{...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type.
    #[serde(rename = "type")]
    pub error_type: String,
    /// Machine-readable code.
    pub code: Option<String>,
    /// For a register 409: each refused name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Vec<NameConflict>>,
}

/// The WebSocket `refused` frame: a register was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// The HTTP status the same register would have had.
    pub status: u16,
    /// The error.
    pub error: ErrorDetail,
}

impl Refusal {
    /// The refusal of a failed register.
    pub fn from_error(err: &Error) -> Self {
        Refusal {
            status: err.status(),
            error: err.to_body().error,
        }
    }
}

/// The gateway is shutting down or replaced this channel; reconnect later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Closing {
    /// Why.
    pub reason: String,
}

/// A frame the gateway sends a publisher, on whichever channel it is bound.
///
/// Tagged by `type`. It is read without serde's buffering of internally tagged enums
/// (which would parse a task's body into a tree and cannot hold a [`RawBody`]): when
/// `type` comes first, as the gateway writes it, the rest of the object is read
/// straight into the variant; otherwise the object is gathered first.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GatewayFrame {
    /// First frame of an SSE stream.
    Hello(Hello),
    /// WebSocket: the register succeeded.
    Registered(RegisterResponse),
    /// A request to answer.
    Task(TaskFrame),
    /// Abort a task.
    Cancel(CancelFrame),
    /// WebSocket: the register was refused.
    Refused(Refusal),
    /// WebSocket: the last frame was bad; the socket closes after this. The payload is
    /// the OpenAI error body, nested so its own `type` does not clash with the tag.
    Error(ErrorBody),
    /// The channel is closing; reconnect later.
    Closing(Closing),
    /// WebSocket with flow control: more results of a task may be sent.
    Credit(CreditFrame),
    /// Wake a hibernating LLM (protocol 2).
    Wake(WakeFrame),
}

impl GatewayFrame {
    /// The SSE event name of the frame (`hello`, `task`, `cancel`, …).
    pub fn event_name(&self) -> &'static str {
        match self {
            GatewayFrame::Hello(_) => "hello",
            GatewayFrame::Registered(_) => "registered",
            GatewayFrame::Task(_) => "task",
            GatewayFrame::Cancel(_) => "cancel",
            GatewayFrame::Refused(_) => "refused",
            GatewayFrame::Error(_) => "error",
            GatewayFrame::Closing(_) => "closing",
            GatewayFrame::Credit(_) => "credit",
            GatewayFrame::Wake(_) => "wake",
        }
    }

    /// The frame's payload without the `type` tag: the data of its SSE event.
    pub fn payload_json(&self) -> Result<String, serde_json::Error> {
        match self {
            GatewayFrame::Hello(x) => serde_json::to_string(x),
            GatewayFrame::Registered(x) => serde_json::to_string(x),
            GatewayFrame::Task(x) => serde_json::to_string(x),
            GatewayFrame::Cancel(x) => serde_json::to_string(x),
            GatewayFrame::Refused(x) => serde_json::to_string(x),
            GatewayFrame::Error(x) => serde_json::to_string(x),
            GatewayFrame::Closing(x) => serde_json::to_string(x),
            GatewayFrame::Credit(x) => serde_json::to_string(x),
            GatewayFrame::Wake(x) => serde_json::to_string(x),
        }
    }
}

/// The `type` of each [`GatewayFrame`] variant.
const GATEWAY_FRAME_TYPES: &[&str] = &[
    "hello",
    "registered",
    "task",
    "cancel",
    "refused",
    "error",
    "closing",
    "credit",
    "wake",
];

impl Tagged for GatewayFrame {
    const EXPECTING: &'static str = "a gateway frame, an object tagged by `type`";

    fn variant<'de, D: serde::Deserializer<'de>>(tag: &str, rest: D) -> Result<Self, D::Error> {
        Ok(match tag {
            "hello" => GatewayFrame::Hello(Deserialize::deserialize(rest)?),
            "registered" => GatewayFrame::Registered(Deserialize::deserialize(rest)?),
            "task" => GatewayFrame::Task(Deserialize::deserialize(rest)?),
            "cancel" => GatewayFrame::Cancel(Deserialize::deserialize(rest)?),
            "refused" => GatewayFrame::Refused(Deserialize::deserialize(rest)?),
            "error" => GatewayFrame::Error(Deserialize::deserialize(rest)?),
            "closing" => GatewayFrame::Closing(Deserialize::deserialize(rest)?),
            "credit" => GatewayFrame::Credit(Deserialize::deserialize(rest)?),
            "wake" => GatewayFrame::Wake(Deserialize::deserialize(rest)?),
            other => {
                return Err(serde::de::Error::unknown_variant(
                    other,
                    GATEWAY_FRAME_TYPES,
                ));
            }
        })
    }
}

impl<'de> Deserialize<'de> for GatewayFrame {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_tagged(deserializer)
    }
}

/// An enum tagged by `type` in its object, read without serde's buffering of
/// internally tagged enums (serde gathers the whole object into its `Content` tree
/// first, then reads the variant from that: an allocation per field, and a task's
/// body or a result's answer parsed into a tree): when `type` comes first, as both
/// ends write it, the rest of the object is read straight into the variant; otherwise
/// the object is gathered into a JSON map first.
trait Tagged: Sized {
    /// What the visitor expects, for error messages.
    const EXPECTING: &'static str;

    /// The variant named `tag`, read from `rest` (the object without its `type`).
    fn variant<'de, D: serde::Deserializer<'de>>(tag: &str, rest: D) -> Result<Self, D::Error>;
}

fn deserialize_tagged<'de, T: Tagged, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    use serde::de::{self, MapAccess, Visitor, value::MapAccessDeserializer};

    struct TaggedVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Tagged> Visitor<'de> for TaggedVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(T::EXPECTING)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
            let Some(first) = map.next_key::<String>()? else {
                return Err(de::Error::missing_field("type"));
            };
            if first == "type" {
                let tag: String = map.next_value()?;
                return T::variant(&tag, MapAccessDeserializer::new(map));
            }
            let mut fields = serde_json::Map::new();
            fields.insert(first, map.next_value()?);
            while let Some((key, value)) = map.next_entry::<String, Value>()? {
                fields.insert(key, value);
            }
            let tag = match fields.remove("type") {
                Some(Value::String(tag)) => tag,
                Some(_) => return Err(de::Error::custom("`type` must be a string")),
                None => return Err(de::Error::missing_field("type")),
            };
            T::variant(&tag, Value::Object(fields)).map_err(de::Error::custom)
        }
    }
    deserializer.deserialize_map(TaggedVisitor(std::marker::PhantomData))
}

/// A frame a publisher sends over a WebSocket.
///
/// Tagged by `type`, and read as [`GatewayFrame`] is: straight into the variant when
/// `type` comes first, as publishers write it (a stream's every chunk is one).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum PublisherFrame {
    /// Must be the first frame.
    Register(RegisterRequest),
    /// Liveness.
    Heartbeat(HeartbeatRequest),
    /// The final answer of a task.
    #[serde(rename_all = "camelCase")]
    Result {
        /// The task.
        task_id: TaskId,
        /// HTTP status of the answer.
        status: u16,
        /// The answer body, as JSON text (spliced into the frame, never re-encoded).
        #[serde(default)]
        body: RawBody,
        /// The upstream's `Retry-After`, in seconds, for an error answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
    /// One streamed chunk.
    #[serde(rename_all = "camelCase")]
    Chunk {
        /// The task.
        task_id: TaskId,
        /// One SSE `data:` payload: a serialized `chat.completion.chunk`.
        #[serde(default)]
        data: String,
        /// Ends the stream.
        #[serde(default)]
        done: bool,
        /// The chunk's number in its task, from 0 (protocol 2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// Chunks of one stream that were ready together, in order (capability
    /// [`CHUNK_RUNS`]): the same as a `chunk` frame for each, numbered `seq`, `seq + 1`…
    /// (protocol 2), the last one ending the stream when `done`. At least one and at
    /// most [`MAX_RUN_CHUNKS`].
    #[serde(rename_all = "camelCase")]
    Chunks {
        /// The task.
        task_id: TaskId,
        /// The chunks' SSE `data:` payloads, in order.
        data: Vec<String>,
        /// The last chunk ends the stream.
        #[serde(default)]
        done: bool,
        /// The first chunk's number in its task (protocol 2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// The task failed at the publisher.
    #[serde(rename_all = "camelCase")]
    Error {
        /// The task.
        task_id: TaskId,
        /// What went wrong.
        message: String,
    },
    /// The task goes on after a reconnect (SPEC §15): its results follow, replayed
    /// from `fromSeq`.
    #[serde(rename_all = "camelCase")]
    Resume {
        /// The task.
        task_id: TaskId,
        /// The first `seq` the publisher still holds and replays from.
        from_seq: u64,
    },
}

/// The `type` of each [`PublisherFrame`] variant.
const PUBLISHER_FRAME_TYPES: &[&str] = &[
    "register",
    "heartbeat",
    "result",
    "chunk",
    "chunks",
    "error",
    "resume",
];

/// The fields of [`PublisherFrame::Result`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultFields {
    task_id: TaskId,
    status: u16,
    #[serde(default)]
    body: RawBody,
    #[serde(default)]
    retry_after: Option<u64>,
}

/// The fields of [`PublisherFrame::Chunk`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChunkFields {
    task_id: TaskId,
    #[serde(default)]
    data: String,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    seq: Option<u64>,
}

/// The fields of [`PublisherFrame::Chunks`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChunksFields {
    task_id: TaskId,
    #[serde(deserialize_with = "run_data")]
    data: Vec<String>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    seq: Option<u64>,
}

/// A run's `data`: 1 to [`MAX_RUN_CHUNKS`] strings, refused at the first past the
/// limit: a frame of empty strings never makes a vector longer than the limit (read
/// straight into the frame when `type` comes first, as publishers write it; a frame
/// with `type` later is first read into a JSON map, as every frame is).
fn run_data<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    use serde::de::{self, SeqAccess, Visitor};

    struct Run;
    impl<'de> Visitor<'de> for Run {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "an array of 1 to {MAX_RUN_CHUNKS} chunk payloads")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut data = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_RUN_CHUNKS));
            while let Some(chunk) = seq.next_element::<String>()? {
                if data.len() == MAX_RUN_CHUNKS {
                    return Err(de::Error::invalid_length(MAX_RUN_CHUNKS + 1, &self));
                }
                data.push(chunk);
            }
            if data.is_empty() {
                return Err(de::Error::invalid_length(0, &self));
            }
            Ok(data)
        }
    }
    deserializer.deserialize_seq(Run)
}

/// The fields of [`PublisherFrame::Error`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorFields {
    task_id: TaskId,
    message: String,
}

/// The fields of [`PublisherFrame::Resume`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumeFields {
    task_id: TaskId,
    from_seq: u64,
}

impl Tagged for PublisherFrame {
    const EXPECTING: &'static str = "a publisher frame, an object tagged by `type`";

    fn variant<'de, D: serde::Deserializer<'de>>(tag: &str, rest: D) -> Result<Self, D::Error> {
        Ok(match tag {
            "register" => PublisherFrame::Register(Deserialize::deserialize(rest)?),
            "heartbeat" => PublisherFrame::Heartbeat(Deserialize::deserialize(rest)?),
            "result" => {
                let f = ResultFields::deserialize(rest)?;
                PublisherFrame::Result {
                    task_id: f.task_id,
                    status: f.status,
                    body: f.body,
                    retry_after: f.retry_after,
                }
            }
            "chunk" => {
                let f = ChunkFields::deserialize(rest)?;
                PublisherFrame::Chunk {
                    task_id: f.task_id,
                    data: f.data,
                    done: f.done,
                    seq: f.seq,
                }
            }
            "chunks" => {
                let f = ChunksFields::deserialize(rest)?;
                let run = ChunkRun {
                    data: f.data,
                    done: f.done,
                    seq: f.seq,
                };
                if !run.numbers_fit() {
                    return Err(serde::de::Error::custom("a run's seq overflows"));
                }
                PublisherFrame::Chunks {
                    task_id: f.task_id,
                    data: run.data,
                    done: run.done,
                    seq: run.seq,
                }
            }
            "error" => {
                let f = ErrorFields::deserialize(rest)?;
                PublisherFrame::Error {
                    task_id: f.task_id,
                    message: f.message,
                }
            }
            "resume" => {
                let f = ResumeFields::deserialize(rest)?;
                PublisherFrame::Resume {
                    task_id: f.task_id,
                    from_seq: f.from_seq,
                }
            }
            other => {
                return Err(serde::de::Error::unknown_variant(
                    other,
                    PUBLISHER_FRAME_TYPES,
                ));
            }
        })
    }
}

impl<'de> Deserialize<'de> for PublisherFrame {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_tagged(deserializer)
    }
}

/// The header of a `chunks` frame sent as lines (capability [`CHUNK_LINES`]).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LinesHeader<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    task_id: TaskId,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

impl PublisherFrame {
    /// Reads a WebSocket text frame: a JSON frame, or a `chunks` frame as lines
    /// (capability [`CHUNK_LINES`]): its first line a header with every field of a
    /// `chunks` frame but `data`, then 1 to [`MAX_RUN_CHUNKS`] chunks, separated by
    /// `\n`. A text whose first line is not such a header is read as JSON (a frame
    /// may be pretty-printed).
    pub fn from_text(text: &str) -> Result<PublisherFrame, serde_json::Error> {
        use serde::de::Error as _;
        let Some(end) = memchr::memchr(b'\n', text.as_bytes()) else {
            return serde_json::from_str(text);
        };
        let (head, lines) = (&text[..end], &text[end + 1..]);
        let header = match serde_json::from_str::<LinesHeader<'_>>(head) {
            Ok(header) if header.kind == "chunks" => header,
            _ => return serde_json::from_str(text),
        };
        let mut data = Vec::new();
        for line in lines.split('\n') {
            if data.len() == MAX_RUN_CHUNKS {
                return Err(serde_json::Error::custom(format!(
                    "a run of more than {MAX_RUN_CHUNKS} chunks"
                )));
            }
            data.push(line.to_owned());
        }
        let run = ChunkRun {
            data,
            done: header.done,
            seq: header.seq,
        };
        if !run.numbers_fit() {
            return Err(serde_json::Error::custom("a run's seq overflows"));
        }
        Ok(PublisherFrame::Chunks {
            task_id: header.task_id,
            data: run.data,
            done: run.done,
            seq: run.seq,
        })
    }

    /// This frame as a WebSocket text frame: JSON, except that with `lines` (the
    /// gateway granted [`CHUNK_LINES`]) a `chunks` frame goes as its header and its
    /// chunks as lines, unless one of them holds a line break (it goes as JSON, and
    /// the gateway refuses that chunk as it refuses any).
    pub fn to_text(&self, lines: bool) -> Result<String, serde_json::Error> {
        match self {
            PublisherFrame::Chunks {
                task_id,
                data,
                done,
                seq,
            } if lines && !data.is_empty() && !data.iter().any(|d| has_line_break(d)) => {
                let header = LinesHeader {
                    kind: "chunks".into(),
                    task_id: task_id.clone(),
                    done: *done,
                    seq: *seq,
                };
                let size = data.iter().map(|d| d.len() + 1).sum::<usize>();
                let mut text = String::with_capacity(128 + size);
                // Writing JSON into a String cannot fail but for a serializer's error.
                text.push_str(&serde_json::to_string(&header)?);
                for chunk in data {
                    text.push('\n');
                    text.push_str(chunk);
                }
                Ok(text)
            }
            _ => serde_json::to_string(self),
        }
    }

    /// The frame that carries `result` of `task_id`, alone.
    pub fn for_result(task_id: TaskId, result: TaskResult) -> Self {
        match result {
            TaskResult::Completed {
                status,
                body,
                retry_after,
            } => PublisherFrame::Result {
                task_id,
                status,
                body,
                retry_after,
            },
            TaskResult::Chunk { data, done, seq } => PublisherFrame::Chunk {
                task_id,
                data,
                done,
                seq,
            },
            TaskResult::Failed { message } => PublisherFrame::Error { task_id, message },
            TaskResult::Resume { from_seq } => PublisherFrame::Resume { task_id, from_seq },
        }
    }

    /// The frames that carry `results` of `task_id`, in order: each result's frame,
    /// except that with `runs` (the gateway granted [`CHUNK_RUNS`]) chunks that follow
    /// one another go as `chunks` frames (see [`Outgoing::group`]). The inverse of
    /// [`PublisherFrame::into_task_results`].
    pub fn for_results(
        task_id: &TaskId,
        results: impl IntoIterator<Item = TaskResult>,
        runs: bool,
    ) -> Vec<Self> {
        Outgoing::group(results, runs)
            .into_iter()
            .map(|out| match out {
                Outgoing::One(result) => PublisherFrame::for_result(task_id.clone(), result),
                Outgoing::Run(ChunkRun { data, done, seq }) => PublisherFrame::Chunks {
                    task_id: task_id.clone(),
                    data,
                    done,
                    seq,
                },
            })
            .collect()
    }

    /// For a result, chunk, chunks or error frame: the task and its results, in order
    /// (one, or a run's chunks each as a result of its own).
    pub fn into_task_results(self) -> Option<(TaskId, Vec<TaskResult>)> {
        match self {
            PublisherFrame::Result {
                task_id,
                status,
                body,
                retry_after,
            } => Some((
                task_id,
                vec![TaskResult::Completed {
                    status,
                    body,
                    retry_after,
                }],
            )),
            PublisherFrame::Chunk {
                task_id,
                data,
                done,
                seq,
            } => Some((task_id, vec![TaskResult::Chunk { data, done, seq }])),
            PublisherFrame::Chunks {
                task_id,
                data,
                done,
                seq,
            } => Some((task_id, ChunkRun { data, done, seq }.into_results())),
            PublisherFrame::Error { task_id, message } => {
                Some((task_id, vec![TaskResult::Failed { message }]))
            }
            PublisherFrame::Resume { task_id, from_seq } => {
                Some((task_id, vec![TaskResult::Resume { from_seq }]))
            }
            PublisherFrame::Register(_) | PublisherFrame::Heartbeat(_) => None,
        }
    }
}

/// A task's results as a publisher sends them: each alone, or chunks that follow one
/// another as one run (capability [`CHUNK_RUNS`]). As an HTTP result line it is the
/// result's own shape, or `{"chunks": {"data": [...], "done"?, "seq"?}}`.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    /// One result.
    One(TaskResult),
    /// Two or more chunks.
    Run(ChunkRun),
}

/// Chunks of one stream that follow one another: `data[i]` is chunk `seq + i`, and
/// `done` ends the stream after the last. The same as each chunk alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChunkRun {
    /// The chunks' SSE `data:` payloads, in order: 1 to [`MAX_RUN_CHUNKS`] of them.
    #[serde(deserialize_with = "run_data")]
    pub data: Vec<String>,
    /// The last chunk ends the stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// The first chunk's number (protocol 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl ChunkRun {
    /// Whether a chunk numbered `seq` of `len` bytes may join this run (the run has
    /// not ended, has room, and the chunk numbers on from it).
    fn takes(&self, bytes: usize, seq: Option<u64>, len: usize) -> bool {
        !self.done
            && self.data.len() < MAX_RUN_CHUNKS
            && bytes.saturating_add(len) <= MAX_RUN_BYTES
            && match (self.seq, seq) {
                (None, None) => true,
                (Some(first), Some(seq)) => first.checked_add(self.data.len() as u64) == Some(seq),
                _ => false,
            }
    }

    /// Whether every chunk's number fits in a `u64` (`seq + len`, the next one,
    /// included): a frame or line whose numbers do not is refused.
    fn numbers_fit(&self) -> bool {
        self.seq
            .is_none_or(|s| s.checked_add(self.data.len() as u64).is_some())
    }

    /// Each chunk as a result of its own, in order.
    pub fn into_results(self) -> Vec<TaskResult> {
        let ChunkRun { data, done, seq } = self;
        let last = data.len().saturating_sub(1);
        data.into_iter()
            .enumerate()
            .map(|(i, data)| TaskResult::Chunk {
                data,
                done: done && i == last,
                seq: seq.map(|s| s.saturating_add(i as u64)),
            })
            .collect()
    }
}

impl Outgoing {
    /// `results` in order, with `runs` the chunks that follow one another grouped into
    /// runs of up to [`MAX_RUN_CHUNKS`] chunks and [`MAX_RUN_BYTES`] bytes (a larger
    /// chunk goes alone); a gap in `seq`, a `done`, or another result ends a run, and a
    /// run of one chunk is that chunk. Without `runs`, each result alone.
    pub fn group(results: impl IntoIterator<Item = TaskResult>, runs: bool) -> Vec<Outgoing> {
        fn close(run: Option<(ChunkRun, usize)>, out: &mut Vec<Outgoing>) {
            if let Some((mut run, _)) = run {
                out.push(if run.data.len() == 1 {
                    Outgoing::One(TaskResult::Chunk {
                        data: run.data.pop().unwrap_or_default(),
                        done: run.done,
                        seq: run.seq,
                    })
                } else {
                    Outgoing::Run(run)
                });
            }
        }
        let mut out = Vec::new();
        let mut run: Option<(ChunkRun, usize)> = None;
        for result in results {
            match result {
                TaskResult::Chunk { data, done, seq } if runs => match &mut run {
                    Some((r, bytes)) if r.takes(*bytes, seq, data.len()) => {
                        *bytes += data.len();
                        r.data.push(data);
                        r.done = done;
                    }
                    _ => {
                        close(run.take(), &mut out);
                        let bytes = data.len();
                        run = Some((
                            ChunkRun {
                                data: vec![data],
                                done,
                                seq,
                            },
                            bytes,
                        ));
                    }
                },
                other => {
                    close(run.take(), &mut out);
                    out.push(Outgoing::One(other));
                }
            }
        }
        close(run, &mut out);
        out
    }
}

/// An [`Outgoing`] as an HTTP result line.
impl Serialize for Outgoing {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct RunLine<'a> {
            chunks: &'a ChunkRun,
        }
        match self {
            Outgoing::One(result) => result.serialize(serializer),
            Outgoing::Run(run) => RunLine { chunks: run }.serialize(serializer),
        }
    }
}

/// What one HTTP result body or NDJSON line carries: one result, or a run of chunks
/// (`{"chunks": {...}}`, capability [`CHUNK_RUNS`]) as its chunks, in order.
///
/// ```
/// use virtual_llm_core::protocol::TaskResults;
///
/// let run: TaskResults = serde_json::from_str(r#"{"chunks":{"data":["a","b"],"done":true,"seq":3}}"#).unwrap();
/// assert_eq!(run.0.len(), 2);
/// let one: TaskResults = serde_json::from_str(r#"{"error":"boom"}"#).unwrap();
/// assert_eq!(one.0.len(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "ResultWire")]
pub struct TaskResults(pub Vec<TaskResult>);

impl TryFrom<ResultWire> for TaskResults {
    type Error = String;

    fn try_from(mut w: ResultWire) -> Result<Self, String> {
        match w.chunks.take() {
            None => TaskResult::try_from(w).map(|r| TaskResults(vec![r])),
            Some(run) => {
                let alone = w.error.is_none()
                    && w.chunk.is_none()
                    && w.resume.is_none()
                    && w.status.is_none()
                    && w.body.is_none()
                    && w.retry_after.is_none();
                if !alone {
                    return Err("a run of chunks is alone in its result".to_owned());
                }
                if !run.numbers_fit() {
                    return Err("a run's seq overflows".to_owned());
                }
                Ok(TaskResults(run.into_results()))
            }
        }
    }
}

/// What a publisher posts for a task: a final answer, one chunk, an error, or (after
/// a reconnect) that the task goes on.
///
/// On the HTTP result route it is one of `{"status", "body", "retryAfter"?}`,
/// `{"chunk": {"data", "done"}}`, `{"error"}` or `{"resume": {"fromSeq"}}`; exactly
/// one of the shapes, or the body is refused.
///
/// ```
/// use virtual_llm_core::TaskResult;
///
/// let r: TaskResult = serde_json::from_str(r#"{"chunk":{"data":"{}","done":true}}"#).unwrap();
/// assert_eq!(r, TaskResult::Chunk { data: "{}".into(), done: true, seq: None });
/// assert!(serde_json::from_str::<TaskResult>(r#"{"error":"x","status":200}"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ResultWire", into = "ResultWire")]
pub enum TaskResult {
    /// The final answer, with the upstream's HTTP status: a completion, or the
    /// upstream's own error answer passed through.
    Completed {
        /// HTTP status, 200–599: an informational status (1xx) is no final answer,
        /// and a 101 would tell the client's connection to switch protocols.
        status: u16,
        /// Response body, as JSON text: it crosses the relay as it is.
        body: RawBody,
        /// The upstream's `Retry-After` in seconds (wire `retryAfter`, optional: a
        /// version 1 publisher never sends it). The client gets it as its header, cut to
        /// [`MAX_RETRY_AFTER_SECS`].
        retry_after: Option<u64>,
    },
    /// One streamed chunk; `done` ends the stream.
    Chunk {
        /// One SSE `data:` payload.
        data: String,
        /// Whether this ends the stream.
        done: bool,
        /// The chunk's number in its task, from 0 (protocol 2; `None` from a
        /// version 1 publisher). The gateway drops a number it has seen and fails the
        /// task on a gap.
        seq: Option<u64>,
    },
    /// The task failed at the publisher.
    Failed {
        /// What went wrong.
        message: String,
    },
    /// The task goes on after its publisher reconnected (SPEC §15, capability
    /// `resume`): the results that follow replay the task from chunk `from_seq`, the
    /// oldest the publisher still holds (0 for a task without chunks). The gateway drops
    /// the chunks it has already seen; a `from_seq` past the next chunk it needs fails
    /// the task, which lost chunks.
    Resume {
        /// The first `seq` replayed.
        from_seq: u64,
    },
}

impl TaskResult {
    /// Whether this result ends its task.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            TaskResult::Chunk { done: false, .. } | TaskResult::Resume { .. }
        )
    }

    /// Checks what serde cannot: a final HTTP status (200–599), a body nested no deeper
    /// than a `serde_json::Value` can be (127 levels: the body is passed on as its text, and
    /// a client parsing it must not be the first to find out), and chunk data that is
    /// one SSE `data:` payload: no line break (`\n` or `\r`), which would let a
    /// publisher forge fields (`event: error`, `data: [DONE]`, `id:`, `retry:`) in the
    /// client's stream. A serialized JSON chunk never has one.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            TaskResult::Completed { status, .. } if !(200..=599).contains(status) => Err(
                Error::invalid(format!("status {status} is not a final HTTP status")),
            ),
            TaskResult::Completed { body, .. } if !body.nests_within(MAX_BODY_DEPTH) => {
                Err(Error::invalid(format!(
                    "the body nests deeper than {MAX_BODY_DEPTH} arrays and objects"
                )))
            }
            TaskResult::Chunk { data, .. } if has_line_break(data) => Err(Error::invalid(
                "chunk data holds a line break: one SSE data payload has none",
            )),
            _ => Ok(()),
        }
    }
}

/// How deep a result's body may nest arrays and objects: as deep as serde_json's
/// recursion limit lets a `Value` be, which refused a deeper one when the gateway
/// parsed bodies into a tree.
const MAX_BODY_DEPTH: usize = 127;

/// Whether `data` holds a CR or an LF. Checked on every chunk relayed, so a SIMD
/// search for the two bytes rather than a walk over the chars.
fn has_line_break(data: &str) -> bool {
    memchr::memchr2(b'\n', b'\r', data.as_bytes()).is_some()
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct ResultWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunk: Option<ChunkWire>,
    /// A run of chunks: read only as [`TaskResults`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunks: Option<ChunkRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume: Option<ResumeWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    body: Option<RawBody>,
    #[serde(
        default,
        rename = "retryAfter",
        skip_serializing_if = "Option::is_none"
    )]
    retry_after: Option<u64>,
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct ChunkWire {
    #[serde(default)]
    data: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
struct ResumeWire {
    from_seq: u64,
}

/// A task result's schema is its wire form's: exactly one of `{error}`,
/// `{chunk: {data, done?, seq?}}` or `{status, body, retryAfter?}`.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for TaskResult {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        <ResultWire as utoipa::PartialSchema>::schema()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for TaskResult {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("TaskResult")
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        <ResultWire as utoipa::ToSchema>::schemas(schemas);
    }
}

impl TryFrom<ResultWire> for TaskResult {
    type Error = String;

    fn try_from(w: ResultWire) -> Result<Self, String> {
        if w.chunks.is_some() {
            return Err("a run of chunks is several results".to_owned());
        }
        let answer_only = w.body.is_none() && w.retry_after.is_none();
        match (w.error, w.chunk, w.status, w.resume) {
            (Some(error), None, None, None) if answer_only => Ok(TaskResult::Failed {
                message: error_message(error),
            }),
            (None, Some(c), None, None) if answer_only => Ok(TaskResult::Chunk {
                data: c.data,
                done: c.done,
                seq: c.seq,
            }),
            (None, None, None, Some(r)) if answer_only => Ok(TaskResult::Resume {
                from_seq: r.from_seq,
            }),
            (None, None, Some(status), None) => Ok(TaskResult::Completed {
                status,
                body: w.body.unwrap_or_else(RawBody::null),
                retry_after: w.retry_after,
            }),
            _ => Err(
                "a result is exactly one of {error}, {chunk:{data,done}}, {resume:{fromSeq}} or {status,body,retryAfter?}"
                    .to_owned(),
            ),
        }
    }
}

/// Publishers may send the error as a string or as an OpenAI error object.
fn error_message(error: Value) -> String {
    let text = match error {
        Value::String(s) => s,
        Value::Object(ref o) => match o.get("message") {
            Some(Value::String(m)) => m.clone(),
            _ => error.to_string(),
        },
        other => other.to_string(),
    };
    crate::error::bounded(text, MAX_ERROR_MESSAGE)
}

/// The longest error message kept from a publisher's result, in characters.
const MAX_ERROR_MESSAGE: usize = 4096;

impl From<TaskResult> for ResultWire {
    fn from(r: TaskResult) -> Self {
        match r {
            TaskResult::Completed {
                status,
                body,
                retry_after,
            } => ResultWire {
                status: Some(status),
                body: Some(body),
                retry_after,
                ..Default::default()
            },
            TaskResult::Chunk { data, done, seq } => ResultWire {
                chunk: Some(ChunkWire { data, done, seq }),
                ..Default::default()
            },
            TaskResult::Failed { message } => ResultWire {
                error: Some(Value::String(message)),
                ..Default::default()
            },
            TaskResult::Resume { from_seq } => ResultWire {
                resume: Some(ResumeWire { from_seq }),
                ..Default::default()
            },
        }
    }
}

/// The length of `value` as JSON, counted without building the text.
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    Ok(count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's one result; `None` for none or several.
    fn single((task, mut results): (TaskId, Vec<TaskResult>)) -> Option<(TaskId, TaskResult)> {
        (results.len() == 1).then(|| (task, results.remove(0)))
    }

    #[test]
    fn frames_carry_one_type_tag_and_round_trip() {
        let err = Error::invalid("bad frame");
        let frames = [
            GatewayFrame::Error(err.to_body()),
            GatewayFrame::Refused(Refusal::from_error(&err)),
            GatewayFrame::Cancel(CancelFrame {
                task_id: TaskId::generate(),
            }),
            GatewayFrame::Closing(Closing {
                reason: "bye".into(),
            }),
        ];
        for frame in frames {
            let text = serde_json::to_string(&frame).unwrap();
            assert_eq!(
                text.matches("\"type\":").count() - text.matches("\"error\":{").count(),
                1,
                "{text}"
            );
            assert_eq!(
                serde_json::from_str::<GatewayFrame>(&text).unwrap(),
                frame,
                "{text}"
            );
        }
    }

    /// A task frame carries the client's body as its text: spliced into the WebSocket
    /// frame and the SSE event's data without re-encoding, and read back as that text
    /// whether `type` comes first (as the gateway writes it) or anywhere else.
    #[test]
    fn a_task_frame_splices_the_body_and_reads_type_anywhere() {
        let body =
            RawBody::from_json(r#"{"z": 1, "model":"m", "messages":[ 1.50 ]}"#.to_owned()).unwrap();
        let task_id = TaskId::generate();
        let frame = GatewayFrame::Task(TaskFrame {
            task_id: task_id.clone(),
            kind: TaskKind::Infer,
            endpoint: Endpoint::Completions,
            llm: LlmName::parse("m").unwrap(),
            stream: true,
            body: body.clone(),
        });
        let ws = serde_json::to_string(&frame).unwrap();
        assert!(ws.starts_with(r#"{"type":"task","#), "{ws}");
        assert!(ws.contains(&format!(r#""body":{}"#, body.get())), "{ws}");
        assert_eq!(serde_json::from_str::<GatewayFrame>(&ws).unwrap(), frame);
        let sse = frame.payload_json().unwrap();
        assert!(
            sse.ends_with(&format!(r#""body":{}}}"#, body.get())),
            "{sse}"
        );
        assert_eq!(
            GatewayFrame::Task(serde_json::from_str(&sse).unwrap()),
            frame
        );
        // `type` last, as another implementation may write it: the same frame, the body
        // as its compact text.
        let late = format!(
            r#"{{"taskId":"{task_id}","kind":"infer","endpoint":"completions","llm":"m","stream":true,"body":{},"type":"task"}}"#,
            body.get()
        );
        let GatewayFrame::Task(read) = serde_json::from_str::<GatewayFrame>(&late).unwrap() else {
            panic!("a task")
        };
        assert_eq!(read.body.to_value().unwrap(), body.to_value().unwrap());
        assert_eq!(read.task_id, task_id);
        for bad in [
            r#"{"kind":"infer"}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":7}"#,
            r#"{"kind":"infer","type":1}"#,
            "[]",
        ] {
            assert!(serde_json::from_str::<GatewayFrame>(bad).is_err(), "{bad}");
        }
        let cancel = format!(r#"{{"taskId":"{task_id}","type":"cancel"}}"#);
        assert_eq!(
            serde_json::from_str::<GatewayFrame>(&cancel).unwrap(),
            GatewayFrame::Cancel(CancelFrame { task_id })
        );
    }

    #[test]
    fn every_result_maps_to_a_frame_and_back() {
        let task_id = TaskId::generate();
        for result in [
            TaskResult::Completed {
                status: 201,
                body: serde_json::json!({"ok": true}).into(),
                retry_after: None,
            },
            TaskResult::Completed {
                status: 503,
                body: serde_json::json!({"error": {"message": "Loading model"}}).into(),
                retry_after: Some(7),
            },
            TaskResult::Chunk {
                data: "x".into(),
                done: false,
                seq: None,
            },
            TaskResult::Chunk {
                data: "y".into(),
                done: true,
                seq: Some(7),
            },
            TaskResult::Failed {
                message: "boom".into(),
            },
        ] {
            let frame = PublisherFrame::for_result(task_id.clone(), result.clone());
            assert_eq!(
                frame.into_task_results().and_then(single),
                Some((task_id.clone(), result))
            );
        }
    }

    #[test]
    fn publisher_frames_round_trip_and_map_to_results() {
        let task_id = TaskId::generate();
        let text = format!(r#"{{"type":"chunk","taskId":"{task_id}","data":"x","done":true}}"#);
        let frame: PublisherFrame = serde_json::from_str(&text).unwrap();
        assert_eq!(
            frame.clone().into_task_results().and_then(single),
            Some((
                task_id,
                TaskResult::Chunk {
                    data: "x".into(),
                    done: true,
                    seq: None,
                }
            ))
        );
        assert_eq!(
            serde_json::from_str::<PublisherFrame>(&serde_json::to_string(&frame).unwrap())
                .unwrap(),
            frame
        );
        assert!(
            serde_json::from_str::<PublisherFrame>(r#"{"type":"chunk","taskId":"../x"}"#).is_err()
        );
    }

    /// A result whose `type` is not its first field (another publisher's encoder) is
    /// gathered into a map first; its answer still arrives as that answer's text, and a
    /// result without a body still reads as `null`, as a version 1 publisher sends it.
    #[test]
    fn a_result_frame_with_type_last_keeps_its_answer() {
        let task_id = TaskId::generate();
        let late = format!(
            r#"{{"taskId":"{task_id}","status":200,"body":{{"a":[1, 2.50,"x"]}},"retryAfter":3,"type":"result"}}"#
        );
        let Some((
            id,
            TaskResult::Completed {
                status,
                body,
                retry_after,
            },
        )) = serde_json::from_str::<PublisherFrame>(&late)
            .unwrap()
            .into_task_results()
            .and_then(single)
        else {
            panic!("a completed result: {late}")
        };
        assert_eq!((id, status, retry_after), (task_id.clone(), 200, Some(3)));
        assert_eq!(
            body.to_value().unwrap(),
            serde_json::json!({"a": [1, 2.5, "x"]})
        );
        assert!(!body.get().contains('\n'), "{}", body.get());
        let bodiless = format!(r#"{{"taskId":"{task_id}","status":204,"type":"result"}}"#);
        let Some((_, TaskResult::Completed { body, .. })) =
            serde_json::from_str::<PublisherFrame>(&bodiless)
                .unwrap()
                .into_task_results()
                .and_then(single)
        else {
            panic!("a completed result: {bodiless}")
        };
        assert_eq!(body.get(), "null");
    }

    #[test]
    fn task_results_are_exactly_one_shape() {
        for (json, ok) in [
            (r#"{"status":200,"body":{"a":1}}"#, true),
            (r#"{"error":{"message":"m"}}"#, true),
            (r#"{"chunk":{"data":"d"}}"#, true),
            (r#"{}"#, false),
            (r#"{"status":200,"chunk":{"data":"d"}}"#, false),
            (r#"{"error":"e","body":1}"#, false),
            (r#"{"status":503,"body":{},"retryAfter":7}"#, true),
            (r#"{"error":"e","retryAfter":7}"#, false),
            (r#"{"chunk":{"data":"d"},"retryAfter":7}"#, false),
            (r#"{"status":503,"retryAfter":-1}"#, false),
        ] {
            assert_eq!(
                serde_json::from_str::<TaskResult>(json).is_ok(),
                ok,
                "{json}"
            );
        }
        let failed: TaskResult = serde_json::from_str(r#"{"error":{"message":"oom"}}"#).unwrap();
        assert_eq!(
            failed,
            TaskResult::Failed {
                message: "oom".into()
            }
        );
    }

    /// `retryAfter` rides with a `{status, body}` answer on both transports' shapes (the
    /// HTTP result body, the WebSocket `result` frame) and is optional: a version 1
    /// answer without it decodes, and encodes back byte for byte.
    #[test]
    fn retry_after_travels_with_an_answer_and_is_optional() {
        let busy = TaskResult::Completed {
            status: 503,
            body: serde_json::json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}).into(),
            retry_after: Some(7),
        };
        let http = serde_json::to_value(&busy).unwrap();
        assert_eq!(http["retryAfter"], 7, "{http}");
        assert_eq!(serde_json::from_value::<TaskResult>(http).unwrap(), busy);

        let task_id = TaskId::generate();
        let frame = PublisherFrame::for_result(task_id.clone(), busy.clone());
        let text = serde_json::to_string(&frame).unwrap();
        assert!(text.contains(r#""retryAfter":7"#), "{text}");
        let back: PublisherFrame = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.into_task_results().and_then(single),
            Some((task_id.clone(), busy))
        );

        let v1 = r#"{"status":200,"body":{"ok":true}}"#;
        let answer: TaskResult = serde_json::from_str(v1).unwrap();
        assert_eq!(
            answer,
            TaskResult::Completed {
                status: 200,
                body: serde_json::json!({"ok": true}).into(),
                retry_after: None,
            }
        );
        assert_eq!(serde_json::to_string(&answer).unwrap(), v1, "nothing added");
        let v1_frame =
            format!(r#"{{"type":"result","taskId":"{task_id}","status":200,"body":null}}"#);
        let frame: PublisherFrame = serde_json::from_str(&v1_frame).unwrap();
        assert_eq!(
            serde_json::to_string(&frame).unwrap(),
            v1_frame,
            "nothing added"
        );
        assert!(matches!(
            frame.into_task_results().and_then(single),
            Some((
                _,
                TaskResult::Completed {
                    retry_after: None,
                    ..
                }
            ))
        ));
    }

    #[test]
    fn a_publishers_huge_error_message_is_bounded() {
        let huge = format!("{}the cause", "é".repeat(100_000));
        let json = serde_json::json!({ "error": huge }).to_string();
        let Ok(TaskResult::Failed { message }) = serde_json::from_str::<TaskResult>(&json) else {
            panic!("expected a failure")
        };
        assert!(message.chars().count() <= MAX_ERROR_MESSAGE);
        assert!(message.ends_with("the cause"), "the tail is kept");
    }

    /// `keepAliveMs` is optional both ways: a gateway's hello and register answer
    /// without it (an older gateway) still decode, and a publisher then falls back to
    /// its own rule; with it, it round-trips.
    #[test]
    fn keep_alive_is_optional_on_hello_and_registered() {
        let session = SessionId::generate();
        let old = serde_json::json!({"providerSessionId": session, "heartbeatIntervalMs": 30000});
        let hello: Hello = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(hello.keep_alive_ms, None);
        assert_eq!(serde_json::to_value(&hello).unwrap(), old, "nothing added");
        let mut registered = old;
        registered["llms"] = serde_json::json!([]);
        let answer: RegisterResponse = serde_json::from_value(registered).unwrap();
        assert_eq!(answer.keep_alive_ms, None);

        let new = GatewayFrame::Registered(RegisterResponse {
            keep_alive_ms: Some(20_000),
            ..answer
        });
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains("\"keepAliveMs\":20000"), "{text}");
        assert_eq!(serde_json::from_str::<GatewayFrame>(&text).unwrap(), new);
    }

    /// A run of chunks: built from the chunks that follow one another (a gap in `seq`,
    /// the run's limits, or another result starts a new frame; a run of one is a
    /// `chunk` frame), and read back as the same results.
    #[test]
    fn chunks_that_follow_one_another_cross_as_one_run() {
        let task = TaskId::generate();
        let chunk = |data: &str, seq: Option<u64>, done| TaskResult::Chunk {
            data: data.into(),
            done,
            seq,
        };
        let results = vec![
            chunk("a", Some(0), false),
            chunk("b", Some(1), false),
            chunk("c", Some(2), false),
            chunk("e", Some(4), false),
            chunk("f", Some(5), false),
            TaskResult::Failed {
                message: "boom".into(),
            },
        ];
        let frames = PublisherFrame::for_results(&task, results.clone(), true);
        let kinds: Vec<_> = frames
            .iter()
            .map(|f| serde_json::to_value(f).unwrap()["type"].clone())
            .collect();
        assert_eq!(kinds, ["chunks", "chunks", "error"]);
        let text = serde_json::to_string(&frames[0]).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"type":"chunks","taskId":"{task}","data":["a","b","c"],"done":false,"seq":0}}"#
            )
        );
        let back: Vec<TaskResult> = frames
            .into_iter()
            .flat_map(|f| {
                let text = serde_json::to_string(&f).unwrap();
                let f: PublisherFrame = serde_json::from_str(&text).unwrap();
                f.into_task_results().unwrap().1
            })
            .collect();
        assert_eq!(back, results);

        // Without runs, a frame per result, as a gateway that did not grant them reads.
        let frames = PublisherFrame::for_results(&task, results.clone(), false);
        assert_eq!(frames.len(), results.len());
        assert!(matches!(frames[0], PublisherFrame::Chunk { .. }));

        // A run ends with its `done`; one chunk alone is a `chunk` frame.
        let ended = PublisherFrame::for_results(
            &task,
            vec![
                chunk("a", None, false),
                chunk("", None, true),
                chunk("x", None, false),
            ],
            true,
        );
        assert!(
            matches!(&ended[0], PublisherFrame::Chunks { data, done: true, .. } if data.len() == 2)
        );
        assert!(matches!(&ended[1], PublisherFrame::Chunk { data, .. } if data == "x"));

        // The limits: chunks per run, and bytes per run (a larger chunk goes alone).
        let many: Vec<_> = (0..MAX_RUN_CHUNKS as u64 + 1)
            .map(|i| chunk("x", Some(i), false))
            .collect();
        let frames = PublisherFrame::for_results(&task, many, true);
        assert!(
            matches!(&frames[0], PublisherFrame::Chunks { data, .. } if data.len() == MAX_RUN_CHUNKS)
        );
        assert!(
            matches!(&frames[1], PublisherFrame::Chunk { seq: Some(s), .. } if *s == MAX_RUN_CHUNKS as u64)
        );
        let big = "y".repeat(MAX_RUN_BYTES);
        let frames = PublisherFrame::for_results(
            &task,
            vec![
                chunk("a", None, false),
                chunk(&big, None, false),
                chunk("b", None, false),
            ],
            true,
        );
        assert_eq!(frames.len(), 3, "a run stays within {MAX_RUN_BYTES} bytes");
    }

    /// A run sent as lines reads as the same frame as its JSON form; every other frame,
    /// and a run with a chunk that has a line break, goes as JSON and reads back.
    #[test]
    fn a_run_as_lines_reads_as_its_json_form() {
        let task = TaskId::generate();
        let chunks = [r#"{"a":"b\"c"}"#, "", "[DONE] is just text here", "é ✓"];
        let run = PublisherFrame::Chunks {
            task_id: task.clone(),
            data: chunks.iter().map(|c| (*c).to_owned()).collect(),
            done: true,
            seq: Some(7),
        };
        let lines = run.to_text(true).unwrap();
        assert_eq!(
            lines,
            format!(
                "{{\"type\":\"chunks\",\"taskId\":\"{task}\",\"done\":true,\"seq\":7}}\n{}",
                chunks.join("\n")
            )
        );
        assert_eq!(PublisherFrame::from_text(&lines).unwrap(), run);
        let json = run.to_text(false).unwrap();
        assert_eq!(json, serde_json::to_string(&run).unwrap());
        assert_eq!(PublisherFrame::from_text(&json).unwrap(), run);
        // A pretty-printed frame has line breaks too: it is read as JSON.
        let pretty = serde_json::to_string_pretty(&run).unwrap();
        assert_eq!(PublisherFrame::from_text(&pretty).unwrap(), run);
        // A chunk with a line break would split: the run goes as JSON, and the gateway
        // refuses that chunk as it refuses any.
        let broken = PublisherFrame::Chunks {
            task_id: task.clone(),
            data: vec!["a".into(), "b\nc".into()],
            done: false,
            seq: None,
        };
        let text = broken.to_text(true).unwrap();
        assert!(text.starts_with('{') && !text.contains('\n'), "{text}");
        assert_eq!(PublisherFrame::from_text(&text).unwrap(), broken);
        // Other frames are JSON whatever was granted.
        let one = PublisherFrame::Chunk {
            task_id: task,
            data: "x".into(),
            done: false,
            seq: Some(1),
        };
        assert_eq!(
            one.to_text(true).unwrap(),
            serde_json::to_string(&one).unwrap()
        );
    }

    /// A run as lines is refused past the chunk limit or past `u64`'s numbers, and a
    /// header with more than a `chunks` frame's fields, or another frame's, is read as
    /// JSON (and so refused with its lines).
    #[test]
    fn a_run_as_lines_out_of_bounds_is_refused() {
        let task = TaskId::generate();
        let header = format!(r#"{{"type":"chunks","taskId":"{task}"}}"#);
        let lines = |n: usize| vec!["c"; n].join("\n");
        assert!(PublisherFrame::from_text(&format!("{header}\n{}", lines(MAX_RUN_CHUNKS))).is_ok());
        for bad in [
            format!("{header}\n{}", lines(MAX_RUN_CHUNKS + 1)),
            format!(
                r#"{{"type":"chunks","taskId":"{task}","seq":{}}}"#,
                u64::MAX - 1
            ) + "\na\nb",
            format!(r#"{{"type":"chunks","taskId":"{task}","data":["a"]}}"#) + "\nb",
            format!(r#"{{"type":"chunk","taskId":"{task}"}}"#) + "\nb",
            format!(r#"{{"type":"chunks","taskId":"{task}","extra":1}}"#) + "\nb",
            r#"{"type":"chunks","taskId":"not a task id"}"#.to_owned() + "\nb",
            header.clone(),
        ] {
            assert!(PublisherFrame::from_text(&bad).is_err(), "{bad}");
        }
    }

    /// A `chunks` frame is refused when it is empty, longer than the limit, or numbers
    /// past `u64`: each would be a 400 and the socket's end.
    #[test]
    fn a_run_out_of_bounds_is_refused() {
        let task = TaskId::generate();
        let frame = |data: &str, seq: &str| {
            format!(r#"{{"type":"chunks","taskId":"{task}","data":{data}{seq}}}"#)
        };
        let too_many = serde_json::to_string(&vec![""; MAX_RUN_CHUNKS + 1]).unwrap();
        let just_enough = serde_json::to_string(&vec![""; MAX_RUN_CHUNKS]).unwrap();
        for bad in [
            frame("[]", ""),
            frame(&too_many, ""),
            frame(r#"["a","b"]"#, &format!(r#","seq":{}"#, u64::MAX - 1)),
            frame(r#"["a",1]"#, ""),
            frame(r#""a""#, ""),
        ] {
            assert!(
                serde_json::from_str::<PublisherFrame>(&bad).is_err(),
                "{bad}"
            );
        }
        // The same run as an HTTP result line: alone in its line, and only read as
        // several results.
        for bad in [
            r#"{"chunks":{"data":[]}}"#.to_owned(),
            format!(r#"{{"chunks":{{"data":{too_many}}}}}"#),
            format!(
                r#"{{"chunks":{{"data":["a","b"],"seq":{}}}}}"#,
                u64::MAX - 1
            ),
            r#"{"chunks":{"data":["a"]},"status":200}"#.to_owned(),
            r#"{"chunks":{"data":["a"]},"error":"x"}"#.to_owned(),
        ] {
            assert!(serde_json::from_str::<TaskResults>(&bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<TaskResult>(r#"{"chunks":{"data":["a"]}}"#).is_err());
        let line: TaskResults =
            serde_json::from_str(r#"{"chunks":{"data":["a","b"],"done":true,"seq":2}}"#).unwrap();
        assert_eq!(
            line.0,
            [
                TaskResult::Chunk {
                    data: "a".into(),
                    done: false,
                    seq: Some(2)
                },
                TaskResult::Chunk {
                    data: "b".into(),
                    done: true,
                    seq: Some(3)
                }
            ]
        );
        let ok: PublisherFrame = serde_json::from_str(&frame(&just_enough, r#","seq":7"#)).unwrap();
        let (_, results) = ok.into_task_results().unwrap();
        assert_eq!(results.len(), MAX_RUN_CHUNKS);
        assert_eq!(
            results.last(),
            Some(&TaskResult::Chunk {
                data: String::new(),
                done: false,
                seq: Some(7 + MAX_RUN_CHUNKS as u64 - 1),
            })
        );
    }
}
