//! Running the reference binaries in tests: start the gateway as a child process on a
//! free loopback port, wait until it serves, stop it with SIGKILL or SIGTERM; start
//! publishers next to it and read what they log.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use virtual_llm::SessionId;

/// The gateway example, built next to this test by `cargo test`.
pub fn gateway_binary() -> PathBuf {
    example_binary("gateway")
}

/// The publisher example, built next to this test by `cargo test`.
pub fn publisher_binary() -> PathBuf {
    example_binary("publisher")
}

/// The llmctl example, built next to this test by `cargo test`.
pub fn llmctl_binary() -> PathBuf {
    example_binary("llmctl")
}

fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds it; with a target filter run `cargo build --examples` first",
        binary.display()
    );
    binary
}

pub struct GatewayProcess(pub Child);

impl GatewayProcess {
    pub fn start(addr: SocketAddr, data: &Path) -> Self {
        Self::start_env(addr, data, &[], &[])
    }

    /// Starts it with `extra` arguments and `env` variables.
    pub fn start_env(addr: SocketAddr, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let child = Command::new(gateway_binary())
            .args([
                "--listen",
                &addr.to_string(),
                "--data-dir",
                data.to_str().unwrap(),
                "--grace",
                "2s",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        GatewayProcess(child)
    }

    pub fn sigkill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    pub fn sigterm(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.0.wait().unwrap();
        assert!(exit.success(), "a SIGTERM'd gateway exits cleanly: {exit}");
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("gateway already gone: {e}");
        }
        if let Err(e) = self.0.wait() {
            eprintln!("could not reap the gateway: {e}");
        }
    }
}

/// A reference publisher started as a child process, its log (stderr) collected line
/// by line as it runs. Killed when dropped.
pub struct PublisherProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl PublisherProcess {
    /// Starts `publisher --gateway url --transport transport --session-file
    /// session_file` with `extra` arguments (e.g. `--echo NAME`), logging at `info`.
    pub fn start(url: &str, transport: &str, session_file: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(publisher_binary())
            .args(["--gateway", url, "--transport", transport, "--session-file"])
            .arg(session_file)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[publisher] {line}");
                lines.lock().unwrap().push(line);
            }
        });
        PublisherProcess {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The lines of its log that contain `text`.
    pub fn lines_with(&self, text: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l.contains(text))
            .collect()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (polling, at most `cap`) until it exits; its status and whole log.
    /// Panics if it is still running after `cap`.
    pub async fn exited(mut self, cap: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = std::time::Instant::now() + cap;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the publisher is still running after {cap:?}; it logged: {:#?}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        (status, self.log())
    }
}

impl Drop for PublisherProcess {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("publisher already gone: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("could not reap the publisher: {e}");
        }
    }
}

/// Waits (polling every 50 ms, at most `cap`) until `condition` holds; panics naming
/// `what` otherwise.
pub async fn poll_until<F, Fut>(what: &str, cap: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + cap;
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {cap:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub async fn ready(url: &str) {
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if http
            .get(format!("{url}/v1/models"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway did not come up at {url}");
}

/// Waits until `GET /readyz` answers 200: for a gateway whose routes want tokens.
pub async fn ready_with_tokens(url: &str) {
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway did not come up at {url}");
}

pub async fn row(url: &str, name: &str) -> Value {
    let response = reqwest::get(format!("{url}/api/v1/llms/{name}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The row `name` as the registry route shows it, or `None` while it does not exist.
pub async fn try_row(url: &str, name: &str) -> Option<Value> {
    let response = reqwest::get(format!("{url}/api/v1/llms/{name}"))
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

pub fn temp_dir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("virtual-llm-restart-{}", SessionId::generate()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
