//! The integrity check: does the file hold what the store's invariants say it must?
//!
//! For operators after an incident, and for the crash tests. It runs redb's own check
//! (page checksums, allocator state; redb repairs what it can), then decodes every row
//! and recomputes every index from the rows: an index entry without its row, a row
//! missing from an index, or a live entry with the wrong stamp is reported, each by
//! name.

use redb::{Database, ReadableDatabase};

use crate::error::Error;
use crate::schema::{META, SCHEMA_KEY, SCHEMA_VERSION, STAMP_KEY};
use crate::tables::{IndexContents, ReadTables};

/// Most problems listed per index (a thoroughly broken file would list every row).
const MAX_LISTED: usize = 20;

/// What [`RedbStore::check_integrity`](crate::RedbStore::check_integrity) found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IntegrityReport {
    /// Rows in the file (those that decode).
    pub rows: usize,
    /// Whether redb had to repair the file's structure (its data was kept).
    pub repaired: bool,
    /// Every inconsistency found, in words; empty for a sound file.
    pub problems: Vec<String>,
}

impl IntegrityReport {
    /// Whether the file is sound.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `db`; the caller holds it exclusively (no transaction may be alive).
pub(crate) fn check(db: &mut Database) -> Result<IntegrityReport, Error> {
    let mut report = IntegrityReport {
        // Ok(false): redb found damage and repaired it; Err(Corrupted): beyond repair.
        repaired: !db.check_integrity()?,
        ..IntegrityReport::default()
    };
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    match meta.get(SCHEMA_KEY)?.map(|v| v.value()) {
        Some(SCHEMA_VERSION) => {}
        other => report.problems.push(format!(
            "schema version is {other:?}, expected {SCHEMA_VERSION}"
        )),
    }
    let last_stamp = meta.get(STAMP_KEY)?.map(|v| v.value());
    let tables = ReadTables::open(&txn);
    let (rows, undecodable) = tables.all_lenient()?;
    report.rows = rows.len();
    report.problems.extend(undecodable);
    for r in &rows {
        if last_stamp.is_none_or(|last| r.stamp() > last) {
            report.problems.push(format!(
                "row {} has stamp {}, after the last stamp {last_stamp:?}",
                r.name(),
                r.stamp()
            ));
        }
    }
    let expected = IndexContents::expected(&rows);
    let actual = tables.index_contents()?;
    diff(
        "rows_by_session",
        &expected.by_session,
        &actual.by_session,
        &mut report.problems,
    );
    diff(
        "rows_by_replica",
        &expected.by_replica,
        &actual.by_replica,
        &mut report.problems,
    );
    diff(
        "rows_by_pool",
        &expected.by_pool,
        &actual.by_pool,
        &mut report.problems,
    );
    diff(
        "live_by_heartbeat",
        &expected.live,
        &actual.live,
        &mut report.problems,
    );
    diff(
        "rows_by_folded",
        &expected.by_folded,
        &actual.by_folded,
        &mut report.problems,
    );
    diff(
        "inactive_by_since",
        &expected.inactive,
        &actual.inactive,
        &mut report.problems,
    );
    Ok(report)
}

/// Reports entries of one index that the rows call for but it lacks, and the reverse.
/// Both lists are sorted.
fn diff<T: Ord + std::fmt::Debug>(
    index: &str,
    expected: &[T],
    actual: &[T],
    out: &mut Vec<String>,
) {
    let missing = expected.iter().filter(|e| actual.binary_search(e).is_err());
    let extra = actual.iter().filter(|a| expected.binary_search(a).is_err());
    out.extend(
        missing
            .take(MAX_LISTED)
            .map(|e| format!("{index} lacks {e:?}, which a row calls for")),
    );
    out.extend(
        extra
            .take(MAX_LISTED)
            .map(|a| format!("{index} holds {a:?}, which no row calls for")),
    );
}
