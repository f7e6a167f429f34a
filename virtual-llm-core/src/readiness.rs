//! What a publisher knows of its upstreams (SPEC §12): whether each published LLM's
//! upstream can answer (`ready`, `asleep` or `unavailable`), found out by probing its
//! [`Provider`]; waking one when the gateway sends `wake`, with its wake recipe and
//! then a probe every second until it answers or its ready timeout passes; and putting
//! one to sleep with its sleep recipe once it has been idle for its `idle_after`.
//!
//! The publisher's driver holds one [`Upstreams`] for its whole life, across
//! reconnects: an LLM put to sleep stays asleep through a reconnect, and a wake that
//! outlives its channel still finishes. The driver asks it for the states to register
//! and heartbeat with, and heartbeats at once when [`Upstreams::changed`] fires (a
//! state changed, or a wake ended). Wakes and sleeps run in tasks of their own, so
//! neither the frame reader nor the heartbeats ever wait for a recipe.
//!
//! The state of an LLM:
//! - probed (before each register and every heartbeat): `ready` when the probe
//!   passes, else `asleep` when it has a wake recipe, else `unavailable`;
//! - not probed while a wake or a sleep runs, nor once this publisher put it to sleep:
//!   an upstream in vLLM's sleep mode still lists its models, so only a wake makes it
//!   `ready` again;
//! - a wake first probes (an LLM that already answers needs no recipe, unless this
//!   publisher put it to sleep), then runs the recipe and probes every second; it ends
//!   `ready`, or `asleep` with the failure reported once as `wakeFailed`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::protocol::{LlmSpec, LlmState, UpstreamState};
use crate::publisher::PublishedLlm;
use crate::recipe::Recipe;
use crate::sync::lock;
use crate::{LlmName, Provider};

/// How long a probe may take before it counts as "not ready".
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waking upstream is probed.
const WAKE_PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest `wakeFailed` message sent, in characters.
const MAX_WAKE_FAILED: usize = 512;

/// The upstreams of one publisher.
pub(crate) struct Upstreams {
    /// In the order they were published: heartbeats list them so.
    llms: Vec<Arc<Upstream>>,
    by_name: HashMap<LlmName, Arc<Upstream>>,
    /// A state changed or a wake ended: heartbeat now.
    changed: Notify,
    /// A task started or ended, or a state changed: the idle deadlines moved.
    activity: Notify,
    /// Running wakes and sleeps, aborted when the publisher stops.
    background: Mutex<Vec<AbortHandle>>,
}

/// One published LLM's upstream.
struct Upstream {
    name: LlmName,
    provider: Arc<dyn Provider>,
    wake: Option<Arc<dyn Recipe>>,
    sleep: Option<Arc<dyn Recipe>>,
    idle_after: Option<Duration>,
    ready_timeout: Duration,
    life: Mutex<Life>,
    /// Held while a recipe of this LLM runs: a wake that arrives during a sleep waits
    /// for it to end.
    recipes: tokio::sync::Mutex<()>,
}

/// Where an upstream is; changed under its lock, never held across an await.
struct Life {
    /// As last found out, and reported.
    state: UpstreamState,
    /// Whether `state` was found out at all, or is the guess it starts with.
    known: bool,
    /// A wake is under way (from the frame to its outcome).
    waking: bool,
    /// A sleep is under way (from the idle deadline to its outcome).
    sleeping: bool,
    /// This publisher put it to sleep: probes do not make it ready, a wake does.
    slept: bool,
    /// Its tasks started and not yet ended.
    running: usize,
    /// When a task last started or ended, or it last became ready.
    last_active: Instant,
    /// Why the last wake failed, until a heartbeat carried it.
    wake_failed: Option<String>,
}

/// What the idle check found for one LLM.
enum Idle {
    /// Nothing to do: no idle timer, busy, not ready, or already asleep.
    Never,
    /// It falls asleep at this instant unless a task comes.
    At(Instant),
    /// Its time has come; it is now marked as going to sleep.
    Due,
}

impl Upstream {
    fn life(&self) -> MutexGuard<'_, Life> {
        lock(&self.life)
    }

    /// Records `state`; true when it changed.
    fn set_state(&self, life: &mut Life, state: UpstreamState) -> bool {
        let changed = life.state != state;
        if !life.known {
            life.known = true;
            tracing::info!(llm = %self.name, state = state.as_str(), "upstream state");
        } else if changed {
            tracing::info!(llm = %self.name, state = state.as_str(), was = life.state.as_str(), "upstream state changed");
        }
        if !changed {
            return false;
        }
        if state == UpstreamState::Ready {
            life.last_active = Instant::now();
        }
        life.state = state;
        true
    }

    /// What a probe result says the state is.
    fn probed_state(&self, ready: bool) -> UpstreamState {
        if ready {
            UpstreamState::Ready
        } else if self.wake.is_some() {
            UpstreamState::Asleep
        } else {
            UpstreamState::Unavailable
        }
    }

    /// Whether a probe may change the state now.
    fn probe_decides(life: &Life) -> bool {
        !(life.waking || life.sleeping || life.slept)
    }

    async fn probe(&self) -> bool {
        tokio::time::timeout(PROBE_TIMEOUT, self.provider.probe())
            .await
            .unwrap_or_else(|_| {
                tracing::debug!(llm = %self.name, "probe timed out");
                false
            })
    }

    fn idle(&self, now: Instant) -> Idle {
        let Some(idle_after) = self.idle_after else {
            return Idle::Never;
        };
        let mut life = self.life();
        if life.state != UpstreamState::Ready || life.running > 0 || !Self::probe_decides(&life) {
            return Idle::Never;
        }
        // An idle time past the end of time never comes.
        let Some(at) = life.last_active.checked_add(idle_after) else {
            return Idle::Never;
        };
        if at > now {
            return Idle::At(at);
        }
        life.sleeping = true;
        Idle::Due
    }

    /// Runs the wake recipe, then probes every second until the upstream answers; all
    /// of it within the ready timeout.
    async fn wake_until_ready(&self, recipe: &dyn Recipe) -> Result<(), String> {
        let mut recipe_done = false;
        let attempt = async {
            recipe.run().await?;
            recipe_done = true;
            let mut every = tokio::time::interval(WAKE_PROBE_EVERY);
            every.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if self.probe().await {
                    return Ok(());
                }
            }
        };
        let outcome = tokio::time::timeout(self.ready_timeout, attempt).await;
        let within = humantime::format_duration(self.ready_timeout);
        match outcome {
            Ok(outcome) => outcome,
            Err(_) if recipe_done => Err(format!("not ready within {within}")),
            Err(_) => Err(format!("the wake recipe did not finish within {within}")),
        }
    }
}

/// A task of an LLM, from its start to its end: the LLM is not idle meanwhile.
pub(crate) struct Busy {
    upstreams: Arc<Upstreams>,
    llm: Arc<Upstream>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut life = self.llm.life();
            life.running = life.running.saturating_sub(1);
            life.last_active = Instant::now();
        }
        self.upstreams.activity.notify_one();
    }
}

impl Upstreams {
    /// The upstreams of `llms`, all taken as ready until the first probe.
    pub(crate) fn new(llms: &[PublishedLlm]) -> Arc<Self> {
        let now = Instant::now();
        let llms: Vec<Arc<Upstream>> = llms
            .iter()
            .map(|l| {
                Arc::new(Upstream {
                    name: l.spec.name.clone(),
                    provider: l.provider.clone(),
                    wake: l.wake.clone(),
                    sleep: l.sleep.clone(),
                    idle_after: l.idle_after,
                    ready_timeout: l.ready_timeout,
                    life: Mutex::new(Life {
                        state: UpstreamState::Ready,
                        known: false,
                        waking: false,
                        sleeping: false,
                        slept: false,
                        running: 0,
                        last_active: now,
                        wake_failed: None,
                    }),
                    recipes: tokio::sync::Mutex::new(()),
                })
            })
            .collect();
        Arc::new(Upstreams {
            by_name: llms.iter().map(|l| (l.name.clone(), l.clone())).collect(),
            llms,
            changed: Notify::new(),
            activity: Notify::new(),
            background: Mutex::new(Vec::new()),
        })
    }

    /// Resolves when a heartbeat should go at once: a state changed or a wake ended
    /// since the last time this resolved.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Probes every upstream whose state a probe decides, all at once, and records
    /// what they say.
    pub(crate) async fn probe_all(&self) {
        let probing = self
            .llms
            .iter()
            .filter(|l| Upstream::probe_decides(&l.life()))
            .map(|l| async move { (l, l.probe().await) });
        let mut changed = false;
        for (llm, ready) in futures::future::join_all(probing).await {
            let mut life = llm.life();
            // A wake or a sleep that started while it was probed decides instead.
            if Upstream::probe_decides(&life) {
                changed |= llm.set_state(&mut life, llm.probed_state(ready));
            }
        }
        if changed {
            self.activity.notify_one();
        }
    }

    /// `specs` with each LLM's current state, for a register. A wake failure not yet
    /// reported is dropped: it was for the previous connection's waiters.
    pub(crate) fn register_specs(&self, specs: &[LlmSpec]) -> Vec<LlmSpec> {
        specs
            .iter()
            .map(|spec| {
                let mut spec = spec.clone();
                if let Some(llm) = self.by_name.get(&spec.name) {
                    let mut life = llm.life();
                    life.wake_failed = None;
                    spec.state = Some(life.state);
                }
                spec
            })
            .collect()
    }

    /// Every LLM's state for a heartbeat, with the wake failures not yet reported
    /// (taken: give them back with [`Upstreams::unsent`] if the heartbeat fails).
    pub(crate) fn report(&self) -> Vec<LlmState> {
        self.llms
            .iter()
            .map(|l| {
                let mut life = l.life();
                LlmState {
                    name: l.name.clone(),
                    state: life.state,
                    wake_failed: life.wake_failed.take(),
                }
            })
            .collect()
    }

    /// A report that did not reach the gateway: its wake failures are reported again
    /// with the next heartbeat, unless a newer wake has begun or ended since.
    pub(crate) fn unsent(&self, report: Vec<LlmState>) {
        for state in report {
            let (Some(message), Some(llm)) = (state.wake_failed, self.by_name.get(&state.name))
            else {
                continue;
            };
            let mut life = llm.life();
            if life.wake_failed.is_none() && !life.waking {
                life.wake_failed = Some(message);
            }
        }
    }

    /// Marks a task of `llm` as running until the returned guard is dropped; `None`
    /// for an LLM this publisher does not serve.
    pub(crate) fn busy(self: &Arc<Self>, llm: &LlmName) -> Option<Busy> {
        let llm = self.by_name.get(llm)?.clone();
        {
            let mut life = llm.life();
            life.running += 1;
            life.last_active = Instant::now();
        }
        self.activity.notify_one();
        Some(Busy {
            upstreams: self.clone(),
            llm,
        })
    }

    /// The gateway's `wake` frame: wakes `name` in a task of its own, unless a wake of
    /// it is under way already (one recipe run however many frames come).
    pub(crate) fn wake(self: &Arc<Self>, name: &LlmName) {
        let Some(llm) = self.by_name.get(name).cloned() else {
            tracing::debug!(llm = %name, "wake for an llm this publisher does not serve; ignored");
            return;
        };
        {
            let mut life = llm.life();
            if life.waking {
                tracing::debug!(llm = %name, "already waking");
                return;
            }
            life.waking = true;
        }
        tracing::info!(llm = %name, "the gateway asks to wake it");
        let upstreams = self.clone();
        self.spawn(async move { upstreams.run_wake(llm).await });
    }

    async fn run_wake(&self, llm: Arc<Upstream>) {
        let _one_recipe_at_a_time = llm.recipes.lock().await;
        let slept = llm.life().slept;
        let outcome = if !slept && llm.probe().await {
            Ok(())
        } else {
            match &llm.wake {
                Some(recipe) => llm.wake_until_ready(recipe.as_ref()).await,
                None => Err("no wake recipe".to_owned()),
            }
        };
        {
            let mut life = llm.life();
            life.waking = false;
            match outcome {
                Ok(()) => {
                    tracing::info!(llm = %llm.name, "awake");
                    life.slept = false;
                    llm.set_state(&mut life, UpstreamState::Ready);
                    life.last_active = Instant::now();
                }
                Err(message) => {
                    tracing::warn!(llm = %llm.name, error = %message, "wake failed");
                    if llm.wake.is_some() {
                        llm.set_state(&mut life, UpstreamState::Asleep);
                    }
                    life.wake_failed = Some(crate::error::bounded(message, MAX_WAKE_FAILED));
                }
            }
        }
        // The gateway's waiters hear the outcome now, whether or not the state changed.
        self.changed.notify_one();
        self.activity.notify_one();
    }

    /// Whether any LLM has an idle timer: [`Upstreams::put_idle_to_sleep`] has work.
    pub(crate) fn sleep_when_idle(&self) -> bool {
        self.llms.iter().any(|l| l.idle_after.is_some())
    }

    /// Puts each LLM to sleep once it has been ready and idle for its `idle_after`;
    /// runs until the publisher stops.
    pub(crate) async fn put_idle_to_sleep(self: Arc<Self>) {
        loop {
            let activity = self.activity.notified();
            tokio::pin!(activity);
            // Registered before the deadlines are read: no activity is missed.
            activity.as_mut().enable();
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for llm in &self.llms {
                match llm.idle(now) {
                    Idle::Never => {}
                    Idle::At(at) => next = Some(next.map_or(at, |n| n.min(at))),
                    Idle::Due => {
                        let upstreams = self.clone();
                        let llm = llm.clone();
                        self.spawn(async move { upstreams.run_sleep(llm).await });
                    }
                }
            }
            match next {
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = &mut activity => {}
                },
                None => activity.await,
            }
        }
    }

    async fn run_sleep(&self, llm: Arc<Upstream>) {
        let _one_recipe_at_a_time = llm.recipes.lock().await;
        {
            let mut life = llm.life();
            if life.running > 0 || life.waking {
                // A task or a wake came while the recipe lock was awaited.
                life.sleeping = false;
                drop(life);
                self.activity.notify_one();
                return;
            }
        }
        let outcome = match &llm.sleep {
            Some(recipe) => tokio::time::timeout(llm.ready_timeout, recipe.run())
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "did not finish within {}",
                        humantime::format_duration(llm.ready_timeout)
                    ))
                }),
            None => Ok(()),
        };
        let changed = {
            let mut life = llm.life();
            life.sleeping = false;
            match outcome {
                Ok(()) => {
                    tracing::info!(llm = %llm.name, "idle: put to sleep");
                    life.slept = true;
                    llm.set_state(&mut life, UpstreamState::Asleep)
                }
                Err(message) => {
                    tracing::warn!(llm = %llm.name, error = %message, "the sleep recipe failed; the llm stays ready");
                    life.last_active = Instant::now();
                    false
                }
            }
        };
        if changed {
            self.changed.notify_one();
        }
        self.activity.notify_one();
    }

    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(work).abort_handle();
        let mut background = lock(&self.background);
        background.retain(|h| !h.is_finished());
        background.push(handle);
    }

    /// Aborts the wakes and sleeps under way (their commands are killed).
    pub(crate) fn stop(&self) {
        for handle in lock(&self.background).drain(..) {
            handle.abort();
        }
    }
}
