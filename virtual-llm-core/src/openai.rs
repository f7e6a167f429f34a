//! The few facts about OpenAI request bodies the core needs: which model, which
//! endpoint and whether to stream (read from the body's text, see [`RawBody`]), the
//! last user message and the prompt (for the echo model), and how completion, chunk
//! and embedding objects look.

use std::time::Duration;

use serde_json::{Value, json};

use crate::Error;
use crate::protocol::Endpoint;
use crate::raw_body::{RawBody, Shape};

/// A client's inference request, checked enough to route it.
#[derive(Clone, Debug, PartialEq)]
pub struct InferRequest {
    /// The LLM name to route to (`model` of the body, or the path's name).
    pub llm: String,
    /// Which OpenAI endpoint the body is for.
    pub endpoint: Endpoint,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The client's body, passed to the publisher as it is: its JSON text, never
    /// parsed into a tree on the gateway (see [`RawBody`]).
    pub body: RawBody,
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
        Self::from_body(Endpoint::ChatCompletions, body)
    }

    /// A body of one of the OpenAI routes (`POST /v1/chat/completions`,
    /// `/v1/completions`, `/v1/embeddings`): routed by its `model`.
    pub fn from_body(endpoint: Endpoint, body: Value) -> Result<Self, Error> {
        Self::checked(endpoint, None, RawBody::from(body))
    }

    /// A `POST {base}/{name}/infer` body, a chat completion: routed by the path's name.
    pub fn for_llm(llm: &str, body: Value) -> Result<Self, Error> {
        Self::for_endpoint(Endpoint::ChatCompletions, llm, body)
    }

    /// A body for `endpoint`, routed to `llm` (see [`InferRequest::read`] for the
    /// checks).
    pub fn for_endpoint(endpoint: Endpoint, llm: &str, body: Value) -> Result<Self, Error> {
        Self::checked(endpoint, Some(llm), RawBody::from(body))
    }

    /// A body for `endpoint` as the client sent it, kept as its text (a [`RawBody`]):
    /// routed to `llm`, or by the body's `model` (a string) when `llm` is `None`. It
    /// is checked enough to route it, in one pass that builds no tree: UTF-8 and one
    /// JSON value nested at most 128 deep (else 400 `invalid JSON body`), an object;
    /// `messages` an array for chat, `prompt` a string or an array for completions,
    /// `input` a string or an array for embeddings; `stream` a boolean (or `null`), and
    /// never true for embeddings. Of a field given twice, the last counts, as when the
    /// body is parsed into an object.
    pub fn read(endpoint: Endpoint, llm: Option<&str>, body: Vec<u8>) -> Result<Self, Error> {
        let body = RawBody::from_client(body)
            .map_err(|e| Error::invalid(format!("invalid JSON body: {e}")))?;
        Self::checked(endpoint, llm, body)
    }

    fn checked(endpoint: Endpoint, llm: Option<&str>, body: RawBody) -> Result<Self, Error> {
        let facts = body
            .facts()
            .map_err(|e| Error::invalid(format!("invalid JSON body: {e}")))?;
        if !facts.object {
            return Err(Error::invalid("the request body must be a JSON object"));
        }
        let llm = match (llm, facts.model) {
            (Some(llm), _) => llm.to_owned(),
            (None, Some(Shape::String(Some(model)))) => model,
            (None, Some(_)) => return Err(Error::invalid("model must be a string")),
            (None, None) => return Err(Error::invalid("model is required")),
        };
        let (field, kinds, shape) = match endpoint {
            Endpoint::ChatCompletions => ("messages", "an array", facts.messages),
            Endpoint::Completions => ("prompt", "a string or an array", facts.prompt),
            Endpoint::Embeddings => ("input", "a string or an array", facts.input),
        };
        match (shape, endpoint) {
            (Some(Shape::Array), _) => {}
            (Some(Shape::String(_)), Endpoint::Completions | Endpoint::Embeddings) => {}
            (Some(_), _) => return Err(Error::invalid(format!("{field} must be {kinds}"))),
            (None, _) => return Err(Error::invalid(format!("{field} is required"))),
        }
        let stream = match facts.stream {
            None | Some(Shape::Null) => false,
            Some(Shape::Bool(b)) => b,
            Some(_) => return Err(Error::invalid("stream must be a boolean")),
        };
        if stream && !endpoint.streams() {
            return Err(Error::invalid(format!("{endpoint} are not streamed")));
        }
        Ok(InferRequest {
            llm,
            endpoint,
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
        "usage": usage_body(0, 0),
    })
}

/// An OpenAI `usage` object.
pub fn usage_body(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Whether a streaming request asked for a closing usage chunk
/// (`stream_options.include_usage`).
pub fn wants_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The text of every message of a chat request (string contents and text parts),
/// joined by spaces: what its prompt is made of.
pub fn all_messages_text(body: &Value) -> String {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return String::new();
    };
    messages
        .iter()
        .map(|m| content_text(m.get("content")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The items of a `prompt` (completions) or `input` (embeddings) field, each as text:
/// a string is one item, an array of strings one item each, an array of token ids (or
/// of arrays of them) each item's ids written as numbers separated by spaces.
pub fn input_items(value: Option<&Value>) -> Vec<String> {
    fn tokens(v: &Value) -> String {
        match v {
            Value::Array(ids) => ids.iter().map(tokens).collect::<Vec<_>>().join(" "),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![tokens(&Value::Array(items.clone()))]
        }
        Some(Value::Array(items)) => items.iter().map(tokens).collect(),
        _ => Vec::new(),
    }
}

/// A `text_completion` object (`POST /v1/completions`): one choice per prompt.
pub fn text_completion_body(
    id: &str,
    model: &str,
    created: u64,
    texts: &[String],
    usage: Value,
) -> Value {
    let choices: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| text_choice(i, t, Some("stop")))
        .collect();
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    })
}

/// A streamed `text_completion` chunk: one piece of choice `index`'s text, or its
/// closing chunk with a `finish_reason`.
pub fn text_chunk_body(
    id: &str,
    model: &str,
    created: u64,
    index: usize,
    text: &str,
    finish_reason: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [text_choice(index, text, finish_reason)],
    })
}

fn text_choice(index: usize, text: &str, finish_reason: Option<&str>) -> Value {
    json!({ "index": index, "text": text, "logprobs": null, "finish_reason": finish_reason })
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
    fn each_endpoint_checks_its_own_field() {
        let ok = |e, body| InferRequest::from_body(e, body).unwrap();
        let r = ok(
            Endpoint::Completions,
            json!({"model":"m","prompt":"p","stream":true}),
        );
        assert_eq!((r.endpoint, r.stream), (Endpoint::Completions, true));
        ok(
            Endpoint::Completions,
            json!({"model":"m","prompt":["a","b"]}),
        );
        ok(
            Endpoint::Embeddings,
            json!({"model":"m","input":[[1,2],[3]]}),
        );
        for (endpoint, bad) in [
            (Endpoint::Completions, json!({"model":"m"})),
            (Endpoint::Completions, json!({"model":"m","prompt":3})),
            (Endpoint::Completions, json!({"model":"m","messages":[]})),
            (Endpoint::Embeddings, json!({"model":"m","input":{}})),
            (
                Endpoint::Embeddings,
                json!({"model":"m","input":"x","stream":true}),
            ),
            (
                Endpoint::ChatCompletions,
                json!({"model":"m","messages":"x"}),
            ),
        ] {
            let err = InferRequest::from_body(endpoint, bad.clone()).unwrap_err();
            assert_eq!(err.status(), 400, "{endpoint}: {bad}");
        }
        assert_eq!(
            input_items(Some(&json!([[1, 2], [3]]))),
            ["1 2".to_owned(), "3".to_owned()]
        );
        assert_eq!(input_items(Some(&json!([1, 2]))), ["1 2".to_owned()]);
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
