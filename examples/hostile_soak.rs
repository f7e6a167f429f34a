//! The hostile soak (issue 18): well-behaved clients call a published model while the
//! red team's attackers of F1, F2, F4 and F5 run at once, for a bounded time; it
//! reports the well-behaved clients' latency (p50, p99, max) and outcomes, and the
//! gateway's resident memory, beside a quiet phase of the same clients alone.
//!
//! The attackers (one principal, `mallory`, a publisher and client token):
//! - **F1**: mallory publishes `trap`, opens its SSE control stream and never reads
//!   it, then sends bodies of just under 8 MiB of tiny JSON values to `trap`, four at
//!   a time, again and again (reopening the stream when the gateway closes it).
//! - **F2**: streaming requests to the good model with a long prompt, never read; a
//!   connection the gateway closes is opened again.
//! - **F4**: result posts of one long NDJSON line sent in 64-byte writes.
//! - **F5**: mallory fills the registry, then asks for the listing on many
//!   connections and never reads the answers; reopened when closed.
//!
//! A benchmark, not a test: run it on a release build, where nothing else runs.
//!
//! ```text
//! cargo build --release --example gateway --example publisher --example hostile_soak
//! target/release/examples/hostile_soak --duration 60s
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The well-behaved clients beside the red team's attackers.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// How long each phase runs (quiet, then under attack).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Well-behaved clients, each sending one request after another.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// F2: streaming requests held unread at once.
    #[arg(long, default_value_t = 24)]
    unread_streams: usize,
    /// F5: registry listings held unread at once.
    #[arg(long, default_value_t = 64)]
    unread_listings: usize,
    /// F5: rows mallory registers first (64 per register), as many as it may.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// F1: bodies in flight to the stalled publisher at once.
    #[arg(long, default_value_t = 4)]
    bodies: usize,
    /// F4: long result lines posted at once.
    #[arg(long, default_value_t = 2)]
    long_lines: usize,
    /// Extra TOML appended to the gateway's config (e.g. `[limits]` for mallory).
    #[arg(long)]
    config_extra: Option<PathBuf>,
    /// Where the gateway and publisher binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const ALICE: &str = "alice-publisher-token-0123456789";
const APP: &str = "app-client-token-0123456789";
const MALLORY: &str = "mallory-token-0123456789";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("this executable has no directory")?
            .to_path_buf(),
    };
    let work = tempfile::Builder::new().prefix("hostile-soak-").tempdir()?;
    let mut config = format!(
        r#"
[[tokens]]
token = "{ALICE}"
principal = "alice"
roles = ["publisher"]

[[tokens]]
token = "{APP}"
principal = "app"
roles = ["client"]

[[tokens]]
token = "{MALLORY}"
principal = "mallory"
roles = ["publisher", "client"]
"#
    );
    if let Some(extra) = &args.config_extra {
        config.push_str(&std::fs::read_to_string(extra)?);
    }
    std::fs::write(work.path().join("gateway.toml"), config)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let url = format!("http://{addr}");
    let gateway = Child::spawn(
        &bin_dir.join("gateway"),
        &[
            "--listen",
            &addr.to_string(),
            "--data-dir",
            &work.path().join("data").display().to_string(),
            "--config",
            &work.path().join("gateway.toml").display().to_string(),
        ],
        &work.path().join("gateway.log"),
    )?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    wait_for(&http, &format!("{url}/readyz"), None).await?;
    let _publisher = Child::spawn(
        &bin_dir.join("publisher"),
        &[
            "--gateway",
            &url,
            "--token",
            ALICE,
            "--transport",
            "ws",
            "--echo",
            "good",
            "--session-file",
            &work.path().join("alice-session").display().to_string(),
        ],
        &work.path().join("publisher.log"),
    )?;
    wait_for(&http, &format!("{url}/api/v1/llms/good"), Some(APP)).await?;

    let rss = Rss::new(gateway.pid());
    let baseline = rss.now()?;
    println!(
        "gateway RSS at start: {} MiB; {} well-behaved clients; phases of {}",
        baseline / 1024,
        args.clients,
        humantime::format_duration(args.duration)
    );
    let quiet = phase(&http, &url, &args, &rss, false).await?;
    let loud = phase(&http, &url, &args, &rss, true).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss.now()?;
    println!();
    println!("| phase | requests | ok | other outcomes | p50 | p99 | max | gateway RSS peak |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, p) in [("quiet", &quiet), ("under attack", &loud)] {
        println!(
            "| {name} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {} MiB |",
            p.latency.len(),
            p.outcomes.get("200").copied().unwrap_or(0),
            p.others(),
            p.latency.value_at_quantile(0.5) as f64 / 1000.0,
            p.latency.value_at_quantile(0.99) as f64 / 1000.0,
            p.latency.max() as f64 / 1000.0,
            p.peak_rss / 1024,
        );
    }
    println!(
        "\np99 under attack / quiet: {:.2}; RSS: {} MiB at start, {} MiB 5 s after the attack",
        loud.latency.value_at_quantile(0.99) as f64
            / quiet.latency.value_at_quantile(0.99).max(1) as f64,
        baseline / 1024,
        after / 1024
    );
    println!("attack tallies: {}", loud.attacks);
    Ok(())
}

/// What one phase measured.
struct Phase {
    latency: Histogram<u64>,
    outcomes: BTreeMap<String, u64>,
    peak_rss: u64,
    attacks: String,
}

impl Phase {
    fn others(&self) -> String {
        let others: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(k, _)| k.as_str() != "200")
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        if others.is_empty() {
            "none".to_owned()
        } else {
            others.join(", ")
        }
    }
}

/// Runs the well-behaved clients for the duration, with the attackers when `attack`.
async fn phase(
    http: &reqwest::Client,
    url: &str,
    args: &Args,
    rss: &Rss,
    attack: bool,
) -> Result<Phase, BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut attackers = Vec::new();
    if attack {
        let addr: SocketAddr = url.trim_start_matches("http://").parse()?;
        // The trap first: mallory's names are capped (maxNames), the filler takes the rest.
        let trap_session = publish_trap(http, url).await?;
        let session = fill_registry(http, url, args.rows).await?;
        for _ in 0..args.unread_streams {
            attackers.push(tokio::spawn(unread(
                addr,
                stop.clone(),
                tally.clone(),
                Unread::Stream,
            )));
        }
        for _ in 0..args.unread_listings {
            attackers.push(tokio::spawn(unread(
                addr,
                stop.clone(),
                tally.clone(),
                Unread::Listing,
            )));
        }
        attackers.push(tokio::spawn(unread(
            addr,
            stop.clone(),
            tally.clone(),
            Unread::ControlStream(trap_session),
        )));
        for _ in 0..args.bodies {
            attackers.push(tokio::spawn(amplify(addr, stop.clone(), tally.clone())));
        }
        for _ in 0..args.long_lines {
            attackers.push(tokio::spawn(long_line(
                addr,
                session.clone(),
                stop.clone(),
                tally.clone(),
            )));
        }
        // Let the attack take hold before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let outcomes = Arc::new(Mutex::new(BTreeMap::new()));
    let deadline = Instant::now() + args.duration;
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            let (http, url) = (http.clone(), url.to_owned());
            let (latency, outcomes) = (latency.clone(), outcomes.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let answer = http
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(APP)
                        .timeout(Duration::from_secs(60))
                        .json(&json!({"model": "good", "messages": [
                            {"role": "user", "content": format!("client {i} says hello")}]}))
                        .send()
                        .await;
                    let outcome = match answer {
                        Ok(r) => {
                            let status = r.status().as_u16().to_string();
                            match r.bytes().await {
                                Ok(_) => status,
                                Err(_) => "body error".to_owned(),
                            }
                        }
                        Err(e) if e.is_timeout() => "timeout".to_owned(),
                        Err(_) => "connection error".to_owned(),
                    };
                    let micros = started.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
                    if let Ok(mut h) = latency.lock() {
                        h.saturating_record(micros);
                    }
                    if let Ok(mut o) = outcomes.lock() {
                        *o.entry(outcome).or_insert(0) += 1;
                    }
                }
            })
        })
        .collect();
    let mut peak_rss = rss.now()?;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak_rss = peak_rss.max(rss.now()?);
    }
    for client in clients {
        client.await?;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    let latency = latency.lock().map_err(|_| "poisoned")?.clone();
    let outcomes = outcomes.lock().map_err(|_| "poisoned")?.clone();
    Ok(Phase {
        latency,
        outcomes,
        peak_rss,
        attacks: tally.to_string(),
    })
}

/// How often each attack ran, and how often the gateway cut it off.
#[derive(Default)]
struct Tally {
    unread_opened: AtomicU64,
    unread_closed: AtomicU64,
    bodies_sent: AtomicU64,
    lines_sent: AtomicU64,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "unread connections opened {}, closed by the gateway {}; 8 MiB bodies answered {}; long lines posted {}",
            get(&self.unread_opened),
            get(&self.unread_closed),
            get(&self.bodies_sent),
            get(&self.lines_sent)
        )
    }
}

/// What an unread connection asks for.
#[derive(Clone)]
enum Unread {
    /// F2: a streaming answer with a long prompt.
    Stream,
    /// F5: the registry listing.
    Listing,
    /// F1: the trap's SSE control stream, for this session.
    ControlStream(String),
}

/// Sends the request and never reads; when the gateway closes the connection (a
/// byte written every second fails), opens another.
async fn unread(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>, what: Unread) {
    let prompt = "word ".repeat(100_000);
    while !stop.load(Ordering::Relaxed) {
        let request = match &what {
            Unread::Stream => {
                let body = json!({"model": "good", "stream": true,
                    "messages": [{"role": "user", "content": prompt}]})
                .to_string();
                post_head("/v1/chat/completions", APP, None, body.len()) + &body
            }
            Unread::Listing => format!(
                "GET /api/v1/llms HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {APP}\r\n\r\n"
            ),
            Unread::ControlStream(session) => format!(
                "GET /api/v1/llms/_provider-stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {MALLORY}\r\n{}: {session}\r\n\r\n",
                virtual_llm::protocol::SESSION_HEADER
            ),
        };
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        tally.unread_opened.fetch_add(1, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Blank lines between requests are allowed; a closed connection refuses.
            if stream.write_all(b"\r\n").await.is_err() {
                tally.unread_closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// F1: bodies of just under 8 MiB of `0,` to the trap, whose publisher reads nothing.
async fn amplify(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    const LIMIT: usize = 8 * 1024 * 1024 - 1024;
    let head = br#"{"model":"trap","messages":["#;
    let mut body = head.to_vec();
    body.resize(LIMIT - 8, 0);
    for (i, b) in body[head.len()..].iter_mut().enumerate() {
        *b = if i % 2 == 0 { b'0' } else { b',' };
    }
    body.extend_from_slice(b"0]}");
    let request = [
        post_head("/v1/chat/completions", MALLORY, None, body.len()).into_bytes(),
        body,
    ]
    .concat();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut stream) = TcpStream::connect(addr).await
            && stream.write_all(&request).await.is_ok()
        {
            let mut answer = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer).await;
            tally.bodies_sent.fetch_add(1, Ordering::Relaxed);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// F4: a result post of one 8 MiB line without a line break, in 64-byte writes.
async fn long_line(addr: SocketAddr, session: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let chunk = [b'x'; 64];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let head = format!(
            "POST /api/v1/llms/_provider-task/task_soak0000000000000000000000/result HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {MALLORY}\r\n{}: {session}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
            virtual_llm::protocol::SESSION_HEADER
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let mut sent = 0;
        while sent < 8 * 1024 * 1024 && !stop.load(Ordering::Relaxed) {
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            if stream.write_all(&frame).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        tally.lines_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// The head of a JSON `POST`.
fn post_head(path: &str, token: &str, session: Option<&str>, len: usize) -> String {
    let session = session
        .map(|s| format!("{}: {s}\r\n", virtual_llm::protocol::SESSION_HEADER))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{session}Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// F5's first step: mallory registers up to `rows` names, 64 per register, each in a
/// new session; returns the last session (F4 posts with it).
async fn fill_registry(http: &reqwest::Client, url: &str, rows: usize) -> Result<String, BoxError> {
    let mut session = String::new();
    let mut registered = 0;
    for batch in 0..rows.div_ceil(64) {
        let llms: Vec<Value> = (0..64)
            .map(|i| json!({"name": format!("filler-{batch}-{i}"), "type": "openai", "model": "m"}))
            .collect();
        let answer = http
            .post(format!("{url}/api/v1/llms/_provider-register"))
            .bearer_auth(MALLORY)
            .json(&json!({"llms": llms}))
            .send()
            .await?;
        if !answer.status().is_success() {
            println!(
                "mallory's register {batch} refused ({}), after {registered} rows",
                answer.status()
            );
            break;
        }
        let body: Value = answer.json().await?;
        session = body["providerSessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        registered += 64;
    }
    Ok(session)
}

/// F1's trap: mallory's `trap` model, whose control stream nobody reads.
async fn publish_trap(http: &reqwest::Client, url: &str) -> Result<String, BoxError> {
    let answer: Value = http
        .post(format!("{url}/api/v1/llms/_provider-register"))
        .bearer_auth(MALLORY)
        .json(&json!({"llms": [{"name": "trap", "type": "openai", "model": "m"}]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(answer["providerSessionId"]
        .as_str()
        .ok_or("no session")?
        .to_owned())
}

/// The gateway's resident memory, from `/proc`.
struct Rss {
    path: PathBuf,
}

impl Rss {
    fn new(pid: u32) -> Self {
        Rss {
            path: PathBuf::from(format!("/proc/{pid}/status")),
        }
    }

    /// VmRSS in KiB.
    fn now(&self) -> Result<u64, BoxError> {
        let status = std::fs::read_to_string(&self.path)?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or("no VmRSS")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .ok_or("no VmRSS value")?
            .parse()?)
    }
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Child {
    fn spawn(program: &Path, args: &[&str], log: &Path) -> Result<Self, BoxError> {
        let file = std::fs::File::create(log)?;
        let child = std::process::Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Child(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `url` answers 200 (with `token`), for at most 30 s.
async fn wait_for(http: &reqwest::Client, url: &str, token: Option<&str>) -> Result<(), BoxError> {
    for _ in 0..300 {
        let mut request = http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Ok(r) = request.send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{url} did not answer within 30 s").into())
}

/// A free loopback port.
fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
