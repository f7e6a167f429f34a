//! The echo model: answers chat with the last user message and completions with the
//! prompt, one word per streamed chunk, and embeddings with 8 numbers derived from the
//! input's bytes. Deterministic and dependency-free, for tests, demos and
//! `publisher --echo`.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream;

use base64::Engine;
use serde_json::{Value, json};

use crate::openai::{
    all_messages_text, chunk_body, completion_body, input_items, last_user_text, text_chunk_body,
    text_completion_body, usage_body, wants_usage,
};
use crate::protocol::{Endpoint, TaskFrame};
use crate::{Clock, Completion, Error, Provider, Reply, SystemClock};

/// A [`Provider`] that echoes, for each [`Endpoint`]:
///
/// - **chat completions**: the last user message. The answer is its
///   whitespace-separated words joined by single spaces. Streamed, each word is one
///   `chat.completion.chunk` (words after the first carry their leading space, so the
///   deltas concatenate to the answer), then a closing chunk with
///   `finish_reason: "stop"`.
/// - **completions**: the prompt, the same way (one choice per prompt of an array), as
///   `text_completion` objects.
/// - **embeddings**: for each input, a unit vector of 8 numbers derived from its bytes
///   (see [`echo_embedding`]), as floats or, with `encoding_format: "base64"` (what the
///   OpenAI SDKs ask for), as little-endian `f32`s in base64.
///
/// `usage` counts whitespace-separated words: the prompt's (every message's text for
/// chat) and the answer's. A stream whose request asks for
/// `stream_options.include_usage` ends with a chunk carrying `usage` and no choices,
/// as OpenAI's does.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use futures::StreamExt;
/// use serde_json::json;
/// use virtual_llm_core::protocol::{TaskFrame, TaskKind};
/// use virtual_llm_core::{EchoProvider, LlmName, Provider, Reply, TaskId};
///
/// let task = TaskFrame {
///     task_id: TaskId::generate(),
///     kind: TaskKind::Infer,
///     endpoint: Default::default(),
///     llm: LlmName::parse("demo").unwrap(),
///     stream: true,
///     body: json!({"model": "demo", "messages": [{"role": "user", "content": "hi  there"}]}).into(),
/// };
/// let Reply::Stream(chunks) = EchoProvider::new().infer(task).await.unwrap() else { panic!() };
/// let chunks: Vec<String> = chunks.map(|c| c.unwrap()).collect().await;
/// assert_eq!(chunks.len(), 3); // "hi", " there", then the closing chunk
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct EchoProvider {
    clock: Arc<dyn Clock>,
}

impl Default for EchoProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl EchoProvider {
    /// An echo model stamping answers with the system clock.
    pub fn new() -> Self {
        EchoProvider {
            clock: Arc::new(SystemClock),
        }
    }

    /// An echo model stamping answers (`created`) with `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        EchoProvider { clock }
    }
}

type Chunks = Vec<Result<String, Error>>;

/// Words, joined by single spaces, and how many.
fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// Each word as the piece a stream sends: the first bare, the others after a space.
fn pieces<'a>(words: &'a [&'a str]) -> impl Iterator<Item = String> + 'a {
    words.iter().enumerate().map(|(i, w)| {
        if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        }
    })
}

/// The closing usage chunk of a stream (no choices), as OpenAI sends it.
fn usage_chunk(id: &str, object: &str, model: &str, created: u64, usage: Value) -> String {
    json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    })
    .to_string()
}

/// The 8 numbers the echo model embeds `text` as: byte `j` (from 0) adds
/// `((byte + 1)(i + 1)(j + 1) mod 251) / 251 − ½` to component `i`, and the vector is
/// scaled to unit length (all zeros for empty text). Deterministic: the same text, the
/// same vector; texts that differ in a byte almost always differ.
///
/// ```
/// use virtual_llm_core::echo_embedding;
///
/// let v = echo_embedding("hello");
/// assert_eq!(v.len(), 8);
/// assert_eq!(v, echo_embedding("hello"));
/// assert_ne!(v, echo_embedding("world"));
/// assert_ne!(echo_embedding("a"), echo_embedding("b"));
/// assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
/// ```
pub fn echo_embedding(text: &str) -> Vec<f32> {
    let mut v = [0f64; 8];
    for (j, b) in text.bytes().enumerate() {
        for (i, x) in v.iter_mut().enumerate() {
            let mixed = (u64::from(b) + 1) * (i as u64 + 1) * ((j as u64 % 251) + 1) % 251;
            *x += mixed as f64 / 251.0 - 0.5;
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter()
        .map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 })
        .collect()
}

impl EchoProvider {
    fn chat(&self, task: &TaskFrame, body: &Value, id: &str, model: &str, created: u64) -> Reply {
        let text = last_user_text(body);
        let words = words(&text);
        let usage = usage_body(self::words(&all_messages_text(body)).len(), words.len());
        if !task.stream {
            let mut body = completion_body(id, model, created, &words.join(" "));
            body["usage"] = usage;
            return Reply::Complete(Completion::ok(body));
        }
        let mut chunks: Chunks = pieces(&words)
            .map(|piece| Ok(chunk_body(id, model, created, Some(&piece), None).to_string()))
            .collect();
        chunks.push(Ok(
            chunk_body(id, model, created, None, Some("stop")).to_string()
        ));
        if wants_usage(body) {
            chunks.push(Ok(usage_chunk(
                id,
                "chat.completion.chunk",
                model,
                created,
                usage,
            )));
        }
        Reply::Stream(Box::pin(stream::iter(chunks)))
    }

    fn completion(
        &self,
        task: &TaskFrame,
        body: &Value,
        id: &str,
        model: &str,
        created: u64,
    ) -> Reply {
        let prompts = input_items(body.get("prompt"));
        let prompt_words: usize = prompts.iter().map(|p| words(p).len()).sum();
        let answers: Vec<String> = prompts.iter().map(|p| words(p).join(" ")).collect();
        let usage = usage_body(prompt_words, prompt_words);
        if !task.stream {
            let body = text_completion_body(id, model, created, &answers, usage);
            return Reply::Complete(Completion::ok(body));
        }
        let mut chunks: Chunks = Vec::new();
        for (index, prompt) in prompts.iter().enumerate() {
            let words = words(prompt);
            chunks.extend(pieces(&words).map(|piece| {
                Ok(text_chunk_body(id, model, created, index, &piece, None).to_string())
            }));
            chunks.push(Ok(text_chunk_body(
                id,
                model,
                created,
                index,
                "",
                Some("stop"),
            )
            .to_string()));
        }
        if wants_usage(body) {
            chunks.push(Ok(usage_chunk(
                id,
                "text_completion",
                model,
                created,
                usage,
            )));
        }
        Reply::Stream(Box::pin(stream::iter(chunks)))
    }

    fn embeddings(&self, body: &Value, model: &str) -> Reply {
        let inputs = input_items(body.get("input"));
        let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let vector = echo_embedding(input);
                let embedding = if base64 {
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(vector)
                };
                json!({ "object": "embedding", "index": index, "embedding": embedding })
            })
            .collect();
        let prompt_words: usize = inputs.iter().map(|i| words(i).len()).sum();
        Reply::Complete(Completion::ok(json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": { "prompt_tokens": prompt_words, "total_tokens": prompt_words },
        })))
    }
}

#[async_trait]
impl Provider for EchoProvider {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        // The echo model reads the whole request: it parses it (a publisher's work, not
        // the gateway's).
        let body: Value = task
            .body
            .to_value()
            .map_err(|e| Error::invalid(format!("invalid JSON body: {e}")))?;
        let model = body
            .get("model")
            .and_then(|m| m.as_str())
            .unwrap_or(task.llm.as_str())
            .to_owned();
        let created = self.clock.now().as_millis() / 1000;
        Ok(match task.endpoint {
            Endpoint::ChatCompletions => {
                let id = format!("chatcmpl-{}", task.task_id);
                self.chat(&task, &body, &id, &model, created)
            }
            Endpoint::Completions => {
                let id = format!("cmpl-{}", task.task_id);
                self.completion(&task, &body, &id, &model, created)
            }
            Endpoint::Embeddings => self.embeddings(&body, &model),
        })
    }

    /// No upstream: always ready.
    async fn probe(&self) -> bool {
        true
    }
}
