//! The end of a graceful shutdown: waiting until every control channel is unbound and
//! its rows are written, so that the store can close.
//!
//! [`Gateway::drain`] tells every publisher the gateway is closing; each transport then
//! unbinds its channel, and the unbind writes the session's rows inactive. Some of
//! those unbinds outlive the HTTP server: a WebSocket session is handed its socket by
//! the upgrade and is no longer one of the server's connections, and a dropped
//! [`Binding`](crate::Binding) unbinds in the background. Closing the store under them
//! fails their writes; [`Gateway::settle`] waits for them instead.

use std::time::Duration;

use tokio::time::Instant;

use crate::Gateway;

impl Gateway {
    /// Waits, for at most `within`, until no control channel is bound and every unbind
    /// has written its rows: the step of a graceful shutdown between
    /// [`Gateway::drain`] (and the server's end) and closing the store. Returns whether
    /// everything settled in time.
    pub async fn settle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        // Polled: a shutdown happens once, and a 20 ms step is well below any grace.
        while self.shared.directory.local_channels() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // An unbind removes its channel and writes its rows under its session's lock:
        // once each lock has been free after the last channel went, every unbind has
        // written.
        for stripe in &self.shared.locks.stripes {
            if tokio::time::timeout_at(deadline, stripe.lock())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}
