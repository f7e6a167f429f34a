//! The crate's private error, and its one mapping into the core's [`StoreError`].
//!
//! redb reports failures through a handful of types (opening, transactions, tables,
//! storage, commits). Everything here first lands in [`Error`], sorted by what a caller
//! does about it, and leaves the crate as a [`StoreError`] of the matching kind:
//! I/O and transient trouble is `Unavailable` (retry later), unreadable data is
//! `Corrupted`, a file of another layout or version is `Incompatible`. redb's own
//! error travels along as the source, for the log.
//!
//! [`Error`] is `Clone` (redb's error is shared behind an `Arc`): when a group commit
//! fails, every batch of the group gets the same error, source included.

use std::sync::Arc;

use virtual_llm_core::StoreError;

/// What went wrong inside the store, by kind.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The engine could not do the operation now (I/O, the file held by another
    /// process, a poisoned handle); nothing was written.
    #[error("{context}: {source}")]
    Unavailable {
        /// What the store was doing.
        context: &'static str,
        /// redb's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The store was closed; no further operation is possible on this handle.
    #[error("the redb store is closed")]
    Closed,
    /// A background task running the operation was cancelled (runtime shutdown).
    #[error("the blocking task running a store operation was cancelled")]
    Cancelled,
    /// The writer thread went away without answering a batch; whether the batch was
    /// committed is unknown.
    #[error("the redb writer thread stopped before answering")]
    WriterStopped,
    /// Stored bytes do not decode, or the tables disagree.
    #[error("{0}")]
    Corrupted(String),
    /// The file holds another layout or schema version.
    #[error("{0}")]
    Incompatible(String),
    /// A compare-and-set expectation failed (not an engine error: the batch is refused).
    #[error("row {0} changed concurrently")]
    Conflict(String),
}

impl Error {
    pub(crate) fn unavailable(
        context: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Unavailable {
            context,
            source: Arc::new(source),
        }
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        match e {
            Error::Conflict(name) => StoreError::Conflict { name },
            Error::Corrupted(message) => StoreError::Corrupted { message },
            Error::Incompatible(message) => StoreError::Incompatible { message },
            e @ (Error::Unavailable { .. }
            | Error::Closed
            | Error::Cancelled
            | Error::WriterStopped) => StoreError::Unavailable {
                source: Box::new(e),
            },
        }
    }
}

impl From<redb::StorageError> for Error {
    fn from(e: redb::StorageError) -> Self {
        match e {
            redb::StorageError::Corrupted(message) => {
                Error::Corrupted(format!("redb reports a corrupted file: {message}"))
            }
            // I/O, a previous I/O failure that poisoned the handle, a closed database, a
            // poisoned lock, a value over redb's limit: nothing was written, and the
            // operator (or a retry) decides what next.
            other => Error::unavailable("redb storage", other),
        }
    }
}

impl From<redb::DatabaseError> for Error {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::UpgradeRequired(version) => Error::Incompatible(format!(
                "the file uses redb file format {version}, which this build of redb cannot \
                 open; upgrade it with the redb version that wrote it"
            )),
            redb::DatabaseError::LockProtocolMismatch => {
                Error::Incompatible("the file is open in another redb concurrency mode".to_owned())
            }
            redb::DatabaseError::Storage(s) => s.into(),
            // DatabaseAlreadyOpen (another handle or process holds it), RepairAborted,
            // TransactionInProgress.
            other => Error::unavailable("opening the redb file", other),
        }
    }
}

impl From<redb::TransactionError> for Error {
    fn from(e: redb::TransactionError) -> Self {
        match e {
            redb::TransactionError::Storage(s) => s.into(),
            // Rendered to text: `ReadTransactionStillInUse` carries the transaction
            // itself, which an error kept for the log must not keep alive.
            other => Error::Unavailable {
                context: "starting a redb transaction",
                source: Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
                    other.to_string(),
                )),
            },
        }
    }
}

impl From<redb::TableError> for Error {
    fn from(e: redb::TableError) -> Self {
        match e {
            redb::TableError::Storage(s) => s.into(),
            redb::TableError::TableDoesNotExist(name) => Error::Corrupted(format!(
                "table {name} is missing from a file that carries a schema version"
            )),
            e @ (redb::TableError::TableTypeMismatch { .. }
            | redb::TableError::TableIsMultimap(_)
            | redb::TableError::TableIsNotMultimap(_)
            | redb::TableError::TypeDefinitionChanged { .. }) => Error::Incompatible(format!(
                "a table of the file has another layout than this version expects: {e}"
            )),
            other => Error::unavailable("opening a redb table", other),
        }
    }
}

impl From<redb::CommitError> for Error {
    fn from(e: redb::CommitError) -> Self {
        match e {
            redb::CommitError::Storage(s) => s.into(),
            other => Error::unavailable("committing a redb transaction", other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_the_core_kinds() {
        let io = redb::StorageError::Io(std::io::Error::other("disk on fire"));
        assert!(matches!(
            StoreError::from(Error::from(io)),
            StoreError::Unavailable { .. }
        ));
        let torn = redb::StorageError::Corrupted("bad checksum".into());
        assert!(matches!(
            StoreError::from(Error::from(torn)),
            StoreError::Corrupted { .. }
        ));
        let old = redb::DatabaseError::UpgradeRequired(1);
        assert!(matches!(
            StoreError::from(Error::from(old)),
            StoreError::Incompatible { .. }
        ));
        let busy = redb::DatabaseError::DatabaseAlreadyOpen;
        assert!(matches!(
            StoreError::from(Error::from(busy)),
            StoreError::Unavailable { .. }
        ));
        let mismatch = redb::TableError::TableIsMultimap("rows".into());
        assert!(matches!(
            StoreError::from(Error::from(mismatch)),
            StoreError::Incompatible { .. }
        ));
        assert!(matches!(
            StoreError::from(Error::Conflict("a".into())),
            StoreError::Conflict { name } if name == "a"
        ));
        assert!(matches!(
            StoreError::from(Error::Closed),
            StoreError::Unavailable { .. }
        ));
    }
}
