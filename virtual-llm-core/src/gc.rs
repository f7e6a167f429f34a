//! The background GC: a task that runs [`Gateway::sweep`] every `gc_every`, owned by a
//! [`GcGuard`] that stops it when dropped (mini-redis' `DbDropGuard` pattern).

use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::Gateway;

/// Owns the GC task; dropping it stops the task.
#[derive(Debug)]
pub struct GcGuard {
    stop: Arc<Notify>,
    task: Option<JoinHandle<()>>,
}

impl GcGuard {
    /// Stops the GC and waits until it has stopped (a sweep in progress finishes).
    pub async fn shutdown(mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "GC task ended abnormally");
        }
    }
}

impl Drop for GcGuard {
    fn drop(&mut self) {
        // notify_one stores a permit, so the loop sees it even between two waits.
        self.stop.notify_one();
    }
}

impl Gateway {
    /// Starts the GC on the current tokio runtime: a sweep every `gc_every`, the first
    /// one `gc_every` from now. Errors are logged and the next tick tries again.
    pub fn spawn_gc(&self) -> GcGuard {
        let stop = Arc::new(Notify::new());
        let gateway = self.clone();
        let every = self.shared.config.gc_every;
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut next = Instant::now() + every;
            loop {
                tokio::select! {
                    () = sleep_until(next) => {}
                    () = stopped.notified() => break,
                }
                next += every;
                match gateway.sweep().await {
                    Ok(r) if r.marked_inactive + r.deleted > 0 => {
                        tracing::info!(
                            inactive = r.marked_inactive,
                            deleted = r.deleted,
                            "GC sweep"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "GC sweep failed; retrying next tick"),
                }
            }
        });
        GcGuard {
            stop,
            task: Some(task),
        }
    }
}
