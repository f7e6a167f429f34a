//! `MemoryStore`: the in-memory [`Store`], for tests, demos and single-process gateways
//! that do not need their registry to survive a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::RwLock;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::store::{LeaseRenewal, RowChange, check_batch};
use crate::sync::{read, write};
use crate::{LlmName, LlmRecord, ReplicaId, SessionId, Store, StoreError, Timestamp, Write};

/// A [`Store`] in process memory, with the same indexes a durable store keeps.
///
/// ```
/// # tokio_test_block_on(async {
/// use virtual_llm_core::{MemoryStore, Store};
///
/// let store = MemoryStore::new();
/// assert!(store.list().await.unwrap().is_empty());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    tables: RwLock<Tables>,
    /// Every committed write's rows, for the gateways that share this store (two
    /// replicas in one process).
    changes: broadcast::Sender<RowChange>,
}

/// How many changes a feed subscriber may fall behind before it gets `Lagged`.
const FEED_CAPACITY: usize = 1024;

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            tables: RwLock::default(),
            changes: broadcast::Sender::new(FEED_CAPACITY),
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    rows: BTreeMap<LlmName, LlmRecord>,
    /// Rows by [folded](LlmName::folded) name: names are unique by it.
    folded: HashMap<String, LlmName>,
    by_session: HashMap<SessionId, BTreeSet<LlmName>>,
    /// Rows by pool key.
    by_pool: HashMap<LlmName, BTreeSet<LlmName>>,
    /// Rows by the replica holding their channel.
    by_replica: HashMap<ReplicaId, BTreeSet<LlmName>>,
    /// Live virtual rows by heartbeat: the stale query is a range scan.
    live: BTreeSet<(Timestamp, LlmName)>,
    /// Inactive rows by the time they went inactive: the expiry query is a range scan.
    inactive: BTreeSet<(Timestamp, LlmName)>,
    /// Replica leases: each replica's expiry.
    leases: HashMap<ReplicaId, Timestamp>,
}

impl Tables {
    fn index(&mut self, r: &LlmRecord) {
        self.folded.insert(r.name.folded(), r.name.clone());
        self.by_pool
            .entry(r.pool_key().clone())
            .or_default()
            .insert(r.name.clone());
        if let Some(s) = &r.provider_session_id {
            self.by_session
                .entry(s.clone())
                .or_default()
                .insert(r.name.clone());
        }
        if let Some(b) = &r.binding {
            self.by_replica
                .entry(b.replica.clone())
                .or_default()
                .insert(r.name.clone());
        }
        if let Some(t) = r.live_since() {
            self.live.insert((t, r.name.clone()));
        }
        if let Some(t) = r.inactive_key() {
            self.inactive.insert((t, r.name.clone()));
        }
    }

    fn unindex(&mut self, r: &LlmRecord) {
        self.folded.remove(&r.name.folded());
        if let Some(names) = self.by_pool.get_mut(r.pool_key()) {
            names.remove(&r.name);
            if names.is_empty() {
                self.by_pool.remove(r.pool_key());
            }
        }
        if let Some(s) = &r.provider_session_id
            && let Some(names) = self.by_session.get_mut(s)
        {
            names.remove(&r.name);
            if names.is_empty() {
                self.by_session.remove(s);
            }
        }
        if let Some(b) = &r.binding
            && let Some(names) = self.by_replica.get_mut(&b.replica)
        {
            names.remove(&r.name);
            if names.is_empty() {
                self.by_replica.remove(&b.replica);
            }
        }
        if let Some(t) = r.live_since() {
            self.live.remove(&(t, r.name.clone()));
        }
        if let Some(t) = r.inactive_key() {
            self.inactive.remove(&(t, r.name.clone()));
        }
    }

    fn range(&self, set: &BTreeSet<(Timestamp, LlmName)>, cutoff: Timestamp) -> Vec<LlmRecord> {
        set.iter()
            .take_while(|(t, _)| *t < cutoff)
            .filter_map(|(_, name)| self.rows.get(name).cloned())
            .collect()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        Ok(read(&self.tables).rows.get(name).cloned())
    }

    async fn get_ignoring_case(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        let t = read(&self.tables);
        Ok(t.folded
            .get(&name.folded())
            .and_then(|n| t.rows.get(n))
            .cloned())
    }

    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        Ok(read(&self.tables).rows.values().cloned().collect())
    }

    async fn list_after(
        &self,
        after: Option<&LlmName>,
        limit: usize,
    ) -> Result<Vec<LlmRecord>, StoreError> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(read(&self.tables)
            .rows
            .range::<LlmName, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn by_session(&self, session: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        let t = read(&self.tables);
        Ok(t.by_session
            .get(session)
            .into_iter()
            .flatten()
            .filter_map(|name| t.rows.get(name).cloned())
            .collect())
    }

    async fn by_pool(&self, pool: &LlmName) -> Result<Vec<LlmRecord>, StoreError> {
        let t = read(&self.tables);
        Ok(t.by_pool
            .get(pool)
            .into_iter()
            .flatten()
            .filter_map(|name| t.rows.get(name).cloned())
            .collect())
    }

    async fn bound_to(&self, replica: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
        let t = read(&self.tables);
        Ok(t.by_replica
            .get(replica)
            .into_iter()
            .flatten()
            .filter_map(|name| t.rows.get(name).cloned())
            .collect())
    }

    async fn stale_virtuals(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        let t = read(&self.tables);
        Ok(t.range(&t.live, cutoff))
    }

    async fn expired_inactives(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        let t = read(&self.tables);
        Ok(t.range(&t.inactive, cutoff))
    }

    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
        check_batch(&batch)?;
        let mut t = write(&self.tables);
        // Check every expectation before touching anything: the batch is all or nothing.
        let mut inserted = HashSet::new();
        for w in &batch {
            let current = t.rows.get(w.name()).map(|r| (&r.id, r.revision));
            // An insert also needs its folded name free, in the store and the batch.
            let lookalike = matches!(w, Write::Insert(_))
                && (t.folded.contains_key(&w.name().folded())
                    || !inserted.insert(w.name().folded()));
            if lookalike || !w.matches(current) {
                return Err(StoreError::Conflict {
                    name: w.name().to_string(),
                });
            }
        }
        let mut written = Vec::with_capacity(batch.len());
        let mut changes = Vec::with_capacity(batch.len());
        for w in batch {
            match w {
                Write::Insert(mut r) | Write::Update(mut r) => {
                    r.revision = t.rows.get(&r.name).map_or(1, |old| old.revision + 1);
                    if let Some(old) = t.rows.remove(&r.name) {
                        t.unindex(&old);
                    }
                    t.index(&r);
                    t.rows.insert(r.name.clone(), r.clone());
                    changes.push(RowChange {
                        name: r.name.clone(),
                        pool: Some(r.pool_key().clone()),
                    });
                    written.push(r);
                }
                Write::Delete { name, .. } => {
                    if let Some(old) = t.rows.remove(&name) {
                        t.unindex(&old);
                    }
                    changes.push(RowChange { name, pool: None });
                }
            }
        }
        drop(t);
        for change in changes {
            // No subscriber is not an error: nobody keeps rows.
            let _ = self.changes.send(change);
        }
        Ok(written)
    }

    fn changes(&self) -> Option<broadcast::Receiver<RowChange>> {
        Some(self.changes.subscribe())
    }

    async fn renew_lease(
        &self,
        replica: &ReplicaId,
        until: Timestamp,
    ) -> Result<LeaseRenewal, StoreError> {
        Ok(
            match write(&self.tables).leases.insert(replica.clone(), until) {
                Some(_) => LeaseRenewal::Renewed,
                None => LeaseRenewal::Started,
            },
        )
    }

    async fn expired_leases(
        &self,
        cutoff: Timestamp,
    ) -> Result<Vec<(ReplicaId, Timestamp)>, StoreError> {
        let t = read(&self.tables);
        let mut expired: Vec<(ReplicaId, Timestamp)> = t
            .leases
            .iter()
            .filter(|(_, until)| **until < cutoff)
            .map(|(r, until)| (r.clone(), *until))
            .collect();
        expired.sort_by_key(|(r, until)| (*until, r.clone()));
        Ok(expired)
    }

    async fn end_lease(&self, replica: &ReplicaId, until: Timestamp) -> Result<bool, StoreError> {
        let mut t = write(&self.tables);
        if t.leases.get(replica) == Some(&until) {
            t.leases.remove(replica);
            return Ok(true);
        }
        Ok(false)
    }

    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        let mut t = write(&self.tables);
        let mut touched = 0;
        for name in names {
            let Some(old) = t.rows.get(name).cloned() else {
                continue;
            };
            let mut new = old.clone();
            new.last_heartbeat_at = Some(at);
            t.unindex(&old);
            t.index(&new);
            t.rows.insert(name.clone(), new);
            touched += 1;
        }
        Ok(touched)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
