//! Wall-clock time as the lifecycle sees it.
//!
//! Every lifecycle decision (is this row stale? has it been inactive for four hours?)
//! compares [`Timestamp`]s read from a [`Clock`]. Nothing in the core calls
//! `SystemTime::now()` directly, so tests can drive time with a manual clock instead of
//! sleeping. Task deadlines are a different matter: they are tokio timers, which tests
//! drive with `tokio::time::pause`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in wall-clock time, in milliseconds since the Unix epoch.
///
/// On the wire it is an RFC 3339 string with millisecond precision
/// (`2026-11-25T10:00:00.000Z`), which is what people and JSON tools read easily.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_core::Timestamp;
///
/// let t = Timestamp::from_millis(90_000);
/// assert_eq!(t.saturating_sub(Duration::from_secs(90)), Timestamp::EPOCH);
/// assert_eq!(t.to_string(), "1970-01-01T00:01:30.000Z");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch; also what an absent timestamp counts as in index order.
    pub const EPOCH: Timestamp = Timestamp(0);
    /// The latest representable instant.
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// A timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self - d`, clamped at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }

    /// `self + d`, clamped at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// How long after `earlier` this is; zero when `earlier` is later (clocks jump back).
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// The same instant as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }

    /// The instant a [`SystemTime`] names; times before the epoch clamp to it.
    pub fn from_system_time(t: SystemTime) -> Self {
        Timestamp(t.duration_since(UNIX_EPOCH).map_or(0, duration_millis))
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime formats up to year 9999; beyond it there is nothing meaningful to show.
        if self.0 >= 253_402_300_800_000 {
            return f.write_str("9999-12-31T23:59:59.999Z");
        }
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.to_system_time())
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text)
            .map(Timestamp::from_system_time)
            .map_err(serde::de::Error::custom)
    }
}

/// Where the lifecycle reads wall-clock time.
///
/// # Contract
/// `now` is cheap and never blocks. It may jump backwards (an NTP step); the lifecycle
/// treats a heartbeat "from the future" as fresh and never computes negative ages.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_rfc3339() {
        let t = Timestamp::from_millis(1_764_000_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2025-11-24T16:00:00.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(5);
        assert_eq!(t.saturating_sub(Duration::from_secs(1)), Timestamp::EPOCH);
        assert_eq!(
            Timestamp::MAX.saturating_add(Duration::from_secs(1)),
            Timestamp::MAX
        );
        assert_eq!(
            t.saturating_since(Timestamp::from_millis(10)),
            Duration::ZERO
        );
    }
}
