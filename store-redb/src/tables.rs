//! Row and index access inside one redb transaction.
//!
//! [`WriteTables`] is the only code that changes the tables: putting or deleting a row
//! always updates the five indexes in the same transaction, from the old row and the
//! new one, so the indexes cannot drift from the rows. [`ReadTables`] is a snapshot:
//! rows by name, every row, and range scans of the indexes that read only the rows
//! they return.

use std::cell::OnceCell;

use redb::{
    Key, ReadOnlyTable, ReadTransaction, ReadableTable, Table, TableDefinition, Value,
    WriteTransaction,
};
use virtual_llm_core::{LlmName, ReplicaId, SessionId};

use crate::codec::StoredRow;
use crate::error::Error;
use crate::schema::{
    BY_FOLDED, BY_POOL, BY_REPLICA, BY_SESSION, INACTIVE, LIVE, META, ROWS, STAMP_KEY,
};

/// The tables of a write transaction.
pub(crate) struct WriteTables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    rows: Table<'txn, &'static str, &'static [u8]>,
    by_session: Table<'txn, (&'static str, &'static str), ()>,
    by_replica: Table<'txn, (&'static str, &'static str), ()>,
    by_pool: Table<'txn, (&'static str, &'static str), ()>,
    live: Table<'txn, (u64, &'static str), u64>,
    inactive: Table<'txn, (u64, &'static str), ()>,
    by_folded: Table<'txn, (&'static str, &'static str), ()>,
}

impl<'txn> WriteTables<'txn> {
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self, Error> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            rows: txn.open_table(ROWS)?,
            by_session: txn.open_table(BY_SESSION)?,
            by_replica: txn.open_table(BY_REPLICA)?,
            by_pool: txn.open_table(BY_POOL)?,
            live: txn.open_table(LIVE)?,
            inactive: txn.open_table(INACTIVE)?,
            by_folded: txn.open_table(BY_FOLDED)?,
        })
    }

    /// Whether a row is indexed under `folded` (a name in lower case).
    pub(crate) fn folded_taken(&self, folded: &str) -> Result<bool, Error> {
        let mut under = self.by_folded.range((folded, "")..)?;
        match under.next() {
            Some(entry) => Ok(entry?.0.value().0 == folded),
            None => Ok(false),
        }
    }

    /// The committed row named `name`, if any.
    pub(crate) fn row(&self, name: &str) -> Result<Option<StoredRow>, Error> {
        self.rows
            .get(name)?
            .map(|v| StoredRow::decode(name, v.value()))
            .transpose()
    }

    /// Takes the next write stamp (see [`StoredRow`]); persisted with the transaction.
    pub(crate) fn next_stamp(&mut self) -> Result<u64, Error> {
        let last = self
            .meta
            .get(STAMP_KEY)?
            .map(|v| v.value())
            .ok_or_else(|| Error::Corrupted("the meta table has no last_stamp".to_owned()))?;
        let next = last + 1;
        self.meta.insert(STAMP_KEY, next)?;
        Ok(next)
    }

    /// Writes `new` in place of `old` (the row as committed, `None` for an insert),
    /// moving the index entries that changed.
    pub(crate) fn put(&mut self, old: Option<&StoredRow>, new: &StoredRow) -> Result<(), Error> {
        let name = new.name().as_str();
        if old.is_none() {
            // A name never changes: its folded entry comes with the insert.
            self.by_folded
                .insert((new.name().folded().as_str(), name), ())?;
        }
        let old_session = old.and_then(StoredRow::session);
        if old_session != new.session() {
            if let Some(s) = old_session {
                self.by_session.remove((s.as_str(), name))?;
            }
            if let Some(s) = new.session() {
                self.by_session.insert((s.as_str(), name), ())?;
            }
        }
        // Keyed by the replica only: a new epoch on the same replica moves nothing.
        let old_replica = old.and_then(StoredRow::replica);
        if old_replica != new.replica() {
            if let Some(r) = old_replica {
                self.by_replica.remove((r.as_str(), name))?;
            }
            if let Some(r) = new.replica() {
                self.by_replica.insert((r.as_str(), name), ())?;
            }
        }
        // Every row has a pool key, so a row is always in the pool index, once.
        let old_pool = old.map(StoredRow::pool_key);
        let new_pool = new.pool_key();
        if old_pool != Some(new_pool) {
            if let Some(p) = old_pool {
                self.by_pool.remove((p.as_str(), name))?;
            }
            self.by_pool.insert((new_pool.as_str(), name), ())?;
        }
        let old_live = old.and_then(|o| Some((o.live_key()?, o.stamp())));
        let new_live = new.live_key().map(|k| (k, new.stamp()));
        if old_live != new_live {
            if let Some((t, _)) = old_live {
                self.live.remove((t, name))?;
            }
            if let Some((t, stamp)) = new_live {
                self.live.insert((t, name), stamp)?;
            }
        }
        let old_inactive = old.and_then(StoredRow::inactive_key);
        if old_inactive != new.inactive_key() {
            if let Some(t) = old_inactive {
                self.inactive.remove((t, name))?;
            }
            if let Some(t) = new.inactive_key() {
                self.inactive.insert((t, name), ())?;
            }
        }
        self.rows.insert(name, new.encode()?.as_slice())?;
        Ok(())
    }

    /// Deletes `old` and its index entries.
    pub(crate) fn delete(&mut self, old: &StoredRow) -> Result<(), Error> {
        let name = old.name().as_str();
        if let Some(s) = old.session() {
            self.by_session.remove((s.as_str(), name))?;
        }
        if let Some(r) = old.replica() {
            self.by_replica.remove((r.as_str(), name))?;
        }
        self.by_pool.remove((old.pool_key().as_str(), name))?;
        self.by_folded
            .remove((old.name().folded().as_str(), name))?;
        if let Some(t) = old.live_key() {
            self.live.remove((t, name))?;
        }
        if let Some(t) = old.inactive_key() {
            self.inactive.remove((t, name))?;
        }
        self.rows.remove(name)?;
        Ok(())
    }
}

/// The tables of a read snapshot, each opened when first used: opening a table looks
/// its root up in redb's table of tables, and a `get` (on every relayed request) that
/// opened all four took 2.7 µs in the crate's benchmark, against 1.5 µs for `rows`
/// alone.
pub(crate) struct ReadTables<'txn> {
    txn: &'txn ReadTransaction,
    rows: OnceCell<ReadOnlyTable<&'static str, &'static [u8]>>,
    by_session: OnceCell<ReadOnlyTable<(&'static str, &'static str), ()>>,
    by_replica: OnceCell<ReadOnlyTable<(&'static str, &'static str), ()>>,
    by_pool: OnceCell<ReadOnlyTable<(&'static str, &'static str), ()>>,
    live: OnceCell<ReadOnlyTable<(u64, &'static str), u64>>,
    inactive: OnceCell<ReadOnlyTable<(u64, &'static str), ()>>,
    by_folded: OnceCell<ReadOnlyTable<(&'static str, &'static str), ()>>,
}

/// The table `def` of `txn`, opened into `cell` on first use.
fn opened<'a, K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    cell: &'a OnceCell<ReadOnlyTable<K, V>>,
    def: TableDefinition<'static, K, V>,
) -> Result<&'a ReadOnlyTable<K, V>, Error> {
    if let Some(table) = cell.get() {
        return Ok(table);
    }
    let table = txn.open_table(def)?;
    Ok(cell.get_or_init(|| table))
}

/// An entry of the live index: the heartbeat it is keyed by, the row, and its stamp.
pub(crate) struct LiveHit {
    pub(crate) heartbeat_ms: u64,
    pub(crate) name: String,
    pub(crate) stamp: u64,
}

impl<'txn> ReadTables<'txn> {
    /// The tables of `txn`; none is opened yet.
    pub(crate) fn open(txn: &'txn ReadTransaction) -> Self {
        ReadTables {
            txn,
            rows: OnceCell::new(),
            by_session: OnceCell::new(),
            by_replica: OnceCell::new(),
            by_pool: OnceCell::new(),
            live: OnceCell::new(),
            inactive: OnceCell::new(),
            by_folded: OnceCell::new(),
        }
    }

    fn rows(&self) -> Result<&ReadOnlyTable<&'static str, &'static [u8]>, Error> {
        opened(self.txn, &self.rows, ROWS)
    }

    fn by_session_index(&self) -> Result<&ReadOnlyTable<(&'static str, &'static str), ()>, Error> {
        opened(self.txn, &self.by_session, BY_SESSION)
    }

    fn by_replica_index(&self) -> Result<&ReadOnlyTable<(&'static str, &'static str), ()>, Error> {
        opened(self.txn, &self.by_replica, BY_REPLICA)
    }

    fn by_pool_index(&self) -> Result<&ReadOnlyTable<(&'static str, &'static str), ()>, Error> {
        opened(self.txn, &self.by_pool, BY_POOL)
    }

    fn live(&self) -> Result<&ReadOnlyTable<(u64, &'static str), u64>, Error> {
        opened(self.txn, &self.live, LIVE)
    }

    fn inactive(&self) -> Result<&ReadOnlyTable<(u64, &'static str), ()>, Error> {
        opened(self.txn, &self.inactive, INACTIVE)
    }

    /// The row named `name`, if any.
    pub(crate) fn row(&self, name: &str) -> Result<Option<StoredRow>, Error> {
        self.rows()?
            .get(name)?
            .map(|v| StoredRow::decode(name, v.value()))
            .transpose()
    }

    /// The row an index names; an index entry without its row is corruption.
    pub(crate) fn indexed_row(&self, index: &str, name: &str) -> Result<StoredRow, Error> {
        self.row(name)?.ok_or_else(|| {
            Error::Corrupted(format!("{index} names row {name:?}, which does not exist"))
        })
    }

    /// Every row, ordered by name.
    pub(crate) fn all(&self) -> Result<Vec<StoredRow>, Error> {
        let mut out = Vec::new();
        for entry in self.rows()?.iter()? {
            let (k, v) = entry?;
            out.push(StoredRow::decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// At most `limit` rows whose names come after `after` (strictly), ordered by
    /// name: a range read of the rows table, as long as the page.
    pub(crate) fn page(&self, after: Option<&str>, limit: usize) -> Result<Vec<StoredRow>, Error> {
        use std::ops::Bound;
        let rows = self.rows()?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::with_capacity(limit.min(1024));
        for entry in rows.range::<&str>((start, Bound::Unbounded))?.take(limit) {
            let (k, v) = entry?;
            out.push(StoredRow::decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every row that decodes, and what is wrong with each that does not (the
    /// integrity check reports them all rather than stopping at the first).
    pub(crate) fn all_lenient(&self) -> Result<(Vec<StoredRow>, Vec<String>), Error> {
        let (mut rows, mut problems) = (Vec::new(), Vec::new());
        for entry in self.rows()?.iter()? {
            let (k, v) = entry?;
            match StoredRow::decode(k.value(), v.value()) {
                Ok(r) => rows.push(r),
                Err(e) => problems.push(e.to_string()),
            }
        }
        Ok((rows, problems))
    }

    /// The rows bound to `session`, ordered by name.
    pub(crate) fn by_session(&self, session: &SessionId) -> Result<Vec<StoredRow>, Error> {
        self.rows_under(
            self.by_session_index()?,
            "rows_by_session",
            session.as_str(),
        )
    }

    /// The rows whose binding names `replica`, ordered by name.
    pub(crate) fn bound_to(&self, replica: &ReplicaId) -> Result<Vec<StoredRow>, Error> {
        self.rows_under(
            self.by_replica_index()?,
            "rows_by_replica",
            replica.as_str(),
        )
    }

    /// The first row (by name) whose name folds to `folded`.
    pub(crate) fn by_folded(&self, folded: &str) -> Result<Option<StoredRow>, Error> {
        let index = opened(self.txn, &self.by_folded, BY_FOLDED)?;
        let mut under = index.range((folded, "")..)?;
        let Some(entry) = under.next() else {
            return Ok(None);
        };
        let (k, ()) = entry.map(|(k, v)| (k, v.value()))?;
        let (key, name) = k.value();
        if key != folded {
            return Ok(None);
        }
        self.indexed_row("rows_by_folded", name).map(Some)
    }

    /// The rows whose pool key is `pool`, ordered by name.
    pub(crate) fn by_pool(&self, pool: &LlmName) -> Result<Vec<StoredRow>, Error> {
        self.rows_under(self.by_pool_index()?, "rows_by_pool", pool.as_str())
    }

    /// The rows an index keyed `(key, name)` holds under `key`, ordered by name.
    fn rows_under(
        &self,
        index: &ReadOnlyTable<(&'static str, &'static str), ()>,
        index_name: &str,
        key: &str,
    ) -> Result<Vec<StoredRow>, Error> {
        let mut out = Vec::new();
        for entry in index.range((key, "")..)? {
            let (k, ()) = entry.map(|(k, v)| (k, v.value()))?;
            let (at, name) = k.value();
            if at != key {
                break;
            }
            out.push(self.indexed_row(index_name, name)?);
        }
        Ok(out)
    }

    /// Live index entries keyed strictly before `cutoff_ms`, oldest first. Reads no row.
    pub(crate) fn live_before(&self, cutoff_ms: u64) -> Result<Vec<LiveHit>, Error> {
        let mut out = Vec::new();
        for entry in self.live()?.range(..(cutoff_ms, ""))? {
            let (k, v) = entry?;
            let (heartbeat_ms, name) = k.value();
            out.push(LiveHit {
                heartbeat_ms,
                name: name.to_owned(),
                stamp: v.value(),
            });
        }
        Ok(out)
    }

    /// Inactive rows keyed strictly before `cutoff_ms`, oldest first.
    pub(crate) fn inactive_before(&self, cutoff_ms: u64) -> Result<Vec<StoredRow>, Error> {
        let mut out = Vec::new();
        for entry in self.inactive()?.range(..(cutoff_ms, ""))? {
            let (k, ()) = entry.map(|(k, v)| (k, v.value()))?;
            let (_, name) = k.value();
            out.push(self.indexed_row("inactive_by_since", name)?);
        }
        Ok(out)
    }

    /// The whole content of each index, for the integrity check.
    pub(crate) fn index_contents(&self) -> Result<IndexContents, Error> {
        let mut contents = IndexContents::default();
        for entry in self.by_session_index()?.iter()? {
            let (k, _) = entry?;
            let (s, n) = k.value();
            contents.by_session.push((s.to_owned(), n.to_owned()));
        }
        for entry in self.by_replica_index()?.iter()? {
            let (k, _) = entry?;
            let (r, n) = k.value();
            contents.by_replica.push((r.to_owned(), n.to_owned()));
        }
        for entry in self.by_pool_index()?.iter()? {
            let (k, _) = entry?;
            let (p, n) = k.value();
            contents.by_pool.push((p.to_owned(), n.to_owned()));
        }
        for entry in self.live()?.iter()? {
            let (k, v) = entry?;
            let (t, n) = k.value();
            contents.live.push((t, n.to_owned(), v.value()));
        }
        for entry in self.inactive()?.iter()? {
            let (k, _) = entry?;
            let (t, n) = k.value();
            contents.inactive.push((t, n.to_owned()));
        }
        for entry in opened(self.txn, &self.by_folded, BY_FOLDED)?.iter()? {
            let (k, _) = entry?;
            let (f, n) = k.value();
            contents.by_folded.push((f.to_owned(), n.to_owned()));
        }
        Ok(contents)
    }
}

/// Every entry of every index, in key order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct IndexContents {
    pub(crate) by_session: Vec<(String, String)>,
    pub(crate) by_replica: Vec<(String, String)>,
    pub(crate) by_pool: Vec<(String, String)>,
    pub(crate) live: Vec<(u64, String, u64)>,
    pub(crate) inactive: Vec<(u64, String)>,
    pub(crate) by_folded: Vec<(String, String)>,
}

impl IndexContents {
    /// What the indexes must hold for `rows`.
    pub(crate) fn expected(rows: &[StoredRow]) -> Self {
        let mut c = IndexContents::default();
        for r in rows {
            let name = r.name().as_str().to_owned();
            if let Some(s) = r.session() {
                c.by_session.push((s.as_str().to_owned(), name.clone()));
            }
            if let Some(r) = r.replica() {
                c.by_replica.push((r.as_str().to_owned(), name.clone()));
            }
            c.by_pool
                .push((r.pool_key().as_str().to_owned(), name.clone()));
            if let Some(t) = r.live_key() {
                c.live.push((t, name.clone(), r.stamp()));
            }
            c.by_folded.push((r.name().folded(), name.clone()));
            if let Some(t) = r.inactive_key() {
                c.inactive.push((t, name));
            }
        }
        c.by_folded.sort();
        c.by_session.sort();
        c.by_replica.sort();
        c.by_pool.sort();
        c.live.sort();
        c.inactive.sort();
        c
    }
}
