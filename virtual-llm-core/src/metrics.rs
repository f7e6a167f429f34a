//! Metrics, through the `metrics` facade: a no-op until the application installs a
//! recorder (the reference gateway installs a Prometheus exporter and serves
//! `GET /metrics`). Every name the core emits is defined here.

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::{Error, Gateway, LlmKind, LlmStatus};

/// Publishers with a bound control channel (gauge).
pub const PUBLISHERS_CONNECTED: &str = "virtual_llm_publishers_connected";
/// Registry rows of LLMs by `kind` and `status` (gauge); agents are counted apart.
pub const ROWS: &str = "virtual_llm_rows";
/// Agents (SPEC §13) by the `status` of their own row: their session's lifecycle
/// (gauge).
pub const AGENTS: &str = "virtual_llm_agents";
/// Tasks waiting for their outcome (gauge).
pub const TASKS_IN_FLIGHT: &str = "virtual_llm_tasks_in_flight";
/// From a task's start to its first event: the relay latency a client feels (histogram).
pub const TASK_FIRST_EVENT: &str = "virtual_llm_task_first_event_seconds";
/// From a task's start to its outcome (histogram).
pub const TASK_DURATION: &str = "virtual_llm_task_duration_seconds";
/// Task outcomes by `code`: `ok`, an upstream status like `upstream_400`, an error
/// code like `deadline_exceeded`, or `cancelled` (counter).
pub const TASK_OUTCOMES: &str = "virtual_llm_task_outcomes_total";
/// Channels of resuming sessions (SPEC §15) that closed with tasks in flight, which
/// were held for the publisher to resume (counter).
pub const RESUME_HOLDS: &str = "virtual_llm_resume_holds_total";
/// Held tasks the publisher resumed on its next channel (counter).
pub const RESUMED_TASKS: &str = "virtual_llm_resumed_tasks_total";
/// Held tasks lost: not resumed within the resume window, or resumed past a lost
/// chunk (counter).
pub const RESUME_LOST: &str = "virtual_llm_resume_lost_tasks_total";

/// Tasks in flight on a pool's rows on this replica, by `pool` (gauge).
pub const POOL_IN_FLIGHT: &str = "virtual_llm_pool_in_flight";
/// The summed `maxConcurrent` of a pool's serving rows, by `pool`; absent while one of
/// them has no limit (gauge).
pub const POOL_CAPACITY: &str = "virtual_llm_pool_capacity";
/// Requests waiting in a pool's admission queue on this replica, by `pool` (gauge).
pub const QUEUE_DEPTH: &str = "virtual_llm_queue_depth";
/// How long admitted requests waited in a queue for their slot (histogram).
pub const QUEUE_WAIT: &str = "virtual_llm_queue_wait_seconds";
/// Requests that left a queue without a slot, by `reason`: `queue_full`,
/// `queue_timeout`, `left` (the client went away) (counter).
pub const QUEUE_REJECTIONS: &str = "virtual_llm_queue_rejections_total";
/// Requests sent to another member of their pool after a failed dispatch (counter).
pub const FAILOVERS: &str = "virtual_llm_failovers_total";
/// Rows passed over for a while after failing dispatches in a row (counter).
pub const COOLDOWNS: &str = "virtual_llm_cooldowns_total";

/// Wakes asked of hibernating LLMs (counter).
pub const WAKES: &str = "virtual_llm_wakes_total";
/// From asking for a wake to the LLM reporting ready (histogram).
pub const WAKE_TIME: &str = "virtual_llm_wake_seconds";
/// Wakes that failed: the recipe, the ready timeout, or the waker itself (counter).
pub const WAKE_FAILURES: &str = "virtual_llm_wake_failures_total";

/// Histogram buckets, in seconds, that fit both a relay hop and a long generation.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Registers the help texts of every metric with the installed recorder.
pub fn describe() {
    describe_gauge!(
        PUBLISHERS_CONNECTED,
        "Publishers with a bound control channel."
    );
    describe_gauge!(ROWS, "Registry rows of LLMs by kind and status.");
    describe_gauge!(AGENTS, "Agents by the status of their own row.");
    describe_gauge!(TASKS_IN_FLIGHT, "Relayed tasks waiting for their outcome.");
    describe_histogram!(
        TASK_FIRST_EVENT,
        Unit::Seconds,
        "Task start to its first event."
    );
    describe_histogram!(TASK_DURATION, Unit::Seconds, "Task start to its outcome.");
    describe_counter!(TASK_OUTCOMES, "Task outcomes by code.");
    describe_counter!(
        RESUME_HOLDS,
        "Closed channels whose in-flight tasks were held for a resume."
    );
    describe_counter!(RESUMED_TASKS, "Held tasks resumed by their publisher.");
    describe_counter!(
        RESUME_LOST,
        "Held tasks lost: not resumed in time, or resumed past a lost chunk."
    );
    describe_gauge!(POOL_IN_FLIGHT, "Tasks in flight on a pool's rows.");
    describe_gauge!(
        POOL_CAPACITY,
        "Summed maxConcurrent of a pool's serving rows."
    );
    describe_gauge!(QUEUE_DEPTH, "Requests waiting in a pool's admission queue.");
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time admitted requests waited for a slot."
    );
    describe_counter!(
        QUEUE_REJECTIONS,
        "Requests that left a queue without a slot, by reason."
    );
    describe_counter!(
        FAILOVERS,
        "Requests sent to another pool member after a failed dispatch."
    );
    describe_counter!(
        COOLDOWNS,
        "Rows passed over after failing dispatches in a row."
    );
    describe_counter!(WAKES, "Wakes asked of hibernating LLMs.");
    describe_histogram!(WAKE_TIME, Unit::Seconds, "Wake asked to LLM ready.");
    describe_counter!(WAKE_FAILURES, "Wakes that failed.");
    crate::usage::describe();
    describe_completions();
}

pub(crate) fn resume_held() {
    counter!(RESUME_HOLDS).increment(1);
}

pub(crate) fn task_resumed() {
    counter!(RESUMED_TASKS).increment(1);
}

pub(crate) fn resume_lost(tasks: usize) {
    counter!(RESUME_LOST).increment(tasks as u64);
}

pub(crate) fn wake_started() {
    counter!(WAKES).increment(1);
}

pub(crate) fn woke(took: Duration) {
    histogram!(WAKE_TIME).record(took.as_secs_f64());
}

pub(crate) fn wake_failed() {
    counter!(WAKE_FAILURES).increment(1);
}

pub(crate) fn queue_waited(waited: Duration) {
    histogram!(QUEUE_WAIT).record(waited.as_secs_f64());
}

pub(crate) fn queue_rejected(reason: &'static str) {
    counter!(QUEUE_REJECTIONS, "reason" => reason).increment(1);
}

pub(crate) fn failed_over() {
    counter!(FAILOVERS).increment(1);
}

pub(crate) fn cooled_down() {
    counter!(COOLDOWNS).increment(1);
}

pub(crate) fn first_event(elapsed: Duration) {
    histogram!(TASK_FIRST_EVENT).record(elapsed.as_secs_f64());
}

/// The outcome of a task: `status` for a completion, or its error.
pub(crate) fn outcome(elapsed: Duration, result: Result<Option<u16>, &Error>) {
    histogram!(TASK_DURATION).record(elapsed.as_secs_f64());
    let code = match result {
        Ok(None | Some(200..=299)) => "ok".to_owned(),
        Ok(Some(status)) => format!("upstream_{status}"),
        Err(e) => e.code().to_owned(),
    };
    counter!(TASK_OUTCOMES, "code" => code).increment(1);
}

pub(crate) fn cancelled() {
    counter!(TASK_OUTCOMES, "code" => "cancelled").increment(1);
}

impl Gateway {
    /// Sets the gauges from the current state: connected publishers, tasks in flight,
    /// rows by kind and status, and each pool's load and queue (a list of the
    /// registry). Call it before rendering.
    pub async fn refresh_gauges(&self) -> Result<(), Error> {
        gauge!(PUBLISHERS_CONNECTED).set(self.local_channels() as f64);
        gauge!(TASKS_IN_FLIGHT).set(self.in_flight() as f64);
        let (agents, rows): (Vec<_>, Vec<_>) = (self.store().list().await?)
            .into_iter()
            .partition(crate::LlmRecord::is_agent);
        let pools: std::collections::BTreeSet<&crate::LlmName> =
            rows.iter().map(crate::LlmRecord::pool_key).collect();
        for pool in pools {
            let load = self.pool_load(pool);
            let name = pool.to_string();
            gauge!(POOL_IN_FLIGHT, "pool" => name.clone()).set(f64::from(load.in_flight));
            gauge!(QUEUE_DEPTH, "pool" => name.clone()).set(f64::from(load.queued));
            if let Some(capacity) = load.capacity {
                gauge!(POOL_CAPACITY, "pool" => name).set(f64::from(capacity));
            }
        }
        for kind in [LlmKind::Public, LlmKind::Virtual] {
            for status in [
                LlmStatus::Active,
                LlmStatus::Inactive,
                LlmStatus::Hibernating,
            ] {
                let n = rows
                    .iter()
                    .filter(|r| r.kind == kind && r.status == status)
                    .count();
                let (kind, status) = (label(kind), status_label(status));
                gauge!(ROWS, "kind" => kind, "status" => status).set(n as f64);
            }
        }
        for status in [
            LlmStatus::Active,
            LlmStatus::Inactive,
            LlmStatus::Hibernating,
        ] {
            let n = agents.iter().filter(|r| r.status == status).count();
            gauge!(AGENTS, "status" => status_label(status)).set(n as f64);
        }
        Ok(())
    }
}

fn label(kind: LlmKind) -> &'static str {
    match kind {
        LlmKind::Public => "public",
        LlmKind::Virtual => "virtual",
    }
}

fn status_label(status: LlmStatus) -> &'static str {
    match status {
        LlmStatus::Active => "active",
        LlmStatus::Inactive => "inactive",
        LlmStatus::Hibernating => "hibernating",
    }
}

/// Streamed answers a client resumed (`GET /v1/chat/completions/{id}/stream`,
/// SPEC §15) (counter).
pub const CLIENT_RESUMES: &str = "virtual_llm_client_resumes_total";
/// Streamed answers kept for their clients to resume, live or ended (gauge).
pub const COMPLETIONS_KEPT: &str = "virtual_llm_completions_kept";
/// Bytes of chunks kept for clients to resume, all answers together (gauge).
pub const COMPLETIONS_KEPT_BYTES: &str = "virtual_llm_completions_kept_bytes";

fn describe_completions() {
    describe_counter!(CLIENT_RESUMES, "Streamed answers a client resumed.");
    describe_gauge!(
        COMPLETIONS_KEPT,
        "Streamed answers kept for their clients to resume."
    );
    describe_gauge!(
        COMPLETIONS_KEPT_BYTES,
        Unit::Bytes,
        "Bytes held for clients to resume: chunks, their ends, room to grow."
    );
}

pub(crate) fn client_resumed() {
    counter!(CLIENT_RESUMES).increment(1);
}

/// The completion log's size: answers and bytes kept.
pub(crate) fn completions_kept(answers: usize, bytes: usize) {
    gauge!(COMPLETIONS_KEPT).set(answers as f64);
    gauge!(COMPLETIONS_KEPT_BYTES).set(bytes as f64);
}
