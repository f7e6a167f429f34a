//! Who may see and call a row (SPEC §16): an LLM's or agent's [`Access`], declared by
//! its publisher in the register, kept on the row, and decided in one place,
//! [`LlmRecord::admits`](crate::LlmRecord::admits).
//!
//! - `"public"` (the default): every client.
//! - `"owner"`: the principal that owns the row only (its client tokens; a principal's
//!   tokens share its id).
//! - `["team-a", "ci"]`: these principals, and the owner.
//!
//! An admin sees and may call everything. A caller without access is told the row does
//! not exist: the [`Router`](crate::Router) routes it nowhere (404 `model_not_found`, the
//! same body as for a name nobody registered), and no listing shows it.
//!
//! **Pools.** Access is a row's, not a pool's: a request for a pool goes only to the
//! members whose access admits the caller, and a pool is listed (and found) for a
//! caller while one of its members admits it. So a member with `"owner"` access in a
//! pool of public members serves its owner only, and a stranger's prompts never reach
//! it. **Agents**: a request through an agent needs the agent's access, and goes to the
//! members of its LLM that admit the caller too.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::{Error, Principal, Role};

/// Most principals an access list may name.
pub const MAX_ACCESS_PRINCIPALS: usize = 64;
/// Longest principal id an access list may name, in characters.
pub const MAX_PRINCIPAL_LEN: usize = 128;

/// Who may see and call a row. On the wire: `"public"`, `"owner"`, or a list of
/// principal ids.
///
/// ```
/// use virtual_llm_core::{Principal, Role, access::Access};
///
/// let team: Access = serde_json::from_str(r#"["team-a"]"#).unwrap();
/// let member = Principal::new("team-a", [Role::Client]);
/// let stranger = Principal::new("eve", [Role::Client]);
/// assert!(team.admits("alice", &member));
/// assert!(!team.admits("alice", &stranger));
/// assert!(Access::Owner.admits("eve", &stranger), "the owner may always");
/// assert!(Access::Owner.admits("alice", &Principal::new("root", [Role::Admin])));
/// assert_eq!(serde_json::to_string(&Access::default()).unwrap(), r#""public""#);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Access {
    /// Every client.
    #[default]
    Public,
    /// The row's owner only.
    Owner,
    /// These principals (by id), and the owner.
    Principals(Vec<String>),
}

impl Access {
    /// Whether this is [`Access::Public`] (what a row without `access` has).
    pub fn is_public(&self) -> bool {
        *self == Access::Public
    }

    /// Whether `who` may see and call a row owned by `owner` with this access: an
    /// admin always, the owner always, others as the access says.
    pub fn admits(&self, owner: &str, who: &Principal) -> bool {
        if who.has(Role::Admin) || who.id == owner {
            return true;
        }
        match self {
            Access::Public => true,
            Access::Owner => false,
            Access::Principals(ids) => ids.contains(&who.id),
        }
    }

    /// Checks a list: 1 to [`MAX_ACCESS_PRINCIPALS`] ids, each 1 to
    /// [`MAX_PRINCIPAL_LEN`] characters without control characters.
    pub fn validate(&self) -> Result<(), Error> {
        let Access::Principals(ids) = self else {
            return Ok(());
        };
        if ids.is_empty() || ids.len() > MAX_ACCESS_PRINCIPALS {
            return Err(Error::invalid(format!(
                "an access list names 1 to {MAX_ACCESS_PRINCIPALS} principals"
            )));
        }
        for id in ids {
            if id.is_empty()
                || id.chars().count() > MAX_PRINCIPAL_LEN
                || id.chars().any(char::is_control)
            {
                return Err(Error::invalid(format!(
                    "a principal of an access list is 1 to {MAX_PRINCIPAL_LEN} characters, \
                     none of them a control character"
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::Public => f.write_str("public"),
            Access::Owner => f.write_str("owner"),
            Access::Principals(ids) => write!(f, "[{}]", ids.join(", ")),
        }
    }
}

impl Serialize for Access {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Access::Public => s.serialize_str("public"),
            Access::Owner => s.serialize_str("owner"),
            Access::Principals(ids) => ids.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Access {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Word(String),
            List(Vec<String>),
        }
        let access = match Wire::deserialize(d).map_err(|_| {
            de::Error::custom("access is \"public\", \"owner\" or a list of principals")
        })? {
            Wire::Word(w) if w == "public" => Access::Public,
            Wire::Word(w) if w == "owner" => Access::Owner,
            Wire::Word(_) => {
                return Err(de::Error::custom(
                    "access is \"public\", \"owner\" or a list of principals",
                ));
            }
            Wire::List(ids) => Access::Principals(ids),
        };
        access.validate().map_err(de::Error::custom)?;
        Ok(access)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Access {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["public", "owner"])),
            )
            .item(
                ArrayBuilder::new()
                    .items(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .min_length(Some(1))
                            .max_length(Some(MAX_PRINCIPAL_LEN)),
                    )
                    .min_items(Some(1))
                    .max_items(Some(MAX_ACCESS_PRINCIPALS)),
            )
            .description(Some(
                "Who may see and call it: \"public\" (default), \"owner\", or principal ids",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Access {}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(id: &str, role: Role) -> Principal {
        Principal::new(id, [role])
    }

    #[test]
    fn each_access_admits_whom_it_says() {
        let list = Access::Principals(vec!["bob".into(), "ci".into()]);
        let cases = [
            (Access::Public, "eve", Role::Client, true),
            (Access::Owner, "eve", Role::Client, false),
            (Access::Owner, "alice", Role::Client, true),
            (Access::Owner, "root", Role::Admin, true),
            (list.clone(), "bob", Role::Client, true),
            (list.clone(), "ci", Role::Client, true),
            (list.clone(), "alice", Role::Publisher, true),
            (list.clone(), "eve", Role::Client, false),
            (list.clone(), "Bob", Role::Client, false),
            (list, "root", Role::Admin, true),
        ];
        for (access, id, role, expected) in cases {
            assert_eq!(
                access.admits("alice", &who(id, role)),
                expected,
                "{access} for {id}"
            );
        }
    }

    #[test]
    fn the_wire_form_round_trips_and_refuses_the_rest() {
        for (text, access) in [
            (r#""public""#, Access::Public),
            (r#""owner""#, Access::Owner),
            (
                r#"["a","b"]"#,
                Access::Principals(vec!["a".into(), "b".into()]),
            ),
        ] {
            let parsed: Access = serde_json::from_str(text).unwrap();
            assert_eq!(parsed, access);
            assert_eq!(serde_json::to_string(&access).unwrap(), text);
        }
        let too_many = serde_json::to_string(&vec!["x"; MAX_ACCESS_PRINCIPALS + 1]).unwrap();
        let too_long = serde_json::to_string(&vec!["x".repeat(MAX_PRINCIPAL_LEN + 1)]).unwrap();
        for bad in [
            r#""everyone""#,
            r#""Public""#,
            "[]",
            r#"[""]"#,
            r#"["a\nb"]"#,
            "3",
            r#"{"a":1}"#,
            &too_many,
            &too_long,
        ] {
            assert!(serde_json::from_str::<Access>(bad).is_err(), "{bad} parsed");
        }
    }
}
