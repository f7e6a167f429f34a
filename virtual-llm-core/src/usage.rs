//! Usage accounting (SPEC §16): requests, prompt tokens and completion tokens per
//! principal and per LLM, for `GET /api/v1/usage`, the Prometheus counters and the
//! `tokensPerMinute` limit.
//!
//! Tokens are what the answer's `usage` says (`prompt_tokens`, `completion_tokens`):
//! a complete answer's body, or for a stream the last chunk that carries a `usage`
//! (OpenAI sends it with `stream_options.include_usage`). A stream without one is
//! **estimated**: a token per four characters of text, rounded up — the prompt's from
//! the request's message contents (`messages[].content`, text parts included, or
//! `prompt` / `input`), the completion's from the streamed `delta.content` (or
//! `text`). Every LLM counts, public ones too; the LLM is the name the client asked
//! for (a pool key, a member's name or an agent's).
//!
//! Memory is bounded: at most [`MAX_USAGE_ROWS`] (principal, LLM) pairs are kept, and
//! past it new pairs are counted under the LLM `other`. The metric labels are bounded
//! the same way by `metricLabels` (see [`MetricLabels`]). The counts are this
//! replica's, since it started.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::limits::Admitted;
use crate::raw_body::RawBody;
use crate::sync::lock;
use crate::{Error, Gateway, Principal, Reply, Role};

/// The most (principal, LLM) pairs the ledger keeps.
pub const MAX_USAGE_ROWS: usize = 10_000;
/// The label value that stands for every value past the bound.
pub const OTHER: &str = "other";

/// Inference requests by `principal`, `llm` and `code` (`ok`, `upstream_<status>`, or
/// an error code) (counter).
pub const REQUESTS: &str = "virtual_llm_requests_total";
/// From a request's admission to its outcome (the end of its stream), by `llm`
/// (histogram).
pub const REQUEST_DURATION: &str = "virtual_llm_request_duration_seconds";
/// Prompt tokens by `principal` and `llm` (counter).
pub const PROMPT_TOKENS: &str = "virtual_llm_prompt_tokens_total";
/// Completion tokens by `principal` and `llm` (counter).
pub const COMPLETION_TOKENS: &str = "virtual_llm_completion_tokens_total";
/// Requests refused by a limit per principal, by `principal` and `limit`
/// (`requests`, `tokens`, `concurrent`) (counter).
pub const RATE_LIMITED: &str = "virtual_llm_rate_limited_total";

/// Registers the help texts of the usage metrics.
pub(crate) fn describe() {
    metrics::describe_counter!(REQUESTS, "Inference requests by principal, llm and code.");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Inference request admission to outcome, by llm."
    );
    metrics::describe_counter!(PROMPT_TOKENS, "Prompt tokens by principal and llm.");
    metrics::describe_counter!(COMPLETION_TOKENS, "Completion tokens by principal and llm.");
    metrics::describe_counter!(RATE_LIMITED, "Requests refused by a limit per principal.");
}

/// Tokens of one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
}

impl TokenUsage {
    /// Prompt plus completion.
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The `usage` an answer or a chunk reports, if it has one with `prompt_tokens`.
///
/// ```
/// use serde_json::json;
/// use virtual_llm_core::usage::{TokenUsage, reported};
///
/// let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}});
/// assert_eq!(reported(&body), Some(TokenUsage { prompt: 9, completion: 3 }));
/// assert_eq!(reported(&json!({"usage": null})), None);
/// ```
pub fn reported(body: &Value) -> Option<TokenUsage> {
    usage_of(body.get("usage")?)
}

/// A `usage` object's tokens, if it has `prompt_tokens`.
fn usage_of(usage: &Value) -> Option<TokenUsage> {
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let completion = usage
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some(TokenUsage { prompt, completion })
}

/// What accounting reads of a whole answer: the `usage` it reports, and the
/// characters of its choices' text (`message.content`, or `text`). Read from the text
/// without building a tree of the answer: its top level and its choices are skipped
/// over, and only the fields named are read (a choice that is not an object, or a
/// content of another shape, counts 0, as a field that does not parse does).
///
/// ```
/// use serde_json::json;
/// use virtual_llm_core::raw_body::RawBody;
/// use virtual_llm_core::usage::{TokenUsage, answer_facts};
///
/// let body = RawBody::from(json!({
///     "choices": [
///         {"message": {"content": "héllo"}},
///         {"text": "abc"},
///         {"message": {"content": [{"type": "text", "text": "xy"}]}},
///         7,
///     ],
///     "usage": {"prompt_tokens": 9, "completion_tokens": 3},
/// }));
/// assert_eq!(
///     answer_facts(&body),
///     (Some(TokenUsage { prompt: 9, completion: 3 }), 10)
/// );
/// assert_eq!(answer_facts(&RawBody::from(json!({"choices": "no"}))), (None, 0));
/// ```
pub fn answer_facts(body: &RawBody) -> (Option<TokenUsage>, usize) {
    // The common shape in one pass; anything else field by field.
    typical_answer_facts(body).unwrap_or_else(|| any_answer_facts(body))
}

/// [`answer_facts`] of an answer of the usual shape (string contents, a `usage` with
/// whole numbers), in one pass that allocates only for a string with escapes; `None`
/// for any other shape.
fn typical_answer_facts(body: &RawBody) -> Option<(Option<TokenUsage>, usize)> {
    use std::borrow::Cow;
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(default)]
        usage: Option<Usage>,
        #[serde(borrow, default)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        message: Option<Message<'a>>,
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(borrow, default)]
        content: Option<Cow<'a, str>>,
    }
    let top = serde_json::from_str::<Top<'_>>(body.get()).ok()?;
    let reported = top.usage.map(|u| TokenUsage {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens.unwrap_or(0),
    });
    let chars = top
        .choices
        .iter()
        .filter_map(|c| {
            c.message
                .as_ref()
                .and_then(|m| m.content.as_ref())
                .or(c.text.as_ref())
        })
        .map(|text| text.chars().count())
        .sum();
    Some((reported, chars))
}

/// [`answer_facts`] of an answer of any shape: its top level, then each choice, then
/// each content, each read on its own so that one odd field spoils only itself.
fn any_answer_facts(body: &RawBody) -> (Option<TokenUsage>, usize) {
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
        #[serde(borrow, default)]
        choices: Option<Vec<&'a RawValue>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        message: Option<Message<'a>>,
        #[serde(borrow, default)]
        text: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(borrow, default)]
        content: Option<&'a RawValue>,
    }
    let Ok(top) = serde_json::from_str::<Top<'_>>(body.get()) else {
        return (None, 0);
    };
    let reported = top
        .usage
        .and_then(|u| serde_json::from_str::<Value>(u.get()).ok())
        .and_then(|usage| usage_of(&usage));
    let chars = top
        .choices
        .unwrap_or_default()
        .iter()
        .filter_map(|c| serde_json::from_str::<Choice<'_>>(c.get()).ok())
        .filter_map(|c| c.message.and_then(|m| m.content).or(c.text))
        .map(raw_content_chars)
        .sum();
    (reported, chars)
}

/// [`content_chars`] of a content's JSON text: a string is counted where it lies
/// (unescaped only when it has escapes); parts go through a tree, as they are rare.
fn raw_content_chars(content: &RawValue) -> usize {
    if let Ok(text) = serde_json::from_str::<std::borrow::Cow<'_, str>>(content.get()) {
        return text.chars().count();
    }
    serde_json::from_str::<Value>(content.get()).map_or(0, |v| content_chars(&v))
}

/// Tokens of `chars` characters of text, as estimated: one per four, rounded up.
fn estimate(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// Characters of text in a message content: a string, or the `text` of its parts.
fn content_chars(content: &Value) -> usize {
    match content {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|t| t.chars().count())
            .sum(),
        _ => 0,
    }
}

/// The estimated prompt tokens of an OpenAI request body: its messages' contents, or
/// its `prompt` or `input` (strings, or lists of strings).
///
/// ```
/// use serde_json::json;
/// use virtual_llm_core::usage::estimate_prompt;
///
/// let body = json!({"messages": [{"role": "user", "content": "12345678"}]});
/// assert_eq!(estimate_prompt(&body), 2);
/// assert_eq!(estimate_prompt(&json!({"input": ["abc", "de"]})), 2);
/// ```
pub fn estimate_prompt(body: &Value) -> u64 {
    let chars = match body.get("messages") {
        Some(Value::Array(messages)) => messages
            .iter()
            .filter_map(|m| m.get("content"))
            .map(content_chars)
            .sum(),
        _ => ["prompt", "input"]
            .iter()
            .filter_map(|k| body.get(*k))
            .map(|v| match v {
                Value::Array(items) => items.iter().map(content_chars).sum(),
                other => content_chars(other),
            })
            .sum(),
    };
    estimate(chars)
}

/// [`estimate_prompt`] of a body kept as its text: reads only `messages[].content`,
/// `prompt` and `input` (the rest is skipped without building it), so an estimate costs
/// no copy of the body. A body that does not read so is estimated as nothing.
pub fn estimate_raw_prompt(body: &crate::raw_body::RawBody) -> u64 {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<Value>,
    }
    #[derive(Deserialize)]
    struct Parts {
        #[serde(default)]
        messages: Option<Vec<Message>>,
        #[serde(default)]
        prompt: Option<Value>,
        #[serde(default)]
        input: Option<Value>,
    }
    let Ok(parts) = body.parse::<Parts>() else {
        return 0;
    };
    let chars = match parts.messages {
        Some(messages) => messages
            .iter()
            .filter_map(|m| m.content.as_ref())
            .map(content_chars)
            .sum(),
        None => [parts.prompt, parts.input]
            .iter()
            .flatten()
            .map(|v| match v {
                Value::Array(items) => items.iter().map(content_chars).sum(),
                other => content_chars(other),
            })
            .sum(),
    };
    estimate(chars)
}

/// What a streamed answer has said about its tokens so far.
#[derive(Debug, Default)]
struct StreamTally {
    reported: Option<TokenUsage>,
    chars: usize,
}

/// The parts of a chunk the tally reads, borrowed from the chunk's text: the text of
/// its choices is summed as they are read (no list of them is built, and a text
/// without escapes is not copied), and `usage` is kept as its text until it is read.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default)]
    choices: ChoiceChars,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
}

/// The characters of a chunk's choices' text, counted while reading them.
#[derive(Default)]
struct ChoiceChars(usize);

impl<'de> Deserialize<'de> for ChoiceChars {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{SeqAccess, Visitor};

        struct Sum;
        impl<'de> Visitor<'de> for Sum {
            type Value = ChoiceChars;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChoiceChars, A::Error> {
                let mut chars = 0;
                while let Some(choice) = seq.next_element::<ChunkChoice<'de>>()? {
                    let text = choice
                        .delta
                        .as_ref()
                        .and_then(|d| d.content.as_deref())
                        .or(choice.text.as_deref());
                    chars += text.map_or(0, |t| t.chars().count());
                }
                Ok(ChoiceChars(chars))
            }
        }
        deserializer.deserialize_seq(Sum)
    }
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

impl StreamTally {
    fn chunk(&mut self, data: &str) {
        let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(data) else {
            return;
        };
        self.chars += chunk.choices.0;
        if let Some(usage) = chunk
            .usage
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
            .as_ref()
            .and_then(usage_of)
        {
            self.reported = Some(usage);
        }
    }
}

/// One row of `GET /api/v1/usage`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    /// Who made the requests.
    pub principal: String,
    /// The name they asked for (`other` past the ledger's bound).
    pub llm: String,
    /// Requests admitted (past routing and the limits), whatever their outcome.
    pub requests: u64,
    /// Prompt tokens, reported or estimated.
    pub prompt_tokens: u64,
    /// Completion tokens, reported or estimated.
    pub completion_tokens: u64,
}

/// The answer of `GET /api/v1/usage`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageReport {
    /// One row per principal and LLM, ordered by principal then LLM.
    pub usage: Vec<UsageRow>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests: u64,
    prompt: u64,
    completion: u64,
}

impl Counts {
    fn add(&mut self, tokens: TokenUsage) {
        self.requests += 1;
        self.prompt = self.prompt.saturating_add(tokens.prompt);
        self.completion = self.completion.saturating_add(tokens.completion);
    }
}

/// The metrics of one (principal, LLM) pair, labelled once: an answer then costs a few
/// atomic adds, not four metric keys built, hashed and looked up.
#[derive(Debug)]
struct PairMetrics {
    /// The pair's bounded labels.
    principal: String,
    llm: String,
    /// [`REQUESTS`] by code, as codes come.
    requests: Vec<(String, Counter)>,
    prompt: Counter,
    completion: Counter,
    duration: Histogram,
}

impl PairMetrics {
    fn new(principal: String, llm: String) -> Self {
        PairMetrics {
            requests: Vec::new(),
            prompt: counter!(PROMPT_TOKENS, "principal" => principal.clone(), "llm" => llm.clone()),
            completion: counter!(COMPLETION_TOKENS, "principal" => principal.clone(), "llm" => llm.clone()),
            duration: histogram!(REQUEST_DURATION, "llm" => llm.clone()),
            principal,
            llm,
        }
    }

    fn record(&mut self, tokens: TokenUsage, code: &str, took: Duration) {
        let at = match self.requests.iter().position(|(c, _)| c == code) {
            Some(at) => at,
            None => {
                let requests = counter!(REQUESTS, "principal" => self.principal.clone(), "llm" => self.llm.clone(), "code" => code.to_owned());
                self.requests.push((code.to_owned(), requests));
                self.requests.len() - 1
            }
        };
        self.requests[at].1.increment(1);
        self.prompt.increment(tokens.prompt);
        self.completion.increment(tokens.completion);
        self.duration.record(took.as_secs_f64());
    }
}

/// One row of the ledger: a pair's counts, and its metrics when the row is the pair's
/// own (not the `other` row that pairs past the bound share, whose requests are each
/// labelled as they come).
#[derive(Debug, Default)]
struct Row {
    counts: Counts,
    metrics: Option<PairMetrics>,
}

/// The ledger's rows by principal, then LLM, and how many there are.
#[derive(Debug, Default)]
struct Rows {
    by_principal: BTreeMap<String, BTreeMap<String, Row>>,
    len: usize,
}

impl Rows {
    fn contains(&self, principal: &str, llm: &str) -> bool {
        self.by_principal
            .get(principal)
            .is_some_and(|llms| llms.contains_key(llm))
    }

    fn get_mut(&mut self, principal: &str, llm: &str) -> Option<&mut Row> {
        self.by_principal.get_mut(principal)?.get_mut(llm)
    }
}

/// Bounds the values of a metric label: the first `max` distinct values are used as
/// they are, every later one is [`OTHER`].
#[derive(Debug)]
pub struct MetricLabels {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl MetricLabels {
    /// A bound of `max` values.
    pub fn new(max: usize) -> Self {
        MetricLabels {
            max,
            seen: Mutex::default(),
        }
    }

    /// `value`, or [`OTHER`] when `max` other values came first.
    ///
    /// ```
    /// use virtual_llm_core::usage::MetricLabels;
    ///
    /// let labels = MetricLabels::new(1);
    /// assert_eq!(labels.label("a"), "a");
    /// assert_eq!(labels.label("b"), "other");
    /// assert_eq!(labels.label("a"), "a");
    /// ```
    pub fn label(&self, value: &str) -> String {
        let mut seen = lock(&self.seen);
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        OTHER.to_owned()
    }
}

/// The usage counts of this replica, and the bounded labels of its metrics.
#[derive(Debug)]
pub(crate) struct UsageLedger {
    rows: Mutex<Rows>,
    llms: MetricLabels,
    principals: MetricLabels,
}

impl UsageLedger {
    pub(crate) fn new(metric_labels: usize) -> Self {
        UsageLedger {
            rows: Mutex::default(),
            llms: MetricLabels::new(metric_labels),
            principals: MetricLabels::new(metric_labels),
        }
    }

    fn record(&self, principal: &str, llm: &str, tokens: TokenUsage, code: &str, took: Duration) {
        {
            let mut rows = lock(&self.rows);
            // The pair's own row (the common case: no key is built).
            if let Some(row) = rows.get_mut(principal, llm)
                && let Some(metrics) = &mut row.metrics
            {
                row.counts.add(tokens);
                metrics.record(tokens, code, took);
                return;
            }
            let (mut p, mut l) = (principal, llm);
            if !rows.contains(p, l) && rows.len >= MAX_USAGE_ROWS {
                l = OTHER;
                if !rows.contains(p, l) && rows.len > MAX_USAGE_ROWS {
                    p = OTHER;
                }
            }
            let own = (p, l) == (principal, llm);
            let Rows { by_principal, len } = &mut *rows;
            let llms = by_principal.entry(p.to_owned()).or_default();
            let row = llms.entry(l.to_owned()).or_insert_with(|| {
                *len += 1;
                Row::default()
            });
            row.counts.add(tokens);
            if own {
                let metrics = row.metrics.get_or_insert_with(|| {
                    PairMetrics::new(self.principals.label(principal), self.llms.label(llm))
                });
                metrics.record(tokens, code, took);
                return;
            }
        }
        // Counted under `other`: labelled as it comes.
        let (principal, llm) = (self.principals.label(principal), self.llms.label(llm));
        counter!(REQUESTS, "principal" => principal.clone(), "llm" => llm.clone(), "code" => code.to_owned())
            .increment(1);
        counter!(PROMPT_TOKENS, "principal" => principal.clone(), "llm" => llm.clone())
            .increment(tokens.prompt);
        counter!(COMPLETION_TOKENS, "principal" => principal, "llm" => llm.clone())
            .increment(tokens.completion);
        histogram!(REQUEST_DURATION, "llm" => llm).record(took.as_secs_f64());
    }

    pub(crate) fn rate_limited(&self, principal: &str, error: &Error) {
        if let Error::RateLimited { kind, .. } = error {
            let limit = match kind {
                crate::limits::LimitKind::Requests => "requests",
                crate::limits::LimitKind::Tokens => "tokens",
                _ => "concurrent",
            };
            counter!(RATE_LIMITED, "principal" => self.principals.label(principal), "limit" => limit)
                .increment(1);
        }
    }

    fn rows(&self, principal: Option<&str>) -> Vec<UsageRow> {
        lock(&self.rows)
            .by_principal
            .iter()
            .filter(|(p, _)| principal.is_none_or(|only| only == p.as_str()))
            .flat_map(|(principal, llms)| {
                llms.iter().map(move |(llm, row)| UsageRow {
                    principal: principal.clone(),
                    llm: llm.clone(),
                    requests: row.counts.requests,
                    prompt_tokens: row.counts.prompt,
                    completion_tokens: row.counts.completion,
                })
            })
            .collect()
    }
}

/// One admitted request being accounted: its tokens are charged and counted once, when
/// its outcome is known (for a stream: when it ends or the client drops it).
pub(crate) struct Accounting {
    gateway: Gateway,
    admitted: Admitted,
    principal: String,
    llm: String,
    prompt_estimate: u64,
    started: tokio::time::Instant,
    tally: StreamTally,
    code: Option<String>,
}

impl Accounting {
    pub(crate) fn new(
        gateway: Gateway,
        admitted: Admitted,
        principal: &Principal,
        llm: &str,
        body: &crate::raw_body::RawBody,
    ) -> Self {
        Accounting {
            gateway,
            admitted,
            principal: principal.id.clone(),
            llm: llm.to_owned(),
            prompt_estimate: estimate_raw_prompt(body),
            started: tokio::time::Instant::now(),
            tally: StreamTally::default(),
            code: None,
        }
    }

    /// `answer`, accounted: a completion at once, a stream as it ends.
    pub(crate) fn answer(mut self, answer: Result<Reply, Error>) -> Result<Reply, Error> {
        match answer {
            Ok(Reply::Complete(c)) => {
                self.code = Some(match c.status {
                    200..=299 => "ok".to_owned(),
                    status => format!("upstream_{status}"),
                });
                let (reported, chars) = answer_facts(&c.body);
                self.tally.reported = reported;
                self.tally.chars = chars;
                Ok(Reply::Complete(c))
            }
            Ok(Reply::Stream(chunks)) => {
                use futures::StreamExt;
                let mut this = self;
                Ok(Reply::Stream(
                    chunks
                        .map(move |chunk| {
                            match &chunk {
                                Ok(data) => this.tally.chunk(data),
                                Err(e) => this.code = Some(e.code().to_owned()),
                            }
                            chunk
                        })
                        .boxed(),
                ))
            }
            Err(e) => {
                self.code = Some(e.code().to_owned());
                Err(e)
            }
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        let tokens = self.tally.reported.unwrap_or(TokenUsage {
            prompt: self.prompt_estimate,
            completion: estimate(self.tally.chars),
        });
        self.admitted.charge(tokens.total());
        let code = self.code.as_deref().unwrap_or("ok");
        self.gateway.shared.usage.record(
            &self.principal,
            &self.llm,
            tokens,
            code,
            self.started.elapsed(),
        );
    }
}

impl Gateway {
    /// The usage counts of this replica (`GET /api/v1/usage`): an admin's answer has
    /// everyone's rows, anyone else's its own.
    pub fn usage(&self, principal: &Principal) -> UsageReport {
        let only = (!principal.has(Role::Admin)).then_some(principal.id.as_str());
        UsageReport {
            usage: self.shared.usage.rows(only),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    /// What accounting read of an answer when it was a tree.
    fn from_tree(body: &Value) -> (Option<TokenUsage>, usize) {
        let chars = body.get("choices").map_or(0, |choices| {
            choices.as_array().map_or(0, |cs| {
                cs.iter()
                    .map(|c| {
                        c.pointer("/message/content")
                            .or_else(|| c.get("text"))
                            .map_or(0, content_chars)
                    })
                    .sum()
            })
        });
        (reported(body), chars)
    }

    #[test]
    fn an_answer_is_read_as_its_tree_was() {
        let answers = [
            json!({"choices": [{"message": {"content": "héllo \"quoted\" \u{e9}"}}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 3}}),
            json!({"choices": [{"text": "abc"}, {"text": "de"}], "usage": {"prompt_tokens": 1}}),
            json!({"choices": [{"message": {"content": [{"type": "text", "text": "xy"}, 3]}}]}),
            json!({"choices": [{"message": {"content": "a"}}, 7, null, {"message": 1}]}),
            json!({"choices": {"not": "a list"}, "usage": {"prompt_tokens": "9"}}),
            json!({"usage": {"prompt_tokens": 2.5, "completion_tokens": 1}}),
            json!({"usage": null, "choices": []}),
            json!([1, 2]),
            json!("just a string"),
            json!({"error": {"message": "overloaded"}}),
        ];
        for answer in answers {
            assert_eq!(
                answer_facts(&RawBody::from(&answer)),
                from_tree(&answer),
                "{answer}"
            );
        }
        // The usual shape takes the one-pass path.
        let usual = RawBody::from(json!({"choices": [{"message": {"content": "hi"}}]}));
        assert_eq!(typical_answer_facts(&usual), Some((None, 2)));
    }

    #[test]
    fn a_stream_takes_its_last_reported_usage_or_is_estimated() {
        let mut tally = StreamTally::default();
        tally.chunk(r#"{"choices":[{"delta":{"content":"Hello "}}]}"#);
        tally.chunk(r#"{"choices":[{"delta":{"content":"world!"}}],"usage":null}"#);
        tally.chunk("not json");
        assert_eq!((tally.reported, tally.chars), (None, 12));
        assert_eq!(estimate(tally.chars), 3);
        tally.chunk(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#);
        assert_eq!(
            tally.reported,
            Some(TokenUsage {
                prompt: 7,
                completion: 2
            })
        );
        let mut completions = StreamTally::default();
        completions.chunk(r#"{"choices":[{"text":"abcde"}]}"#);
        assert_eq!(completions.chars, 5);
        // Text with escapes counts its characters, not its bytes on the wire; every
        // choice counts; a choice of another shape spoils only its own chunk.
        let mut escaped = StreamTally::default();
        escaped.chunk(r#"{"choices":[{"delta":{"content":"a\"é\n"}},{"delta":{"content":"xy"}}],"usage":null}"#);
        assert_eq!((escaped.reported, escaped.chars), (None, 6));
        escaped.chunk(r#"{"choices":[{"delta":{"content":"abc"}},7]}"#);
        assert_eq!(escaped.chars, 6);
        escaped.chunk(r#"{"choices":[{"delta":{"content":"z"}}],"usage":{"prompt_tokens":"x"}}"#);
        assert_eq!((escaped.reported, escaped.chars), (None, 7));
    }

    #[test]
    fn prompts_are_estimated_from_their_text() {
        let body = json!({"messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "efgh"}, {"type": "image_url"}]},
        ]});
        assert_eq!(estimate_prompt(&body), 2);
        assert_eq!(estimate_prompt(&json!({"prompt": "a"})), 1);
        assert_eq!(estimate_prompt(&json!({})), 0);
    }

    #[test]
    fn the_ledger_is_bounded_and_filters_by_principal() {
        let ledger = UsageLedger::new(2);
        let t = TokenUsage {
            prompt: 1,
            completion: 2,
        };
        ledger.record("bob", "a", t, "ok", Duration::ZERO);
        ledger.record("bob", "a", t, "ok", Duration::ZERO);
        ledger.record("eve", "b", t, "ok", Duration::ZERO);
        let bob = ledger.rows(Some("bob"));
        assert_eq!(bob.len(), 1);
        assert_eq!(
            (
                bob[0].requests,
                bob[0].prompt_tokens,
                bob[0].completion_tokens
            ),
            (2, 2, 4)
        );
        assert_eq!(ledger.rows(None).len(), 2);
        for i in 0..MAX_USAGE_ROWS + 5 {
            ledger.record("bob", &format!("m{i}"), t, "ok", Duration::ZERO);
        }
        let rows = ledger.rows(None);
        assert!(rows.len() <= MAX_USAGE_ROWS + 1, "{}", rows.len());
        assert!(rows.iter().any(|r| r.llm == OTHER && r.principal == "bob"));
    }

    /// The metrics of each answer, by principal, LLM and code, whether its pair's
    /// handles were made before (its own row) or not (a pair counted under `other`),
    /// with the labels bounded by `metricLabels`.
    #[test]
    fn every_answer_is_counted_in_the_metrics_under_bounded_labels() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let t = |prompt, completion| TokenUsage { prompt, completion };
        metrics::with_local_recorder(&recorder, || {
            let ledger = UsageLedger::new(2);
            ledger.record("alice", "m1", t(3, 4), "ok", Duration::ZERO);
            ledger.record("alice", "m1", t(1, 1), "ok", Duration::ZERO);
            ledger.record("alice", "m1", t(0, 0), "upstream_502", Duration::ZERO);
            ledger.record("alice", "m2", t(5, 0), "ok", Duration::ZERO);
            // A third LLM is past the two label values: labelled `other`.
            ledger.record("alice", "m3", t(7, 0), "ok", Duration::ZERO);
            // Pairs past the ledger's rows are counted under `other`, and still
            // measured with their own (bounded) labels.
            for i in 0..MAX_USAGE_ROWS {
                ledger.record("bob", &format!("x{i}"), t(0, 0), "ok", Duration::ZERO);
            }
            ledger.record("alice", "m1", t(2, 0), "ok", Duration::ZERO);
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let value = |name: &str, labels: &[(&str, &str)]| {
            snapshot
                .iter()
                .find(|(key, _, _, _)| {
                    let key = key.key();
                    key.name() == name
                        && key.labels().count() == labels.len()
                        && labels
                            .iter()
                            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
                })
                .map(|(_, _, _, value)| value)
        };
        let counter = |name, labels: &[(&str, &str)]| match value(name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            other => panic!("{name} {labels:?}: {other:?}"),
        };
        let alice_m1 = [("principal", "alice"), ("llm", "m1")];
        let requests = |llm, code| {
            counter(
                REQUESTS,
                &[("principal", "alice"), ("llm", llm), ("code", code)],
            )
        };
        assert_eq!(requests("m1", "ok"), 3);
        assert_eq!(requests("m1", "upstream_502"), 1);
        assert_eq!(requests("m2", "ok"), 1);
        assert_eq!(requests(OTHER, "ok"), 1, "m3, past the label bound");
        assert_eq!(counter(PROMPT_TOKENS, &alice_m1), 6);
        assert_eq!(counter(COMPLETION_TOKENS, &alice_m1), 5);
        assert_eq!(
            counter(PROMPT_TOKENS, &[("principal", "alice"), ("llm", OTHER)]),
            7
        );
        assert_eq!(
            counter(
                REQUESTS,
                &[("principal", "bob"), ("llm", OTHER), ("code", "ok")]
            ),
            u64::try_from(MAX_USAGE_ROWS).unwrap()
        );
        match value(REQUEST_DURATION, &[("llm", "m1")]) {
            Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 4),
            other => panic!("{other:?}"),
        }
    }
}
