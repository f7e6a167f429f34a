//! The few facts about OpenAI chat-completions bodies the core needs: which model and
//! whether to stream, the last user message (for the echo model), and how completion
//! and chunk objects look.

use std::time::Duration;

use serde_json::{Value, json};

use crate::Error;

/// A client's inference request, checked enough to route it.
#[derive(Clone, Debug, PartialEq)]
pub struct InferRequest {
    /// The LLM name to route to (`model` of the body, or the path's name).
    pub llm: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The client's body, passed to the publisher as it is.
    pub body: Value,
    /// How long the client will wait at most (its `x-request-timeout`): bounds the
    /// time in a pool's queue and the task's deadline. `None`: the gateway's own.
    pub timeout: Option<Duration>,
}

/// The header a client bounds its request's wait with, in seconds (SPEC §11).
pub const REQUEST_TIMEOUT_HEADER: &str = "x-request-timeout";

/// The longest `x-request-timeout` accepted, in seconds: a day.
const MAX_REQUEST_TIMEOUT_SECS: f64 = 86_400.0;

/// Parses an `x-request-timeout` value: seconds, a positive number (fractions allowed),
/// at most a day; anything else is a 400.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_core::openai::parse_request_timeout;
///
/// assert_eq!(parse_request_timeout("2.5").unwrap(), Duration::from_millis(2500));
/// assert!(parse_request_timeout("0").is_err());
/// assert!(parse_request_timeout("soon").is_err());
/// ```
pub fn parse_request_timeout(value: &str) -> Result<Duration, Error> {
    let secs: f64 = value.trim().parse().map_err(|_| {
        Error::invalid(format!(
            "{REQUEST_TIMEOUT_HEADER} must be a number of seconds"
        ))
    })?;
    if !(secs > 0.0 && secs <= MAX_REQUEST_TIMEOUT_SECS) {
        return Err(Error::invalid(format!(
            "{REQUEST_TIMEOUT_HEADER} must be more than 0 and at most {MAX_REQUEST_TIMEOUT_SECS} seconds"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl InferRequest {
    /// A `POST /v1/chat/completions` body: routed by its `model`.
    pub fn from_chat_body(body: Value) -> Result<Self, Error> {
        let llm = match body.get("model") {
            Some(Value::String(m)) => m.clone(),
            Some(_) => return Err(Error::invalid("model must be a string")),
            None => return Err(Error::invalid("model is required")),
        };
        Self::for_llm(&llm, body)
    }

    /// A `POST {base}/{name}/infer` body: routed by the path's name.
    pub fn for_llm(llm: &str, body: Value) -> Result<Self, Error> {
        let Value::Object(fields) = &body else {
            return Err(Error::invalid("the request body must be a JSON object"));
        };
        match fields.get("messages") {
            Some(Value::Array(_)) => {}
            Some(_) => return Err(Error::invalid("messages must be an array")),
            None => return Err(Error::invalid("messages is required")),
        }
        let stream = match fields.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(Error::invalid("stream must be a boolean")),
        };
        Ok(InferRequest {
            llm: llm.to_owned(),
            stream,
            body,
            timeout: None,
        })
    }

    /// The same request, bounded by the client's `timeout` (see
    /// [`InferRequest::timeout`]).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The text of the last `user` message: a string content, or its text parts joined.
pub fn last_user_text(body: &Value) -> String {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    let Some(msg) = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return String::new();
    };
    match msg.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// A `chat.completion` object with one assistant message.
pub fn completion_body(id: &str, model: &str, created: u64, text: &str) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "finish_reason": "stop",
        }],
        "usage": { "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 },
    })
}

/// A `chat.completion.chunk` object: a content delta, or the closing chunk with a
/// `finish_reason` and an empty delta.
pub fn chunk_body(
    id: &str,
    model: &str,
    created: u64,
    content: Option<&str>,
    finish_reason: Option<&str>,
) -> Value {
    let delta = match content {
        Some(c) => json!({ "role": "assistant", "content": c }),
        None => json!({}),
    };
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_model_and_checks_shape() {
        let r =
            InferRequest::from_chat_body(json!({"model":"m","messages":[],"stream":true})).unwrap();
        assert_eq!((r.llm.as_str(), r.stream), ("m", true));
        for bad in [
            json!({"messages":[]}),
            json!({"model":1,"messages":[]}),
            json!({"model":"m"}),
            json!({"model":"m","messages":{}}),
            json!({"model":"m","messages":[],"stream":"yes"}),
            json!(["not an object"]),
        ] {
            let err = InferRequest::from_chat_body(bad.clone()).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
        }
    }

    #[test]
    fn last_user_text_handles_strings_and_parts() {
        let body = json!({"messages":[
            {"role":"user","content":"first"},
            {"role":"assistant","content":"reply"},
            {"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url"},{"type":"text","text":"there"}]},
            {"role":"system","content":"late system"}
        ]});
        assert_eq!(last_user_text(&body), "hello there");
        assert_eq!(last_user_text(&json!({})), "");
    }
}
