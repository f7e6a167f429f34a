//! Coalesced heartbeats: every [`touch`](virtual_llm_core::Store::touch) waiting at
//! one moment is written by one `UPDATE`, on a connection of its own.
//!
//! A touch records `name → heartbeat` in [`Pending`] and waits; the flusher task takes
//! everything pending, writes it in one statement (`UPDATE … FROM unnest(…)`), and
//! answers every waiting touch with how many of its rows exist. While one flush runs,
//! the next one fills up: under load, a flush carries the heartbeats of every
//! publisher that spoke during the previous one (group commit), and the cost per
//! heartbeat falls as the load grows. A quiet gateway's heartbeat waits one round
//! trip, no timer.
//!
//! Unlike the redb store's in-memory overlay, a touch returns only once its heartbeat
//! is in the database: every replica sharing the database reads it at once, and no
//! read has to lay anything over what it read. What is saved is the commit: the
//! heartbeat connection runs with `synchronous_commit = off`, so a flush does not wait
//! for the WAL to reach the disk. A crash of the database may lose the last fraction
//! of a second of heartbeats (PostgreSQL bounds it at three times `wal_writer_delay`),
//! never a lifecycle write, which commits on the store's other connections with the
//! server's own setting.
//!
//! The statement locks the rows it updates in name order, as a lifecycle batch does, so
//! a flush and a batch never deadlock. A flush that fails on a lost connection is run
//! again once on a fresh one (a heartbeat is idempotent); otherwise every touch of the
//! flush gets its error.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio::sync::{Notify, oneshot};
use virtual_llm_core::sync::lock;
use virtual_llm_core::{LlmName, Timestamp};

use crate::error::Error;

/// One statement for every heartbeat of a flush: locks the rows in name order, then
/// sets their heartbeat (and their key in the live index, when they are in it).
const FLUSH: &str = "WITH v AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS v(name, at)), \
     locked AS MATERIALIZED (SELECT r.name FROM virtual_llm_rows r JOIN v ON r.name = v.name \
         ORDER BY r.name FOR UPDATE OF r) \
     UPDATE virtual_llm_rows r \
        SET heartbeat_ms = v.at, \
            live_ms = CASE WHEN r.live_ms IS NULL THEN NULL ELSE v.at END \
       FROM v JOIN locked ON locked.name = v.name \
      WHERE r.name = v.name \
  RETURNING r.name";

/// Heartbeats waiting for the next flush, and who waits for them.
#[derive(Debug, Default)]
struct Pending {
    /// The latest heartbeat recorded per row (a later touch of a row wins, as a
    /// plain write of the field would).
    at: HashMap<LlmName, i64>,
    /// The touches waiting, with the names each asked for.
    waiters: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    names: Vec<LlmName>,
    reply: oneshot::Sender<Result<usize, Error>>,
}

/// The heartbeat batcher: shared by the store handle and the flusher task.
#[derive(Debug)]
pub(crate) struct Heartbeats {
    /// One connection, `synchronous_commit = off`.
    pool: Pool,
    pending: Mutex<Pending>,
    /// Wakes the flusher: a touch arrived, or the store is going away.
    wake: Notify,
    /// Flushes run (one statement each), for [`PgStats`](crate::PgStats).
    flushes: std::sync::atomic::AtomicU64,
    /// Heartbeats written (rows named by a flush), for [`PgStats`](crate::PgStats).
    written: std::sync::atomic::AtomicU64,
}

impl Heartbeats {
    pub(crate) fn new(pool: Pool) -> Self {
        Heartbeats {
            pool,
            pending: Mutex::default(),
            wake: Notify::new(),
            flushes: Default::default(),
            written: Default::default(),
        }
    }

    /// Records a heartbeat at `at` on `names` and waits until a flush wrote it;
    /// returns how many of the names are rows.
    pub(crate) async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, Error> {
        let at = i64::try_from(at.as_millis()).map_err(|_| {
            Error::Invalid(format!(
                "heartbeat at {} ms is past what PostgreSQL's bigint holds",
                at.as_millis()
            ))
        })?;
        let (reply, answer) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            for n in names {
                p.at.insert(n.clone(), at);
            }
            p.waiters.push(Waiter {
                names: names.to_vec(),
                reply,
            });
        }
        self.wake.notify_one();
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Waits until every heartbeat recorded so far is written.
    pub(crate) async fn flush(&self) -> Result<(), Error> {
        self.touch(&[], Timestamp::EPOCH).await.map(|_| ())
    }

    /// How many flushes ran, and how many heartbeats they carried.
    pub(crate) fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.flushes.load(Relaxed), self.written.load(Relaxed))
    }

    /// Writes everything pending, if anything is; answers its waiters.
    async fn flush_pending(&self) -> bool {
        let Pending { at, waiters } = std::mem::take(&mut *lock(&self.pending));
        if waiters.is_empty() {
            return false;
        }
        let result = if at.is_empty() {
            Ok(HashSet::new())
        } else {
            self.write(at).await
        };
        for w in waiters {
            let answer = result
                .as_ref()
                .map(|found| {
                    w.names
                        .iter()
                        .filter(|n| found.contains(n.as_str()))
                        .count()
                })
                .map_err(Clone::clone);
            // A touch that stopped waiting (its caller went away) needs no answer.
            let _ = w.reply.send(answer);
        }
        true
    }

    /// One flush: one statement, run again once on a fresh connection if the
    /// connection was lost.
    async fn write(&self, at: HashMap<LlmName, i64>) -> Result<HashSet<String>, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let context = "writing heartbeats";
        let (names, times): (Vec<String>, Vec<i64>) =
            at.into_iter().map(|(n, t)| (n.to_string(), t)).unzip();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| crate::store::pool_error(context, e))?;
            let run = async {
                let statement = client.prepare_cached(FLUSH).await?;
                client.query(&statement, &[&names, &times]).await
            };
            match run.await {
                Ok(rows) => {
                    self.flushes.fetch_add(1, Relaxed);
                    self.written.fetch_add(names.len() as u64, Relaxed);
                    return Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect());
                }
                Err(e) if Error::is_connection_lost(&e) || Error::is_transient(&e) => {
                    // The connection may not know yet that it is gone: never give it
                    // back to the pool.
                    drop(deadpool_postgres::Object::take(client));
                    if attempt >= 3 {
                        return Err(Error::from_pg(context, e));
                    }
                    tracing::debug!(error = %e, "a heartbeat flush failed; running it again");
                }
                Err(e) => return Err(Error::from_pg(context, e)),
            }
        }
    }
}

/// Owns the flusher task; dropping it stops the task after a last flush.
#[derive(Debug)]
pub(crate) struct FlusherGuard {
    stop: Arc<Notify>,
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        // notify_one stores a permit, so the loop sees it even between two waits.
        self.stop.notify_one();
    }
}

/// Starts the flusher on the current tokio runtime.
pub(crate) fn spawn(heartbeats: Arc<Heartbeats>) -> FlusherGuard {
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = heartbeats.wake.notified() => {}
                () = stopped.notified() => break,
            }
            // Whatever arrived during a flush is the next one.
            while heartbeats.flush_pending().await {}
        }
        while heartbeats.flush_pending().await {}
    });
    FlusherGuard { stop }
}
