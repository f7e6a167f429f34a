//! [`FailingStore`]: a [`Store`] wrapper that fails on demand, for fault-injection tests
//! (in the spirit of redb's `FailingBackend`).
//!
//! Three atomic switches fail reads, writes and heartbeat touches independently; each
//! injected failure is a [`StoreError::Unavailable`] raised *before* the wrapped store
//! is called, so a failed write writes nothing, as the [`Store`] contract demands.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;

use crate::{LlmName, LlmRecord, ReplicaId, SessionId, Store, StoreError, Timestamp, Write};

/// Wraps any store and fails its calls while a switch is on.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use virtual_llm_core::testkit::{FailingStore, record};
/// use virtual_llm_core::{MemoryStore, Store, Write};
///
/// let store = FailingStore::new(Arc::new(MemoryStore::new()));
/// store.fail_writes(true);
/// assert!(store.write(vec![Write::Insert(record("a"))]).await.is_err());
/// store.fail_writes(false);
/// assert!(store.list().await.unwrap().is_empty(), "the failed write wrote nothing");
/// assert_eq!(store.injected(), 1);
/// # });
/// ```
pub struct FailingStore {
    inner: Arc<dyn Store>,
    reads: AtomicBool,
    writes: AtomicBool,
    touches: AtomicBool,
    injected: AtomicU64,
}

impl fmt::Debug for FailingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailingStore")
            .field("inner", &self.inner)
            .field("reads", &self.reads.load(Ordering::SeqCst))
            .field("writes", &self.writes.load(Ordering::SeqCst))
            .field("touches", &self.touches.load(Ordering::SeqCst))
            .field("injected", &self.injected())
            .finish()
    }
}

impl FailingStore {
    /// `inner`, with every switch off: calls pass through until a test turns one on.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FailingStore {
            inner,
            reads: AtomicBool::new(false),
            writes: AtomicBool::new(false),
            touches: AtomicBool::new(false),
            injected: AtomicU64::new(0),
        }
    }

    /// While on, `get`, `list`, `by_session`, `stale_virtuals` and `expired_inactives`
    /// fail.
    pub fn fail_reads(&self, on: bool) {
        self.reads.store(on, Ordering::SeqCst);
    }

    /// While on, `write` and `flush` fail, writing nothing.
    pub fn fail_writes(&self, on: bool) {
        self.writes.store(on, Ordering::SeqCst);
    }

    /// While on, `touch` (heartbeats) fails.
    pub fn fail_touches(&self, on: bool) {
        self.touches.store(on, Ordering::SeqCst);
    }

    /// How many calls have been failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// The wrapped store, to look behind the switches.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn check(&self, switch: &AtomicBool, what: &str) -> Result<(), StoreError> {
        if !switch.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        Err(StoreError::Unavailable {
            source: format!("injected {what} failure").into(),
        })
    }
}

#[async_trait]
impl Store for FailingStore {
    async fn get(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.get(name).await
    }

    async fn renew_lease(
        &self,
        replica: &ReplicaId,
        until: Timestamp,
    ) -> Result<crate::LeaseRenewal, StoreError> {
        self.check(&self.writes, "write")?;
        self.inner.renew_lease(replica, until).await
    }

    async fn expired_leases(
        &self,
        cutoff: Timestamp,
    ) -> Result<Vec<(ReplicaId, Timestamp)>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.expired_leases(cutoff).await
    }

    async fn end_lease(&self, replica: &ReplicaId, until: Timestamp) -> Result<bool, StoreError> {
        self.check(&self.writes, "write")?;
        self.inner.end_lease(replica, until).await
    }

    async fn get_ignoring_case(&self, name: &LlmName) -> Result<Option<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.get_ignoring_case(name).await
    }

    async fn list(&self) -> Result<Vec<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.list().await
    }

    async fn by_session(&self, session: &SessionId) -> Result<Vec<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.by_session(session).await
    }

    async fn bound_to(&self, replica: &ReplicaId) -> Result<Vec<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.bound_to(replica).await
    }

    async fn stale_virtuals(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.stale_virtuals(cutoff).await
    }

    async fn expired_inactives(&self, cutoff: Timestamp) -> Result<Vec<LlmRecord>, StoreError> {
        self.check(&self.reads, "read")?;
        self.inner.expired_inactives(cutoff).await
    }

    async fn write(&self, batch: Vec<Write>) -> Result<Vec<LlmRecord>, StoreError> {
        self.check(&self.writes, "write")?;
        self.inner.write(batch).await
    }

    async fn touch(&self, names: &[LlmName], at: Timestamp) -> Result<usize, StoreError> {
        self.check(&self.touches, "touch")?;
        self.inner.touch(names, at).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.check(&self.writes, "flush")?;
        self.inner.flush().await
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<crate::RowChange>> {
        self.inner.changes()
    }
}
