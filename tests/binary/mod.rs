//! Running the reference gateway binary in tests: start it as a child process on a
//! free loopback port, wait until it serves, stop it with SIGKILL or SIGTERM.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use virtual_llm::SessionId;

/// The gateway example, built next to this test by `cargo test`.
pub fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
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

pub async fn row(url: &str, name: &str) -> Value {
    let response = reqwest::get(format!("{url}/api/v1/llms/{name}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
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
