//! LLM rows: what the registry stores, and the view of a row that clients may see.
//!
//! A row's place in the lifecycle indexes (live rows by heartbeat, inactive rows by the
//! time they went inactive) is decided here, by [`LlmRecord::live_since`] and
//! [`LlmRecord::inactive_key`], so every [`Store`](crate::Store) indexes by the same rule.

use serde::{Deserialize, Serialize};

use crate::access::Access;
use crate::agent::Persona;
use crate::protocol::UpstreamState;
use crate::{LlmId, LlmName, Principal, ReplicaId, SessionId, Timestamp};

/// Which replica holds the control channel of a row's session, and which of its binds
/// that is. Written on every row of the session when its channel binds, and cleared
/// with a compare-and-set on this very value when it closes, so a replica's late close
/// can never demote a channel bound since, here or on another replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelBinding {
    /// The replica holding the channel.
    pub replica: ReplicaId,
    /// The bind's epoch on that replica: every bind gets a new, larger one.
    pub epoch: u64,
}

/// Where a row's answers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LlmKind {
    /// An upstream URL and key held by the gateway, answered by a
    /// [`PublicBackend`](crate::PublicBackend).
    Public,
    /// A published model, answered by its publisher over the control channel.
    Virtual,
}

/// Whether a row can take requests now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LlmStatus {
    /// Serving: its publisher is connected and heartbeating (or it is public).
    Active,
    /// Its publisher is gone; it is deleted after the inactive retention.
    Inactive,
    /// Reserved for wake-on-demand; stores must keep it as it is.
    Hibernating,
}

/// A row of the LLM registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LlmRecord {
    /// Stable unique id, kept across sticky reconnects.
    pub id: LlmId,
    /// Unique key of the row.
    pub name: LlmName,
    /// Public or virtual.
    pub kind: LlmKind,
    /// Lifecycle status.
    pub status: LlmStatus,
    /// Provider type, e.g. `openai`.
    #[serde(rename = "type")]
    pub provider_type: String,
    /// The upstream model name.
    pub model: String,
    /// Optional tier label, e.g. `fast`.
    pub tier: Option<String>,
    /// The principal that registered the row; only it may change the row.
    pub owner: String,
    /// The publisher session the row is bound to; `None` once detached.
    pub provider_session_id: Option<SessionId>,
    /// The last sign of life from the row's publisher.
    pub last_heartbeat_at: Option<Timestamp>,
    /// When the row last went inactive; `None` while it is not inactive.
    pub inactive_since: Option<Timestamp>,
    /// When the row was first inserted.
    pub created_at: Timestamp,
    /// When the row was last written (heartbeats do not count).
    pub updated_at: Timestamp,
    /// Compare-and-set revision: bumped by the store on every write, never by a
    /// heartbeat. A write names the revision it read.
    pub revision: u64,
    /// The channel of the row's session, while one is bound: which replica holds it.
    /// `None` when no channel is bound (and for public rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<ChannelBinding>,
    /// The pool the row serves in (SPEC §10), if its publisher named one. A row
    /// without one is the pool of one named after itself: see
    /// [`pool_key`](LlmRecord::pool_key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<LlmName>,
    /// How many tasks the row takes at once (1 to 10 000); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Whether the row's upstream can answer, as its publisher last reported (SPEC
    /// §12); `None`: ready (a version 1 publisher reports nothing). While the row's
    /// channel is bound, its status follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamState>,
    /// Set on an agent's row (SPEC §13): the persona it puts over its LLM. Such a row
    /// shares the names namespace and the session lifecycle with the LLMs, but is no
    /// LLM: it is never a pool member and never listed or answered as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Persona>,
    /// Who may see and call the row (SPEC §16), as its publisher declared it; public
    /// when absent.
    #[serde(default, skip_serializing_if = "Access::is_public")]
    pub access: Access,
}

impl LlmRecord {
    /// Whether `who` may see and call this row: the one access decision, which the
    /// router and every listing ask (see [`Access::admits`]).
    pub fn admits(&self, who: &Principal) -> bool {
        self.access.admits(&self.owner, who)
    }

    /// Whether this is an agent's row rather than an LLM's.
    pub fn is_agent(&self) -> bool {
        self.agent.is_some()
    }

    /// The row's pool key: its `pool`, or else its own name. A client's `model` names a
    /// pool by this key; rows sharing it serve one pool.
    pub fn pool_key(&self) -> &LlmName {
        self.pool.as_ref().unwrap_or(&self.name)
    }

    /// The heartbeat key of a row in the live index, or `None` when the row is not a
    /// live virtual (active, or hibernating: a sleeping model's publisher heartbeats
    /// too). GC marks live rows with a key older than the stale cutoff inactive.
    pub fn live_since(&self) -> Option<Timestamp> {
        (self.kind == LlmKind::Virtual
            && matches!(self.status, LlmStatus::Active | LlmStatus::Hibernating))
        .then(|| self.last_heartbeat_at.unwrap_or(Timestamp::EPOCH))
    }

    /// The key of a row in the inactive index, or `None` when it is not inactive. GC
    /// deletes rows with a key older than the retention cutoff.
    pub fn inactive_key(&self) -> Option<Timestamp> {
        (self.status == LlmStatus::Inactive)
            .then(|| self.inactive_since.unwrap_or(Timestamp::EPOCH))
    }

    /// What clients may see of the row: no owner, no session id.
    pub fn view(&self) -> LlmView {
        LlmView {
            name: self.name.clone(),
            id: self.id.clone(),
            kind: self.kind,
            status: self.status,
            provider_type: self.provider_type.clone(),
            model: self.model.clone(),
            tier: self.tier.clone(),
            last_heartbeat_at: self.last_heartbeat_at,
            inactive_since: self.inactive_since,
            pool: Some(self.pool_key().clone()),
            max_concurrent: self.max_concurrent,
            in_flight: 0,
            queued: 0,
        }
    }
}

/// The public view of a row, as the list and get routes answer it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct LlmView {
    /// Unique name.
    pub name: LlmName,
    /// Stable id.
    pub id: LlmId,
    /// Public or virtual.
    pub kind: LlmKind,
    /// Lifecycle status.
    pub status: LlmStatus,
    /// Provider type.
    #[serde(rename = "type")]
    pub provider_type: String,
    /// Upstream model name.
    pub model: String,
    /// Optional tier.
    pub tier: Option<String>,
    /// Last heartbeat of its publisher.
    pub last_heartbeat_at: Option<Timestamp>,
    /// When it went inactive.
    pub inactive_since: Option<Timestamp>,
    /// Its pool key: the pool it serves in, or its own name (always set by this
    /// crate; absent from an older gateway's view).
    #[serde(default)]
    pub pool: Option<LlmName>,
    /// How many tasks it takes at once; `None`: no limit.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Tasks in flight on it, as the answering gateway replica counts them.
    #[serde(default)]
    pub in_flight: u32,
    /// Requests waiting in its pool's queue on the answering replica.
    #[serde(default)]
    pub queued: u32,
}

/// One entry of `GET /v1/models`: a pool key with an active member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// The pool key clients call it by.
    pub id: LlmName,
    /// Where its first active member's answers come from.
    pub kind: LlmKind,
    /// When its oldest active member was first published.
    pub created_at: Timestamp,
}
