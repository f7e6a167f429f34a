//! [`PgStore`]: the [`Store`] on PostgreSQL, and how each operation meets the
//! contract.
//!
//! - **Compare-and-set.** A batch is one transaction: it locks the rows it names (and,
//!   for an insert, any row whose name equals it ignoring ASCII case) with
//!   `SELECT … FOR UPDATE` in name order, checks every expectation with the core's
//!   [`Write::matches`] against what it locked, then applies the writes in three
//!   set-based statements (`DELETE … USING unnest(…)`, `UPDATE … FROM unnest(…)` and
//!   `INSERT … SELECT … FROM unnest(…) ON CONFLICT DO NOTHING`, each matching name, id
//!   and revision, and each write must touch its row), taking rows in name order;
//!   sends its change notifications and commits. Any miss rolls the whole batch back as [`StoreError::Conflict`]. Two
//!   batches racing for a row serialize on its lock; two inserts of one name, on the
//!   unique index. Locks are always taken in name order, by batches and heartbeat
//!   flushes alike, so they never deadlock each other.
//! - **Retries.** A batch the database broke off (a deadlock or serialization failure
//!   reported by the server, a connection lost before COMMIT was sent) wrote nothing
//!   and runs again, up to [`PgOptions::max_retries`]. A connection lost while COMMIT
//!   was on its way is not retried: the error says the outcome is unknown. Reads run
//!   again once on a fresh connection when theirs was lost.
//! - **Reads** are single statements on a pooled connection, each served by an index
//!   (see `migrations/0001_rows.sql`); rows are ordered by name byte by byte
//!   (`COLLATE "C"`).
//! - **Heartbeats**: see `heartbeats`; **the change feed**: see `feed`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;
use virtual_llm_core::store::{RowChange, check_batch};
use virtual_llm_core::{
    LeaseRenewal, LlmName, LlmRecord, ReplicaId, SessionId, Store, StoreError, Timestamp, Write,
};

use crate::codec::{self, ColumnArrays, Columns, SELECT, change_payload, decode};
use crate::error::Error;
use crate::feed::{CHANNEL, Feed};
use crate::heartbeats::{self, FlusherGuard, Heartbeats};
use crate::options::PgOptions;
use crate::schema;

/// The registry on PostgreSQL, shared by any number of gateway replicas.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use virtual_llm_core::Gateway;
/// use virtual_llm_postgres::PgStore;
///
/// let store = Arc::new(PgStore::connect("postgres://gateway@db.internal/registry").await?);
/// let gateway = Gateway::builder(store.clone()).start().await?;
/// # drop(gateway);
/// # Ok(())
/// # }
/// ```
pub struct PgStore {
    /// Reads and lifecycle writes.
    pool: Pool,
    heartbeats: Arc<Heartbeats>,
    /// Stops the heartbeat flusher when the store goes.
    _flusher: FlusherGuard,
    feed: Feed,
    options: PgOptions,
    /// Where the store connects, for messages: host, port and database, never the
    /// password.
    target: String,
    /// Statistics.
    retries: std::sync::atomic::AtomicU64,
}

/// Counters of a [`PgStore`], for operators and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgStats {
    /// Heartbeat flushes run: one `UPDATE` each, whatever the number of heartbeats.
    pub heartbeat_flushes: u64,
    /// Heartbeats those flushes wrote (one per row named).
    pub heartbeats_written: u64,
    /// Batches run again after the database broke them off, or reads after a lost
    /// connection.
    pub retries: u64,
    /// Times the change feed lost its connection or heard an unknown notification,
    /// and told its receivers to forget everything.
    pub feed_resets: u64,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The error of a pool that gave no connection.
pub(crate) fn pool_error(context: &'static str, e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => Error::from_pg(context, e),
        other => Error::unavailable(context, other),
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`, or
    /// libpq's `key=value` form) with the default [`PgOptions`], and brings its schema
    /// to [`SCHEMA_VERSION`](crate::SCHEMA_VERSION).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// [`PgStore::connect`] with `options`.
    ///
    /// Fails with [`StoreError::Unavailable`] when the database cannot be reached, and
    /// [`StoreError::Incompatible`] when it holds a newer schema than this build knows.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::from(Error::Incompatible(format!(
                "the PostgreSQL URL does not parse: {e}"
            )))
        })?;
        config.connect_timeout(options.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("virtual-llm");
        }
        let target = describe(&config);
        let pool = new_pool(config.clone(), options.max_connections, &options)?;
        let mut heartbeat_config = config.clone();
        let extra = "-c synchronous_commit=off";
        heartbeat_config.options(match config.get_options() {
            Some(o) => format!("{o} {extra}"),
            None => extra.to_owned(),
        });
        let heartbeat_pool = new_pool(heartbeat_config, 1, &options)?;

        let mut client = pool
            .get()
            .await
            .map_err(|e| pool_error("connecting to PostgreSQL", e))?;
        let before = schema::migrate(&mut client).await?;
        let skew = measure_skew(&client).await?;
        drop(client);
        if skew.unsigned_abs() > options.max_clock_skew.as_millis() as u64 {
            tracing::warn!(
                skew_ms = skew,
                margin_ms = options.max_clock_skew.as_millis() as u64,
                "this replica's clock and the database's differ by more than the tolerated \
                 skew: heartbeats and leases compare times written by different replicas"
            );
        }
        let feed = Feed::start(config).await?;
        let heartbeats = Arc::new(Heartbeats::new(heartbeat_pool));
        tracing::info!(
            target = %target,
            schema_before = before,
            schema = schema::SCHEMA_VERSION,
            "connected to the PostgreSQL registry"
        );
        Ok(PgStore {
            pool,
            _flusher: heartbeats::spawn(heartbeats.clone()),
            heartbeats,
            feed,
            options,
            target,
            retries: Default::default(),
        })
    }

    /// Where the store connects: `host:port/database`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The store's counters.
    pub fn stats(&self) -> PgStats {
        let (heartbeat_flushes, heartbeats_written) = self.heartbeats.counts();
        PgStats {
            heartbeat_flushes,
            heartbeats_written,
            retries: self.retries.load(std::sync::atomic::Ordering::Relaxed),
            feed_resets: self.feed.resets(),
        }
    }

    /// How far this replica's clock is ahead of the database's (negative: behind), in
    /// milliseconds, give or take half a round trip. Timestamps in rows come from the
    /// replicas' clocks; keep every replica within [`PgOptions::max_clock_skew`] of
    /// the database (NTP does).
    pub async fn clock_skew(&self) -> Result<i64, StoreError> {
        let client = self.client("measuring the clock skew").await?;
        Ok(measure_skew(&client).await?)
    }

    async fn client(&self, context: &'static str) -> Result<deadpool_postgres::Client, Error> {
        self.pool.get().await.map_err(|e| pool_error(context, e))
    }

    fn retried(&self) {
        self.retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs a read, again once on a fresh connection if its connection was lost.
    async fn query(
        &self,
        context: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<LlmRecord>, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.client(context).await?;
            let rows = async {
                let statement = client.prepare_cached(sql).await?;
                client.query(&statement, params).await
            }
            .await;
            match rows {
                Ok(rows) => return rows.iter().map(decode).collect(),
                Err(e) if Error::is_connection_lost(&e) => {
                    // The connection may not know yet that it is gone: never give it
                    // back to the pool.
                    drop(deadpool_postgres::Object::take(client));
                    if attempt > 1 {
                        return Err(Error::from_pg(context, e));
                    }
                    tracing::debug!(error = %e, "a registry read lost its connection; reading again");
                    self.retried();
                }
                Err(e) => return Err(Error::from_pg(context, e)),
            }
        }
    }

    /// One attempt at a batch, on a pooled connection; a connection the attempt
    /// failed on is not given back to the pool (it may not know yet that it is gone).
    async fn write_once(&self, batch: &[Write]) -> Result<Vec<LlmRecord>, Attempt> {
        let mut client = self
            .client("writing a batch")
            .await
            .map_err(Attempt::Failed)?;
        let result = Self::transaction(&mut client, batch).await;
        if let Err(
            Attempt::Retry(_)
            | Attempt::Failed(Error::Unavailable { .. } | Error::OutcomeUnknown { .. }),
        ) = &result
        {
            drop(deadpool_postgres::Object::take(client));
        }
        result
    }

    /// A batch in one transaction.
    async fn transaction(
        client: &mut deadpool_postgres::Client,
        batch: &[Write],
    ) -> Result<Vec<LlmRecord>, Attempt> {
        let context = "writing a batch";
        let before_commit = |e| Attempt::classify(context, e, false);
        let tx = client.transaction().await.map_err(before_commit)?;

        // Lock what the batch names, and every row an insert would clash with.
        let lowered: Vec<String> = batch
            .iter()
            .map(|w| w.name().as_str().to_ascii_lowercase())
            .collect();
        let lock = tx
            .prepare_cached(
                "SELECT name, id, revision FROM virtual_llm_rows \
                 WHERE lower(name) = ANY($1) ORDER BY name FOR UPDATE",
            )
            .await
            .map_err(before_commit)?;
        let mut exact: HashMap<String, (virtual_llm_core::LlmId, u64)> = HashMap::new();
        let mut folded: HashMap<String, String> = HashMap::new();
        for row in tx.query(&lock, &[&lowered]).await.map_err(before_commit)? {
            let name: String = row.get(0);
            let id = virtual_llm_core::LlmId::parse(row.get::<_, &str>(1)).map_err(|e| {
                Attempt::Failed(Error::Corrupted(format!(
                    "row {name:?} has an invalid id: {e}"
                )))
            })?;
            let revision = codec::revision(row.get(2), &name).map_err(Attempt::Failed)?;
            folded.insert(name.to_ascii_lowercase(), name.clone());
            exact.insert(name, (id, revision));
        }
        for w in batch {
            let name = w.name().as_str();
            let current = match w {
                // An insert clashes with a row of the same name in any case.
                Write::Insert(_) => folded
                    .get(&name.to_ascii_lowercase())
                    .and_then(|n| exact.get(n)),
                Write::Update(_) | Write::Delete { .. } => exact.get(name),
            };
            if !w.matches(current.map(|(id, rev)| (id, *rev))) {
                return Err(Attempt::Failed(Error::Conflict(name.to_owned())));
            }
        }

        // Apply: one statement per kind of write, each taking its rows in name order
        // (the order every lock is taken in), the three pipelined (sent at once,
        // answered in order). Answer in batch order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|a, b| batch[*a].name().cmp(batch[*b].name()));
        let (mut inserts, mut updates) = (ColumnArrays::default(), ColumnArrays::default());
        let (mut del_names, mut del_ids, mut del_revisions) = (Vec::new(), Vec::new(), Vec::new());
        for &i in &order {
            match &batch[i] {
                Write::Insert(r) => inserts.push(Columns::of(r).map_err(Attempt::Failed)?, 0),
                Write::Update(r) => updates.push(
                    Columns::of(r).map_err(Attempt::Failed)?,
                    // A revision past bigint is stored nowhere: the row is not found.
                    i64::try_from(r.revision).unwrap_or(-1),
                ),
                Write::Delete { name, id, revision } => {
                    del_names.push(name.as_str());
                    del_ids.push(id.as_str());
                    del_revisions.push(i64::try_from(*revision).unwrap_or(-1));
                }
            }
        }
        let (insert, update, delete) = (codec::insert(), codec::update(), codec::DELETE);
        let (insert, update, delete) = futures::future::join3(
            tx.prepare_cached(&insert),
            tx.prepare_cached(&update),
            tx.prepare_cached(delete),
        )
        .await;
        let (insert, update, delete) = (
            insert.map_err(before_commit)?,
            update.map_err(before_commit)?,
            delete.map_err(before_commit)?,
        );
        let (deleted, updated, inserted) = futures::future::join3(
            run(
                &tx,
                &delete,
                &[&del_names, &del_ids, &del_revisions],
                del_names.is_empty(),
            ),
            run(&tx, &update, &updates.params(), updates.is_empty()),
            run(&tx, &insert, &inserts.params(), inserts.is_empty()),
        )
        .await;
        let mut done: HashMap<String, Option<i64>> = HashMap::with_capacity(batch.len());
        for row in deleted.map_err(before_commit)? {
            done.insert(row.get(0), None);
        }
        for row in updated
            .map_err(before_commit)?
            .into_iter()
            .chain(inserted.map_err(before_commit)?)
        {
            done.insert(row.get(0), Some(row.get(1)));
        }
        let mut stored: Vec<Option<LlmRecord>> = vec![None; batch.len()];
        for (i, w) in batch.iter().enumerate() {
            let Some(revision) = done.get(w.name().as_str()) else {
                // A row appeared or changed since it was locked (an insert racing
                // this one committed first).
                return Err(Attempt::Failed(Error::Conflict(w.name().to_string())));
            };
            if let (Write::Insert(r) | Write::Update(r), Some(revision)) = (w, revision) {
                let mut r = r.clone();
                r.revision =
                    codec::revision(*revision, r.name.as_str()).map_err(Attempt::Failed)?;
                stored[i] = Some(r);
            }
        }

        // The change hints, delivered when (and only if) the transaction commits.
        let payloads: Vec<String> = batch
            .iter()
            .zip(&stored)
            .map(|(w, s)| change_payload(w.name(), s.as_ref().map(LlmRecord::pool_key)))
            .collect();
        let notify = tx
            .prepare_cached(&format!(
                "SELECT pg_notify('{CHANNEL}', p) FROM unnest($1::text[]) WITH ORDINALITY \
                 AS t(p, i) ORDER BY i"
            ))
            .await
            .map_err(before_commit)?;
        tx.execute(&notify, &[&payloads])
            .await
            .map_err(before_commit)?;
        tx.commit()
            .await
            .map_err(|e| Attempt::classify(context, e, true))?;
        Ok(stored.into_iter().flatten().collect())
    }
}

/// Runs `statement` in `tx`, unless it has no rows to write.
async fn run(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    empty: bool,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if empty {
        return Ok(Vec::new());
    }
    tx.query(statement, params).await
}

/// How one attempt at a batch ended, when it did not commit.
enum Attempt {
    /// Nothing was written and running the batch again is safe.
    Retry(Error),
    /// The batch's error, final.
    Failed(Error),
}

impl Attempt {
    /// Sorts a statement's error. `committing`: the statement was COMMIT, so a lost
    /// connection leaves the outcome unknown.
    fn classify(context: &'static str, e: tokio_postgres::Error, committing: bool) -> Self {
        if Error::is_transient(&e) {
            return Attempt::Retry(Error::from_pg(context, e));
        }
        if Error::is_connection_lost(&e) {
            if committing {
                return Attempt::Failed(Error::OutcomeUnknown {
                    source: Arc::new(e),
                });
            }
            return Attempt::Retry(Error::from_pg(context, e));
        }
        Attempt::Failed(Error::from_pg(context, e))
    }
}

fn new_pool(
    config: tokio_postgres::Config,
    size: usize,
    options: &PgOptions,
) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // A connection the server closed reports it; the next operation gets a
            // fresh one, and a read that lost its connection runs again.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.connect_timeout))
        .create_timeout(Some(options.connect_timeout))
        .recycle_timeout(Some(options.connect_timeout))
        .build()
        .map_err(|e| StoreError::from(Error::unavailable("building the connection pool", e)))
}

/// This process's clock minus the database's, in milliseconds.
async fn measure_skew(client: &deadpool_postgres::Client) -> Result<i64, Error> {
    let before = Timestamp::from_system_time(SystemTime::now()).as_millis();
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await
        .map_err(|e| Error::from_pg("reading the database's clock", e))?;
    let after = Timestamp::from_system_time(SystemTime::now()).as_millis();
    let db: i64 = row.get(0);
    let local = i64::try_from(before / 2 + after / 2).unwrap_or(i64::MAX);
    Ok(local - db)
}

fn cutoff_ms(cutoff: Timestamp) -> i64 {
    // Every stored key fits in a bigint, so a cutoff past it is past them all.
    i64::try_from(cutoff.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for PgStore {
    async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        let sql = format!("{SELECT} WHERE name = $1");
        Ok(self
            .query("reading a row", &sql, &[&name.as_str()])
            .await?
            .pop())
    }

    async fn list_after(
        &self,
        after: Option<&LlmName>,
        limit: usize,
    ) -> Result<Vec<LlmRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(match after {
            Some(after) => {
                let sql = format!("{SELECT} WHERE name > $1 ORDER BY name LIMIT $2");
                self.query("listing a page of rows", &sql, &[&after.as_str(), &limit])
                    .await?
            }
            None => {
                let sql = format!("{SELECT} ORDER BY name LIMIT $1");
                self.query("listing a page of rows", &sql, &[&limit])
                    .await?
            }
        })
    }

    async fn get_ignoring_case(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        // On the unique index of lower(name): at most one row.
        let sql = format!("{SELECT} WHERE lower(name) = lower($1)");
        Ok(self
            .query("reading a row ignoring case", &sql, &[&name.as_str()])
            .await?
            .pop())
    }

    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        let sql = format!("{SELECT} ORDER BY name");
        Ok(self.query("listing the rows", &sql, &[]).await?)
    }

    async fn by_session(&self, session: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        let sql = format!("{SELECT} WHERE session = $1 ORDER BY name");
        Ok(self
            .query("reading a session's rows", &sql, &[&session.as_str()])
            .await?)
    }

    async fn bound_to(&self, replica: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
        let sql = format!("{SELECT} WHERE binding_replica = $1 ORDER BY name");
        Ok(self
            .query("reading a replica's rows", &sql, &[&replica.as_str()])
            .await?)
    }

    async fn by_pool(&self, pool: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
        let sql = format!("{SELECT} WHERE pool_key = $1 ORDER BY name");
        Ok(self
            .query("reading a pool's rows", &sql, &[&pool.as_str()])
            .await?)
    }

    async fn stale_virtuals(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        let (sql, cutoff) = if cutoff.as_millis() > i64::MAX as u64 {
            (
                format!("{SELECT} WHERE live_ms IS NOT NULL ORDER BY live_ms, name"),
                None,
            )
        } else {
            (
                format!("{SELECT} WHERE live_ms < $1 ORDER BY live_ms, name"),
                Some(cutoff_ms(cutoff)),
            )
        };
        let params: Vec<&(dyn ToSql + Sync)> = cutoff.iter().map(|c| c as _).collect();
        Ok(self.query("reading stale rows", &sql, &params).await?)
    }

    async fn expired_inactives(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        let (sql, cutoff) = if cutoff.as_millis() > i64::MAX as u64 {
            (
                format!("{SELECT} WHERE inactive_ms IS NOT NULL ORDER BY inactive_ms, name"),
                None,
            )
        } else {
            (
                format!("{SELECT} WHERE inactive_ms < $1 ORDER BY inactive_ms, name"),
                Some(cutoff_ms(cutoff)),
            )
        };
        let params: Vec<&(dyn ToSql + Sync)> = cutoff.iter().map(|c| c as _).collect();
        Ok(self.query("reading expired rows", &sql, &params).await?)
    }

    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
        check_batch(&batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut retries = 0;
        loop {
            match self.write_once(&batch).await {
                Ok(stored) => return Ok(stored),
                Err(Attempt::Retry(e)) if retries < self.options.max_retries => {
                    retries += 1;
                    self.retried();
                    tracing::debug!(error = %e, retries, "a registry batch was broken off; running it again");
                    // A deadlock's loser waits a moment, so the winner can finish.
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(retries))).await;
                }
                Err(Attempt::Retry(e) | Attempt::Failed(e)) => return Err(e.into()),
            }
        }
    }

    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        if names.is_empty() {
            return Ok(0);
        }
        Ok(self.heartbeats.touch(names, at).await?)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(self.heartbeats.flush().await?)
    }

    fn changes(&self) -> Option<broadcast::Receiver<RowChange>> {
        Some(self.feed.subscribe())
    }

    async fn renew_lease(
        &self,
        replica: &ReplicaId,
        until: Timestamp,
    ) -> Result<LeaseRenewal, StoreError> {
        let client = self.client("renewing a lease").await?;
        // `xmax = 0` only on a row this statement inserted: the lease was not there.
        let row = client
            .query_one(
                "INSERT INTO virtual_llm_leases (replica, until_ms) VALUES ($1, $2) \
                 ON CONFLICT (replica) DO UPDATE SET until_ms = EXCLUDED.until_ms \
                 RETURNING (xmax = 0) AS started",
                &[&replica.as_str(), &cutoff_ms(until)],
            )
            .await
            .map_err(|e| Error::from_pg("renewing a lease", e))?;
        let started: bool = row.get(0);
        Ok(if started {
            LeaseRenewal::Started
        } else {
            LeaseRenewal::Renewed
        })
    }

    async fn expired_leases(
        &self,
        cutoff: Timestamp,
    ) -> Result<Vec<(ReplicaId, Timestamp)>, StoreError> {
        let client = self.client("reading expired leases").await?;
        let rows = client
            .query(
                "SELECT replica, until_ms FROM virtual_llm_leases WHERE until_ms < $1 \
                 ORDER BY until_ms, replica",
                &[&cutoff_ms(cutoff)],
            )
            .await
            .map_err(|e| Error::from_pg("reading expired leases", e))?;
        rows.iter()
            .map(|row| {
                let replica: &str = row.get(0);
                let until: i64 = row.get(1);
                let replica = ReplicaId::parse(replica).map_err(|e| StoreError::Corrupted {
                    message: format!("lease of replica {replica:?}: {e}"),
                })?;
                Ok((
                    replica,
                    Timestamp::from_millis(u64::try_from(until).unwrap_or(0)),
                ))
            })
            .collect()
    }

    async fn end_lease(&self, replica: &ReplicaId, until: Timestamp) -> Result<bool, StoreError> {
        let client = self.client("ending a lease").await?;
        let ended = client
            .execute(
                "DELETE FROM virtual_llm_leases WHERE replica = $1 AND until_ms = $2",
                &[&replica.as_str(), &cutoff_ms(until)],
            )
            .await
            .map_err(|e| Error::from_pg("ending a lease", e))?;
        Ok(ended == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_names_no_password() {
        let config =
            tokio_postgres::Config::from_str("postgres://gw:secret@db.internal:6543/registry")
                .unwrap();
        assert_eq!(describe(&config), "db.internal:6543/registry");
    }
}
