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
//! Each answer's sender learns its own outcome: delivered, or refused (the gateway
//! names the task, with the status its own request would have had). When a batch
//! fails as a whole (the gateway refused it: a body over a small body limit, a replica
//! without the route; or the request was lost), each of its answers is posted alone,
//! as without batches, and learns its outcome from that. An answer whose line is over
//! [`MAX_LINE_BYTES`] is posted alone from the start, and one whose task was
//! cancelled while it waited is not posted at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;
use virtual_llm_core::protocol::{BatchAnswer, PublisherFrame, SESSION_HEADER, TaskResult};
use virtual_llm_core::publisher::WireError;
use virtual_llm_core::{SessionId, TaskId};

use crate::client::{SseWire, check, connection};

/// Most answers in one request.
pub(crate) const MAX_BATCH: usize = 64;

/// Most bytes of lines in one request: well under a gateway's default body limit
/// (8 MiB), so that answers batched together are not refused for their sum.
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// An answer whose line is longer is posted alone.
pub(crate) const MAX_LINE_BYTES: usize = 32 * 1024;

/// Batch requests on their way at once.
pub(crate) const POSTS_IN_FLIGHT: usize = 4;

/// How long a batch request may take before it counts as lost (the gateway answers
/// once every answer is delivered, which never waits on a client); its answers are
/// then posted alone.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `result` may go into a batch: a whole answer or an error. (A stream's last
/// chunk ends its task too, but a stream is posted per task.)
pub(crate) fn batchable(result: &TaskResult) -> bool {
    matches!(
        result,
        TaskResult::Completed { .. } | TaskResult::Failed { .. }
    )
}

/// One answer waiting for its request.
struct Queued {
    task: TaskId,
    /// The answer, kept to post it alone if its batch fails (its body is shared).
    result: TaskResult,
    /// Its NDJSON line, without the line break.
    line: String,
    outcome: oneshot::Sender<Result<(), WireError>>,
}

/// The queue of one session's answers and the pump that posts them. Dropping it stops
/// the pump and drops the answers still queued; requests already on their way end on
/// their own, within [`POST_TIMEOUT`].
pub(crate) struct Batcher {
    wire: SseWire,
    session: SessionId,
    queue: mpsc::UnboundedSender<Queued>,
    _pump: AbortOnDropHandle<()>,
}

impl Batcher {
    /// A batcher posting for `session` over `wire`.
    pub(crate) fn new(wire: SseWire, session: SessionId) -> Self {
        // Unbounded in count, but each entry is one task's whole answer, and a
        // publisher runs at most its capacity of tasks at once.
        let (queue, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(wire.clone(), session.clone(), rx));
        Batcher {
            wire,
            session,
            queue,
            _pump: AbortOnDropHandle::new(pump),
        }
    }

    /// Posts `result`, the whole answer of `task` (see [`batchable`]), with the
    /// answers ready with it, and returns its own outcome.
    pub(crate) async fn send(&self, task: TaskId, result: TaskResult) -> Result<(), WireError> {
        let line = PublisherFrame::for_result(task.clone(), result.clone())
            .to_text(false)
            .map_err(|e| WireError::Protocol(format!("cannot encode a result: {e}")))?;
        if line.len() > MAX_LINE_BYTES {
            return self.wire.post_whole(&self.session, &task, &result).await;
        }
        let (outcome, answer) = oneshot::channel();
        self.queue
            .send(Queued {
                task,
                result,
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
async fn pump(wire: SseWire, session: SessionId, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let slots = Arc::new(Semaphore::new(POSTS_IN_FLIGHT));
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // While every slot is taken, answers gather in the queue.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (batch, rest) = gather(first, &mut queue);
        next = rest;
        if batch.is_empty() {
            continue;
        }
        let (wire, session) = (wire.clone(), session.clone());
        tokio::spawn(async move {
            post(&wire, &session, batch).await;
            drop(slot);
        });
    }
}

/// `first` and the answers queued behind it, within [`MAX_BATCH`] and
/// [`MAX_BATCH_BYTES`], leaving out those whose sender stopped waiting (the task was
/// cancelled); and the first answer that did not fit, for the next batch.
fn gather(
    first: Queued,
    queue: &mut mpsc::UnboundedReceiver<Queued>,
) -> (Vec<Queued>, Option<Queued>) {
    let mut batch: Vec<Queued> = Vec::new();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(queued) = next.take().or_else(|| {
        (batch.len() < MAX_BATCH)
            .then(|| queue.try_recv().ok())
            .flatten()
    }) {
        if queued.outcome.is_closed() {
            continue;
        }
        let size = queued.line.len() + 1;
        if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
            return (batch, Some(queued));
        }
        bytes += size;
        batch.push(queued);
    }
    (batch, None)
}

/// Posts `batch` and tells each answer's sender its outcome; if the batch fails as a
/// whole, posts each answer alone.
async fn post(wire: &SseWire, session: &SessionId, batch: Vec<Queued>) {
    let mut body = String::with_capacity(batch.iter().map(|q| q.line.len() + 1).sum());
    for queued in &batch {
        body.push_str(&queued.line);
        body.push('\n');
    }
    tracing::trace!(answers = batch.len(), "answers leave in one request");
    let answered = async {
        let response = wire
            .request(reqwest::Method::POST, "_provider-results")
            .header(SESSION_HEADER, session.as_str())
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
            tracing::debug!(answers = batch.len(), error = %e, "a batch failed; its answers go alone");
            let alone = batch.into_iter().map(|queued| async move {
                let outcome = wire.post_whole(session, &queued.task, &queued.result).await;
                let _ = queued.outcome.send(outcome);
            });
            futures::future::join_all(alone).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use warp::Filter;

    use super::*;

    /// What a test gateway saw: each request's path and its lines.
    type Seen = mpsc::UnboundedReceiver<(String, Vec<serde_json::Value>)>;

    /// A gateway whose `_provider-results` hands each request's lines to the test and
    /// answers only when the test adds a permit, refusing `refuse` (404) — or, with
    /// `batches` false, answers 404 as a gateway without the route; and whose
    /// per-task result route takes every answer but `refuse`'s.
    async fn gateway(refuse: TaskId, batches: bool) -> (SseWire, SessionId, Seen, Arc<Semaphore>) {
        let session = SessionId::generate();
        let (tx, seen) = mpsc::unbounded_channel();
        let answers = Arc::new(Semaphore::new(0));
        let (permits, expected) = (answers.clone(), session.to_string());
        let (alone_tx, alone_refuse, alone_session) =
            (tx.clone(), refuse.clone(), expected.clone());
        let results = warp::path!("api" / "v1" / "llms" / "_provider-results")
            .and(warp::header::<String>(SESSION_HEADER))
            .and(warp::body::bytes())
            .then(move |session: String, body: bytes::Bytes| {
                let (tx, permits, refuse) = (tx.clone(), permits.clone(), refuse.clone());
                let expected = expected.clone();
                async move {
                    assert_eq!(session, expected);
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
                    tx.send(("batch".to_owned(), lines)).unwrap();
                    if !batches {
                        return warp::reply::with_status(
                            warp::reply::json(&serde_json::json!({"error": {"message": "no route"}})),
                            warp::http::StatusCode::NOT_FOUND,
                        );
                    }
                    permits.acquire().await.unwrap().forget();
                    warp::reply::with_status(
                        warp::reply::json(&serde_json::json!({ "refused": refused })),
                        warp::http::StatusCode::OK,
                    )
                }
            });
        let alone = warp::path!("api" / "v1" / "llms" / "_provider-task" / String / "result")
            .and(warp::header::<String>(SESSION_HEADER))
            .and(warp::body::json::<serde_json::Value>())
            .map(
                move |task: String, session: String, result: serde_json::Value| {
                    assert_eq!(session, alone_session);
                    alone_tx
                        .send((format!("alone {task}"), vec![result]))
                        .unwrap();
                    let status = if task == alone_refuse.as_str() {
                        warp::http::StatusCode::NOT_FOUND
                    } else {
                        warp::http::StatusCode::NO_CONTENT
                    };
                    warp::reply::with_status(warp::reply(), status)
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(results.or(alone)).incoming(listener).run());
        let wire = SseWire::new(&format!("http://{addr}"), None).unwrap();
        (wire, session, seen, answers)
    }

    fn answer(text: &str) -> TaskResult {
        TaskResult::Completed {
            status: 200,
            body: serde_json::json!({ "text": text }).into(),
            retry_after: None,
        }
    }

    /// Queues `task`'s answer and returns its outcome to come.
    fn queue(
        batcher: &Arc<Batcher>,
        task: &TaskId,
    ) -> tokio::task::JoinHandle<Result<(), WireError>> {
        let (batcher, task) = (batcher.clone(), task.clone());
        tokio::spawn(async move { batcher.send(task.clone(), answer(task.as_str())).await })
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
        let (wire, session, mut seen, answers) = gateway(refuse.clone(), true).await;
        let batcher = Arc::new(Batcher::new(wire, session));
        let mut outcomes = Vec::new();
        for _ in 0..POSTS_IN_FLIGHT {
            let task = TaskId::generate();
            outcomes.push(queue(&batcher, &task));
            let (path, lines) = seen.recv().await.unwrap();
            assert_eq!(path, "batch");
            assert_eq!(tasks_of(&lines), [task.to_string()], "alone, at once");
            assert_eq!(lines[0]["type"], "result");
            assert_eq!(lines[0]["body"]["text"], task.as_str());
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
        let (_, lines) = seen.recv().await.unwrap();
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
        assert!(seen.try_recv().is_err(), "no request more");
    }

    /// A batch the gateway refuses whole (here a 404: a replica without the route)
    /// is posted again answer by answer, each as its own result request, and each
    /// sender learns that request's outcome.
    #[tokio::test]
    async fn a_batch_refused_whole_goes_answer_by_answer() {
        let refuse = TaskId::generate();
        let (wire, session, mut seen, _answers) = gateway(refuse.clone(), false).await;
        let batcher = Arc::new(Batcher::new(wire, session));
        let (first, second) = (TaskId::generate(), refuse.clone());
        let outcomes = [queue(&batcher, &first), queue(&batcher, &second)];
        let mut alone = Vec::new();
        while alone.len() < 2 {
            let (path, lines) = seen.recv().await.unwrap();
            if let Some(task) = path.strip_prefix("alone ") {
                assert_eq!(lines[0]["body"]["text"], task, "the answer as its own body");
                alone.push(task.to_owned());
            }
        }
        alone.sort();
        let mut expected = vec![first.to_string(), second.to_string()];
        expected.sort();
        assert_eq!(alone, expected);
        let [first_outcome, second_outcome] = outcomes;
        assert!(first_outcome.await.unwrap().is_ok());
        assert!(matches!(
            second_outcome.await.unwrap(),
            Err(WireError::UnknownSession)
        ));
    }

    /// A request that fails (nobody listens) fails every answer in it, once each was
    /// tried alone too.
    #[tokio::test]
    async fn a_lost_request_fails_each_answer_in_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let wire = SseWire::new(&format!("http://{addr}"), None).unwrap();
        let batcher = Arc::new(Batcher::new(wire, SessionId::generate()));
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

    fn queued(bytes: usize) -> (Queued, oneshot::Receiver<Result<(), WireError>>) {
        let (outcome, answer) = oneshot::channel();
        let queued = Queued {
            task: TaskId::generate(),
            result: answer_placeholder(),
            line: "x".repeat(bytes),
            outcome,
        };
        (queued, answer)
    }

    fn answer_placeholder() -> TaskResult {
        TaskResult::Failed {
            message: "unused".into(),
        }
    }

    /// At most [`MAX_BATCH`] answers and [`MAX_BATCH_BYTES`] go in one request; the
    /// answer that would not fit waits for the next; an answer whose sender stopped
    /// waiting is left out.
    #[test]
    fn a_batch_stops_at_its_count_or_its_bytes_and_skips_the_cancelled() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        for _ in 0..MAX_BATCH + 10 {
            let (q, answer) = queued(10);
            tx.send(q).unwrap();
            waiting.push(answer);
        }
        let first = rx.try_recv().unwrap();
        let (batch, rest) = gather(first, &mut rx);
        assert_eq!((batch.len(), rest.is_none()), (MAX_BATCH, true));
        while rx.try_recv().is_ok() {}

        // Lines of a quarter of the bytes, line break included: four fit, the fifth
        // waits.
        for _ in 0..6 {
            let (q, answer) = queued(MAX_BATCH_BYTES / 4 - 1);
            tx.send(q).unwrap();
            waiting.push(answer);
        }
        let first = rx.try_recv().unwrap();
        let (batch, rest) = gather(first, &mut rx);
        assert_eq!(batch.len(), 4);
        let (batch, rest) = gather(rest.unwrap(), &mut rx);
        assert_eq!((batch.len(), rest.is_none()), (2, true), "the rest, next");

        // A cancelled task's answer (its sender dropped) is left out.
        let (kept, _kept_answer) = queued(10);
        let (cancelled, cancelled_answer) = queued(10);
        let kept_task = kept.task.clone();
        drop(cancelled_answer);
        tx.send(cancelled).unwrap();
        tx.send(kept).unwrap();
        let first = rx.try_recv().unwrap();
        let (batch, _) = gather(first, &mut rx);
        let tasks: Vec<TaskId> = batch.into_iter().map(|q| q.task).collect();
        assert_eq!(tasks, [kept_task]);
    }
}
