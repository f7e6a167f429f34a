//! The registry view: the rows the router reads on every request, kept in memory.
//!
//! Routing a request reads the rows of its pool. Read from the store every time, that
//! is a B-tree lookup and a decode per member on redb, and would be a network round
//! trip on a database. The view keeps what it read and reads again only when what it
//! holds may be wrong:
//!
//! - **This process wrote one of the rows.** Every registry write of the gateway goes
//!   through the lifecycle, which tells the view ([`RegistryView::invalidate`],
//!   [`RegistryView::forget`]) right after the store committed it: the next request
//!   reads the rows again. A read that was under way while a write landed does not
//!   keep its (possibly older) rows.
//! - **A dispatch to one of its rows failed** (the channel went away, say): the relay
//!   invalidates the row, so the next request sees the registry as it is now.
//! - **The store's change feed says a row changed** ([`Store::changes`], for a store
//!   several gateways share): another gateway's write reaches this one's next
//!   request. A feed that fell behind makes the view forget everything.
//! - **It is older than `registryStaleness`** (default 1 s): writes by another gateway
//!   through a store without a feed reach this one within that bound.
//!
//! A feed that fell behind or was lost (the database restarted) makes everything the
//! view holds stale at once: each entry is read again before it is used. When that
//! read fails (the store is unreachable), the view answers with the rows it read
//! last rather than fail the request: routing goes on from the last known registry
//! while the store is away, and every write still fails clearly there. A row that
//! changed meanwhile (its publisher gone) fails its dispatch as it would have.
//!
//! The store stays the authority for every write; nothing here is ever written back.
//!
//! Memory is bounded by the registry: the view holds the rows of pools and rows that
//! exist, and at most [`MAX_ABSENT`] names it found empty, so a client asking for
//! names that do not exist cannot grow it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::time::Instant;

use crate::sync::lock;
use crate::{LlmName, LlmRecord, RowChange, Store, StoreError};

/// The most pool keys found empty that the view remembers; past it, it forgets them
/// all and starts again.
pub const MAX_ABSENT: usize = 4096;

/// What the router reads: a pool's members and single rows, from memory while they
/// are fresh, else from the [`Store`]. Cheap to share: the gateway holds one.
pub struct RegistryView {
    store: Arc<dyn Store>,
    staleness: Duration,
    state: Mutex<State>,
}

/// One read kept, and when it started.
struct Kept<T> {
    value: T,
    read_at: Instant,
}

#[derive(Default)]
struct State {
    /// Bumped by every invalidation: a read that started before it must not be kept.
    generation: u64,
    /// The members of pools that have some, by pool key.
    pools: HashMap<LlmName, Kept<Arc<[LlmRecord]>>>,
    /// Pool keys with no members (a name that is only a member's, or nothing's).
    absent: HashMap<LlmName, Instant>,
    /// Single rows, by name.
    rows: HashMap<LlmName, Kept<LlmRecord>>,
    /// Which kept pool each row sits in, to drop it when the row moves or goes.
    homes: HashMap<LlmName, LlmName>,
    /// The store's change feed, if it has one.
    feed: Option<broadcast::Receiver<RowChange>>,
    /// Entries read before this are stale, whatever their age (the feed was lost):
    /// read again before use, kept for when that read fails.
    stale_before: Option<Instant>,
}

impl State {
    /// Applies what the change feed reported since the last look.
    fn catch_up(&mut self) {
        while let Some(feed) = &mut self.feed {
            match feed.try_recv() {
                Ok(change) => match change.pool {
                    Some(pool) => self.changed(&change.name, &pool),
                    None => self.deleted(&change.name),
                },
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Lagged(_)) => self.forget_all(),
                Err(TryRecvError::Closed) => {
                    self.feed = None;
                    self.forget_all();
                }
            }
        }
    }

    /// Anything may have changed: every entry is stale (kept only for a store that
    /// cannot be read), and names found empty are forgotten.
    fn forget_all(&mut self) {
        self.generation += 1;
        self.stale_before = Some(Instant::now());
        self.absent.clear();
    }

    /// Whether an entry read at `read_at` was read since the last [`forget_all`].
    ///
    /// [`forget_all`]: State::forget_all
    fn current(&self, read_at: Instant) -> bool {
        self.stale_before.is_none_or(|t| read_at > t)
    }

    /// The row `name`, in the pool `key` now, was written.
    fn changed(&mut self, name: &LlmName, key: &LlmName) {
        self.generation += 1;
        self.absent.remove(key);
        self.absent.remove(name);
        self.drop_pool(key);
        if let Some(home) = self.homes.get(name).cloned() {
            self.drop_pool(&home);
        }
        self.rows.remove(name);
    }

    /// The row `name` was deleted.
    fn deleted(&mut self, name: &LlmName) {
        self.generation += 1;
        if let Some(home) = self.homes.get(name).cloned() {
            self.drop_pool(&home);
        }
        self.rows.remove(name);
    }

    fn drop_pool(&mut self, key: &LlmName) {
        if let Some(kept) = self.pools.remove(key) {
            for row in kept.value.iter() {
                if self.homes.get(&row.name) == Some(key) {
                    self.homes.remove(&row.name);
                }
            }
        }
    }
}

impl fmt::Debug for RegistryView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("RegistryView")
            .field("staleness", &self.staleness)
            .field("pools", &state.pools.len())
            .field("rows", &state.rows.len())
            .finish_non_exhaustive()
    }
}

impl RegistryView {
    /// A view over `store` that reads a kept entry again once it is `staleness` old
    /// (`Duration::ZERO`: reads the store every time).
    pub fn new(store: Arc<dyn Store>, staleness: Duration) -> Self {
        let state = State {
            feed: store.changes(),
            ..State::default()
        };
        RegistryView {
            store,
            staleness,
            state: Mutex::new(state),
        }
    }

    /// The store the view reads.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    fn fresh(&self, state: &State, read_at: Instant, now: Instant) -> bool {
        state.current(read_at) && now.saturating_duration_since(read_at) < self.staleness
    }

    /// The members of the pool `key` (rows whose [`pool_key`](LlmRecord::pool_key) is
    /// `key`), in any status; `None` when it has none.
    pub async fn pool(&self, key: &LlmName) -> Result<Option<Arc<[LlmRecord]>>, StoreError> {
        let now = Instant::now();
        let generation = {
            let mut state = lock(&self.state);
            state.catch_up();
            let state = &*state;
            if let Some(kept) = state
                .pools
                .get(key)
                .filter(|k| self.fresh(state, k.read_at, now))
            {
                return Ok(Some(kept.value.clone()));
            }
            if state
                .absent
                .get(key)
                .is_some_and(|at| self.fresh(state, *at, now))
            {
                return Ok(None);
            }
            state.generation
        };
        let rows = match self.store.by_pool(key).await {
            Ok(rows) => rows,
            Err(e) => {
                let kept = lock(&self.state).pools.get(key).map(|k| k.value.clone());
                return match kept {
                    Some(rows) => {
                        tracing::debug!(pool = %key, error = %e, "store unreadable: routing from the rows read last");
                        Ok(Some(rows))
                    }
                    None => Err(e),
                };
            }
        };
        let mut state = lock(&self.state);
        state.catch_up();
        let keep = state.generation == generation && !self.staleness.is_zero();
        if rows.is_empty() {
            state.drop_pool(key);
            if keep {
                if state.absent.len() >= MAX_ABSENT {
                    state.absent.clear();
                }
                state.absent.insert(key.clone(), now);
            }
            return Ok(None);
        }
        let rows: Arc<[LlmRecord]> = rows.into();
        if keep {
            state.drop_pool(key);
            for row in rows.iter() {
                state.homes.insert(row.name.clone(), key.clone());
            }
            state.pools.insert(
                key.clone(),
                Kept {
                    value: rows.clone(),
                    read_at: now,
                },
            );
        }
        Ok(Some(rows))
    }

    /// The row named `name`.
    pub async fn row(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        let now = Instant::now();
        let generation = {
            let mut state = lock(&self.state);
            state.catch_up();
            let state = &*state;
            if let Some(kept) = state
                .rows
                .get(name)
                .filter(|k| self.fresh(state, k.read_at, now))
            {
                return Ok(Some(kept.value.clone()));
            }
            state.generation
        };
        let row = match self.store.get(name).await {
            Ok(row) => row,
            Err(e) => {
                let kept = lock(&self.state).rows.get(name).map(|k| k.value.clone());
                return match kept {
                    Some(row) => {
                        tracing::debug!(llm = %name, error = %e, "store unreadable: routing from the row read last");
                        Ok(Some(row))
                    }
                    None => Err(e),
                };
            }
        };
        if row.is_none() {
            lock(&self.state).rows.remove(name);
        }
        if let Some(row) = &row {
            let mut state = lock(&self.state);
            state.catch_up();
            if state.generation == generation && !self.staleness.is_zero() {
                state.rows.insert(
                    name.clone(),
                    Kept {
                        value: row.clone(),
                        read_at: now,
                    },
                );
            }
        }
        Ok(row)
    }

    /// `row` was written (inserted or changed): drops what the view holds of it, of
    /// the pool it is in now and of the pool it was in.
    pub fn invalidate(&self, row: &LlmRecord) {
        lock(&self.state).changed(&row.name, row.pool_key());
    }

    /// The row `name` was deleted: drops what the view holds of it and of its pool.
    pub fn forget(&self, name: &LlmName) {
        lock(&self.state).deleted(name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn names_found_empty_are_bounded() {
        let view = RegistryView::new(Arc::new(MemoryStore::new()), Duration::from_secs(60));
        for i in 0..MAX_ABSENT + 10 {
            let key = LlmName::parse(&format!("nothing-{i}")).unwrap();
            assert!(view.pool(&key).await.unwrap().is_none());
            assert!(lock(&view.state).absent.len() <= MAX_ABSENT);
        }
        assert_eq!(
            lock(&view.state).absent.len(),
            10,
            "forgotten, then 10 again"
        );
    }
}
