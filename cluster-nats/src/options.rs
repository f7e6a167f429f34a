//! [`NatsOptions`]: the subject prefix and the bounds of the plane: how long a peer
//! may take to answer, how often peers are probed, how much may wait to be sent.

use std::time::Duration;

use crate::error::NatsError;

/// How a replica uses NATS. `NatsOptions::default()` suits a deployment; tests
/// shorten the timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsOptions {
    /// The first tokens of every subject the plane uses (default `vllm`): replicas
    /// with the same prefix on one NATS server are one cluster. Dot-separated tokens
    /// of `[A-Za-z0-9_-]`.
    pub prefix: String,
    /// How long a peer may take to answer a frame, a barrier or a probe (default
    /// 5 s). A peer that does not is given up on: the frame's task fails with 503,
    /// the barrier stops waiting for it, the probe declares it gone.
    pub timeout: Duration,
    /// How long a result forwarded to the replica holding its task may wait there
    /// (default 30 s). The wait is the stream's backpressure (a slow client slows
    /// its publisher's posts); past it the publisher is told the task is unknown.
    pub deliver_timeout: Duration,
    /// How often every known peer is probed (default 1 s). A peer that has no
    /// subscriber any more ("no responders": its process or its NATS connection
    /// died) or does not answer within [`timeout`](Self::timeout) is gone: the
    /// tasks here waiting on its channels fail with 503 at once.
    pub probe_interval: Duration,
    /// How often each replica announces all its channels again (default 30 s), so
    /// that a peer that missed an announcement (NATS core delivers at most once) or
    /// took this replica for gone is mended.
    pub resync_interval: Duration,
    /// How long the replica holding channels gathers changes of its rows' in-flight
    /// counts before reporting them to the others (default 2 ms): the staleness of
    /// their view of its rows' load, beside the hop itself (SPEC §14).
    pub load_interval: Duration,
    /// How often the replica holding channels reports the rows that have tasks in
    /// flight again (default 1 s). A report holds for three of these: a view of a
    /// replica that went silent falls back on the peers' own counts.
    pub load_refresh: Duration,
    /// Frames and announcements waiting to be published (default 8192); past it a
    /// frame for another replica is refused as [`SendError::Full`](virtual_llm_core::SendError::Full).
    pub queue: usize,
    /// The largest message put back together from the pieces a server's
    /// `max_payload` cut it into (default 64 MiB); a larger one is dropped.
    pub max_message: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            prefix: "vllm".to_owned(),
            timeout: Duration::from_secs(5),
            deliver_timeout: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(30),
            load_interval: Duration::from_millis(2),
            load_refresh: Duration::from_secs(1),
            queue: 8192,
            max_message: 64 << 20,
        }
    }
}

impl NatsOptions {
    /// These options with `prefix`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// These options with `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// These options with `deliver_timeout`.
    pub fn with_deliver_timeout(mut self, timeout: Duration) -> Self {
        self.deliver_timeout = timeout;
        self
    }

    /// These options with `probe_interval`.
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// These options with `resync_interval`.
    pub fn with_resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval;
        self
    }

    /// These options with `load_interval`.
    pub fn with_load_interval(mut self, interval: Duration) -> Self {
        self.load_interval = interval;
        self
    }

    /// These options with `load_refresh`.
    pub fn with_load_refresh(mut self, refresh: Duration) -> Self {
        self.load_refresh = refresh;
        self
    }

    /// Checks the prefix and the bounds.
    pub(crate) fn validate(&self) -> Result<(), NatsError> {
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !self.prefix.split('.').all(token_ok) {
            return Err(NatsError::Options(format!(
                "invalid subject prefix {:?}: dot-separated tokens of [A-Za-z0-9_-]",
                self.prefix
            )));
        }
        let zero = [
            ("timeout", self.timeout),
            ("deliver_timeout", self.deliver_timeout),
            ("probe_interval", self.probe_interval),
            ("resync_interval", self.resync_interval),
            ("load_refresh", self.load_refresh),
        ]
        .into_iter()
        .find(|(_, d)| d.is_zero());
        if let Some((name, _)) = zero {
            return Err(NatsError::Options(format!("{name} must be more than zero")));
        }
        if self.queue == 0 || self.max_message == 0 {
            return Err(NatsError::Options(
                "queue and max_message must be more than zero".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_subject_tokens() {
        assert!(NatsOptions::default().validate().is_ok());
        let with = |p: &str| NatsOptions::default().with_prefix(p).validate();
        assert!(with("team-a.vllm_1").is_ok());
        for bad in ["", "a..b", "a b", "a.*", "a.>", ".a"] {
            assert!(with(bad).is_err(), "{bad:?} is refused");
        }
        let zero = NatsOptions::default().with_timeout(Duration::ZERO);
        assert!(zero.validate().is_err());
    }
}
