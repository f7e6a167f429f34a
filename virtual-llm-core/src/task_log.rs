//! A publisher's log of one task's results, so that the task outlives its channel
//! (SPEC §15, capability `resume`).
//!
//! The task's upstream call writes its results (chunks, then the final result) into
//! the log; a sender reads them from the log and posts them to the gateway. When the
//! channel drops, the sender goes but the upstream call and its log stay; on the next
//! channel a new sender replays the log from the oldest result it still holds, and the
//! gateway drops what it had already seen (every chunk carries its `seq`).
//!
//! The log is bounded: it holds at most `limit` bytes of results. Results a sender has
//! already taken are dropped first, oldest first. While a sender is attached, a writer
//! that would go over the limit waits for it (a slow client slows its own upstream);
//! with no sender (the channel is down) the task has overflowed: its results are
//! dropped, the upstream call stops, and the next sender reports the task failed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::Notify;

use crate::protocol::TaskResult;
use crate::sync::lock;

/// The log of one task's results; share it with `Arc`.
pub(crate) struct TaskLog {
    state: Mutex<State>,
    /// Woken on every change: a result written, taken or dropped, a sender gone.
    changed: Notify,
    limit: usize,
}

struct State {
    /// The results held, with their bytes; `held[0]` is result number `first`.
    held: VecDeque<(TaskResult, usize)>,
    first: u64,
    /// The number the next result written gets.
    next: u64,
    /// How many results senders have taken (numbers below it).
    taken: u64,
    bytes: usize,
    /// The sender reading now, if any (its number), and the last number given out.
    sender: Option<u64>,
    senders: u64,
    /// The task overflowed its log with no sender attached: why it failed.
    overflowed: Option<String>,
}

/// Why a write was refused: the log overflowed with no sender attached.
#[derive(Debug)]
pub(crate) struct Overflowed;

impl TaskLog {
    /// An empty log holding at most `limit` bytes of results.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(TaskLog {
            state: Mutex::new(State {
                held: VecDeque::new(),
                first: 0,
                next: 0,
                taken: 0,
                bytes: 0,
                sender: None,
                senders: 0,
                overflowed: None,
            }),
            changed: Notify::new(),
            limit: limit.max(1),
        })
    }

    /// Writes the task's next result. Waits while the log is full and a sender is
    /// reading; fails when it is full of results no sender has taken and none is
    /// attached (the channel is down): the task is then lost.
    pub(crate) async fn write(&self, result: TaskResult) -> Result<(), Overflowed> {
        let size = approximate_size(&result);
        loop {
            let wait = self.changed.notified();
            {
                let mut state = lock(&self.state);
                if state.overflowed.is_some() {
                    return Err(Overflowed);
                }
                // Drop taken results, oldest first, until this one fits.
                while state.bytes + size > self.limit && state.first < state.taken {
                    if let Some((_, bytes)) = state.held.pop_front() {
                        state.bytes -= bytes;
                        state.first += 1;
                    } else {
                        break;
                    }
                }
                // One result bigger than the whole log still goes in alone.
                if state.bytes + size <= self.limit || state.held.is_empty() {
                    state.held.push_back((result, size));
                    state.bytes += size;
                    state.next += 1;
                    drop(state);
                    self.changed.notify_waiters();
                    return Ok(());
                }
                if state.sender.is_none() {
                    state.overflowed = Some(format!(
                        "the publisher's resume buffer ({} bytes) filled up while its channel was down",
                        self.limit
                    ));
                    state.held.clear();
                    state.bytes = 0;
                    drop(state);
                    self.changed.notify_waiters();
                    return Err(Overflowed);
                }
            }
            wait.await;
        }
    }

    /// The results from the oldest one held, as a new sender: a `resume` first (when
    /// `resume`), then every result as it is written, until the final one. A sender
    /// attached later takes over: this one then ends.
    pub(crate) fn replay(self: &Arc<Self>, resume: bool) -> BoxStream<'static, TaskResult> {
        let (me, from) = {
            let mut state = lock(&self.state);
            state.senders += 1;
            state.sender = Some(state.senders);
            (state.senders, state.first)
        };
        self.changed.notify_waiters();
        let reader = Reader {
            log: self.clone(),
            me,
            at: from,
            ended: false,
        };
        let opening = resume.then_some(TaskResult::Resume { from_seq: from });
        let opening = futures::stream::iter(opening);
        let rest = futures::stream::unfold(reader, |mut reader| async move {
            let result = reader.next().await?;
            Some((result, reader))
        });
        opening.chain(rest).boxed()
    }
}

/// One sender's place in a log.
struct Reader {
    log: Arc<TaskLog>,
    me: u64,
    at: u64,
    ended: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<TaskResult> {
        if self.ended {
            return None;
        }
        loop {
            let wait = self.log.changed.notified();
            {
                let mut state = lock(&self.log.state);
                if state.sender != Some(self.me) {
                    return None;
                }
                if let Some(message) = &state.overflowed {
                    self.ended = true;
                    return Some(TaskResult::Failed {
                        message: message.clone(),
                    });
                }
                // Results dropped under this reader were taken by an earlier sender:
                // the gateway tells a gap, if there is one.
                self.at = self.at.max(state.first);
                if self.at < state.next {
                    let index = usize::try_from(self.at - state.first).unwrap_or(usize::MAX);
                    let result = state.held.get(index).map(|(r, _)| r.clone())?;
                    self.at += 1;
                    state.taken = state.taken.max(self.at);
                    drop(state);
                    self.log.changed.notify_waiters();
                    self.ended = result.is_final();
                    return Some(result);
                }
            }
            wait.await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut state = lock(&self.log.state);
        if state.sender == Some(self.me) {
            state.sender = None;
        }
        drop(state);
        // A writer waiting for room learns that nobody will make it.
        self.log.changed.notify_waiters();
    }
}

/// A result's size, as its data and body take it.
fn approximate_size(result: &TaskResult) -> usize {
    const OVERHEAD: usize = 64;
    OVERHEAD
        + match result {
            TaskResult::Chunk { data, .. } => data.len(),
            TaskResult::Completed { body, .. } => body.to_string().len(),
            TaskResult::Failed { message } => message.len(),
            TaskResult::Resume { .. } => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, data: &str) -> TaskResult {
        TaskResult::Chunk {
            data: data.to_owned(),
            done: false,
            seq: Some(seq),
        }
    }

    fn done(seq: u64) -> TaskResult {
        TaskResult::Chunk {
            data: String::new(),
            done: true,
            seq: Some(seq),
        }
    }

    #[tokio::test]
    async fn a_new_sender_replays_from_the_oldest_result_held_after_a_resume() {
        let log = TaskLog::new(1 << 20);
        let mut first = log.replay(false);
        log.write(chunk(0, "a")).await.unwrap();
        log.write(chunk(1, "b")).await.unwrap();
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        drop(first);
        log.write(done(2)).await.unwrap();
        let replayed: Vec<_> = log.replay(true).collect().await;
        assert_eq!(
            replayed,
            vec![
                TaskResult::Resume { from_seq: 0 },
                chunk(0, "a"),
                chunk(1, "b"),
                done(2)
            ]
        );
    }

    #[tokio::test]
    async fn a_later_sender_takes_over_and_the_earlier_one_ends() {
        let log = TaskLog::new(1 << 20);
        let mut old = log.replay(false);
        let mut new = log.replay(true);
        log.write(chunk(0, "a")).await.unwrap();
        assert_eq!(old.next().await, None);
        assert_eq!(new.next().await, Some(TaskResult::Resume { from_seq: 0 }));
        assert_eq!(new.next().await, Some(chunk(0, "a")));
    }

    #[tokio::test]
    async fn taken_results_make_room_and_the_replay_starts_after_them() {
        // Room for two chunks of 100 bytes (each counts 164).
        let log = TaskLog::new(400);
        let data = "x".repeat(100);
        let mut sender = log.replay(false);
        for seq in 0..5 {
            log.write(chunk(seq, &data)).await.unwrap();
            assert_eq!(sender.next().await, Some(chunk(seq, &data)));
        }
        drop(sender);
        let mut replay = log.replay(true);
        // Chunks 3 and 4 are held; the older ones went to make room.
        assert_eq!(
            replay.next().await,
            Some(TaskResult::Resume { from_seq: 3 })
        );
        assert_eq!(replay.next().await, Some(chunk(3, &data)));
        assert_eq!(replay.next().await, Some(chunk(4, &data)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_log_waits_for_its_sender_and_overflows_without_one() {
        let log = TaskLog::new(400);
        let data = "x".repeat(100);
        let mut sender = log.replay(false);
        log.write(chunk(0, &data)).await.unwrap();
        log.write(chunk(1, &data)).await.unwrap();
        // Full of results the sender has not taken: the writer waits for it.
        let writer = {
            let (log, data) = (log.clone(), data.clone());
            tokio::spawn(async move { log.write(chunk(2, &data)).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!writer.is_finished());
        assert_eq!(sender.next().await, Some(chunk(0, &data)));
        writer.await.unwrap().unwrap();
        // With no sender, a full log overflows: the task is lost, and says so.
        drop(sender);
        assert!(log.write(chunk(3, &data)).await.is_err());
        assert!(log.write(chunk(4, &data)).await.is_err());
        let replayed: Vec<_> = log.replay(true).collect().await;
        assert!(
            matches!(&replayed[..], [TaskResult::Resume { .. }, TaskResult::Failed { message }] if message.contains("resume buffer")),
            "{replayed:?}"
        );
    }
}
