//! Small helpers the suites share: the test principals' tokens, [`eventually`], a
//! connection with a small receive buffer, and [`TempDir`].

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::SessionId;

/// The bearer token of a test principal: `alice` and `mallory` publish, `client`
/// calls, anyone else has no valid token.
pub fn token(who: &str) -> String {
    format!("{who}-token")
}

/// Waits (polling every 10 ms, at most 5 s) for an event the test cannot await
/// directly, such as the gateway noticing a closed connection.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A connection to `addr` whose receive buffer is `recv_buffer` bytes, if given.
pub async fn connect_with_recv_buffer(
    addr: SocketAddr,
    recv_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A temporary directory, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TempDir {
    /// A fresh, empty directory under the system's temporary directory.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("virtual-llm-test-{}", SessionId::generate()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The directory's path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}
