//! The background GC: a task that runs [`Gateway::sweep`] every `gc_every`, and
//! [`Gateway::lease_tick`] every `lease_renew` (the first at once) while the store keeps
//! replica leases, owned by a [`GcGuard`] that stops it when dropped (mini-redis'
//! `DbDropGuard` pattern).

use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::{Gateway, LeaseRenewal};

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
    /// one `gc_every` from now; and a lease tick every `lease_renew`, the first at
    /// once, for as long as the store keeps leases. Errors are logged and the next
    /// tick tries again.
    pub fn spawn_gc(&self) -> GcGuard {
        let stop = Arc::new(Notify::new());
        let gateway = self.clone();
        let (every, renew) = (self.shared.config.gc_every, self.shared.config.lease_renew);
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut next = Instant::now() + every;
            // `None` once the store says it keeps no leases.
            let mut next_lease = Some(Instant::now());
            let mut held = false;
            loop {
                let lease_due = async {
                    match next_lease {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = sleep_until(next) => {
                        next += every;
                        gateway.sweep_logged().await;
                    }
                    () = lease_due => {
                        next_lease = next_lease.map(|at| at + renew);
                        match gateway.lease_tick(held).await {
                            Ok(report) if report.renewal == LeaseRenewal::Unsupported => {
                                next_lease = None;
                            }
                            Ok(_) => held = true,
                            Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying next tick"),
                        }
                    }
                    () = stopped.notified() => break,
                }
            }
        });
        GcGuard {
            stop,
            task: Some(task),
        }
    }
}

impl Gateway {
    /// One sweep, its outcome logged.
    async fn sweep_logged(&self) {
        match self.sweep().await {
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
}
