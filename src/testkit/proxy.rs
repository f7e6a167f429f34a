//! [`Proxy`]: a TCP proxy in front of a gateway, to cut a publisher off the way a killed
//! process or a hung host would.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

/// A TCP proxy in front of the gateway, for one publisher. [`Proxy::kill`] cuts every
/// connection through it at once and refuses new ones: the gateway sees the
/// publisher's sockets close without a goodbye (no WebSocket close frame, an SSE stream
/// and result posts cut mid-body), as when the publisher's process is killed.
/// [`Proxy::freeze`] stops passing bytes either way but keeps the connections open, as
/// when the publisher's host hangs or its network drops packets; [`Proxy::revive`] lets
/// everything through again, for the publisher's restart.
pub struct Proxy {
    /// The URL publishers connect to, `http://127.0.0.1:<port>`.
    pub url: String,
    /// Bumped by each kill; a connection lives only as long as the epoch it began in.
    epoch: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
    accepting: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// A proxy to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (epoch, epochs) = watch::channel(0u64);
        let (frozen, freezes) = watch::channel(false);
        let accepting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open = accepting.clone();
        tokio::spawn(async move {
            let mut closed = epochs.clone();
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                    // The proxy was dropped.
                    _ = closed.wait_for(|_| false) => return,
                };
                // The epoch is read before `accepting`: `kill` clears `accepting` before
                // it bumps the epoch, so a connection accepted across a kill is either
                // refused here or born in the old epoch and cut with it (read the other
                // way round, it could be born in the new one and outlive the kill).
                let mut epochs = epochs.clone();
                let born = *epochs.borrow_and_update();
                if !open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped at once: the publisher's connect fails
                }
                let freezes = freezes.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut from_publisher, mut to_publisher) = inbound.split();
                    let (mut from_gateway, mut to_gateway) = outbound.split();
                    let both = futures::future::join(
                        pump(&mut from_publisher, &mut to_gateway, freezes.clone()),
                        pump(&mut from_gateway, &mut to_publisher, freezes),
                    );
                    tokio::select! {
                        _ = both => {}
                        // Killed (or the proxy dropped): both sockets close here, mid-flight.
                        _ = epochs.wait_for(|e| *e != born) => {}
                    }
                });
            }
        });
        Proxy {
            url,
            epoch,
            frozen,
            accepting,
        }
    }

    /// Cuts every connection now, and refuses new ones until [`Proxy::revive`].
    pub fn kill(&self) {
        self.accepting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Passes no more bytes, either way, until [`Proxy::revive`]; connections stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets new connections and bytes through again.
    pub fn revive(&self) {
        self.frozen.send_replace(false);
        self.accepting
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies bytes one way until end of stream, pausing while `frozen`.
async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin + Send),
    to: &mut (impl tokio::io::AsyncWrite + Unpin + Send),
    mut frozen: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let thawed = frozen.wait_for(|f| !*f).await.is_ok();
        if !thawed {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = async { frozen.wait_for(|f| *f).await.map(|_| ()) } => continue,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
