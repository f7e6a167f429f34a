//! What replicas say to each other over NATS, and the subjects they say it on.
//!
//! Subjects, under the prefix `P` (default `vllm`):
//! - `P.all`: announcements every replica hears, in each sender's order
//!   ([`Announcement`]: who joined, which channel was bound (and whether its session
//!   resumes) or released, which closed (and whether its session resumes),
//!   barriers, goodbyes, the in-flight counts of the rows a replica's channels serve,
//!   the wakes that failed).
//! - `P.r.{replica}.frame`: frames for channels `replica` holds, each a request whose
//!   answer ([`FrameAnswer`]) says whether the channel took it; a taken task frame's
//!   answer is its task's first result on `deliver`, or comes late (see `ack`).
//! - `P.r.{replica}.deliver`: publishers' results for tasks `replica` holds, each a
//!   request answered when the task took it ([`DeliverAnswer`]); except a task's last
//!   results whose answer the sender has no use for, published with no reply subject
//!   to a replica that takes them so (plane version [`QUIET_LAST_RESULTS`] or later,
//!   said in its `Hello` and `Here`), and a task's whole answer alone for a task whose
//!   frame this replica carried to the posting session, answered here
//!   (`TaskRouter::deliver_final`).
//! - `P.r.{replica}.ping`: the probe of a replica's liveness.
//!
//! Answers go to one inbox subscription per replica (`_INBOX.{id}.>`), correlated by
//! the last token of the reply subject.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use virtual_llm_core::protocol::GatewayFrame;
use virtual_llm_core::{
    ChannelBinding, Delivery, Error, LlmName, ReplicaId, SendError, SessionId, TaskId, TaskResult,
};

/// The subjects of one cluster.
#[derive(Clone, Debug)]
pub(crate) struct Subjects {
    prefix: String,
}

impl Subjects {
    pub(crate) fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    /// Announcements.
    pub(crate) fn all(&self) -> String {
        format!("{}.all", self.prefix)
    }

    /// Frames for `replica`'s channels.
    pub(crate) fn frame(&self, replica: &ReplicaId) -> String {
        format!("{}.r.{replica}.frame", self.prefix)
    }

    /// Results for `replica`'s tasks.
    pub(crate) fn deliver(&self, replica: &ReplicaId) -> String {
        format!("{}.r.{replica}.deliver", self.prefix)
    }

    /// `replica`'s probe.
    pub(crate) fn ping(&self, replica: &ReplicaId) -> String {
        format!("{}.r.{replica}.ping", self.prefix)
    }
}

/// The version of the plane's protocol this replica speaks, said in its `Hello` and
/// `Here` (a replica from before versions says none: 0).
pub(crate) const PLANE_VERSION: u32 = 1;

/// The first version that takes a delivery with no reply subject (a task's last
/// results, unanswered); a replica before it drops one, so it gets them as a request.
pub(crate) const QUIET_LAST_RESULTS: u32 = 1;

/// One channel a replica holds, in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Held {
    pub(crate) session: SessionId,
    pub(crate) epoch: u64,
    /// The session resumes its tasks through a dropped channel (a replica from
    /// before says nothing: `false`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) resumes: bool,
}

/// What every replica hears on `P.all`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub(crate) enum Announcement {
    /// `from` joined (or reconnected): these are its channels, and the plane
    /// version it speaks. Every peer answers with `Here`.
    Hello {
        from: ReplicaId,
        held: Vec<Held>,
        #[serde(default)]
        version: u32,
    },
    /// `from`'s channels and version, in answer to a `Hello`.
    Here {
        from: ReplicaId,
        held: Vec<Held>,
        #[serde(default)]
        version: u32,
    },
    /// `session`'s channel is bound on `binding.replica`; the session `resumes` its
    /// tasks through a dropped channel (a replica from before says nothing: `false`).
    Bound {
        session: SessionId,
        binding: ChannelBinding,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumes: bool,
    },
    /// That bind was released.
    Released {
        session: SessionId,
        binding: ChannelBinding,
    },
    /// `session`'s channel closed on `from`: tasks waiting on it fail.
    Closed { from: ReplicaId, session: SessionId },
    /// `session`'s channel closed on `from`, and the session resumes: tasks waiting
    /// on it wait the resume window for the publisher, then fail.
    Resuming { from: ReplicaId, session: SessionId },
    /// A barrier: answer to the reply subject once everything `from` announced
    /// before it is applied.
    Sync { from: ReplicaId },
    /// `from` is leaving.
    Bye { from: ReplicaId },
    /// The wake of the row `llm` (of the pool `pool`) failed with `message`, as its
    /// publisher reported to `from`.
    WakeFailed {
        from: ReplicaId,
        llm: LlmName,
        pool: LlmName,
        message: String,
    },
    /// The in-flight counts of rows whose channels `from` holds, each believed for
    /// `ttl_ms` milliseconds.
    Load {
        from: ReplicaId,
        loads: Vec<LoadWire>,
        #[serde(rename = "ttlMs")]
        ttl_ms: u64,
    },
}

/// One row's count in a [`Announcement::Load`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LoadWire {
    pub(crate) pool: LlmName,
    pub(crate) row: LlmName,
    pub(crate) in_flight: u32,
}

impl Announcement {
    /// Who sent it.
    pub(crate) fn from(&self) -> &ReplicaId {
        match self {
            Announcement::Hello { from, .. }
            | Announcement::Here { from, .. }
            | Announcement::Closed { from, .. }
            | Announcement::Resuming { from, .. }
            | Announcement::Sync { from }
            | Announcement::Bye { from }
            | Announcement::Load { from, .. }
            | Announcement::WakeFailed { from, .. } => from,
            Announcement::Bound { binding, .. } | Announcement::Released { binding, .. } => {
                &binding.replica
            }
        }
    }
}

/// A frame for a session's channel: the session id, a line end, the frame's JSON.
pub(crate) fn encode_frame(session: &SessionId, frame: &GatewayFrame) -> serde_json::Result<Bytes> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(session.as_str().as_bytes());
    out.push(b'\n');
    serde_json::to_writer(&mut out, frame)?;
    Ok(out.into())
}

/// Reads [`encode_frame`]'s bytes.
pub(crate) fn decode_frame(bytes: &[u8]) -> Result<(SessionId, GatewayFrame), String> {
    let at = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("a frame without its session")?;
    let session = std::str::from_utf8(&bytes[..at])
        .map_err(|e| e.to_string())
        .and_then(|s| SessionId::parse(s).map_err(|e| e.to_string()))?;
    let frame = serde_json::from_slice(&bytes[at + 1..]).map_err(|e| e.to_string())?;
    Ok((session, frame))
}

/// What the replica holding a channel answers to a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameAnswer {
    /// The channel took it.
    Taken,
    /// The channel refused it.
    Refused(SendError),
}

impl FrameAnswer {
    pub(crate) fn encode(self) -> Bytes {
        Bytes::from_static(match self {
            FrameAnswer::Taken => b"ok",
            FrameAnswer::Refused(SendError::Full) => b"full",
            FrameAnswer::Refused(SendError::Closed) => b"closed",
        })
    }

    pub(crate) fn decode(bytes: &[u8]) -> Self {
        match bytes {
            b"ok" => FrameAnswer::Taken,
            b"full" => FrameAnswer::Refused(SendError::Full),
            _ => FrameAnswer::Refused(SendError::Closed),
        }
    }
}

/// A [`Delivery`] on the wire.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeliveryWire {
    session: SessionId,
    owner: String,
    task: TaskId,
    results: Vec<TaskResult>,
}

impl From<Delivery> for DeliveryWire {
    fn from(d: Delivery) -> Self {
        DeliveryWire {
            session: d.session,
            owner: d.owner,
            task: d.task,
            results: d.results,
        }
    }
}

impl From<DeliveryWire> for Delivery {
    fn from(d: DeliveryWire) -> Self {
        Delivery {
            session: d.session,
            owner: d.owner,
            task: d.task,
            results: d.results,
        }
    }
}

/// The answer to a delivery: empty for taken, else the refusal's status and message.
#[derive(Serialize, Deserialize)]
pub(crate) struct DeliverAnswer {
    status: u16,
    message: String,
}

impl DeliverAnswer {
    /// `outcome` as the answer's bytes.
    pub(crate) fn encode(outcome: &Result<(), Error>) -> Bytes {
        match outcome {
            Ok(()) => Bytes::new(),
            Err(e) => serde_json::to_vec(&DeliverAnswer {
                status: e.status(),
                message: e.to_string(),
            })
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(b"{\"status\":404,\"message\":\"\"}")),
        }
    }

    /// The outcome the answer's bytes say: the refusals a task gives keep their kind
    /// (404 unknown task, 409 finished, 400 a bad result); anything else is the
    /// upstream's error (502).
    pub(crate) fn decode(bytes: &[u8]) -> Result<(), Error> {
        if bytes.is_empty() {
            return Ok(());
        }
        let Ok(answer) = serde_json::from_slice::<DeliverAnswer>(bytes) else {
            return Err(Error::UnknownTask);
        };
        Err(match answer.status {
            404 => Error::UnknownTask,
            409 => Error::TaskFinished,
            400 => Error::invalid(answer.message),
            _ => Error::Upstream {
                message: answer.message,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use virtual_llm_core::protocol::CancelFrame;

    #[test]
    fn frames_and_answers_round_trip() {
        let session = SessionId::generate();
        let frame = GatewayFrame::Cancel(CancelFrame {
            task_id: TaskId::generate(),
        });
        let bytes = encode_frame(&session, &frame).unwrap();
        assert_eq!(decode_frame(&bytes).unwrap(), (session, frame));
        assert!(decode_frame(b"no line").is_err());
        for a in [
            FrameAnswer::Taken,
            FrameAnswer::Refused(SendError::Full),
            FrameAnswer::Refused(SendError::Closed),
        ] {
            assert_eq!(FrameAnswer::decode(&a.encode()), a);
        }
        assert!(DeliverAnswer::decode(&DeliverAnswer::encode(&Ok(()))).is_ok());
        let back = DeliverAnswer::decode(&DeliverAnswer::encode(&Err(Error::UnknownTask)));
        assert!(matches!(back, Err(Error::UnknownTask)));
        let back = DeliverAnswer::decode(&DeliverAnswer::encode(&Err(Error::TaskFinished)));
        assert!(matches!(back, Err(Error::TaskFinished)));
        let bad = DeliverAnswer::decode(&DeliverAnswer::encode(&Err(Error::invalid("gap"))));
        assert_eq!(bad.unwrap_err().status(), 400);
    }

    #[test]
    fn announcements_name_their_sender() {
        let a = ReplicaId::parse("a").unwrap();
        let bound = Announcement::Bound {
            session: SessionId::generate(),
            binding: ChannelBinding {
                replica: a.clone(),
                epoch: 7,
            },
            resumes: true,
        };
        let json = serde_json::to_string(&bound).unwrap();
        let back: Announcement = serde_json::from_str(&json).unwrap();
        assert_eq!(back, bound);
        assert_eq!(back.from(), &a);
    }

    #[test]
    fn a_bind_from_before_resumes_was_said_does_not_resume() {
        let session = SessionId::generate();
        let old = format!(
            r#"{{"op":"bound","session":"{session}","binding":{{"replica":"a","epoch":7}}}}"#
        );
        let back: Announcement = serde_json::from_str(&old).unwrap();
        assert!(
            matches!(back, Announcement::Bound { resumes: false, .. }),
            "{back:?}"
        );
        let old =
            format!(r#"{{"op":"here","from":"a","held":[{{"session":"{session}","epoch":7}}]}}"#);
        let back: Announcement = serde_json::from_str(&old).unwrap();
        let Announcement::Here { held, .. } = back else {
            panic!("{back:?}")
        };
        assert!(!held[0].resumes);
        // Said only when true: a session that does not resume is announced as before.
        let held = Held {
            session,
            epoch: 7,
            resumes: false,
        };
        assert!(!serde_json::to_string(&held).unwrap().contains("resumes"));
    }

    #[test]
    fn a_snapshot_without_a_version_is_from_before_versions() {
        let a = ReplicaId::parse("a").unwrap();
        let old = r#"{"op":"here","from":"a","held":[]}"#;
        let back: Announcement = serde_json::from_str(old).unwrap();
        assert_eq!(
            back,
            Announcement::Here {
                from: a.clone(),
                held: Vec::new(),
                version: 0
            }
        );
        let hello = Announcement::Hello {
            from: a,
            held: Vec::new(),
            version: PLANE_VERSION,
        };
        let json = serde_json::to_string(&hello).unwrap();
        assert!(json.contains(r#""version":1"#), "{json}");
        assert_eq!(serde_json::from_str::<Announcement>(&json).unwrap(), hello);
    }
}
