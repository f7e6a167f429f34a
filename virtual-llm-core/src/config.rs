//! Configuration: every duration and limit of the lifecycle and relay, in one struct.
//!
//! Defaults are those of SPEC §3 and §5. The struct deserializes from a config file
//! with human durations (`"90s"`, `"4h"`) and any field left out keeps its default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Lifecycle timings, relay deadlines and input limits.
///
/// ```
/// use std::time::Duration;
/// use virtual_llm_core::Config;
///
/// let config: Config = serde_json::from_str(r#"{ "staleAfter": "2m" }"#).unwrap();
/// assert_eq!(config.stale_after, Duration::from_secs(120));
/// assert_eq!(config.heartbeat_interval, Duration::from_secs(30));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// How often publishers heartbeat; sent to them in `hello`. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// An active virtual row with no heartbeat for this long goes inactive. Default 90 s,
    /// three missed heartbeats.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// How often the GC sweep runs. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub gc_every: Duration,
    /// An inactive row is deleted after this long. Default 4 h.
    #[serde(with = "humantime_serde")]
    pub reap_after: Duration,
    /// Keep-alive ping on idle control channels, so proxies do not cut them. Default 20 s.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// First publisher reconnect delay; it doubles up to `reconnect_max`. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest publisher reconnect delay. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Total deadline of a non-streaming task. Default 300 s: local models answering
    /// long prompts on a laptop are slow, and a client can always give up sooner.
    #[serde(with = "humantime_serde")]
    pub task_deadline: Duration,
    /// Longest silence between two events of a streaming task (first one included).
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// What a 503 asks clients to wait before retrying. Default 5 s, the first
    /// reconnect delay of a publisher.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Events buffered per task between publisher and client. A full buffer makes the
    /// publisher's result stream wait, so a slow client slows only its own task.
    /// Default 64.
    pub task_buffer: usize,
    /// Frames queued per control channel before the gateway calls the publisher
    /// saturated and answers 503. Default 1024.
    pub channel_buffer: usize,
    /// Finished task ids remembered so that a replayed result gets 409, not 404.
    /// Default 4096.
    pub finished_tasks_remembered: usize,
    /// Largest request body or frame, in bytes, both ways: bodies and frames from
    /// publishers and clients, and each task frame sent to a publisher (a client body
    /// under the limit whose task frame is over it is a 413). Default 8 MiB.
    pub max_body_bytes: usize,
    /// Most LLMs one register request may name. Default 64.
    pub max_llms_per_register: usize,
    /// Base path of the registry routes. Default `/api/v1/llms`.
    pub base_path: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(30),
            stale_after: Duration::from_secs(90),
            gc_every: Duration::from_secs(60),
            reap_after: Duration::from_secs(4 * 3600),
            keepalive: Duration::from_secs(20),
            reconnect_min: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(60),
            task_deadline: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(60),
            retry_after: Duration::from_secs(5),
            task_buffer: 64,
            channel_buffer: 1024,
            finished_tasks_remembered: 4096,
            max_body_bytes: 8 * 1024 * 1024,
            max_llms_per_register: 64,
            base_path: "/api/v1/llms".to_owned(),
        }
    }
}

impl Config {
    /// Checks that the values make sense together (e.g. a stale timeout longer than the
    /// heartbeat interval).
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |m: &str| Err(crate::Error::invalid(format!("invalid configuration: {m}")));
        if self.heartbeat_interval.is_zero() || self.gc_every.is_zero() {
            return bad("heartbeatInterval and gcEvery must be positive");
        }
        if self.stale_after <= self.heartbeat_interval {
            return bad("staleAfter must be longer than heartbeatInterval");
        }
        if self.reconnect_min > self.reconnect_max {
            return bad("reconnectMin must not exceed reconnectMax");
        }
        if self.task_buffer == 0 || self.channel_buffer == 0 || self.max_llms_per_register == 0 {
            return bad("taskBuffer, channelBuffer and maxLlmsPerRegister must be positive");
        }
        if !self.base_path.starts_with('/') || self.base_path.ends_with('/') {
            return bad("basePath starts with '/' and does not end with one");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_values_and_valid() {
        let c = Config::default();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.stale_after, Duration::from_secs(90));
        assert_eq!(c.gc_every, Duration::from_secs(60));
        assert_eq!(c.reap_after, Duration::from_secs(14_400));
        assert_eq!(c.keepalive, Duration::from_secs(20));
        assert_eq!(
            (c.reconnect_min, c.reconnect_max),
            (Duration::from_secs(5), Duration::from_secs(60))
        );
        assert_eq!(c.max_body_bytes, 8 << 20);
        assert_eq!(c.base_path, "/api/v1/llms");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_nonsense_are_refused() {
        assert!(serde_json::from_str::<Config>(r#"{"staleAfterr":"1s"}"#).is_err());
        let c = Config {
            stale_after: Duration::from_secs(10),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
