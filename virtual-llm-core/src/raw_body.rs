//! A client's request body kept as the JSON text it came in: [`RawBody`].
//!
//! The gateway reads only what routing and its checks need (`model`, `stream`, the
//! kind of the endpoint's input field) in one pass over the text that builds no tree
//! ([`Facts`]), and passes the text on as it is: into the task frame, onto both
//! transports' wires (serde_json writes a `RawValue` verbatim, so the body is spliced
//! into the frame, never re-encoded), and from the publisher to its upstream with only
//! `model` and `stream` replaced at the top level ([`RawBody::with_fields`]).
//!
//! So a request costs memory in proportion to its bytes, not to its JSON shape: a body
//! of 8 MiB of `[0,0,0,…]` parsed into a `serde_json::Value` took 12–19 times its size
//! while it waited in a publisher's queue (red-team finding F1); as a `RawBody` it takes
//! its size. The text is shared (`Arc`), so the relay's retries and the task frame do
//! not copy it.
//!
//! Line breaks, which JSON allows only as whitespace between tokens, are made spaces
//! when a client's body is read ([`RawBody::from_client`]): a task frame's JSON is one
//! line, as the SSE transport's event data wants it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// A JSON value held as its text (a client's request body): validated once, shared on
/// clone, written verbatim wherever it is serialized.
///
/// ```
/// use virtual_llm_core::raw_body::RawBody;
///
/// let body = RawBody::from_json(r#"{"model":"m","messages":[]}"#.to_owned()).unwrap();
/// assert_eq!(body.get(), r#"{"model":"m","messages":[]}"#);
/// // Spliced into a frame as it is.
/// let frame = serde_json::json!({"body": body});
/// assert_eq!(frame.to_string(), r#"{"body":{"messages":[],"model":"m"}}"#);
/// assert!(RawBody::from_json("{".to_owned()).is_err());
/// ```
#[derive(Clone)]
pub struct RawBody(Arc<RawValue>);

impl RawBody {
    /// `json` if it is one JSON value (surrounding whitespace is dropped), on one line
    /// (its line breaks made spaces, as [`RawBody::from_client`] does): a body goes
    /// into line-framed wires (an SSE event's data, an NDJSON line) as it is.
    pub fn from_json(json: String) -> Result<Self, serde_json::Error> {
        if memchr::memchr2(b'\n', b'\r', json.as_bytes()).is_some() {
            return Self::from_client(json.into_bytes());
        }
        RawValue::from_string(json).map(|raw| RawBody(Arc::from(raw)))
    }

    /// `null`.
    pub fn null() -> Self {
        RawBody(Arc::from(RawValue::NULL.to_owned()))
    }

    /// A body as it came over the network (a client's request, an upstream's answer):
    /// UTF-8 and one JSON value, with its line breaks made
    /// spaces (in valid JSON they can only be whitespace between tokens: a string holds
    /// none unescaped), so that the text is one line wherever it goes. The body is
    /// checked before: a raw line break inside a string is refused, not made valid.
    pub fn from_client(mut bytes: Vec<u8>) -> Result<Self, serde_json::Error> {
        // Found with a SIMD search: most bodies have none.
        let breaks: Vec<usize> = memchr::memchr2_iter(b'\n', b'\r', &bytes).collect();
        if !breaks.is_empty() {
            // A second pass, for the bodies with line breaks only.
            serde_json::from_slice::<&RawValue>(&bytes)?;
            for at in breaks {
                bytes[at] = b' ';
            }
        }
        let json =
            String::from_utf8(bytes).map_err(|_| de::Error::custom("the body is not UTF-8"))?;
        RawValue::from_string(json).map(|raw| RawBody(Arc::from(raw)))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The length of the text in bytes: what the body holds in memory.
    pub fn len(&self) -> usize {
        self.get().len()
    }

    /// Whether the text is empty (never, for a valid JSON value).
    pub fn is_empty(&self) -> bool {
        self.get().is_empty()
    }

    /// The body parsed as `T` (a `serde_json::Value` for the whole tree): for the few
    /// that need more than the top level (the echo model, an agent's persona).
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.get())
    }

    /// The body parsed as a `serde_json::Value`.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        self.parse()
    }

    /// Whether the body nests arrays and objects no deeper than `limit`. A body that
    /// only crosses the relay is never parsed into a tree here, so nothing would
    /// refuse what serde_json's recursion limit (127 levels) refuses; a client that parses
    /// the answer could. One pass over the bytes, which are valid JSON already.
    pub fn nests_within(&self, limit: usize) -> bool {
        let bytes = self.get().as_bytes();
        let mut depth = 0usize;
        let mut at = 0;
        while let Some(&byte) = bytes.get(at) {
            at += 1;
            match byte {
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return false;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                // A string (most of an answer's bytes): skipped to its closing quote,
                // past its escapes, with a SIMD search.
                b'"' => loop {
                    let Some(found) = bytes
                        .get(at..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    else {
                        return true;
                    };
                    at += found + 1;
                    if bytes[at - 1] == b'"' {
                        break;
                    }
                    at += 1; // the escaped byte
                },
                _ => {}
            }
        }
        true
    }

    /// What routing and the request checks read of the body, in one pass that builds
    /// no tree (nesting deeper than serde_json's recursion limit, 128, is refused as
    /// parsing a `Value` would).
    pub fn facts(&self) -> Result<Facts, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(self.get());
        let facts = de.deserialize_any(TopVisitor)?;
        de.end()?;
        Ok(facts)
    }

    /// The body, a JSON object, with top-level fields replaced: each of `set` written
    /// where the body has it (once, at its first place) or added at the end; each of
    /// `if_present` written only where the body has it. Every other field is copied as
    /// its text, in its order. An error when the body is not an object.
    ///
    /// ```
    /// use serde_json::json;
    /// use virtual_llm_core::raw_body::RawBody;
    ///
    /// let body = RawBody::from(json!({"model": "registry-name", "messages": [], "stream": true}));
    /// let out = body
    ///     .with_fields(&[("model", &json!("upstream"))], &[("stream", &json!(false))])
    ///     .unwrap();
    /// assert_eq!(
    ///     serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
    ///     json!({"model": "upstream", "messages": [], "stream": false})
    /// );
    /// ```
    pub fn with_fields(
        &self,
        set: &[(&str, &Value)],
        if_present: &[(&str, &Value)],
    ) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(self.len() + 64);
        let mut de = serde_json::Deserializer::from_str(self.get());
        Rewrite {
            out: &mut out,
            set,
            if_present,
        }
        .deserialize(&mut de)?;
        de.end()?;
        Ok(out)
    }
}

impl From<&Value> for RawBody {
    /// `value`'s JSON text. Encoding a `Value` cannot fail (its map keys are strings,
    /// its numbers finite); were it to, the body would be `null`, which every check
    /// refuses.
    fn from(value: &Value) -> Self {
        let raw =
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned());
        RawBody(Arc::from(raw))
    }
}

impl From<Value> for RawBody {
    fn from(value: Value) -> Self {
        RawBody::from(&value)
    }
}

impl Default for RawBody {
    /// `null`.
    fn default() -> Self {
        RawBody::null()
    }
}

impl PartialEq for RawBody {
    /// The same text (not the same value: `{"a":1,"b":2}` and `{"b":2,"a":1}` differ).
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawBody {}

impl fmt::Debug for RawBody {
    /// The text, cut after 1 KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.get();
        let mut end = text.len().min(1024);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end < text.len() {
            write!(f, "RawBody({}… ({} bytes))", &text[..end], text.len())
        } else {
            write!(f, "RawBody({text})")
        }
    }
}

impl fmt::Display for RawBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for RawBody {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RawBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(|raw| RawBody(Arc::from(raw)))
    }
}

/// The JSON type of a value, and a string's text where it was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Number,
    /// A string; its text for `model` only.
    String(Option<String>),
    /// An array.
    Array,
    /// An object.
    Object,
}

/// What the gateway reads of a body: whether it is an object and the shape of the
/// top-level fields its checks look at (the last of each, as a parsed object keeps it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Whether the body is a JSON object (every other field is `None` otherwise).
    pub object: bool,
    /// `model`, with its text when a string.
    pub model: Option<Shape>,
    /// `stream`.
    pub stream: Option<Shape>,
    /// `messages` (chat completions).
    pub messages: Option<Shape>,
    /// `prompt` (completions).
    pub prompt: Option<Shape>,
    /// `input` (embeddings).
    pub input: Option<Shape>,
}

/// A value read through, nothing kept but its [`Shape`] (and a string's text when
/// `keep`). serde_json counts the nesting of `deserialize_any`, so its recursion limit
/// holds here as when parsing a `Value`.
struct Walk {
    keep: bool,
}

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = Shape;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Shape, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Shape, E> {
        Ok(Shape::Bool(b))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Number)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Number)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Number)
    }

    fn visit_str<E>(self, s: &str) -> Result<Shape, E> {
        Ok(Shape::String(self.keep.then(|| s.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element_seed(Walk { keep: false })?.is_some() {}
        Ok(Shape::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        // Keys are read as strings (not skipped) so that their escapes are checked as
        // a parsed object's are.
        while map.next_key_seed(Walk { keep: false })?.is_some() {
            map.next_value_seed(Walk { keep: false })?;
        }
        Ok(Shape::Object)
    }
}

/// A top-level key the checks look at.
enum Key {
    Model,
    Stream,
    Messages,
    Prompt,
    Input,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "model" => Key::Model,
                    "stream" => Key::Stream,
                    "messages" => Key::Messages,
                    "prompt" => Key::Prompt,
                    "input" => Key::Input,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The top level of a body: its [`Facts`].
struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Facts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Facts, E> {
        Ok(Facts::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Facts, E> {
        Ok(Facts::default())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Facts, E> {
        Ok(Facts::default())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Facts, E> {
        Ok(Facts::default())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Facts, E> {
        Ok(Facts::default())
    }

    fn visit_str<E>(self, _: &str) -> Result<Facts, E> {
        Ok(Facts::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Facts, A::Error> {
        Walk { keep: false }.visit_seq(seq)?;
        Ok(Facts::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Facts, A::Error> {
        let mut facts = Facts {
            object: true,
            ..Facts::default()
        };
        while let Some(key) = map.next_key::<Key>()? {
            let keep = matches!(key, Key::Model);
            let shape = map.next_value_seed(Walk { keep })?;
            let slot = match key {
                Key::Model => &mut facts.model,
                Key::Stream => &mut facts.stream,
                Key::Messages => &mut facts.messages,
                Key::Prompt => &mut facts.prompt,
                Key::Input => &mut facts.input,
                Key::Other => continue,
            };
            *slot = Some(shape);
        }
        Ok(facts)
    }
}

/// A key as written, unescaped: borrowed from the text when it has no escape.
struct KeyText<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for KeyText<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyTextVisitor;
        impl<'de> Visitor<'de> for KeyTextVisitor {
            type Value = KeyText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<KeyText<'de>, E> {
                Ok(KeyText(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<KeyText<'de>, E> {
                Ok(KeyText(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyTextVisitor)
    }
}

/// Copies an object's top level into `out`, replacing fields (see
/// [`RawBody::with_fields`]).
struct Rewrite<'o> {
    out: &'o mut Vec<u8>,
    set: &'o [(&'o str, &'o Value)],
    if_present: &'o [(&'o str, &'o Value)],
}

impl Rewrite<'_> {
    fn entry<E: de::Error>(&mut self, first: &mut bool, key: &str, value: &str) -> Result<(), E> {
        if !std::mem::take(first) {
            self.out.push(b',');
        }
        serde_json::to_writer(&mut *self.out, key).map_err(E::custom)?;
        self.out.push(b':');
        self.out.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn value<E: de::Error>(&mut self, first: &mut bool, key: &str, value: &Value) -> Result<(), E> {
        let text = serde_json::to_string(value).map_err(E::custom)?;
        self.entry(first, key, &text)
    }
}

impl<'de> DeserializeSeed<'de> for Rewrite<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Rewrite<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut written = vec![false; self.set.len() + self.if_present.len()];
        let mut first = true;
        self.out.push(b'{');
        while let Some(KeyText(key)) = map.next_key::<KeyText<'de>>()? {
            let replaced = self
                .set
                .iter()
                .chain(self.if_present)
                .enumerate()
                .find(|(_, (k, _))| *k == key)
                .map(|(i, &field)| (i, field));
            match replaced {
                Some((i, (k, v))) => {
                    map.next_value::<IgnoredAny>()?;
                    if !std::mem::replace(&mut written[i], true) {
                        self.value(&mut first, k, v)?;
                    }
                }
                None => {
                    let raw: &RawValue = map.next_value()?;
                    self.entry(&mut first, &key, raw.get())?;
                }
            }
        }
        for (i, (k, v)) in self.set.iter().enumerate() {
            if !written[i] {
                self.value(&mut first, k, v)?;
            }
        }
        self.out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_body_is_held_on_one_line() {
        let pretty = "{\n  \"a\": [1,\r\n 2],\n  \"b\": \"x\"\n}\n".to_owned();
        let body = RawBody::from_json(pretty).unwrap();
        assert!(!body.get().contains(['\n', '\r']), "{body}");
        assert_eq!(
            body.to_value().unwrap(),
            serde_json::json!({"a": [1, 2], "b": "x"})
        );
        assert_eq!(RawBody::null().get(), "null");
        assert_eq!(RawBody::default(), RawBody::null());
    }

    #[test]
    fn facts_read_the_top_level_the_last_of_each() {
        let body = RawBody::from_json(
            r#"{"model":"a","messages":{},"x":[[{"model":"deep"}]],"model":"b","messages":[1],"stream":null}"#
                .to_owned(),
        )
        .unwrap();
        let facts = body.facts().unwrap();
        assert!(facts.object);
        assert_eq!(facts.model, Some(Shape::String(Some("b".into()))));
        assert_eq!(facts.messages, Some(Shape::Array));
        assert_eq!(facts.stream, Some(Shape::Null));
        assert_eq!(facts.prompt, None);
        // An escaped key is the same key.
        let escaped = RawBody::from_json(r#"{"mod\u0065l":"c"}"#.to_owned()).unwrap();
        assert_eq!(
            escaped.facts().unwrap().model,
            Some(Shape::String(Some("c".into())))
        );
        for other in ["[1,{}]", "1", "\"s\"", "null", "true"] {
            let facts = RawBody::from_json(other.to_owned())
                .unwrap()
                .facts()
                .unwrap();
            assert_eq!(facts, Facts::default(), "{other}");
        }
    }

    #[test]
    fn nesting_past_the_recursion_limit_is_refused_as_a_value_refuses_it() {
        for depth in [125, 126, 127, 128, 129, 100_000] {
            let text = format!(r#"{{"tools":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
            let as_value = serde_json::from_str::<Value>(&text).is_ok();
            let body = RawBody::from_json(text).unwrap();
            assert_eq!(body.facts().is_ok(), as_value, "depth {depth}");
            // serde_json takes 127 levels (the outer object is one).
            assert_eq!(body.nests_within(127), as_value, "depth {depth}");
        }
        // Brackets in strings, escaped quotes included, do not count.
        let text = format!(
            r#"{{"a":"{}\"{}","b":[[1]]}}"#,
            "[".repeat(300),
            "{".repeat(300)
        );
        let body = RawBody::from_json(text).unwrap();
        assert!(body.nests_within(3));
        assert!(!body.nests_within(2));
    }

    #[test]
    fn client_line_breaks_become_spaces_and_bad_text_is_refused() {
        let body = RawBody::from_client(b"{\"a\":\r\n[1,\n2]}\n".to_vec()).unwrap();
        assert_eq!(body.get(), "{\"a\":  [1, 2]}");
        assert!(RawBody::from_client(b"{\"a\":\"\xff\"}".to_vec()).is_err());
        assert!(RawBody::from_client(b"{\"a\":1} x".to_vec()).is_err());
        assert!(RawBody::from_client(b"".to_vec()).is_err());
        // A raw line break inside a string is not JSON, and making it a space must not
        // make it so (found by the decoders' property test).
        for bad in ["{\"model\":\"\na\"}", "{\"model\":\"a\r\"}", "[\"\r\n\"]"] {
            assert!(
                RawBody::from_client(bad.as_bytes().to_vec()).is_err(),
                "{bad:?}"
            );
            assert!(RawBody::from_json(bad.to_owned()).is_err(), "{bad:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn with_fields_replaces_in_place_adds_and_keeps_the_rest_verbatim() {
        let body = RawBody::from_json(
            r#"{"model":"a", "n":1.50,"stream":true,"model":"b","x":{"y": [ 1 ]}}"#.to_owned(),
        )
        .unwrap();
        let up = json!("up");
        let f = json!(false);
        let out = body
            .with_fields(&[("model", &up)], &[("stream", &f)])
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"up","n":1.50,"stream":false,"x":{"y": [ 1 ]}}"#
        );
        let bare = RawBody::from_json(r#"{"m\"q":[]}"#.to_owned()).unwrap();
        let out = bare
            .with_fields(&[("model", &up), ("stream", &json!(true))], &[])
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"m\"q":[],"model":"up","stream":true}"#
        );
        // `if_present` adds nothing.
        let out = RawBody::from_json("{}".to_owned())
            .unwrap()
            .with_fields(&[], &[("stream", &f)])
            .unwrap();
        assert_eq!(out, b"{}");
        assert!(
            RawBody::from_json("[1]".to_owned())
                .unwrap()
                .with_fields(&[("model", &up)], &[])
                .is_err()
        );
    }

    #[test]
    fn round_trips_through_serde_spliced_not_reencoded() {
        let body = RawBody::from_json(r#"{"b": 1, "a": [ 2 ]}"#.to_owned()).unwrap();
        let frame = serde_json::to_string(&json!({"x": 1})).unwrap();
        assert_eq!(frame, r#"{"x":1}"#);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Frame {
            body: RawBody,
        }
        let text = serde_json::to_string(&Frame { body: body.clone() }).unwrap();
        assert_eq!(text, r#"{"body":{"b": 1, "a": [ 2 ]}}"#);
        assert_eq!(serde_json::from_str::<Frame>(&text).unwrap().body, body);
        // From a Value too (a frame read through a Value).
        let again: Frame = serde_json::from_value(json!({"body": {"a": 1}})).unwrap();
        assert_eq!(again.body.get(), r#"{"a":1}"#);
    }
}
