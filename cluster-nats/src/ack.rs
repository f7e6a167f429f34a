//! The answer to a task frame that its channel took, sent late or not at all.
//!
//! A replica that sends a task frame to a channel held elsewhere waits for an answer:
//! a refusal fails the task at once, and no answer within the plane's timeout fails it
//! then. "Taken" is the common answer, and the task's first result says the same
//! thing: the sender counts a delivery for the task as its frame's answer. So the
//! replica holding the channel keeps a taken task frame's reply subject here instead
//! of answering at once; the task's first delivery removes it unanswered, and a task
//! with no result after a quarter of the timeout gets its "taken" then (also what a
//! replica of an older version, which does not read deliveries as answers, waits
//! for). On the path of every relayed request, that is one NATS message, and its
//! wake-ups on three processes, fewer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use virtual_llm_core::TaskId;
use virtual_llm_core::sync::lock;

/// The reply subjects of task frames taken here and not answered yet, by task.
#[derive(Default)]
pub(crate) struct LateAcks {
    waiting: Mutex<HashMap<TaskId, (String, Instant)>>,
}

impl LateAcks {
    /// Task `task`'s frame was taken; its answer goes to `reply`, late.
    pub(crate) fn hold(&self, task: TaskId, reply: String) {
        lock(&self.waiting).insert(task, (reply, Instant::now()));
    }

    /// `task`'s results are on their way to its replica: they answer its frame.
    pub(crate) fn answered(&self, task: &TaskId) {
        let mut waiting = lock(&self.waiting);
        if !waiting.is_empty() {
            waiting.remove(task);
        }
    }

    /// The reply subjects of the frames taken at least `age` ago and not answered
    /// by a result since: their "taken" is due now. They are forgotten here.
    pub(crate) fn due(&self, age: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut due = Vec::new();
        lock(&self.waiting).retain(|_, (reply, since)| {
            if now.duration_since(*since) >= age {
                due.push(std::mem::take(reply));
                false
            } else {
                true
            }
        });
        due
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.waiting).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: u32) -> TaskId {
        TaskId::parse(&format!("task_{n:08}")).expect("a task id")
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_answers_a_frame_and_a_silent_task_is_answered_when_due() {
        let acks = LateAcks::default();
        acks.hold(task(1), "inbox.f.1".into());
        acks.hold(task(2), "inbox.f.2".into());
        acks.answered(&task(1));
        assert_eq!(acks.len(), 1);
        assert!(acks.due(Duration::from_secs(1)).is_empty());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(acks.due(Duration::from_secs(1)).is_empty());
        acks.hold(task(3), "inbox.f.3".into());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            acks.due(Duration::from_secs(1)),
            vec!["inbox.f.2".to_owned()]
        );
        assert_eq!(acks.len(), 1, "the younger frame waits");
        // An answer for a task never held, or held no more, changes nothing.
        acks.answered(&task(2));
        acks.answered(&task(9));
        assert_eq!(acks.len(), 1);
    }
}
