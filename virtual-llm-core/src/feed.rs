//! Following the store's change feed: rows that other gateways sharing the store write
//! reach this gateway's admission queues (a request waiting for a pool on this replica
//! is let through when a row starts serving on another, and a wake this replica asked
//! for ends when the row serves there) and its listeners of registry
//! changes (MCP's `tools/list_changed`).
//!
//! The [`RegistryView`](crate::RegistryView) reads the same feed on its own, when it is
//! next asked. This follower reads each changed row again (the feed carries hints, not
//! rows) and hands it to the admission as this gateway's own writes are. A follower
//! that falls behind (`Lagged`) skips what it missed: the queue's own bound
//! (`queueWait`) then holds for the requests that depended on it. It holds the gateway
//! weakly and stops when the gateway is dropped or the feed closes.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use crate::store::RowChange;
use crate::{Gateway, LlmStatus};

impl Gateway {
    /// Starts following the store's change feed, if it has one.
    pub(crate) fn follow_changes(&self) {
        let Some(mut feed) = self.shared.store.changes() else {
            return;
        };
        let gateway = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                let change = match feed.recv().await {
                    Ok(change) => change,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(
                            missed,
                            "the registry change feed ran ahead of this gateway"
                        );
                        continue;
                    }
                    Err(RecvError::Closed) => break,
                };
                let Some(shared) = gateway.upgrade() else {
                    break;
                };
                Gateway { shared }.heard(change).await;
            }
        });
    }

    /// A row changed, maybe by another gateway: read it and tell the admission.
    async fn heard(&self, change: RowChange) {
        if change.pool.is_none() {
            // Deleted: the admission forgets a row by its id, which the hint does not
            // carry; a deleted row serves nobody, and waiters time out as bounded.
            return;
        }
        let row = match self.shared.store.get(&change.name).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, llm = %change.name, "could not read a changed row");
                return;
            }
        };
        if row.status == LlmStatus::Active && row.binding.is_some() {
            // Its publisher is bound and ready on another replica: a wake this replica
            // asked for is over.
            self.shared.wakes.woke(&row);
        }
        let admission = &self.shared.admission;
        if row.is_agent() {
            admission.forget(&row.name, &row.id);
        } else {
            admission.observe(&row);
        }
        self.shared.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}
