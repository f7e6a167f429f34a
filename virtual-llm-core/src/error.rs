//! Errors, and the one place that maps them to HTTP statuses and OpenAI-shaped bodies.
//!
//! The core speaks no HTTP, but the status a caller should see is part of the contract
//! (SPEC §5), so it is decided here once: transports call [`Error::status`] and
//! [`Error::to_body`] and never choose a status themselves. Bodies never carry internal
//! details (store paths, I/O errors); those go to the log.

use std::fmt;
use std::time::Duration;

use crate::protocol::{ErrorBody, ErrorDetail, NameConflict};

/// What went wrong, as a caller can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed or breaks a rule (400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, in words a client can act on.
        message: String,
    },
    /// An LLM name breaks the name rules (400).
    #[error("invalid llm name {name:?}: {reason}")]
    InvalidName {
        /// The offending name, truncated.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// No credentials, or credentials nobody issued (401).
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// The principal lacks the role the action needs (403).
    #[error("this token may not {action}")]
    Forbidden {
        /// The action that was refused, e.g. `publish`.
        action: &'static str,
    },
    /// The gateway runs without tokens and the request did not come from a client on
    /// this machine (403): a foreign `Host` (DNS rebinding) or a web page's `Origin`.
    #[error(
        "refused in the no-token mode: {reason}; configure tokens to serve other hosts or origins"
    )]
    NotLocal {
        /// Which check failed.
        reason: &'static str,
    },
    /// The body's `Content-Type` is not JSON (415). In the no-token mode a JSON route
    /// refuses what a web page may send without a CORS preflight.
    #[error("unsupported content type {content_type:?}: send application/json")]
    UnsupportedMediaType {
        /// The content type sent, bounded; empty when none was.
        content_type: String,
    },
    /// No such route (404).
    #[error("no route for {what}")]
    NoRoute {
        /// The method and path asked for.
        what: String,
    },
    /// The route exists but not for this method (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No LLM of that name (404).
    #[error("unknown llm {name:?}")]
    UnknownLlm {
        /// The requested name.
        name: String,
    },
    /// The session is not known, or not the caller's (404); the publisher re-registers.
    #[error("unknown provider session")]
    UnknownSession,
    /// The task is not known, was cancelled, or belongs to another session (404).
    #[error("unknown task")]
    UnknownTask,
    /// Register refused: these names are taken (409). Nothing was written.
    #[error("llm names already taken: {}", describe_conflicts(conflicts))]
    Conflict {
        /// Every conflicting name of the request, with why.
        conflicts: Vec<NameConflict>,
    },
    /// The task already had its final result (409).
    #[error("task already finished")]
    TaskFinished,
    /// No streamed answer of that id is kept for the caller (404): it never existed,
    /// its resume window passed, it outgrew what the gateway keeps, or it is another
    /// principal's. The same answer for each, so that an id tells nobody anything.
    #[error("no streamed answer of that id to resume")]
    UnknownCompletion,
    /// A resumed answer cannot go on (410): it was cancelled when its last client
    /// went away, or it outgrew what the gateway keeps for resuming while this client
    /// was behind. Sent as a stream's `error` event.
    #[error("{reason}")]
    CompletionGone {
        /// Which of the two, in words.
        reason: &'static str,
    },
    /// The body or frame is over the limit (413).
    #[error("payload over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The publisher speaks a protocol version this gateway does not (426).
    #[error("unsupported protocol version {version}; this gateway speaks {supported}")]
    UnsupportedProtocol {
        /// The version asked for.
        version: u32,
        /// The version spoken here.
        supported: u32,
    },
    /// The LLM's publisher speaks a protocol version that does not relay this endpoint
    /// (a version 1 publisher knows chat completions only) (400).
    #[error(
        "llm {llm} cannot answer {endpoint}: its publisher speaks protocol version {protocol}, which relays chat completions only"
    )]
    UnsupportedEndpoint {
        /// The LLM.
        llm: String,
        /// The endpoint asked for.
        endpoint: crate::protocol::Endpoint,
        /// The publisher's protocol version.
        protocol: u32,
    },
    /// The publisher or the public upstream reported an error (502).
    #[error("upstream error: {message}")]
    Upstream {
        /// The upstream's message.
        message: String,
    },
    /// The LLM cannot answer now: publisher offline, inactive or saturated (503).
    #[error("{reason}")]
    Unavailable {
        /// Why, as a caller acts on it: whether another row may serve instead.
        kind: UnavailableKind,
        /// Why, for the client.
        reason: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The pool's admission queue is full (429): too many requests are already
    /// waiting for a slot.
    #[error("the queue of {pool} is full ({depth} requests waiting); retry later")]
    QueueFull {
        /// The pool.
        pool: String,
        /// How many requests wait in its queue.
        depth: usize,
        /// How long the queue should take to drain that far, from its recent pace.
        retry_after: Duration,
    },
    /// The caller is over one of its limits per minute or its `maxConcurrent` (429,
    /// SPEC §16); nothing of the request was done or counted.
    #[error("{}", describe_rate_limit(*kind, *requests, *tokens))]
    RateLimited {
        /// Which limit refused it.
        kind: crate::limits::LimitKind,
        /// When the limit lets a request in again.
        retry_after: Duration,
        /// The caller's request window, if it has a request limit.
        requests: Option<crate::limits::RateWindow>,
        /// The caller's token window, if it has a token limit.
        tokens: Option<crate::limits::RateWindow>,
    },
    /// A register would take the publisher over its `maxNames` or `maxSessions` (403,
    /// SPEC §16). Nothing was written.
    #[error("this register would hold {count} {what}, over the limit of {limit}")]
    QuotaExceeded {
        /// `names` or `sessions`.
        what: &'static str,
        /// What the principal would hold.
        count: usize,
        /// Its limit.
        limit: usize,
    },
    /// A request waited its longest in the pool's admission queue without a slot
    /// freeing (503).
    #[error("no member of {pool} had a free slot within {}s", waited.as_secs_f64())]
    QueueTimeout {
        /// The pool.
        pool: String,
        /// How long it waited.
        waited: Duration,
        /// When a slot should be free, from the pool's recent pace.
        retry_after: Duration,
    },
    /// A hibernating LLM's wake failed, now or within the wake cooldown (503): its
    /// publisher's message says why.
    #[error("waking {llm} failed: {message}")]
    WakeFailed {
        /// The LLM.
        llm: String,
        /// Why, as its publisher (or the webhook) reported it.
        message: String,
        /// The wake cooldown left: no wake is tried again before.
        retry_after: Duration,
    },
    /// A request waited its longest for a hibernating LLM to wake (503).
    #[error("{pool} did not wake within {}s", waited.as_secs_f64())]
    WakeTimeout {
        /// The pool (or LLM) asked for.
        pool: String,
        /// How long the request waited.
        waited: Duration,
        /// When to try again.
        retry_after: Duration,
    },
    /// The task's deadline passed (504).
    #[error("task deadline of {}s passed", deadline.as_secs_f64())]
    DeadlineExceeded {
        /// The deadline that passed (total, or idle between chunks).
        deadline: Duration,
    },
    /// The store failed (500, or 503 when it is merely busy).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The [`Config`](crate::Config) cannot work: a value out of range, or values that
    /// contradict each other (400: whoever supplied it supplied a bad one). Raised
    /// before the gateway starts.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// The settings involved, by their config key (`staleAfter`), so a binary can
        /// name its own flags for them.
        settings: Vec<&'static str>,
        /// What is wrong, naming the settings and their values.
        reason: String,
    },
}

/// Why a row cannot answer now, as a router acts on it: every kind but
/// [`Draining`](UnavailableKind::Draining) lets the request try another row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnavailableKind {
    /// Its publisher has no free slot, or its channel's queue is full.
    Saturated,
    /// Its publisher has no channel (it disconnected, or the row has no session), or a
    /// public row has no backend.
    Offline,
    /// The row is inactive.
    Inactive,
    /// The row is hibernating (asleep until woken).
    Hibernating,
    /// The gateway is shutting down: no row of this gateway will serve.
    Draining,
}

impl UnavailableKind {
    /// Whether another candidate row may serve the request instead: `false` only when
    /// the whole gateway refuses.
    pub fn try_another(self) -> bool {
        !matches!(self, UnavailableKind::Draining)
    }

    /// A stable label, e.g. for metrics: `saturated`, `offline`, `inactive`,
    /// `hibernating`, `draining`.
    pub fn as_str(self) -> &'static str {
        match self {
            UnavailableKind::Saturated => "saturated",
            UnavailableKind::Offline => "offline",
            UnavailableKind::Inactive => "inactive",
            UnavailableKind::Hibernating => "hibernating",
            UnavailableKind::Draining => "draining",
        }
    }
}

fn describe_rate_limit(
    kind: crate::limits::LimitKind,
    requests: Option<crate::limits::RateWindow>,
    tokens: Option<crate::limits::RateWindow>,
) -> String {
    use crate::limits::LimitKind;
    match (kind, requests, tokens) {
        (LimitKind::Requests, Some(w), _) => {
            format!("rate limit of {} requests per minute reached", w.limit)
        }
        (LimitKind::Tokens, _, Some(w)) => {
            format!("rate limit of {} tokens per minute reached", w.limit)
        }
        (LimitKind::Concurrent, ..) => "too many requests in flight at once".to_owned(),
        _ => "rate limit reached".to_owned(),
    }
}

fn describe_conflicts(conflicts: &[NameConflict]) -> String {
    conflicts
        .iter()
        .map(|c| format!("{} ({})", c.name, c.reason.describe()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Errors of a [`Store`](crate::Store) backend, by what a caller does about them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A compare-and-set lost: the row is not at the revision the write expected (or
    /// exists when it should not). Nothing of the batch was written; re-read and retry.
    #[error("row {name} changed concurrently")]
    Conflict {
        /// The first row whose expectation failed.
        name: String,
    },
    /// The batch itself is wrong (it names a row twice).
    #[error("invalid write batch: {reason}")]
    InvalidBatch {
        /// What is wrong with it.
        reason: String,
    },
    /// The backend could not do the operation (I/O, a full disk, a lost connection).
    /// Nothing was written; the same call may succeed later.
    #[error("store unavailable: {source}")]
    Unavailable {
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stored data is unreadable or inconsistent.
    #[error("store corrupted: {message}")]
    Corrupted {
        /// What was found.
        message: String,
    },
    /// The stored data was written by an incompatible version (schema mismatch).
    #[error("incompatible store: {message}")]
    Incompatible {
        /// Which versions.
        message: String,
    },
}

impl Error {
    /// The HTTP status a transport answers with. The single mapping of the project.
    pub fn status(&self) -> u16 {
        match self {
            Error::InvalidRequest { .. }
            | Error::InvalidName { .. }
            | Error::InvalidConfig { .. }
            | Error::UnsupportedEndpoint { .. } => 400,
            Error::Unauthenticated => 401,
            Error::Forbidden { .. } | Error::NotLocal { .. } | Error::QuotaExceeded { .. } => 403,
            Error::NoRoute { .. }
            | Error::UnknownLlm { .. }
            | Error::UnknownSession
            | Error::UnknownTask
            | Error::UnknownCompletion => 404,
            Error::MethodNotAllowed => 405,
            Error::Conflict { .. } | Error::TaskFinished => 409,
            Error::CompletionGone { .. } => 410,
            Error::PayloadTooLarge { .. } => 413,
            Error::UnsupportedMediaType { .. } => 415,
            Error::QueueFull { .. } | Error::RateLimited { .. } => 429,
            Error::UnsupportedProtocol { .. } => 426,
            Error::Upstream { .. } => 502,
            Error::Unavailable { .. }
            | Error::QueueTimeout { .. }
            | Error::WakeFailed { .. }
            | Error::WakeTimeout { .. } => 503,
            Error::DeadlineExceeded { .. } => 504,
            Error::Store(StoreError::Conflict { .. } | StoreError::Unavailable { .. }) => 503,
            Error::Store(_) => 500,
        }
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            500 => "server_error",
            502 => "upstream_error",
            503 => "service_unavailable",
            504 => "timeout_error",
            _ => "invalid_request_error",
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } => "invalid_request",
            Error::InvalidName { .. } => "invalid_name",
            Error::Unauthenticated => "unauthenticated",
            Error::Forbidden { .. } => "forbidden",
            Error::NotLocal { .. } => "not_local",
            Error::UnsupportedMediaType { .. } => "unsupported_media_type",
            Error::NoRoute { .. } => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::UnknownLlm { .. } => "model_not_found",
            Error::UnknownSession => "unknown_session",
            Error::UnknownTask => "unknown_task",
            Error::Conflict { .. } => "name_conflict",
            Error::TaskFinished => "task_finished",
            Error::UnknownCompletion => "completion_not_found",
            Error::CompletionGone { .. } => "completion_gone",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::UnsupportedProtocol { .. } => "unsupported_protocol_version",
            Error::UnsupportedEndpoint { .. } => "unsupported_endpoint",
            Error::Upstream { .. } => "upstream_error",
            Error::Unavailable { .. } => "llm_unavailable",
            Error::QueueFull { .. } => "queue_full",
            Error::RateLimited { .. } => "rate_limited",
            Error::QuotaExceeded { .. } => "quota_exceeded",
            Error::QueueTimeout { .. } => "queue_timeout",
            Error::WakeFailed { .. } => "wake_failed",
            Error::WakeTimeout { .. } => "wake_timeout",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::Store(StoreError::Conflict { .. }) => "registry_busy",
            Error::Store(StoreError::Unavailable { .. }) => "registry_unavailable",
            Error::Store(_) => "internal_error",
            Error::InvalidConfig { .. } => "invalid_configuration",
        }
    }

    /// How long a client should wait before retrying, for the `Retry-After` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Unavailable { retry_after, .. }
            | Error::QueueFull { retry_after, .. }
            | Error::RateLimited { retry_after, .. }
            | Error::QueueTimeout { retry_after, .. }
            | Error::WakeFailed { retry_after, .. }
            | Error::WakeTimeout { retry_after, .. } => Some(*retry_after),
            Error::Store(StoreError::Conflict { .. }) => Some(Duration::from_secs(1)),
            Error::Store(StoreError::Unavailable { .. }) => Some(REGISTRY_RETRY),
            _ => None,
        }
    }

    /// The headers an HTTP answer with this error carries: `Retry-After` for a 503 or 429,
    /// `WWW-Authenticate` for a 401.
    pub fn response_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(after) = self.retry_after() {
            let secs = match self {
                // Rounded up: a client that waits what it is told gets in.
                Error::RateLimited { .. } => after.as_millis().div_ceil(1000) as u64,
                _ => after.as_secs(),
            };
            headers.push(("retry-after", secs.max(1).to_string()));
        }
        if self.status() == 401 {
            headers.push(("www-authenticate", "Bearer".to_owned()));
        }
        headers
    }

    /// The OpenAI-shaped body `{"error":{"message","type","code"}}`. Store failures
    /// say only that something failed inside; the detail belongs in the log.
    pub fn to_body(&self) -> ErrorBody {
        let message = match self {
            Error::Store(StoreError::Conflict { .. }) => {
                "the registry is busy; retry shortly".to_owned()
            }
            Error::Store(StoreError::Unavailable { .. }) => {
                "the gateway's registry cannot be reached; retry shortly".to_owned()
            }
            Error::Store(_) => "internal error in the gateway's registry".to_owned(),
            other => bounded(other.to_string(), MAX_MESSAGE),
        };
        let conflicts = match self {
            Error::Conflict { conflicts } => Some(conflicts.clone()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                error_type: self.error_type().to_owned(),
                code: Some(self.code().to_owned()),
                conflicts,
            },
        }
    }

    /// Shorthand for a 503 of `kind`, retried after `retry_after`.
    pub fn unavailable(
        kind: UnavailableKind,
        reason: impl Into<String>,
        retry_after: Duration,
    ) -> Self {
        Error::Unavailable {
            kind,
            reason: reason.into(),
            retry_after,
        }
    }

    /// Shorthand for a 400 with a message. The message is bounded (its head and tail
    /// are kept): parser errors quote the input, and the input may be megabytes.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            message: bounded(message.into(), MAX_REQUEST_MESSAGE),
        }
    }
}

/// `T` as its `Display` shows it, with every control character escaped as Rust
/// writes it (`\n`, `\u{1b}`…): the one way virtual-llm logs text that may come from
/// the network (a publisher's error, a parser's error quoting its input), so that it
/// cannot start a forged log line or reach a terminal that `tail`s the log as an
/// escape sequence.
///
/// ```
/// use virtual_llm_core::error::Escaped;
///
/// let forged = "x\n2026-12-01T00:00:00Z  INFO gateway: FORGED\u{1b}[2J";
/// let logged = Escaped(forged).to_string();
/// assert_eq!(logged, "x\\n2026-12-01T00:00:00Z  INFO gateway: FORGED\\u{1b}[2J");
/// assert!(!logged.chars().any(char::is_control));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Passes what it is given on, control characters escaped.
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    if c.is_control() {
                        write!(self.0, "{}", c.escape_default())?;
                    } else {
                        fmt::Write::write_char(self.0, c)?;
                    }
                }
                Ok(())
            }
        }
        fmt::Write::write_fmt(&mut Escaping(f), format_args!("{}", self.0))
    }
}

/// The longest message of a 400, in characters.
const MAX_REQUEST_MESSAGE: usize = 512;
/// The longest message of any error body, in characters (a publisher's own error
/// messages are kept up to this length).
const MAX_MESSAGE: usize = 4096;

/// The `Retry-After` of a registry that cannot be reached (a database restarting, a
/// full disk): long enough not to hammer it, short enough for a failover to pass.
const REGISTRY_RETRY: Duration = Duration::from_secs(2);

/// `message` cut to at most `max_chars` characters: the one way virtual-llm bounds a
/// message that may echo untrusted input (a parser error quoting a megabyte body, a
/// publisher's error, a bad name, an upstream's answer).
///
/// A message of at most `max_chars` characters comes back as it is. A longer one keeps
/// its head and its tail (where parsers say which line and column) around a marker
/// saying how many characters were left out, the marker included in the `max_chars`;
/// when `max_chars` is too small for the marker, only the head is kept. So the result
/// never has more than `max_chars` characters, is cut at character boundaries, and
/// bounding it again changes nothing.
///
/// # Example
/// ```
/// use virtual_llm_core::error::bounded;
///
/// assert_eq!(bounded("short", 64), "short");
/// let long = format!("expected value at line 1 column {}", "9".repeat(1000));
/// let cut = bounded(long.as_str(), 64);
/// assert!(cut.chars().count() <= 64);
/// assert!(cut.starts_with("expected value at line 1"), "{cut}");
/// assert!(cut.contains("characters]"), "{cut}");
/// assert_eq!(bounded(cut.as_str(), 64), cut);
/// assert_eq!(bounded("truncated", 3), "tru");
/// ```
pub fn bounded(message: impl Into<String>, max_chars: usize) -> String {
    let message = message.into();
    let count = message.chars().count();
    if count <= max_chars {
        return message;
    }
    let marker = |left_out: usize| format!("…[{left_out} characters]…");
    // The marker names at most `count` characters, so it is at most this long.
    let marker_len = marker(count).chars().count();
    let byte_at = |chars: usize| {
        message
            .char_indices()
            .nth(chars)
            .map_or(message.len(), |(i, _)| i)
    };
    let Some(room) = max_chars.checked_sub(marker_len).filter(|&r| r > 0) else {
        return message[..byte_at(max_chars)].to_owned();
    };
    let tail_len = room / 4;
    let head_len = room - tail_len;
    let head = &message[..byte_at(head_len)];
    let tail = &message[byte_at(count - tail_len)..];
    format!("{head}{}{tail}", marker(count - head_len - tail_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ConflictReason;

    #[test]
    fn every_variant_maps_to_its_status_and_a_typed_body() {
        let cases: Vec<(Error, u16)> = vec![
            (Error::invalid("x"), 400),
            (crate::LlmName::parse("_x").unwrap_err(), 400),
            (Error::Unauthenticated, 401),
            (Error::Forbidden { action: "publish" }, 403),
            (Error::UnknownLlm { name: "a".into() }, 404),
            (
                Error::NoRoute {
                    what: "GET /x".into(),
                },
                404,
            ),
            (Error::MethodNotAllowed, 405),
            (Error::UnknownSession, 404),
            (Error::UnknownTask, 404),
            (Error::Conflict { conflicts: vec![] }, 409),
            (Error::TaskFinished, 409),
            (Error::PayloadTooLarge { limit: 1 }, 413),
            (
                Error::UnsupportedMediaType {
                    content_type: "text/plain".into(),
                },
                415,
            ),
            (Error::NotLocal { reason: "host" }, 403),
            (
                Error::UnsupportedProtocol {
                    version: 9,
                    supported: 1,
                },
                426,
            ),
            (
                Error::Upstream {
                    message: "boom".into(),
                },
                502,
            ),
            (
                Error::Unavailable {
                    kind: UnavailableKind::Offline,
                    reason: "off".into(),
                    retry_after: Duration::from_secs(5),
                },
                503,
            ),
            (
                Error::DeadlineExceeded {
                    deadline: Duration::from_secs(1),
                },
                504,
            ),
            (
                Error::Store(StoreError::Corrupted {
                    message: "secret path".into(),
                }),
                500,
            ),
            (
                Error::Store(StoreError::Unavailable {
                    source: "secret path".into(),
                }),
                503,
            ),
            (
                Error::InvalidConfig {
                    settings: vec!["gcEvery"],
                    reason: "gcEvery must be positive".into(),
                },
                400,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err:?}");
            let body = serde_json::to_value(err.to_body()).unwrap();
            assert!(body["error"]["message"].is_string());
            assert!(body["error"]["type"].is_string());
            assert!(body["error"]["code"].is_string());
            assert!(
                !body.to_string().contains("secret path"),
                "internals leaked: {body}"
            );
        }
    }

    #[test]
    fn messages_echoing_huge_input_are_bounded_head_and_tail() {
        let huge = format!(
            "invalid type: string \"{}\", at line 1 column 9",
            "x".repeat(1 << 20)
        );
        let err = Error::invalid(huge);
        let message = err.to_string();
        assert!(
            message.chars().count() < MAX_REQUEST_MESSAGE + 40,
            "{}",
            message.len()
        );
        assert!(message.starts_with("invalid type: string \"xxx"));
        assert!(message.ends_with("at line 1 column 9"), "{message}");
        let upstream = Error::Upstream {
            message: "é".repeat(10_000),
        };
        let body = upstream.to_body();
        assert!(body.error.message.chars().count() < MAX_MESSAGE + 40);
        assert_eq!(Error::invalid("short").to_string(), "short");
    }

    #[test]
    fn bounded_keeps_short_messages_and_cuts_long_ones_to_the_limit() {
        assert_eq!(bounded("", 0), "");
        assert_eq!(bounded("exactly", 7), "exactly");
        for max in [0, 1, 5, 20, 30, 64, 512, 4096] {
            for count in [max + 1, max + 25, 3 * max + 7, 100_000] {
                // Multibyte characters: the cuts fall on character boundaries.
                let message: String = (0..count)
                    .map(|i| if i % 3 == 0 { 'é' } else { 'x' })
                    .collect();
                let cut = bounded(message.as_str(), max);
                let chars = cut.chars().count();
                assert!(chars <= max, "{chars} > {max}: {cut}");
                assert_eq!(bounded(cut.as_str(), max), cut, "bounding twice");
                if chars > 0 {
                    assert_eq!(cut.chars().next(), message.chars().next());
                }
                if cut.contains("characters]") {
                    let (head, rest) = cut.split_once('…').unwrap();
                    let (marker, tail) = rest.split_once('…').unwrap();
                    let left_out: usize = marker
                        .trim_start_matches('[')
                        .trim_end_matches(" characters]")
                        .parse()
                        .unwrap();
                    assert_eq!(
                        head.chars().count() + left_out + tail.chars().count(),
                        count,
                        "the marker counts what was left out: {cut}"
                    );
                    assert!(message.starts_with(head) && message.ends_with(tail));
                    assert!(head.chars().count() >= tail.chars().count());
                } else {
                    assert!(
                        message.starts_with(&cut),
                        "too short for a marker: the head"
                    );
                }
            }
        }
    }

    #[test]
    fn conflicts_are_named_and_503_carries_retry_after() {
        let err = Error::Conflict {
            conflicts: vec![NameConflict {
                name: "a".into(),
                reason: ConflictReason::PublicLlm,
            }],
        };
        let body = serde_json::to_value(err.to_body()).unwrap();
        assert_eq!(body["error"]["conflicts"][0]["name"], "a");
        assert!(err.to_string().contains("a (a public llm has this name)"));
        let off = Error::Unavailable {
            kind: UnavailableKind::Inactive,
            reason: "x".into(),
            retry_after: Duration::from_secs(7),
        };
        assert_eq!(off.retry_after(), Some(Duration::from_secs(7)));
    }
}
