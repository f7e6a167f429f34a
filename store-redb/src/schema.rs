//! The file's tables, its schema version, and opening a file safely.
//!
//! | table | key → value | holds |
//! |---|---|---|
//! | `meta` | `&str → u64` | `schema_version`, and `last_stamp` (the last write's sequence number) |
//! | `rows` | name → JSON bytes | every row ([`StoredRow`](crate::codec::StoredRow)) |
//! | `rows_by_session` | `(session, name) → ()` | rows bound to a session |
//! | `live_by_heartbeat` | `(heartbeat ms, name) → stamp` | live virtual rows ([`LlmRecord::live_since`]) |
//! | `inactive_by_since` | `(inactive since ms, name) → ()` | inactive rows ([`LlmRecord::inactive_key`]) |
//!
//! Every write transaction changes the rows and the indexes together, so the indexes
//! agree with the rows after any crash. Opening a file checks its schema version first:
//! a file of an unknown version, or a redb file that is not a registry, is refused as
//! [`StoreError::Incompatible`](virtual_llm_core::StoreError::Incompatible) and is
//! never read as if it were one.
//!
//! [`LlmRecord::live_since`]: virtual_llm_core::LlmRecord::live_since
//! [`LlmRecord::inactive_key`]: virtual_llm_core::LlmRecord::inactive_key

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use crate::error::Error;

/// The layout version this build reads and writes. A file with another version is
/// refused; a change of any table or of the row encoding bumps it.
pub const SCHEMA_VERSION: u64 = 1;

/// Schema version and write sequence.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// Rows by name.
pub(crate) const ROWS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("rows");
/// `(session, name)` for every row bound to a session.
pub(crate) const BY_SESSION: TableDefinition<'static, (&str, &str), ()> =
    TableDefinition::new("rows_by_session");
/// `(heartbeat ms, name) → stamp` for every live virtual row. The value is the row's
/// stamp, so the stale query can match an in-memory heartbeat to the indexed row
/// without reading the row.
pub(crate) const LIVE: TableDefinition<'static, (u64, &str), u64> =
    TableDefinition::new("live_by_heartbeat");
/// `(inactive since ms, name)` for every inactive row.
pub(crate) const INACTIVE: TableDefinition<'static, (u64, &str), ()> =
    TableDefinition::new("inactive_by_since");

/// The `meta` key of the schema version.
pub(crate) const SCHEMA_KEY: &str = "schema_version";
/// The `meta` key of the last write stamp.
pub(crate) const STAMP_KEY: &str = "last_stamp";

const TABLES: [&str; 5] = [
    "meta",
    "rows",
    "rows_by_session",
    "live_by_heartbeat",
    "inactive_by_since",
];

/// Opens (or creates) the registry file at `path` and checks its schema.
pub(crate) fn open(path: &Path, cache_size: usize) -> Result<(Database, bool), Error> {
    let db = Database::builder()
        .set_cache_size(cache_size)
        .create(path)
        .map_err(|e| match e {
            // redb's answer for a file whose header is not redb's (a wrong magic number):
            // someone else's file, not a damaged registry.
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::InvalidData =>
            {
                Error::Incompatible(format!(
                    "{} is not a redb file ({io}); refusing to touch it",
                    path.display()
                ))
            }
            other => other.into(),
        })?;
    let initialized = check_or_init(&db, path)?;
    Ok((db, initialized))
}

/// Checks the schema version of an opened file; an empty file gets the current schema.
/// Returns whether it wrote (a fresh file).
pub(crate) fn check_or_init(db: &Database, path: &Path) -> Result<bool, Error> {
    let txn = db.begin_write()?;
    let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_owned()).collect();
    let multimaps = txn.list_multimap_tables()?.count();
    let version = if tables.iter().any(|t| t == "meta") {
        let meta = txn.open_table(META)?;
        meta.get(SCHEMA_KEY)?.map(|v| v.value())
    } else {
        None
    };
    match version {
        Some(SCHEMA_VERSION) => {
            if let Some(missing) = TABLES
                .iter()
                .find(|t| !tables.iter().any(|have| have == *t))
            {
                return Err(Error::Corrupted(format!(
                    "{}: table {missing} is missing from a registry of schema version \
                     {SCHEMA_VERSION}",
                    path.display()
                )));
            }
            // Opening each table checks its key and value types.
            open_all(&txn)?;
            txn.abort()?;
            Ok(false)
        }
        Some(other) => Err(Error::Incompatible(format!(
            "{} holds a registry of schema version {other}, but this build of \
             virtual-llm-redb reads only version {SCHEMA_VERSION}{}",
            path.display(),
            if other > SCHEMA_VERSION {
                "; it was written by a newer version: upgrade virtual-llm-redb"
            } else {
                "; there is no migration from it"
            }
        ))),
        None if tables.is_empty() && multimaps == 0 => {
            open_all(&txn)?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                meta.insert(STAMP_KEY, 0)?;
            }
            txn.commit()?;
            Ok(true)
        }
        None => Err(Error::Incompatible(format!(
            "{} is a redb file without a virtual-llm schema version (tables: {}); \
             refusing to read it as a registry",
            path.display(),
            if tables.is_empty() {
                "none but multimap tables".to_owned()
            } else {
                tables.join(", ")
            }
        ))),
    }
}

/// Opens (creating if needed) every table, which also checks their types.
fn open_all(txn: &WriteTransaction) -> Result<(), Error> {
    txn.open_table(META)?;
    txn.open_table(ROWS)?;
    txn.open_table(BY_SESSION)?;
    txn.open_table(LIVE)?;
    txn.open_table(INACTIVE)?;
    Ok(())
}
