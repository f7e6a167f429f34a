//! Serving warp routes over TCP, with what warp's own server does not let us set:
//! `TCP_NODELAY` on every accepted socket (Nagle plus delayed ACKs would hold each
//! streamed token back by up to 40 ms), HTTP/1 and HTTP/2 with upgrades (WebSocket),
//! a header read timeout against slowloris clients, and a graceful shutdown that
//! stops accepting, then waits a bounded grace period for open connections to finish.
//!
//! The header read timeout has two parts. hyper's HTTP/1 `header_read_timeout` (it
//! needs a timer, set here) bounds each request head, and idle keep-alive time
//! between requests too. It starts only once hyper knows the connection is HTTP/1,
//! so a connection that sends nothing, or a few bytes of the HTTP/2 preface, is
//! bounded here: it must deliver its first request within the same time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::reply::Response;

/// The listen backlog [`bind`] asks for (the kernel caps it at `net.core.somaxconn`,
/// 4096 by default on Linux).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for [`serve`], with a listen backlog of [`LISTEN_BACKLOG`].
///
/// `tokio::net::TcpListener::bind` asks for a backlog of 128, as the standard library
/// does. When a fleet of publishers reconnects at once (after a gateway restart or a
/// network blip), connections beyond it are dropped by the kernel and their SYNs
/// retried a second later, which turns a burst of registrations into a second-long
/// stall.
///
/// Must be called inside a tokio runtime.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted gateway can rebind while old connections of
    // the previous process sit in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `routes` on `listener` until `shutdown` resolves, then lets open connections
/// finish for at most `grace`.
///
/// Streams that never end on their own (SSE control channels) must be ended by the
/// caller before or at shutdown, e.g. with
/// [`Gateway::close_channels`](virtual_llm_core::Gateway::close_channels).
///
/// `routes` is what [`routes`](crate::routes) returns, or an embedder's own filter
/// combined with it and `.boxed()`.
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let options = ServeOptions {
        grace,
        ..ServeOptions::default()
    };
    serve_with(listener, routes, shutdown, options).await;
}

/// How [`serve_with`] treats connections. Start from the default and set fields:
///
/// ```
/// let mut options = virtual_llm_sse::ServeOptions::default();
/// options.header_read_timeout = std::time::Duration::from_secs(30);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How long open connections may take to finish after shutdown. Default 10 s.
    pub grace: Duration,
    /// Longest time a client may take to send a request's headers, counted from when
    /// the connection opens or the previous response ends: slowloris clients that
    /// dribble headers (or nothing) are cut off after it, and so are idle keep-alive
    /// connections. Default 75 s: longer than a reverse proxy's idle upstream
    /// connections usually live (nginx: 60 s), so the proxy closes them first, and
    /// well over the 30 s heartbeat interval, so a publisher's pooled connection
    /// never idles out between two heartbeats.
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(75),
        }
    }
}

/// [`serve`] with every option; see [`ServeOptions`].
pub async fn serve_with(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()>,
    options: ServeOptions,
) {
    let grace = options.grace;
    let service = warp::service(routes);
    let header_read_timeout = options.header_read_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off a moment
                        // instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
                }
                let requested = Arc::new(AtomicBool::new(false));
                let service = FirstRequest {
                    inner: TowerToHyperService::new(service.clone()),
                    requested: requested.clone(),
                };
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    tokio::pin!(connection);
                    let ended = tokio::select! {
                        ended = &mut connection => ended,
                        () = tokio::time::sleep(header_read_timeout) => {
                            if !requested.load(Ordering::Acquire) {
                                tracing::debug!(%peer, "no request within the header read timeout; closing");
                                return;
                            }
                            connection.await
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace = ?grace, "connections still open after the grace period; closing"),
    }
}

/// A connection's service that notes when its first request arrives.
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    requested: Arc<AtomicBool>,
}

impl<S, R> hyper::service::Service<R> for FirstRequest<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.requested.store(true, Ordering::Release);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Connections beyond tokio's default backlog of 128 are all queued at once, none
    /// accepted yet: each one's peer address shows up in the accept queue.
    #[tokio::test]
    async fn bind_queues_more_than_the_default_backlog() {
        let listener = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for i in 0..300 {
            // Only a failing run waits for this: past a full backlog, the handshake's
            // SYN is dropped and the kernel retries it after 1 s, 3 s, 7 s…
            let connect = tokio::net::TcpStream::connect(addr);
            let client = tokio::time::timeout(Duration::from_secs(5), connect)
                .await
                .unwrap_or_else(|_| panic!("connection {i} not queued"));
            clients.push(client.unwrap());
        }
        let mut expected: std::collections::HashSet<_> =
            clients.iter().map(|c| c.local_addr().unwrap()).collect();
        // With a backlog of 128 the kernel drops the handshakes that do not fit and
        // the clients retry a second later; here every one is already queued.
        let mut accepted = Vec::new();
        // Unconstrained: tokio's cooperative budget would otherwise answer "not ready"
        // after 128 accepts in one poll.
        let accept = || {
            let ready = std::future::poll_fn(|cx| listener.poll_accept(cx));
            futures::FutureExt::now_or_never(tokio::task::unconstrained(ready))
        };
        while let Some(next) = accept() {
            let (stream, peer) = next.unwrap();
            assert!(expected.remove(&peer), "unexpected peer {peer}");
            accepted.push(stream);
        }
        assert!(
            expected.is_empty(),
            "{} of 300 connections not in the accept queue",
            expected.len()
        );
    }
}
