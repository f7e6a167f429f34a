//! How a row is laid out on disk: [`StoredRow`], encoded as JSON.
//!
//! The stored form belongs to this crate, not to the API's JSON: timestamps are plain
//! milliseconds (exact and compact) rather than RFC 3339 text, and the row carries a
//! `stamp` the core's [`LlmRecord`] does not have (see [`StoredRow::stamp`]). A change
//! of this layout is a change of [`SCHEMA_VERSION`](crate::SCHEMA_VERSION).
//!
//! JSON because it is already a dependency of the core, it is readable when an operator
//! dumps the file, and decoding re-validates every name and id: bytes that do not
//! decode into a valid row are reported as [`StoreError::Corrupted`], never guessed at.
//! A row is a few hundred bytes, so a binary format would save little that matters.
//!
//! [`StoreError::Corrupted`]: virtual_llm_core::StoreError::Corrupted

use serde::{Deserialize, Serialize};
use virtual_llm_core::access::Access;
use virtual_llm_core::agent::Persona;
use virtual_llm_core::protocol::UpstreamState;
use virtual_llm_core::{
    ChannelBinding, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, ReplicaId, SessionId, Timestamp,
};

use crate::error::Error;

/// A row as stored: the [`LlmRecord`] plus its write stamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredRow {
    id: LlmId,
    name: LlmName,
    kind: LlmKind,
    status: LlmStatus,
    #[serde(rename = "type")]
    provider_type: String,
    model: String,
    tier: Option<String>,
    owner: String,
    session: Option<SessionId>,
    heartbeat_ms: Option<u64>,
    inactive_since_ms: Option<u64>,
    created_ms: u64,
    updated_ms: u64,
    revision: u64,
    /// The store-wide sequence number of the write transaction that last wrote this
    /// row (heartbeat flushes keep it). Unlike the revision, it never repeats for a
    /// name, even after a delete and a new insert, so an in-memory heartbeat recorded
    /// against one version of a row can never apply to another.
    stamp: u64,
    /// The row's channel binding (schema 2). Absent from rows written by schema 1,
    /// and from any row without one: a row without a binding is stored as schema 1
    /// stored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    binding: Option<ChannelBinding>,
    /// The row's pool (schema 3); absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool: Option<LlmName>,
    /// The row's capacity (schema 3); absent when it has no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrent: Option<u32>,
    /// The upstream state its publisher last reported (schema 3); absent: ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream: Option<UpstreamState>,
    /// An agent's persona (schema 4); absent from an LLM's row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<Persona>,
    /// Who may see and call the row (schema 5); absent: public.
    #[serde(default, skip_serializing_if = "Access::is_public")]
    access: Access,
}

impl StoredRow {
    /// The stored form of `r`, written by the transaction numbered `stamp`.
    pub(crate) fn new(r: LlmRecord, stamp: u64) -> Self {
        // Destructured without `..`: a field added to LlmRecord fails to compile here
        // until the stored form (and the schema version) says what to do with it.
        let LlmRecord {
            id,
            name,
            kind,
            status,
            provider_type,
            model,
            tier,
            owner,
            provider_session_id,
            last_heartbeat_at,
            inactive_since,
            created_at,
            updated_at,
            revision,
            binding,
            pool,
            max_concurrent,
            upstream,
            agent,
            access,
        } = r;
        StoredRow {
            id,
            name,
            kind,
            status,
            provider_type,
            model,
            tier,
            owner,
            session: provider_session_id,
            heartbeat_ms: last_heartbeat_at.map(Timestamp::as_millis),
            inactive_since_ms: inactive_since.map(Timestamp::as_millis),
            created_ms: created_at.as_millis(),
            updated_ms: updated_at.as_millis(),
            revision,
            stamp,
            binding,
            pool,
            max_concurrent,
            upstream,
            agent,
            access,
        }
    }

    /// The row as the core sees it.
    pub(crate) fn to_record(&self) -> LlmRecord {
        self.clone().into_record()
    }

    /// The row as the core sees it, by value.
    pub(crate) fn into_record(self) -> LlmRecord {
        LlmRecord {
            id: self.id,
            name: self.name,
            kind: self.kind,
            status: self.status,
            provider_type: self.provider_type,
            model: self.model,
            tier: self.tier,
            owner: self.owner,
            provider_session_id: self.session,
            last_heartbeat_at: self.heartbeat_ms.map(Timestamp::from_millis),
            inactive_since: self.inactive_since_ms.map(Timestamp::from_millis),
            created_at: Timestamp::from_millis(self.created_ms),
            updated_at: Timestamp::from_millis(self.updated_ms),
            revision: self.revision,
            binding: self.binding,
            pool: self.pool,
            max_concurrent: self.max_concurrent,
            upstream: self.upstream,
            agent: self.agent,
            access: self.access,
        }
    }

    /// The row's name.
    pub(crate) fn name(&self) -> &LlmName {
        &self.name
    }

    /// The write stamp (see the field's doc).
    pub(crate) fn stamp(&self) -> u64 {
        self.stamp
    }

    /// The row's stable id.
    pub(crate) fn id(&self) -> &LlmId {
        &self.id
    }

    /// The compare-and-set revision.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// The session the row is bound to.
    pub(crate) fn session(&self) -> Option<&SessionId> {
        self.session.as_ref()
    }

    /// The replica holding the row's control channel: its key in the replica index.
    pub(crate) fn replica(&self) -> Option<&ReplicaId> {
        self.binding.as_ref().map(|b| &b.replica)
    }

    /// The row's key in the pool index: the core's [`LlmRecord::pool_key`] (its pool,
    /// or else its own name), so this store indexes by the same rule as every other.
    pub(crate) fn pool_key(&self) -> &LlmName {
        self.pool.as_ref().unwrap_or(&self.name)
    }

    /// The last heartbeat, as stored.
    pub(crate) fn heartbeat(&self) -> Option<Timestamp> {
        self.heartbeat_ms.map(Timestamp::from_millis)
    }

    /// Sets the heartbeat (a flush of coalesced liveness); revision and stamp stay.
    pub(crate) fn set_heartbeat(&mut self, at: Timestamp) {
        self.heartbeat_ms = Some(at.as_millis());
    }

    /// The key of the row in the live index: the core's [`LlmRecord::live_since`], so
    /// this store indexes by the same rule as every other.
    pub(crate) fn live_key(&self) -> Option<u64> {
        self.to_record().live_since().map(Timestamp::as_millis)
    }

    /// The key of the row in the inactive index: the core's
    /// [`LlmRecord::inactive_key`].
    pub(crate) fn inactive_key(&self) -> Option<u64> {
        self.to_record().inactive_key().map(Timestamp::as_millis)
    }

    /// The bytes stored in the rows table.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self)
            .map_err(|e| Error::Corrupted(format!("row {} does not encode: {e}", self.name)))
    }

    /// Decodes the bytes stored under `key`; anything but a valid row of that name is
    /// corruption.
    pub(crate) fn decode(key: &str, bytes: &[u8]) -> Result<Self, Error> {
        let row: StoredRow = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupted(format!("row {key:?} does not decode: {e}")))?;
        if row.name.as_str() != key {
            return Err(Error::Corrupted(format!(
                "row stored under {key:?} is named {:?}",
                row.name.as_str()
            )));
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtual_llm_core::testkit::{at, record};

    #[test]
    fn round_trips_every_field_and_keys_like_the_core() {
        let mut r = record("alpha");
        r.status = LlmStatus::Hibernating;
        r.tier = Some("fast".into());
        r.provider_session_id = Some(SessionId::generate());
        r.last_heartbeat_at = None;
        r.inactive_since = Some(at(7));
        r.revision = 9;
        let replica = ReplicaId::parse("gw-1").unwrap();
        r.binding = Some(ChannelBinding {
            replica: replica.clone(),
            epoch: u64::MAX,
        });
        r.access = Access::Principals(vec!["team-a".into(), "ci".into()]);
        let stored = StoredRow::new(r.clone(), 42);
        let bytes = stored.encode().unwrap();
        let back = StoredRow::decode("alpha", &bytes).unwrap();
        assert_eq!(back.to_record(), r);
        assert_eq!(back.stamp(), 42);
        assert_eq!(back.replica(), Some(&replica));
        assert_eq!(back.live_key(), r.live_since().map(Timestamp::as_millis));
        assert_eq!(
            back.inactive_key(),
            r.inactive_key().map(Timestamp::as_millis)
        );
        assert_eq!(back.pool_key(), r.pool_key());
        let mut live = record("beta");
        live.last_heartbeat_at = None;
        let live = StoredRow::new(live.clone(), 1);
        assert_eq!(live.live_key(), Some(0));
    }

    #[test]
    fn a_row_without_a_binding_is_stored_as_schema_1_stored_it() {
        let r = record("alpha");
        let bytes = StoredRow::new(r.clone(), 1).encode().unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("binding"), "{text}");
        assert!(
            !text.contains("access"),
            "a public row is stored as before: {text}"
        );
        let back = StoredRow::decode("alpha", text.as_bytes()).unwrap();
        assert_eq!((back.to_record(), back.replica()), (r, None));
    }

    #[test]
    fn a_row_is_keyed_by_its_pool_or_else_its_own_name() {
        let mut r = record("member");
        let solo = StoredRow::new(r.clone(), 1);
        assert_eq!(solo.pool_key(), r.pool_key());
        assert_eq!(solo.pool_key().as_str(), "member");
        r.pool = Some(LlmName::parse("llama").unwrap());
        r.max_concurrent = Some(4);
        let bytes = StoredRow::new(r.clone(), 1).encode().unwrap();
        let back = StoredRow::decode("member", &bytes).unwrap();
        assert_eq!(back.pool_key(), r.pool_key());
        assert_eq!(back.pool_key().as_str(), "llama");
        assert_eq!(back.to_record(), r, "pool and capacity round-trip");
    }

    #[test]
    fn torn_or_misfiled_bytes_are_corruption() {
        let bytes = StoredRow::new(record("alpha"), 1).encode().unwrap();
        let torn = &bytes[..bytes.len() / 2];
        assert!(matches!(
            StoredRow::decode("alpha", torn),
            Err(Error::Corrupted(_))
        ));
        assert!(matches!(
            StoredRow::decode("beta", &bytes),
            Err(Error::Corrupted(_))
        ));
        let bad_name = String::from_utf8(bytes)
            .unwrap()
            .replace("\"alpha\"", "\"_bad\"");
        assert!(matches!(
            StoredRow::decode("_bad", bad_name.as_bytes()),
            Err(Error::Corrupted(_))
        ));
    }
}
