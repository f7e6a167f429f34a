//! [`PgOptions`]: how many connections, how long to wait for one, how often to retry
//! a transaction the database broke off, and how far the replicas' clocks may drift.

use std::time::Duration;

/// Tuning of a [`PgStore`](crate::PgStore). The defaults suit a gateway.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_postgres::PgOptions;
///
/// let options = PgOptions::default().max_connections(8);
/// assert_eq!(options.max_connections, 8);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PgOptions {
    /// Pooled connections for reads and lifecycle writes (default 16). Heartbeats
    /// have one connection of their own, and the change feed another.
    pub max_connections: usize,
    /// How long connecting to PostgreSQL may take, and how long an operation waits
    /// for a pooled connection (default 5 s). Past it the operation fails with
    /// [`StoreError::Unavailable`](virtual_llm_core::StoreError::Unavailable).
    pub connect_timeout: Duration,
    /// How many times a batch the database broke off (a deadlock, a serialization
    /// failure, a connection lost before its COMMIT was sent) is run again before its
    /// error is returned (default 3). Nothing of such a batch was written, so running
    /// it again is safe; a batch whose COMMIT was sent is never run again.
    pub max_retries: u32,
    /// The clock skew tolerated between this replica and the database (default 2 s).
    /// Timestamps come from each replica's clock; [`PgStore::connect`] compares it
    /// with the database's and logs a warning past this margin, and
    /// [`PgStore::clock_skew`] measures it. See `docs/operations.md`.
    ///
    /// [`PgStore::connect`]: crate::PgStore::connect
    /// [`PgStore::clock_skew`]: crate::PgStore::clock_skew
    pub max_clock_skew: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            max_retries: 3,
            max_clock_skew: Duration::from_secs(2),
        }
    }
}

impl PgOptions {
    /// Sets [`PgOptions::max_connections`] (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets [`PgOptions::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`PgOptions::max_retries`].
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets [`PgOptions::max_clock_skew`].
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }
}
