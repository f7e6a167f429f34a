//! [`NatsPlane`]: one gateway replica's link to the others over NATS, and the
//! background tasks that keep it: announcing this replica's channels and hearing the
//! others', relaying frames to channels held here, handing forwarded results to
//! tasks held here, and probing peers.
//!
//! Every replica keeps the map of which replica holds which session's channel: its
//! own channels, and the others' as they announce them (`Bound`, `Released`, and a
//! snapshot of all of them in `Hello`/`Here` when a replica joins or reconnects to
//! NATS). Bind epochs are a Lamport clock (seeded from the wall clock, raised past
//! every epoch heard), so the later of two binds of one session wins everywhere. A
//! frame for a session held elsewhere is published to its replica as a request (at
//! once when no frame waits before it, else after them, from a queue); the answer
//! (taken, full, closed, no responders, or none in time) fails the frame's task here
//! when it was not taken. A task's first result answers its frame as taken
//! ([`LateAcks`]): the replica holding the channel answers a taken task frame itself
//! only when the task is slow to send one. A peer with no subscriber left ("no
//! responders") or silent past the timeout is gone: its channels are forgotten and
//! the tasks here waiting on them fail with 503.
//!
//! Pools, queue and wake across replicas (SPEC §14): a task frame that comes for a
//! channel held here takes a slot on its row here ([`TaskInbound::hold`]), held until
//! the task ends (its last result passes through here, its cancel comes, its channel
//! or its replica goes), and is refused as full past the row's capacity; so a row's
//! tasks are counted where its channel is. The changes of those counts are reported
//! to every peer (`Load`, gathered for `load_interval`, and again every
//! `load_refresh` while tasks are in flight), whose admissions take them as their
//! view of the row's load and hand slots freed here to their waiters. A wake frame
//! for a channel held here joins this replica's wake of the row
//! ([`TaskInbound::wake`]): one wake per row, whichever replicas asked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, Message, Request, RequestErrorKind, StatusCode};
use bytes::Bytes;
use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use virtual_llm_core::protocol::TaskResult;
use virtual_llm_core::protocol::{Closing, GatewayFrame};
use virtual_llm_core::sync::lock;
use virtual_llm_core::{
    ChannelBinding, ChannelDirectory, ChannelSink, Delivery, Error, Gateway, GatewayBuilder,
    LlmName, LoadChanges, ReplicaId, RowLoad, SendError, SessionId, Slot, TaskId, TaskInbound,
    TaskRouter,
};

use crate::ack::LateAcks;
use crate::chunk::{self, Piece, Reassembler};
use crate::directory::NatsDirectory;
use crate::error::NatsError;
use crate::options::NatsOptions;
use crate::router::NatsTaskRouter;
use crate::wire::{
    Announcement, DeliverAnswer, DeliveryWire, FrameAnswer, Held, LoadWire, PLANE_VERSION,
    QUIET_LAST_RESULTS, Subjects, decode_frame, encode_frame,
};

/// A channel this replica holds.
pub(crate) struct Local {
    pub(crate) epoch: u64,
    pub(crate) sink: Arc<dyn ChannelSink>,
    /// The session resumes its tasks through a dropped channel.
    pub(crate) resumes: bool,
}

/// A channel another replica holds, as it announced it.
#[derive(Clone, Debug)]
pub(crate) struct Remote {
    pub(crate) binding: ChannelBinding,
    /// The session resumes its tasks through a dropped channel: if that replica
    /// dies, the tasks here sent to it wait for the publisher to resume them
    /// elsewhere rather than fail at once.
    pub(crate) resumes: bool,
}

/// A task another replica sent to a channel held here, and its slot on the row.
pub(crate) struct Carried {
    session: SessionId,
    /// The principal whose row the task is on.
    owner: String,
    _slot: Slot,
}

impl Carried {
    /// Whether `delivery` comes from the session and principal the task was sent to.
    fn is_for(&self, delivery: &Delivery) -> bool {
        self.session == delivery.session && self.owner == delivery.owner
    }
}

/// A frame waiting to be published to the replica holding its session's channel;
/// already counted as sent (its timeout runs from its queueing).
struct OutFrame {
    id: u64,
    to: ChannelBinding,
    session: SessionId,
    frame: GatewayFrame,
}

/// What [`Shared::publish_at_once`] did with a frame.
enum AtOnce {
    /// The NATS client has it.
    Published,
    /// It cannot be sent.
    Failed,
    /// It waits in the queue.
    NotNow(OutFrame),
}

/// An announcement waiting to be published, with the subject its answers go to.
struct OutAnnouncement {
    announcement: Announcement,
    reply: Option<String>,
}

/// A frame published and not answered yet.
struct SentFrame {
    to: ChannelBinding,
    session: SessionId,
    /// The task it starts, if it is a task frame: what fails when it is refused.
    task: Option<TaskId>,
}

/// A barrier waiting for its peers.
struct Barrier {
    waiting: HashSet<ReplicaId>,
    done: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Pending {
    frames: HashMap<u64, SentFrame>,
    /// The task frames among `frames`, by task: a delivery for the task answers its
    /// frame (see [`LateAcks`]).
    tasks: HashMap<TaskId, u64>,
    /// Sent frames by age, for their timeout (every frame has the same).
    ages: VecDeque<(u64, Instant)>,
    barriers: HashMap<u64, Barrier>,
}

impl Pending {
    /// Frame `id`, answered or given up: it is no more pending.
    fn remove(&mut self, id: u64) -> Option<SentFrame> {
        let sent = self.frames.remove(&id)?;
        if let Some(task) = &sent.task
            && self.tasks.get(task) == Some(&id)
        {
            self.tasks.remove(task);
        }
        Some(sent)
    }
}

/// How a published frame ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameOutcome {
    Answered(FrameAnswer),
    NoResponders,
    TimedOut,
}

/// What the replicas of a plane share, on one replica.
pub(crate) struct Shared {
    pub(crate) replica: ReplicaId,
    pub(crate) options: NatsOptions,
    pub(crate) client: Client,
    pub(crate) subjects: Subjects,
    /// This replica's inbox: answers come to `{inbox}.f.{id}` (frames) and
    /// `{inbox}.s.{id}` (barriers).
    inbox: String,
    /// The channels this replica holds.
    pub(crate) local: Mutex<HashMap<SessionId, Local>>,
    /// The channels other replicas hold, as they announced them.
    pub(crate) remote: Mutex<HashMap<SessionId, Remote>>,
    /// The Lamport clock of bind epochs.
    epochs: AtomicU64,
    /// The peers this replica has heard from and not seen go.
    members: Mutex<HashSet<ReplicaId>>,
    members_changed: Notify,
    /// The plane version each peer said in its last `Hello` or `Here`.
    versions: Mutex<HashMap<ReplicaId, u32>>,
    frames: mpsc::Sender<OutFrame>,
    /// How many frames `frames` holds or `publish_frames` is publishing: while any
    /// is, a new frame queues behind them rather than overtake them.
    queued: Mutex<usize>,
    announcements: mpsc::UnboundedSender<OutAnnouncement>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// Where forwarded results and channel losses go, once the gateway started.
    inbound: Mutex<Option<TaskInbound>>,
    /// The server's `max_payload`, read again on every (re)connect.
    max_payload: AtomicUsize,
    /// The slots of tasks other replicas sent to channels held here, by task.
    carried: Mutex<HashMap<TaskId, Carried>>,
    /// The answers of task frames taken here, until their first result or their
    /// time to answer.
    late_acks: LateAcks,
    /// The session each row's tasks went to last, for the rows of channels held
    /// here: which counts this replica reports.
    row_sessions: Mutex<HashMap<LlmName, SessionId>>,
    background: Mutex<Vec<AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in lock(&self.background).drain(..) {
            task.abort();
        }
    }
}

/// One gateway replica's link to the others over NATS: the
/// [`ChannelDirectory`](virtual_llm_core::ChannelDirectory) and the
/// [`TaskRouter`](virtual_llm_core::TaskRouter) of a replica, and the background
/// tasks that serve them. Clones share the link; it closes when the last clone, the
/// directory and the router are dropped.
#[derive(Clone)]
pub struct NatsPlane {
    shared: Arc<Shared>,
}

impl fmt::Debug for NatsPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPlane")
            .field("replica", &self.shared.replica)
            .field("prefix", &self.shared.options.prefix)
            .field("peers", &self.peers().len())
            .finish_non_exhaustive()
    }
}

impl NatsPlane {
    /// Connects replica `replica` to the NATS server at `url` (`nats://host:port`, or
    /// several comma-separated), subscribes, and announces itself. NATS reconnects
    /// by itself when the connection drops; the replica announces itself again then.
    pub async fn connect(
        url: &str,
        replica: ReplicaId,
        options: NatsOptions,
    ) -> Result<NatsPlane, NatsError> {
        options.validate()?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let client = ConnectOptions::new()
            .name(format!("virtual-llm gateway {replica}"))
            .connection_timeout(options.timeout)
            .event_callback(move |event| {
                let events = events_tx.clone();
                async move {
                    let _ = events.send(event);
                }
            })
            .connect(url)
            .await
            .map_err(|e| NatsError::Connect {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        let subjects = Subjects::new(&options.prefix);
        let inbox = client.new_inbox();
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| NatsError::Subscribe(format!("{subject}: {e}")))
            }
        };
        let all = subscribe(subjects.all()).await?;
        let frames_in = subscribe(subjects.frame(&replica)).await?;
        let deliveries = subscribe(subjects.deliver(&replica)).await?;
        let pings = subscribe(subjects.ping(&replica)).await?;
        let answers = subscribe(format!("{inbox}.>")).await?;
        // The subscriptions are the server's before anyone is told this replica is
        // here.
        client
            .flush()
            .await
            .map_err(|e| NatsError::Subscribe(e.to_string()))?;
        let (frames_tx, frames_rx) = mpsc::channel(options.queue);
        let (announce_tx, announce_rx) = mpsc::unbounded_channel();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        let max_payload = client.server_info().max_payload;
        let shared = Arc::new(Shared {
            replica,
            options,
            client,
            subjects,
            inbox,
            local: Mutex::new(HashMap::new()),
            remote: Mutex::new(HashMap::new()),
            epochs: AtomicU64::new(seed),
            members: Mutex::new(HashSet::new()),
            members_changed: Notify::new(),
            versions: Mutex::new(HashMap::new()),
            frames: frames_tx,
            queued: Mutex::new(0),
            announcements: announce_tx,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(0),
            inbound: Mutex::new(None),
            max_payload: AtomicUsize::new(max_payload),
            carried: Mutex::new(HashMap::new()),
            late_acks: LateAcks::default(),
            row_sessions: Mutex::new(HashMap::new()),
            background: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&shared);
        let handles = vec![
            tokio::spawn(announcements_in(weak.clone(), all)).abort_handle(),
            tokio::spawn(frames_here(weak.clone(), frames_in)).abort_handle(),
            tokio::spawn(deliveries_here(weak.clone(), deliveries)).abort_handle(),
            tokio::spawn(answer_pings(weak.clone(), pings)).abort_handle(),
            tokio::spawn(answers_in(weak.clone(), answers)).abort_handle(),
            tokio::spawn(publish_frames(weak.clone(), frames_rx)).abort_handle(),
            tokio::spawn(publish_announcements(weak.clone(), announce_rx)).abort_handle(),
            tokio::spawn(expire_frames(weak.clone())).abort_handle(),
            tokio::spawn(answer_late(weak.clone())).abort_handle(),
            tokio::spawn(probe_peers(weak.clone())).abort_handle(),
            tokio::spawn(resync(weak.clone())).abort_handle(),
            tokio::spawn(connection_events(weak, events_rx)).abort_handle(),
        ];
        lock(&shared.background).extend(handles);
        shared.hello();
        Ok(NatsPlane { shared })
    }

    /// The replica this plane links.
    pub fn replica(&self) -> &ReplicaId {
        &self.shared.replica
    }

    /// The channel directory the replica's gateway binds through.
    pub fn directory(&self) -> Arc<dyn ChannelDirectory> {
        Arc::new(NatsDirectory::new(self.shared.clone()))
    }

    /// The task router the replica's gateway forwards results through.
    pub fn task_router(&self) -> Arc<dyn TaskRouter> {
        Arc::new(NatsTaskRouter::new(self.shared.clone()))
    }

    /// Where results forwarded by peers and channel losses they announce go: the
    /// gateway's [`Gateway::inbound`]. Until it is set, forwarded results are answered
    /// as for an unknown task.
    pub fn serve(&self, inbound: TaskInbound) {
        let loads = inbound.follow_loads();
        *lock(&self.shared.inbound) = Some(inbound);
        if let Some(loads) = loads {
            let weak = Arc::downgrade(&self.shared);
            let task = tokio::spawn(report_loads(weak, loads)).abort_handle();
            lock(&self.shared.background).push(task);
        }
    }

    /// Starts a gateway from `builder` as this plane's replica: its directory and task
    /// router are the plane's, and the plane hands it what peers forward.
    pub async fn join(&self, builder: GatewayBuilder) -> Result<Gateway, Error> {
        let gateway = builder
            .replica(self.shared.replica.clone())
            .directory(self.directory())
            .task_router(self.task_router())
            .start()
            .await?;
        self.serve(gateway.inbound());
        Ok(gateway)
    }

    /// The peers this replica knows: heard from, and not seen go.
    pub fn peers(&self) -> Vec<ReplicaId> {
        let mut peers: Vec<ReplicaId> = lock(&self.shared.members).iter().cloned().collect();
        peers.sort();
        peers
    }

    /// Waits until this replica knows exactly `n` peers, for at most `within`;
    /// returns whether it does.
    pub async fn wait_for_peers(&self, n: usize, within: Duration) -> bool {
        let wait = async {
            loop {
                let changed = self.shared.members_changed.notified();
                if lock(&self.shared.members).len() == n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }

    /// The server's `max_payload`, as this replica last read it.
    pub fn max_payload(&self) -> usize {
        self.shared.max_payload.load(Ordering::Relaxed)
    }

    /// Leaves the plane: tells the peers (their tasks waiting on this replica's
    /// channels fail at once), waits until the announcements are out, and closes the
    /// connection.
    pub async fn shutdown(&self) {
        self.shared.announce(Announcement::Bye {
            from: self.shared.replica.clone(),
        });
        self.shared.settle().await;
        self.disconnect().await;
    }

    /// Drops this replica's NATS connection without a word to its peers, as when its
    /// process dies; the plane is unusable after. Peers find out from their probes
    /// ("no responders").
    pub async fn disconnect(&self) {
        for task in lock(&self.shared.background).drain(..) {
            task.abort();
        }
        if let Err(e) = self.shared.client.drain().await {
            tracing::debug!(error = %e, "draining the NATS connection");
        }
    }
}

impl Shared {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A new bind epoch, larger than every epoch this replica made or heard of.
    pub(crate) fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn observe(&self, epoch: u64) {
        self.epochs.fetch_max(epoch, Ordering::Relaxed);
    }

    pub(crate) fn inbound(&self) -> Option<TaskInbound> {
        lock(&self.inbound).clone()
    }

    /// `session`'s channel that `old` named is no more, and its replica may never
    /// say so (it died): the tasks here sent to it wait for their publisher's sign of
    /// life for the resume window (see [`TaskInbound::channel_lost`]).
    pub(crate) fn channel_lost(&self, session: &SessionId, old: &ChannelBinding) {
        let Some(inbound) = self.inbound() else {
            return;
        };
        let waiting = inbound.channel_lost(session);
        if waiting > 0 {
            tracing::info!(
                replica = %self.replica,
                %session,
                peer = %old.replica,
                tasks = waiting,
                "a channel on a peer was lost unannounced; its tasks here wait for their publisher"
            );
        }
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.max_payload.load(Ordering::Relaxed)
    }

    /// A name for the next message cut into pieces, unique among this replica's.
    pub(crate) fn message_id(&self) -> String {
        format!("{}.{}", self.inbox, self.id())
    }

    /// Queues `announcement` for every replica, after the earlier ones.
    pub(crate) fn announce(&self, announcement: Announcement) {
        self.announce_with_reply(announcement, None);
    }

    fn announce_with_reply(&self, announcement: Announcement, reply: Option<String>) {
        let queued = self.announcements.send(OutAnnouncement {
            announcement,
            reply,
        });
        if queued.is_err() {
            tracing::warn!(replica = %self.replica, "the NATS plane is closed: announcement lost");
        }
    }

    /// The channels this replica holds, for a snapshot.
    fn held(&self) -> Vec<Held> {
        lock(&self.local)
            .iter()
            .map(|(session, l)| Held {
                session: session.clone(),
                epoch: l.epoch,
                resumes: l.resumes,
            })
            .collect()
    }

    /// Announces this replica and its channels; every peer answers with its own.
    fn hello(&self) {
        self.announce(Announcement::Hello {
            from: self.replica.clone(),
            held: self.held(),
            version: PLANE_VERSION,
        });
    }

    /// Announces this replica's channels again, for peers that missed something.
    fn resync(&self) {
        self.announce(Announcement::Here {
            from: self.replica.clone(),
            held: self.held(),
            version: PLANE_VERSION,
        });
    }

    /// Ends the slots of carried tasks `which` picks (by task and session); the
    /// slots are freed outside the lock.
    pub(crate) fn drop_carried(&self, which: impl Fn(&TaskId, &SessionId) -> bool) {
        let ended: Vec<Carried> = {
            let mut carried = lock(&self.carried);
            let tasks: Vec<TaskId> = carried
                .iter()
                .filter(|(t, c)| which(t, &c.session))
                .map(|(t, _)| t.clone())
                .collect();
            tasks.iter().filter_map(|t| carried.remove(t)).collect()
        };
        drop(ended);
    }

    /// The slot of the carried task `task`, if any, ends.
    fn end_carried(&self, task: &TaskId) {
        let ended = lock(&self.carried).remove(task);
        drop(ended);
    }

    /// A task frame for a channel held here: its row's tasks go to `session`.
    pub(crate) fn note_row(&self, frame: &GatewayFrame, session: &SessionId) {
        if let GatewayFrame::Task(t) = frame {
            let mut rows = lock(&self.row_sessions);
            if rows.get(&t.llm) != Some(session) {
                rows.insert(t.llm.clone(), session.clone());
            }
        }
    }

    /// The counts of `rows` (pool, row) whose channels this replica holds.
    fn held_loads(&self, inbound: &TaskInbound, rows: Vec<(LlmName, LlmName)>) -> Vec<LoadWire> {
        let held: Vec<(LlmName, LlmName)> = {
            let local = lock(&self.local);
            let mut sessions = lock(&self.row_sessions);
            // Rows of channels no longer held here are no longer this replica's to
            // report.
            sessions.retain(|_, s| local.contains_key(s));
            rows.into_iter()
                .filter(|(_, row)| sessions.contains_key(row))
                .collect()
        };
        held.into_iter()
            .map(|(pool, row)| LoadWire {
                in_flight: inbound.count(&pool, &row),
                pool,
                row,
            })
            .collect()
    }

    /// Sends `frame` to `session`'s channel on `to`: hands it to the NATS client
    /// at once when no frame is queued before it and the client has room (no task
    /// hop on the way of every relayed request), else queues it for
    /// `publish_frames`. Its timeout runs from now: a frame still queued when it
    /// passes (NATS down, the queue not draining) fails its task all the same, and is
    /// not sent.
    pub(crate) fn forward(
        &self,
        to: ChannelBinding,
        session: &SessionId,
        frame: GatewayFrame,
    ) -> Result<(), SendError> {
        let id = self.id();
        let task = match &frame {
            GatewayFrame::Task(t) => Some(t.task_id.clone()),
            _ => None,
        };
        {
            let mut pending = lock(&self.pending);
            if let Some(task) = &task {
                pending.tasks.insert(task.clone(), id);
            }
            pending.frames.insert(
                id,
                SentFrame {
                    to: to.clone(),
                    session: session.clone(),
                    task,
                },
            );
            pending.ages.push_back((id, Instant::now()));
        }
        let out = OutFrame {
            id,
            to,
            session: session.clone(),
            frame,
        };
        let mut queued = lock(&self.queued);
        let out = if *queued == 0 {
            match self.publish_at_once(out) {
                AtOnce::Published => return Ok(()),
                AtOnce::Failed => {
                    drop(queued);
                    // Refused here and now: nothing to fail later.
                    lock(&self.pending).remove(id);
                    return Err(SendError::Closed);
                }
                AtOnce::NotNow(out) => out,
            }
        } else {
            out
        };
        match self.frames.try_send(out) {
            Ok(()) => {
                *queued += 1;
                Ok(())
            }
            Err(e) => {
                drop(queued);
                // Refused here and now: nothing to fail later.
                lock(&self.pending).remove(id);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SendError::Full,
                    mpsc::error::TrySendError::Closed(_) => SendError::Closed,
                })
            }
        }
    }

    /// The subject, reply subject and payload of `out`; `None`, logged, for a frame
    /// that cannot be encoded.
    fn frame_message(&self, out: &OutFrame) -> Option<(String, String, Bytes)> {
        match encode_frame(&out.session, &out.frame) {
            Ok(payload) => Some((
                self.subjects.frame(&out.to.replica),
                format!("{}.f.{}", self.inbox, out.id),
                payload,
            )),
            Err(e) => {
                tracing::warn!(error = %e, "a frame that cannot be encoded");
                None
            }
        }
    }

    /// Hands `out` to the NATS client if that takes no waiting: it fits one message
    /// and the client's queue has room. The caller holds `queued` at 0, so nothing
    /// sent before it is still on its way to the client.
    fn publish_at_once(&self, out: OutFrame) -> AtOnce {
        let Some((subject, reply, payload)) = self.frame_message(&out) else {
            return AtOnce::Failed;
        };
        if payload.len() > self.max_payload() {
            return AtOnce::NotNow(out);
        }
        match self
            .client
            .publish_with_reply(subject, reply, payload)
            .now_or_never()
        {
            Some(Ok(())) => AtOnce::Published,
            Some(Err(e)) => {
                tracing::warn!(peer = %out.to.replica, error = %e, "a frame could not be published");
                AtOnce::Failed
            }
            // The client's queue is full (NATS is away): `publish_frames` waits for it.
            None => AtOnce::NotNow(out),
        }
    }

    /// Waits, for at most the timeout, until every known peer has applied what this
    /// replica announced so far.
    pub(crate) async fn settle(&self) {
        let waiting = lock(&self.members).clone();
        if waiting.is_empty() {
            return;
        }
        let id = self.id();
        let (done, finished) = oneshot::channel();
        lock(&self.pending).barriers.insert(
            id,
            Barrier {
                waiting,
                done: Some(done),
            },
        );
        self.announce_with_reply(
            Announcement::Sync {
                from: self.replica.clone(),
            },
            Some(format!("{}.s.{id}", self.inbox)),
        );
        if tokio::time::timeout(self.options.timeout, finished)
            .await
            .is_err()
        {
            let late = lock(&self.pending).barriers.remove(&id);
            tracing::warn!(
                replica = %self.replica,
                peers = ?late.map(|b| b.waiting),
                "peers did not apply this replica's announcements in time"
            );
        }
    }

    fn member(&self, replica: &ReplicaId) {
        if replica != &self.replica && lock(&self.members).insert(replica.clone()) {
            tracing::info!(replica = %self.replica, peer = %replica, "a peer joined the NATS plane");
            self.members_changed.notify_waiters();
        }
    }

    /// `replica` is gone: its channels are forgotten and no barrier waits for it.
    /// The tasks here waiting on its channels fail, but those of a session that
    /// resumes wait the resume window for their publisher, as they would had the
    /// channel only dropped: the publisher may already be binding again elsewhere, and
    /// whether that bind or this news arrives first must not decide their fate.
    pub(crate) fn gone(&self, replica: &ReplicaId) {
        let was_member = lock(&self.members).remove(replica);
        lock(&self.versions).remove(replica);
        let sessions: Vec<(SessionId, Remote)> = {
            let mut remote = lock(&self.remote);
            let sessions = remote
                .iter()
                .filter(|(_, r)| &r.binding.replica == replica)
                .map(|(s, r)| (s.clone(), r.clone()))
                .collect::<Vec<_>>();
            for (s, _) in &sessions {
                remote.remove(s);
            }
            sessions
        };
        {
            let mut pending = lock(&self.pending);
            for barrier in pending.barriers.values_mut() {
                barrier.waiting.remove(replica);
                if barrier.waiting.is_empty()
                    && let Some(done) = barrier.done.take()
                {
                    let _ = done.send(());
                }
            }
        }
        let (mut failed, mut waiting) = (0, 0);
        if let Some(inbound) = self.inbound() {
            for (session, remote) in &sessions {
                if remote.resumes {
                    waiting += inbound.channel_lost(session);
                } else {
                    failed += inbound.session_closed(session);
                }
            }
        }
        self.drop_carried(|task, _| task.replica().as_ref() == Some(replica));
        if was_member || !sessions.is_empty() {
            tracing::warn!(
                replica = %self.replica,
                peer = %replica,
                channels = sessions.len(),
                failed,
                waiting,
                "a peer left the NATS plane: the tasks here on its channels failed, or wait for their publisher to resume them"
            );
            self.members_changed.notify_waiters();
        }
    }

    /// `bound.binding` holds `session`'s channel: the newer of it and what this
    /// replica knew wins; a channel held here that it replaces is told to close.
    fn apply_bound(&self, session: &SessionId, bound: Remote) {
        let binding = &bound.binding;
        self.observe(binding.epoch);
        let key = |b: &ChannelBinding| (b.epoch, b.replica.clone());
        let replaced = {
            let mut local = lock(&self.local);
            match local.get(session) {
                Some(l) if (l.epoch, self.replica.clone()) > key(binding) => return,
                Some(_) => local.remove(session),
                None => None,
            }
        };
        if let Some(older) = replaced {
            self.drop_carried(|_, s| s == session);
            let closing = GatewayFrame::Closing(Closing {
                reason: "replaced by a newer channel".to_owned(),
            });
            if older.sink.send(closing).is_err() {
                tracing::debug!(%session, "replaced channel was already gone");
            }
        }
        let older = match lock(&self.remote).get(session) {
            Some(known) if key(&known.binding) >= key(binding) => return,
            known => known.map(|k| k.binding.clone()),
        };
        if let Some(older) = &older {
            // The older channel's replica tells nobody of a replaced channel. Its
            // tasks here are held before the newer channel can be given any.
            self.channel_lost(session, older);
        }
        let mut remote = lock(&self.remote);
        match remote.get(session) {
            Some(known) if key(&known.binding) >= key(binding) => {}
            _ => {
                remote.insert(session.clone(), bound);
            }
        }
    }

    /// `from`'s channels are `held`, and only those: a channel it held before and
    /// not now is lost (it restarted, or its release was not heard).
    fn apply_snapshot(&self, from: &ReplicaId, held: Vec<Held>) {
        let before: Vec<(SessionId, ChannelBinding)> = {
            let mut remote = lock(&self.remote);
            let before = remote
                .iter()
                .filter(|(_, r)| &r.binding.replica == from)
                .map(|(s, r)| (s.clone(), r.binding.clone()))
                .collect();
            remote.retain(|_, r| &r.binding.replica != from);
            before
        };
        for h in held {
            let binding = ChannelBinding {
                replica: from.clone(),
                epoch: h.epoch,
            };
            let bound = Remote {
                binding,
                resumes: h.resumes,
            };
            self.apply_bound(&h.session, bound);
        }
        for (session, old) in before {
            let kept = lock(&self.remote).get(&session).map(|r| &r.binding) == Some(&old)
                || lock(&self.local).contains_key(&session);
            if !kept {
                self.channel_lost(&session, &old);
            }
        }
    }

    async fn apply(&self, announcement: Announcement, reply: Option<async_nats::Subject>) {
        let from = announcement.from().clone();
        if from == self.replica {
            return;
        }
        if let Announcement::Hello { version, .. } | Announcement::Here { version, .. } =
            &announcement
        {
            // Known before anyone waiting for this peer hears of it.
            lock(&self.versions).insert(from.clone(), *version);
        }
        if !matches!(announcement, Announcement::Bye { .. }) {
            self.member(&from);
        }
        match announcement {
            Announcement::Hello { from, held, .. } => {
                self.apply_snapshot(&from, held);
                self.resync();
            }
            Announcement::Here { from, held, .. } => self.apply_snapshot(&from, held),
            Announcement::Bound {
                session,
                binding,
                resumes,
            } => self.apply_bound(&session, Remote { binding, resumes }),
            Announcement::Released { session, binding } => {
                let mut remote = lock(&self.remote);
                if remote.get(&session).map(|r| &r.binding) == Some(&binding) {
                    remote.remove(&session);
                }
            }
            Announcement::Load { loads, ttl_ms, .. } => {
                if let Some(inbound) = self.inbound() {
                    let until = Instant::now() + Duration::from_millis(ttl_ms);
                    for l in loads {
                        let load = RowLoad {
                            pool: l.pool,
                            row: l.row,
                            in_flight: l.in_flight,
                        };
                        inbound.heard(&load, until);
                    }
                }
            }
            Announcement::Closed { session, .. } => {
                if let Some(inbound) = self.inbound() {
                    let failed = inbound.session_closed(&session);
                    if failed > 0 {
                        tracing::info!(%session, tasks = failed, peer = %from, "a channel closed on a peer; tasks here failed");
                    }
                }
            }
            Announcement::Resuming { session, .. } => {
                if let Some(inbound) = self.inbound() {
                    let waiting = inbound.channel_lost(&session);
                    if waiting > 0 {
                        tracing::info!(%session, tasks = waiting, peer = %from, "a resuming session's channel closed on a peer; tasks here wait for it");
                    }
                }
            }
            Announcement::Sync { .. } => {
                if let Some(reply) = reply {
                    let me = Bytes::copy_from_slice(self.replica.as_str().as_bytes());
                    if let Err(e) = self.client.publish(reply, me).await {
                        tracing::debug!(error = %e, "answering a barrier");
                    }
                }
            }
            Announcement::Bye { from } => self.gone(&from),
            Announcement::WakeFailed {
                llm, pool, message, ..
            } => {
                if let Some(inbound) = self.inbound() {
                    let failed = inbound.wake_failed(&llm, &pool, &message);
                    tracing::info!(%llm, requests = failed, peer = %from, "a wake failed on a peer; the requests here waiting for it failed");
                }
            }
        }
    }

    /// A result of `task` came from the replica its frame went to: the frame was
    /// taken (see [`LateAcks`]).
    fn frame_answered_by(&self, task: &TaskId) {
        let mut pending = lock(&self.pending);
        if let Some(id) = pending.tasks.remove(task) {
            pending.frames.remove(&id);
        }
    }

    /// What happened to frame `id`.
    fn frame_ended(&self, id: u64, outcome: FrameOutcome) {
        let Some(sent) = lock(&self.pending).remove(id) else {
            return;
        };
        let refused = match outcome {
            FrameOutcome::Answered(FrameAnswer::Taken) => return,
            FrameOutcome::Answered(FrameAnswer::Refused(SendError::Full)) => SendError::Full,
            FrameOutcome::Answered(FrameAnswer::Refused(SendError::Closed)) => {
                let mut remote = lock(&self.remote);
                if remote.get(&sent.session).map(|r| &r.binding) == Some(&sent.to) {
                    remote.remove(&sent.session);
                }
                SendError::Closed
            }
            FrameOutcome::NoResponders => {
                self.gone(&sent.to.replica);
                SendError::Closed
            }
            FrameOutcome::TimedOut => SendError::Closed,
        };
        tracing::debug!(session = %sent.session, peer = %sent.to.replica, ?outcome, "a frame was not taken");
        if let (Some(task), Some(inbound)) = (&sent.task, self.inbound()) {
            inbound.frame_refused(&sent.session, task, refused);
        }
    }

    /// Publishes `payload` to `subject`, cut into pieces when it is over
    /// `max_payload`; the last piece carries `reply`.
    async fn publish(
        &self,
        subject: String,
        payload: Bytes,
        reply: Option<String>,
    ) -> Result<(), async_nats::PublishError> {
        let pieces = chunk::split(payload, self.max_payload(), &self.message_id());
        let last = pieces.len().saturating_sub(1);
        for (i, (headers, piece)) in pieces.into_iter().enumerate() {
            let reply = if i == last { reply.clone() } else { None };
            match (headers, reply) {
                (None, None) => self.client.publish(subject.clone(), piece).await?,
                (None, Some(r)) => {
                    self.client
                        .publish_with_reply(subject.clone(), r, piece)
                        .await?
                }
                (Some(h), None) => {
                    self.client
                        .publish_with_headers(subject.clone(), h, piece)
                        .await?
                }
                (Some(h), Some(r)) => {
                    self.client
                        .publish_with_reply_and_headers(subject.clone(), r, h, piece)
                        .await?
                }
            }
        }
        Ok(())
    }

    /// Hands `delivery` (one NATS request, however many results it carries) to its
    /// task on `replica`, waiting for the answer: for at most
    /// the deliver timeout, publishing included (the client's queue of commands may
    /// be full while NATS is away). See [`leaving`](Shared::leaving) for what it
    /// ends here first.
    pub(crate) async fn deliver(
        &self,
        replica: &ReplicaId,
        delivery: Delivery,
    ) -> Result<(), Error> {
        let task = delivery.task.clone();
        let rightful = self.carried_to(&delivery) != Some(false);
        self.leaving(&delivery);
        let bound = self.options.deliver_timeout;
        let outcome = tokio::time::timeout(bound, self.deliver_unbounded(replica, delivery))
            .await
            .unwrap_or(Err(Error::UnknownTask));
        if rightful && matches!(outcome, Err(Error::UnknownTask | Error::TaskFinished)) {
            // Its replica holds it no more.
            self.end_carried(&task);
        }
        outcome
    }

    /// `delivery` leaves for its task's replica: it answers the task's frame (see
    /// [`LateAcks`]), and a last result ends the task's slot here first, since its
    /// replica may send the row its next task as soon as the result reaches it.
    ///
    /// Only results from the session and principal the frame was carried to, when it
    /// was carried here: another's (refused by the task's replica) end nothing.
    fn leaving(&self, delivery: &Delivery) {
        if self.carried_to(delivery) == Some(false) {
            return;
        }
        self.late_acks.answered(&delivery.task);
        if delivery.results.iter().any(TaskResult::is_final) {
            self.end_carried(&delivery.task);
        }
    }

    /// Whether the task of `delivery` was carried here to the delivery's session, for
    /// its principal; `None` when it was not carried here (its frame went through
    /// another replica, or its slot was not counted: the store was away).
    fn carried_to(&self, delivery: &Delivery) -> Option<bool> {
        lock(&self.carried)
            .get(&delivery.task)
            .map(|c| c.is_for(delivery))
    }

    /// Hands a task's last results to their task on `replica` without waiting for
    /// the answer, published with no reply subject, when `replica` takes them so (it
    /// said a plane version of [`QUIET_LAST_RESULTS`] or later); else as
    /// [`deliver`](Shared::deliver), the answer dropped. Bounded by the deliver
    /// timeout all the same (the client's queue of commands may be full while NATS is
    /// away).
    pub(crate) async fn deliver_last(&self, replica: &ReplicaId, delivery: Delivery) {
        let task = delivery.task.clone();
        let outcome = if self.takes_quietly(replica) {
            self.deliver_quietly(replica, delivery).await
        } else {
            self.deliver(replica, delivery).await
        };
        if let Err(e) = outcome {
            tracing::debug!(%task, peer = %replica, error = %e, "a task's last results were not delivered");
        }
    }

    /// Hands a task's final answer alone to its task on `replica`: without waiting
    /// for the answer when this replica carried the task's frame to the delivery's
    /// session, for its owner, and `replica` takes results so (every refusal but a
    /// task that ended there meanwhile is then known here: see
    /// [`TaskRouter::deliver_final`](virtual_llm_core::TaskRouter::deliver_final));
    /// else as [`deliver`](Shared::deliver).
    pub(crate) async fn deliver_final(
        &self,
        replica: &ReplicaId,
        delivery: Delivery,
    ) -> Result<(), Error> {
        // Taken, not read: of two answers posted at once, one goes this way and the
        // other asks the task's replica, which says it was answered (409).
        if self.takes_quietly(replica) && self.take_carried(&delivery).is_some() {
            self.deliver_quietly(replica, delivery).await
        } else {
            self.deliver(replica, delivery).await
        }
    }

    /// Ends the slot of the task of `delivery` if it was carried here to the
    /// delivery's session, for its principal; returns it (dropping it frees the slot).
    fn take_carried(&self, delivery: &Delivery) -> Option<Carried> {
        let mut carried = lock(&self.carried);
        match carried.get(&delivery.task) {
            Some(c) if c.is_for(delivery) => carried.remove(&delivery.task),
            _ => None,
        }
    }

    /// Whether `replica` takes a task's last results as a plain message (it said a
    /// plane version of [`QUIET_LAST_RESULTS`] or later).
    fn takes_quietly(&self, replica: &ReplicaId) -> bool {
        lock(&self.versions).get(replica).copied().unwrap_or(0) >= QUIET_LAST_RESULTS
    }

    /// Publishes `delivery`, its task's last results, with no reply subject: `Ok` once
    /// it is on its way. [`UnknownTask`](Error::UnknownTask) when it could not be sent
    /// within the deliver timeout (the client's queue of commands may be full while
    /// NATS is away), as for a replica that cannot be reached.
    async fn deliver_quietly(&self, replica: &ReplicaId, delivery: Delivery) -> Result<(), Error> {
        let task = delivery.task.clone();
        self.leaving(&delivery);
        let payload = serde_json::to_vec(&DeliveryWire::from(delivery))
            .map_err(|e| Error::invalid(format!("a result that cannot be encoded: {e}")))?;
        let subject = self.subjects.deliver(replica);
        let sent = tokio::time::timeout(
            self.options.deliver_timeout,
            self.publish(subject, payload.into(), None),
        )
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(%task, peer = %replica, error = %e, "a task's last results were not sent");
                Err(Error::UnknownTask)
            }
            Err(_) => {
                tracing::debug!(%task, peer = %replica, "a task's last results were not sent in time");
                Err(Error::UnknownTask)
            }
        }
    }

    async fn deliver_unbounded(
        &self,
        replica: &ReplicaId,
        delivery: Delivery,
    ) -> Result<(), Error> {
        let payload = serde_json::to_vec(&DeliveryWire::from(delivery))
            .map_err(|e| Error::invalid(format!("a result that cannot be encoded: {e}")))?;
        let subject = self.subjects.deliver(replica);
        let mut pieces = chunk::split(payload.into(), self.max_payload(), &self.message_id());
        let Some((headers, last)) = pieces.pop() else {
            return Err(Error::UnknownTask);
        };
        for (h, piece) in pieces {
            let sent = match h {
                Some(h) => {
                    self.client
                        .publish_with_headers(subject.clone(), h, piece)
                        .await
                }
                None => self.client.publish(subject.clone(), piece).await,
            };
            if let Err(e) = sent {
                tracing::debug!(peer = %replica, error = %e, "forwarding a result");
                return Err(Error::UnknownTask);
            }
        }
        let mut request = Request::new()
            .payload(last)
            .timeout(Some(self.options.deliver_timeout));
        if let Some(h) = headers {
            request = request.headers(h);
        }
        match self.client.send_request(subject, request).await {
            Ok(answer) => DeliverAnswer::decode(&answer.payload),
            Err(e) => {
                if e.kind() == RequestErrorKind::NoResponders {
                    self.gone(replica);
                }
                tracing::debug!(peer = %replica, error = %e, "a forwarded result was not answered");
                Err(Error::UnknownTask)
            }
        }
    }
}

/// Runs `handle` on each whole message of `sub`, while the plane lives.
async fn each_message<F, Fut>(
    weak: Weak<Shared>,
    mut sub: async_nats::Subscriber,
    what: &'static str,
    mut handle: F,
) where
    F: FnMut(Arc<Shared>, Message, Bytes) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut pieces = match weak.upgrade() {
        Some(s) => Reassembler::new(s.options.max_message, s.options.timeout),
        None => return,
    };
    while let Some(msg) = sub.next().await {
        let Some(shared) = weak.upgrade() else { return };
        match pieces.accept(msg.headers.as_ref(), msg.payload.clone()) {
            Piece::Whole(payload) => handle(shared, msg, payload).await,
            Piece::Partial => {}
            Piece::Dropped(why) => tracing::warn!(what, %why, "a message from a peer was dropped"),
        }
    }
    tracing::debug!(what, "subscription ended");
}

async fn announcements_in(weak: Weak<Shared>, sub: async_nats::Subscriber) {
    each_message(
        weak,
        sub,
        "announcements",
        |shared, msg, payload| async move {
            match serde_json::from_slice::<Announcement>(&payload) {
                Ok(a) => shared.apply(a, msg.reply).await,
                Err(e) => tracing::warn!(error = %e, "an announcement that does not parse"),
            }
        },
    )
    .await;
}

async fn frames_here(weak: Weak<Shared>, sub: async_nats::Subscriber) {
    each_message(weak, sub, "frames", |shared, msg, payload| async move {
        let (answer, task) = match decode_frame(&payload) {
            Ok((session, frame)) => {
                let task = match &frame {
                    GatewayFrame::Task(t) => Some(t.task_id.clone()),
                    _ => None,
                };
                (shared.frame_here(session, frame).await, task)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a frame that does not parse");
                (FrameAnswer::Refused(SendError::Closed), None)
            }
        };
        let Some(reply) = msg.reply else { return };
        if let (FrameAnswer::Taken, Some(task)) = (answer, task) {
            // Its first result answers it, or `answer_late` does.
            shared.late_acks.hold(task, reply.to_string());
            return;
        }
        if let Err(e) = shared.client.publish(reply, answer.encode()).await {
            tracing::debug!(error = %e, "answering a frame");
        }
    })
    .await;
}

impl Shared {
    /// A frame a peer sent for `session`'s channel, held here: a task takes a slot
    /// on its row first (refused as full without one), a cancel ends its task's
    /// slot, a wake joins this replica's wake of the row.
    async fn frame_here(&self, session: SessionId, frame: GatewayFrame) -> FrameAnswer {
        let sink = lock(&self.local).get(&session).map(|l| l.sink.clone());
        let Some(sink) = sink else {
            return FrameAnswer::Refused(SendError::Closed);
        };
        let inbound = self.inbound();
        let mut held = None;
        match (&frame, &inbound) {
            (GatewayFrame::Task(t), Some(inbound)) => match inbound.hold(&session, &t.llm).await {
                Ok(h) => held = h,
                Err(Error::Unavailable {
                    kind: virtual_llm_core::UnavailableKind::Offline,
                    ..
                }) => return FrameAnswer::Refused(SendError::Closed),
                Err(_) => return FrameAnswer::Refused(SendError::Full),
            },
            (GatewayFrame::Cancel(c), _) => self.end_carried(&c.task_id),
            (GatewayFrame::Wake(w), Some(inbound)) => {
                return match inbound.wake(&session, &w.llm).await {
                    Ok(()) => FrameAnswer::Taken,
                    Err(e) => {
                        tracing::debug!(%session, error = %e, "a peer's wake was not asked");
                        FrameAnswer::Refused(SendError::Closed)
                    }
                };
            }
            _ => {}
        }
        let task = match &frame {
            GatewayFrame::Task(t) => Some(t.task_id.clone()),
            _ => None,
        };
        self.note_row(&frame, &session);
        // Carried before the publisher can see the task: its last result may come
        // back at once.
        let carried = match (task, held) {
            (Some(task), Some(held)) => {
                lock(&self.carried).insert(
                    task.clone(),
                    Carried {
                        session,
                        owner: held.owner,
                        _slot: held.slot,
                    },
                );
                Some(task)
            }
            _ => None,
        };
        match sink.send(frame) {
            Ok(()) => FrameAnswer::Taken,
            Err(e) => {
                if let Some(task) = carried {
                    self.end_carried(&task);
                }
                FrameAnswer::Refused(e)
            }
        }
    }
}

/// Reports the in-flight counts of the rows of channels held here to every peer:
/// the rows that changed, gathered for `load_interval`, and every `load_refresh` the
/// rows with tasks in flight.
async fn report_loads(weak: Weak<Shared>, changes: Arc<LoadChanges>) {
    let (gather, refresh) = match weak.upgrade() {
        Some(s) => (s.options.load_interval, s.options.load_refresh),
        None => return,
    };
    let ttl_ms = u64::try_from(refresh.saturating_mul(3).as_millis()).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval_at(Instant::now() + refresh, refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Rows reported with tasks in flight: reported again at each refresh, and once
    // more when they reach none.
    let mut busy: HashSet<(LlmName, LlmName)> = HashSet::new();
    loop {
        let refreshing = tokio::select! {
            () = changes.changed() => false,
            _ = tick.tick() => true,
        };
        if !refreshing && !gather.is_zero() {
            tokio::time::sleep(gather).await;
        }
        let Some(shared) = weak.upgrade() else { return };
        let Some(inbound) = shared.inbound() else {
            continue;
        };
        let mut rows = changes.take();
        if refreshing {
            rows.extend(busy.iter().cloned());
            rows.sort();
            rows.dedup();
        }
        let loads = shared.held_loads(&inbound, rows);
        if loads.is_empty() {
            continue;
        }
        for l in &loads {
            let key = (l.pool.clone(), l.row.clone());
            if l.in_flight > 0 {
                busy.insert(key);
            } else {
                busy.remove(&key);
            }
        }
        shared.announce(Announcement::Load {
            from: shared.replica.clone(),
            loads,
            ttl_ms,
        });
    }
}

async fn deliveries_here(weak: Weak<Shared>, sub: async_nats::Subscriber) {
    each_message(weak, sub, "deliveries", |shared, msg, payload| async move {
        // A delivery with no reply subject is a task's last results, unanswered.
        let reply = msg.reply;
        // Taken here when the task takes it at once (the common case: one task hop
        // less on every stream's path); else on its own task, so that a slow client
        // holds up its own stream only.
        let mut delivery = Box::pin(async move {
            let outcome = match serde_json::from_slice::<DeliveryWire>(&payload) {
                Err(e) => Err(Error::invalid(format!(
                    "a forwarded result that does not parse: {e}"
                ))),
                Ok(d) => {
                    let delivery = Delivery::from(d);
                    match shared.inbound() {
                        None => Err(Error::UnknownTask),
                        Some(inbound) => {
                            // A result of a task, from the session and principal it
                            // was sent to, answers its frame: the channel took it.
                            if inbound.expects(&delivery) {
                                shared.frame_answered_by(&delivery.task);
                            }
                            let bound = shared.options.deliver_timeout;
                            tokio::time::timeout(bound, inbound.deliver(delivery))
                                .await
                                .unwrap_or(Err(Error::UnknownTask))
                        }
                    }
                }
            };
            match reply {
                Some(reply) => {
                    if let Err(e) = shared
                        .client
                        .publish(reply, DeliverAnswer::encode(&outcome))
                        .await
                    {
                        tracing::debug!(error = %e, "answering a forwarded result");
                    }
                }
                None => {
                    if let Err(e) = outcome {
                        tracing::debug!(error = %e, "a task's last results were refused");
                    }
                }
            }
        });
        if delivery.as_mut().now_or_never().is_none() {
            tokio::spawn(delivery);
        }
    })
    .await;
}

async fn answer_pings(weak: Weak<Shared>, sub: async_nats::Subscriber) {
    each_message(weak, sub, "pings", |shared, msg, _| async move {
        if let Some(reply) = msg.reply
            && let Err(e) = shared
                .client
                .publish(reply, Bytes::from_static(b"pong"))
                .await
        {
            tracing::debug!(error = %e, "answering a probe");
        }
    })
    .await;
}

async fn answers_in(weak: Weak<Shared>, sub: async_nats::Subscriber) {
    each_message(weak, sub, "answers", |shared, msg, payload| async move {
        let mut tokens = msg.subject.as_str().rsplit('.');
        let id = tokens.next().and_then(|t| t.parse::<u64>().ok());
        let (Some(id), Some(kind)) = (id, tokens.next()) else {
            return;
        };
        let no_responders = msg.status == Some(StatusCode::NO_RESPONDERS);
        match kind {
            "f" => {
                let outcome = if no_responders {
                    FrameOutcome::NoResponders
                } else {
                    FrameOutcome::Answered(FrameAnswer::decode(&payload))
                };
                shared.frame_ended(id, outcome);
            }
            "s" if !no_responders => {
                let Ok(peer) = std::str::from_utf8(&payload)
                    .map_err(|e| e.to_string())
                    .and_then(|s| ReplicaId::parse(s).map_err(|e| e.to_string()))
                else {
                    return;
                };
                let mut pending = lock(&shared.pending);
                if let Some(barrier) = pending.barriers.get_mut(&id) {
                    barrier.waiting.remove(&peer);
                    if barrier.waiting.is_empty() {
                        if let Some(done) = barrier.done.take() {
                            let _ = done.send(());
                        }
                        pending.barriers.remove(&id);
                    }
                }
            }
            _ => {}
        }
    })
    .await;
}

/// Publishes the frames [`Shared::forward`] could not hand to the NATS client at
/// once, in order.
async fn publish_frames(weak: Weak<Shared>, mut queue: mpsc::Receiver<OutFrame>) {
    while let Some(out) = queue.recv().await {
        let Some(shared) = weak.upgrade() else { return };
        publish_queued(&shared, out).await;
        let mut queued = lock(&shared.queued);
        *queued = queued.saturating_sub(1);
    }
}

async fn publish_queued(shared: &Shared, out: OutFrame) {
    if !lock(&shared.pending).frames.contains_key(&out.id) {
        // Its timeout passed while it was queued: its task failed already.
        return;
    }
    let Some((subject, reply, payload)) = shared.frame_message(&out) else {
        shared.frame_ended(out.id, FrameOutcome::TimedOut);
        return;
    };
    if let Err(e) = shared.publish(subject, payload, Some(reply)).await {
        tracing::warn!(peer = %out.to.replica, error = %e, "a frame could not be published");
        shared.frame_ended(out.id, FrameOutcome::TimedOut);
    }
}

async fn publish_announcements(
    weak: Weak<Shared>,
    mut queue: mpsc::UnboundedReceiver<OutAnnouncement>,
) {
    while let Some(out) = queue.recv().await {
        let Some(shared) = weak.upgrade() else { return };
        let payload = match serde_json::to_vec(&out.announcement) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::warn!(error = %e, "an announcement that cannot be encoded");
                continue;
            }
        };
        if let Err(e) = shared
            .publish(shared.subjects.all(), payload, out.reply)
            .await
        {
            tracing::warn!(error = %e, "an announcement could not be published");
        }
    }
}

/// Every quarter of the timeout, the task frames taken here a quarter of the
/// timeout ago or more whose tasks have sent no result get their answer: taken.
async fn answer_late(weak: Weak<Shared>) {
    let Some((every, mut tick)) = quarter_timeout_tick(&weak) else {
        return;
    };
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        for reply in shared.late_acks.due(every) {
            if let Err(e) = shared
                .client
                .publish(reply, FrameAnswer::Taken.encode())
                .await
            {
                tracing::debug!(error = %e, "answering a frame");
            }
        }
    }
}

/// The tick of the plane's periodic chores: a quarter of its timeout (at least 10 ms),
/// with that period; `None` once the plane is gone.
fn quarter_timeout_tick(weak: &Weak<Shared>) -> Option<(Duration, tokio::time::Interval)> {
    let every = (weak.upgrade()?.options.timeout / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some((every, tick))
}

/// Frames not answered within the timeout fail their tasks.
async fn expire_frames(weak: Weak<Shared>) {
    let Some((_, mut tick)) = quarter_timeout_tick(&weak) else {
        return;
    };
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<u64> = {
            let mut pending = lock(&shared.pending);
            let mut expired = Vec::new();
            while let Some(&(id, sent)) = pending.ages.front() {
                if now.duration_since(sent) < shared.options.timeout {
                    break;
                }
                pending.ages.pop_front();
                if pending.frames.contains_key(&id) {
                    expired.push(id);
                }
            }
            expired
        };
        for id in expired {
            shared.frame_ended(id, FrameOutcome::TimedOut);
        }
    }
}

/// Every known peer, every `probe_interval`: "no responders", or no answer within
/// the timeout while this replica is connected, and it is gone.
async fn probe_peers(weak: Weak<Shared>) {
    let every = match weak.upgrade() {
        Some(s) => s.options.probe_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        let peers: Vec<ReplicaId> = lock(&shared.members).iter().cloned().collect();
        let probes = peers.into_iter().map(|peer| {
            let shared = shared.clone();
            async move {
                let request = Request::new().timeout(Some(shared.options.timeout));
                let probe = shared
                    .client
                    .send_request(shared.subjects.ping(&peer), request);
                // Bounded as a whole: sending waits while NATS is away.
                let Ok(answer) = tokio::time::timeout(shared.options.timeout, probe).await else {
                    return;
                };
                let connected =
                    || shared.client.connection_state() == async_nats::connection::State::Connected;
                match answer {
                    Ok(_) => {}
                    Err(e) if e.kind() == RequestErrorKind::NoResponders => shared.gone(&peer),
                    Err(e) if e.kind() == RequestErrorKind::TimedOut && connected() => {
                        shared.gone(&peer)
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "a probe failed"),
                }
            }
        });
        join_all(probes).await;
    }
}

/// Every `resync_interval`, this replica's channels again.
async fn resync(weak: Weak<Shared>) {
    let every = match weak.upgrade() {
        Some(s) => s.options.resync_interval,
        None => return,
    };
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        shared.resync();
    }
}

/// After a reconnect: the server's limits are read again, and this replica announces
/// itself and its channels (announcements made while it was away may be lost), and
/// hears every peer's.
async fn connection_events(weak: Weak<Shared>, mut events: mpsc::UnboundedReceiver<Event>) {
    while let Some(event) = events.recv().await {
        let Some(shared) = weak.upgrade() else { return };
        match event {
            Event::Connected => {
                let max = shared.client.server_info().max_payload;
                shared.max_payload.store(max, Ordering::Relaxed);
                tracing::info!(replica = %shared.replica, max_payload = max, "connected to NATS");
                shared.hello();
            }
            Event::Disconnected => {
                tracing::warn!(replica = %shared.replica, "disconnected from NATS; reconnecting")
            }
            other => tracing::debug!(replica = %shared.replica, event = %other, "NATS event"),
        }
    }
}
