//! A throwaway NATS server for tests (feature `testing`): [`NatsServer`] starts
//! `nats-server` from the machine, in a temporary directory, on a free port of
//! 127.0.0.1; it can be stopped and started again on the same port (a NATS restart
//! under load), and [`shared`] hands every test of a binary one server (each test
//! then takes a subject prefix of its own, [`fresh_prefix`]).
//!
//! The binary is looked for on `PATH`, then in `/usr/sbin` and `/usr/bin` (where
//! Debian's `nats-server` package puts it). When it is missing, [`available`] turns
//! that into one loud line on stderr and `None`, so the test returns, unless
//! `VIRTUAL_LLM_REQUIRE_SERVICES=1`, where it panics (CI installs `nats-server` and
//! sets it); the rule is the test kit's
//! ([`virtual_llm_core::testkit::services`]).
//!
//! The server runs under a small shell script that stops it when its standard input
//! closes: when the [`NatsServer`] is dropped, and also when the test process dies
//! without dropping it (the [`shared`] server lives in a `static`).

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtual_llm_core::testkit::services;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// `nats-server` is not installed.
    #[error("nats-server is not installed here: {0}")]
    Missing(String),
    /// It is installed but did not start.
    #[error("nats-server did not start: {0}")]
    Failed(String),
}

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn find_binary() -> Result<PathBuf, ServerError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ServerError::Missing(
                "no nats-server on PATH or in /usr/sbin (apt-get install nats-server)".to_owned(),
            )
        })
}

fn free_port() -> Result<u16, ServerError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ServerError::Failed(format!("no free port: {e}")))
}

/// The script that runs the server: starts it, waits for a line on its standard
/// input (or its end), and stops the server: `kill` with SIGKILL (a crash), anything
/// else with SIGTERM.
const SUPERVISOR: &str = r#"
"$@" &
pid=$!
echo "$pid" > "$VLLM_NATS_PID"
if read -r how; then :; else how=gone; fi
case "$how" in
  kill) kill -KILL "$pid" ;;
  *) kill -TERM "$pid" ;;
esac
wait "$pid"
"#;

/// Whether the server whose pid the supervisor wrote to `pid_file` has exited (it is
/// gone, or a zombie its supervisor has not waited for).
fn server_exited(pid_file: &std::path::Path) -> bool {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// A `nats-server` of its own, listening on 127.0.0.1 only.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// The supervisor script, while the server runs.
    running: Option<(Child, ChildStdin)>,
}

impl NatsServer {
    /// Starts a server with the default limits (`max_payload` 1 MiB) on a free port.
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(None)
    }

    /// Starts a server whose `max_payload` is `bytes`, to see large messages cut into
    /// pieces.
    pub fn start_with_max_payload(bytes: usize) -> Result<Self, ServerError> {
        Self::start_with(Some(bytes))
    }

    fn start_with(max_payload: Option<usize>) -> Result<Self, ServerError> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("virtual-llm-nats-")
            .tempdir()
            .map_err(|e| ServerError::Failed(format!("no temporary directory: {e}")))?;
        let config = match max_payload {
            Some(bytes) => format!("max_payload: {bytes}\n"),
            None => String::new(),
        };
        std::fs::write(dir.path().join("nats.conf"), config)
            .map_err(|e| ServerError::Failed(format!("writing nats.conf: {e}")))?;
        let mut server = NatsServer {
            binary,
            dir,
            port: 0,
            running: None,
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => last = e.to_string(),
            }
        }
        Err(ServerError::Failed(last))
    }

    /// Starts the server on its port; returns once it accepts connections.
    fn launch(&mut self) -> Result<(), ServerError> {
        let log = self.dir.path().join("server.log");
        let pid_file = self.dir.path().join("server.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut child = Command::new("sh")
            .args(["-c", SUPERVISOR, "supervisor"])
            .arg(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join("nats.conf"))
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-l")
            .arg(&log)
            .env("VLLM_NATS_PID", &pid_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ServerError::Failed(format!("starting nats-server: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| ServerError::Failed("no stdin for the supervisor".to_owned()))?;
        self.running = Some((child, stdin));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Server is ready"))
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if ready {
                return Ok(());
            }
            if server_exited(&pid_file) {
                let tail = self.log_tail();
                self.stop();
                return Err(ServerError::Failed(format!("nats-server exited: {tail}")));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(ServerError::Failed(format!(
                    "nats-server did not accept connections within {START_TIMEOUT:?}: {}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running server's process id (read from the pid file its supervisor
    /// writes), for a benchmark that reads its CPU time; `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref()?;
        std::fs::read_to_string(self.dir.path().join("server.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The server's URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM); [`NatsServer::restart`] starts it again on the
    /// same port. Does nothing if it is not running.
    pub fn stop(&mut self) {
        self.stop_with("term\n");
    }

    /// Kills the server (SIGKILL), as a crash.
    pub fn kill(&mut self) {
        self.stop_with("kill\n");
    }

    fn stop_with(&mut self, how: &str) {
        if let Some((mut child, mut stdin)) = self.running.take() {
            let _ = stdin.write_all(how.as_bytes());
            drop(stdin);
            let _ = child.wait();
        }
        // A restarted server appends to the same log: its readiness line is new.
        let _ = std::fs::remove_file(self.dir.path().join("server.log"));
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        if self.running.is_some() {
            return Ok(());
        }
        let mut last = None;
        for _ in 0..50 {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| ServerError::Failed("restart".to_owned())))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Closing stdin tells the supervisor to stop the server.
        if let Some((mut child, stdin)) = self.running.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// `result`'s server, or `None` after one loud line on stderr when `nats-server` is
/// missing; panics when it is missing and services are required, or when it is
/// installed but does not start.
pub fn available<T>(result: Result<T, ServerError>) -> Option<T> {
    match result {
        Ok(t) => Some(t),
        Err(ServerError::Missing(why)) => {
            services::missing("nats-server", &why, services::services_required());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The server shared by every test of this process, started on first use; `None`
/// (after the loud line of [`available`]) when `nats-server` is missing.
pub fn shared() -> Option<&'static NatsServer> {
    static SHARED: OnceLock<Result<NatsServer, String>> = OnceLock::new();
    let server = SHARED.get_or_init(|| match NatsServer::start() {
        Ok(s) => Ok(s),
        Err(ServerError::Missing(why)) => Err(why),
        Err(e) => panic!("{e}"),
    });
    match server {
        Ok(s) => Some(s),
        Err(why) => available(Err(ServerError::Missing(why.clone()))),
    }
}

/// A subject prefix no other test of this process uses, so tests on the [`shared`]
/// server are separate clusters.
pub fn fresh_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}.vllm",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
