//! The `Store` trait: persistence of LLM rows, and the seam every storage backend fills.
//!
//! The lifecycle reads rows, decides, and writes them back with compare-and-set, so the
//! store is the only place where two gateways (or two requests) racing for one name are
//! resolved. Liveness is kept apart from the rows' revisions: a heartbeat is a
//! [`Store::touch`], which a backend may keep in memory and flush in batches.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::{LlmId, LlmName, LlmRecord, ReplicaId, SessionId, StoreError, Timestamp};

/// One write of an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert a row whose name must not exist yet. The store sets `revision` to 1.
    Insert(LlmRecord),
    /// Replace a row that must exist at `record.revision`. The store bumps the revision.
    Update(LlmRecord),
    /// Delete a row that must exist, as the row `id`, at `revision`.
    Delete {
        /// The row.
        name: LlmName,
        /// The id of the row the writer read.
        id: LlmId,
        /// The revision it must be at.
        revision: u64,
    },
}

impl Write {
    /// Whether this write's expectation holds against the row now stored under its
    /// name (`None`: no row): an insert needs no row; an update or delete needs the
    /// very row the writer read — same id, same revision. Checking the id too means a
    /// write based on a deleted row can never land on a later row of the same name,
    /// whose revisions start again at 1. Every store decides with this one function.
    pub fn matches(&self, current: Option<(&LlmId, u64)>) -> bool {
        match (self, current) {
            (Write::Insert(_), current) => current.is_none(),
            (Write::Update(r), Some((id, revision))) => r.id == *id && r.revision == revision,
            (
                Write::Delete {
                    id: want,
                    revision: at,
                    ..
                },
                Some((id, revision)),
            ) => want == id && *at == revision,
            (Write::Update(_) | Write::Delete { .. }, None) => false,
        }
    }

    /// The row this write touches.
    pub fn name(&self) -> &LlmName {
        match self {
            Write::Insert(r) | Write::Update(r) => &r.name,
            Write::Delete { name, .. } => name,
        }
    }
}

/// A row a committed write changed, as a store's [change feed](Store::changes)
/// reports it: a hint to read the row again, not the row itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    /// The row inserted, updated or deleted.
    pub name: LlmName,
    /// Its [pool key](LlmRecord::pool_key) after the write; `None` for a delete.
    pub pool: Option<LlmName>,
}

/// What [`Store::renew_lease`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseRenewal {
    /// The replica held a lease, now extended.
    Renewed,
    /// The replica held no lease: it starts one. For a replica that held one before,
    /// this means a peer found it expired and ended it (and demoted the replica's
    /// rows): its channels are no longer trusted.
    Started,
    /// The store keeps no leases: it serves one process (a redb file), whose rows
    /// its restart demotes.
    Unsupported,
}

/// Persistence of the LLM registry.
///
/// # Contract
/// - **Names are unique ignoring ASCII case.** An insert of a name that equals a
///   stored row's name ignoring ASCII case ([`LlmName::folded`]) fails with
///   [`StoreError::Conflict`], so that `LLAMA-8B` cannot sit beside `llama-8b`; the
///   check is part of the insert's compare-and-set (two replicas inserting `A` and `a`
///   at once: one wins). [`Store::get_ignoring_case`] finds the row that holds a name.
/// - **Atomic compare-and-set batches.** [`Store::write`] applies every write of a
///   batch or none. Each write checks its expectation with [`Write::matches`]
///   (insert: absent; update and delete: the same row id at the given revision)
///   against the committed state; one failed check
///   fails the batch with [`StoreError::Conflict`] and nothing is written. Two
///   concurrent batches expecting the same revision of a row: exactly one wins, also
///   across processes sharing the backend. A batch naming a row twice is
///   [`StoreError::InvalidBatch`].
/// - **Revisions.** An insert stores revision 1; every update adds 1. `write` returns the
///   rows as stored, with their new revisions. Heartbeats (`touch`) never change a
///   revision, so a heartbeat never makes a lifecycle write fail.
/// - **Indexed lifecycle queries.** [`Store::stale_virtuals`] and
///   [`Store::expired_inactives`] cost in proportion to the rows they return, not to
///   all rows: keep an index keyed by [`LlmRecord::live_since`] and
///   [`LlmRecord::inactive_key`]. [`Store::by_session`], [`Store::bound_to`] and
///   [`Store::by_pool`] (keyed by [`LlmRecord::pool_key`]) are indexed too.
/// - **Liveness.** [`Store::touch`] sets `last_heartbeat_at`; every read, including the
///   stale query, sees the touched value at once. A later write stores its row as
///   given, heartbeat included; a touch never carries over to a re-inserted row. A backend may hold touches in memory
///   and persist them in batches (a crash may lose the last few seconds of heartbeats,
///   never a lifecycle write); [`Store::flush`] persists them.
/// - **Durability.** Once `write` returns `Ok`, the batch survives a crash of the process.
/// - **Faithful round trip.** Every field comes back as written, `hibernating` included.
/// - **Replica leases (optional).** A store that several gateway processes share keeps
///   one lease per replica (SPEC §14): [`Store::renew_lease`] extends or starts it,
///   [`Store::expired_leases`] lists the ones that ran out, and [`Store::end_lease`]
///   ends one only if it was not renewed since it was read (a compare-and-set on its
///   expiry), so that two replicas ending one lease at once demote its rows once and a
///   replica that was only slow keeps its lease. A store for one process says
///   [`LeaseRenewal::Unsupported`] (the defaults).
/// - **Change feed (optional).** A store that several gateways share may report, through
///   [`Store::changes`], every row each committed batch inserted, updated or deleted,
///   whoever wrote it, after the batch is committed; a failed batch reports nothing.
///   It is a hint: a receiver that falls behind gets `Lagged` and must assume
///   anything changed. Heartbeats (`touch`) are not reported.
#[async_trait]
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// The row named `name`.
    async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError>;

    /// The row whose name equals `name` ignoring ASCII case ([`LlmName::folded`]), if
    /// any: the row itself, or the one whose name an insert of `name` would collide
    /// with.
    ///
    /// The default lists every row; a backend keeps an index by folded name instead.
    async fn get_ignoring_case(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        let folded = name.folded();
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|r| r.name.as_str().eq_ignore_ascii_case(&folded)))
    }

    /// Every row, ordered by name.
    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError>;

    /// A page of the rows ordered by name: at most `limit` rows whose names come
    /// after `after` (strictly; from the first row when `None`). Paging through a
    /// registry that changes meanwhile sees each row that stays at most once.
    ///
    /// The default lists every row and keeps the page; a backend reads only the page
    /// from its name-ordered table instead, so the cost grows with `limit`, not with
    /// the registry.
    async fn list_after(
        &self,
        after: Option<&LlmName>,
        limit: usize,
    ) -> Result<Vec<LlmRecord>, StoreError> {
        let rows = self.list().await?;
        Ok(rows
            .into_iter()
            .filter(|r| after.is_none_or(|a| r.name > *a))
            .take(limit)
            .collect())
    }

    /// The rows bound to `session`, ordered by name.
    async fn by_session(&self, session: &SessionId) -> Result<Vec<LlmRecord>, StoreError>;

    /// The rows whose [`binding`](LlmRecord::binding) names `replica`, ordered by name:
    /// what a replica demotes when it starts, and what its peers demote when its lease
    /// runs out.
    async fn bound_to(&self, replica: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError>;

    /// The rows whose [pool key](LlmRecord::pool_key) is `pool`, ordered by name: a
    /// pool's members, including a row named `pool` that has no pool of its own.
    ///
    /// The default lists every row and keeps the pool's; a backend keeps an index by
    /// pool key instead, so the cost grows with the pool, not the registry.
    async fn by_pool(&self, pool: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
        let mut rows = self.list().await?;
        rows.retain(|r| r.pool_key() == pool);
        Ok(rows)
    }

    /// Active virtual rows whose last heartbeat is older than `cutoff` (strictly),
    /// oldest first. A live row with no heartbeat counts as the epoch.
    async fn stale_virtuals(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError>;

    /// Inactive rows that went inactive before `cutoff` (strictly), oldest first.
    async fn expired_inactives(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError>;

    /// Applies `batch` atomically with per-row compare-and-set; returns the rows written
    /// (deletes excluded), in batch order.
    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError>;

    /// Records a heartbeat at `at` on each named row that exists; returns how many did.
    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError>;

    /// Persists anything held in memory (coalesced heartbeats).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Extends `replica`'s lease to `until`, or starts one; see [`LeaseRenewal`].
    async fn renew_lease(
        &self,
        replica: &ReplicaId,
        until: Timestamp,
    ) -> Result<LeaseRenewal, StoreError> {
        let _ = (replica, until);
        Ok(LeaseRenewal::Unsupported)
    }

    /// The leases that ran out before `cutoff` (strictly), with the expiry each had,
    /// oldest first.
    async fn expired_leases(
        &self,
        cutoff: Timestamp,
    ) -> Result<Vec<(ReplicaId, Timestamp)>, StoreError> {
        let _ = cutoff;
        Ok(Vec::new())
    }

    /// Ends `replica`'s lease if it still runs until `until` (nobody renewed it since
    /// it was read); `true` when this call ended it.
    async fn end_lease(&self, replica: &ReplicaId, until: Timestamp) -> Result<bool, StoreError> {
        let _ = (replica, until);
        Ok(false)
    }

    /// A new subscription to the store's change feed: the rows every committed write
    /// changes from now on, by any writer. `None` (the default): the store has no
    /// feed, and readers that keep rows (the gateway's
    /// [`RegistryView`](crate::RegistryView)) fall back on their staleness bound
    /// for writes by other processes.
    fn changes(&self) -> Option<broadcast::Receiver<RowChange>> {
        None
    }
}

/// Rejects a batch that names a row twice; shared by every backend.
pub fn check_batch(batch: &[Write]) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    for w in batch {
        if !seen.insert(w.name()) {
            return Err(StoreError::InvalidBatch {
                reason: format!("row {} appears twice in one batch", w.name()),
            });
        }
    }
    Ok(())
}

macro_rules! forward_store {
    ($ty:ty) => {
        #[async_trait]
        impl<T: Store + ?Sized> Store for $ty {
            async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
                (**self).get(name).await
            }
            async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).list().await
            }
            async fn get_ignoring_case(
                &self,
                name: &LlmName,
            ) -> Result<Option<LlmRecord>, StoreError> {
                (**self).get_ignoring_case(name).await
            }
            async fn list_after(
                &self,
                after: Option<&LlmName>,
                limit: usize,
            ) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).list_after(after, limit).await
            }
            async fn by_session(&self, s: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).by_session(s).await
            }
            async fn by_pool(&self, p: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).by_pool(p).await
            }
            async fn bound_to(&self, r: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).bound_to(r).await
            }
            async fn stale_virtuals(&self, c: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).stale_virtuals(c).await
            }
            async fn expired_inactives(&self, c: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).expired_inactives(c).await
            }
            async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
                (**self).write(batch).await
            }
            async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
                (**self).touch(names, at).await
            }
            async fn flush(&self) -> Result<(), StoreError> {
                (**self).flush().await
            }
            async fn renew_lease(
                &self,
                replica: &ReplicaId,
                until: Timestamp,
            ) -> Result<LeaseRenewal, StoreError> {
                (**self).renew_lease(replica, until).await
            }
            async fn expired_leases(
                &self,
                cutoff: Timestamp,
            ) -> Result<Vec<(ReplicaId, Timestamp)>, StoreError> {
                (**self).expired_leases(cutoff).await
            }
            async fn end_lease(
                &self,
                replica: &ReplicaId,
                until: Timestamp,
            ) -> Result<bool, StoreError> {
                (**self).end_lease(replica, until).await
            }
            fn changes(&self) -> Option<broadcast::Receiver<RowChange>> {
                (**self).changes()
            }
        }
    };
}

forward_store!(Arc<T>);
forward_store!(Box<T>);
