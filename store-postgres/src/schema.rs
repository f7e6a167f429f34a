//! The schema: embedded, versioned migrations, applied when a store connects.
//!
//! The table `virtual_llm_schema` records every migration applied (its version, what
//! it did, when). Connecting runs, in one transaction holding an advisory lock (so
//! replicas starting together migrate once, one after the other), every migration
//! newer than the database's version, up to [`SCHEMA_VERSION`]. A database whose
//! version is newer than this build knows was written by a later release: it is
//! refused with [`StoreError::Incompatible`](virtual_llm_core::StoreError::Incompatible),
//! never read or written with the wrong layout. A failed migration rolls back whole.
//!
//! A migration is a file of `migrations/`, embedded in the binary. Released migrations
//! are never edited: a change of layout is a new file and a new version.

use deadpool_postgres::Object;

use crate::error::Error;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 1;

/// The table recording applied migrations.
const VERSIONS: &str = "virtual_llm_schema";

/// The migrations, in order; the last one's version is [`SCHEMA_VERSION`].
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "rows, lifecycle indexes, case-insensitive unique names",
    sql: include_str!("../migrations/0001_rows.sql"),
}];

/// The key of the advisory lock migrations hold: "vllm-sch" in ASCII.
const LOCK_KEY: i64 = 0x766c_6c6d_2d73_6368;

struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Brings the database to [`SCHEMA_VERSION`], or refuses a newer one. Returns the
/// version found before (0: a new database).
pub(crate) async fn migrate(client: &mut Object) -> Result<i32, Error> {
    let context = "migrating the registry schema";
    let pg = |e| Error::from_pg(context, e);
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(pg)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {VERSIONS} (\
             version integer PRIMARY KEY, \
             description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(pg)?;
    let found: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {VERSIONS}"),
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(Error::Incompatible(format!(
            "the registry database has schema version {found}, written by a later release; \
             this build knows versions up to {SCHEMA_VERSION} and will not touch it"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        tx.batch_execute(m.sql).await.map_err(|e| {
            Error::Incompatible(format!(
                "migration {} ({}) failed: {e}",
                m.version, m.description
            ))
        })?;
        tx.execute(
            &format!("INSERT INTO {VERSIONS} (version, description) VALUES ($1, $2)"),
            &[&m.version, &m.description],
        )
        .await
        .map_err(pg)?;
        tracing::info!(
            version = m.version,
            description = m.description,
            "applied a registry schema migration"
        );
    }
    tx.commit().await.map_err(pg)?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_up_to_the_schema_version() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i32::try_from(i).unwrap() + 1);
        }
        assert_eq!(MIGRATIONS.last().unwrap().version, SCHEMA_VERSION);
    }
}
