//! Coalesced heartbeats: the in-memory overlay of liveness that spares a disk commit
//! per heartbeat.
//!
//! A [`Store::touch`](virtual_llm_core::Store::touch) only records `name → heartbeat`
//! here. Every read lays the overlay over the rows it read, so a heartbeat is visible
//! at once; the flusher later writes the overlay to disk in one transaction per batch.
//!
//! Each entry remembers the *stamp* of the row version it was recorded against (the
//! sequence number of the write that produced that version). An entry applies only to
//! that version: once a lifecycle write replaces the row, its heartbeat is the one the
//! write carried, exactly as with the in-memory store, and the old entry is inert until
//! the next flush drops it. Stamps never repeat, so a heartbeat of a deleted row can
//! never resurface on a new row of the same name.

use std::collections::{BTreeSet, HashMap};

use virtual_llm_core::Timestamp;

/// A heartbeat not yet on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The heartbeat.
    pub(crate) at: Timestamp,
    /// The stamp of the row version it belongs to.
    pub(crate) stamp: u64,
}

/// Heartbeats held in memory, by row name and by time.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    by_name: HashMap<String, Pending>,
    /// The same entries ordered by heartbeat, so the stale query finds rows whose
    /// in-memory heartbeat is older than their indexed one (a clock stepped back)
    /// without scanning the overlay.
    by_time: BTreeSet<(Timestamp, String)>,
}

impl Overlay {
    /// Records a heartbeat at `at` for the version `stamp` of row `name`. A heartbeat
    /// for an older version than the one already recorded is dropped; for the same
    /// version, the last one recorded wins (as a plain write of the field would).
    pub(crate) fn record(&mut self, name: &str, stamp: u64, at: Timestamp) {
        let new = Pending { at, stamp };
        match self.by_name.get_mut(name) {
            Some(old) if old.stamp > stamp => {}
            Some(old) => {
                self.by_time.remove(&(old.at, name.to_owned()));
                *old = new;
                self.by_time.insert((at, name.to_owned()));
            }
            None => {
                self.by_name.insert(name.to_owned(), new);
                self.by_time.insert((at, name.to_owned()));
            }
        }
    }

    /// The in-memory heartbeat of version `stamp` of row `name`, if there is one.
    pub(crate) fn heartbeat(&self, name: &str, stamp: u64) -> Option<Timestamp> {
        self.by_name
            .get(name)
            .filter(|p| p.stamp == stamp)
            .map(|p| p.at)
    }

    /// Entries with a heartbeat strictly before `cutoff`, oldest first.
    pub(crate) fn before(&self, cutoff: Timestamp) -> Vec<(String, Pending)> {
        self.by_time
            .range(..(cutoff, String::new()))
            .filter_map(|(_, name)| self.by_name.get(name).map(|p| (name.clone(), *p)))
            .collect()
    }

    /// Every entry, for a flush.
    pub(crate) fn entries(&self) -> Vec<(String, Pending)> {
        self.by_name.iter().map(|(n, p)| (n.clone(), *p)).collect()
    }

    /// Forgets `name`'s entry if it is still `pending` (a newer heartbeat recorded
    /// meanwhile stays, for the next flush).
    pub(crate) fn remove_if(&mut self, name: &str, pending: Pending) {
        if self.by_name.get(name) == Some(&pending) {
            self.by_name.remove(name);
            self.by_time.remove(&(pending.at, name.to_owned()));
        }
    }

    /// How many heartbeats are waiting for a flush.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether nothing is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtual_llm_core::testkit::at;

    #[test]
    fn an_entry_applies_to_its_row_version_only() {
        let mut o = Overlay::default();
        o.record("a", 5, at(10));
        assert_eq!(o.heartbeat("a", 5), Some(at(10)));
        assert_eq!(o.heartbeat("a", 6), None, "another version of the row");
        o.record("a", 5, at(20));
        assert_eq!(o.heartbeat("a", 5), Some(at(20)), "the last heartbeat wins");
        o.record("a", 4, at(30));
        assert_eq!(
            o.heartbeat("a", 5),
            Some(at(20)),
            "an older version is dropped"
        );
        o.record("a", 7, at(15));
        assert_eq!(
            o.heartbeat("a", 7),
            Some(at(15)),
            "a newer version replaces"
        );
        assert_eq!(o.len(), 1);
        assert_eq!(o.before(at(16)).len(), 1);
        assert!(o.before(at(15)).is_empty(), "the cutoff is strict");
    }

    #[test]
    fn remove_if_keeps_newer_heartbeats() {
        let mut o = Overlay::default();
        o.record("a", 1, at(10));
        let flushed = o.entries()[0].1;
        o.record("a", 1, at(11));
        o.remove_if("a", flushed);
        assert_eq!(o.heartbeat("a", 1), Some(at(11)));
        o.remove_if(
            "a",
            Pending {
                at: at(11),
                stamp: 1,
            },
        );
        assert!(o.is_empty());
        assert!(o.before(Timestamp::MAX).is_empty(), "both maps are cleared");
    }
}
