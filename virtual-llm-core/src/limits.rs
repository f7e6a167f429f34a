//! Limits per principal (SPEC §16): how many requests and tokens a principal may use
//! per minute, how many of its requests may be in flight at once, and how many names
//! and sessions its publishers may hold.
//!
//! [`Limits`] is configuration: the gateway's defaults ([`Config::limits`]) overlaid
//! by a principal's own ([`Principal::with_limits`], a token's `limits = {…}` in the
//! reference gateway). [`RateLimiter`] enforces the request, token and concurrency
//! limits: [`RateLimiter::admit`] is a typed decision, an [`Admitted`] guard or
//! [`Error::RateLimited`] with the state of each window, which the HTTP layer turns
//! into `429`, `Retry-After` and the OpenAI `x-ratelimit-*` headers.
//!
//! Each per-minute limit is a token bucket of the limit's size that refills evenly over
//! a minute: a principal may burst up to its limit, then goes at the limit's pace. A
//! request takes one request token; tokens are charged after the answer, from its
//! `usage` (see [`crate::usage`]), so a request is refused while the principal's token
//! bucket is in debt (its last answers took more than was left). A debt is capped at
//! one minute's worth: one huge answer locks its principal out for at most a minute. Time is the gateway's
//! [`Clock`], so tests move it by hand.
//!
//! The state is per gateway replica and in memory: with several replicas, each allows
//! the limit (document the sum, or route a principal to one replica).
//!
//! [`Config::limits`]: crate::Config::limits
//! [`Principal::with_limits`]: crate::Principal::with_limits

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sync::lock;
use crate::{Clock, Error, Principal, Timestamp};

/// The `maxNames` a principal has when neither it nor the gateway sets one.
pub const DEFAULT_MAX_NAMES: usize = 256;
/// The `maxSessions` a principal has when neither it nor the gateway sets one.
pub const DEFAULT_MAX_SESSIONS: usize = 64;
/// The most principals whose rate state is kept; past it, those with nothing in flight
/// and full buckets are forgotten (they lose nothing: a full bucket is a fresh one).
const MAX_TRACKED: usize = 10_000;
/// What a `Retry-After` for `maxConcurrent` says: a slot frees when a request ends,
/// which nothing here can predict.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// Limits of one principal. Each absent field takes the gateway's default, and absent
/// there too means no limit (`maxNames` and `maxSessions`: 256 and 64).
///
/// ```
/// use virtual_llm_core::limits::Limits;
///
/// let own: Limits = serde_json::from_str(r#"{"requestsPerMinute": 60}"#).unwrap();
/// let defaults = Limits { max_concurrent: Some(4), ..Limits::default() };
/// let merged = own.or(&defaults);
/// assert_eq!((merged.requests_per_minute, merged.max_concurrent), (Some(60), Some(4)));
/// assert_eq!(merged.max_names(), 256);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Inference requests per minute (a bucket of this size refilling over a minute).
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens per minute, counted from the answers' `usage`.
    pub tokens_per_minute: Option<u64>,
    /// Inference requests in flight at once (a stream counts until it ends).
    pub max_concurrent: Option<u32>,
    /// Names (LLMs and agents) a publisher may hold. Default 256.
    pub max_names: Option<usize>,
    /// Publisher sessions (rows' distinct sessions) a publisher may hold. Default 64.
    pub max_sessions: Option<usize>,
}

impl Limits {
    /// These limits, each absent one taken from `defaults`.
    pub fn or(&self, defaults: &Limits) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(defaults.tokens_per_minute),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
            max_names: self.max_names.or(defaults.max_names),
            max_sessions: self.max_sessions.or(defaults.max_sessions),
        }
    }

    /// `maxNames`, or its default.
    pub fn max_names(&self) -> usize {
        self.max_names.unwrap_or(DEFAULT_MAX_NAMES)
    }

    /// `maxSessions`, or its default.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS)
    }

    /// Every limit is positive (a limit of 0 would refuse everything: leave the
    /// principal's token out instead). The error names the setting
    /// (`limits.maxNames`).
    pub fn validate(&self) -> Result<(), Error> {
        // Settings are named by their path in `Config` (`limits.maxNames`).
        let values = [
            (
                "limits.requestsPerMinute",
                self.requests_per_minute.map(u64::from),
            ),
            ("limits.tokensPerMinute", self.tokens_per_minute),
            ("limits.maxConcurrent", self.max_concurrent.map(u64::from)),
            ("limits.maxNames", self.max_names.map(|n| n as u64)),
            ("limits.maxSessions", self.max_sessions.map(|n| n as u64)),
        ];
        for (setting, value) in values {
            if value == Some(0) {
                let key = setting.trim_start_matches("limits.");
                return Err(Error::InvalidConfig {
                    settings: vec![setting],
                    reason: format!("{key} must be positive"),
                });
            }
        }
        Ok(())
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// `requestsPerMinute`.
    Requests,
    /// `tokensPerMinute`.
    Tokens,
    /// `maxConcurrent`.
    Concurrent,
}

/// The state of one per-minute limit, as the OpenAI `x-ratelimit-*` headers tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateWindow {
    /// The limit per minute.
    pub limit: u64,
    /// What is left now.
    pub remaining: u64,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

/// A bucket of `capacity` units refilling evenly over a minute. Its level is kept in
/// units × 60 000 (per millisecond of refill, one unit of capacity arrives), so the
/// arithmetic is exact in integers.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Units × 60 000; negative while in debt.
    level: i128,
    at: Timestamp,
}

const SCALE: i128 = 60_000;

impl Bucket {
    fn full(capacity: u64, now: Timestamp) -> Self {
        Bucket {
            level: i128::from(capacity) * SCALE,
            at: now,
        }
    }

    /// Refills for the time since the last look (a clock that went back refills
    /// nothing).
    fn refill(&mut self, capacity: u64, now: Timestamp) {
        let elapsed = i128::from(now.as_millis().saturating_sub(self.at.as_millis()));
        let cap = i128::from(capacity) * SCALE;
        self.level = (self.level + elapsed * i128::from(capacity)).min(cap);
        if now > self.at {
            self.at = now;
        }
    }

    /// How long until the level reaches `target` (× [`SCALE`]).
    fn until(&self, capacity: u64, target: i128) -> Duration {
        let missing = (target - self.level).max(0);
        let rate = i128::from(capacity.max(1));
        // Rounded up: at the time told, the units are there.
        let ms = (missing + rate - 1) / rate;
        Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    fn window(&self, capacity: u64) -> RateWindow {
        RateWindow {
            limit: capacity,
            remaining: u64::try_from(self.level.max(0) / SCALE).unwrap_or(u64::MAX),
            reset: self.until(capacity, i128::from(capacity) * SCALE),
        }
    }

    fn is_full(&self, capacity: u64) -> bool {
        self.level >= i128::from(capacity) * SCALE
    }
}

/// One principal's state.
#[derive(Debug, Default)]
struct Usage {
    requests: Option<(u64, Bucket)>,
    tokens: Option<(u64, Bucket)>,
    in_flight: u32,
}

impl Usage {
    /// The bucket for `limit`, created full, or resized (keeping its level, capped)
    /// when the limit changed; `None` without a limit.
    fn bucket(
        slot: &mut Option<(u64, Bucket)>,
        limit: Option<u64>,
        now: Timestamp,
    ) -> Option<(u64, &mut Bucket)> {
        let Some(limit) = limit else {
            *slot = None;
            return None;
        };
        let (cap, bucket) = slot.get_or_insert_with(|| (limit, Bucket::full(limit, now)));
        *cap = limit;
        bucket.refill(limit, now);
        Some((limit, bucket))
    }

    fn idle(&self) -> bool {
        self.in_flight == 0
            && self.requests.as_ref().is_none_or(|(c, b)| b.is_full(*c))
            && self.tokens.as_ref().is_none_or(|(c, b)| b.is_full(*c))
    }
}

/// Enforces `requestsPerMinute`, `tokensPerMinute` and `maxConcurrent` per principal,
/// on the gateway's clock. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<HashMap<String, Usage>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("principals", &lock(&self.state).len())
            .finish()
    }
}

impl RateLimiter {
    /// A limiter reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        RateLimiter {
            clock,
            state: Arc::default(),
        }
    }

    /// Lets one request of `principal` in under `limits`, or says which limit refuses
    /// it ([`Error::RateLimited`], with the state of every per-minute window the
    /// principal has). Nothing is taken from a refused request. The [`Admitted`] guard
    /// counts the request in flight until it is dropped, and takes its tokens with
    /// [`Admitted::charge`].
    pub fn admit(&self, principal: &Principal, limits: &Limits) -> Result<Admitted, Error> {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        if state.len() >= MAX_TRACKED && !state.contains_key(&principal.id) {
            state.retain(|_, u| !u.idle());
        }
        let usage = state.entry(principal.id.clone()).or_default();
        let requests = Usage::bucket(
            &mut usage.requests,
            limits.requests_per_minute.map(u64::from),
            now,
        );
        let (requests_window, request_retry) = match requests {
            Some((cap, bucket)) => (
                Some(bucket.window(cap)),
                (bucket.level < SCALE).then(|| bucket.until(cap, SCALE)),
            ),
            None => (None, None),
        };
        let tokens = Usage::bucket(&mut usage.tokens, limits.tokens_per_minute, now);
        let (tokens_window, token_retry) = match tokens {
            Some((cap, bucket)) => (
                Some(bucket.window(cap)),
                (bucket.level < 0).then(|| bucket.until(cap, 0)),
            ),
            None => (None, None),
        };
        let refuse = |kind, retry_after: Duration| Error::RateLimited {
            kind,
            retry_after: retry_after.max(Duration::from_millis(1)),
            requests: requests_window,
            tokens: tokens_window,
        };
        if let Some(retry) = request_retry {
            return Err(refuse(LimitKind::Requests, retry));
        }
        if let Some(retry) = token_retry {
            return Err(refuse(LimitKind::Tokens, retry));
        }
        if limits
            .max_concurrent
            .is_some_and(|max| usage.in_flight >= max)
        {
            return Err(refuse(LimitKind::Concurrent, CONCURRENCY_RETRY));
        }
        usage.in_flight += 1;
        let requests = match &mut usage.requests {
            Some((cap, bucket)) => {
                bucket.level -= SCALE;
                Some(bucket.window(*cap))
            }
            None => None,
        };
        Ok(Admitted {
            limiter: self.clone(),
            principal: principal.id.clone(),
            requests,
            tokens: tokens_window,
        })
    }

    /// Takes `tokens` from `principal`'s token bucket (into debt, at most a minute's
    /// worth); nothing without a token limit.
    fn charge(&self, principal: &str, tokens: u64) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        let Some(Usage {
            tokens: Some((cap, bucket)),
            ..
        }) = state.get_mut(principal)
        else {
            return;
        };
        bucket.refill(*cap, now);
        let floor = -i128::from(*cap) * SCALE;
        bucket.level = (bucket.level - i128::from(tokens) * SCALE).max(floor);
    }

    fn release(&self, principal: &str) {
        if let Some(usage) = lock(&self.state).get_mut(principal) {
            usage.in_flight = usage.in_flight.saturating_sub(1);
        }
    }

    /// How many of `principal`'s requests are in flight.
    pub fn in_flight(&self, principal: &str) -> u32 {
        lock(&self.state).get(principal).map_or(0, |u| u.in_flight)
    }
}

/// One admitted request: counted in flight until dropped.
#[derive(Debug)]
pub struct Admitted {
    limiter: RateLimiter,
    principal: String,
    /// The request window after this request, if the principal has a request limit.
    pub requests: Option<RateWindow>,
    /// The token window as the request found it, if the principal has a token limit.
    pub tokens: Option<RateWindow>,
}

impl Admitted {
    /// Charges the request's tokens (prompt and completion) to its principal.
    pub fn charge(&self, tokens: u64) {
        self.limiter.charge(&self.principal, tokens);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limiter.release(&self.principal);
    }
}

/// A duration as the OpenAI `x-ratelimit-reset-*` headers write it: `1m30s`, `6s`,
/// `250ms`, `0s`.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_core::limits::reset_text;
///
/// assert_eq!(reset_text(Duration::from_millis(90_500)), "1m30.5s");
/// assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
/// assert_eq!(reset_text(Duration::from_secs(6)), "6s");
/// assert_eq!(reset_text(Duration::ZERO), "0s");
/// ```
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, rest) = (ms / 60_000, ms % 60_000);
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let text = format!("{:.3}", rest as f64 / 1000.0);
        format!("{}s", text.trim_end_matches('0'))
    };
    if m > 0 { format!("{m}m{secs}") } else { secs }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Role;
    use crate::testkit::{ManualClock, at};

    fn setup() -> (ManualClock, RateLimiter, Principal) {
        let clock = ManualClock::new(at(1_000));
        let limiter = RateLimiter::new(Arc::new(clock.clone()));
        (clock, limiter, Principal::new("bob", [Role::Client]))
    }

    fn refused(result: Result<Admitted, Error>) -> (LimitKind, Duration, Option<RateWindow>) {
        match result {
            Err(Error::RateLimited {
                kind,
                retry_after,
                requests,
                ..
            }) => (kind, retry_after, requests),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn requests_burst_to_the_limit_then_go_at_its_pace() {
        let (clock, limiter, bob) = setup();
        let limits = Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        };
        for remaining in [2, 1, 0] {
            let admitted = limiter.admit(&bob, &limits).unwrap();
            let window = admitted.requests.unwrap();
            assert_eq!((window.limit, window.remaining), (3, remaining));
        }
        let (kind, retry, window) = refused(limiter.admit(&bob, &limits));
        assert_eq!(kind, LimitKind::Requests);
        assert_eq!(retry, Duration::from_secs(20), "one request every 20 s");
        let window = window.unwrap();
        assert_eq!(
            (window.remaining, window.reset),
            (0, Duration::from_secs(60))
        );
        // Refused requests take nothing.
        clock.advance(Duration::from_millis(19_999));
        assert_eq!(
            refused(limiter.admit(&bob, &limits)).1,
            Duration::from_millis(1)
        );
        clock.advance(Duration::from_millis(1));
        limiter.admit(&bob, &limits).unwrap();
        assert_eq!(refused(limiter.admit(&bob, &limits)).0, LimitKind::Requests);
        // A minute later the bucket is full again, not more.
        clock.advance(Duration::from_secs(600));
        for _ in 0..3 {
            limiter.admit(&bob, &limits).unwrap();
        }
        assert!(limiter.admit(&bob, &limits).is_err());
        // Another principal has its own bucket.
        let eve = Principal::new("eve", [Role::Client]);
        limiter.admit(&eve, &limits).unwrap();
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_refuse_while_in_debt() {
        let (clock, limiter, bob) = setup();
        let limits = Limits {
            tokens_per_minute: Some(600),
            ..Limits::default()
        };
        let first = limiter.admit(&bob, &limits).unwrap();
        assert_eq!(first.tokens.unwrap().remaining, 600);
        first.charge(500);
        let second = limiter.admit(&bob, &limits).unwrap();
        assert_eq!(second.tokens.unwrap().remaining, 100);
        second.charge(400);
        // 300 tokens in debt, refilled at 10 a second: 30 s to be out of it.
        let (kind, retry, _) = refused(limiter.admit(&bob, &limits));
        assert_eq!(kind, LimitKind::Tokens);
        assert_eq!(retry, Duration::from_millis(30_000));
        clock.advance(Duration::from_secs(30));
        let third = limiter.admit(&bob, &limits).unwrap();
        // A debt is capped at a minute's worth.
        third.charge(1_000_000);
        assert_eq!(
            refused(limiter.admit(&bob, &limits)).1,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn max_concurrent_counts_requests_until_their_guard_drops() {
        let (_clock, limiter, bob) = setup();
        let limits = Limits {
            max_concurrent: Some(2),
            ..Limits::default()
        };
        let a = limiter.admit(&bob, &limits).unwrap();
        let _b = limiter.admit(&bob, &limits).unwrap();
        assert_eq!(limiter.in_flight("bob"), 2);
        assert_eq!(
            refused(limiter.admit(&bob, &limits)).0,
            LimitKind::Concurrent
        );
        drop(a);
        assert_eq!(limiter.in_flight("bob"), 1);
        limiter.admit(&bob, &limits).unwrap();
    }

    #[test]
    fn no_limits_admit_everything_and_zero_limits_are_refused() {
        let (_clock, limiter, bob) = setup();
        for _ in 0..1000 {
            let admitted = limiter.admit(&bob, &Limits::default()).unwrap();
            assert_eq!((admitted.requests, admitted.tokens), (None, None));
        }
        let zero = Limits {
            max_names: Some(0),
            ..Limits::default()
        };
        assert!(zero.validate().is_err());
        assert_eq!(Limits::default().max_sessions(), 64);
    }
}
