//! Identifiers: session ids, task ids and row ids.
//!
//! The gateway mints every id itself from 128 bits of a cryptographically secure RNG,
//! so holding an id is as good as a capability only for whoever was handed it: nobody
//! can guess another publisher's session or another client's task. Ids that arrive from
//! the network are checked for length and alphabet before anything looks them up.

use std::fmt;

use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::Error;

/// The longest id accepted from the network.
pub const MAX_ID_LEN: usize = 128;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn random_id(prefix: &str) -> String {
    // ThreadRng is a CSPRNG reseeded from the OS; 128 bits make ids unguessable.
    let bits: u128 = rand::rng().random();
    format!("{prefix}{bits:032x}")
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh, unguessable id (128 random bits).
            pub fn generate() -> Self {
                $name(random_id($prefix))
            }

            /// Checks an id that came from the network: 1 to 128 characters of
            /// `[A-Za-z0-9_-]`.
            pub fn parse(s: &str) -> Result<Self, Error> {
                if valid_id(s) {
                    Ok($name(s.to_owned()))
                } else {
                    Err(Error::InvalidRequest {
                        message: format!(
                            "invalid {}: expected 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_-]",
                            $what
                        ),
                    })
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                if valid_id(&s) { Ok($name(s)) } else { Self::parse(&s) }
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A publisher session: the identity a publisher keeps across reconnects.
    SessionId, "ses_", "session id"
);
id_type!(
    /// One relayed request, from enqueue to its single outcome.
    TaskId, "task_", "task id"
);
id_type!(
    /// The stable id of an LLM row; it survives sticky reconnects and restarts.
    LlmId, "llm_", "llm id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_and_carry_128_bits() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), "ses_".len() + 32);
        assert!(SessionId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in ["", "a b", "../etc", "x\u{0}", &"a".repeat(MAX_ID_LEN + 1)] {
            assert!(TaskId::parse(bad).is_err(), "{bad:?} accepted");
            assert!(serde_json::from_value::<TaskId>(serde_json::json!(bad)).is_err());
        }
    }
}
