//! The crate's private error, and its one mapping into the core's [`StoreError`].
//!
//! tokio-postgres reports a failure as one type that is either the server's answer (a
//! SQLSTATE code) or trouble with the connection; deadpool adds its own (a timeout
//! waiting for a connection, a failed connect). Everything first lands in [`Error`],
//! sorted by what a caller does about it, and leaves the crate as a [`StoreError`] of
//! the matching kind: a lost or refused connection is `Unavailable` (retry later), a
//! value PostgreSQL refuses is `InvalidBatch`, rows that do not decode are `Corrupted`,
//! a schema this build does not know is `Incompatible`.
//!
//! [`Error`] is `Clone` (the source is shared behind an `Arc`): when one heartbeat
//! flush fails, every heartbeat of the flush gets the same error, source included.

use std::sync::Arc;

use tokio_postgres::error::SqlState;
use virtual_llm_core::StoreError;

/// A shared source error, kept for the log.
pub(crate) type Source = Arc<dyn std::error::Error + Send + Sync>;

/// What went wrong inside the store, by kind.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum Error {
    /// PostgreSQL could not be reached or did not do the operation now (connection
    /// refused or lost, the server shutting down or starting up, no pooled connection
    /// within the wait timeout); nothing was written.
    #[error("{context}: {source}")]
    Unavailable {
        /// What the store was doing.
        context: &'static str,
        /// The client's or the pool's error.
        #[source]
        source: Source,
    },
    /// The connection went away while a batch's COMMIT was on its way: the server may
    /// have committed it or not, and nothing here can tell. Not retried, since a batch
    /// that did commit would then fail its own compare-and-set.
    #[error(
        "the connection to PostgreSQL was lost while committing a batch; it may or may not \
         have been written (read the rows again): {source}"
    )]
    OutcomeUnknown {
        /// The client's error.
        #[source]
        source: Source,
    },
    /// The store's background tasks are gone (the runtime shut down).
    #[error("the PostgreSQL store is closed")]
    Closed,
    /// Stored values do not decode into a valid row.
    #[error("{0}")]
    Corrupted(String),
    /// The database holds a schema this build does not know, or tables of another
    /// layout.
    #[error("{0}")]
    Incompatible(String),
    /// A compare-and-set expectation failed (not a database error: the batch is
    /// refused).
    #[error("row {0} changed concurrently")]
    Conflict(String),
    /// A value PostgreSQL cannot hold (a timestamp past its range, a NUL character in
    /// text); nothing was written.
    #[error("{0}")]
    Invalid(String),
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

    /// The error of a statement that failed while doing `context`, sorted by the
    /// server's SQLSTATE code (or by the lack of one: a connection problem).
    pub(crate) fn from_pg(context: &'static str, e: tokio_postgres::Error) -> Self {
        let Some(code) = e.code() else {
            return Error::unavailable(context, e);
        };
        if *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::UNDEFINED_COLUMN
            || *code == SqlState::DATATYPE_MISMATCH
        {
            return Error::Incompatible(format!(
                "the registry's tables are not laid out as schema {} expects ({context}): {e}",
                crate::SCHEMA_VERSION
            ));
        }
        // Class 22, data exceptions: a value out of a type's range, a NUL in text, bad
        // encoding. The batch asked for something the database cannot store.
        if code.code().starts_with("22") {
            return Error::Invalid(format!("PostgreSQL refused a value ({context}): {e}"));
        }
        Error::unavailable(context, e)
    }

    /// Whether the statement failed only because it lost a race the database broke
    /// (a deadlock, a serialization failure): nothing was written, and running the
    /// whole transaction again is safe.
    pub(crate) fn is_transient(e: &tokio_postgres::Error) -> bool {
        matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        )
    }

    /// Whether the connection is gone: the statement never ran, or its answer was
    /// lost.
    pub(crate) fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
        e.is_closed()
            || e.code().is_none()
            || matches!(
                e.code(),
                Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || c.code().starts_with("08")
            )
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        match e {
            Error::Conflict(name) => StoreError::Conflict { name },
            Error::Corrupted(message) => StoreError::Corrupted { message },
            Error::Incompatible(message) => StoreError::Incompatible { message },
            Error::Invalid(reason) => StoreError::InvalidBatch { reason },
            e @ (Error::Unavailable { .. } | Error::OutcomeUnknown { .. } | Error::Closed) => {
                StoreError::Unavailable {
                    source: Box::new(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_the_core_kinds() {
        assert!(matches!(
            StoreError::from(Error::Conflict("a".into())),
            StoreError::Conflict { name } if name == "a"
        ));
        assert!(matches!(
            StoreError::from(Error::Invalid("NUL".into())),
            StoreError::InvalidBatch { .. }
        ));
        assert!(matches!(
            StoreError::from(Error::Incompatible("v9".into())),
            StoreError::Incompatible { .. }
        ));
        assert!(matches!(
            StoreError::from(Error::Corrupted("bad kind".into())),
            StoreError::Corrupted { .. }
        ));
        let unknown = StoreError::from(Error::OutcomeUnknown {
            source: Arc::new(std::io::Error::other("reset by peer")),
        });
        assert!(matches!(unknown, StoreError::Unavailable { .. }));
        assert!(
            unknown
                .to_string()
                .contains("may or may not have been written"),
            "{unknown}"
        );
        assert!(matches!(
            StoreError::from(Error::Closed),
            StoreError::Unavailable { .. }
        ));
    }
}
