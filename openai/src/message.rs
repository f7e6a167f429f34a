//! What an upstream said when it failed: the message of an error body in any of the
//! shapes OpenAI-compatible servers use, kept short, as an [`Error::Upstream`]; and the
//! body an error answer is passed through with ([`error_body`]).

use reqwest::StatusCode;
use serde_json::{Value, json};
use virtual_llm_core::Error;

/// The most of an upstream message kept in an [`Error::Upstream`].
const MAX_MESSAGE_CHARS: usize = 1000;

/// An [`Error::Upstream`] (502) carrying `message`.
pub(crate) fn upstream(message: impl Into<String>) -> Error {
    Error::Upstream {
        message: message.into(),
    }
}

/// The body of an upstream's error answer (a 4xx or 5xx) as the client gets it: the
/// upstream's own when it is a JSON object (OpenAI's error shape, llama.cpp's
/// `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`,
/// Ollama's `{"error":"…"}`), else its text, kept short, in OpenAI's error shape
/// `{"error":{"message","type","code":null}}`. `whole` says whether `body` is all of
/// the answer's body, or only its first bytes (it was over the limit).
pub(crate) fn error_body(status: StatusCode, body: &[u8], whole: bool) -> Value {
    let parsed = serde_json::from_slice(body);
    if whole && let Ok(object @ Value::Object(_)) = parsed {
        return object;
    }
    let text = match parsed {
        Ok(Value::String(text)) => truncate(text.trim()),
        _ => raw_message(body),
    };
    let message = if text.is_empty() {
        status.to_string()
    } else {
        text
    };
    json!({"error": {"message": message, "type": error_type(status), "code": null}})
}

/// The OpenAI error `type` of a wrapped error answer, by its status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
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
    }

    #[test]
    fn an_error_answer_keeps_a_json_object_and_wraps_anything_else() {
        let llama =
            r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
        let got = error_body(StatusCode::SERVICE_UNAVAILABLE, llama.as_bytes(), true);
        assert_eq!(got, serde_json::from_str::<Value>(llama).unwrap());
        let fastapi = r#"{"detail":"Not authenticated"}"#;
        let got = error_body(StatusCode::UNAUTHORIZED, fastapi.as_bytes(), true);
        assert_eq!(
            got,
            json!({"detail": "Not authenticated"}),
            "any object, as sent"
        );

        let wrapped = |status, body: &str, whole| error_body(status, body.as_bytes(), whole);
        assert_eq!(
            wrapped(StatusCode::INTERNAL_SERVER_ERROR, " oops \n", true),
            json!({"error": {"message": "oops", "type": "server_error", "code": null}})
        );
        assert_eq!(
            wrapped(StatusCode::FORBIDDEN, r#""no access""#, true),
            json!({"error": {"message": "no access", "type": "permission_error", "code": null}})
        );
        assert_eq!(
            wrapped(StatusCode::UNAUTHORIZED, "", true),
            json!({"error": {"message": "401 Unauthorized", "type": "authentication_error", "code": null}})
        );
        assert_eq!(
            wrapped(StatusCode::TOO_MANY_REQUESTS, "[1,2]", true)["error"]["type"],
            "invalid_request_error"
        );
        // The head of an object too big to keep whole is text, kept short.
        let big = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(5000));
        let got = wrapped(StatusCode::BAD_REQUEST, &big, false);
        let message = got["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(r#"{"error":{"message":"xxx"#),
            "{message}"
        );
        assert!(message.chars().count() <= MAX_MESSAGE_CHARS);
    }
}
