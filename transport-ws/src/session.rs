//! One publisher's socket on the gateway: the first frame must be `register`; then
//! tasks and cancels go down, heartbeats and results come up, pings keep the link
//! and a missed pong closes it — as does a publisher that takes no frame for as long
//! (it stopped reading: its socket is full, and no ping could even be sent). When the socket closes, the results it already
//! carried are delivered and the session unbinds.
//!
//! Results are handed to the core by one small forwarder per task, so a client that
//! reads slowly holds up only its own task. With flow control (the publisher asked for
//! it on the upgrade), each forwarder grants the publisher `credit` for more results as
//! it hands earlier ones to the client: a slow client slows its own stream, and its
//! buffer never overflows. Without it, a forwarder that falls a whole buffer behind
//! cuts its task off (the client gets an error, the publisher a `cancel`) instead of
//! stalling the socket every other task shares; that is also what happens to a
//! publisher that sends beyond its credit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};
use virtual_llm_core::error::Escaped;
use virtual_llm_core::protocol::{CreditFrame, GatewayFrame, PublisherFrame, Refusal, TaskResult};
use virtual_llm_core::{Error, Gateway, Principal, RESULTS_PER_DELIVERY, SessionId, TaskId};

/// How long a new socket may take to send its `register`.
const REGISTER_WAIT: Duration = Duration::from_secs(10);
/// How long a closing socket waits for the results it already read to reach their
/// tasks (only a client too slow to take them makes this wait at all).
const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// How long a closing socket waits to send its last frames and close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Most frames written to a publisher with one flush.
const FRAMES_PER_WRITE: usize = 64;

/// Serves one publisher's socket. `window`: the per-task flow-control window, when the
/// publisher asked for credits.
pub(crate) async fn run<S>(
    gateway: Gateway,
    principal: Principal,
    mut socket: WebSocketStream<S>,
    window: Option<usize>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = match tokio::time::timeout(REGISTER_WAIT, socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<PublisherFrame>(&text) {
            Ok(PublisherFrame::Register(request)) => request,
            Ok(_) => {
                return refuse(socket, &Error::invalid("the first frame must be register")).await;
            }
            Err(e) => {
                return refuse(socket, &Error::invalid(format!("malformed frame: {e}"))).await;
            }
        },
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return,
        Ok(Some(Ok(_))) => {
            return refuse(
                socket,
                &Error::invalid("the first frame must be a register text frame"),
            )
            .await;
        }
        Ok(Some(Err(e))) => return refuse(socket, &read_error(&e, &gateway)).await,
        Err(_) => return refuse(socket, &Error::invalid("no register frame within 10 s")).await,
    };
    let answer = match gateway.register(&principal, request).await {
        Ok(answer) => answer,
        Err(e) => {
            send(&mut socket, &GatewayFrame::Refused(Refusal::from_error(&e))).await;
            close(socket).await;
            return;
        }
    };
    let session = answer.provider_session_id.clone();
    // Bound before `registered` goes out: a publisher that has its answer is
    // reachable. Frames for it wait in the queue until the loop below sends them.
    let (tx, mut frames) = mpsc::channel::<Box<GatewayFrame>>(gateway.config().channel_buffer);
    let binding = match gateway.bind(&principal, &session, Arc::new(tx)).await {
        Ok(binding) => binding,
        Err(e) => return refuse(socket, &e).await,
    };
    if !send(&mut socket, &GatewayFrame::Registered(answer)).await {
        if let Err(e) = binding.release().await {
            tracing::warn!(%session, error = %e, "unbinding a socket that closed at once failed");
        }
        return;
    }
    let keepalive = gateway.config().keepalive;
    // A publisher within its window has at most two credits of a task not yet sent to
    // it (it must receive them to send more), so this queue never fills for one; a
    // publisher that stops reading its socket loses the credits that do not fit.
    // The queue exists only for a publisher that asked for credits, and holds boxed
    // frames: an idle socket's queues cost a few hundred bytes, not kilobytes.
    let credit_queue = 2 * gateway.config().channel_buffer + 16;
    let (grant, mut credits) = match window {
        Some(window) => {
            let (tx, rx) = mpsc::channel::<Box<CreditFrame>>(credit_queue);
            (Some((window, tx)), Some(rx))
        }
        None => (None, None),
    };
    let mut forwarders =
        Forwarders::new(gateway.clone(), principal.clone(), session.clone(), grant);
    let mut ping = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    let mut last_pong = Instant::now();
    let outcome: Result<(), Error> = loop {
        tokio::select! {
            incoming = socket.next() => match incoming {
                None | Some(Ok(Message::Close(_))) => break Ok(()),
                Some(Err(e)) => break Err(read_error(&e, &gateway)),
                Some(Ok(Message::Text(text))) => match PublisherFrame::from_text(&text) {
                    Ok(PublisherFrame::Heartbeat(h)) if h.provider_session_id != session => {
                        break Err(Error::invalid("a heartbeat for another session"));
                    }
                    Ok(PublisherFrame::Heartbeat(h)) => match gateway.heartbeat_with(&principal, &session, h.llms.as_deref().unwrap_or_default()).await {
                        Ok(_) => {}
                        // The gateway's own failure (its store): the publisher did nothing
                        // wrong, so its socket and tasks carry on, as an SSE publisher's
                        // do after a 500; the next heartbeat tries again.
                        Err(e) if e.status() >= 500 => {
                            tracing::warn!(%session, error = %e, "heartbeat not recorded");
                        }
                        Err(e) => break Err(e),
                    },
                    Ok(PublisherFrame::Register(_)) => break Err(Error::invalid("register comes once, first")),
                    Ok(frame) => {
                        if let Some((task, results)) = frame.into_task_results()
                            && let Err(e) = forwarders.route(task, results)
                        {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(Error::invalid(format!("malformed frame: {e}"))),
                },
                Some(Ok(Message::Binary(_))) => break Err(Error::invalid("frames are JSON text frames")),
                Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                // tungstenite answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => {}
            },
            frame = frames.recv() => match frame {
                Some(frame) => {
                    let (batch, closing) = ready_frames(*frame, &mut frames, &mut credits);
                    for frame in &batch {
                        if let GatewayFrame::Cancel(c) = frame {
                            forwarders.forget(&c.task_id);
                        }
                    }
                    if !send_within(&mut socket, &batch, keepalive * 2).await || closing {
                        break Ok(());
                    }
                }
                None => break Ok(()),
            },
            Some(credit) = next_credit(&mut credits) => {
                let batch = [GatewayFrame::Credit(*credit)];
                if !send_within(&mut socket, &batch, keepalive * 2).await {
                    break Ok(());
                }
            }
            _ = ping.tick() => {
                if last_pong.elapsed() > keepalive * 2 {
                    tracing::info!(%session, "no pong for two keep-alive periods; closing");
                    break Ok(());
                }
                let ping = socket.send(Message::Ping(Default::default()));
                if !matches!(tokio::time::timeout(keepalive * 2, ping).await, Ok(Ok(()))) {
                    break Ok(());
                }
            }
        }
    };
    if let Err(e) = &outcome {
        tracing::info!(%session, error = %Escaped(&e), "closing a publisher socket");
        send_within(&mut socket, &[GatewayFrame::Error(e.to_body())], CLOSE_WAIT).await;
    }
    // A publisher that stopped reading cannot take the close frame either.
    if tokio::time::timeout(CLOSE_WAIT, close(socket))
        .await
        .is_err()
    {
        tracing::debug!(%session, "socket dropped without a close handshake");
    }
    // Results read before the socket ended are the publisher's word: deliver them
    // before unbinding fails the session's tasks. New tasks find the channel closed.
    drop(frames);
    forwarders.finish().await;
    if let Err(e) = binding.release().await {
        if gateway.is_draining() {
            // The store may close under a shutdown's last unbinds; the rows read
            // inactive at the next start anyway (restart recovery).
            tracing::debug!(%session, error = %e, "unbinding a closed socket during shutdown failed");
        } else {
            tracing::warn!(%session, error = %e, "unbinding a closed socket failed");
        }
    }
}

/// `first` and the frames ready with it for the publisher, in order, then the credits
/// ready (independent of the frames), up to [`FRAMES_PER_WRITE`]: they leave with one
/// write. Nothing follows a `closing` frame; the flag says whether the batch ends
/// with one.
fn ready_frames(
    first: GatewayFrame,
    frames: &mut mpsc::Receiver<Box<GatewayFrame>>,
    credits: &mut Option<mpsc::Receiver<Box<CreditFrame>>>,
) -> (Vec<GatewayFrame>, bool) {
    let closing = |f: &GatewayFrame| matches!(f, GatewayFrame::Closing(_));
    let mut batch = vec![first];
    while batch.len() < FRAMES_PER_WRITE && !batch.last().is_some_and(closing) {
        match frames.try_recv() {
            Ok(frame) => batch.push(*frame),
            Err(_) => break,
        }
    }
    let closed = batch.last().is_some_and(closing);
    if let Some(credits) = credits
        && !closed
    {
        while batch.len() < FRAMES_PER_WRITE
            && let Ok(credit) = credits.try_recv()
        {
            batch.push(GatewayFrame::Credit(*credit));
        }
    }
    (batch, closed)
}

/// The next credit to send; never, for a socket without flow control.
async fn next_credit(
    credits: &mut Option<mpsc::Receiver<Box<CreditFrame>>>,
) -> Option<Box<CreditFrame>> {
    match credits {
        Some(credits) => credits.recv().await,
        None => std::future::pending().await,
    }
}

/// A read error as the publisher should hear it: an oversized frame is a 413.
fn read_error(e: &tungstenite::Error, gateway: &Gateway) -> Error {
    match e {
        tungstenite::Error::Capacity(_) => Error::PayloadTooLarge {
            limit: gateway.config().max_body_bytes,
        },
        other => Error::invalid(format!("unreadable frame: {other}")),
    }
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut socket: WebSocketStream<S>, e: &Error) {
    send(&mut socket, &GatewayFrame::Error(e.to_body())).await;
    close(socket).await;
}

/// Sends `frames` with one flush, giving up after `limit`: a publisher that takes
/// nothing for that long has stopped reading, as surely as one that stops answering
/// pings. `false` when the socket is gone or stalled.
async fn send_within<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    frames: &[GatewayFrame],
    limit: Duration,
) -> bool {
    match tokio::time::timeout(limit, send_all(socket, frames)).await {
        Ok(sent) => sent,
        Err(_) => {
            tracing::info!(?limit, "the publisher took no frame; closing its socket");
            false
        }
    }
}

/// Sends one frame; `false` when the socket is gone.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    frame: &GatewayFrame,
) -> bool {
    send_all(socket, std::slice::from_ref(frame)).await
}

/// Sends `frames` in order with one flush: one write on the socket while they fit
/// the write buffer. `false` when the socket is gone. A frame that cannot be encoded
/// is logged and skipped.
async fn send_all<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    frames: &[GatewayFrame],
) -> bool {
    for frame in frames {
        match serde_json::to_string(frame) {
            Ok(text) => {
                if socket.feed(Message::text(text)).await.is_err() {
                    return false;
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode a frame"),
        }
    }
    socket.flush().await.is_ok()
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut socket: WebSocketStream<S>) {
    if let Err(e) = socket.close(None).await {
        tracing::debug!(error = %e, "socket closed uncleanly");
    }
}

/// One forwarding queue per task in flight on this socket.
struct Forwarders {
    gateway: Gateway,
    principal: Principal,
    session: SessionId,
    /// Each holds the results of one frame (a run of chunks is one entry).
    queues: HashMap<TaskId, mpsc::Sender<Vec<TaskResult>>>,
    /// The forwarders still delivering, including those whose task had its final
    /// result queued (and so left `queues`).
    running: JoinSet<()>,
    /// With flow control: the window, and where forwarders send the credits they grant.
    credits: Option<(usize, mpsc::Sender<Box<CreditFrame>>)>,
}

impl Forwarders {
    fn new(
        gateway: Gateway,
        principal: Principal,
        session: SessionId,
        credits: Option<(usize, mpsc::Sender<Box<CreditFrame>>)>,
    ) -> Self {
        Forwarders {
            gateway,
            principal,
            session,
            queues: HashMap::new(),
            running: JoinSet::new(),
            credits,
        }
    }

    /// Lets every forwarder deliver what it holds, for at most [`DRAIN_WAIT`]; the
    /// ones still waiting on a slow client are stopped.
    async fn finish(mut self) {
        self.queues.clear();
        let drained = tokio::time::timeout(DRAIN_WAIT, async {
            while self.running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::debug!(
                session = %self.session,
                forwarders = self.running.len(),
                "results still waiting for slow clients when the socket closed; dropped"
            );
        }
    }

    /// Queues the `results` of one frame for their task's forwarder, starting one for
    /// a new task.
    fn route(&mut self, task: TaskId, results: Vec<TaskResult>) -> Result<(), Error> {
        while self.running.try_join_next().is_some() {}
        let limit = self.gateway.config().channel_buffer;
        if !self.queues.contains_key(&task) && self.queues.len() >= limit {
            self.queues.retain(|_, q| !q.is_closed());
            if self.queues.len() >= limit {
                return Err(Error::invalid("too many tasks in flight on one socket"));
            }
        }
        let last = results.iter().any(TaskResult::is_final);
        if last && !self.queues.contains_key(&task) {
            // A task answered in one result (a whole completion) needs no forwarder:
            // its final result has a slot kept for it, so delivering never waits on the
            // client. Should it wait anyway, it finishes in a task of its own.
            let (gateway, principal, session) = (
                self.gateway.clone(),
                self.principal.clone(),
                self.session.clone(),
            );
            let mut delivery = Box::pin(async move {
                let delivered = gateway
                    .deliver_last(&principal, &session, &task, results)
                    .await;
                if let Err(e) = delivered {
                    tracing::debug!(%task, error = %e, "result refused");
                }
            });
            if delivery.as_mut().now_or_never().is_none() {
                self.running.spawn(delivery);
            }
            return Ok(());
        }
        if !self.queues.contains_key(&task) {
            let queue = self.spawn(task.clone());
            self.queues.insert(task.clone(), queue);
        }
        let Some(queue) = self.queues.get(&task) else {
            return Ok(());
        };
        match queue.try_send(results) {
            Ok(()) if last => {
                self.queues.remove(&task);
            }
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The client is a whole buffer behind (and the publisher did not wait
                // for credit): cut its task off rather than stall every other task on
                // this socket.
                self.queues.remove(&task);
                let reason = Error::Unavailable {
                    kind: virtual_llm_core::UnavailableKind::Saturated,
                    reason: "the client read too slowly; its stream was cut off".into(),
                    retry_after: self.gateway.config().retry_after,
                };
                if let Err(e) =
                    self.gateway
                        .fail_task(&self.principal, &self.session, &task, reason)
                {
                    tracing::debug!(%task, error = %e, "could not cut off a slow client's task");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queues.remove(&task);
            }
        }
        Ok(())
    }

    fn forget(&mut self, task: &TaskId) {
        self.queues.remove(task);
    }

    fn spawn(&mut self, task: TaskId) -> mpsc::Sender<Vec<TaskResult>> {
        let (tx, mut rx) = mpsc::channel::<Vec<TaskResult>>(self.gateway.config().task_buffer);
        let (gateway, principal, session) = (
            self.gateway.clone(),
            self.principal.clone(),
            self.session.clone(),
        );
        let credits = self.credits.clone();
        self.running.spawn(async move {
            // Credit is granted half a window at a time, as results reach the client.
            let step = credits
                .as_ref()
                .map_or(1, |(window, _)| (window / 2).max(1));
            let mut delivered = 0;
            while let Some(mut results) = rx.recv().await {
                // The results queued meanwhile go with them: one hand-off for them all,
                // one hop when the task lives on another replica.
                while results.len() < RESULTS_PER_DELIVERY
                    && let Ok(more) = rx.try_recv()
                {
                    results.extend(more);
                }
                let count = results.len();
                let last = results.iter().any(TaskResult::is_final);
                // The last results' answer is of no use here: a refused result is
                // only logged, and nothing follows them.
                let outcome = if last {
                    gateway
                        .deliver_last(&principal, &session, &task, results)
                        .await
                } else {
                    gateway
                        .deliver_all(&principal, &session, &task, results)
                        .await
                };
                if let Err(e) = outcome {
                    tracing::debug!(%task, error = %e, "result refused");
                    break;
                }
                delivered += count;
                if let Some((_, grant)) = &credits
                    && !last
                    && delivered >= step
                {
                    let credit = CreditFrame {
                        task_id: task.clone(),
                        results: u32::try_from(delivered).unwrap_or(u32::MAX),
                    };
                    delivered = 0;
                    match grant.try_send(Box::new(credit)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!(%task, "credit dropped: the publisher is not reading");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break, // the socket is gone
                    }
                }
            }
        });
        tx
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use tokio::io::{DuplexStream, ReadBuf};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use virtual_llm_core::protocol::{CancelFrame, Closing};

    use super::*;
    use crate::config::gateway_socket_config;

    fn cancel(n: u32) -> GatewayFrame {
        GatewayFrame::Cancel(CancelFrame {
            task_id: TaskId::parse(&format!("task_{n:08}")).unwrap(),
        })
    }

    fn credit(n: u32) -> Box<CreditFrame> {
        Box::new(CreditFrame {
            task_id: TaskId::parse(&format!("task_{n:08}")).unwrap(),
            results: n,
        })
    }

    /// A socket that counts the writes that reached it.
    struct Counted {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let written = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            written
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn frames_ready_together_are_gathered_in_order_up_to_a_closing() {
        let (tx, mut frames) = mpsc::channel(16);
        let (credit_tx, credits) = mpsc::channel(16);
        let mut credits = Some(credits);
        for n in 2..=3 {
            tx.try_send(Box::new(cancel(n))).unwrap();
        }
        credit_tx.try_send(credit(7)).unwrap();
        let (batch, closing) = ready_frames(cancel(1), &mut frames, &mut credits);
        assert!(!closing);
        assert_eq!(
            batch,
            [
                cancel(1),
                cancel(2),
                cancel(3),
                GatewayFrame::Credit(*credit(7))
            ]
        );

        // Nothing follows a closing frame: not the frames behind it, not credits.
        let closing_frame = GatewayFrame::Closing(Closing {
            reason: "replaced".into(),
        });
        tx.try_send(Box::new(closing_frame.clone())).unwrap();
        tx.try_send(Box::new(cancel(9))).unwrap();
        credit_tx.try_send(credit(8)).unwrap();
        let (batch, closing) = ready_frames(cancel(4), &mut frames, &mut credits);
        assert!(closing);
        assert_eq!(batch, [cancel(4), closing_frame]);
        assert_eq!(*frames.try_recv().unwrap(), cancel(9), "left for no one");

        // A batch holds at most FRAMES_PER_WRITE frames; the rest wait their turn.
        let (tx, mut frames) = mpsc::channel(2 * FRAMES_PER_WRITE);
        for n in 0..2 * FRAMES_PER_WRITE {
            tx.try_send(Box::new(cancel(u32::try_from(n).unwrap())))
                .unwrap();
        }
        let first = *frames.recv().await.unwrap();
        let (batch, _) = ready_frames(first, &mut frames, &mut None);
        assert_eq!(batch.len(), FRAMES_PER_WRITE);
        assert_eq!(
            batch.last(),
            Some(&cancel(u32::try_from(FRAMES_PER_WRITE - 1).unwrap()))
        );
    }

    /// The frames of a batch leave the gateway's socket in one write, in order.
    #[tokio::test]
    async fn a_batch_of_frames_leaves_in_one_write() {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = Counted {
            inner: ours,
            writes: writes.clone(),
        };
        let config = gateway_socket_config(1 << 20);
        let mut gateway =
            WebSocketStream::from_raw_socket(counted, Role::Server, Some(config)).await;
        let mut publisher = WebSocketStream::from_raw_socket(theirs, Role::Client, None).await;
        let batch: Vec<GatewayFrame> = (1..=5).map(cancel).collect();
        assert!(send_all(&mut gateway, &batch).await);
        assert_eq!(writes.load(Ordering::SeqCst), 1, "one write for the batch");
        for expected in &batch {
            let Some(Ok(Message::Text(text))) = publisher.next().await else {
                panic!("a text frame")
            };
            let frame: GatewayFrame = serde_json::from_str(&text).unwrap();
            assert_eq!(&frame, expected);
        }
        assert!(send(&mut gateway, &cancel(6)).await);
        assert_eq!(
            writes.load(Ordering::SeqCst),
            2,
            "a lone frame leaves at once"
        );
    }
}
