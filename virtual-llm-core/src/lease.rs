//! Replica leases (SPEC §14): how several gateway processes on one store notice that
//! one of them died, sooner than the heartbeat timeout.
//!
//! Every replica renews a lease in the store every `leaseRenew` (5 s), running
//! `lease` (15 s) ahead. On the same tick it looks for leases that ran out more than
//! `leaseSkew` (2 s, for clocks that disagree) ago: it ends each one with a
//! compare-and-set on its expiry (two replicas ending one lease at once: one does),
//! then takes the rows whose channels the dead replica held out of service (inactive,
//! no binding), so clients get a 503 at once instead of a timeout and the publishers,
//! reconnecting to a live replica, bind them again.
//!
//! A replica whose own lease was ended while it was still running (it stalled longer
//! than the lease) learns it from its next renewal (`Started` after it held one): its
//! rows were demoted by a peer, so it closes its channels and their publishers
//! reconnect and register again. A store for one process keeps no leases
//! (`LeaseRenewal::Unsupported`): a restart demotes its rows instead, and the tick
//! stops.

use crate::{Error, Gateway, LeaseRenewal, ReplicaId};

/// What one lease tick did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseReport {
    /// What the renewal of this replica's lease found.
    pub renewal: LeaseRenewal,
    /// This replica had held a lease and found it ended by a peer: it closed its
    /// channels.
    pub lost: bool,
    /// The replicas whose expired leases this tick ended.
    pub ended: Vec<ReplicaId>,
    /// Rows those replicas held, now inactive.
    pub demoted: usize,
}

impl Gateway {
    /// One lease tick: renews this replica's lease and ends the expired leases of
    /// others, demoting their rows (see the [module docs](crate::lease)). `held`
    /// says whether this replica held a lease before this tick (the last tick's
    /// renewal was not `Unsupported`, and there was one); the background task
    /// started by [`Gateway::spawn_gc`] keeps it.
    pub async fn lease_tick(&self, held: bool) -> Result<LeaseReport, Error> {
        let config = &self.shared.config;
        let store = &self.shared.store;
        let me = self.replica().clone();
        let now = self.shared.clock.now();
        let renewal = store
            .renew_lease(&me, now.saturating_add(config.lease))
            .await?;
        let mut report = LeaseReport {
            renewal,
            lost: false,
            ended: Vec::new(),
            demoted: 0,
        };
        if renewal == LeaseRenewal::Unsupported {
            return Ok(report);
        }
        if held && renewal == LeaseRenewal::Started {
            report.lost = true;
            let closed = self.close_channels("this gateway replica lost its lease; reconnect");
            tracing::warn!(
                replica = %me,
                closed,
                "this replica's lease was ended by a peer (it did not renew in time); its channels are closed"
            );
        }
        let cutoff = now.saturating_sub(config.lease_skew);
        for (replica, until) in store.expired_leases(cutoff).await? {
            if replica == me || !store.end_lease(&replica, until).await? {
                continue;
            }
            let demoted = self.unbind_replica(&replica, now).await?;
            tracing::warn!(
                %replica,
                demoted,
                "a gateway replica's lease ran out: the rows whose channels it held are inactive"
            );
            report.demoted += demoted;
            report.ended.push(replica);
        }
        Ok(report)
    }
}
