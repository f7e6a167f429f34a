//! A publisher's log of one task's results, so that the task outlives its channel
//! (SPEC §15, capability `resume`).
//!
//! While the channel is up, the task's sender reads the upstream call's results itself,
//! on its own task (so results that arrive together leave together, as without
//! resume), and keeps a copy of each in the log. When the channel drops, the sender
//! goes and a keeper task takes the upstream call over: it reads on into the log. On
//! the next channel a new sender takes the upstream back, replays the log from the
//! oldest result it still holds, then reads on; the gateway drops what it had already
//! seen (every chunk carries its `seq`).
//!
//! The log is bounded: it holds at most `limit` bytes of results. Results already sent
//! are dropped first, oldest first. A slow client still slows its own upstream: while
//! a sender is attached, nothing reads the upstream faster than it sends. The keeper,
//! which reads only while no sender is attached, has nobody to wait for: a result that
//! does not fit overflows the task. Its results are dropped, the upstream call stops,
//! and the next sender reports the task failed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::Notify;

use crate::protocol::TaskResult;
use crate::sync::lock;

/// The upstream call's results, as the task produces them.
pub(crate) type Source = BoxStream<'static, TaskResult>;

/// The log of one task's results; share it with `Arc`.
pub(crate) struct TaskLog {
    state: Mutex<State>,
    /// Woken on every change: a result written, a sender attached or gone, the
    /// upstream handed back, the task stopped.
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
    /// The upstream's results still to read, while nobody reads them: a sender or the
    /// keeper takes it out while reading.
    parked: Option<Source>,
    /// Nothing more will be written: the upstream ended, or the task was stopped.
    ended: bool,
    /// The task overflowed its log with no sender attached: why it failed.
    overflowed: Option<String>,
}

impl State {
    /// Appends `result` (`size` bytes), dropping taken results, oldest first, to make
    /// room; `false` when it does not fit and the untaken results hold the room.
    fn append(&mut self, result: TaskResult, size: usize, limit: usize) -> bool {
        while self.bytes + size > limit && self.first < self.taken {
            let Some((_, bytes)) = self.held.pop_front() else {
                break;
            };
            self.bytes -= bytes;
            self.first += 1;
        }
        // One result bigger than the whole log still goes in alone.
        if self.bytes + size > limit && !self.held.is_empty() {
            return false;
        }
        self.push(result, size);
        true
    }

    fn push(&mut self, result: TaskResult, size: usize) {
        self.held.push_back((result, size));
        self.bytes += size;
        self.next += 1;
    }
}

impl TaskLog {
    /// An empty log of the task producing `source`, holding at most `limit` bytes of
    /// results. Nothing reads `source` before the first sender attaches.
    pub(crate) fn new(limit: usize, source: Source) -> Arc<Self> {
        Arc::new(TaskLog {
            state: Mutex::new(State {
                held: VecDeque::new(),
                first: 0,
                next: 0,
                taken: 0,
                bytes: 0,
                sender: None,
                senders: 0,
                parked: Some(source),
                ended: false,
                overflowed: None,
            }),
            changed: Notify::new(),
            limit: limit.max(1),
        })
    }

    /// Stops the task: its upstream call is dropped wherever it is (parked, read by
    /// the keeper, or by a sender, which ends).
    pub(crate) fn stop(&self) {
        let parked = {
            let mut state = lock(&self.state);
            state.ended = true;
            state.sender = None;
            state.parked.take()
        };
        drop(parked);
        self.changed.notify_waiters();
    }

    /// The channel dropped: the sender reading now, if any, is one no more. It may
    /// still be running for a moment (its task is aborted, not gone); from now on it
    /// takes nothing more from the log, and the upstream goes to a keeper. Without
    /// this, a sender still polled by its dead request could read on and take results
    /// that go nowhere, which the log then drops first to make room.
    pub(crate) fn detach(self: &Arc<Self>) {
        let parked = {
            let mut state = lock(&self.state);
            state.sender = None;
            state.parked.take()
        };
        self.changed.notify_waiters();
        // Parked between two reads: a keeper reads on. (A sender in the middle of a
        // read hands the upstream over itself when the read ends.)
        if let Some(source) = parked {
            self.let_go(source);
        }
    }

    /// The results from the oldest one held, as a new sender: a `resume` first (when
    /// `resume`), then every result, reading the upstream when the log holds nothing
    /// newer, until the final one. A sender attached later takes over: this one then
    /// ends.
    pub(crate) fn replay(self: &Arc<Self>, resume: bool) -> BoxStream<'static, TaskResult> {
        let (me, from) = {
            let mut state = lock(&self.state);
            state.senders += 1;
            state.sender = Some(state.senders);
            (state.senders, state.first)
        };
        // The keeper, if one reads, hands the upstream back.
        self.changed.notify_waiters();
        let reader = Reader {
            log: self.clone(),
            me,
            at: from,
            done: false,
            source: None,
        };
        let opening = resume.then_some(TaskResult::Resume { from_seq: from });
        let opening = futures::stream::iter(opening);
        let rest = futures::stream::unfold(reader, |mut reader| async move {
            let result = reader.next().await?;
            Some((result, reader))
        });
        opening.chain(rest).boxed()
    }

    /// Hands `source` back after reading from it: parked for the next sender, or read
    /// on by a keeper when no sender is attached; dropped when the task ended.
    fn let_go(self: &Arc<Self>, source: Source) {
        let mut state = lock(&self.state);
        if state.ended {
            return;
        }
        if state.sender.is_some() {
            state.parked = Some(source);
            drop(state);
            self.changed.notify_waiters();
            return;
        }
        drop(state);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.clone().keep(source));
            }
            // No runtime (it is shutting down): nothing will read the task again.
            Err(_) => self.stop(),
        }
    }

    /// The keeper: reads the upstream into the log while no sender is attached, and
    /// hands it back when one attaches.
    async fn keep(self: Arc<Self>, mut source: Source) {
        loop {
            let attached = async {
                loop {
                    let wait = self.changed.notified();
                    {
                        let state = lock(&self.state);
                        if state.sender.is_some() || state.ended {
                            return;
                        }
                    }
                    wait.await;
                }
            };
            let result = tokio::select! {
                biased;
                () = attached => {
                    self.let_go(source);
                    return;
                }
                result = source.next() => result,
            };
            let mut state = lock(&self.state);
            if state.ended {
                return;
            }
            let Some(result) = result else {
                state.ended = true;
                drop(state);
                self.changed.notify_waiters();
                return;
            };
            let last = result.is_final();
            let size = approximate_size(&result);
            if !state.append(result, size, self.limit) {
                state.overflowed = Some(format!(
                    "the publisher's resume buffer ({} bytes) filled up while its channel was down",
                    self.limit
                ));
                state.held.clear();
                state.bytes = 0;
                state.ended = true;
                drop(state);
                drop(source);
                tracing::warn!(
                    "a task's resume buffer filled up while the channel was down; the task stopped"
                );
                self.changed.notify_waiters();
                return;
            }
            if last {
                state.ended = true;
            }
            drop(state);
            self.changed.notify_waiters();
            if last {
                return;
            }
        }
    }
}

/// One sender's place in a log, and the upstream while it reads it.
struct Reader {
    log: Arc<TaskLog>,
    me: u64,
    at: u64,
    done: bool,
    source: Option<Source>,
}

impl Reader {
    async fn next(&mut self) -> Option<TaskResult> {
        if self.done {
            return None;
        }
        loop {
            let wait = self.log.changed.notified();
            {
                let mut state = lock(&self.log.state);
                if state.sender != Some(self.me) {
                    drop(state);
                    self.done = true;
                    if let Some(source) = self.source.take() {
                        self.log.let_go(source);
                    }
                    return None;
                }
                if let Some(message) = &state.overflowed {
                    self.done = true;
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
                    self.done = result.is_final();
                    return Some(result);
                }
                if self.source.is_none() {
                    self.source = state.parked.take();
                }
                if self.source.is_none() && state.ended {
                    self.done = true;
                    return None;
                }
            }
            if self.source.is_none() {
                // The keeper reads it: it hands it back now that a sender is here.
                wait.await;
                continue;
            }
            // The log holds nothing newer: read the upstream.
            let source = self.source.as_mut()?;
            let next = source.next().await;
            let mut state = lock(&self.log.state);
            let Some(result) = next else {
                state.ended = true;
                drop(state);
                self.source = None;
                self.done = true;
                self.log.changed.notify_waiters();
                return None;
            };
            let last = result.is_final();
            // The last result counts its overhead only: walking a whole answer's JSON to
            // size it would cost every completion; nothing is written after it, and it
            // is held only until the gateway confirms it.
            let size = if last {
                RESULT_OVERHEAD
            } else {
                approximate_size(&result)
            };
            // Everything held is taken (this reader is at the end), so it fits; unless a
            // new sender took over meanwhile and has not replayed the log yet: the
            // result is kept for it all the same (one result past the limit at most).
            if !state.append(result.clone(), size, self.log.limit) {
                state.push(result.clone(), size);
            }
            if last {
                // The upstream is done: let it go now (its permit with it).
                state.ended = true;
                self.source = None;
            }
            if state.sender != Some(self.me) {
                drop(state);
                self.done = true;
                if let Some(source) = self.source.take() {
                    self.log.let_go(source);
                }
                self.log.changed.notify_waiters();
                return None;
            }
            self.at = state.next;
            state.taken = state.taken.max(self.at);
            self.done = last;
            // Nobody waits on a sender's writes: no keeper reads while it is attached.
            return Some(result);
        }
    }

    fn hand_back(&mut self) {
        if let Some(source) = self.source.take() {
            self.log.let_go(source);
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.log.state);
            if state.sender == Some(self.me) {
                state.sender = None;
                // Handed back to this sender, which never took it: read on all the same.
                if self.source.is_none() {
                    self.source = state.parked.take();
                }
            }
        }
        self.hand_back();
        self.log.changed.notify_waiters();
    }
}

/// What a result costs the log besides its data.
const RESULT_OVERHEAD: usize = 64;

/// A result's size, as its data and body take it.
fn approximate_size(result: &TaskResult) -> usize {
    RESULT_OVERHEAD
        + match result {
            TaskResult::Chunk { data, .. } => data.len(),
            // Serializing a `Value` cannot fail.
            TaskResult::Completed { body, .. } => body.len(),
            TaskResult::Failed { message } => message.len(),
            TaskResult::Resume { .. } => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use std::time::Duration;

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

    /// A log over an upstream the test feeds.
    fn logged(limit: usize) -> (mpsc::UnboundedSender<TaskResult>, Arc<TaskLog>) {
        let (upstream, source) = mpsc::unbounded();
        (upstream, TaskLog::new(limit, source.boxed()))
    }

    /// Lets every task run until all wait (time is paused: the sleep ends only then).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_sender_replays_from_the_oldest_result_held_after_a_resume() {
        let (upstream, log) = logged(1 << 20);
        let mut first = log.replay(false);
        upstream.unbounded_send(chunk(0, "a")).unwrap();
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        drop(first);
        // No sender: the keeper reads on into the log.
        upstream.unbounded_send(chunk(1, "b")).unwrap();
        upstream.unbounded_send(done(2)).unwrap();
        settle().await;
        assert!(upstream.is_closed(), "the keeper read to the final result");
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

    #[tokio::test(start_paused = true)]
    async fn a_sender_reads_the_upstream_itself_and_a_replay_goes_on_reading_it() {
        let (upstream, log) = logged(1 << 20);
        let mut first = log.replay(false);
        upstream.unbounded_send(chunk(0, "a")).unwrap();
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        drop(first);
        settle().await;
        // The keeper holds the upstream; a new sender gets it back, after the replay.
        let mut second = log.replay(true);
        assert_eq!(
            second.next().await,
            Some(TaskResult::Resume { from_seq: 0 })
        );
        assert_eq!(second.next().await, Some(chunk(0, "a")));
        upstream.unbounded_send(chunk(1, "b")).unwrap();
        assert_eq!(second.next().await, Some(chunk(1, "b")));
        upstream.unbounded_send(done(2)).unwrap();
        assert_eq!(second.next().await, Some(done(2)));
        assert_eq!(second.next().await, None);
        assert!(
            upstream.is_closed(),
            "the final result lets the upstream go"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_sender_takes_over_and_the_earlier_one_ends() {
        let (upstream, log) = logged(1 << 20);
        let mut old = log.replay(false);
        let mut new = log.replay(true);
        upstream.unbounded_send(chunk(0, "a")).unwrap();
        assert_eq!(old.next().await, None);
        assert_eq!(new.next().await, Some(TaskResult::Resume { from_seq: 0 }));
        assert_eq!(new.next().await, Some(chunk(0, "a")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_taken_over_while_reading_hands_its_result_to_the_next() {
        let (upstream, log) = logged(1 << 20);
        let mut old = log.replay(false);
        // `old` waits on the upstream, holding it, when the new sender attaches.
        let reading = tokio::spawn(async move { old.next().await });
        settle().await;
        let mut new = log.replay(true);
        upstream.unbounded_send(chunk(0, "a")).unwrap();
        assert_eq!(reading.await.unwrap(), None);
        assert_eq!(new.next().await, Some(TaskResult::Resume { from_seq: 0 }));
        assert_eq!(new.next().await, Some(chunk(0, "a")));
    }

    #[tokio::test(start_paused = true)]
    async fn taken_results_make_room_and_the_replay_starts_after_them() {
        // Room for two chunks of 100 bytes (each counts 164).
        let (upstream, log) = logged(400);
        let data = "x".repeat(100);
        let mut sender = log.replay(false);
        for seq in 0..5 {
            upstream.unbounded_send(chunk(seq, &data)).unwrap();
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
    async fn a_full_log_without_a_sender_overflows_and_stops_the_upstream() {
        let (upstream, log) = logged(400);
        let data = "x".repeat(100);
        let mut sender = log.replay(false);
        for seq in 0..2 {
            upstream.unbounded_send(chunk(seq, &data)).unwrap();
            assert_eq!(sender.next().await, Some(chunk(seq, &data)));
        }
        drop(sender);
        // The keeper makes room by dropping taken results, then has none to drop.
        for seq in 2..5 {
            upstream.unbounded_send(chunk(seq, &data)).unwrap();
        }
        settle().await;
        assert!(
            upstream.is_closed(),
            "an overflowed task stops its upstream"
        );
        let replayed: Vec<_> = log.replay(true).collect().await;
        assert!(
            matches!(&replayed[..], [TaskResult::Resume { .. }, TaskResult::Failed { message }] if message.contains("resume buffer")),
            "{replayed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_sender_still_polled_takes_nothing_more_and_the_keeper_overflows() {
        // Between two reads: the sender holds the upstream when the channel drops, and
        // whatever still polls it (its request body, before the abort lands) gets
        // nothing more; the keeper reads on and overflows.
        let (upstream, log) = logged(400);
        let data = "x".repeat(100);
        let mut sender = log.replay(false);
        upstream.unbounded_send(chunk(0, &data)).unwrap();
        assert_eq!(sender.next().await, Some(chunk(0, &data)));
        log.detach();
        for seq in 1..6 {
            upstream.unbounded_send(chunk(seq, &data)).unwrap();
        }
        assert_eq!(sender.next().await, None, "a detached sender ends");
        settle().await;
        assert!(upstream.is_closed(), "the keeper overflowed and let go");
        let replayed: Vec<_> = log.replay(true).collect().await;
        assert!(
            matches!(&replayed[..], [TaskResult::Resume { .. }, TaskResult::Failed { message }] if message.contains("resume buffer")),
            "{replayed:?}"
        );

        // In the middle of a read: the result it was waiting for stays in the log for
        // the next sender, and the upstream goes to the keeper.
        let (upstream, log) = logged(1 << 20);
        let mut sender = log.replay(false);
        let reading = tokio::spawn(async move {
            let first = sender.next().await;
            (first, sender)
        });
        settle().await;
        log.detach();
        upstream.unbounded_send(chunk(0, "a")).unwrap();
        let (first, sender) = reading.await.unwrap();
        assert_eq!(
            first, None,
            "the result read after the detach is not handed out"
        );
        drop(sender);
        upstream.unbounded_send(chunk(1, "b")).unwrap();
        settle().await;
        let mut next = log.replay(true);
        assert_eq!(next.next().await, Some(TaskResult::Resume { from_seq: 0 }));
        assert_eq!(next.next().await, Some(chunk(0, "a")));
        assert_eq!(next.next().await, Some(chunk(1, "b")));

        // Parked between two senders (nobody reading): the keeper takes it.
        let (upstream, log) = logged(400);
        let mut sender = log.replay(false);
        upstream.unbounded_send(chunk(0, &data)).unwrap();
        assert_eq!(sender.next().await, Some(chunk(0, &data)));
        let taken_over = log.replay(true);
        assert_eq!(
            sender.next().await,
            None,
            "the earlier sender parked the upstream"
        );
        log.detach();
        for seq in 1..6 {
            upstream.unbounded_send(chunk(seq, &data)).unwrap();
        }
        settle().await;
        assert!(upstream.is_closed(), "the keeper read the parked upstream");
        drop(taken_over);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_a_task_drops_its_upstream_wherever_it_is() {
        // Read by a sender.
        let (upstream, log) = logged(1 << 20);
        let mut sender = log.replay(false);
        let reading = tokio::spawn(async move { sender.next().await });
        settle().await;
        log.stop();
        reading.abort();
        settle().await;
        assert!(upstream.is_closed());
        // Read by the keeper.
        let (upstream, log) = logged(1 << 20);
        let mut sender = log.replay(false);
        upstream.unbounded_send(chunk(0, "a")).unwrap();
        assert_eq!(sender.next().await, Some(chunk(0, "a")));
        drop(sender);
        settle().await;
        assert!(!upstream.is_closed(), "the keeper reads on");
        log.stop();
        settle().await;
        assert!(upstream.is_closed());
    }
}
