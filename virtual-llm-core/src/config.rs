//! Configuration: every duration and limit of the lifecycle and relay, in one struct.
//!
//! Defaults are those of SPEC §3 and §5. The struct deserializes from a config file
//! with human durations (`"90s"`, `"4h"`) and any field left out keeps its default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::limits::Limits;

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
    /// Keep-alive ping on idle control channels, so proxies do not cut them and both
    /// ends notice a dead one. Sent to publishers in `hello` and the register answer
    /// (`keepAliveMs`): a publisher calls its channel dead after three keep-alive
    /// periods without a byte from the gateway. Default 20 s.
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
    /// Most requests waiting in one pool's admission queue; one more is a 429
    /// `queue_full`. Default 256.
    pub queue_depth: usize,
    /// Longest a request waits in a pool's queue for a free slot before a 503
    /// `queue_timeout` (a client's `x-request-timeout` may ask for less). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub queue_wait: Duration,
    /// How many other members of a pool a request is sent to when a dispatch fails
    /// before its first byte reached the client. Default 2.
    pub pool_retries: usize,
    /// Failed dispatches in a row after which a row is passed over for `cooldown`.
    /// Default 3.
    pub cooldown_after: u32,
    /// How long a failing row is passed over. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Longest a request waits for a hibernating LLM to wake (SPEC §12); then 503
    /// `wake_timeout`. Default 120 s.
    #[serde(with = "humantime_serde")]
    pub wake_wait: Duration,
    /// After a failed wake, how long requests get 503 `wake_failed` at once and no
    /// wake is tried again. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub wake_cooldown: Duration,
    /// How old the gateway's in-memory view of a pool's rows may grow before a request
    /// reads them from the store again (see [`RegistryView`](crate::RegistryView)).
    /// This gateway's own writes reach the view at once; the bound is for writes by
    /// another gateway sharing the store. Zero reads the store on every request.
    /// Default 1 s.
    #[serde(with = "humantime_serde")]
    pub registry_staleness: Duration,
    /// How long a replica's lease runs after each renewal (SPEC §14): when a replica
    /// stops renewing (it died), the rows whose channels it held go inactive this long
    /// after its last renewal (plus `leaseSkew`), at the next lease tick of a live
    /// replica. Only for a store that keeps leases (several gateway processes on one
    /// store); a store for one process has its restart demote them. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often a replica renews its lease and looks for expired ones. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub lease_renew: Duration,
    /// How far the replicas' clocks may disagree: a lease counts as expired only this
    /// long after the expiry its replica wrote, by the clock of the replica that reads
    /// it. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub lease_skew: Duration,
    /// The limits of every principal that has none of its own (SPEC §16), key by key:
    /// `requestsPerMinute`, `tokensPerMinute`, `maxConcurrent` (default: none), and
    /// for publishers `maxNames` (default 256) and `maxSessions` (default 64).
    pub limits: Limits,
    /// The most distinct values of the `llm` and `principal` labels of the request
    /// and usage metrics; past it, a new one is counted as `other`. Default 256.
    pub metric_labels: usize,
    /// How long the in-flight tasks of a publisher that declared the capability
    /// `resume` wait for its session to bind again after its channel closes (SPEC §15);
    /// their deadlines keep running. After it, or at once for a publisher without the
    /// capability, they fail with 503. Zero turns resuming off. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub resume_window: Duration,
    /// How long a streamed answer's chunks are kept after it ends (or breaks) for its
    /// client to resume it (`GET /v1/chat/completions/{id}/stream`). Zero keeps none.
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub client_resume_window: Duration,
    /// The most bytes one streamed answer may hold for its client to resume (its
    /// chunks, a word per chunk, and while it runs its buffers' room to grow); past it,
    /// the answer can no longer be resumed. Default 1 MiB.
    pub client_resume_bytes: usize,
    /// The most bytes held for clients to resume, all answers together (counted as for
    /// `client_resume_bytes`); the oldest finished answers go first. Default 64 MiB.
    pub client_resume_total_bytes: usize,
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
            queue_depth: 256,
            queue_wait: Duration::from_secs(30),
            pool_retries: 2,
            cooldown_after: 3,
            cooldown: Duration::from_secs(5),
            wake_wait: Duration::from_secs(120),
            wake_cooldown: Duration::from_secs(30),
            registry_staleness: Duration::from_secs(1),
            lease: Duration::from_secs(15),
            lease_renew: Duration::from_secs(5),
            lease_skew: Duration::from_secs(2),
            limits: Limits::default(),
            metric_labels: 256,
            resume_window: Duration::from_secs(10),
            client_resume_window: Duration::from_secs(60),
            client_resume_bytes: 1024 * 1024,
            client_resume_total_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Checks that the values make sense, alone and together; the error names the
    /// settings (by their config key) and their values.
    ///
    /// The rules:
    /// - every duration is positive, and `heartbeatInterval` and `keepalive` (sent to
    ///   publishers in milliseconds) are at least 1 ms;
    /// - `staleAfter` is at least twice `heartbeatInterval`: one late heartbeat must
    ///   not take a publisher's rows out of service;
    /// - `keepalive` is shorter than `staleAfter`: the keep-alive is how a dead channel
    ///   is noticed (a failed ping, missing pongs, a publisher's watchdog), and a dead
    ///   publisher's channel must not outlive the moment its rows go stale;
    /// - `reconnectMin` is at most `reconnectMax`;
    /// - `lease` is at least twice `leaseRenew`;
    /// - `taskBuffer`, `channelBuffer`, `maxLlmsPerRegister`, `maxBodyBytes` and
    ///   `cooldownAfter` are positive (`queueDepth` 0 turns the queue off: a pool
    ///   with no free slot answers 429 at once);
    /// - `basePath` starts with `/` and does not end with one.
    ///
    /// ```
    /// use std::time::Duration;
    /// use virtual_llm_core::Config;
    ///
    /// let config = Config {
    ///     heartbeat_interval: Duration::from_secs(1),
    ///     stale_after: Duration::from_secs(3),
    ///     ..Config::default()
    /// };
    /// let err = config.validate().unwrap_err();
    /// assert!(err.to_string().contains("keepalive (20s) must be shorter than staleAfter (3s)"));
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        let durations = [
            ("heartbeatInterval", self.heartbeat_interval),
            ("staleAfter", self.stale_after),
            ("gcEvery", self.gc_every),
            ("reapAfter", self.reap_after),
            ("keepalive", self.keepalive),
            ("reconnectMin", self.reconnect_min),
            ("reconnectMax", self.reconnect_max),
            ("taskDeadline", self.task_deadline),
            ("streamIdleTimeout", self.stream_idle_timeout),
            ("queueWait", self.queue_wait),
            ("cooldown", self.cooldown),
            ("wakeWait", self.wake_wait),
            ("wakeCooldown", self.wake_cooldown),
            ("lease", self.lease),
            ("leaseRenew", self.lease_renew),
        ];
        for (key, value) in durations {
            if value.is_zero() {
                return invalid(&[key], format!("{key} must be positive"));
            }
        }
        for (key, value) in [
            ("heartbeatInterval", self.heartbeat_interval),
            ("keepalive", self.keepalive),
        ] {
            if value < Duration::from_millis(1) {
                return invalid(
                    &[key],
                    format!(
                        "{key} ({}) must be at least 1ms: publishers get it in milliseconds",
                        show(value)
                    ),
                );
            }
        }
        if self.stale_after < self.heartbeat_interval.saturating_mul(2) {
            return invalid(
                &["staleAfter", "heartbeatInterval"],
                format!(
                    "staleAfter ({}) must be at least twice heartbeatInterval ({}), so that one late heartbeat does not take rows out of service",
                    show(self.stale_after),
                    show(self.heartbeat_interval)
                ),
            );
        }
        if self.keepalive >= self.stale_after {
            return invalid(
                &["keepalive", "staleAfter"],
                format!(
                    "keepalive ({}) must be shorter than staleAfter ({}): the keep-alive is how a dead control channel is noticed",
                    show(self.keepalive),
                    show(self.stale_after)
                ),
            );
        }
        if self.lease < self.lease_renew.saturating_mul(2) {
            return invalid(
                &["lease", "leaseRenew"],
                format!(
                    "lease ({}) must be at least twice leaseRenew ({}), so that one late renewal does not end a live replica's lease",
                    show(self.lease),
                    show(self.lease_renew)
                ),
            );
        }
        if self.reconnect_min > self.reconnect_max {
            return invalid(
                &["reconnectMin", "reconnectMax"],
                format!(
                    "reconnectMin ({}) must not exceed reconnectMax ({})",
                    show(self.reconnect_min),
                    show(self.reconnect_max)
                ),
            );
        }
        for (key, value) in [
            ("taskBuffer", self.task_buffer),
            ("channelBuffer", self.channel_buffer),
            ("maxLlmsPerRegister", self.max_llms_per_register),
            ("maxBodyBytes", self.max_body_bytes),
            ("cooldownAfter", self.cooldown_after as usize),
        ] {
            if value == 0 {
                return invalid(&[key], format!("{key} must be positive"));
            }
        }
        for (key, value) in [
            ("clientResumeBytes", self.client_resume_bytes),
            ("clientResumeTotalBytes", self.client_resume_total_bytes),
        ] {
            if value == 0 {
                return invalid(
                    &[key],
                    format!(
                        "{key} must be positive; clientResumeWindow = \"0s\" turns resuming off"
                    ),
                );
            }
        }
        self.limits.validate()?;
        if !self.base_path.starts_with('/') || self.base_path.ends_with('/') {
            return invalid(
                &["basePath"],
                format!(
                    "basePath ({:?}) starts with '/' and does not end with one",
                    self.base_path
                ),
            );
        }
        Ok(())
    }
}

fn invalid(settings: &[&'static str], reason: String) -> Result<(), Error> {
    Err(Error::InvalidConfig {
        settings: settings.to_vec(),
        reason,
    })
}

/// A duration as people write it in the config (`90s`, `1m 30s`).
fn show(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
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
        assert_eq!(
            (c.lease, c.lease_renew, c.lease_skew),
            (
                Duration::from_secs(15),
                Duration::from_secs(5),
                Duration::from_secs(2)
            )
        );
        c.validate().unwrap();
    }

    #[test]
    fn client_resume_bounds_are_positive_and_a_zero_window_turns_it_off() {
        let (settings, message) = refused(Config {
            client_resume_bytes: 0,
            ..Config::default()
        });
        assert_eq!(settings, ["clientResumeBytes"]);
        assert!(message.contains("clientResumeWindow"), "{message}");
        let (settings, _) = refused(Config {
            client_resume_total_bytes: 0,
            ..Config::default()
        });
        assert_eq!(settings, ["clientResumeTotalBytes"]);
        Config {
            client_resume_window: Duration::ZERO,
            ..Config::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn a_lease_must_outlast_two_renewals() {
        let (settings, message) = refused(Config {
            lease: Duration::from_secs(9),
            lease_renew: Duration::from_secs(5),
            ..Config::default()
        });
        assert_eq!(settings, ["lease", "leaseRenew"]);
        assert!(
            message.contains("lease (9s) must be at least twice leaseRenew (5s)"),
            "{message}"
        );
    }

    /// The settings an error names, or a panic if the config is valid.
    fn refused(config: Config) -> (Vec<&'static str>, String) {
        let err = config.validate().expect_err("an invalid configuration");
        let message = err.to_string();
        match err {
            Error::InvalidConfig { settings, .. } => (settings, message),
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn timings_that_cannot_work_together_are_refused_naming_the_settings() {
        let secs = Duration::from_secs;
        // The stale timeout must leave room for one late heartbeat.
        let (settings, message) = refused(Config {
            heartbeat_interval: secs(10),
            stale_after: secs(15),
            ..Config::default()
        });
        assert_eq!(settings, ["staleAfter", "heartbeatInterval"]);
        assert!(
            message.contains("staleAfter (15s) must be at least twice heartbeatInterval (10s)"),
            "{message}"
        );
        Config {
            heartbeat_interval: secs(10),
            stale_after: secs(30),
            ..Config::default()
        }
        .validate()
        .unwrap();
        // Short heartbeats with a stale timeout under the keep-alive.
        let (settings, message) = refused(Config {
            heartbeat_interval: secs(1),
            stale_after: secs(3),
            ..Config::default()
        });
        assert_eq!(settings, ["keepalive", "staleAfter"]);
        assert!(
            message.contains("keepalive (20s) must be shorter than staleAfter (3s)"),
            "{message}"
        );
        Config {
            heartbeat_interval: secs(1),
            stale_after: secs(3),
            keepalive: secs(1),
            ..Config::default()
        }
        .validate()
        .unwrap();
        // Zero durations would spin or panic (a zero-period interval).
        for (key, config) in [
            (
                "heartbeatInterval",
                Config {
                    heartbeat_interval: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "gcEvery",
                Config {
                    gc_every: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "keepalive",
                Config {
                    keepalive: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "reconnectMin",
                Config {
                    reconnect_min: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "taskDeadline",
                Config {
                    task_deadline: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "streamIdleTimeout",
                Config {
                    stream_idle_timeout: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "keepalive",
                Config {
                    keepalive: Duration::from_micros(500),
                    ..Config::default()
                },
            ),
        ] {
            assert_eq!(refused(config).0, [key]);
        }
        let (settings, _) = refused(Config {
            reconnect_min: secs(61),
            ..Config::default()
        });
        assert_eq!(settings, ["reconnectMin", "reconnectMax"]);
        let (settings, _) = refused(Config {
            max_body_bytes: 0,
            ..Config::default()
        });
        assert_eq!(settings, ["maxBodyBytes"]);
        let (settings, message) = refused(Config {
            limits: Limits {
                max_names: Some(0),
                ..Limits::default()
            },
            ..Config::default()
        });
        assert_eq!(settings, ["limits.maxNames"]);
        assert!(message.contains("maxNames must be positive"), "{message}");
        let limits: Config =
            serde_json::from_str(r#"{"limits": {"requestsPerMinute": 60, "maxSessions": 2}}"#)
                .unwrap();
        assert_eq!(limits.limits.requests_per_minute, Some(60));
        assert_eq!(limits.limits.max_sessions(), 2);
        assert!(serde_json::from_str::<Config>(r#"{"limits": {"rpm": 1}}"#).is_err());
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
