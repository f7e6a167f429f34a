//! Identifiers: session ids, task ids, row ids and completion ids.
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
id_type!(
    /// A streamed answer as its client may resume it (`x-completion-id`, SPEC §15).
    CompletionId, "cmpl_", "completion id"
);

/// The longest replica id.
pub const MAX_REPLICA_LEN: usize = 64;

/// One gateway process among the replicas sharing a store: the holder of the control
/// channels bound to it and of the tasks its clients started. A row's
/// [`ChannelBinding`](crate::ChannelBinding) names it; a task id carries it.
///
/// 1 to 64 characters of `[A-Za-z0-9-]`: no `_`, so that a task id can end with one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReplicaId(String);

impl ReplicaId {
    /// A fresh replica id, `r` and 16 random hex digits: unique among the replicas a
    /// deployment will ever run.
    pub fn generate() -> Self {
        let bits: u64 = rand::rng().random();
        ReplicaId(format!("r{bits:016x}"))
    }

    /// Checks an operator's or a peer's replica id.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if !s.is_empty()
            && s.len() <= MAX_REPLICA_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            Ok(ReplicaId(s.to_owned()))
        } else {
            Err(Error::invalid(format!(
                "invalid replica id: expected 1 to {MAX_REPLICA_LEN} characters of [A-Za-z0-9-]"
            )))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ReplicaId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::parse(&s)
    }
}

impl From<ReplicaId> for String {
    fn from(id: ReplicaId) -> String {
        id.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Hex digits of a task id's random part.
const TASK_RANDOM_HEX: usize = 32;

impl TaskId {
    /// A fresh task id started on `replica`: `task_`, 128 random bits in hex, `_`, the
    /// replica. A result posted on any replica finds its way to the one holding the
    /// task through [`TaskId::replica`].
    pub fn on(replica: &ReplicaId) -> Self {
        let bits: u128 = rand::rng().random();
        TaskId(format!("task_{bits:032x}_{replica}"))
    }

    /// The replica that started this task, when its id says (ids made by
    /// [`TaskId::on`]); `None` for an id of another form, which only the local replica
    /// can know.
    pub fn replica(&self) -> Option<ReplicaId> {
        let rest = self.0.strip_prefix("task_")?;
        let (random, replica) = rest.split_at_checked(TASK_RANDOM_HEX)?;
        if !random.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        ReplicaId::parse(replica.strip_prefix('_')?).ok()
    }
}

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
    fn a_task_id_says_which_replica_started_it() {
        let replica = ReplicaId::parse("gw-a").unwrap();
        let task = TaskId::on(&replica);
        assert_eq!(task.replica(), Some(replica));
        assert!(TaskId::parse(task.as_str()).is_ok());
        let long = ReplicaId::parse(&"z".repeat(MAX_REPLICA_LEN)).unwrap();
        assert!(TaskId::parse(TaskId::on(&long).as_str()).is_ok());
        assert_eq!(TaskId::generate().replica(), None);
        assert_eq!(TaskId::parse("task_xyz_gw-a").unwrap().replica(), None);
        for bad in ["", "a_b", "a b", &"a".repeat(MAX_REPLICA_LEN + 1)] {
            assert!(ReplicaId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_ne!(ReplicaId::generate(), ReplicaId::generate());
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in ["", "a b", "../etc", "x\u{0}", &"a".repeat(MAX_ID_LEN + 1)] {
            assert!(TaskId::parse(bad).is_err(), "{bad:?} accepted");
            assert!(serde_json::from_value::<TaskId>(serde_json::json!(bad)).is_err());
        }
    }
}
