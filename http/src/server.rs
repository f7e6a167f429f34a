//! Serving warp routes over TCP, with what warp's own server does not let us set:
//! `TCP_NODELAY` on every accepted socket (Nagle plus delayed ACKs would hold each
//! streamed token back by up to 40 ms), HTTP/1 and HTTP/2 with upgrades (WebSocket),
//! a graceful shutdown that stops accepting, then waits a bounded grace period for
//! open connections to finish, an idle connection that costs one 8 KiB read buffer,
//! not 16 (see `Connection::serve`): an SSE publisher's control stream is such a
//! connection, for as long as the publisher is up; and time and count bounds on every
//! connection ([`ServeOptions`]):
//!
//! - **Header read timeout.** hyper's HTTP/1 `header_read_timeout` (it needs a timer,
//!   set here) bounds each request head, and idle keep-alive time between requests
//!   too. It starts only once hyper knows the connection is HTTP/1, so a connection
//!   that sends nothing, or a few bytes of the HTTP/2 preface, is bounded here: it
//!   must deliver its first request within the same time.
//! - **Write timeout** (`timed_io`): a client that stops reading is disconnected, and
//!   whatever it was being sent is dropped (a stream's task is cancelled upstream).
//! - **Body read timeout** (`timed_body`): the gap between two pieces of a request
//!   body the route waits for.
//! - **Lingering close** (`timed_io`): a connection closed with its request body
//!   unread (a 413) reads the rest for a moment, so the answer is not lost to a
//!   reset.
//! - **Connection cap**: past `max_connections` open connections, the server stops
//!   accepting until one closes; new connections wait in the listen backlog.
//! - **HTTP/2 idle timeout**: an HTTP/2 connection with no request in flight for
//!   that long is closed (GOAWAY), as HTTP/1's keep-alive is by the header read
//!   timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::timed_body::TimedBody;
use crate::timed_io::{TimedIo, UnreadBody};

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
/// let mut options = virtual_llm_http::ServeOptions::default();
/// options.header_read_timeout = std::time::Duration::from_secs(30);
/// options.max_connections = 4096;
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
    /// Longest time a write to a client may make no progress (its receive window
    /// stays full: it stopped reading) before its connection is closed and the
    /// response dropped: a streamed answer's task is cancelled at its publisher, an
    /// SSE control stream unbinds its session, a whole registry listing is freed.
    /// Counted only while a write is pending, so a client reading slowly is never cut
    /// off as long as it takes some bytes within this time. Applies to upgraded
    /// connections (WebSocket) too. Default 30 s.
    pub write_timeout: Duration,
    /// Longest gap between two pieces of a request body a route waits for; past it
    /// the body fails (400) and the connection closes. Counted only while the route
    /// waits for the client. Default 10 min: a publisher's NDJSON result post is
    /// open for the whole task and silent until the answer's first line, which may
    /// take the gateway's whole task deadline (`taskDeadline`, 300 s by default) or,
    /// between chunks, its stream idle timeout (60 s). Keep it above both.
    pub body_read_timeout: Duration,
    /// Most connections open at once (HTTP/1, HTTP/2, and WebSockets until their
    /// socket closes). Past it the server stops accepting: new connections wait in
    /// the listen backlog ([`LISTEN_BACKLOG`]) and are accepted as open ones close;
    /// open connections are served as before. Default 32 768. Keep the process's
    /// file descriptor limit above it.
    pub max_connections: usize,
    /// How long an HTTP/2 connection with no request in flight stays open before it
    /// is closed (GOAWAY); HTTP/1 keep-alive connections are bounded by
    /// `header_read_timeout`. Default 75 s, the same.
    pub http2_idle_timeout: Duration,
    /// When a connection closes with a request body not read to its end (a 413 for
    /// a body over the limit), how long the server still reads and discards what the
    /// client sends (at most 64 MiB), so that the client reads its answer rather than
    /// a connection reset. Zero closes at once. Default 5 s.
    pub linger: Duration,
    /// The runtimes connections are served on. Empty (the default): the runtime that
    /// runs [`serve_with`]. Otherwise each accepted connection goes to the one of
    /// these with the fewest open connections, and stays there: with one
    /// single-threaded runtime per core (see [`Workers`](crate::Workers)), a request's
    /// path wakes no other thread unless it crosses to a WebSocket session served on
    /// another one, as nginx's worker processes do.
    pub workers: Vec<tokio::runtime::Handle>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(600),
            max_connections: 32_768,
            http2_idle_timeout: Duration::from_secs(75),
            linger: Duration::from_secs(5),
            workers: Vec::new(),
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
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    let builders = Arc::new((http1, http2));
    let slots = Arc::new(Semaphore::new(
        options.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    // mini-redis' shutdown: connections watch `stop`, and each holds a clone of `done`,
    // so `done_rx` ends once the last connection has.
    let (stop, _) = watch::channel(false);
    let (done, mut done_rx) = mpsc::channel::<()>(1);
    let workers = Spread::new(&options.workers);
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap, connections wait in the listen backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
            () = &mut shutdown => break,
        };
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
                let close = CloseConnection::default();
                let unread = UnreadBody::default();
                let (in_flight, idle) = watch::channel(0usize);
                let service = Tracked {
                    inner: TowerToHyperService::new(service.clone()),
                    requested: requested.clone(),
                    close: close.clone(),
                    unread: unread.clone(),
                    body_read_timeout: options.body_read_timeout,
                    in_flight: Arc::new(in_flight),
                };
                let connection = Connection {
                    builders: builders.clone(),
                    close,
                    idle,
                    http2_idle_timeout: options.http2_idle_timeout,
                    stop: stop.subscribe(),
                    _done: done.clone(),
                };
                let (write_timeout, linger) = (options.write_timeout, options.linger);
                let serve = async move |stream: tokio::net::TcpStream, open: Option<Arc<()>>| {
                    let io = TimedIo::new(stream, write_timeout, linger, unread, Some(permit))
                        .holding(open);
                    let served = connection.serve(io, service);
                    tokio::pin!(served);
                    let ended = tokio::select! {
                        ended = &mut served => ended,
                        () = tokio::time::sleep(header_read_timeout) => {
                            if !requested.load(Ordering::Acquire) {
                                tracing::debug!(%peer, "no request within the header read timeout; closing");
                                return;
                            }
                            served.await
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                };
                match workers.pick() {
                    None => {
                        tokio::spawn(serve(stream, None));
                    }
                    Some((handle, open)) => {
                        // The socket leaves this runtime's reactor for the worker's.
                        let stream = match stream.into_std() {
                            Ok(stream) => stream,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "could not hand the connection to a worker");
                                continue;
                            }
                        };
                        handle.spawn(async move {
                            match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => serve(stream, Some(open)).await,
                                Err(e) => tracing::debug!(%peer, error = %e, "a worker could not take the connection"),
                            }
                        });
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if stop.send(true).is_err() {
        tracing::debug!("no connection open at shutdown");
    }
    drop(done);
    tokio::select! {
        _ = done_rx.recv() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace = ?grace, "connections still open after the grace period; closing"),
    }
}

/// The worker runtimes of [`ServeOptions::workers`], each with its count of open
/// connections.
struct Spread {
    workers: Vec<(tokio::runtime::Handle, Arc<()>)>,
}

impl Spread {
    fn new(handles: &[tokio::runtime::Handle]) -> Self {
        Spread {
            workers: handles.iter().map(|h| (h.clone(), Arc::new(()))).collect(),
        }
    }

    /// The worker with the fewest open connections, and a token the connection's socket
    /// holds for as long as it is open (an upgraded one too: a WebSocket session stays
    /// on its worker); `None` when connections stay on this runtime.
    fn pick(&self) -> Option<(&tokio::runtime::Handle, Arc<()>)> {
        self.workers
            .iter()
            .min_by_key(|(_, open)| Arc::strong_count(open))
            .map(|(handle, open)| (handle, open.clone()))
    }
}

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One accepted connection, before it knows its HTTP version.
struct Connection {
    builders: Arc<(http1::Builder, http2::Builder<TokioExecutor>)>,
    /// Asked by a response to close this connection once it has been sent.
    close: CloseConnection,
    /// How many of this connection's responses are in flight (see [`Tracked`]).
    idle: watch::Receiver<usize>,
    http2_idle_timeout: Duration,
    /// Turns `true` when the server shuts down.
    stop: watch::Receiver<bool>,
    /// Dropped when the connection ends; see `serve_with`.
    _done: mpsc::Sender<()>,
}

type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

impl Connection {
    /// Serves HTTP/1 (with upgrades) or HTTP/2 until the connection ends, or shuts it
    /// down gracefully when the server stops, or (HTTP/1) once the response that asked
    /// for it through [`CloseConnection`] has been sent, or (HTTP/2) once no request
    /// has been in flight for the HTTP/2 idle timeout. On HTTP/2 a
    /// [`CloseConnection`] is ignored: a response's end is explicit there, and other
    /// requests share the connection.
    ///
    /// The version is told by *peeking* at the first bytes. hyper-util's `auto`
    /// builder reads them instead and hands them back to hyper as a 24-byte first
    /// read; hyper's read buffer, sized 8 KiB for a whole request head, then has to
    /// grow for the rest and doubles to 16 KiB, which every idle connection (every
    /// SSE publisher) keeps. A peek leaves the bytes in the socket, so hyper's first
    /// read takes the whole head into its first 8 KiB.
    async fn serve<S, B>(self, stream: TimedIo, service: S) -> Result<(), ConnectionError>
    where
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<ConnectionError>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<ConnectionError>,
    {
        let mut first = [0u8; 24];
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(()); // closed before a byte
        }
        let (http1, http2) = &*self.builders;
        let io = TokioIo::new(stream);
        // No HTTP/1 method starts like the preface, so its first bytes are enough.
        if first[..n] == H2_PREFACE[..n] {
            let connection = http2.serve_connection(io, service);
            let idle = idle_for(self.idle, self.http2_idle_timeout);
            until_done(connection, self.stop, idle, |c| c.graceful_shutdown()).await
        } else {
            let connection = http1.serve_connection(io, service).with_upgrades();
            let close = self.close.0.notified();
            until_done(connection, self.stop, close, |c| c.graceful_shutdown()).await
        }
    }
}

/// Resolves once no response has been in flight (`in_flight` reads 0) for `limit`.
async fn idle_for(mut in_flight: watch::Receiver<usize>, limit: Duration) {
    loop {
        let gone = in_flight.wait_for(|n| *n == 0).await.is_err();
        if gone {
            return std::future::pending().await;
        }
        let busy = async { in_flight.wait_for(|n| *n > 0).await.is_ok() };
        tokio::select! {
            () = tokio::time::sleep(limit) => return,
            busy = busy => {
                if !busy {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Drives `connection` to its end; once the server stops or `close` resolves, starts
/// its graceful shutdown (`shutdown`: hyper's, for that connection type: a response in
/// flight is finished, then the connection closes) and lets it finish.
async fn until_done<C>(
    connection: C,
    mut stop: watch::Receiver<bool>,
    close: impl Future<Output = ()>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), ConnectionError>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection);
    tokio::select! {
        ended = &mut connection => return ended.map_err(Into::into),
        _ = stop.wait_for(|stop| *stop) => shutdown(connection.as_mut()),
        () = close => shutdown(connection.as_mut()),
    }
    connection.await.map_err(Into::into)
}

/// Asks the HTTP/1 connection a request arrived on to close once the response in
/// flight has been sent, instead of waiting for the client's next request. [`serve_with`]
/// puts one in every request's extensions (`warp::ext::optional`); a route served by
/// another server finds none.
///
/// A client stream that failed midway asks for it: its `error` event is the end, and a
/// client that reads the connection to its end (a hand-written one, or one that has no
/// use for a failed stream's connection) is not left waiting on a kept-alive one.
#[derive(Clone, Debug, Default)]
pub(crate) struct CloseConnection(Arc<Notify>);

impl CloseConnection {
    /// Closes the connection once the response in flight has been sent.
    pub(crate) fn after_this_response(&self) {
        self.0.notify_one();
    }
}

/// A connection's service: notes when its first request arrives, gives each
/// request the connection's [`CloseConnection`] and a body under the body read
/// timeout ([`TimedBody`]), and counts the responses in flight (a response is in
/// flight until hyper drops its body: sent, or the connection gone).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    requested: Arc<AtomicBool>,
    close: CloseConnection,
    unread: UnreadBody,
    body_read_timeout: Duration,
    in_flight: Arc<watch::Sender<usize>>,
}

impl<S, B> hyper::service::Service<http::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<TimedBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: hyper::body::Body + Unpin,
{
    type Response = http::Response<InFlight<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        self.requested.store(true, Ordering::Release);
        let unread = self.unread.clone();
        let timeout = self.body_read_timeout;
        let mut request = request.map(|body| TimedBody::new(body, timeout, unread));
        request.extensions_mut().insert(self.close.clone());
        let guard = InFlightGuard::new(self.in_flight.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| InFlight {
                body,
                _guard: guard,
            }))
        })
    }
}

/// Counts one response in flight on its connection until dropped.
struct InFlightGuard(Arc<watch::Sender<usize>>);

impl InFlightGuard {
    fn new(count: Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        InFlightGuard(count)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body, counted in flight on its connection while hyper holds it.
struct InFlight<B> {
    body: B,
    _guard: InFlightGuard,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use warp::Filter;

    use super::*;

    /// Serves `routes` on a loopback port; `stop` shuts the server down, and the
    /// returned handle ends when `serve_with` does.
    async fn start(
        routes: BoxedFilter<(Response,)>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        start_with(routes, Vec::new()).await
    }

    /// [`start`] with connections served on `workers`.
    async fn start_with(
        routes: BoxedFilter<(Response,)>,
        workers: Vec<tokio::runtime::Handle>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut options = ServeOptions {
            grace: Duration::from_secs(30),
            ..ServeOptions::default()
        };
        options.workers = workers;
        let server = tokio::spawn(serve_with(
            listener,
            routes,
            async move {
                let _ = stopped.await;
            },
            options,
        ));
        (addr, stop, server)
    }

    /// `/slow`: each request adds a permit to the semaphore when it comes in, then
    /// waits for the notify, then answers `answer()`.
    fn held(
        answer: fn() -> String,
    ) -> (
        BoxedFilter<(Response,)>,
        Arc<tokio::sync::Notify>,
        Arc<tokio::sync::Semaphore>,
    ) {
        let release = Arc::new(tokio::sync::Notify::new());
        let entered = Arc::new(tokio::sync::Semaphore::new(0));
        let (r, e) = (release.clone(), entered.clone());
        let slow = warp::path!("slow")
            .then(move || {
                let (r, e) = (r.clone(), e.clone());
                async move {
                    // Registered for the release before saying it came in: a
                    // `notify_waiters` reaches only the waiters already registered,
                    // and the test releases as soon as it hears of the request.
                    let released = r.notified();
                    e.add_permits(1);
                    released.await;
                    warp::reply::Reply::into_response(answer())
                }
            })
            .boxed();
        (slow, release, entered)
    }

    /// A route answering with the name of the thread that serves it.
    fn thread_name() -> BoxedFilter<(Response,)> {
        warp::path!("thread")
            .map(|| {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                warp::reply::Reply::into_response(name)
            })
            .boxed()
    }

    /// Sends `GET /thread` on an open HTTP/1.1 connection and reads the answer's body.
    async fn ask_thread(stream: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        stream
            .write_all(b"GET /thread HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed before its answer");
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .expect("a content-length")
                    .parse()
                    .unwrap();
                if body.len() == length {
                    return body.to_owned();
                }
            }
        }
    }

    /// Each connection goes to the worker with the fewest open ones and every request
    /// on it is served there: four connections on two workers, two each.
    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_stay_on_theirs() {
        let workers = crate::Workers::start(2).unwrap();
        let (addr, _stop, _server) = start_with(thread_name(), workers.handles()).await;
        let mut connections = Vec::new();
        let mut served_on = Vec::new();
        for _ in 0..4 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            served_on.push(ask_thread(&mut stream).await);
            connections.push(stream);
        }
        assert_eq!(served_on, ["worker-0", "worker-1", "worker-0", "worker-1"]);
        for (stream, first) in connections.iter_mut().zip(&served_on) {
            for _ in 0..3 {
                assert_eq!(&ask_thread(stream).await, first, "a connection stays put");
            }
        }
    }

    /// `/up`: upgrades the connection, then writes the name of the thread that serves
    /// the upgraded socket and keeps it open until the peer closes it.
    fn upgrading() -> BoxedFilter<(Response,)> {
        use hyper::upgrade::OnUpgrade;
        warp::path!("up")
            .and(warp::ext::optional::<OnUpgrade>())
            .map(|on_upgrade: Option<OnUpgrade>| {
                let on_upgrade = on_upgrade.expect("an upgradable request");
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut io = TokioIo::new(on_upgrade.await.unwrap());
                    let name = std::thread::current().name().unwrap_or("").to_owned();
                    io.write_all(name.as_bytes()).await.unwrap();
                    let mut rest = Vec::new();
                    let _ = io.read_to_end(&mut rest).await;
                });
                let mut response = Response::new(Default::default());
                *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                let headers = response.headers_mut();
                headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("upgrade"),
                );
                headers.insert(
                    http::header::UPGRADE,
                    http::HeaderValue::from_static("test"),
                );
                response
            })
            .boxed()
    }

    /// An upgraded connection (a publisher's WebSocket) still counts on its worker once
    /// its HTTP connection has handed the socket over: two upgrades on two workers go
    /// one to each, and the connection after them to the first again.
    #[tokio::test]
    async fn upgraded_connections_still_count_on_their_workers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let workers = crate::Workers::start(2).unwrap();
        let routes = upgrading().or(thread_name()).unify().boxed();
        let (addr, _stop, _server) = start_with(routes, workers.handles()).await;
        let mut upgraded = Vec::new();
        let mut served_on = Vec::new();
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /up HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: test\r\n\r\n")
                .await
                .unwrap();
            // The answer's head, then the name: read until a name with its number.
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            let text = loop {
                let text = String::from_utf8_lossy(&seen).into_owned();
                if text.contains("\r\n\r\nworker-") && text.ends_with(char::is_numeric) {
                    break text;
                }
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed: {text}");
                seen.extend_from_slice(&buf[..n]);
            };
            assert!(text.starts_with("HTTP/1.1 101"), "{text}");
            served_on.push(text.rsplit("\r\n").next().unwrap().to_owned());
            upgraded.push(stream);
        }
        assert_eq!(served_on, ["worker-0", "worker-1"]);
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask_thread(&mut third).await, "worker-0");
    }

    /// At shutdown a request in flight on a worker still gets its answer, and the
    /// server returns once its connection has closed.
    #[tokio::test]
    async fn shutdown_waits_for_requests_in_flight_on_workers() {
        let workers = crate::Workers::start(2).unwrap();
        let (slow, release, entered) =
            held(|| std::thread::current().name().unwrap_or("").to_owned());
        let (addr, stop, server) = start_with(slow, workers.handles()).await;
        let client = reqwest::Client::new();
        let request = tokio::spawn(client.get(format!("http://{addr}/slow")).send());
        let _in = entered.acquire().await.unwrap();
        stop.send(()).unwrap();
        tokio::task::yield_now().await;
        assert!(!server.is_finished(), "a request is still in flight");
        release.notify_waiters();
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.text().await.unwrap(), "worker-0");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server returns once its connections have closed")
            .unwrap();
    }

    fn hello() -> BoxedFilter<(Response,)> {
        warp::path!("hello")
            .map(|| warp::reply::Reply::into_response("hi"))
            .boxed()
    }

    #[tokio::test]
    async fn http2_with_prior_knowledge_and_http1_are_both_served() {
        let (addr, _stop, _server) = start(hello()).await;
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let response = h2.get(format!("http://{addr}/hello")).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.text().await.unwrap(), "hi");
        let h1 = reqwest::Client::builder().http1_only().build().unwrap();
        let response = h1.get(format!("http://{addr}/hello")).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        assert_eq!(response.text().await.unwrap(), "hi");
    }

    /// At shutdown a request in flight still gets its answer, on HTTP/1 and HTTP/2, and
    /// the server returns once it has (well before the 30 s grace period).
    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish_then_returns() {
        let (slow, release, entered) = held(|| "done".to_owned());
        let (addr, stop, server) = start(slow).await;
        let h1 = reqwest::Client::builder().http1_only().build().unwrap();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let first = tokio::spawn(h1.get(format!("http://{addr}/slow")).send());
        let second = tokio::spawn(h2.get(format!("http://{addr}/slow")).send());
        let _both_in = entered.acquire_many(2).await.unwrap();
        stop.send(()).unwrap();
        tokio::task::yield_now().await;
        assert!(!server.is_finished(), "two requests are still in flight");
        release.notify_waiters();
        for request in [first, second] {
            let response = request.await.unwrap().unwrap();
            assert_eq!(response.text().await.unwrap(), "done");
        }
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server returns once its connections have closed")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }

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
