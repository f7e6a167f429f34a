//! Whole answers posted several at once: the publisher's side of the capability
//! `resultBatches` (`POST {base}/_provider-results`).
//!
//! Over HTTP each task's results are a request of their own, and a request costs both
//! sides a write, a read and an answer whatever it carries. A whole answer (one final
//! result) is the common case under load, and answers that are ready together can
//! share a request: each goes into a queue; a pump takes what is queued, up to
//! [`MAX_BATCH`] answers and [`MAX_BATCH_BYTES`], and posts it as NDJSON lines, with at
//! most [`POSTS_IN_FLIGHT`] such requests on their way. While they are, answers wait
//! in the queue and leave together in the next one; alone (one request at a time)
//! each answer leaves at once, as it would on its own.
//!
//! Each answer's sender learns its own outcome: delivered, refused (the gateway names
//! the task, with the status its own request would have had), or lost with the
//! request. A large answer is no use to batch and would risk the gateway's body limit
//! for the others: past [`MAX_LINE_BYTES`] it is posted alone, as before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;
use virtual_llm_core::TaskId;
use virtual_llm_core::protocol::{BatchAnswer, SESSION_HEADER};
use virtual_llm_core::publisher::WireError;

use crate::client::{SseWire, check, connection};

/// Most answers in one request.
pub(crate) const MAX_BATCH: usize = 64;

/// Most bytes of lines in one request: well under any gateway's body limit (8 MiB by
/// default), so that answers batched together are not refused for their sum.
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// An answer whose line is longer is posted alone.
pub(crate) const MAX_LINE_BYTES: usize = 32 * 1024;

/// Batch requests on their way at once.
pub(crate) const POSTS_IN_FLIGHT: usize = 4;

/// How long a batch request may take before its answers count as lost (the gateway
/// answers once every answer is delivered, which never waits on a client).
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// One answer waiting for its request.
struct Queued {
    task: TaskId,
    /// Its NDJSON line, without the line break.
    line: String,
    outcome: oneshot::Sender<Result<(), WireError>>,
}

/// The queue of one session's answers and the pump that posts them. Dropping it stops
/// the pump; the answers still queued are reported lost.
pub(crate) struct Batcher {
    queue: mpsc::UnboundedSender<Queued>,
    _pump: AbortOnDropHandle<()>,
}

impl Batcher {
    /// A batcher posting for `session` over `wire`.
    pub(crate) fn new(wire: SseWire, session: String) -> Self {
        // Unbounded in count, but each entry is one task's whole answer, and a
        // publisher runs at most its capacity of tasks at once.
        let (queue, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(wire, Arc::from(session), rx));
        Batcher {
            queue,
            _pump: AbortOnDropHandle::new(pump),
        }
    }

    /// Posts `line`, the whole answer of `task`, with the answers ready with it, and
    /// returns its own outcome.
    pub(crate) async fn send(&self, task: TaskId, line: String) -> Result<(), WireError> {
        let (outcome, answer) = oneshot::channel();
        self.queue
            .send(Queued {
                task,
                line,
                outcome,
            })
            .map_err(|_| WireError::Connection("the channel closed".into()))?;
        answer
            .await
            .map_err(|_| WireError::Connection("the channel closed".into()))?
    }
}

/// Takes the queued answers in batches, each sent once a request slot is free.
async fn pump(wire: SseWire, session: Arc<str>, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let slots = Arc::new(Semaphore::new(POSTS_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        // While every slot is taken, answers gather in the queue.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let batch = gather(first, &mut queue);
        let (wire, session) = (wire.clone(), session.clone());
        tokio::spawn(async move {
            post(&wire, &session, batch).await;
            drop(slot);
        });
    }
}

/// `first` and the answers queued behind it, within [`MAX_BATCH`] and
/// [`MAX_BATCH_BYTES`].
fn gather(first: Queued, queue: &mut mpsc::UnboundedReceiver<Queued>) -> Vec<Queued> {
    let mut bytes = first.line.len() + 1;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        let Ok(next) = queue.try_recv() else { break };
        bytes += next.line.len() + 1;
        batch.push(next);
    }
    batch
}

/// Posts `batch` and tells each answer's sender its outcome.
async fn post(wire: &SseWire, session: &str, batch: Vec<Queued>) {
    let mut body = String::with_capacity(batch.iter().map(|q| q.line.len() + 1).sum());
    for queued in &batch {
        body.push_str(&queued.line);
        body.push('\n');
    }
    tracing::trace!(answers = batch.len(), "answers leave in one request");
    let answered = async {
        let response = wire
            .request(reqwest::Method::POST, "_provider-results")
            .header(SESSION_HEADER, session)
            .header("content-type", "application/x-ndjson")
            .timeout(POST_TIMEOUT)
            .body(body)
            .send()
            .await
            .map_err(connection)?;
        check(response)
            .await?
            .json::<BatchAnswer>()
            .await
            .map_err(|e| WireError::Protocol(format!("bad batch answer: {e}")))
    };
    match answered.await {
        Ok(answer) => {
            let mut refused: HashMap<TaskId, WireError> = answer
                .refused
                .into_iter()
                .map(|r| (r.task_id, WireError::from_status(r.status, r.message)))
                .collect();
            for queued in batch {
                let outcome = refused.remove(&queued.task).map_or(Ok(()), Err);
                // The sender gave up waiting (its task was cancelled): nothing to tell.
                let _ = queued.outcome.send(outcome);
            }
        }
        Err(e) => {
            for queued in batch {
                let _ = queued.outcome.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use warp::Filter;

    use super::*;

    /// A gateway's `_provider-results` that hands each request's lines to the test and
    /// answers only when the test adds a permit, refusing `refuse` (404).
    async fn gateway(
        refuse: TaskId,
    ) -> (
        SseWire,
        mpsc::UnboundedReceiver<Vec<serde_json::Value>>,
        Arc<Semaphore>,
    ) {
        let (tx, requests) = mpsc::unbounded_channel();
        let answers = Arc::new(Semaphore::new(0));
        let permits = answers.clone();
        let route = warp::path!("api" / "v1" / "llms" / "_provider-results")
            .and(warp::header::<String>(SESSION_HEADER))
            .and(warp::body::bytes())
            .then(move |session: String, body: bytes::Bytes| {
                let (tx, permits, refuse) = (tx.clone(), permits.clone(), refuse.clone());
                async move {
                    assert_eq!(session, "s-1");
                    let lines: Vec<serde_json::Value> = body
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .map(|l| serde_json::from_slice(l).unwrap())
                        .collect();
                    let refused: Vec<_> = lines
                        .iter()
                        .filter(|l| l["taskId"] == refuse.as_str())
                        .map(|l| serde_json::json!({"taskId": l["taskId"], "status": 404, "message": "unknown task"}))
                        .collect();
                    tx.send(lines).unwrap();
                    permits.acquire().await.unwrap().forget();
                    warp::reply::json(&serde_json::json!({ "refused": refused }))
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let wire = SseWire::new(&format!("http://{addr}"), None).unwrap();
        (wire, requests, answers)
    }

    fn line(task: &TaskId) -> String {
        serde_json::json!({"type": "result", "taskId": task, "status": 200, "body": {}}).to_string()
    }

    /// Queues `task`'s answer and returns its outcome to come.
    fn queue(
        batcher: &Arc<Batcher>,
        task: &TaskId,
    ) -> tokio::task::JoinHandle<Result<(), WireError>> {
        let (batcher, task) = (batcher.clone(), task.clone());
        tokio::spawn(async move { batcher.send(task.clone(), line(&task)).await })
    }

    fn tasks_of(lines: &[serde_json::Value]) -> Vec<String> {
        lines
            .iter()
            .map(|l| l["taskId"].as_str().unwrap().to_owned())
            .collect()
    }

    /// One answer at a time leaves alone, at once; while every request slot is taken,
    /// the answers queued leave together, in order, in the next request; each sender
    /// learns its own outcome, the refused task its refusal.
    #[tokio::test]
    async fn answers_queued_while_every_slot_is_taken_leave_together() {
        let refuse = TaskId::generate();
        let (wire, mut requests, answers) = gateway(refuse.clone()).await;
        let batcher = Arc::new(Batcher::new(wire, "s-1".into()));
        let mut outcomes = Vec::new();
        for _ in 0..POSTS_IN_FLIGHT {
            let task = TaskId::generate();
            outcomes.push(queue(&batcher, &task));
            let lines = requests.recv().await.unwrap();
            assert_eq!(tasks_of(&lines), [task.to_string()], "alone, at once");
        }
        // Every slot is taken: these wait, in order, the refused one among them.
        let mut waiting: Vec<TaskId> = (0..9).map(|_| TaskId::generate()).collect();
        waiting.insert(4, refuse.clone());
        let mut later = Vec::new();
        for task in &waiting {
            later.push(queue(&batcher, task));
            tokio::task::yield_now().await;
        }
        answers.add_permits(1);
        let lines = requests.recv().await.unwrap();
        let expected: Vec<String> = waiting.iter().map(TaskId::to_string).collect();
        assert_eq!(tasks_of(&lines), expected, "together, in order");
        answers.add_permits(POSTS_IN_FLIGHT);
        for outcome in outcomes {
            assert!(outcome.await.unwrap().is_ok());
        }
        for (task, outcome) in waiting.iter().zip(later) {
            let outcome = outcome.await.unwrap();
            if *task == refuse {
                assert!(
                    matches!(outcome, Err(WireError::UnknownSession)),
                    "{outcome:?}"
                );
            } else {
                assert!(outcome.is_ok(), "{outcome:?}");
            }
        }
    }

    /// A request that fails (nobody listens) fails every answer in it, and the
    /// batcher's senders hear of it.
    #[tokio::test]
    async fn a_lost_request_fails_each_answer_in_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let wire = SseWire::new(&format!("http://{addr}"), None).unwrap();
        let batcher = Arc::new(Batcher::new(wire, "s-1".into()));
        let outcomes: Vec<_> = (0..3)
            .map(|_| queue(&batcher, &TaskId::generate()))
            .collect();
        for outcome in outcomes {
            assert!(
                matches!(outcome.await.unwrap(), Err(WireError::Connection(_))),
                "lost"
            );
        }
    }

    /// At most [`MAX_BATCH`] answers and about [`MAX_BATCH_BYTES`] go in one request.
    #[test]
    fn a_batch_stops_at_its_count_or_its_bytes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queued = |bytes: usize| {
            let (outcome, _) = oneshot::channel();
            Queued {
                task: TaskId::generate(),
                line: "x".repeat(bytes),
                outcome,
            }
        };
        for _ in 0..MAX_BATCH + 10 {
            tx.send(queued(10)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        assert_eq!(gather(first, &mut rx).len(), MAX_BATCH);
        while rx.try_recv().is_ok() {}
        for _ in 0..10 {
            tx.send(queued(MAX_BATCH_BYTES / 4)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        assert_eq!(
            gather(first, &mut rx).len(),
            4,
            "the fourth reaches the bytes"
        );
    }
}
