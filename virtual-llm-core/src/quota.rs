//! The publisher quotas of SPEC §16: how many names (LLMs and agents) and sessions a
//! principal's rows may hold, `maxNames` (default 256) and `maxSessions` (default 64).
//!
//! A register that would take its principal over either is refused with 403
//! `quota_exceeded` and writes nothing. Only growth is refused: a register that holds
//! no more than the principal already does (a reconnect, after the limit was lowered)
//! goes through. A name counts while its row exists, inactive rows included, until the
//! GC reaps them.
//!
//! What a principal holds is read from the store (every row, kept by owner), and
//! kept in memory for [`FRESH_FOR`] and updated with this replica's own registers, so a
//! registry of many publishers is not read once per register. A refusal is always
//! decided on a fresh read. Two registers of one principal racing on two replicas may
//! each pass and together overshoot by one register's names; on one replica, a
//! principal's registers are checked and written one at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;
use crate::{Error, Gateway, LlmName, LlmRecord, Principal, SessionId};

/// How long what a principal holds is taken from memory before it is read again.
pub(crate) const FRESH_FOR: Duration = Duration::from_secs(30);
/// The most principals kept in memory; past it, the cache starts again.
const MAX_KEPT: usize = 10_000;

/// What one principal's rows hold.
#[derive(Clone, Debug, Default)]
struct Held {
    names: HashSet<LlmName>,
    sessions: HashSet<SessionId>,
}

impl Held {
    fn of<'a>(rows: impl IntoIterator<Item = &'a LlmRecord>) -> Self {
        let mut held = Held::default();
        held.add(rows);
        held
    }

    fn add<'a>(&mut self, rows: impl IntoIterator<Item = &'a LlmRecord>) {
        for r in rows {
            self.names.insert(r.name.clone());
            if let Some(s) = &r.provider_session_id {
                self.sessions.insert(s.clone());
            }
        }
    }

    /// The first quota a register of `names` in `session` would break, given `max`
    /// names and sessions: only growth past a limit breaks it.
    fn breaks(
        &self,
        names: &[&LlmName],
        session: &SessionId,
        max_names: usize,
        max_sessions: usize,
    ) -> Option<Error> {
        let new_names = names.iter().filter(|n| !self.names.contains(**n)).count();
        let after = self.names.len() + new_names;
        if new_names > 0 && after > max_names {
            return Some(Error::QuotaExceeded {
                what: "names",
                count: after,
                limit: max_names,
            });
        }
        if !self.sessions.contains(session) && self.sessions.len() + 1 > max_sessions {
            return Some(Error::QuotaExceeded {
                what: "sessions",
                count: self.sessions.len() + 1,
                limit: max_sessions,
            });
        }
        None
    }
}

/// What each principal's rows hold, as last read, and when; and the locks that make
/// a principal's quota check and its register's write one step in this process.
#[derive(Debug)]
pub(crate) struct Holdings {
    kept: Mutex<HashMap<String, (Held, Instant)>>,
    /// Striped by principal: bounded however many principals come and go.
    locks: Vec<tokio::sync::Mutex<()>>,
}

/// Lock stripes of [`Holdings`].
const LOCK_STRIPES: usize = 64;

impl Default for Holdings {
    fn default() -> Self {
        Holdings {
            kept: Mutex::default(),
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }
}

impl Holdings {
    async fn lock(&self, principal: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        principal.hash(&mut h);
        let index = usize::try_from(h.finish() % LOCK_STRIPES as u64).unwrap_or(0);
        self.locks[index].lock().await
    }
}

impl Gateway {
    /// 403 `quota_exceeded` if registering `names` in `session` would take `principal`
    /// over its `maxNames` or `maxSessions`. Otherwise a guard: the register holds it
    /// until its write is done (and [`Gateway::held`] told), so that concurrent
    /// registers of one principal on this replica are checked one after the other.
    /// `None` for a principal without quotas (an admin without limits of its own).
    pub(crate) async fn check_quota(
        &self,
        principal: &Principal,
        session: &SessionId,
        names: &[&LlmName],
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, Error> {
        let limits = principal.limits(&self.shared.config.limits);
        let (max_names, max_sessions) = (limits.max_names(), limits.max_sessions());
        if max_names == usize::MAX && max_sessions == usize::MAX {
            return Ok(None);
        }
        let guard = self.shared.holdings.lock(&principal.id).await;
        let kept = lock(&self.shared.holdings.kept)
            .get(&principal.id)
            .filter(|(_, at)| at.elapsed() < FRESH_FOR)
            .map(|(held, _)| held.clone());
        if let Some(held) = kept
            && held
                .breaks(names, session, max_names, max_sessions)
                .is_none()
        {
            return Ok(Some(guard));
        }
        let rows = self.shared.store.list().await?;
        let held = Held::of(rows.iter().filter(|r| r.owner == principal.id));
        let verdict = held.breaks(names, session, max_names, max_sessions);
        let mut kept = lock(&self.shared.holdings.kept);
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        kept.insert(principal.id.clone(), (held, Instant::now()));
        match verdict {
            Some(e) => Err(e),
            None => Ok(Some(guard)),
        }
    }

    /// `principal`'s rows now hold `written` too.
    pub(crate) fn held(&self, principal: &Principal, written: &[LlmRecord]) {
        if let Some((held, _)) = lock(&self.shared.holdings.kept).get_mut(&principal.id) {
            held.add(written);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_growth_past_a_limit_breaks_it() {
        let name = |s: &str| LlmName::parse(s).unwrap();
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let (s1, s2) = (SessionId::generate(), SessionId::generate());
        let held = Held {
            names: [a.clone(), b.clone()].into(),
            sessions: [s1.clone()].into(),
        };
        assert!(held.breaks(&[&a, &b], &s1, 2, 1).is_none(), "what it holds");
        assert!(held.breaks(&[&a, &b], &s1, 1, 1).is_none(), "no growth");
        let err = held.breaks(&[&a, &c], &s1, 2, 1).unwrap();
        assert_eq!((err.status(), err.code()), (403, "quota_exceeded"));
        assert!(
            err.to_string().contains("3 names, over the limit of 2"),
            "{err}"
        );
        let err = held.breaks(&[&a], &s2, 2, 1).unwrap();
        assert!(err.to_string().contains("2 sessions"), "{err}");
        assert!(held.breaks(&[&a], &s2, 2, 2).is_none());
    }
}
