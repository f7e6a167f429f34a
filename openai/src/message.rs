//! What an upstream said when it failed: the message of an error body in any of the
//! shapes OpenAI-compatible servers use, kept short, as an [`Error::Upstream`].

use reqwest::StatusCode;
use serde_json::Value;
use virtual_llm_core::Error;

/// The most of an upstream message kept in an [`Error::Upstream`].
const MAX_MESSAGE_CHARS: usize = 1000;

/// An [`Error::Upstream`] (502) carrying `message`.
pub(crate) fn upstream(message: String) -> Error {
    Error::Upstream { message }
}

/// The message of an error body in one of the shapes OpenAI-compatible servers use:
/// `{"error":{"message":..}}` (OpenAI, newer vLLM, llama.cpp), `{"error":".."}` (Ollama),
/// `{"message":..}` (older vLLM), `{"detail":..}` (FastAPI servers).
pub(crate) fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let message = match value.get("error") {
        Some(Value::Object(error)) => match error.get("message") {
            Some(Value::String(m)) => m.clone(),
            _ => Value::Object(error.clone()).to_string(),
        },
        Some(Value::String(m)) => m.clone(),
        _ => match (value.get("message"), value.get("detail")) {
            (Some(Value::String(m)), _) | (_, Some(Value::String(m))) => m.clone(),
            _ => return None,
        },
    };
    Some(truncate(message.trim()))
}

/// A body that is not a recognised error shape, as text.
pub(crate) fn raw_message(body: &[u8]) -> String {
    truncate(String::from_utf8_lossy(body).trim())
}

/// `text` within `MAX_MESSAGE_CHARS` characters: the core's one way to cut a message
/// (head and tail kept around a marker saying how much was left out).
pub(crate) fn truncate(text: &str) -> String {
    virtual_llm_core::error::bounded(text, MAX_MESSAGE_CHARS)
}

/// `"404 Not Found: the model does not exist"`, or the status alone.
pub(crate) fn describe_status(status: StatusCode, message: &str) -> String {
    if message.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_every_known_shape() {
        let cases: [(&str, Option<&str>); 7] = [
            (
                r#"{"error":{"message":"no such model","type":"x"}}"#,
                Some("no such model"),
            ),
            (
                r#"{"error":"model 'x' not found"}"#,
                Some("model 'x' not found"),
            ),
            (
                r#"{"object":"error","message":"too long","code":400}"#,
                Some("too long"),
            ),
            (
                r#"{"detail":"Not authenticated"}"#,
                Some("Not authenticated"),
            ),
            (r#"{"error":{"code":7}}"#, Some(r#"{"code":7}"#)),
            (r#"{"other":1}"#, None),
            ("<html>bad gateway</html>", None),
        ];
        for (body, want) in cases {
            assert_eq!(error_message(body.as_bytes()).as_deref(), want, "{body}");
        }
        let long = "x".repeat(5000);
        let msg = raw_message(long.as_bytes());
        assert!(msg.chars().count() <= MAX_MESSAGE_CHARS, "{}", msg.len());
        assert!(msg.contains(" characters]…"), "the cut is marked: {msg}");
        assert_eq!(
            describe_status(StatusCode::BAD_GATEWAY, ""),
            "502 Bad Gateway"
        );
    }
}
