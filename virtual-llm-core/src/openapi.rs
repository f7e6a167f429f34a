//! OpenAPI schemas (feature `openapi`) for the wire types whose JSON is not their Rust
//! shape: names, ids and timestamps travel as strings, a task result as one of three
//! objects. The derived schemas of the other wire types refer to these.

use std::borrow::Cow;

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::{LlmId, LlmName, MAX_ID_LEN, MAX_NAME_LEN, SessionId, TaskId, Timestamp};

fn string(description: &str, pattern: Option<String>, max: usize) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(pattern)
        .min_length(Some(1))
        .max_length(Some(max))
        .into()
}

macro_rules! string_schema {
    ($type:ty, $name:literal, $schema:expr) => {
        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                $schema
            }
        }

        impl ToSchema for $type {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

/// The name rules of [`LlmName`] as a pattern: segments of `[A-Za-z0-9._:-]` joined
/// by `/`, not starting with `_`. (The `.`/`..` segment and last-segment rules are
/// checked by the gateway, which answers 400.)
const NAME_PATTERN: &str = "^[A-Za-z0-9.:-][A-Za-z0-9._:-]*(/[A-Za-z0-9._:-]+)*$";

string_schema!(
    LlmName,
    "LlmName",
    string(
        "An LLM or pool name: segments of [A-Za-z0-9._:-] separated by '/', not starting with '_'; no segment '.' or '..', the last not 'infer' or 'members'.",
        Some(NAME_PATTERN.to_owned()),
        MAX_NAME_LEN
    )
);

fn id(what: &str) -> RefOr<Schema> {
    string(
        what,
        Some(format!("^[A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}$")),
        MAX_ID_LEN,
    )
}

string_schema!(LlmId, "LlmId", id("A row's stable id."));
string_schema!(SessionId, "SessionId", id("A publisher session's id."));
string_schema!(TaskId, "TaskId", id("A task's id."));
string_schema!(
    Timestamp,
    "Timestamp",
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .description(Some("RFC 3339, UTC, milliseconds."))
        .into()
);
