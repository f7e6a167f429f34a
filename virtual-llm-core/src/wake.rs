//! Wake-on-demand (SPEC §12): a request for a pool none of whose rows serves, but one
//! of which sleeps, wakes it and waits in the pool's queue instead of failing.
//!
//! A [`Waker`] asks for a row to be woken: [`ChannelWaker`] sends its publisher a
//! `wake` frame down the bound channel; an embedder adds others (the reference
//! gateway's webhook, for a host whose publisher has no channel while it sleeps).
//! The gateway keeps one wake per row at a time: concurrent requests share it; a wake
//! that failed is not tried again for the wake cooldown, during which requests get 503
//! `wake_failed` at once. The row waking up (its publisher reports `ready`) is what
//! lets the queue drain; nothing polls. A request that read the row before it woke
//! (its registry view, or another replica's, not yet caught up) joins the wake that
//! is over rather than asking again: a row woken at revision `r` is not woken again
//! for a read of it at `r` or before, for the wake wait after it woke. A wake that
//! fails fails the requests waiting for it on every replica, and starts the cooldown
//! on each: the replica its publisher reported the failure to tells the others
//! through the [`TaskRouter`](crate::TaskRouter).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::admission::Admission;
use crate::directory::ChannelDirectory;
use crate::protocol::{GatewayFrame, WakeFrame};
use crate::sync::lock;
use crate::{Error, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, Recipe};

/// Asks for a sleeping row to be woken.
///
/// # Contract
/// - [`can_wake`](Waker::can_wake) says, without waiting, whether this waker can wake
///   `row` as the registry has it; the gateway asks only a waker that can.
/// - [`wake`](Waker::wake) returns once the wake was asked for, not once the row is
///   awake: the row's publisher reports `ready` when it is. An `Err` carries a message
///   for the client (never a secret: no URL with credentials, no token).
/// - It is called at most once per row per wake: the gateway shares a wake between the
///   requests waiting for it.
#[async_trait]
pub trait Waker: fmt::Debug + Send + Sync + 'static {
    /// Whether this waker can wake `row`.
    fn can_wake(&self, row: &LlmRecord) -> bool;

    /// Asks for `row` to be woken.
    async fn wake(&self, row: &LlmRecord) -> Result<(), String>;
}

/// Wakes a hibernating row through its publisher's bound channel: one `wake` frame.
#[derive(Debug)]
pub struct ChannelWaker {
    directory: Arc<dyn ChannelDirectory>,
}

impl ChannelWaker {
    /// Sends through `directory`.
    pub fn new(directory: Arc<dyn ChannelDirectory>) -> Self {
        ChannelWaker { directory }
    }
}

#[async_trait]
impl Waker for ChannelWaker {
    fn can_wake(&self, row: &LlmRecord) -> bool {
        row.status == LlmStatus::Hibernating
            && row.binding.is_some()
            && row.provider_session_id.is_some()
    }

    async fn wake(&self, row: &LlmRecord) -> Result<(), String> {
        let Some(session) = &row.provider_session_id else {
            return Err(format!("{} has no publisher session", row.name));
        };
        let frame = GatewayFrame::Wake(WakeFrame {
            llm: row.name.clone(),
        });
        self.directory.send(session, frame).map_err(|e| {
            format!(
                "the wake could not reach the publisher of {}: {e}",
                row.name
            )
        })
    }
}

/// Several wakers, tried in order: the first that can wake a row wakes it.
#[derive(Debug, Default)]
pub struct Wakers(Vec<Arc<dyn Waker>>);

impl Wakers {
    /// No waker: nothing can be woken.
    pub fn new() -> Self {
        Wakers(Vec::new())
    }

    /// The same, with `waker` tried after the others.
    pub fn with(mut self, waker: Arc<dyn Waker>) -> Self {
        self.0.push(waker);
        self
    }
}

#[async_trait]
impl Waker for Wakers {
    fn can_wake(&self, row: &LlmRecord) -> bool {
        self.0.iter().any(|w| w.can_wake(row))
    }

    async fn wake(&self, row: &LlmRecord) -> Result<(), String> {
        match self.0.iter().find(|w| w.can_wake(row)) {
            Some(waker) => waker.wake(row).await,
            None => Err(format!("nothing can wake {}", row.name)),
        }
    }
}

#[derive(Debug)]
enum WakeState {
    /// Asked at `since`; shared until the row is ready or the wake wait has passed.
    Waking { since: Instant },
    /// Failed; nothing is tried again before `until`.
    Failed { until: Instant, message: String },
    /// Woke at `since`, the row then at `revision` (of the row `id`): a read of it at
    /// that revision or before is out of date, not a row to wake again.
    Woke {
        since: Instant,
        id: LlmId,
        revision: u64,
    },
}

/// The wakes in progress and the recent failures, one per row.
#[derive(Debug)]
pub(crate) struct Wakes {
    state: Mutex<HashMap<LlmName, WakeState>>,
    wait: Duration,
    cooldown: Duration,
}

impl Wakes {
    pub(crate) fn new(wait: Duration, cooldown: Duration) -> Self {
        Wakes {
            state: Mutex::new(HashMap::new()),
            wait,
            cooldown,
        }
    }

    /// Starts the wake of `row`, or joins the one in progress. 503 `wake_failed` while
    /// an earlier failure's cooldown runs, or when asking failed.
    pub(crate) async fn ensure(&self, waker: &dyn Waker, row: &LlmRecord) -> Result<(), Error> {
        let now = Instant::now();
        {
            let mut state = lock(&self.state);
            state.retain(|_, s| match s {
                WakeState::Waking { since } | WakeState::Woke { since, .. } => {
                    now < *since + self.wait
                }
                WakeState::Failed { until, .. } => now < *until,
            });
            match state.get(&row.name) {
                Some(WakeState::Failed { until, message }) => {
                    return Err(Error::WakeFailed {
                        llm: row.name.to_string(),
                        message: message.clone(),
                        retry_after: until.saturating_duration_since(now),
                    });
                }
                Some(WakeState::Waking { .. }) => return Ok(()),
                Some(WakeState::Woke { id, revision, .. })
                    if *id == row.id && row.revision <= *revision =>
                {
                    return Ok(());
                }
                Some(WakeState::Woke { .. }) | None => {
                    state.insert(row.name.clone(), WakeState::Waking { since: now });
                }
            }
        }
        crate::metrics::wake_started();
        tracing::info!(llm = %row.name, "waking a hibernating llm");
        // Asking is bounded like the wait it starts: a webhook or command that hangs
        // fails the wake rather than holding the request.
        let asked = match tokio::time::timeout(self.wait, waker.wake(row)).await {
            Ok(asked) => asked,
            Err(_) => Err(format!(
                "asking for the wake took longer than {}s",
                self.wait.as_secs_f64()
            )),
        };
        match asked {
            Ok(()) => Ok(()),
            Err(message) => {
                self.failed(&row.name, message.clone());
                Err(Error::WakeFailed {
                    llm: row.name.to_string(),
                    message,
                    retry_after: self.cooldown,
                })
            }
        }
    }

    /// `row` reported ready: its wake, if one ran, is over. Requests that read the row
    /// at its revision or before join that wake rather than asking again.
    pub(crate) fn woke(&self, row: &LlmRecord) {
        let mut state = lock(&self.state);
        if let Some(WakeState::Waking { since }) = state.get(&row.name) {
            crate::metrics::woke(since.elapsed());
            state.insert(
                row.name.clone(),
                WakeState::Woke {
                    since: Instant::now(),
                    id: row.id.clone(),
                    revision: row.revision,
                },
            );
        }
    }

    /// The wake of the row `llm`, of the pool `pool`, failed with `message` (its
    /// publisher said so here, or a peer heard it): the cooldown of its wakes starts,
    /// and the requests waiting in the pool's queue fail with 503 `wake_failed`.
    /// Returns how many.
    pub(crate) fn fail(
        &self,
        admission: &dyn Admission,
        llm: &LlmName,
        pool: &LlmName,
        message: &str,
    ) -> usize {
        self.failed(llm, message.to_owned());
        let failed = admission.fail_waiters(pool, &|| Error::WakeFailed {
            llm: llm.to_string(),
            message: message.to_owned(),
            retry_after: self.cooldown,
        });
        tracing::info!(%llm, requests = failed, "a wake failed; its waiters are told");
        failed
    }

    /// `name`'s wake failed with `message`: recorded for the cooldown.
    pub(crate) fn failed(&self, name: &LlmName, message: String) {
        crate::metrics::wake_failed();
        tracing::warn!(llm = %name, %message, "a wake failed");
        let until = Instant::now() + self.cooldown;
        lock(&self.state).insert(name.clone(), WakeState::Failed { until, message });
    }
}

/// What a [`RecipeWaker`] entry wakes: one row, or every row of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WakeTarget {
    /// The row of this name.
    Llm(LlmName),
    /// The rows of this pool key.
    Pool(LlmName),
}

impl WakeTarget {
    fn matches(&self, row: &LlmRecord) -> bool {
        match self {
            WakeTarget::Llm(name) => row.name == *name,
            WakeTarget::Pool(key) => row.pool_key() == key,
        }
    }
}

/// Wakes a row whose publisher has no channel by running a [`Recipe`]: a webhook (a
/// Wake-on-LAN relay, a cloud API), for a host whose publisher sleeps with it. The
/// request then waits for the publisher to connect and report its model ready. The
/// first entry whose target matches a row wakes it.
#[derive(Debug, Default)]
pub struct RecipeWaker {
    entries: Vec<(WakeTarget, Arc<dyn Recipe>)>,
}

impl RecipeWaker {
    /// No entry: wakes nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same, waking `target` with `recipe`.
    pub fn with(mut self, target: WakeTarget, recipe: Arc<dyn Recipe>) -> Self {
        self.entries.push((target, recipe));
        self
    }

    fn recipe(&self, row: &LlmRecord) -> Option<&Arc<dyn Recipe>> {
        self.entries
            .iter()
            .find(|(target, _)| target.matches(row))
            .map(|(_, recipe)| recipe)
    }
}

#[async_trait]
impl Waker for RecipeWaker {
    fn can_wake(&self, row: &LlmRecord) -> bool {
        row.kind == LlmKind::Virtual && row.binding.is_none() && self.recipe(row).is_some()
    }

    async fn wake(&self, row: &LlmRecord) -> Result<(), String> {
        match self.recipe(row) {
            Some(recipe) => recipe.run().await,
            None => Err(format!("no wake is configured for {}", row.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::testkit::record;

    /// Counts the wakes it is asked for.
    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl Waker for Counting {
        fn can_wake(&self, _row: &LlmRecord) -> bool {
            true
        }

        async fn wake(&self, _row: &LlmRecord) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn at(row: &LlmRecord, revision: u64) -> LlmRecord {
        LlmRecord {
            revision,
            ..row.clone()
        }
    }

    /// The two-replica wake test's flake: a request that read the sleeping row before
    /// the ready report reached this replica asked for a second wake of a row that
    /// had just woken.
    #[tokio::test(start_paused = true)]
    async fn a_read_from_before_the_row_woke_joins_the_wake_instead_of_asking_again() {
        let wakes = Wakes::new(Duration::from_secs(10), Duration::from_secs(5));
        let waker = Counting::default();
        let asleep = at(&record("far-away"), 3);
        wakes.ensure(&waker, &asleep).await.unwrap();
        wakes.ensure(&waker, &asleep).await.unwrap();
        assert_eq!(waker.0.load(Ordering::SeqCst), 1, "shared while waking");

        // Ready, as the registry has it now (bound, active: revision 5).
        wakes.woke(&at(&asleep, 5));
        // A request still holding the read at revision 3 (or 5) joins: no new wake.
        wakes.ensure(&waker, &asleep).await.unwrap();
        wakes.ensure(&waker, &at(&asleep, 5)).await.unwrap();
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            1,
            "an out-of-date read asked again"
        );

        // Asleep again since (a later revision): woken again.
        wakes.ensure(&waker, &at(&asleep, 6)).await.unwrap();
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            2,
            "a row that slept again is woken"
        );

        // Another row of the same name (deleted and registered again): woken.
        wakes.woke(&at(&asleep, 7));
        wakes
            .ensure(&waker, &at(&record("far-away"), 1))
            .await
            .unwrap();
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            3,
            "a new row of the name is woken"
        );

        // The memory of a wake lasts the wake wait.
        wakes.woke(&at(&asleep, 9));
        tokio::time::advance(Duration::from_secs(11)).await;
        wakes.ensure(&waker, &at(&asleep, 9)).await.unwrap();
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            4,
            "remembered past the wake wait"
        );
    }
}
