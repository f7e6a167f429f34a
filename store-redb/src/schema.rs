//! The file's tables, its schema version, and opening a file safely.
//!
//! | table | key → value | holds | since |
//! |---|---|---|---|
//! | `meta` | `&str → u64` | `schema_version`, and `last_stamp` (the last write's sequence number) | 1 |
//! | `rows` | name → JSON bytes | every row ([`StoredRow`](crate::codec::StoredRow)) | 1 |
//! | `rows_by_session` | `(session, name) → ()` | rows bound to a session | 1 |
//! | `rows_by_replica` | `(replica, name) → ()` | rows whose [`LlmRecord::binding`] names a replica | 2 |
//! | `live_by_heartbeat` | `(heartbeat ms, name) → stamp` | live virtual rows ([`LlmRecord::live_since`]) | 1 |
//! | `inactive_by_since` | `(inactive since ms, name) → ()` | inactive rows ([`LlmRecord::inactive_key`]) | 1 |
//!
//! Every write transaction changes the rows and the indexes together, so the indexes
//! agree with the rows after any crash. Opening a file checks its schema version first:
//! a file of an unknown version, or a redb file that is not a registry, is refused as
//! [`StoreError::Incompatible`](virtual_llm_core::StoreError::Incompatible) and is
//! never read as if it were one.
//!
//! # Versions
//! - **1**: the first layout.
//! - **2**: adds `rows_by_replica`, and a row may carry a `binding`. A file of version
//!   1 is upgraded in place when it is opened, in one write transaction that creates
//!   the table, indexes every row that has a binding (a version-1 row has none), and
//!   sets the version to 2; it commits durably, or leaves the file at version 1. A
//!   build of version 1 refuses the upgraded file.
//!
//! [`LlmRecord::binding`]: virtual_llm_core::LlmRecord::binding
//! [`LlmRecord::live_since`]: virtual_llm_core::LlmRecord::live_since
//! [`LlmRecord::inactive_key`]: virtual_llm_core::LlmRecord::inactive_key

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use crate::codec::StoredRow;
use crate::error::Error;

/// The layout version this build reads and writes; a change of any table or of the
/// row encoding bumps it. A file of version 1 is upgraded to it in place when opened;
/// a file of any other version is refused.
pub const SCHEMA_VERSION: u64 = 2;

/// The version a file written before the replica index has.
const V1: u64 = 1;

/// Schema version and write sequence.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// Rows by name.
pub(crate) const ROWS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("rows");
/// `(session, name)` for every row bound to a session.
pub(crate) const BY_SESSION: TableDefinition<'static, (&str, &str), ()> =
    TableDefinition::new("rows_by_session");
/// `(replica, name)` for every row whose binding names a replica (schema 2).
pub(crate) const BY_REPLICA: TableDefinition<'static, (&str, &str), ()> =
    TableDefinition::new("rows_by_replica");
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

/// The tables of a version-1 file.
const TABLES_V1: [&str; 5] = [
    "meta",
    "rows",
    "rows_by_session",
    "live_by_heartbeat",
    "inactive_by_since",
];

/// The tables of a file of [`SCHEMA_VERSION`].
const TABLES: [&str; 6] = [
    "meta",
    "rows",
    "rows_by_session",
    "rows_by_replica",
    "live_by_heartbeat",
    "inactive_by_since",
];

/// What opening a file found, and did to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// A registry of the current version; nothing written.
    Current,
    /// An empty file, given the current schema (one commit).
    Created,
    /// A registry of an older version, upgraded in place (one commit).
    Upgraded {
        /// The version it had.
        from: u64,
    },
}

impl Opened {
    /// The write transactions opening committed.
    pub(crate) fn commits(self) -> u64 {
        match self {
            Opened::Current => 0,
            Opened::Created | Opened::Upgraded { .. } => 1,
        }
    }
}

/// Opens (or creates) the registry file at `path` and checks its schema, upgrading an
/// older one.
pub(crate) fn open(path: &Path, cache_size: usize) -> Result<(Database, Opened), Error> {
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
    let opened = check_or_init(&db, path)?;
    Ok((db, opened))
}

/// Checks the schema version of an opened file: an empty file gets the current
/// schema, a version-1 file is upgraded, any other version is refused.
pub(crate) fn check_or_init(db: &Database, path: &Path) -> Result<Opened, Error> {
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
            require_tables(path, SCHEMA_VERSION, &TABLES, &tables)?;
            // Opening each table checks its key and value types.
            open_all(&txn)?;
            txn.abort()?;
            Ok(Opened::Current)
        }
        Some(V1) => {
            require_tables(path, V1, &TABLES_V1, &tables)?;
            let indexed = upgrade_from_v1(&txn)?;
            // Immediate durability (redb's default): the upgrade is on disk before the
            // store answers anything, or it did not happen and the file is still v1.
            txn.commit()?;
            tracing::info!(
                path = %path.display(),
                from = V1,
                to = SCHEMA_VERSION,
                rows_bound = indexed,
                "upgraded the registry's schema in place",
            );
            Ok(Opened::Upgraded { from: V1 })
        }
        Some(other) => Err(Error::Incompatible(format!(
            "{} holds a registry of schema version {other}, but this build of \
             virtual-llm-redb reads version {SCHEMA_VERSION} (and upgrades version {V1}){}",
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
            Ok(Opened::Created)
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

/// Fails with `Corrupted` if a table `expected` of a registry of `version` is not
/// among the file's `tables`.
fn require_tables(
    path: &Path,
    version: u64,
    expected: &[&str],
    tables: &[String],
) -> Result<(), Error> {
    match expected
        .iter()
        .find(|t| !tables.iter().any(|have| have == *t))
    {
        Some(missing) => Err(Error::Corrupted(format!(
            "{}: table {missing} is missing from a registry of schema version {version}",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Makes a version-1 file a version-2 one inside `txn`: creates `rows_by_replica`,
/// indexes every row that has a binding, and sets the version. Returns how many rows
/// it indexed. A version-1 row has no binding, so that is 0 for any file a version-1
/// build wrote; the rows are read anyway, so that a row that has one is never left
/// out of the index, and a row that does not decode stops the upgrade as corruption
/// rather than being carried over unchecked.
fn upgrade_from_v1(txn: &WriteTransaction) -> Result<u64, Error> {
    // Opening every table checks the v1 tables' types and creates the new one.
    open_all(txn)?;
    let rows = txn.open_table(ROWS)?;
    let mut by_replica = txn.open_table(BY_REPLICA)?;
    let mut indexed = 0;
    for entry in rows.iter()? {
        let (key, value) = entry?;
        let row = StoredRow::decode(key.value(), value.value())?;
        if let Some(replica) = row.replica() {
            by_replica.insert((replica.as_str(), row.name().as_str()), ())?;
            indexed += 1;
        }
    }
    txn.open_table(META)?.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
    Ok(indexed)
}

/// Opens (creating if needed) every table, which also checks their types.
fn open_all(txn: &WriteTransaction) -> Result<(), Error> {
    txn.open_table(META)?;
    txn.open_table(ROWS)?;
    txn.open_table(BY_SESSION)?;
    txn.open_table(BY_REPLICA)?;
    txn.open_table(LIVE)?;
    txn.open_table(INACTIVE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A crash in the middle of the upgrade from version 1, at every write of it: the
    //! upgrade is one redb transaction, so the file reopens at version 1 (and is
    //! upgraded then) or at version 2, never in between, and never loses a row.

    use redb::ReadableDatabase;

    use super::*;
    use crate::integrity;
    use crate::testing::FailingBackend;

    /// The v1 fixture's bytes (see `tests/fixtures/README.md`).
    fn fixture() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/registry-v1.redb"
        );
        std::fs::read(path).unwrap()
    }

    /// The schema version, and whether the replica index exists.
    fn layout(db: &Database) -> (Option<u64>, bool) {
        let txn = db.begin_read().unwrap();
        let version = txn
            .open_table(META)
            .unwrap()
            .get(SCHEMA_KEY)
            .unwrap()
            .map(|v| v.value());
        let indexed = txn
            .list_tables()
            .unwrap()
            .any(|t| t.name() == BY_REPLICA.name());
        (version, indexed)
    }

    #[test]
    fn a_crash_during_the_upgrade_leaves_a_v1_or_a_v2_file() {
        let bytes = fixture();
        let path = Path::new("(the v1 fixture, in memory)");
        let (mut crashes, mut left_v1) = (0, 0);
        for n in 0..10_000 {
            let backend = FailingBackend::with_bytes(&bytes);
            let db = backend.open();
            assert_eq!(layout(&db), (Some(V1), false));
            // The process dies at the n-th write of the upgrade.
            backend.crash_after(n);
            let outcome = check_or_init(&db, path);
            drop(db);
            backend.recover();
            let mut db = backend.open();
            let after = layout(&db);
            match &outcome {
                Ok(opened) => {
                    assert_eq!(*opened, Opened::Upgraded { from: V1 });
                    assert_eq!(after, (Some(SCHEMA_VERSION), true));
                }
                Err(e) => {
                    crashes += 1;
                    assert!(
                        after == (Some(V1), false) || after == (Some(SCHEMA_VERSION), true),
                        "crash after {n} writes ({e}): {after:?}"
                    );
                    left_v1 += usize::from(after.0 == Some(V1));
                }
            }
            // The restart: the file opens, upgraded if need be, whole.
            let opened = check_or_init(&db, path).unwrap();
            assert!(
                matches!(opened, Opened::Current | Opened::Upgraded { from: V1 }),
                "{opened:?}"
            );
            assert_eq!(layout(&db), (Some(SCHEMA_VERSION), true));
            let report = integrity::check(&mut db).unwrap();
            assert!(report.is_ok(), "crash after {n} writes: {report:?}");
            assert_eq!(report.rows, 5, "crash after {n} writes");
            if outcome.is_ok() {
                // The upgrade needed fewer than n writes: every crash point was tried.
                assert!(crashes > 0 && left_v1 > 0, "{crashes} crashes");
                eprintln!(
                    "the upgrade took {n} writes and syncs; of the {crashes} crashes within \
                     it, {left_v1} left version 1, the others (the commit on disk) version 2"
                );
                return;
            }
        }
        panic!("the upgrade never completed");
    }
}
