//! A throwaway PostgreSQL server for tests (feature `testing`): [`PgServer`] starts
//! one from the binaries on the machine, in a temporary directory, on a free port of
//! 127.0.0.1, and [`fresh_database`] hands each test an empty database of a server
//! shared by the whole test binary.
//!
//! The binaries (`initdb`, `postgres`) are looked for on `PATH`, then in
//! `/usr/lib/postgresql/<version>/bin` (where Debian puts them), newest version first.
//! When they are missing, [`PgServer::start`] says so; [`available`] turns that into
//! one loud line on stderr and `None`, so the test returns, unless
//! `VIRTUAL_LLM_REQUIRE_SERVICES=1`, where it panics (CI installs PostgreSQL and sets
//! it: a skipped test there is a failure).
//!
//! PostgreSQL refuses to run as root. As root, the directory is given to the `postgres`
//! user and the server runs as that user (`runuser -u postgres`).
//!
//! The server runs under a small shell script that stops it (and deletes its
//! directory) when its standard input closes: when the [`PgServer`] is dropped, and
//! also when the test process dies without dropping it (the server shared by a test
//! binary lives in a `static`, which is never dropped).

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// The environment variable that makes a missing service a failure.
pub use virtual_llm_core::testkit::services::REQUIRE_SERVICES;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// `initdb` or `postgres` is not installed (or there is no `postgres` user to
    /// run them as root).
    #[error("PostgreSQL is not installed here: {0}")]
    Missing(String),
    /// It is installed but did not start.
    #[error("PostgreSQL did not start: {0}")]
    Failed(String),
}

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The binaries of one PostgreSQL installation.
#[derive(Clone, Debug)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

fn find_binaries() -> Result<Binaries, ServerError> {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    };
    if let (Some(initdb), Some(postgres)) = (on_path("initdb"), on_path("postgres")) {
        return Ok(Binaries { initdb, postgres });
    }
    // Debian and Ubuntu keep them out of PATH.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions
        .into_iter()
        .map(|(_, bin)| Binaries {
            initdb: bin.join("initdb"),
            postgres: bin.join("postgres"),
        })
        .find(|b| b.initdb.is_file() && b.postgres.is_file())
        .ok_or_else(|| {
            ServerError::Missing(
                "no initdb and postgres on PATH or in /usr/lib/postgresql/*/bin \
                 (apt-get install postgresql)"
                    .to_owned(),
            )
        })
}

/// The user the server runs as, when this process is root: `(name, uid, gid)`.
fn run_as() -> Result<Option<(String, u32, u32)>, ServerError> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id(&["-u"]) != Some(0) {
        return Ok(None);
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Ok(Some(("postgres".to_owned(), uid, gid))),
        _ => Err(ServerError::Missing(
            "running as root needs a `postgres` user to run PostgreSQL as".to_owned(),
        )),
    }
}

/// A command run as `user` (when root) or as this process.
fn command(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A free port on 127.0.0.1, as the system hands them out.
fn free_port() -> Result<u16, ServerError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ServerError::Failed(format!("no free port: {e}")))
}

/// How a running server is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// `SIGINT`: PostgreSQL's fast shutdown. Clients are disconnected, the server
    /// checkpoints and exits.
    Fast,
    /// `SIGQUIT`: PostgreSQL's immediate shutdown, as after a crash: no checkpoint;
    /// the next start replays the WAL.
    Immediate,
}

/// The script that runs the server: starts it, waits for a line on its standard
/// input (or its end), stops the server as the line says, and deletes the directory
/// unless told to keep it.
const SUPERVISOR: &str = r#"
"$@" &
pid=$!
if read -r how; then :; else how=gone; fi
case "$how" in
  fast) kill -INT "$pid" ;;
  *) kill -QUIT "$pid" ;;
esac
wait "$pid"
if [ "$how" = gone ]; then rm -rf "$VLLM_PG_DIR"; fi
"#;

/// A PostgreSQL server of its own, in a temporary directory: superuser `postgres`,
/// no password (trust authentication, TCP on 127.0.0.1 only, and a socket in its own
/// directory).
#[derive(Debug)]
pub struct PgServer {
    binaries: Binaries,
    user: Option<String>,
    dir: PathBuf,
    port: u16,
    fsync: bool,
    /// The supervisor script, while the server runs.
    running: Option<(Child, ChildStdin)>,
}

impl PgServer {
    /// Initializes a data directory and starts a server on a free port; `fsync`
    /// off unless [`PgServer::start_durable`] (tests do not survive a power cut).
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(false)
    }

    /// [`PgServer::start`] with `fsync` on, as a production server runs: for
    /// benchmarks, whose commits must reach the disk.
    pub fn start_durable() -> Result<Self, ServerError> {
        Self::start_with(true)
    }

    fn start_with(fsync: bool) -> Result<Self, ServerError> {
        let binaries = find_binaries()?;
        let user = run_as()?;
        // The system's temporary directory: the `postgres` user must be able to reach
        // it, which a directory under a root-owned work tree may not allow.
        let dir = tempfile::Builder::new()
            .prefix("virtual-llm-pg-")
            .tempdir()
            .map_err(|e| ServerError::Failed(format!("no temporary directory: {e}")))?
            .keep();
        let fail = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            ServerError::Failed(e)
        };
        if let Some((_, uid, gid)) = &user {
            std::os::unix::fs::chown(&dir, Some(*uid), Some(*gid))
                .map_err(|e| fail(format!("chown {}: {e}", dir.display())))?;
        }
        let data = dir.join("data");
        let out = command(user.as_ref().map(|u| u.0.as_str()), &binaries.initdb)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail(format!("running {}: {e}", binaries.initdb.display())))?;
        if !out.status.success() {
            return Err(fail(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut server = PgServer {
            binaries,
            user: user.map(|u| u.0),
            dir,
            port: 0,
            fsync,
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

    /// Starts the server on its directory and port; returns once it accepts
    /// connections.
    fn launch(&mut self) -> Result<(), ServerError> {
        let data = self.dir.join("data");
        let mut cmd = command(self.user.as_deref(), Path::new("sh"));
        cmd.args(["-c", SUPERVISOR, "supervisor"])
            .arg(&self.binaries.postgres)
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
                "-c",
                &format!("fsync={}", if self.fsync { "on" } else { "off" }),
                "-c",
                "logging_collector=off",
            ])
            .env("VLLM_PG_DIR", &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join("server.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        let mut child = cmd
            .spawn()
            .map_err(|e| ServerError::Failed(format!("starting postgres: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| ServerError::Failed("no stdin for the supervisor".to_owned()))?;
        self.running = Some((child, stdin));
        let pid_file = data.join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Line 8 of postmaster.pid is the server's state; "ready" once it accepts
            // connections.
            let ready = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.lines().nth(7).map(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some((child, _)) = &mut self.running
                && let Ok(Some(status)) = child.try_wait()
            {
                self.running = None;
                return Err(ServerError::Failed(format!(
                    "postgres exited ({status}): {}",
                    self.log_tail()
                )));
            }
            if Instant::now() > deadline {
                self.stop(StopMode::Immediate);
                return Err(ServerError::Failed(format!(
                    "postgres did not accept connections within {START_TIMEOUT:?}: {}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this server, as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?connect_timeout=10",
            self.port
        )
    }

    /// Creates an empty database with a name no other test of this process uses;
    /// returns its URL.
    pub async fn create_database(&self) -> Result<String, ServerError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (client, connection) = tokio_postgres::connect(&self.url("postgres"), NoTls)
            .await
            .map_err(|e| ServerError::Failed(format!("connecting to create a database: {e}")))?;
        let driver = tokio::spawn(connection);
        let created = client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| ServerError::Failed(format!("CREATE DATABASE {name}: {e}")));
        drop(client);
        let _ = driver.await;
        created.map(|()| self.url(&name))
    }

    /// Stops the server, keeping its directory; [`PgServer::restart`] starts it
    /// again on the same port. Does nothing if it is not running.
    pub fn stop(&mut self, how: StopMode) {
        if let Some((mut child, mut stdin)) = self.running.take() {
            let line = match how {
                StopMode::Fast => "fast\n",
                StopMode::Immediate => "immediate\n",
            };
            let _ = stdin.write_all(line.as_bytes());
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again, on the same directory and port.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        if self.running.is_some() {
            return Ok(());
        }
        // The port was the server's; nothing else on this machine should have taken
        // it in the moment since, but a few tries cover a slow release.
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

impl Drop for PgServer {
    fn drop(&mut self) {
        match self.running.take() {
            // Closing stdin tells the supervisor to stop the server and delete the
            // directory.
            Some((mut child, stdin)) => {
                drop(stdin);
                let _ = child.wait();
            }
            None => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
        // The supervisor runs as the server's user; what it could not remove, root
        // can.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether missing services fail the run (`VIRTUAL_LLM_REQUIRE_SERVICES=1`).
pub use virtual_llm_core::testkit::services::services_required;

/// `result`'s server, or `None` after one loud line on stderr when PostgreSQL is
/// missing; panics when it is missing and services are required, or when it is
/// installed but does not start.
pub fn available<T>(result: Result<T, ServerError>) -> Option<T> {
    decide(result, services_required())
}

/// [`available`], with whether services are required given.
fn decide<T>(result: Result<T, ServerError>, required: bool) -> Option<T> {
    match result {
        Ok(t) => Some(t),
        Err(ServerError::Missing(why)) => {
            virtual_llm_core::testkit::services::missing("PostgreSQL", &why, required);
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The server shared by every test of this process, started on first use; `None`
/// (after the loud line of [`available`]) when PostgreSQL is missing.
pub fn shared() -> Option<&'static PgServer> {
    static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();
    let server = SHARED.get_or_init(|| match PgServer::start() {
        Ok(s) => Ok(s),
        Err(ServerError::Missing(why)) => Err(why),
        Err(e) => panic!("{e}"),
    });
    match server {
        Ok(s) => Some(s),
        Err(why) => {
            let _: Option<()> = available(Err(ServerError::Missing(why.clone())));
            None
        }
    }
}

/// A new, empty database on the [`shared`] server: its URL, or `None` when
/// PostgreSQL is missing (see [`available`]).
pub async fn fresh_database() -> Option<String> {
    let server = shared()?;
    match server.create_database().await {
        Ok(url) => Some(url),
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_skips_unless_services_are_required() {
        assert_eq!(decide(Ok(7), true), Some(7));
        let missing = || Err::<(), _>(ServerError::Missing("no initdb".into()));
        assert_eq!(decide(missing(), false), None);
        let required = std::panic::catch_unwind(|| decide(missing(), true));
        assert!(
            required.is_err(),
            "a required service that is missing fails"
        );
        let broken = std::panic::catch_unwind(|| {
            decide(
                Err::<(), _>(ServerError::Failed("initdb failed".into())),
                false,
            )
        });
        assert!(
            broken.is_err(),
            "an installed server that does not start fails"
        );
    }
}
