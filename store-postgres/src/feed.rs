//! The change feed: `LISTEN`/`NOTIFY` as a hint, on a connection of its own.
//!
//! Every lifecycle batch sends one `NOTIFY virtual_llm_rows` per row it wrote, inside
//! its own transaction: PostgreSQL delivers a transaction's notifications when (and
//! only if) it commits, in commit order, to every listening session of the database,
//! whichever replica wrote. The feed task listens on a dedicated connection (a pooled
//! one would be recycled under it) and passes each notification to the store's
//! broadcast channel, which [`Store::changes`](virtual_llm_core::Store::changes)
//! subscribes to.
//!
//! A notification is a hint, never the row: a receiver re-reads. And a lost listening
//! connection loses notifications, so when it goes away (the server restarted, the
//! network dropped it, a ping went unanswered) every receiver is told to forget
//! everything, and told again once the feed listens anew (what committed in between
//! was never heard). The broadcast channel has no message for "forget everything" but
//! `Lagged`, which a receiver gets when it fell more than the channel's capacity behind;
//! so the feed makes every receiver fall behind, by sending one more hint than the
//! capacity (each names [`RESET_HINT`], harmless to re-read). The gateway's
//! [`RegistryView`](virtual_llm_core::RegistryView) answers `Lagged` by dropping all
//! it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use virtual_llm_core::LlmName;
use virtual_llm_core::store::RowChange;

use crate::codec::parse_change;
use crate::error::Error;

/// The notification channel of the registry.
pub(crate) const CHANNEL: &str = "virtual_llm_rows";

/// How many changes a subscriber may fall behind before it gets `Lagged`.
pub(crate) const FEED_CAPACITY: usize = 1024;

/// The row the hints of a reset name. Any name would do: a hint only makes a receiver
/// read the row again.
pub(crate) const RESET_HINT: &str = "virtual-llm.feed-reset";

/// How often the listening connection is checked, and how long the check may take.
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnect backoff: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);

/// The running feed; dropping it stops the task and closes its connection.
#[derive(Debug)]
pub(crate) struct Feed {
    sender: broadcast::Sender<RowChange>,
    /// How many times receivers were told to forget everything.
    resets: Arc<AtomicU64>,
    stop: Arc<Notify>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

impl Feed {
    /// Connects, listens, and returns once the first `LISTEN` is in force (so a
    /// subscriber taken after this sees every later commit).
    pub(crate) async fn start(config: tokio_postgres::Config) -> Result<Feed, Error> {
        let sender = broadcast::Sender::new(FEED_CAPACITY);
        let resets = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(Notify::new());
        let (ready, listening) = oneshot::channel();
        tokio::spawn(run(
            config,
            sender.clone(),
            resets.clone(),
            stop.clone(),
            ready,
        ));
        listening.await.map_err(|_| Error::Closed)??;
        Ok(Feed {
            sender,
            resets,
            stop,
        })
    }

    /// A new subscription.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<RowChange> {
        self.sender.subscribe()
    }

    /// How many times receivers were told to forget everything.
    pub(crate) fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}

/// Makes every receiver fall behind, so its next receive is `Lagged`.
fn reset(sender: &broadcast::Sender<RowChange>, resets: &AtomicU64) {
    resets.fetch_add(1, Ordering::Relaxed);
    let Ok(name) = LlmName::parse(RESET_HINT) else {
        return;
    };
    for _ in 0..=FEED_CAPACITY {
        // No subscriber is not an error: nobody keeps rows.
        let _ = sender.send(RowChange {
            name: name.clone(),
            pool: None,
        });
    }
}

/// A listening connection: the client (for pings) and the task driving the
/// connection, which ends when the connection does.
async fn listen(
    config: &tokio_postgres::Config,
    sender: &broadcast::Sender<RowChange>,
    resets: &Arc<AtomicU64>,
) -> Result<(tokio_postgres::Client, JoinHandle<String>), Error> {
    let context = "listening for registry changes";
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::unavailable(context, e))?;
    let sender = sender.clone();
    let resets = resets.clone();
    let pump = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => match parse_change(n.payload()) {
                    Some(change) => {
                        let _ = sender.send(change);
                    }
                    None => {
                        // Not a payload of this crate: something changed, but what is
                        // unknown.
                        tracing::warn!(payload = n.payload(), "unexpected registry notification");
                        reset(&sender, &resets);
                    }
                },
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "the server closed the connection".to_owned()
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        pump.abort();
        return Err(Error::from_pg(context, e));
    }
    Ok((client, pump))
}

async fn run(
    config: tokio_postgres::Config,
    sender: broadcast::Sender<RowChange>,
    resets: Arc<AtomicU64>,
    stop: Arc<Notify>,
    ready: oneshot::Sender<Result<(), Error>>,
) {
    let mut ready = Some(ready);
    let mut backoff = BACKOFF_FIRST;
    loop {
        let stopped = tokio::select! {
            listening = listen(&config, &sender, &resets) => match listening {
                Ok((client, pump)) => {
                    match ready.take() {
                        Some(ready) => {
                            let _ = ready.send(Ok(()));
                        }
                        None => {
                            tracing::info!("the registry change feed listens again; receivers re-read");
                            reset(&sender, &resets);
                        }
                    }
                    backoff = BACKOFF_FIRST;
                    let stopped = watch(&client, pump, &stop).await;
                    if !stopped {
                        // What committed from now until the feed listens again is never
                        // heard: receivers forget now, and again once it listens.
                        reset(&sender, &resets);
                    }
                    stopped
                }
                Err(e) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "the registry change feed cannot listen");
                    false
                }
            },
            () = stop.notified() => true,
        };
        if stopped {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.notified() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_LAST);
    }
}

/// Waits until the listening connection is lost (`false`) or the feed stops (`true`).
async fn watch(
    client: &tokio_postgres::Client,
    mut pump: JoinHandle<String>,
    stop: &Notify,
) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    loop {
        tokio::select! {
            ended = &mut pump => {
                let why = ended.unwrap_or_else(|e| e.to_string());
                tracing::warn!(reason = %why, "the registry change feed lost its connection; reconnecting");
                return false;
            }
            _ = ping.tick() => {
                let answered = tokio::time::timeout(PING_TIMEOUT, client.simple_query("")).await;
                if !matches!(answered, Ok(Ok(_))) {
                    tracing::warn!("the registry change feed's connection stopped answering; reconnecting");
                    pump.abort();
                    return false;
                }
            }
            () = stop.notified() => {
                pump.abort();
                return true;
            }
        }
    }
}
