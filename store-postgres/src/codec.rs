//! How a row maps to the columns of `virtual_llm_rows`: [`Columns`] for writing,
//! [`decode`] for reading, and the SQL that names them.
//!
//! Every field of [`LlmRecord`] has a column of its own, readable by an operator with
//! `psql`: enums as their lowercase names, timestamps as milliseconds since the Unix
//! epoch (the core's [`Timestamp`], exact; `bigint` holds them until the year
//! 292 million, and a later one is refused as a value PostgreSQL cannot hold), a
//! binding's epoch (an unsigned 64-bit number) as `numeric(20, 0)`, an agent's persona
//! as `json` (kept as written, so it comes back exactly). Three columns are derived
//! here, with the core's own rules, for the indexes: `pool_key`
//! ([`LlmRecord::pool_key`]), `live_ms` ([`LlmRecord::live_since`]) and `inactive_ms`
//! ([`LlmRecord::inactive_key`]). Reading re-validates every name and id: values that
//! do not decode into a valid row are [`Error::Corrupted`], never guessed at.
//!
//! A change of this layout is a change of [`SCHEMA_VERSION`](crate::SCHEMA_VERSION)
//! and a new migration.

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use virtual_llm_core::access::Access;
use virtual_llm_core::protocol::UpstreamState;
use virtual_llm_core::{
    ChannelBinding, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, ReplicaId, SessionId, Timestamp,
};

use crate::error::Error;

/// The columns a read selects, in the order [`decode`] reads them.
pub(crate) const SELECT: &str = "SELECT name, id, revision, kind, status, provider_type, \
     model, tier, owner, session, heartbeat_ms, inactive_since_ms, created_ms, updated_ms, \
     binding_replica, binding_epoch::text, pool, max_concurrent, upstream, agent, access \
     FROM virtual_llm_rows";

/// The rows of a batch as one relation: `$1` to `$23` are arrays holding one column
/// each (the order of [`Columns`]), `$24` the revisions the writes expect.
const ROWS: &str = "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::int8[], \
     $13::int8[], $14::text[], $15::text[], $16::text[], $17::text[], $18::int8[], \
     $19::text[], $20::json[], $21::int8[], $22::int8[], $23::json[], $24::int8[]) \
     WITH ORDINALITY \
     AS v(name, id, kind, status, provider_type, model, tier, owner, session, heartbeat_ms, \
     inactive_since_ms, created_ms, updated_ms, binding_replica, binding_epoch, pool, \
     pool_key, max_concurrent, upstream, agent, live_ms, inactive_ms, access, expected, i)";

/// Inserts the rows of a batch at revision 1, in the order given (name order), each
/// unless a row of the same name, ignoring ASCII case, exists; returns the names
/// inserted.
pub(crate) fn insert() -> String {
    format!(
        "INSERT INTO virtual_llm_rows (name, id, kind, status, provider_type, model, tier, \
         owner, session, heartbeat_ms, inactive_since_ms, created_ms, updated_ms, \
         binding_replica, binding_epoch, pool, pool_key, max_concurrent, upstream, agent, \
         live_ms, inactive_ms, access, revision) \
         SELECT name, id, kind, status, provider_type, model, tier, owner, session, \
         heartbeat_ms, inactive_since_ms, created_ms, updated_ms, binding_replica, \
         binding_epoch::numeric, pool, pool_key, max_concurrent, upstream, agent, live_ms, \
         inactive_ms, access, 1 FROM {ROWS} ORDER BY i \
         ON CONFLICT DO NOTHING RETURNING name, revision"
    )
}

/// Replaces each row of a batch that is still the row of that id at the expected
/// revision, and bumps its revision; returns the names replaced, with their revisions.
pub(crate) fn update() -> String {
    format!(
        "UPDATE virtual_llm_rows r SET kind = v.kind, status = v.status, \
         provider_type = v.provider_type, model = v.model, tier = v.tier, owner = v.owner, \
         session = v.session, heartbeat_ms = v.heartbeat_ms, \
         inactive_since_ms = v.inactive_since_ms, created_ms = v.created_ms, \
         updated_ms = v.updated_ms, binding_replica = v.binding_replica, \
         binding_epoch = v.binding_epoch::numeric, pool = v.pool, pool_key = v.pool_key, \
         max_concurrent = v.max_concurrent, upstream = v.upstream, agent = v.agent, \
         live_ms = v.live_ms, inactive_ms = v.inactive_ms, access = v.access, \
         revision = r.revision + 1 \
         FROM {ROWS} WHERE r.name = v.name AND r.id = v.id AND r.revision = v.expected \
         RETURNING r.name, r.revision"
    )
}

/// Deletes each row `$1[k]` that is still the row `$2[k]` at revision `$3[k]`;
/// returns the names deleted.
pub(crate) const DELETE: &str = "DELETE FROM virtual_llm_rows r \
     USING unnest($1::text[], $2::text[], $3::int8[]) AS v(name, id, expected) \
     WHERE r.name = v.name AND r.id = v.id AND r.revision = v.expected RETURNING r.name";

/// The columns of several rows, one array per column: the parameters of
/// [`insert`] and [`update`].
#[derive(Debug, Default)]
pub(crate) struct ColumnArrays {
    name: Vec<String>,
    id: Vec<String>,
    kind: Vec<&'static str>,
    status: Vec<&'static str>,
    provider_type: Vec<String>,
    model: Vec<String>,
    tier: Vec<Option<String>>,
    owner: Vec<String>,
    session: Vec<Option<String>>,
    heartbeat_ms: Vec<Option<i64>>,
    inactive_since_ms: Vec<Option<i64>>,
    created_ms: Vec<i64>,
    updated_ms: Vec<i64>,
    binding_replica: Vec<Option<String>>,
    binding_epoch: Vec<Option<String>>,
    pool: Vec<Option<String>>,
    pool_key: Vec<String>,
    max_concurrent: Vec<Option<i64>>,
    upstream: Vec<Option<&'static str>>,
    agent: Vec<Option<serde_json::Value>>,
    live_ms: Vec<Option<i64>>,
    inactive_ms: Vec<Option<i64>>,
    access: Vec<Option<serde_json::Value>>,
    expected: Vec<i64>,
}

impl ColumnArrays {
    /// Adds a row, and the revision its write expects.
    pub(crate) fn push(&mut self, c: Columns, expected: i64) {
        self.name.push(c.name);
        self.id.push(c.id);
        self.kind.push(c.kind);
        self.status.push(c.status);
        self.provider_type.push(c.provider_type);
        self.model.push(c.model);
        self.tier.push(c.tier);
        self.owner.push(c.owner);
        self.session.push(c.session);
        self.heartbeat_ms.push(c.heartbeat_ms);
        self.inactive_since_ms.push(c.inactive_since_ms);
        self.created_ms.push(c.created_ms);
        self.updated_ms.push(c.updated_ms);
        self.binding_replica.push(c.binding_replica);
        self.binding_epoch.push(c.binding_epoch);
        self.pool.push(c.pool);
        self.pool_key.push(c.pool_key);
        self.max_concurrent.push(c.max_concurrent);
        self.upstream.push(c.upstream);
        self.agent.push(c.agent);
        self.live_ms.push(c.live_ms);
        self.inactive_ms.push(c.inactive_ms);
        self.access.push(c.access);
        self.expected.push(expected);
    }

    /// Whether no row was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.name.is_empty()
    }

    /// `$1` to `$24` of [`insert`] and [`update`].
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 24] {
        [
            &self.name,
            &self.id,
            &self.kind,
            &self.status,
            &self.provider_type,
            &self.model,
            &self.tier,
            &self.owner,
            &self.session,
            &self.heartbeat_ms,
            &self.inactive_since_ms,
            &self.created_ms,
            &self.updated_ms,
            &self.binding_replica,
            &self.binding_epoch,
            &self.pool,
            &self.pool_key,
            &self.max_concurrent,
            &self.upstream,
            &self.agent,
            &self.live_ms,
            &self.inactive_ms,
            &self.access,
            &self.expected,
        ]
    }
}

/// A row's values, one per column, as [`ColumnArrays`] binds them.
#[derive(Debug)]
pub(crate) struct Columns {
    name: String,
    id: String,
    kind: &'static str,
    status: &'static str,
    provider_type: String,
    model: String,
    tier: Option<String>,
    owner: String,
    session: Option<String>,
    heartbeat_ms: Option<i64>,
    inactive_since_ms: Option<i64>,
    created_ms: i64,
    updated_ms: i64,
    binding_replica: Option<String>,
    binding_epoch: Option<String>,
    pool: Option<String>,
    pool_key: String,
    max_concurrent: Option<i64>,
    upstream: Option<&'static str>,
    agent: Option<serde_json::Value>,
    live_ms: Option<i64>,
    inactive_ms: Option<i64>,
    access: Option<serde_json::Value>,
}

/// `t` as stored: milliseconds in a `bigint`.
pub(crate) fn millis(t: Timestamp, field: &str, row: &LlmName) -> Result<i64, Error> {
    i64::try_from(t.as_millis()).map_err(|_| {
        Error::Invalid(format!(
            "{field} of row {row} ({} ms) is past what PostgreSQL's bigint holds",
            t.as_millis()
        ))
    })
}

fn opt_millis(t: Option<Timestamp>, field: &str, row: &LlmName) -> Result<Option<i64>, Error> {
    t.map(|t| millis(t, field, row)).transpose()
}

impl Columns {
    /// The columns of `r`.
    pub(crate) fn of(r: &LlmRecord) -> Result<Self, Error> {
        // Destructured without `..`: a field added to LlmRecord fails to compile here
        // until the table (and the schema version) says where it goes.
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
            revision: _,
            binding,
            pool,
            max_concurrent,
            upstream,
            agent,
            access,
        } = r;
        let agent = agent
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| {
                Error::Invalid(format!("the persona of row {name} does not encode: {e}"))
            })?;
        Ok(Columns {
            name: name.to_string(),
            id: id.as_str().to_owned(),
            kind: kind_str(*kind),
            status: status_str(*status),
            provider_type: provider_type.clone(),
            model: model.clone(),
            tier: tier.clone(),
            owner: owner.clone(),
            session: provider_session_id.as_ref().map(|s| s.as_str().to_owned()),
            heartbeat_ms: opt_millis(*last_heartbeat_at, "lastHeartbeatAt", name)?,
            inactive_since_ms: opt_millis(*inactive_since, "inactiveSince", name)?,
            created_ms: millis(*created_at, "createdAt", name)?,
            updated_ms: millis(*updated_at, "updatedAt", name)?,
            binding_replica: binding.as_ref().map(|b| b.replica.as_str().to_owned()),
            binding_epoch: binding.as_ref().map(|b| b.epoch.to_string()),
            pool: pool.as_ref().map(ToString::to_string),
            pool_key: r.pool_key().to_string(),
            max_concurrent: max_concurrent.map(i64::from),
            upstream: upstream.map(UpstreamState::as_str),
            agent,
            live_ms: opt_millis(r.live_since(), "lastHeartbeatAt", name)?,
            inactive_ms: opt_millis(r.inactive_key(), "inactiveSince", name)?,
            // NULL for a public row, as the core leaves it out of its JSON.
            access: match access {
                Access::Public => None,
                restricted => Some(serde_json::to_value(restricted).map_err(|e| {
                    Error::Invalid(format!("the access of row {name} does not encode: {e}"))
                })?),
            },
        })
    }
}

fn kind_str(k: LlmKind) -> &'static str {
    match k {
        LlmKind::Public => "public",
        LlmKind::Virtual => "virtual",
    }
}

fn status_str(s: LlmStatus) -> &'static str {
    match s {
        LlmStatus::Active => "active",
        LlmStatus::Inactive => "inactive",
        LlmStatus::Hibernating => "hibernating",
    }
}

/// A revision as the core counts it.
pub(crate) fn revision(stored: i64, row: &str) -> Result<u64, Error> {
    u64::try_from(stored)
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| Error::Corrupted(format!("row {row:?} has revision {stored}")))
}

/// The row of a [`SELECT`].
pub(crate) fn decode(row: &Row) -> Result<LlmRecord, Error> {
    let name: String = get(row, 0, "?")?;
    let key = name.as_str();
    let bad = |what: &str, detail: &dyn std::fmt::Display| {
        Error::Corrupted(format!("row {key:?} has an invalid {what}: {detail}"))
    };
    let ts = |ms: i64, what: &str| {
        u64::try_from(ms)
            .map(Timestamp::from_millis)
            .map_err(|_| bad(what, &ms))
    };
    let opt_ts = |ms: Option<i64>, what: &str| ms.map(|ms| ts(ms, what)).transpose();
    let kind = match get::<String>(row, 3, key)?.as_str() {
        "public" => LlmKind::Public,
        "virtual" => LlmKind::Virtual,
        other => return Err(bad("kind", &other)),
    };
    let status = match get::<String>(row, 4, key)?.as_str() {
        "active" => LlmStatus::Active,
        "inactive" => LlmStatus::Inactive,
        "hibernating" => LlmStatus::Hibernating,
        other => return Err(bad("status", &other)),
    };
    let binding = match (
        get::<Option<String>>(row, 14, key)?,
        get::<Option<String>>(row, 15, key)?,
    ) {
        (None, None) => None,
        (Some(replica), Some(epoch)) => Some(ChannelBinding {
            replica: ReplicaId::parse(&replica).map_err(|e| bad("binding replica", &e))?,
            epoch: epoch.parse().map_err(|e| bad("binding epoch", &e))?,
        }),
        _ => return Err(bad("binding", &"a replica without an epoch")),
    };
    let upstream = match get::<Option<String>>(row, 18, key)?.as_deref() {
        None => None,
        Some("ready") => Some(UpstreamState::Ready),
        Some("asleep") => Some(UpstreamState::Asleep),
        Some("unavailable") => Some(UpstreamState::Unavailable),
        Some(other) => return Err(bad("upstream state", &other)),
    };
    let agent = get::<Option<serde_json::Value>>(row, 19, key)?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| bad("persona", &e))?;
    let access = get::<Option<serde_json::Value>>(row, 20, key)?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| bad("access", &e))?
        .unwrap_or_default();
    let max_concurrent = get::<Option<i64>>(row, 17, key)?
        .map(|n| u32::try_from(n).map_err(|_| bad("capacity", &n)))
        .transpose()?;
    Ok(LlmRecord {
        id: LlmId::parse(&get::<String>(row, 1, key)?).map_err(|e| bad("id", &e))?,
        name: LlmName::parse(key).map_err(|e| bad("name", &e))?,
        revision: revision(get(row, 2, key)?, key)?,
        kind,
        status,
        provider_type: get(row, 5, key)?,
        model: get(row, 6, key)?,
        tier: get(row, 7, key)?,
        owner: get(row, 8, key)?,
        provider_session_id: get::<Option<String>>(row, 9, key)?
            .map(|s| SessionId::parse(&s).map_err(|e| bad("session", &e)))
            .transpose()?,
        last_heartbeat_at: opt_ts(get(row, 10, key)?, "heartbeat")?,
        inactive_since: opt_ts(get(row, 11, key)?, "inactiveSince")?,
        created_at: ts(get(row, 12, key)?, "createdAt")?,
        updated_at: ts(get(row, 13, key)?, "updatedAt")?,
        binding,
        pool: get::<Option<String>>(row, 16, key)?
            .map(|p| LlmName::parse(&p).map_err(|e| bad("pool", &e)))
            .transpose()?,
        max_concurrent,
        upstream,
        agent,
        access,
    })
}

/// Column `i` of `row`, or corruption naming the row.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
    key: &str,
) -> Result<T, Error> {
    row.try_get(i)
        .map_err(|e| Error::Corrupted(format!("column {i} of row {key:?} does not decode: {e}")))
}

/// The payload of a change notification: the row's name, and its pool key after the
/// write, after a tab (a character no name holds); the name alone for a delete.
pub(crate) fn change_payload(name: &LlmName, pool: Option<&LlmName>) -> String {
    match pool {
        Some(pool) => format!("{name}\t{pool}"),
        None => name.to_string(),
    }
}

/// The change a notification's payload reports; `None` for a payload this crate
/// did not write.
pub(crate) fn parse_change(payload: &str) -> Option<virtual_llm_core::store::RowChange> {
    let (name, pool) = match payload.split_once('\t') {
        Some((name, pool)) => (name, Some(LlmName::parse(pool).ok()?)),
        None => (payload, None),
    };
    Some(virtual_llm_core::store::RowChange {
        name: LlmName::parse(name).ok()?,
        pool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtual_llm_core::testkit::{at, record};

    #[test]
    fn derived_columns_follow_the_cores_rules() {
        let mut r = record("member");
        r.pool = Some(LlmName::parse("llama").unwrap());
        r.last_heartbeat_at = None;
        let c = Columns::of(&r).unwrap();
        assert_eq!(c.pool_key, "llama");
        assert_eq!(
            c.live_ms,
            Some(0),
            "a live row without a heartbeat is the epoch"
        );
        assert_eq!(c.inactive_ms, None);
        r.status = LlmStatus::Inactive;
        r.inactive_since = Some(at(7));
        let c = Columns::of(&r).unwrap();
        assert_eq!((c.live_ms, c.inactive_ms), (None, Some(7_000)));
        r.binding = Some(ChannelBinding {
            replica: ReplicaId::parse("gw-1").unwrap(),
            epoch: u64::MAX,
        });
        assert_eq!(
            Columns::of(&r).unwrap().binding_epoch.as_deref(),
            Some("18446744073709551615")
        );
    }

    #[test]
    fn a_timestamp_past_bigint_is_refused() {
        let mut r = record("late");
        r.updated_at = Timestamp::MAX;
        assert!(matches!(Columns::of(&r), Err(Error::Invalid(_))));
    }

    #[test]
    fn change_payloads_round_trip() {
        let a = LlmName::parse("a.b:c-1").unwrap();
        let p = LlmName::parse("pool").unwrap();
        let change = parse_change(&change_payload(&a, Some(&p))).unwrap();
        assert_eq!((change.name, change.pool), (a.clone(), Some(p)));
        let change = parse_change(&change_payload(&a, None)).unwrap();
        assert_eq!((change.name, change.pool), (a, None));
        assert!(parse_change("_bad").is_none());
        assert!(parse_change("a\t_bad").is_none());
        assert!(parse_change("").is_none());
    }
}
