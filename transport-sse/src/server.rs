//! Serving warp routes over TCP, with what warp's own server does not let us set:
//! `TCP_NODELAY` on every accepted socket (Nagle plus delayed ACKs would hold each
//! streamed token back by up to 40 ms), HTTP/1 and HTTP/2 with upgrades (WebSocket),
//! and a graceful shutdown that stops accepting, then waits a bounded grace period
//! for open connections to finish.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::reply::Response;

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
    let service = warp::service(routes);
    let builder = auto::Builder::new(TokioExecutor::new());
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
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service.clone()))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
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
