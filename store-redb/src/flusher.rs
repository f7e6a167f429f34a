//! The background flusher: writes coalesced heartbeats to disk on a timer, and when
//! the overlay fills up, until its [`FlusherGuard`] is dropped.
//!
//! A timer rather than "every N heartbeats": it bounds how much liveness a crash can
//! lose by time (what the stale timeout is measured in) whatever the load, and a quiet
//! gateway's last heartbeats still reach the disk. The overlay's size limit wakes it
//! early, which bounds memory and the size of one flush under a burst. The loop is the
//! `select!{ sleep_until(next), notified() }` of the core's GC, owned by a drop guard
//! (mini-redis' `DbDropGuard`); it runs on tokio time, so tests drive it with
//! `tokio::time::pause` and `advance`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

use crate::shared::{Inner, blocking};

/// Owns the flusher task; dropping it stops the task, which flushes one last time.
#[derive(Debug)]
pub(crate) struct FlusherGuard {
    stop: Arc<Notify>,
}

impl FlusherGuard {
    /// Asks the flusher to stop after its last flush.
    pub(crate) fn stop(&self) {
        // notify_one stores a permit, so the loop sees it even between two waits.
        self.stop.notify_one();
    }
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the flusher on the current tokio runtime.
pub(crate) fn spawn(inner: Arc<Inner>, every: Duration) -> FlusherGuard {
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut next = Instant::now() + every;
        loop {
            tokio::select! {
                () = sleep_until(next) => {}
                () = inner.wake.notified() => {}
                () = stopped.notified() => break,
            }
            if let Err(e) = blocking(inner.clone(), |i| i.flush_pending()).await {
                tracing::warn!(error = %e, "flushing heartbeats failed; retrying on the next tick");
            }
            next = Instant::now() + every;
        }
        // The last flush, and the release of the file, happen off the async threads:
        // the task may hold the last reference to the store.
        if let Err(e) = blocking(inner, |i| i.flush_pending()).await {
            tracing::warn!(error = %e, "the last heartbeat flush failed");
        }
    });
    FlusherGuard { stop }
}
