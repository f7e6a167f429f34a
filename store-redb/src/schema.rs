//! The file's tables, its schema version, and opening a file safely.
//!
//! | table | key → value | holds | since |
//! |---|---|---|---|
//! | `meta` | `&str → u64` | `schema_version`, and `last_stamp` (the last write's sequence number) | 1 |
//! | `rows` | name → JSON bytes | every row ([`StoredRow`](crate::codec::StoredRow)) | 1 |
//! | `rows_by_session` | `(session, name) → ()` | rows bound to a session | 1 |
//! | `rows_by_replica` | `(replica, name) → ()` | rows whose [`LlmRecord::binding`] names a replica | 2 |
//! | `rows_by_pool` | `(pool key, name) → ()` | every row, under its [`LlmRecord::pool_key`] | 3 |
//! | `live_by_heartbeat` | `(heartbeat ms, name) → stamp` | live virtual rows ([`LlmRecord::live_since`]) | 1 |
//! | `inactive_by_since` | `(inactive since ms, name) → ()` | inactive rows ([`LlmRecord::inactive_key`]) | 1 |
//! | `rows_by_folded` | `(folded name, name) → ()` | every row, under its name in lower case ([`LlmName::folded`]): names are unique by it | 5 |
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
//! - **3**: adds `rows_by_pool`, and a row may carry a `pool` and a `max_concurrent`.
//!   A file of version 2 is upgraded in place when it is opened, in one write
//!   transaction that creates the table, indexes every row under its pool key (its
//!   `pool`, or else its own name), adds hibernating virtual rows to
//!   `live_by_heartbeat` (version 3 counts them live: their publishers heartbeat),
//!   and sets the version to 3; it commits durably, or
//!   leaves the file at version 2. A file of version 1 is upgraded through version 2
//!   in the same single transaction (both indexes built from one read of the rows),
//!   so it is left at version 1 or is at version 3, never at 2. A build of version 2
//!   refuses the upgraded file.
//! - **4**: a row may carry an `agent` (SPEC §13: an agent's row, with its persona).
//!   No table changes: a file of version 3 is upgraded in place when it is opened by
//!   setting the version to 4, in one durable write transaction (a file of version 1
//!   or 2 goes through the steps above in the same transaction). A build of version 3
//!   refuses the upgraded file, so it never misreads an agent's row as an LLM.
//! - **5**: a row may carry an `access` (SPEC §16: who may see and call it), and
//!   `rows_by_folded` is added: names are unique ignoring ASCII case (the Store
//!   contract). A file of version 4 or older is upgraded in place when it is opened, in
//!   one write transaction that also indexes every row under its folded name (after
//!   the steps above for older files), and sets the version to 5; a public row is
//!   stored as version 4 stored it. Rows that a version-4 build let in beside each
//!   other (`llama` and `LLAMA`) are kept, both under one folded name: neither name can
//!   be inserted again while either row exists. A build of version 4 refuses the
//!   upgraded file, so it never serves a restricted row to everyone.
//!
//! [`LlmName::folded`]: virtual_llm_core::LlmName::folded
//! [`LlmRecord::binding`]: virtual_llm_core::LlmRecord::binding
//! [`LlmRecord::pool_key`]: virtual_llm_core::LlmRecord::pool_key
//! [`LlmRecord::live_since`]: virtual_llm_core::LlmRecord::live_since
//! [`LlmRecord::inactive_key`]: virtual_llm_core::LlmRecord::inactive_key

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use crate::codec::StoredRow;
use crate::error::Error;

/// The layout version this build reads and writes; a change of any table or of the
/// row encoding bumps it. A file of version 1 to 4 is upgraded to it in place when
/// opened; a file of any other version is refused.
pub const SCHEMA_VERSION: u64 = 5;

/// The version a file written before the replica index has.
const V1: u64 = 1;
/// The version a file written before the pool index has.
const V2: u64 = 2;
/// The version a file written before rows could be agents has.
const V3: u64 = 3;
/// The version a file written before the folded-name index and access has.
const V4: u64 = 4;

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
/// `(pool key, name)` for every row: its pool, or else its own name (schema 3).
pub(crate) const BY_POOL: TableDefinition<'static, (&str, &str), ()> =
    TableDefinition::new("rows_by_pool");
/// `(heartbeat ms, name) → stamp` for every live virtual row. The value is the row's
/// stamp, so the stale query can match an in-memory heartbeat to the indexed row
/// without reading the row.
pub(crate) const LIVE: TableDefinition<'static, (u64, &str), u64> =
    TableDefinition::new("live_by_heartbeat");
/// `(inactive since ms, name)` for every inactive row.
pub(crate) const INACTIVE: TableDefinition<'static, (u64, &str), ()> =
    TableDefinition::new("inactive_by_since");

/// `(folded name, name)` for every row: names are unique by the first (schema 5).
pub(crate) const BY_FOLDED: TableDefinition<'static, (&str, &str), ()> =
    TableDefinition::new("rows_by_folded");

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

/// The tables of a version-2 file.
const TABLES_V2: [&str; 6] = [
    "meta",
    "rows",
    "rows_by_session",
    "rows_by_replica",
    "live_by_heartbeat",
    "inactive_by_since",
];

/// The tables of a version-3 or version-4 file.
const TABLES_V3: [&str; 7] = [
    "meta",
    "rows",
    "rows_by_session",
    "rows_by_replica",
    "rows_by_pool",
    "live_by_heartbeat",
    "inactive_by_since",
];

/// The tables of a file of [`SCHEMA_VERSION`].
const TABLES: [&str; 8] = [
    "meta",
    "rows",
    "rows_by_session",
    "rows_by_replica",
    "rows_by_pool",
    "live_by_heartbeat",
    "inactive_by_since",
    "rows_by_folded",
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

/// How every registry file is opened: with `cache_size` bytes of page cache, and
/// redb's integrity check on open.
///
/// The check is what turns a file damaged outside redb into
/// [`StorageError::Corrupted`](redb::StorageError::Corrupted): a plain open trusts a
/// file that was shut down cleanly, and redb documents that it may panic on one that
/// was altered since (red-team finding F12: 32 bytes scribbled in every page made it
/// hit `unreachable!()` reading a table definition, and the gateway died with a panic
/// instead of refusing the file). The check verifies the checksum of every page of
/// the committed trees and rebuilds the allocator state, so an open reads the whole
/// file once: about 25 ms for 12,800 rows (a 17 MiB file) in a release build, against
/// 3 ms for a plain open; paid at start, and when a failed write makes the store
/// reopen the file.
pub(crate) fn builder(cache_size: usize) -> redb::Builder {
    let mut builder = Database::builder();
    builder
        .set_cache_size(cache_size)
        .set_check_integrity_on_open(true);
    builder
}

/// Opens (or creates) the registry file at `path` and checks its schema, upgrading an
/// older one.
///
/// A file that does not exist is created, and given the current schema. A file that
/// exists but is empty (zero bytes) is refused as `Corrupted` unless `accept_empty`
/// (red-team finding F7): it is what a failed restore, a copy onto a full disk or a
/// stray `: > registry.redb` leaves, and taking it as a new registry would silently
/// make every name free for anyone to register. redb itself initialises an empty file
/// as a new database, so the length is checked here, on the handle redb then opens
/// (no window between the check and the open).
///
/// [`Mode::Reopen`] (after a failed write) neither creates a missing file nor takes an
/// empty one: the file was a registry a moment ago, and a new, empty registry in its
/// place would free every name just the same.
pub(crate) fn open(
    path: &Path,
    cache_size: usize,
    mode: Mode,
) -> Result<(Database, Opened), Error> {
    let file = open_file(path, mode)?;
    let backend = redb::backends::FileBackend::new(file)?;
    let db = builder(cache_size)
        .create_with_backend(backend)
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

/// How [`open`] treats a missing or empty file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Opening the store: a missing file is created; an empty one is taken as a new
    /// registry only if `accept_empty`.
    Start {
        /// [`RedbOptions::accept_empty_file`](crate::RedbOptions::accept_empty_file).
        accept_empty: bool,
    },
    /// Opening it again after a failed write: the file must be there and not empty.
    Reopen,
}

/// The file at `path`, read-write: created if there is none and `mode` allows it;
/// refused as `Corrupted` if it exists and is empty, unless `mode` accepts that.
fn open_file(path: &Path, mode: Mode) -> Result<File, Error> {
    let accept_empty = match mode {
        Mode::Start { accept_empty } => {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(created) => return Ok(created),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::unavailable("creating the redb file", e)),
            }
            accept_empty
        }
        Mode::Reopen => false,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::unavailable("opening the redb file", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::unavailable("reading the redb file's length", e))?
        .len();
    if len == 0 {
        if !accept_empty {
            return Err(Error::Corrupted(format!(
                "{} exists but is empty (0 bytes), as a failed restore, a copy onto a full \
                 disk or a truncation leaves it; it is not taken as a new registry, which \
                 would make every registered name free for anyone. Restore the file, or \
                 remove it, or ask for a fresh store explicitly (RedbOptions::accept_empty_file; \
                 the reference gateway's --fresh-store)",
                path.display()
            )));
        }
        tracing::warn!(
            path = %path.display(),
            "the registry file is empty; starting a new, empty registry in it, as asked"
        );
    }
    Ok(file)
}

/// Checks the schema version of an opened file: an empty file gets the current
/// schema, a file of version 1 to 4 is upgraded, any other version is refused.
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
        Some(from @ (V1 | V2 | V3 | V4)) => {
            let expected: &[&str] = match from {
                V1 => &TABLES_V1,
                V2 => &TABLES_V2,
                _ => &TABLES_V3,
            };
            require_tables(path, from, expected, &tables)?;
            let indexed = upgrade(&txn, from)?;
            // Immediate durability (redb's default): the upgrade is on disk before the
            // store answers anything, or it did not happen and the file is still at
            // the version it had.
            txn.commit()?;
            tracing::info!(
                path = %path.display(),
                from,
                to = SCHEMA_VERSION,
                rows_bound = indexed.bound,
                rows_pooled = indexed.pooled,
                rows_folded = indexed.folded,
                "upgraded the registry's schema in place",
            );
            Ok(Opened::Upgraded { from })
        }
        Some(other) => Err(Error::Incompatible(format!(
            "{} holds a registry of schema version {other}, but this build of \
             virtual-llm-redb reads version {SCHEMA_VERSION} (and upgrades versions {V1}, \
             {V2}, {V3} and {V4}){}",
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

/// The index entries an upgrade wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Indexed {
    /// Rows indexed by replica (the step from version 1).
    bound: u64,
    /// Rows indexed by pool key (the step from version 2): every row.
    pooled: u64,
    /// Rows indexed by folded name (the step from version 4): every row.
    folded: u64,
}

/// Makes a file of version `from` (1 to 4) a file of [`SCHEMA_VERSION`] inside `txn`:
/// creates the tables the later versions added, indexes the rows in them, and sets
/// the version. Each step is the one its version introduced:
/// - from 1, `rows_by_replica`: every row that has a binding. A version-1 row has
///   none, so that is 0 rows for any file a version-1 build wrote; the rows are read
///   anyway, so that a row that has one is never left out of the index.
/// - from 2 (and 1), `rows_by_pool`: every row, under its pool key; and
///   `live_by_heartbeat` gains the hibernating virtual rows, which version 3 counts
///   live (a sleeping model's publisher heartbeats too).
/// - from 3 (and older), nothing but the version: a row may carry an `agent` from
///   version 4 on, and a row without one is stored as version 3 stored it.
/// - from 4 (and older), `rows_by_folded`: every row, under its folded name; a row
///   may carry an `access` from version 5 on.
///
/// The rows are read once for every step, and a row that does not decode stops the
/// upgrade as corruption rather than being carried over unchecked.
fn upgrade(txn: &WriteTransaction, from: u64) -> Result<Indexed, Error> {
    // Opening every table checks the old tables' types and creates the new ones.
    open_all(txn)?;
    let rows = txn.open_table(ROWS)?;
    let mut by_replica = txn.open_table(BY_REPLICA)?;
    let mut by_pool = txn.open_table(BY_POOL)?;
    let mut live = txn.open_table(LIVE)?;
    let mut by_folded = txn.open_table(BY_FOLDED)?;
    let mut indexed = Indexed::default();
    for entry in rows.iter()? {
        let (key, value) = entry?;
        let row = StoredRow::decode(key.value(), value.value())?;
        let name = row.name().as_str();
        // A version-2 file's replica index is already maintained with its rows.
        if from < V2
            && let Some(replica) = row.replica()
        {
            by_replica.insert((replica.as_str(), name), ())?;
            indexed.bound += 1;
        }
        if from < V3 {
            by_pool.insert((row.pool_key().as_str(), name), ())?;
            indexed.pooled += 1;
            // Version 3 counts hibernating rows live (a sleeping model's publisher
            // heartbeats); an active row's entry is already there and stays as it is.
            if let Some(heartbeat) = row.live_key() {
                live.insert((heartbeat, name), row.stamp())?;
            }
        }
        by_folded.insert((row.name().folded().as_str(), name), ())?;
        indexed.folded += 1;
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
    txn.open_table(BY_POOL)?;
    txn.open_table(LIVE)?;
    txn.open_table(INACTIVE)?;
    txn.open_table(BY_FOLDED)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A crash in the middle of an upgrade, at every write of it, from version 1 (the
    //! fixture a version-1 build wrote) and from version 2 (a file made here): the
    //! upgrade is one redb transaction, so the file reopens at its old version (and is
    //! upgraded then) or at the current one, never in between, and never loses a row.

    use redb::ReadableDatabase;
    use virtual_llm_core::testkit::record;
    use virtual_llm_core::{ChannelBinding, LlmName, ReplicaId};

    use super::*;
    use crate::integrity;
    use crate::tables::{ReadTables, WriteTables};
    use crate::testing::FailingBackend;

    /// The v1 fixture's bytes (see `tests/fixtures/README.md`).
    fn fixture() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/registry-v1.redb"
        );
        std::fs::read(path).unwrap()
    }

    fn name(s: &str) -> LlmName {
        LlmName::parse(s).unwrap()
    }

    /// The bytes of a version-2 file holding five rows: `m1` and `m2` in the pool
    /// `llama`, `llama` and `solo` without a pool, and `bound`, without a pool and
    /// bound to the replica `gw-1`. Written with this build's tables, then made what a
    /// version-2 build leaves: no pool index, version 2. (A row's `pool` is a field of
    /// its JSON, which the last version-2 build already wrote.)
    fn v2_file() -> Vec<u8> {
        let backend = FailingBackend::default();
        let db = backend.open();
        let path = Path::new("(a v2 file, in memory)");
        assert_eq!(check_or_init(&db, path).unwrap(), Opened::Created);
        let txn = db.begin_write().unwrap();
        {
            let mut tables = WriteTables::open(&txn).unwrap();
            let stamp = tables.next_stamp().unwrap();
            for (n, pool) in [
                ("m1", Some("llama")),
                ("m2", Some("llama")),
                ("llama", None),
                ("solo", None),
                ("bound", None),
            ] {
                let mut r = record(n);
                r.pool = pool.map(name);
                r.revision = 1;
                if n == "bound" {
                    r.binding = Some(ChannelBinding {
                        replica: ReplicaId::parse("gw-1").unwrap(),
                        epoch: 1,
                    });
                }
                tables.put(None, &StoredRow::new(r, stamp)).unwrap();
            }
        }
        assert!(txn.delete_table(BY_POOL).unwrap());
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_KEY, V2)
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        backend.bytes()
    }

    /// The schema version, and which of the tables later versions added exist
    /// (`rows_by_replica`, `rows_by_pool`).
    fn layout(db: &Database) -> (Option<u64>, bool, bool) {
        let txn = db.begin_read().unwrap();
        let version = txn
            .open_table(META)
            .unwrap()
            .get(SCHEMA_KEY)
            .unwrap()
            .map(|v| v.value());
        let has = |table: &str| txn.list_tables().unwrap().any(|t| t.name() == table);
        (version, has(BY_REPLICA.name()), has(BY_POOL.name()))
    }

    /// The names the pool index holds under `pool`.
    fn pooled(db: &Database, pool: &str) -> Vec<String> {
        let txn = db.begin_read().unwrap();
        let tables = ReadTables::open(&txn);
        let rows = tables.by_pool(&name(pool)).unwrap();
        rows.iter().map(|r| r.name().to_string()).collect()
    }

    /// Crashes the upgrade of the file `bytes` (of version `from`, `rows` rows, its
    /// layout `before`) after each number of writes in turn, until one is enough for
    /// it to complete: every crash leaves the old layout or the new one, and every
    /// restart upgrades the file whole.
    fn crash_at_every_write(bytes: &[u8], from: u64, before: (Option<u64>, bool, bool)) {
        let rows = {
            let db = FailingBackend::with_bytes(bytes).open();
            let txn = db.begin_read().unwrap();
            ReadTables::open(&txn).all().unwrap().len()
        };
        let after = (Some(SCHEMA_VERSION), true, true);
        let path = Path::new("(an old file, in memory)");
        let (mut crashes, mut left_old) = (0, 0);
        for n in 0..10_000 {
            let backend = FailingBackend::with_bytes(bytes);
            let db = backend.open();
            assert_eq!(layout(&db), before);
            // The process dies at the n-th write of the upgrade.
            backend.crash_after(n);
            let outcome = check_or_init(&db, path);
            drop(db);
            backend.recover();
            let mut db = backend.open();
            let found = layout(&db);
            match &outcome {
                Ok(opened) => {
                    assert_eq!(*opened, Opened::Upgraded { from });
                    assert_eq!(found, after);
                }
                Err(e) => {
                    crashes += 1;
                    assert!(
                        found == before || found == after,
                        "crash after {n} writes ({e}): {found:?}"
                    );
                    left_old += usize::from(found == before);
                }
            }
            // The restart: the file opens, upgraded if need be, whole.
            let opened = check_or_init(&db, path).unwrap();
            assert!(
                matches!(opened, Opened::Current) || opened == Opened::Upgraded { from },
                "{opened:?}"
            );
            assert_eq!(layout(&db), after);
            let report = integrity::check(&mut db).unwrap();
            assert!(report.is_ok(), "crash after {n} writes: {report:?}");
            assert_eq!(report.rows, rows, "crash after {n} writes");
            if outcome.is_ok() {
                // The upgrade needed fewer than n writes: every crash point was tried.
                assert!(crashes > 0 && left_old > 0, "{crashes} crashes");
                eprintln!(
                    "the upgrade from version {from} took {n} writes and syncs; of the \
                     {crashes} crashes within it, {left_old} left version {from}, the \
                     others (the commit on disk) version {SCHEMA_VERSION}"
                );
                return;
            }
        }
        panic!("the upgrade from version {from} never completed");
    }

    /// After a failed write the store reopens its file: a file removed or emptied
    /// since is refused then, never replaced by a new registry (which would free every
    /// name as an empty file at start would, red-team finding F7).
    #[test]
    fn a_reopen_neither_creates_a_missing_file_nor_takes_an_empty_one() {
        const CACHE: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let gone = open(&path, CACHE, Mode::Reopen);
        assert!(matches!(gone, Err(Error::Unavailable { .. })), "{gone:?}");
        assert!(!path.exists(), "not created");
        std::fs::write(&path, b"").unwrap();
        let empty = open(&path, CACHE, Mode::Reopen);
        assert!(matches!(empty, Err(Error::Corrupted(_))), "{empty:?}");
        let start = open(
            &path,
            CACHE,
            Mode::Start {
                accept_empty: false,
            },
        );
        assert!(matches!(start, Err(Error::Corrupted(_))), "{start:?}");
        let (db, opened) = open(&path, CACHE, Mode::Start { accept_empty: true }).unwrap();
        assert_eq!(opened, Opened::Created);
        drop(db);
        let (_db, opened) = open(&path, CACHE, Mode::Reopen).unwrap();
        assert_eq!(opened, Opened::Current);
    }

    #[test]
    fn a_crash_during_the_upgrade_from_v1_leaves_a_v1_or_a_v3_file() {
        crash_at_every_write(&fixture(), V1, (Some(V1), false, false));
        // Every row of the fixture is the pool of one named after it.
        let backend = FailingBackend::with_bytes(&fixture());
        let db = backend.open();
        check_or_init(&db, Path::new("(the v1 fixture)")).unwrap();
        for row in [
            "gone",
            "live-virtual",
            "public-fast",
            "sleeping",
            "unicode-model",
        ] {
            assert_eq!(pooled(&db, row), [row]);
        }
    }

    #[test]
    fn a_crash_during_the_upgrade_from_v2_leaves_a_v2_or_a_v3_file() {
        let bytes = v2_file();
        crash_at_every_write(&bytes, V2, (Some(V2), true, false));
        let backend = FailingBackend::with_bytes(&bytes);
        let db = backend.open();
        let opened = check_or_init(&db, Path::new("(a v2 file)")).unwrap();
        assert_eq!(opened, Opened::Upgraded { from: V2 });
        assert_eq!(pooled(&db, "llama"), ["llama", "m1", "m2"]);
        assert_eq!(pooled(&db, "solo"), ["solo"]);
        assert_eq!(pooled(&db, "bound"), ["bound"]);
        assert!(pooled(&db, "m1").is_empty(), "m1 is in the pool llama");
        // The version-2 replica index is kept as it was.
        let txn = db.begin_read().unwrap();
        let bound = ReadTables::open(&txn)
            .bound_to(&ReplicaId::parse("gw-1").unwrap())
            .unwrap();
        assert_eq!(bound.len(), 1);
        assert_eq!(bound[0].name().as_str(), "bound");
    }
}
