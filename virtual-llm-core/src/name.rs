//! LLM names: the registry's unique key, checked before anything else touches it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The longest LLM name.
pub const MAX_NAME_LEN: usize = 64;

/// A validated LLM name: 1–64 characters of `[A-Za-z0-9._:-]` and `/`, not starting
/// with `_` (the `_provider-*` routes live beside the names).
///
/// A `/` separates segments, as in model ids like `meta-llama/Llama-3.1-8B-Instruct`
/// (SPEC §17): no segment is empty, `.` or `..`, and the last is not `infer` or
/// `members` (the routes `{base}/{name}/infer` and `{base}/{name}/members` take the
/// name from the path's remaining segments).
///
/// ```
/// use virtual_llm_core::LlmName;
///
/// assert!(LlmName::parse("llama3.1:8b-instruct").is_ok());
/// assert!(LlmName::parse("meta-llama/Llama-3.1-8B-Instruct").is_ok());
/// assert!(LlmName::parse("_provider-register").is_err());
/// assert!(LlmName::parse("has space").is_err());
/// assert!(LlmName::parse("a//b").is_err());
/// assert!(LlmName::parse("org/infer").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LlmName(String);

impl LlmName {
    /// Checks `s` against the name rules.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match invalid_reason(s) {
            None => Ok(LlmName(s.to_owned())),
            Some(reason) => Err(Error::InvalidName {
                name: truncate(s),
                reason,
            }),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name in ASCII lower case: names are unique by it (`LLAMA-8B` cannot sit
    /// beside `llama-8b`), while each row keeps and answers to its name as written.
    ///
    /// ```
    /// use virtual_llm_core::LlmName;
    ///
    /// assert_eq!(LlmName::parse("Meta/Llama-3.1").unwrap().folded(), "meta/llama-3.1");
    /// ```
    pub fn folded(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

fn invalid_reason(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("a name must not be empty")
    } else if s.len() > MAX_NAME_LEN {
        Some("a name is at most 64 characters")
    } else if s.starts_with('_') {
        Some("a name must not start with '_'")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'/'))
    {
        Some("a name uses only the characters [A-Za-z0-9._:-] and '/' between segments")
    } else if s.split('/').any(|seg| matches!(seg, "" | "." | "..")) {
        Some("no segment of a name between '/' is empty, '.' or '..'")
    } else if s.contains('/') && matches!(s.rsplit('/').next(), Some("infer" | "members")) {
        Some("the last segment of a name is not 'infer' or 'members'")
    } else {
        None
    }
}

/// Error messages echo a bad name back, but never an unbounded one.
fn truncate(s: &str) -> String {
    crate::error::bounded(s, MAX_NAME_LEN + 1)
}

impl std::str::FromStr for LlmName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        LlmName::parse(s)
    }
}

impl TryFrom<String> for LlmName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        match invalid_reason(&s) {
            None => Ok(LlmName(s)),
            Some(reason) => Err(Error::InvalidName {
                name: truncate(&s),
                reason,
            }),
        }
    }
}

impl From<LlmName> for String {
    fn from(n: LlmName) -> String {
        n.0
    }
}

impl fmt::Display for LlmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LlmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for LlmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        for ok in [
            "a",
            "A.b_c:d-e",
            "0",
            &"x".repeat(64),
            "a_",
            "a/b",
            "meta-llama/Llama-3.1-8B-Instruct",
            "a/b/c",
            "a/_b",
            "a/.b",
            "infer",
            "members",
            "infer/x",
        ] {
            assert!(LlmName::parse(ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            "_x",
            "a b",
            "é",
            "a\nb",
            &"x".repeat(65),
            "a%20",
            "/a",
            "a/",
            "a//b",
            "./a",
            "a/./b",
            "a/../b",
            "..",
            ".",
            "a/infer",
            "a/members",
            "a\\b",
        ] {
            assert!(LlmName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_bad_name_is_echoed_bounded() {
        let huge = format!("{}/", "x".repeat(100_000));
        for err in [
            LlmName::parse(&huge).unwrap_err(),
            LlmName::try_from(huge.clone()).unwrap_err(),
        ] {
            let Error::InvalidName { name, .. } = &err else {
                panic!("{err:?}")
            };
            assert!(name.chars().count() <= MAX_NAME_LEN + 1, "{name}");
            assert!(name.starts_with('x') && name.ends_with('/'), "{name}");
        }
        let long = "y".repeat(MAX_NAME_LEN + 1);
        let Err(Error::InvalidName { name, .. }) = LlmName::parse(&long) else {
            panic!("a name one too long is refused")
        };
        assert_eq!(name, long, "a name just over the limit is echoed whole");
    }

    #[test]
    fn bad_names_fail_deserialization_with_the_reason() {
        let err = serde_json::from_str::<LlmName>("\"_provider-stream\"").unwrap_err();
        assert!(err.to_string().contains("must not start with '_'"), "{err}");
    }
}
