//! The benchmark driver behind `docs/benchmarks.md`: the relay's overhead against calling
//! the upstream directly, measured in one run, pools, and the scale modes.
//!
//! Run with: `cargo run --release --example loadgen`
//!
//! ```text
//! cargo run --release --example loadgen                          # relay against direct, c = 1, 16, 64
//! cargo run --release --example loadgen -- --pool 4 --concurrency 1,64 --kinds complete
//!                                                                # a pool of 4 against one publisher
//! cargo run --release --example loadgen -- --pool 2 --pool-capacity 8 --mock-delay 20ms \
//!     --pool-only --concurrency 32,300 --kinds complete         # the admission queue, overloaded
//! cargo run --release --example loadgen -- --hyper-hops --concurrency 1,64 --rounds 3
//!                                                                # the relay against nginx and hyper's own floor
//! cargo run --release --example loadgen -- --resume-cost --no-nginx --kinds stream
//!                                                                # resuming publishers against --no-resume ones,
//!                                                                # then streams across a cut link
//! cargo run --release --example loadgen -- --publishers 10000    # idle publishers: registration, memory
//! cargo run --release --example loadgen -- --gc-rows 100000      # GC sweep on redb
//! ```
//!
//! `--help` lists the flags. Ctrl-C stops the run and every child process.
//!
//! # What runs where, and why
//!
//! - **A mock OpenAI upstream**, served by this process on `127.0.0.1:0` (hyper, HTTP/1.1,
//!   `TCP_NODELAY`): a fixed `chat.completion`, or with `"stream": true` a stream of 20
//!   `chat.completion.chunk` events ending `data: [DONE]`. It answers from pre-built
//!   bytes, so it costs next to nothing and the same in every case. `--mock-delay D`
//!   makes it answer D after each request arrived (a tokio timer per request, no
//!   thread blocked; before the first chunk when streaming), a stand-in for a model
//!   that takes time: with a pool's capacity C, at most C / D requests per second. It
//!   counts the requests it answers by their `model`, which the pool mode uses to see
//!   how the gateway spread them.
//! - **The gateway and the publishers are child processes** (the release builds of
//!   `examples/gateway.rs` and `examples/publisher.rs`, built first by this program),
//!   so that the gateway's own CPU seconds and peak RSS can be read from
//!   `/proc/<pid>/stat` and `/proc/<pid>/status` apart from the load client's, and so
//!   that a relayed request crosses the same process and socket boundaries as in
//!   production. The gateway keeps its registry in redb, in a temporary directory on
//!   disk.
//! - **The load client**, in this process: closed loop, N workers, each with its own
//!   keep-alive HTTP/1.1 connection (`TCP_NODELAY`) sending requests back to back.
//!   Latencies go into an HDR histogram; requests started during the warm-up are not
//!   recorded. Failed requests are counted by kind (`429 queue_full`: the status and
//!   the OpenAI error's `code`; `transport`: no answer or a broken stream), and the
//!   worker pauses 10 ms before its next request (it does not wait the `Retry-After`),
//!   on the same connection after an error status, on a new one otherwise.
//!
//! - **The proxy floor** (issue #20), when `nginx` is installed (Debian:
//!   `nginx-light`; skipped with a note otherwise, or with `--no-nginx`): two nginx
//!   instances started by loadgen in a temporary prefix with their own config
//!   (keep-alive upstreams, access log off, `worker_processes auto`), chained in front
//!   of the same mock: one hop (nginx → mock) and two hops (nginx → nginx → mock), the
//!   honest floor for a relay that also crosses two hops. See [`nginx`].
//! - **The HTTP stack's floor** (`--hyper-hops`): two hops of the cheapest reverse
//!   proxy hyper allows, child processes of this program (`--serve-hop`), chained in
//!   front of the mock, and two more that join a stream's frames ready together: what
//!   hyper costs on the same two hops with no relay work. See [`hop`].
//!
//! # What is measured
//!
//! At each concurrency, one after the other: the mock called directly, through one and
//! two nginx hops, then the same request relayed (client → gateway → publisher over the
//! control channel → mock → publisher → gateway → client), then all again streamed.
//! A second table gives every case against two nginx hops at the same concurrency and
//! kind: added p50, req/s, chunks/s and both hops' CPU per request (the gateway and the
//! publisher, or the two nginx instances, from `/proc`), each as a ratio to the floor's;
//! the targets table ends with issue #20's targets, as such ratios. `--rounds N`
//! measures every case N times, round after round, and adds a table of each case's
//! ratios to the floor measured in the same round, with their medians; the other tables
//! then give each case's median round. For each relayed case the
//! table shows the *added* latency (relayed p50/p99 minus direct p50/p99 at the same
//! concurrency, same run) and the throughput ratio (relayed over direct requests per
//! second). Streamed rows give the time to the first chunk and chunks per second.
//! CPU per request is given for each process: on a 2-core machine the load client and
//! the mock share the cores with the gateway and the publisher, so the sum of the CPU
//! columns (with the kernel's network work, charged to no process) is what one request
//! costs the machine. After the table comes how much of the machine *other* processes
//! took during each case: a concurrent build makes every figure pessimistic, and says so.
//!
//! # Pools (`--pool N`)
//!
//! Instead of the relay cases: per transport, N publisher children each publish one
//! member row into one pool (`--config` with `pool` and `maxConcurrent`, the upstream
//! the mock), and one more publisher child publishes a row of its own (a pool of one).
//! Each member's and the single row's `maxConcurrent` is `--pool-capacity` (default
//! the highest concurrency: nothing queues). At each concurrency and kind, three cases
//! with the same load: *single* (clients call the single row), *pool of N* (clients
//! call the pool's key; the gateway picks a member per request), and *N members by
//! name* (the control case: clients call the members' own row names in turn, so the
//! load reaches the same N processes without the gateway choosing). The table gives
//! each process's CPU per request (the gateway, each publisher serving the case, the
//! load client and mock, the kernel's network work), the throughput against the
//! single case, and each member's share of the mock's answers; a second table compares
//! the gateway's CPU per request, pool against single and against by-name: the issue's
//! "the pool must not cost more than 10 % per request". `--pool-only` runs the pool's
//! cases alone.
//!
//! With `--mock-delay`, a third table is about the admission queue: throughput against
//! the capacity's rate (members × `maxConcurrent` / delay), latency p50/p99 and the
//! same minus the delay, and the gateway's own `virtual_llm_queue_wait_seconds`
//! histogram read from its `/metrics` (no token: loadgen's gateway has none) before and
//! after the measured time: how many requests waited, the mean wait (sum / count), and
//! p50/p99 estimated within the histogram's buckets as Prometheus's
//! `histogram_quantile` does (linear in the bucket, whose bounds are printed with it);
//! requests admitted at once are not in that histogram. Then the queue's rejections by
//! reason (`virtual_llm_queue_rejections_total`), and the client's errors by status.
//! `--queue-depth` and `--queue-wait` are passed to the gateway child.
//!
//! `--rate R` paces the workers to R requests per second in all (each worker its
//! share, staggered; a late request moves its worker's schedule rather than bursting
//! to catch up). In a closed loop at high concurrency the two cores are saturated and
//! every process takes about the same share of them whatever the throughput, so a
//! process's CPU per request follows the throughput the whole machine reaches; at a
//! fixed rate below saturation, CPU per request is the work a request costs.
//!
//! On a shared machine, `--rerun-disturbed N` measures a case again (up to N times)
//! when other processes and the hypervisor (steal) took more than 5 % of the machine
//! during it, after waiting until they take less for three seconds; the table's last
//! column says how often.
//!
//! Scale modes run instead of the relay cases when asked for:
//! - `--publishers N`: N idle publishers, each with one echo LLM, driven from this
//!   process with the library (`Publisher::spawn` over an `SseWire` or a `WsWire`
//!   each: thousands of publisher *processes* would measure the kernel, not the
//!   gateway) against a child gateway. Reports the registration time and the gateway's
//!   RSS and file descriptors per connected publisher.
//! - `--gc-rows N`: the GC sweep over N rows of an on-disk redb registry, `--gc-stale`
//!   of them stale, in process (`Gateway::sweep`; the rows are written with
//!   `Store::write` batches).
//!
//! # Transports
//!
//! `--transports sse,ws` (the default) relays over both, each through its own publisher
//! child (`publisher --transport sse|ws`); the scale mode picks the library's wire in
//! [`wire`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use comfy_table::presets::ASCII_MARKDOWN;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use virtual_llm::protocol::LlmSpec;
use virtual_llm::publisher::{PublisherState, Wire};
use virtual_llm::redb::RedbStore;
use virtual_llm::sse::SseWire;
use virtual_llm::ws::WsWire;
use virtual_llm::{
    Clock, EchoProvider, Gateway, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus, PublishedLlm,
    Publisher, PublisherOptions, SessionId, Store, SystemClock, Timestamp, Write,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    about = "virtual-llm benchmark driver: relay against direct, pools, idle publishers, GC sweep",
    after_help = "With neither --pool, --publishers nor --gc-rows, runs the relay cases."
)]
struct Args {
    /// Measured time of each case.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Unmeasured warm-up before each case.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Concurrencies to measure (closed-loop workers, one connection each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Kinds of request to measure: `complete` (one JSON answer), `stream` (20 chunks).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "complete,stream"
    )]
    kinds: Vec<Kind>,
    /// Skip the direct and nginx cases (no added latency then): for profiling the relay.
    #[arg(long)]
    relayed_only: bool,
    /// Skip the nginx baseline (one and two nginx hops in front of the mock; skipped
    /// with a note anyway when `nginx` is not installed).
    #[arg(long)]
    no_nginx: bool,
    /// Transports to relay over.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sse,ws")]
    transports: Vec<Transport>,
    /// Scale mode: connect this many idle publishers, one LLM each (several: `1000,10000`).
    #[arg(long, value_delimiter = ',')]
    publishers: Vec<usize>,
    /// Scale mode: how many publishers register at once (the reference gateway listens
    /// with a backlog of 4096; past the backlog, connections would wait in the kernel
    /// for a SYN retransmission, a full second each).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Scale mode: how long the publishers stay connected and idle before the gateway's
    /// memory is read (past the heartbeat interval, 30 s, to include heartbeats).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    hold: Duration,
    /// GC mode: rows in the redb registry (several: `10000,100000`).
    #[arg(long, value_delimiter = ',')]
    gc_rows: Vec<usize>,
    /// GC mode: how many of the rows are stale.
    #[arg(long, default_value_t = 1000)]
    gc_stale: usize,
    /// GC mode: how many sweeps are timed.
    #[arg(long, default_value_t = 5)]
    gc_repeat: usize,
    /// Keep the working directories (registry, child logs) and print where they are.
    #[arg(long)]
    keep: bool,
    /// The gateway child's `--threads` (default: the gateway's own default, one worker
    /// per CPU; 1 runs it on one thread).
    #[arg(long)]
    gateway_threads: Option<u16>,
    /// The publisher children's `--threads` (default: the publisher's own default, one
    /// thread).
    #[arg(long)]
    publisher_threads: Option<u16>,
    /// Use the gateway and publisher binaries as they are, without building them first.
    #[arg(long)]
    no_build: bool,
    /// Where the gateway and publisher binaries are (default: next to this executable,
    /// built first). Implies --no-build.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Pool mode: relay to a pool of this many publisher children, one member row each,
    /// against the same load to one publisher's row (see --pool-only).
    #[arg(long, value_name = "MEMBERS")]
    pool: Option<usize>,
    /// Pool mode: each member's `maxConcurrent`, and the single publisher's (default:
    /// the highest --concurrency, so that no request queues).
    #[arg(long, value_name = "N")]
    pool_capacity: Option<u32>,
    /// Pool mode: only the pool's cases, not the single publisher's.
    #[arg(long)]
    pool_only: bool,
    /// The mock upstream answers after this long (a tokio timer per request; before the
    /// first chunk when streaming). Every mode; default none.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    mock_delay: Duration,
    /// The gateway child's `--queue-depth` (default: the gateway's, 256).
    #[arg(long)]
    queue_depth: Option<usize>,
    /// The gateway child's `--queue-wait` (default: the gateway's, 30 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    queue_wait: Option<Duration>,
    /// Pool mode: send this many requests per second in all, each worker paced to its
    /// share (default: closed loop, as fast as answers come back). Below saturation,
    /// CPU per request measures the work, not how the cores were shared.
    #[arg(long)]
    rate: Option<f64>,
    /// Pool mode: measure a case again, up to this many times, while other processes
    /// and the hypervisor (steal) took more than 5 % of the machine during it (waiting
    /// first until they take less for 3 s).
    #[arg(long, default_value_t = 0)]
    rerun_disturbed: usize,
    /// Relay cases: also relay through a second publisher per transport started with
    /// `--no-resume` (issue #16: what keeping tasks through a dropped channel costs a
    /// steady stream), and compare the two in one table. Each pair is measured twice,
    /// in both orders (with, without, without, with), so that a drift of the machine
    /// during a run does not favour either.
    #[arg(long)]
    resume_cost: bool,
    /// Relay cases: run every case this many times, in rounds (each round measures
    /// every case once, in the usual order), and report for each case its median round
    /// by req/s, with a table of each relayed case's ratios to the proxy floor round by
    /// round and their medians. On a shared 2-core machine one case's unlucky seconds
    /// then decide no ratio.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Replicas mode (issue #15): two gateway children as replicas on one PostgreSQL
    /// and one nats-server (started here from the binaries on PATH, as the tests start
    /// them), a publisher per transport connected to the first; each case measured
    /// with the client on the same replica and on the other, in one run, and compared
    /// (added p50, throughput kept). Only 2 is supported.
    #[arg(long, value_name = "N")]
    replicas: Option<usize>,
    /// Relay cases: also measure two hops of the cheapest reverse proxy hyper allows
    /// (see [`hop`]), two child processes of this program chained in front of the mock,
    /// passing bodies frame by frame, and two more that join a stream's frames ready
    /// together: what the Rust HTTP stack the relay is built on costs with no relay work.
    #[arg(long)]
    hyper_hops: bool,
    /// Internal (`--hyper-hops` starts its children with it): serve as one such hop,
    /// `LISTEN=UPSTREAM` (two addresses), until killed.
    #[arg(long, hide = true, value_name = "LISTEN=UPSTREAM")]
    serve_hop: Option<String>,
    /// Internal: the hop passes an event stream's frames ready together as one.
    #[arg(long, hide = true)]
    hop_coalesce: bool,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum Kind {
    /// A whole `chat.completion`.
    Complete,
    /// A stream of `chat.completion.chunk`s.
    Stream,
}

/// How a publisher reaches the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum Transport {
    /// Server-sent events down, HTTP posts up.
    Sse,
    /// One WebSocket both ways.
    Ws,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// The library wire of `transport` to the gateway at `url`, for the scale mode: the one
/// place a transport is picked.
fn wire(transport: Transport, url: &str) -> Result<Arc<dyn Wire>, BoxError> {
    Ok(match transport {
        Transport::Sse => Arc::new(SseWire::new(url, None)?),
        Transport::Ws => Arc::new(WsWire::new(url, None)?),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            // The in-process publishers of the scale mode warn when the gateway
            // goes away at the end, thousands of times: only their errors show.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,virtual_llm_core::publisher=error".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(addrs) = &args.serve_hop {
        let (listen, upstream) = addrs
            .split_once('=')
            .ok_or("--serve-hop takes LISTEN=UPSTREAM")?;
        let listeners = hop::bind(listen.parse()?)?;
        return hop::serve(listeners, upstream.parse()?, args.hop_coalesce).await;
    }
    // Dropping `run` on Ctrl-C drops the child-process guards, which kill the children.
    tokio::select! {
        result = run(args) => result,
        signal = tokio::signal::ctrl_c() => {
            signal?;
            Err("interrupted; child processes stopped".into())
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for meaningful figures");
    }
    let most_publishers = args.publishers.iter().copied().max().unwrap_or(0);
    // Each idle publisher holds one connection (two while an SSE heartbeat is in
    // flight) at both ends: in this process and in the gateway, which inherits the limit.
    let fd_limit = raise_fd_limit(
        most_publishers as u64 * 2 + 4096,
        most_publishers as u64 + 1024,
    )?;
    println!("# virtual-llm loadgen\n");
    println!("machine: {}", machine());
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("open-file limit: {fd_limit}\n");

    if !args.gc_rows.is_empty() {
        let mut runs = Vec::new();
        for &rows in &args.gc_rows {
            runs.push(gc::run(rows, args.gc_stale, args.gc_repeat).await?);
        }
        gc::print(&runs);
    }
    if !args.publishers.is_empty() {
        let bins = Binaries::locate(&args)?;
        let mut runs = Vec::new();
        for &transport in &args.transports {
            for &n in &args.publishers {
                runs.push(scale::run(&args, &bins, transport, n).await?);
            }
        }
        scale::print(&args, &runs);
    }
    if args.pool.is_some() {
        let bins = Binaries::locate(&args)?;
        pool::run(&args, &bins).await?;
    }
    if let Some(n) = args.replicas {
        if n != 2 {
            return Err(format!("--replicas {n}: only 2 replicas are supported").into());
        }
        let bins = Binaries::locate(&args)?;
        replicas::run(&args, &bins).await?;
    }
    if args.publishers.is_empty()
        && args.gc_rows.is_empty()
        && args.pool.is_none()
        && args.replicas.is_none()
    {
        let bins = Binaries::locate(&args)?;
        relay::run(&args, &bins).await?;
    }
    Ok(())
}

/// Raises the soft open-file limit to `want` (the hard one too when allowed, as root),
/// or as far as the hard limit goes, and warns below `need`. Child processes inherit it.
fn raise_fd_limit(want: u64, need: u64) -> Result<u64, BoxError> {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft >= want {
        return Ok(soft);
    }
    if hard < want && Resource::NOFILE.set(want, want).is_ok() {
        return Ok(want);
    }
    let soft = want.min(hard);
    Resource::NOFILE.set(soft, hard)?;
    if soft < need {
        eprintln!(
            "warning: open-file limit {soft} is below the {need} this run needs; raise it with `ulimit -Hn` and `ulimit -n`"
        );
    }
    Ok(soft)
}

/// One line about the machine: CPU model, cores, memory, kernel.
fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = procfs::cores();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease");
    format!(
        "{cores} cores ({model}), {mem_gib:.1} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// Formats nanoseconds as milliseconds.
fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

/// Formats a signed difference of nanoseconds as milliseconds.
fn ms_diff(a: u64, b: u64) -> String {
    format!("{:+.3}", (a as f64 - b as f64) / 1e6)
}

/// A latency histogram in nanoseconds, 1 µs to 2 min, 3 significant digits.
fn histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1_000, 120_000_000_000, 3)?)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn progress(len: u64, template: &str) -> Result<ProgressBar, BoxError> {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template)?);
    bar.enable_steady_tick(Duration::from_millis(250));
    Ok(bar)
}

/// Reading a process's CPU time and memory from `/proc`.
mod procfs {
    use std::io;
    use std::time::Duration;

    /// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
    const USER_HZ: u64 = 100;

    /// A process's CPU time and memory at one moment.
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct Usage {
        /// User plus system time, all threads.
        pub(crate) cpu: Duration,
        /// Resident set now (`VmRSS`), KiB.
        pub(crate) rss_kib: u64,
        /// Peak resident set (`VmHWM`), KiB.
        pub(crate) hwm_kib: u64,
    }

    /// `pid` is a process id, or `self`.
    pub(crate) fn usage(pid: &str) -> io::Result<Usage> {
        Ok(Usage {
            cpu: cpu(pid)?,
            rss_kib: status_kib(pid, "VmRSS:")?,
            hwm_kib: status_kib(pid, "VmHWM:")?,
        })
    }

    /// User plus system CPU time of `pid`, all threads.
    pub(crate) fn cpu(pid: &str) -> io::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat");
        // The command name (field 2) may hold spaces: count fields after its `)`.
        let (_, rest) = stat.rsplit_once(')').ok_or_else(bad)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15; `rest` starts at field 3.
        let tick = |i: usize| -> io::Result<u64> {
            fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
        };
        let ticks = tick(11)? + tick(12)?;
        Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
    }

    fn status_kib(pid: &str, key: &str) -> io::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {key}")))
    }

    /// The processes whose parent is `pid` (an nginx master's workers).
    pub(crate) fn children(pid: &str) -> io::Result<Vec<String>> {
        let mut children = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name();
            let Some(child) = name
                .to_str()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // Field 4, the parent, two fields after the command name's `)`.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent == Some(pid) {
                children.push(child.to_owned());
            }
        }
        Ok(children)
    }

    /// How many file descriptors `pid` has open.
    pub(crate) fn open_fds(pid: &str) -> io::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// Where the whole machine's CPU time went since boot (all cores).
    #[derive(Clone, Copy, Debug, Default)]
    pub(crate) struct Machine {
        /// In processes, user and kernel (user, nice, system): with the processes' own
        /// times, it tells how much *other* processes took.
        pub(crate) tasks: Duration,
        /// In interrupts (irq, softirq): loopback TCP is received here, charged to no
        /// process.
        pub(crate) interrupts: Duration,
        /// In the `ksoftirqd` kernel threads (part of `tasks`): the same network work,
        /// deferred there when interrupts alone cannot keep up (at high request rates).
        pub(crate) softirqd: Duration,
        /// Taken by the hypervisor for other guests.
        pub(crate) steal: Duration,
    }

    impl Machine {
        pub(crate) fn since(&self, before: &Machine) -> Machine {
            Machine {
                tasks: self.tasks.saturating_sub(before.tasks),
                interrupts: self.interrupts.saturating_sub(before.interrupts),
                softirqd: self.softirqd.saturating_sub(before.softirqd),
                steal: self.steal.saturating_sub(before.steal),
            }
        }

        /// The kernel's network work charged to no process of ours.
        pub(crate) fn network(&self) -> Duration {
            self.interrupts + self.softirqd
        }
    }

    /// The machine's CPUs, whatever this process's affinity (`taskset`) allows it.
    pub(crate) fn cores() -> usize {
        std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
    }

    /// CPU time of the `ksoftirqd/N` kernel threads.
    fn softirqd() -> io::Result<Duration> {
        let mut total = Duration::ZERO;
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.starts_with("ksoftirqd/") {
                total += cpu(pid).unwrap_or_default();
            }
        }
        Ok(total)
    }

    pub(crate) fn machine() -> io::Result<Machine> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat");
        let line = stat.lines().next().ok_or_else(bad)?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().map_err(|_| bad()))
            .collect::<io::Result<_>>()?;
        // user nice system idle iowait irq softirq steal (guest is inside user).
        let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = ticks[..] else {
            return Err(bad());
        };
        let time = |t: u64| Duration::from_millis(t * 1000 / USER_HZ);
        Ok(Machine {
            tasks: time(user + nice + system),
            interrupts: time(irq + softirq),
            softirqd: softirqd()?,
            steal: time(steal),
        })
    }
}

/// What the rest of the machine did during one case's measured time.
struct Interference {
    /// The case, as printed.
    case: String,
    /// CPU time of processes other than loadgen's own and its children.
    others: Duration,
    machine: procfs::Machine,
    elapsed: Duration,
}

/// Other processes on the machine during the measured time, as a share of all cores:
/// anything above a few percent makes the figures pessimistic, and is flagged.
fn print_interference(cases: &[Interference]) {
    let cores = procfs::cores().max(1) as f64;
    let of_machine = |d: Duration, m: &Interference| {
        d.as_secs_f64() / (cores * m.elapsed.as_secs_f64()).max(1e-9)
    };
    let share = |m: &Interference| of_machine(m.others, m);
    let worst = cases.iter().map(share).fold(0.0, f64::max);
    let average = |f: &dyn Fn(&Interference) -> f64| {
        100.0 * cases.iter().map(f).sum::<f64>() / cases.len().max(1) as f64
    };
    println!(
        "during the measured time, on average: other processes took {:.1}% of the machine (worst case {:.1}%), the kernel's network work {:.1}%, steal {:.1}%",
        average(&share),
        100.0 * worst,
        average(&|m| of_machine(m.machine.network(), m)),
        average(&|m| of_machine(m.machine.steal, m)),
    );
    for m in cases.iter().filter(|m| share(m) > 0.05) {
        println!(
            "warning: other processes took {:.0}% of the machine during {}: its figures are pessimistic",
            100.0 * share(m),
            m.case
        );
    }
}

/// The gateway and publisher binaries, and the child processes started from them.
struct Binaries {
    gateway: PathBuf,
    publisher: PathBuf,
    /// `--threads` for the gateway child, when given.
    gateway_threads: Option<u16>,
    /// `--threads` for the publisher children, when given.
    publisher_threads: Option<u16>,
    /// More flags for the gateway child (`--queue-depth`, `--queue-wait`).
    gateway_flags: Vec<String>,
}

impl Binaries {
    /// Builds the binaries with the profile of this one (unless told not to) and finds
    /// them next to this executable or in `--bin-dir`.
    fn locate(args: &Args) -> Result<Self, BoxError> {
        let dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => {
                if !args.no_build {
                    build(args.replicas.is_some())?;
                }
                let exe = std::env::current_exe()?;
                exe.parent()
                    .ok_or("this executable has no directory")?
                    .to_path_buf()
            }
        };
        let bins = Binaries {
            gateway: dir.join(format!("gateway{}", std::env::consts::EXE_SUFFIX)),
            publisher: dir.join(format!("publisher{}", std::env::consts::EXE_SUFFIX)),
            gateway_threads: args.gateway_threads,
            publisher_threads: args.publisher_threads,
            gateway_flags: gateway_flags(args),
        };
        for bin in [&bins.gateway, &bins.publisher] {
            if !bin.is_file() {
                return Err(format!(
                    "{} not found: build it with `cargo build --release --examples`",
                    bin.display()
                )
                .into());
            }
        }
        Ok(bins)
    }
}

/// The gateway child's flags that loadgen passes through.
fn gateway_flags(args: &Args) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(depth) = args.queue_depth {
        flags.extend(["--queue-depth".to_owned(), depth.to_string()]);
    }
    if let Some(wait) = args.queue_wait {
        flags.extend([
            "--queue-wait".to_owned(),
            humantime::format_duration(wait).to_string(),
        ]);
    }
    flags
}

/// `cargo build [--release] --example gateway --example publisher`, in this workspace;
/// with `replicas`, the gateway with the features `postgres` and `nats`.
fn build(replicas: bool) -> Result<(), BoxError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.args([
        "build",
        "--example",
        "gateway",
        "--example",
        "publisher",
        "--manifest-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
    ]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    if replicas {
        command.args(["--features", "postgres,nats"]);
    }
    eprintln!("building the gateway and publisher binaries…");
    let status = command.status()?;
    if !status.success() {
        return Err(format!("building the gateway and publisher failed: {status}").into());
    }
    Ok(())
}

/// A child process that is killed when this guard is dropped: at the end, on an error,
/// on a panic, and on Ctrl-C.
struct ChildGuard {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `program` with `args`, logging to `log` at `RUST_LOG=warn`, or at
    /// `$LOADGEN_CHILD_LOG` when set (for profiling: keep the logs with `--keep`).
    fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Self, BoxError> {
        let file = std::fs::File::create(&log)?;
        let filter = std::env::var("LOADGEN_CHILD_LOG").unwrap_or_else(|_| "warn".to_owned());
        let child = std::process::Command::new(program)
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// An error if the process has exited, with the end of its log.
    fn check_running(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!("{} exited ({status}):\n{}", self.name, tail.join("\n")).into())
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("could not stop {}: {e}", self.name);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("could not reap {}: {e}", self.name);
        }
    }
}

/// A temporary directory for a registry and the child processes' logs, removed at the
/// end unless `--keep`.
struct WorkDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl WorkDir {
    fn new(keep: bool) -> Result<Self, BoxError> {
        let temp = tempfile::Builder::new().prefix("loadgen-").tempdir()?;
        if keep {
            let path = temp.keep();
            eprintln!("keeping {}", path.display());
            return Ok(WorkDir { path, _temp: None });
        }
        Ok(WorkDir {
            path: temp.path().to_path_buf(),
            _temp: Some(temp),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A free loopback port (bound, read, released: the child binds it a moment later).
fn free_port() -> Result<u16, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A control-plane HTTP client (readiness, registry reads); not the load client.
fn control_client() -> Result<reqwest::Client, BoxError> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A gateway child process on a free loopback port, its registry in `dir`.
struct GatewayChild {
    guard: ChildGuard,
    url: String,
    addr: SocketAddr,
}

impl GatewayChild {
    async fn start(bins: &Binaries, dir: &Path, http: &reqwest::Client) -> Result<Self, BoxError> {
        Self::start_with(bins, dir, http, "gateway", &[]).await
    }

    /// A gateway child named `name` (its data directory and log in `dir` are named
    /// after it), with `extra` flags.
    async fn start_with(
        bins: &Binaries,
        dir: &Path,
        http: &reqwest::Client,
        name: &str,
        extra: &[String],
    ) -> Result<Self, BoxError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let data = if name == "gateway" {
            "data".to_owned()
        } else {
            format!("data-{name}")
        };
        let mut args = vec![
            "--listen".to_owned(),
            addr.to_string(),
            "--data-dir".to_owned(),
            dir.join(data).display().to_string(),
        ];
        if let Some(threads) = bins.gateway_threads {
            args.extend(["--threads".to_owned(), threads.to_string()]);
        }
        args.extend(bins.gateway_flags.iter().cloned());
        args.extend(extra.iter().cloned());
        let mut guard =
            ChildGuard::spawn(name, &bins.gateway, &args, dir.join(format!("{name}.log")))?;
        let url = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            guard.check_running()?;
            if let Ok(response) = http.get(format!("{url}/api/v1/llms")).send().await
                && response.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("the gateway did not answer within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(GatewayChild { guard, url, addr })
    }

    fn pid(&self) -> String {
        self.guard.pid()
    }
}

/// Starts a publisher child over `transport`, publishing `providers` (its `--config`
/// list) with `--max-concurrent max_concurrent`, and waits until every row of `rows`
/// is active. `tag` names its files in `dir` (config, session, log) and the child.
#[allow(clippy::too_many_arguments)]
async fn spawn_publisher(
    bins: &Binaries,
    dir: &Path,
    http: &reqwest::Client,
    gateway_url: &str,
    transport: Transport,
    tag: &str,
    providers: &serde_json::Value,
    max_concurrent: usize,
    rows: &[String],
    no_resume: bool,
) -> Result<ChildGuard, BoxError> {
    let config = dir.join(format!("providers-{tag}.json"));
    std::fs::write(&config, providers.to_string())?;
    let mut args = vec![
        "--gateway".to_owned(),
        gateway_url.to_owned(),
        "--transport".to_owned(),
        transport.name().to_owned(),
        "--session-file".to_owned(),
        dir.join(format!("session-{tag}")).display().to_string(),
        "--config".to_owned(),
        config.display().to_string(),
        "--max-concurrent".to_owned(),
        max_concurrent.to_string(),
    ];
    if no_resume {
        args.push("--no-resume".to_owned());
    }
    if let Some(threads) = bins.publisher_threads {
        args.extend(["--threads".to_owned(), threads.to_string()]);
    }
    let name = format!("publisher ({tag})");
    let log = dir.join(format!("publisher-{tag}.log"));
    let mut guard = ChildGuard::spawn(&name, &bins.publisher, &args, log)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for llm in rows {
        loop {
            if let Err(e) = guard.check_running() {
                if e.to_string().contains("invalid value") {
                    return Err(format!(
                        "the publisher binary does not support --transport {} yet: {e}",
                        transport.name()
                    )
                    .into());
                }
                return Err(e);
            }
            if let Ok(response) = http
                .get(format!("{gateway_url}/api/v1/llms/{llm}"))
                .send()
                .await
                && response.status().is_success()
                && let Ok(row) = response.json::<serde_json::Value>().await
                && row["status"] == "active"
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{llm} did not become active within 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(guard)
}

/// The floor of the Rust HTTP stack (`--hyper-hops`): the cheapest reverse proxy hyper
/// allows, so that the relay, built on hyper, can be compared with what hyper alone
/// costs on the same two hops.
///
/// Each client connection gets a connection of its own to the upstream, opened when the
/// client connects (no pool to look up: cheaper than any pooled proxy), and each request
/// is passed on as it came, its body and its answer's body frame by frame (hyper's
/// `Incoming` bodies, one frame per chunk of the upstream's chunked answer, as the
/// publisher receives them): no JSON, no routing, no log, no accounting. HTTP/1.1 with
/// keep-alive and `TCP_NODELAY` on both sides. A worker thread per core, each a
/// single-threaded tokio runtime with its own listening socket on the one port
/// (`SO_REUSEPORT`: the kernel spreads the connections), so that a connection stays on
/// its thread, as in an nginx worker process and the gateway's workers. A child process
/// of loadgen runs one hop (`--serve-hop LISTEN=UPSTREAM`); [`start`] chains two in
/// front of the mock. It is a benchmark's instrument: no timeouts, no limits, loopback
/// only.
mod hop {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::{Bytes, BytesMut};
    use futures::channel::mpsc::Receiver;
    use futures::{SinkExt, StreamExt};
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Frame, Incoming};
    use hyper::client::conn::http1::SendRequest;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};
    use virtual_llm::batch::ready_batches;

    use super::{BoxError, ChildGuard, free_port, procfs};

    /// An answer's body as passed on.
    type Body = UnsyncBoxBody<Bytes, hyper::Error>;

    /// A listening socket per core on `listen`, all on the one port (`SO_REUSEPORT`).
    /// Call it within a tokio runtime.
    pub(crate) fn bind(listen: SocketAddr) -> Result<Vec<std::net::TcpListener>, BoxError> {
        let mut listeners = Vec::new();
        let mut addr = listen;
        for _ in 0..procfs::cores().max(1) {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            let listener = socket.listen(4096)?;
            // Port 0 picks a port for the first socket; the others join it.
            addr = listener.local_addr()?;
            listeners.push(listener.into_std()?);
        }
        Ok(listeners)
    }

    /// Serves one hop on `listeners` (from [`bind`]), passing every request to
    /// `upstream`, until killed: a worker per listener, each on its own thread.
    pub(crate) async fn serve(
        listeners: Vec<std::net::TcpListener>,
        upstream: SocketAddr,
        coalesce: bool,
    ) -> Result<(), BoxError> {
        // Each worker says here how it ended; none ends while it can accept. (Threads,
        // not joined: a runtime waiting on them would never shut down.)
        let (ended, mut end) = tokio::sync::mpsc::unbounded_channel::<String>();
        for listener in listeners {
            let ended = ended.clone();
            std::thread::spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => return ended.send(e.to_string()),
                };
                let outcome = runtime.block_on(async move {
                    accept(TcpListener::from_std(listener)?, upstream, coalesce).await
                });
                let why = outcome
                    .err()
                    .map_or_else(|| "stopped".to_owned(), |e| e.to_string());
                ended.send(why)
            });
        }
        drop(ended);
        match end.recv().await {
            Some(why) => Err(format!("a hop worker ended: {why}").into()),
            None => Ok(()),
        }
    }

    /// One worker's accept loop.
    async fn accept(
        listener: TcpListener,
        upstream: SocketAddr,
        coalesce: bool,
    ) -> Result<(), BoxError> {
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(e) = connection(client, upstream, coalesce).await {
                    tracing::debug!(error = %e, "hop: a connection ended with an error");
                }
            });
        }
    }

    /// One client connection and its own upstream connection.
    async fn connection(
        client: TcpStream,
        upstream: SocketAddr,
        coalesce: bool,
    ) -> Result<(), BoxError> {
        client.set_nodelay(true)?;
        let to_upstream = TcpStream::connect(upstream).await?;
        to_upstream.set_nodelay(true)?;
        let (sender, upstream_connection) =
            hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(to_upstream)).await?;
        tokio::spawn(upstream_connection);
        // The server side answers one request at a time per connection: the lock is
        // never contended, it only lends the sender to the request being passed on.
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let sender = Arc::clone(&sender);
            async move { pass(&sender, request, coalesce).await }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(client), service)
            .await?;
        Ok(())
    }

    /// Passes `request` on and hands its answer back as it streams in: frame by frame,
    /// or with `coalesce` an event stream's frames ready together as one.
    async fn pass(
        sender: &tokio::sync::Mutex<SendRequest<Incoming>>,
        request: Request<Incoming>,
        coalesce: bool,
    ) -> Result<Response<Body>, hyper::Error> {
        let answer = {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request)
        };
        let answer = answer.await?;
        let streamed = answer
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
        if !(coalesce && streamed) {
            return Ok(answer.map(BodyExt::boxed_unsync));
        }
        Ok(answer.map(|body| runs(body).boxed_unsync()))
    }

    /// `body`'s frames ready together joined into one (`ready_batches`, as the SSE
    /// publisher gathers a stream's chunks): read on a task of its own, since only
    /// there does hyper's connection task get the turns that hand the frames over.
    fn runs(body: Incoming) -> StreamBody<Receiver<Result<Frame<Bytes>, hyper::Error>>> {
        let (mut tx, rx) = futures::channel::mpsc::channel(0);
        tokio::spawn(async move {
            let frames = http_body_util::BodyDataStream::new(body);
            let mut runs = std::pin::pin!(ready_batches(frames, 64));
            while let Some(run) = runs.next().await {
                let mut joined = BytesMut::new();
                let mut failed = None;
                for frame in run {
                    match frame {
                        Ok(data) => joined.extend_from_slice(&data),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if !joined.is_empty() && tx.send(Ok(Frame::data(joined.freeze()))).await.is_err() {
                    return;
                }
                if let Some(e) = failed {
                    // The client is told by the broken body; nobody else to tell.
                    drop(tx.send(Err(e)).await);
                    return;
                }
            }
        });
        StreamBody::new(rx)
    }

    /// Two hops: the front hop's address (front → back → `upstream`) and both children.
    pub(crate) struct Hops {
        pub(crate) front: ChildGuard,
        pub(crate) back: ChildGuard,
        pub(crate) two_hops: SocketAddr,
    }

    impl Hops {
        /// Both hops' CPU time (the front's, the back's).
        pub(crate) fn cpu(&self) -> (Duration, Duration) {
            let cpu = |g: &ChildGuard| procfs::cpu(&g.pid()).unwrap_or_default();
            (cpu(&self.front), cpu(&self.back))
        }
    }

    /// Starts two hops of this program, with their logs in `dir`, in front of `upstream`.
    /// With `coalesce`, both hops pass an event stream's frames ready together as one.
    pub(crate) async fn start(
        dir: &Path,
        upstream: SocketAddr,
        coalesce: bool,
    ) -> Result<Hops, BoxError> {
        let exe = std::env::current_exe()?;
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let variant = if coalesce { "-coalescing" } else { "" };
        // One hop, `which` of the two, listening on `listen` and passing on to `to`.
        let spawn = |which: &str, listen: SocketAddr, to: SocketAddr| {
            let mut args = vec!["--serve-hop".to_owned(), format!("{listen}={to}")];
            if coalesce {
                args.push("--hop-coalesce".to_owned());
            }
            ChildGuard::spawn(
                &format!("hyper hop ({which})"),
                &exe,
                &args,
                dir.join(format!("hop{variant}-{which}.log")),
            )
        };
        let back_addr = loopback(free_port()?);
        let back = spawn("back", back_addr, upstream)?;
        let front_addr = loopback(free_port()?);
        let front = spawn("front", front_addr, back_addr)?;
        let mut hops = Hops {
            front,
            back,
            two_hops: front_addr,
        };
        for (addr, which) in [(back_addr, "back"), (front_addr, "front")] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(addr).await.is_err() {
                hops.front.check_running()?;
                hops.back.check_running()?;
                if Instant::now() > deadline {
                    return Err(format!("the {which} hyper hop did not listen within 10 s").into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(hops)
    }

    #[cfg(test)]
    mod tests {
        use std::net::SocketAddr;
        use std::time::Duration;

        use serde_json::json;

        use super::{bind, serve};

        /// Two hops chained pass a whole answer and a stream on as the upstream gave
        /// them: the same status, content type and bytes as the mock answers directly,
        /// frame by frame and coalescing.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_hops_pass_answers_and_streams_on_as_given() {
            two_hops(false).await;
            two_hops(true).await;
        }

        async fn two_hops(coalesce: bool) {
            let mock = crate::mock::start(Duration::ZERO).await.unwrap();
            let back = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let back_addr = back[0].local_addr().unwrap();
            let front = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let front_addr = front[0].local_addr().unwrap();
            tokio::spawn(serve(back, mock.addr, coalesce));
            tokio::spawn(serve(front, back_addr, coalesce));
            let client = crate::control_client().unwrap();
            for stream in [false, true] {
                let body = json!({
                    "model": crate::mock::MODEL,
                    "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]
                });
                let call = |addr: SocketAddr| {
                    client
                        .post(format!("http://{addr}/v1/chat/completions"))
                        .json(&body)
                        .send()
                };
                let direct = call(mock.addr).await.unwrap();
                let relayed = call(front_addr).await.unwrap();
                assert_eq!(relayed.status(), direct.status());
                assert_eq!(
                    relayed.headers().get("content-type"),
                    direct.headers().get("content-type")
                );
                let (direct, relayed) = (
                    direct.bytes().await.unwrap(),
                    relayed.bytes().await.unwrap(),
                );
                assert_eq!(relayed, direct, "stream: {stream}, coalescing: {coalesce}");
                if stream {
                    let events = relayed
                        .split(|b| *b == b'\n')
                        .filter(|l| l.starts_with(b"data: "))
                        .count();
                    assert_eq!(events, crate::mock::CHUNKS + 1, "20 chunks and [DONE]");
                }
            }
            // Every request of both went through the back hop to the mock.
            assert_eq!(mock.served.snapshot().get(crate::mock::MODEL), Some(&4));
        }
    }
}

/// The proxy floor of issue #20: one and two nginx reverse proxies chained in front of
/// the mock, measured in the same run as the relay. The relay crosses two hops (client →
/// gateway → publisher → upstream), so two production proxies chained are the honest
/// floor for its cost.
///
/// Two nginx instances, each its own master and `worker_processes auto` (one worker per
/// core, as the gateway has one thread per core), each in a temporary prefix with its
/// own config: keep-alive to its upstream (`keepalive`, HTTP/1.1, no `Connection`
/// header passed), keep-alive to clients without a request limit, access log off,
/// response buffering off (a streamed answer goes out chunk by chunk, as an LLM proxy
/// is set up). The *front* instance listens twice: one port proxies to the mock (one
/// hop), the other to the *back* instance, which proxies to the mock (two hops). The
/// CPU time of an instance is its master's and its workers' from `/proc`.
mod nginx {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use super::{BoxError, free_port, procfs};

    /// The `nginx` binary: on `PATH`, or in `/usr/sbin` (Debian's place, not on every
    /// user's `PATH`).
    pub(crate) fn find() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join("nginx"))
            .find(|bin| bin.is_file())
    }

    /// One nginx instance (master and workers), stopped when dropped.
    pub(crate) struct Instance {
        name: &'static str,
        bin: PathBuf,
        prefix: PathBuf,
        child: std::process::Child,
        /// The master and its workers.
        pids: Vec<String>,
    }

    impl Instance {
        /// Starts nginx in `prefix` with `servers`: each a port it listens on and the
        /// address it proxies to.
        fn start(
            name: &'static str,
            bin: &Path,
            prefix: PathBuf,
            servers: &[(u16, SocketAddr)],
        ) -> Result<Self, BoxError> {
            std::fs::create_dir_all(prefix.join("temp"))?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, config(bin, &prefix, servers))?;
            let log = std::fs::File::create(prefix.join("stderr.log"))?;
            let child = std::process::Command::new(bin)
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let mut instance = Instance {
                name,
                bin: bin.to_owned(),
                prefix,
                child,
                pids: Vec::new(),
            };
            instance.wait_listening(servers)?;
            Ok(instance)
        }

        /// Waits until every port accepts a connection, then notes the workers.
        fn wait_listening(&mut self, servers: &[(u16, SocketAddr)]) -> Result<(), BoxError> {
            let deadline = Instant::now() + Duration::from_secs(10);
            for (port, _) in servers {
                while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                    if let Some(status) = self.child.try_wait()? {
                        let log = std::fs::read_to_string(self.prefix.join("stderr.log"))
                            .unwrap_or_default();
                        return Err(
                            format!("nginx ({}) exited ({status}): {log}", self.name).into()
                        );
                    }
                    if Instant::now() > deadline {
                        return Err(
                            format!("nginx ({}) did not listen within 10 s", self.name).into()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // The master listens before it forks its workers: wait for them too.
            let master = self.child.id().to_string();
            let workers = loop {
                let workers = procfs::children(&master)?;
                if !workers.is_empty() {
                    break workers;
                }
                if Instant::now() > deadline {
                    return Err(format!("nginx ({}) has no worker process", self.name).into());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            self.pids = std::iter::once(master).chain(workers).collect();
            Ok(())
        }

        /// CPU time of the master and its workers.
        pub(crate) fn cpu(&self) -> Duration {
            self.pids
                .iter()
                .filter_map(|pid| procfs::cpu(pid).ok())
                .sum()
        }

        /// An error if the master has exited.
        pub(crate) fn check_running(&mut self) -> Result<(), BoxError> {
            match self.child.try_wait()? {
                None => Ok(()),
                Some(status) => Err(format!("nginx ({}) exited ({status})", self.name).into()),
            }
        }
    }

    impl Drop for Instance {
        /// `nginx -s stop` (the master stops its workers), or a kill when that fails.
        fn drop(&mut self) {
            let stopped = std::process::Command::new(&self.bin)
                .arg("-p")
                .arg(&self.prefix)
                .arg("-c")
                .arg(self.prefix.join("nginx.conf"))
                .args(["-s", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !stopped && let Err(e) = self.child.kill() {
                eprintln!("could not stop nginx ({}): {e}", self.name);
            }
            if let Err(e) = self.child.wait() {
                eprintln!("could not reap nginx ({}): {e}", self.name);
            }
        }
    }

    /// The config of an instance: `servers` as (listen port, upstream address).
    fn config(bin: &Path, prefix: &Path, servers: &[(u16, SocketAddr)]) -> String {
        let temp = prefix.join("temp");
        let temp = temp.display();
        // Temp paths for every module built in, so that nothing is created outside the
        // prefix (Debian's defaults are under /var/lib/nginx).
        let built = std::process::Command::new(bin)
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        let mut temps =
            format!("    client_body_temp_path {temp}/body;\n    proxy_temp_path {temp}/proxy;\n");
        for module in ["fastcgi", "uwsgi", "scgi"] {
            if !built.contains(&format!("--without-http_{module}_module")) {
                temps.push_str(&format!("    {module}_temp_path {temp}/{module};\n"));
            }
        }
        let mut blocks = String::new();
        for (i, (port, upstream)) in servers.iter().enumerate() {
            blocks.push_str(&format!(
                r#"    upstream u{i} {{
        server {upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://u{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
"#
            ));
        }
        format!(
            r#"daemon off;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
{temps}{blocks}}}
"#,
            prefix = prefix.display()
        )
    }

    /// The two instances and the addresses a client calls.
    pub(crate) struct Proxies {
        pub(crate) front: Instance,
        pub(crate) back: Instance,
        /// nginx → mock.
        pub(crate) one_hop: SocketAddr,
        /// nginx → nginx → mock.
        pub(crate) two_hops: SocketAddr,
    }

    /// Starts the front and back instances in `dir`, in front of `upstream`.
    pub(crate) fn start(bin: &Path, dir: &Path, upstream: SocketAddr) -> Result<Proxies, BoxError> {
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let back_port = free_port()?;
        let back = Instance::start(
            "back",
            bin,
            dir.join("nginx-back"),
            &[(back_port, upstream)],
        )?;
        let (one, two) = (free_port()?, free_port()?);
        let front = Instance::start(
            "front",
            bin,
            dir.join("nginx-front"),
            &[(one, upstream), (two, loopback(back_port))],
        )?;
        Ok(Proxies {
            front,
            back,
            one_hop: loopback(one),
            two_hops: loopback(two),
        })
    }
}

/// The mock OpenAI upstream: fixed answers from pre-built bytes, after `--mock-delay`.
mod mock {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Frame, Incoming};
    use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use serde_json::{Value, json};

    /// Chunks in a streamed answer, `data: [DONE]` not counted.
    pub(crate) const CHUNKS: usize = 20;
    /// The model name the mock reports.
    pub(crate) const MODEL: &str = "mock-model";
    /// A request for this model streams [`PACED_CHUNKS`] chunks, one every [`PACE`]
    /// (`--resume-cost`'s cut links: a stream long enough to cut in the middle).
    pub(crate) const PACED_MODEL: &str = "mock-paced";
    /// Chunks in a paced answer, `data: [DONE]` not counted; chunk `i` says `word{i} `.
    pub(crate) const PACED_CHUNKS: usize = 60;
    /// The time between two chunks of a paced answer.
    pub(crate) const PACE: Duration = Duration::from_millis(10);

    type Body = UnsyncBoxBody<Bytes, Infallible>;

    struct Answers {
        completion: Bytes,
        /// The stream's events, each a separate body frame, `[DONE]` last.
        events: Vec<Bytes>,
        /// How long to wait before answering (zero: at once).
        delay: Duration,
        /// Requests answered, by the `model` they asked for.
        served: Served,
    }

    /// Requests the mock answered, by the `model` of the request: the pool mode gives
    /// each member its own upstream model name to see how the gateway spread the load.
    #[derive(Clone, Default)]
    pub(crate) struct Served(Arc<Mutex<BTreeMap<String, u64>>>);

    impl Served {
        fn count(&self, model: &str) {
            let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            match counts.get_mut(model) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(model.to_owned(), 1);
                }
            }
        }

        /// The counts now.
        pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    /// A running mock.
    pub(crate) struct Mock {
        pub(crate) addr: SocketAddr,
        pub(crate) served: Served,
    }

    impl Answers {
        fn new(delay: Duration) -> Self {
            let completion = json!({
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": MODEL,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}
            });
            let mut events: Vec<Bytes> = (0..CHUNKS)
                .map(|i| {
                    let last = i + 1 == CHUNKS;
                    let chunk = json!({
                        "id": "chatcmpl-mock",
                        "object": "chat.completion.chunk",
                        "created": 1_700_000_000,
                        "model": MODEL,
                        "choices": [{
                            "index": 0,
                            "delta": {"content": format!("word{i} ")},
                            "finish_reason": if last { Value::from("stop") } else { Value::Null }
                        }]
                    });
                    Bytes::from(format!("data: {chunk}\n\n"))
                })
                .collect();
            events.push(Bytes::from_static(b"data: [DONE]\n\n"));
            Answers {
                completion: Bytes::from(completion.to_string()),
                events,
                delay,
                served: Served::default(),
            }
        }
    }

    /// Serves the mock on `127.0.0.1:0` on the current runtime, answering each request
    /// `delay` after it arrived.
    pub(crate) async fn start(delay: Duration) -> std::io::Result<Mock> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let answers = Arc::new(Answers::new(delay));
        let served = answers.served.clone();
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "mock: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "mock: no TCP_NODELAY");
                }
                let answers = answers.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| answer(request, answers.clone()));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(error = %e, "mock: connection ended with an error");
                    }
                });
            }
        });
        Ok(Mock { addr, served })
    }

    /// A streamed answer of [`PACED_CHUNKS`] chunks, one every [`PACE`], then `[DONE]`.
    fn paced() -> Response<Body> {
        let events = futures::stream::unfold(0usize, |i| async move {
            if i > PACED_CHUNKS {
                return None;
            }
            let event = if i == PACED_CHUNKS {
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                tokio::time::sleep(PACE).await;
                let chunk = json!({
                    "id": "chatcmpl-paced",
                    "object": "chat.completion.chunk",
                    "created": 1_700_000_000,
                    "model": PACED_MODEL,
                    "choices": [{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]
                });
                Bytes::from(format!("data: {chunk}\n\n"))
            };
            Some((Ok(Frame::data(event)), i + 1))
        });
        let mut response = Response::new(StreamBody::new(events).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    async fn answer(
        request: Request<Incoming>,
        answers: Arc<Answers>,
    ) -> Result<Response<Body>, Infallible> {
        let reply = |status: StatusCode, content_type: &'static str, frames: Vec<Bytes>| {
            let mut response = Response::new(
                StreamBody::new(futures::stream::iter(
                    frames
                        .into_iter()
                        .map(|b| Ok(Frame::data(b)))
                        .collect::<Vec<_>>(),
                ))
                .boxed_unsync(),
            );
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        };
        // The publisher probes its upstream's readiness with `GET {url}/models`, as it
        // would a real OpenAI server's.
        if request.method() == Method::GET && request.uri().path().ends_with("/models") {
            return Ok(reply(
                StatusCode::OK,
                "application/json",
                vec![Bytes::from_static(br#"{"object":"list","data":[]}"#)],
            ));
        }
        if !request.uri().path().ends_with("/chat/completions") {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                "application/json",
                vec![Bytes::from_static(br#"{"error":{"message":"not found"}}"#)],
            ));
        }
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return Ok(reply(
                    StatusCode::BAD_REQUEST,
                    "application/json",
                    vec![Bytes::from_static(br#"{"error":{"message":"bad body"}}"#)],
                ));
            }
        };
        let request = serde_json::from_slice::<Value>(&body).unwrap_or_default();
        let stream = request
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let model = request.get("model").and_then(Value::as_str).unwrap_or("");
        answers.served.count(model);
        if stream && model == PACED_MODEL {
            return Ok(paced());
        }
        if !answers.delay.is_zero() {
            // A timer, not a blocked thread: many answers wait at once.
            tokio::time::sleep(answers.delay).await;
        }
        if stream {
            let mut response = reply(StatusCode::OK, "text/event-stream", answers.events.clone());
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Ok(response)
        } else {
            Ok(reply(
                StatusCode::OK,
                "application/json",
                vec![answers.completion.clone()],
            ))
        }
    }
}

/// The closed-loop HTTP/1.1 load client.
mod load {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use hdrhistogram::Histogram;
    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http1::SendRequest;
    use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
    use hyper::{Method, Request};
    use hyper_util::rt::TokioIo;

    use super::{BoxError, duration_ns, histogram};

    /// What every request of a case is.
    pub(crate) struct Target {
        pub(crate) addr: SocketAddr,
        /// The request bodies, taken in turn: worker `w`'s `k`-th request sends
        /// `bodies[(w + k) % len]` (one body: every request the same).
        pub(crate) bodies: Vec<Bytes>,
        pub(crate) stream: bool,
        /// Streamed chunks each answer must carry (`[DONE]` not counted).
        pub(crate) chunks: usize,
        /// Requests per second over all workers, each worker paced to its share
        /// (`None`: each sends its next request as soon as the last is answered).
        pub(crate) rate: Option<f64>,
    }

    /// What a case measured, warm-up excluded.
    pub(crate) struct Outcome {
        /// Whole request, or time to the first chunk when streaming.
        pub(crate) latency: Histogram<u64>,
        pub(crate) requests: u64,
        pub(crate) errors: u64,
        /// The errors by kind: `429 queue_full` (status and the OpenAI error's `code`),
        /// or `transport` (no answer, a broken stream).
        pub(crate) errors_by_kind: BTreeMap<String, u64>,
        pub(crate) first_error: Option<String>,
        pub(crate) chunks: u64,
        /// From the end of the warm-up to the last answer.
        pub(crate) elapsed: Duration,
    }

    impl Outcome {
        pub(crate) fn rps(&self) -> f64 {
            self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
        }

        pub(crate) fn chunks_per_sec(&self) -> f64 {
            self.chunks as f64 / self.elapsed.as_secs_f64().max(1e-9)
        }

        fn empty() -> Result<Self, BoxError> {
            Ok(Outcome {
                latency: histogram()?,
                requests: 0,
                errors: 0,
                errors_by_kind: BTreeMap::new(),
                first_error: None,
                chunks: 0,
                elapsed: Duration::ZERO,
            })
        }
    }

    /// Why a request failed.
    enum Failure {
        /// The gateway answered with an error status: the connection is still good.
        Status { kind: String, text: String },
        /// No answer, or a broken one: the connection is dropped.
        Transport(BoxError),
    }

    impl From<BoxError> for Failure {
        fn from(e: BoxError) -> Self {
            Failure::Transport(e)
        }
    }

    impl From<hyper::Error> for Failure {
        fn from(e: hyper::Error) -> Self {
            Failure::Transport(e.into())
        }
    }

    impl From<hyper::http::Error> for Failure {
        fn from(e: hyper::http::Error) -> Self {
            Failure::Transport(e.into())
        }
    }

    /// Runs `concurrency` workers against `target` for `warmup + duration`, recording
    /// requests started after the warm-up. `at_measure_start` runs when the warm-up
    /// ends (CPU snapshots, the gateway's metrics), while the workers go on.
    pub(crate) async fn run(
        target: Arc<Target>,
        concurrency: usize,
        warmup: Duration,
        duration: Duration,
        at_measure_start: impl AsyncFnOnce(),
    ) -> Result<Outcome, BoxError> {
        let start = tokio::time::Instant::now();
        let measure_from = start + warmup;
        let until = measure_from + duration;
        let mut workers = tokio::task::JoinSet::new();
        let workers_n = concurrency.max(1);
        for index in 0..workers_n {
            // Paced workers start staggered, so that their requests spread evenly.
            let pace = target
                .rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(workers_n as f64 / r));
            let first = start.into_std()
                + pace.map_or(Duration::ZERO, |p| {
                    p.mul_f64(index as f64 / workers_n as f64)
                });
            workers.spawn(worker(
                target.clone(),
                index,
                pace.map(|p| (first, p)),
                measure_from.into_std(),
                until.into_std(),
            ));
        }
        tokio::time::sleep_until(measure_from).await;
        at_measure_start().await;
        let mut total = Outcome::empty()?;
        let mut finished = measure_from.into_std();
        while let Some(worker) = workers.join_next().await {
            let (outcome, done) = worker??;
            total.latency.add(&outcome.latency)?;
            total.requests += outcome.requests;
            total.errors += outcome.errors;
            for (kind, n) in outcome.errors_by_kind {
                *total.errors_by_kind.entry(kind).or_default() += n;
            }
            total.chunks += outcome.chunks;
            total.first_error = total.first_error.or(outcome.first_error);
            finished = finished.max(done);
        }
        total.elapsed = finished.saturating_duration_since(measure_from.into_std());
        Ok(total)
    }

    async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, BoxError> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "load client connection ended");
            }
        });
        Ok(sender)
    }

    async fn worker(
        target: Arc<Target>,
        index: usize,
        // When paced: the first request's time, then one every so often.
        pace: Option<(Instant, Duration)>,
        measure_from: Instant,
        until: Instant,
    ) -> Result<(Outcome, Instant), BoxError> {
        let mut outcome = Outcome::empty()?;
        let host = HeaderValue::from_str(&target.addr.to_string())?;
        let mut sender = None;
        let mut turn = index;
        let mut next = pace.map(|(first, _)| first);
        loop {
            if let (Some(at), Some((_, every))) = (next.as_mut(), pace) {
                // Only a slot still ahead is waited for: a timer whose time has come
                // still waits for the timer wheel's next tick, a millisecond.
                if *at > Instant::now() {
                    tokio::time::sleep_until((*at).into()).await;
                }
                // No burst to catch up: a late request moves the schedule.
                *at = (*at + every).max(Instant::now());
            }
            let started = Instant::now();
            if started >= until {
                break;
            }
            let measured = started >= measure_from;
            let result = match &mut sender {
                Some(sender) => {
                    turn = turn.wrapping_add(1);
                    let body = target
                        .bodies
                        .get(turn % target.bodies.len().max(1))
                        .cloned()
                        .unwrap_or_default();
                    once(sender, &target, body, &host, started).await
                }
                None => match connect(target.addr).await {
                    Ok(s) => {
                        sender = Some(s);
                        continue;
                    }
                    Err(e) => Err(Failure::Transport(e)),
                },
            };
            match result {
                Ok((latency, chunks)) if measured => {
                    outcome.latency.saturating_record(duration_ns(latency));
                    outcome.requests += 1;
                    outcome.chunks += chunks;
                }
                Ok(_) => {}
                Err(failure) => {
                    let (kind, text) = match failure {
                        Failure::Status { kind, text } => (kind, text),
                        Failure::Transport(e) => {
                            // Start over on a fresh connection.
                            sender = None;
                            ("transport".to_owned(), e.to_string())
                        }
                    };
                    if measured {
                        outcome.errors += 1;
                        *outcome.errors_by_kind.entry(kind).or_default() += 1;
                        outcome.first_error.get_or_insert(text);
                    }
                    // Pause before the next request, without spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Ok((outcome, Instant::now()))
    }

    /// One request; the latency (to the first chunk when streaming) and the chunks.
    async fn once(
        sender: &mut SendRequest<Full<Bytes>>,
        target: &Target,
        body: Bytes,
        host: &HeaderValue,
        started: Instant,
    ) -> Result<(Duration, u64), Failure> {
        sender.ready().await?;
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header(HOST, host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body.collect().await?.to_bytes();
            let code = serde_json::from_slice::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            return Err(Failure::Status {
                kind: match code {
                    Some(code) => format!("{} {code}", status.as_u16()),
                    None => status.as_u16().to_string(),
                },
                text: format!("{status}: {}", String::from_utf8_lossy(&text)),
            });
        }
        if !target.stream {
            body.collect().await?;
            return Ok((started.elapsed(), 0));
        }
        let mut first = None;
        let mut received = Vec::with_capacity(8 * 1024);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                received.extend_from_slice(&data);
                if first.is_none() && received.windows(5).any(|w| w == b"data:") {
                    first = Some(started.elapsed());
                }
            }
        }
        let text = String::from_utf8_lossy(&received);
        let mut chunks = 0;
        let mut done = false;
        for line in text.lines() {
            if line.starts_with("event: error") {
                return Err(Failure::Transport(
                    format!("the stream failed: {text}").into(),
                ));
            }
            if let Some(data) = line.strip_prefix("data:") {
                if data.trim() == "[DONE]" {
                    done = true;
                } else {
                    chunks += 1;
                }
            }
        }
        if !done || chunks != target.chunks {
            return Err(Failure::Transport(
                format!(
                    "expected {} chunks and [DONE], got {chunks} chunks{}",
                    target.chunks,
                    if done { "" } else { " and no [DONE]" }
                )
                .into(),
            ));
        }
        let first = first.ok_or_else(|| Failure::Transport("no chunk".into()))?;
        Ok((first, chunks as u64))
    }
}

/// The relay cases: direct against relayed, complete and streamed, per concurrency.
mod relay {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use comfy_table::Table;
    use serde_json::json;

    use super::{
        ASCII_MARKDOWN, Args, Binaries, BoxError, ChildGuard, GatewayChild, Interference, Kind,
        Transport, WorkDir, control_client, hop, load, mock, ms, ms_diff, nginx,
        print_interference, procfs, progress, spawn_publisher,
    };

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum Route {
        Direct,
        /// Through this many nginx reverse proxies (1 or 2): the proxy floor.
        Nginx(u8),
        /// Through two hops of the cheapest proxy hyper allows (`--hyper-hops`), which
        /// join a stream's frames ready together when `true`.
        HyperHops(bool),
        Relayed(Transport),
        /// Relayed through a publisher that does not resume (`--no-resume`).
        RelayedNoResume(Transport),
    }

    /// The proxy floor every figure is compared with: two nginx hops.
    const FLOOR: Route = Route::Nginx(2);

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct Case {
        route: Route,
        kind: Kind,
        concurrency: usize,
    }

    impl Case {
        fn label(&self) -> String {
            let route = match self.route {
                Route::Direct => "direct".to_owned(),
                Route::Nginx(1) => "nginx, one hop".to_owned(),
                Route::Nginx(_) => "nginx, two hops".to_owned(),
                Route::HyperHops(false) => "hyper, two hops".to_owned(),
                Route::HyperHops(true) => "hyper, two hops, coalescing".to_owned(),
                Route::Relayed(t) => format!("relayed {}", t.name()),
                Route::RelayedNoResume(t) => format!("relayed {}, no resume", t.name()),
            };
            match self.kind {
                Kind::Complete => route,
                Kind::Stream => format!("{route}, stream"),
            }
        }
    }

    /// CPU time of the processes over the measured part of a case.
    #[derive(Clone, Copy, Debug, Default)]
    struct Cpu {
        gateway: Duration,
        /// The publisher of the case's transport.
        publisher: Duration,
        /// Every publisher (the other transport's is idle).
        publishers: Duration,
        /// The front nginx instance (the first hop of both nginx routes).
        nginx_front: Duration,
        /// The back nginx instance (the second hop of two).
        nginx_back: Duration,
        /// The hyper hops, front and back (`--hyper-hops`: both variants, one idle).
        hyper_front: Duration,
        hyper_back: Duration,
        /// The load client and the mock.
        loadgen: Duration,
        /// The whole machine.
        machine: procfs::Machine,
    }

    impl Cpu {
        fn since(&self, before: &Cpu) -> Cpu {
            Cpu {
                gateway: self.gateway.saturating_sub(before.gateway),
                publisher: self.publisher.saturating_sub(before.publisher),
                publishers: self.publishers.saturating_sub(before.publishers),
                nginx_front: self.nginx_front.saturating_sub(before.nginx_front),
                nginx_back: self.nginx_back.saturating_sub(before.nginx_back),
                hyper_front: self.hyper_front.saturating_sub(before.hyper_front),
                hyper_back: self.hyper_back.saturating_sub(before.hyper_back),
                loadgen: self.loadgen.saturating_sub(before.loadgen),
                machine: self.machine.since(&before.machine),
            }
        }

        /// What processes other than these took: a concurrent build, say.
        fn others(&self) -> Duration {
            self.machine.tasks.saturating_sub(
                self.gateway
                    + self.publishers
                    + self.nginx_front
                    + self.nginx_back
                    + self.hyper_front
                    + self.hyper_back
                    + self.loadgen
                    + self.machine.softirqd,
            )
        }

        /// The CPU time of the case's first and second hop: the gateway and the
        /// publisher when relayed, the nginx instances when proxied.
        fn hops(&self, route: Route) -> Option<(Duration, Duration)> {
            match route {
                Route::Direct => None,
                Route::Nginx(1) => Some((self.nginx_front, Duration::ZERO)),
                Route::Nginx(_) => Some((self.nginx_front, self.nginx_back)),
                Route::HyperHops(_) => Some((self.hyper_front, self.hyper_back)),
                Route::Relayed(_) | Route::RelayedNoResume(_) => {
                    Some((self.gateway, self.publisher))
                }
            }
        }
    }

    struct Measured {
        case: Case,
        outcome: load::Outcome,
        cpu: Cpu,
    }

    /// The publisher child of one transport and the LLM it publishes.
    pub(crate) struct PublisherChild {
        pub(crate) guard: ChildGuard,
        pub(crate) llm: String,
    }

    pub(crate) async fn run(args: &Args, bins: &Binaries) -> Result<(), BoxError> {
        let dir = WorkDir::new(args.keep)?;
        let http = control_client()?;
        let upstream = mock::start(args.mock_delay).await?.addr;
        let mut proxies = if args.no_nginx || args.relayed_only {
            None
        } else if let Some(bin) = nginx::find() {
            Some(nginx::start(&bin, dir.path(), upstream)?)
        } else {
            println!(
                "note: nginx is not installed (Debian: `apt-get install nginx-light`): no proxy floor in this run\n"
            );
            None
        };
        let mut hyper_hops = if args.hyper_hops && !args.relayed_only {
            Some([
                hop::start(dir.path(), upstream, false).await?,
                hop::start(dir.path(), upstream, true).await?,
            ])
        } else {
            None
        };
        let mut gateway = GatewayChild::start(bins, dir.path(), &http).await?;
        let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
        let mut publishers: Vec<(Transport, PublisherChild)> = Vec::new();
        for &transport in &args.transports {
            let child = start_publisher(
                bins,
                dir.path(),
                &http,
                &gateway,
                transport,
                upstream,
                max_concurrency,
                true,
            )
            .await?;
            publishers.push((transport, child));
        }
        let mut plain_publishers: Vec<(Transport, PublisherChild)> = Vec::new();
        if args.resume_cost {
            for &transport in &args.transports {
                let child = start_publisher(
                    bins,
                    dir.path(),
                    &http,
                    &gateway,
                    transport,
                    upstream,
                    max_concurrency,
                    false,
                )
                .await?;
                plain_publishers.push((transport, child));
            }
        }

        let mut cases = Vec::new();
        for &concurrency in &args.concurrency {
            for &kind in &args.kinds {
                if !args.relayed_only {
                    cases.push(Case {
                        route: Route::Direct,
                        kind,
                        concurrency,
                    });
                }
                if proxies.is_some() {
                    for hops in [1, 2] {
                        cases.push(Case {
                            route: Route::Nginx(hops),
                            kind,
                            concurrency,
                        });
                    }
                }
                if hyper_hops.is_some() {
                    for coalesce in [false, true] {
                        cases.push(Case {
                            route: Route::HyperHops(coalesce),
                            kind,
                            concurrency,
                        });
                    }
                }
                for &transport in &args.transports {
                    let case = |route| Case {
                        route,
                        kind,
                        concurrency,
                    };
                    cases.push(case(Route::Relayed(transport)));
                    if args.resume_cost {
                        cases.push(case(Route::RelayedNoResume(transport)));
                        cases.push(case(Route::RelayedNoResume(transport)));
                        cases.push(case(Route::Relayed(transport)));
                    }
                }
            }
        }
        let per_case = args.warmup + args.duration;
        let runs = cases.len() * usize::from(args.rounds);
        println!(
            "relay cases: {} × {} round(s) × ({:?} warm-up + {:?} measured) ≈ {:?}\n",
            cases.len(),
            args.rounds,
            args.warmup,
            args.duration,
            per_case * u32::try_from(runs).unwrap_or(u32::MAX)
        );
        let bar = progress(
            runs as u64,
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )?;
        let gateway_pid = gateway.pid();
        let publisher_pids: Vec<String> = publishers
            .iter()
            .chain(&plain_publishers)
            .map(|(_, p)| p.guard.pid())
            .collect();
        let mut rounds: Vec<Vec<Measured>> = Vec::new();
        for round in 1..=args.rounds {
            let mut results = Vec::new();
            for &case in &cases {
                bar.set_message(format!(
                    "{} c={} (round {round} of {})",
                    case.label(),
                    case.concurrency,
                    args.rounds
                ));
                let (addr, model, publisher_pid) = match case.route {
                    Route::Direct => (upstream, mock::MODEL.to_owned(), None),
                    Route::Nginx(hops) => {
                        let p = proxies.as_mut().ok_or("no nginx")?;
                        p.front.check_running()?;
                        p.back.check_running()?;
                        let addr = if hops == 1 { p.one_hop } else { p.two_hops };
                        (addr, mock::MODEL.to_owned(), None)
                    }
                    Route::HyperHops(coalesce) => {
                        let h =
                            &mut hyper_hops.as_mut().ok_or("no hyper hops")?[usize::from(coalesce)];
                        h.front.check_running()?;
                        h.back.check_running()?;
                        (h.two_hops, mock::MODEL.to_owned(), None)
                    }
                    Route::Relayed(t) | Route::RelayedNoResume(t) => {
                        let pool = if matches!(case.route, Route::Relayed(_)) {
                            &mut publishers
                        } else {
                            &mut plain_publishers
                        };
                        let (_, p) = pool
                            .iter_mut()
                            .find(|(pt, _)| *pt == t)
                            .ok_or("no publisher")?;
                        p.guard.check_running()?;
                        gateway.guard.check_running()?;
                        (gateway.addr, p.llm.clone(), Some(p.guard.pid()))
                    }
                };
                let stream = case.kind == Kind::Stream;
                let body = json!({
                    "model": model,
                    "stream": stream,
                    "max_tokens": 32,
                    "messages": [{"role": "user", "content": "Say hello in a few words."}]
                });
                let target = Arc::new(load::Target {
                    addr,
                    bodies: vec![Bytes::from(body.to_string())],
                    stream,
                    chunks: mock::CHUNKS,
                    rate: None,
                });
                let sample = || Cpu {
                    gateway: procfs::cpu(&gateway_pid).unwrap_or_default(),
                    publisher: publisher_pid
                        .as_deref()
                        .and_then(|pid| procfs::cpu(pid).ok())
                        .unwrap_or_default(),
                    publishers: publisher_pids
                        .iter()
                        .filter_map(|pid| procfs::cpu(pid).ok())
                        .sum(),
                    nginx_front: proxies.as_ref().map(|p| p.front.cpu()).unwrap_or_default(),
                    nginx_back: proxies.as_ref().map(|p| p.back.cpu()).unwrap_or_default(),
                    hyper_front: hyper_hops.iter().flatten().map(|h| h.cpu().0).sum(),
                    hyper_back: hyper_hops.iter().flatten().map(|h| h.cpu().1).sum(),
                    loadgen: procfs::cpu("self").unwrap_or_default(),
                    machine: procfs::machine().unwrap_or_default(),
                };
                let mut before = Cpu::default();
                let outcome = load::run(
                    target,
                    case.concurrency,
                    args.warmup,
                    args.duration,
                    async || before = sample(),
                )
                .await?;
                let cpu = sample().since(&before);
                bar.println(format!(
                    "{:<22} c={:<3} {:>8.0} req/s  p50 {} ms  p99 {} ms  errors {}",
                    case.label(),
                    case.concurrency,
                    outcome.rps(),
                    ms(outcome.latency.value_at_quantile(0.5)),
                    ms(outcome.latency.value_at_quantile(0.99)),
                    outcome.errors
                ));
                results.push(Measured { case, outcome, cpu });
                // A child that died makes every later case fail: stop with its log.
                gateway.guard.check_running()?;
                for (_, p) in publishers.iter_mut().chain(&mut plain_publishers) {
                    p.guard.check_running()?;
                }
                bar.inc(1);
            }
            rounds.push(results);
        }
        bar.finish_and_clear();

        if rounds.len() > 1 {
            print_rounds(&rounds);
        }
        let results = median_rounds(rounds);
        print_table(&results);
        print_floor(&results);
        if args.resume_cost {
            print_resume_cost(&results);
            super::flap::run(
                bins,
                dir.path(),
                &http,
                &gateway,
                upstream,
                &args.transports,
            )
            .await?;
        }
        let gateway_usage = procfs::usage(&gateway_pid)?;
        println!(
            "\ngateway: {:.2} CPU s over the run, peak RSS {:.1} MiB (RSS now {:.1} MiB)",
            gateway_usage.cpu.as_secs_f64(),
            gateway_usage.hwm_kib as f64 / 1024.0,
            gateway_usage.rss_kib as f64 / 1024.0,
        );
        for (transport, p) in &publishers {
            let usage = procfs::usage(&p.guard.pid())?;
            println!(
                "publisher ({}): {:.2} CPU s, peak RSS {:.1} MiB",
                transport.name(),
                usage.cpu.as_secs_f64(),
                usage.hwm_kib as f64 / 1024.0,
            );
        }
        let own = procfs::usage("self")?;
        println!(
            "loadgen (load client + mock): {:.2} CPU s, peak RSS {:.1} MiB",
            own.cpu.as_secs_f64(),
            own.hwm_kib as f64 / 1024.0
        );
        for m in &results {
            if let Some(e) = &m.outcome.first_error {
                println!(
                    "first error of {} c={}: {e}",
                    m.case.label(),
                    m.case.concurrency
                );
            }
        }
        let interference: Vec<Interference> = results
            .iter()
            .map(|m| Interference {
                case: format!("{} c={}", m.case.label(), m.case.concurrency),
                others: m.cpu.others(),
                machine: m.cpu.machine,
                elapsed: m.outcome.elapsed,
            })
            .collect();
        print_interference(&interference);
        print_targets(args, &results);
        Ok(())
    }

    /// A publisher child relaying `bench-<transport>` to the mock, resuming or not
    /// (`--no-resume`, for `--resume-cost`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start_publisher(
        bins: &Binaries,
        dir: &std::path::Path,
        http: &reqwest::Client,
        gateway: &GatewayChild,
        transport: Transport,
        upstream: std::net::SocketAddr,
        max_concurrency: usize,
        resume: bool,
    ) -> Result<PublisherChild, BoxError> {
        let tag = if resume {
            transport.name().to_owned()
        } else {
            format!("{}-no-resume", transport.name())
        };
        let llm = format!("bench-{tag}");
        let providers = json!([{
            "name": llm,
            "type": "openai",
            "model": mock::MODEL,
            "url": format!("http://{upstream}/v1"),
            "publish": true
        }]);
        // Never queue inside the publisher: every client request runs at once.
        let guard = spawn_publisher(
            bins,
            dir,
            http,
            &gateway.url,
            transport,
            &tag,
            &providers,
            max_concurrency,
            std::slice::from_ref(&llm),
            !resume,
        )
        .await?;
        Ok(PublisherChild { guard, llm })
    }

    /// Issue #16's table: each relayed case against the same case through a publisher
    /// that does not resume, measured in the same run, once in each order (the first
    /// measure of each with the first of the other, the second with the second), and
    /// both orders together.
    fn print_resume_cost(results: &[Measured]) {
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "case",
            "c",
            "order",
            "req/s with resume / without",
            "chunks/s with resume / without",
            "p50 ms with / without",
        ]);
        let same = |a: &Case, b: &Case| a.kind == b.kind && a.concurrency == b.concurrency;
        let ratio = |with: f64, without: f64| {
            format!("{with:.0} / {without:.0} = {:.3}", with / without.max(1e-9))
        };
        let mut done: Vec<&Case> = Vec::new();
        for m in results {
            let Route::Relayed(t) = m.case.route else {
                continue;
            };
            if done
                .iter()
                .any(|d| d.route == m.case.route && same(d, &m.case))
            {
                continue;
            }
            done.push(&m.case);
            let of = |route| -> Vec<&Measured> {
                results
                    .iter()
                    .filter(|o| o.case.route == route && same(&o.case, &m.case))
                    .collect()
            };
            let (with, without) = (of(Route::Relayed(t)), of(Route::RelayedNoResume(t)));
            let rows = with.iter().zip(&without).enumerate();
            let mut totals = [0.0f64; 4];
            for (i, (w, o)) in rows {
                let (w, o) = (&w.outcome, &o.outcome);
                totals[0] += w.rps();
                totals[1] += o.rps();
                totals[2] += w.chunks_per_sec();
                totals[3] += o.chunks_per_sec();
                let chunks = if m.case.kind == Kind::Stream {
                    ratio(w.chunks_per_sec(), o.chunks_per_sec())
                } else {
                    "–".to_owned()
                };
                table.add_row(vec![
                    m.case.label(),
                    m.case.concurrency.to_string(),
                    if i == 0 {
                        "with first"
                    } else {
                        "without first"
                    }
                    .to_owned(),
                    ratio(w.rps(), o.rps()),
                    chunks,
                    format!(
                        "{} / {}",
                        ms(w.latency.value_at_quantile(0.5)),
                        ms(o.latency.value_at_quantile(0.5))
                    ),
                ]);
            }
            if with.len() > 1 && without.len() > 1 {
                let chunks = if m.case.kind == Kind::Stream {
                    ratio(totals[2], totals[3])
                } else {
                    "–".to_owned()
                };
                table.add_row(vec![
                    m.case.label(),
                    m.case.concurrency.to_string(),
                    "both (sums)".to_owned(),
                    ratio(totals[0], totals[1]),
                    chunks,
                    "".to_owned(),
                ]);
            }
        }
        println!(
            "
Resume cost (issue #16), same run:

{table}"
        );
    }

    fn cpu_per_request(cpu: Duration, requests: u64) -> String {
        if requests == 0 {
            return "–".into();
        }
        format!("{:.0}", cpu.as_secs_f64() * 1e6 / requests as f64)
    }

    fn print_table(results: &[Measured]) {
        let direct = |case: &Case| {
            results.iter().find(|m| {
                m.case.route == Route::Direct
                    && m.case.kind == case.kind
                    && m.case.concurrency == case.concurrency
            })
        };
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "case",
            "c",
            "req/s",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p99 ms",
            "rps ratio",
            "chunks/s",
            "hop 1 CPU µs/req",
            "hop 2 CPU µs/req",
            "loadgen CPU µs/req",
            "kernel network CPU µs/req",
            "errors",
        ]);
        for m in results {
            let o = &m.outcome;
            let (p50, p99) = (
                o.latency.value_at_quantile(0.5),
                o.latency.value_at_quantile(0.99),
            );
            let (added50, added99, ratio) = match (m.case.route, direct(&m.case)) {
                (
                    Route::Relayed(_)
                    | Route::RelayedNoResume(_)
                    | Route::Nginx(_)
                    | Route::HyperHops(_),
                    Some(d),
                ) => (
                    ms_diff(p50, d.outcome.latency.value_at_quantile(0.5)),
                    ms_diff(p99, d.outcome.latency.value_at_quantile(0.99)),
                    format!("{:.2}", o.rps() / d.outcome.rps().max(1e-9)),
                ),
                _ => ("–".into(), "–".into(), "–".into()),
            };
            let label = match m.case.kind {
                Kind::Complete => m.case.label(),
                Kind::Stream => format!("{} (first chunk)", m.case.label()),
            };
            table.add_row(vec![
                label,
                m.case.concurrency.to_string(),
                format!("{:.0}", o.rps()),
                ms(p50),
                ms(p99),
                added50,
                added99,
                ratio,
                if m.case.kind == Kind::Stream {
                    format!("{:.0}", o.chunks_per_sec())
                } else {
                    "–".into()
                },
                match m.cpu.hops(m.case.route) {
                    Some((hop, _)) => cpu_per_request(hop, o.requests),
                    None => "–".into(),
                },
                match m.cpu.hops(m.case.route) {
                    Some((_, hop)) if m.case.route != Route::Nginx(1) => {
                        cpu_per_request(hop, o.requests)
                    }
                    _ => "–".into(),
                },
                cpu_per_request(m.cpu.loadgen, o.requests),
                cpu_per_request(m.cpu.machine.network(), o.requests),
                o.errors.to_string(),
            ]);
        }
        println!("{table}");
        println!(
            "\nhop 1: the gateway (relayed) or the first nginx; hop 2: the publisher or the second nginx."
        );
    }

    /// Added p50 (over direct, same concurrency and kind) in nanoseconds.
    fn added_p50(results: &[Measured], m: &Measured) -> Option<f64> {
        let d = results.iter().find(|d| {
            d.case.route == Route::Direct
                && d.case.kind == m.case.kind
                && d.case.concurrency == m.case.concurrency
        })?;
        Some(
            m.outcome.latency.value_at_quantile(0.5) as f64
                - d.outcome.latency.value_at_quantile(0.5) as f64,
        )
    }

    /// Both hops' CPU per request, µs.
    fn hops_per_request(m: &Measured) -> Option<f64> {
        let (a, b) = m.cpu.hops(m.case.route)?;
        (m.outcome.requests > 0).then(|| (a + b).as_secs_f64() * 1e6 / m.outcome.requests as f64)
    }

    /// The floor measured among `results` for `case`: two nginx hops, same kind and
    /// concurrency.
    fn floor_of<'a>(results: &'a [Measured], case: &Case) -> Option<&'a Measured> {
        results.iter().find(|m| {
            m.case.route == FLOOR
                && m.case.kind == case.kind
                && m.case.concurrency == case.concurrency
        })
    }

    /// Every case against the proxy floor, two nginx hops at the same concurrency and
    /// kind (issue #20): added p50, req/s, chunks/s and both hops' CPU per request,
    /// each with its ratio to the floor's.
    fn print_floor(results: &[Measured]) {
        let floor = |case: &Case| floor_of(results, case);
        if !results.iter().any(|m| m.case.route == FLOOR) {
            return;
        }
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let fmt = |v: Option<f64>, scale: f64, digits: usize| {
            v.map_or("–".into(), |v| format!("{:.*}", digits, v / scale))
        };
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "case",
            "c",
            "added p50 ms",
            "× floor",
            "req/s",
            "× floor",
            "chunks/s",
            "× floor",
            "CPU µs/req, both hops",
            "× floor",
        ]);
        for m in results.iter().filter(|m| m.case.route != Route::Direct) {
            let Some(f) = floor(&m.case) else { continue };
            let stream = m.case.kind == Kind::Stream;
            let chunks = |m: &Measured| stream.then(|| m.outcome.chunks_per_sec());
            let label = match m.case.kind {
                Kind::Complete => m.case.label(),
                Kind::Stream => format!("{} (first chunk)", m.case.label()),
            };
            table.add_row(vec![
                label,
                m.case.concurrency.to_string(),
                fmt(added_p50(results, m), 1e6, 3),
                ratio(added_p50(results, m), added_p50(results, f)),
                format!("{:.0}", m.outcome.rps()),
                ratio(Some(m.outcome.rps()), Some(f.outcome.rps())),
                fmt(chunks(m), 1.0, 0),
                ratio(chunks(m), chunks(f)),
                fmt(hops_per_request(m), 1.0, 0),
                ratio(hops_per_request(m), hops_per_request(f)),
            ]);
        }
        println!(
            "\nagainst the proxy floor (two nginx hops, same concurrency and kind):\n\n{table}"
        );
    }

    /// The median of `values` (of an even number, the mean of the two in the middle);
    /// `None` when there are none.
    fn median(mut values: Vec<f64>) -> Option<f64> {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(values[n / 2]),
            _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
        }
    }

    /// One case's ratios to the floor measured in the same round, round by round.
    struct RoundRatios {
        case: Case,
        /// Added p50 over the floor's added p50.
        latency: Vec<f64>,
        /// req/s over the floor's req/s (for a stream, also its chunks/s ratio).
        rps: Vec<f64>,
        /// Both hops' CPU per request over the floor's.
        cpu: Vec<f64>,
    }

    /// Each case but direct and the floor, against the floor (same kind and
    /// concurrency) measured in the same round: a ratio of two cases measured a few
    /// seconds apart shares their round's state of the machine, which a ratio of two
    /// medians taken separately would not. The rounds hold the same cases in the same
    /// order; a ratio that cannot be taken (no floor, nothing measured) is left out.
    fn same_round_ratios(rounds: &[Vec<Measured>]) -> Vec<RoundRatios> {
        let Some(first) = rounds.first() else {
            return Vec::new();
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        first
            .iter()
            .enumerate()
            .filter(|(_, m)| m.case.route != Route::Direct && m.case.route != FLOOR)
            .map(|(i, m)| {
                let mut ratios = RoundRatios {
                    case: m.case,
                    latency: Vec::new(),
                    rps: Vec::new(),
                    cpu: Vec::new(),
                };
                for round in rounds {
                    let Some(m) = round.get(i).filter(|r| r.case == m.case) else {
                        continue;
                    };
                    let Some(f) = floor_of(round, &m.case) else {
                        continue;
                    };
                    ratios
                        .latency
                        .extend(ratio(added_p50(round, m), added_p50(round, f)));
                    ratios
                        .rps
                        .extend(ratio(Some(m.outcome.rps()), Some(f.outcome.rps())));
                    ratios
                        .cpu
                        .extend(ratio(hops_per_request(m), hops_per_request(f)));
                }
                ratios
            })
            .collect()
    }

    /// With `--rounds`: [`same_round_ratios`], round by round, and their medians.
    fn print_rounds(rounds: &[Vec<Measured>]) {
        let ratios = same_round_ratios(rounds);
        if ratios.is_empty() || !rounds.iter().flatten().any(|m| m.case.route == FLOOR) {
            return;
        }
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "case",
            "c",
            "added p50 × floor, by round",
            "median",
            "req/s × floor, by round",
            "median",
            "CPU µs/req × floor, by round",
            "median",
        ]);
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let med = |v: &[f64]| median(v.to_vec()).map_or("–".into(), |x| format!("{x:.2}"));
        for r in &ratios {
            let label = match r.case.kind {
                Kind::Complete => r.case.label(),
                Kind::Stream => format!("{} (first chunk; chunks/s as req/s)", r.case.label()),
            };
            table.add_row(vec![
                label,
                r.case.concurrency.to_string(),
                list(&r.latency),
                med(&r.latency),
                list(&r.rps),
                med(&r.rps),
                list(&r.cpu),
                med(&r.cpu),
            ]);
        }
        println!(
            "against the proxy floor measured in the same round ({} rounds; a stream's chunks/s ratio is its req/s ratio):\n\n{table}\n",
            rounds.len()
        );
        println!("the tables below give each case's median round by req/s\n");
    }

    /// Each case's median round by req/s (of an even number of rounds, the slower of
    /// the two in the middle): the rounds hold the same cases in the same order.
    fn median_rounds(rounds: Vec<Vec<Measured>>) -> Vec<Measured> {
        let n = rounds.first().map_or(0, Vec::len);
        let mut by_case: Vec<Vec<Measured>> = (0..n).map(|_| Vec::new()).collect();
        for round in rounds {
            for (i, m) in round.into_iter().enumerate() {
                if let Some(case) = by_case.get_mut(i) {
                    case.push(m);
                }
            }
        }
        by_case
            .into_iter()
            .filter_map(|mut runs| {
                runs.sort_by(|a, b| a.outcome.rps().total_cmp(&b.outcome.rps()));
                let middle = runs.len().checked_sub(1)? / 2;
                Some(runs.swap_remove(middle))
            })
            .collect()
    }

    /// The issue's targets, against what this run measured.
    fn print_targets(args: &Args, results: &[Measured]) {
        let find = |route: Route, kind: Kind, c: usize| {
            results
                .iter()
                .find(|m| m.case.route == route && m.case.kind == kind && m.case.concurrency == c)
        };
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec!["target", "measured", "met"]);
        let mut row = |target: String, measured: String, met: bool| {
            table.add_row(vec![
                target,
                measured,
                if met { "yes" } else { "no" }.to_owned(),
            ]);
        };
        for &t in &args.transports {
            let (p50_target, rps_target) = match t {
                Transport::Sse => (0.3, 5_000.0),
                Transport::Ws => (0.15, 10_000.0),
            };
            if let (Some(r), Some(d)) = (
                find(Route::Relayed(t), Kind::Complete, 1),
                find(Route::Direct, Kind::Complete, 1),
            ) {
                let added = |q: f64| {
                    (r.outcome.latency.value_at_quantile(q) as f64
                        - d.outcome.latency.value_at_quantile(q) as f64)
                        / 1e6
                };
                row(
                    format!("{}: added p50 at c=1 ≤ {p50_target} ms", t.name()),
                    format!("{:.3} ms", added(0.5)),
                    added(0.5) <= p50_target,
                );
                row(
                    format!("{}: added p99 at c=1 ≤ 1 ms", t.name()),
                    format!("{:.3} ms", added(0.99)),
                    added(0.99) <= 1.0,
                );
            }
            if let Some(r) = find(Route::Relayed(t), Kind::Complete, 64) {
                row(
                    format!("{}: relayed req/s at c=64 ≥ {rps_target}", t.name()),
                    format!("{:.0}", r.outcome.rps()),
                    r.outcome.rps() >= rps_target,
                );
            }
            if let Some(best) = results
                .iter()
                .filter(|m| m.case.route == Route::Relayed(t) && m.case.kind == Kind::Stream)
                .max_by(|a, b| {
                    a.outcome
                        .chunks_per_sec()
                        .total_cmp(&b.outcome.chunks_per_sec())
                })
            {
                row(
                    format!("{}: streamed chunks/s ≥ 100000", t.name()),
                    format!(
                        "{:.0} (c={})",
                        best.outcome.chunks_per_sec(),
                        best.case.concurrency
                    ),
                    best.outcome.chunks_per_sec() >= 100_000.0,
                );
            }
        }
        // Issue #20: the relay against two nginx hops, as ratios in this run.
        for &t in &args.transports {
            let (p50_ratio, rps_ratio) = match t {
                Transport::Sse => (2.0, 0.75),
                Transport::Ws => (1.5, 1.0),
            };
            let relayed = Route::Relayed(t);
            if let (Some(r), Some(f)) = (
                find(relayed, Kind::Complete, 1),
                find(FLOOR, Kind::Complete, 1),
            ) && let (Some(a), Some(b)) = (added_p50(results, r), added_p50(results, f))
            {
                let x = a / b.max(1.0);
                row(
                    format!(
                        "{}: added p50 at c=1 ≤ {p50_ratio}× two nginx hops",
                        t.name()
                    ),
                    format!("{x:.2}× ({:.3} / {:.3} ms)", a / 1e6, b / 1e6),
                    x <= p50_ratio,
                );
            }
            if let (Some(r), Some(f)) = (
                find(relayed, Kind::Complete, 64),
                find(FLOOR, Kind::Complete, 64),
            ) {
                let x = r.outcome.rps() / f.outcome.rps().max(1e-9);
                row(
                    format!("{}: req/s at c=64 ≥ {rps_ratio}× two nginx hops", t.name()),
                    format!("{x:.2}× ({:.0} / {:.0})", r.outcome.rps(), f.outcome.rps()),
                    x >= rps_ratio,
                );
            }
            // Streaming at the highest concurrency both measured.
            let c = args.concurrency.iter().copied().max().unwrap_or(1);
            if let (Some(r), Some(f)) =
                (find(relayed, Kind::Stream, c), find(FLOOR, Kind::Stream, c))
            {
                let x = r.outcome.chunks_per_sec() / f.outcome.chunks_per_sec().max(1e-9);
                row(
                    format!("{}: chunks/s ≥ 0.8× two nginx hops (c={c})", t.name()),
                    format!(
                        "{x:.2}× ({:.0} / {:.0})",
                        r.outcome.chunks_per_sec(),
                        f.outcome.chunks_per_sec()
                    ),
                    x >= 0.8,
                );
            }
            if let (Some(r), Some(f)) = (
                find(relayed, Kind::Complete, 64),
                find(FLOOR, Kind::Complete, 64),
            ) && let (Some(a), Some(b)) = (hops_per_request(r), hops_per_request(f))
            {
                let gateway = r.cpu.gateway.as_secs_f64() * 1e6 / r.outcome.requests.max(1) as f64;
                let front =
                    f.cpu.nginx_front.as_secs_f64() * 1e6 / f.outcome.requests.max(1) as f64;
                row(
                    format!(
                        "{}: CPU per request at c=64, beside two nginx hops (reported)",
                        t.name()
                    ),
                    format!(
                        "gateway {gateway:.0} µs, both hops {a:.0} µs; nginx first hop {front:.0} µs, both {b:.0} µs ({:.2}×)",
                        a / b.max(1e-9)
                    ),
                    true,
                );
            }
        }
        println!("\ntargets:\n\n{table}");
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]

        use super::*;

        /// A case measured as `requests` answered in one second, half of them at
        /// `p50_us` and half just above it, its hops taking `cpu_us` µs each per request.
        fn measured(route: Route, requests: u64, p50_us: u64, cpu_us: u64) -> Measured {
            let mut latency = crate::histogram().unwrap();
            latency.record_n(p50_us * 1_000, requests / 2).unwrap();
            latency
                .record_n(p50_us * 1_000 + 1_000, requests - requests / 2)
                .unwrap();
            let cpu_per = Duration::from_micros(cpu_us * requests);
            let cpu = Cpu {
                gateway: cpu_per,
                publisher: cpu_per,
                nginx_front: cpu_per,
                nginx_back: cpu_per,
                ..Cpu::default()
            };
            Measured {
                case: Case {
                    route,
                    kind: Kind::Complete,
                    concurrency: 64,
                },
                outcome: load::Outcome {
                    latency,
                    requests,
                    errors: 0,
                    errors_by_kind: Default::default(),
                    first_error: None,
                    chunks: 0,
                    elapsed: Duration::from_secs(1),
                },
                cpu,
            }
        }

        /// One round: direct, the floor and the relay, with these req/s and p50s.
        fn round(floor: (u64, u64), relayed: (u64, u64, u64)) -> Vec<Measured> {
            vec![
                measured(Route::Direct, 50_000, 100, 0),
                measured(FLOOR, floor.0, floor.1, 20),
                measured(
                    Route::Relayed(Transport::Ws),
                    relayed.0,
                    relayed.1,
                    relayed.2,
                ),
            ]
        }

        #[test]
        fn a_ratio_pairs_each_case_with_the_floor_of_its_own_round() {
            let rounds = [
                round((40_000, 200), (32_000, 250, 22)),
                round((20_000, 300), (18_000, 500, 30)),
            ];
            let ratios = same_round_ratios(&rounds);
            assert_eq!(ratios.len(), 1, "direct and the floor are not compared");
            let r = &ratios[0];
            assert_eq!(r.case.route, Route::Relayed(Transport::Ws));
            // 32 000 / 40 000 and 18 000 / 20 000: not 32 000 / 20 000.
            assert_eq!(r.rps, vec![0.8, 0.9]);
            // Added p50 (over direct's 100 µs): 150 / 100 and 400 / 200, within the
            // histogram's three significant digits (paired across rounds: 0.75, 4.0).
            assert_eq!(r.latency.len(), 2);
            for (got, want) in r.latency.iter().zip([1.5, 2.0]) {
                assert!((got - want).abs() < 0.01, "{got} against {want}");
            }
            assert_eq!(r.cpu, vec![1.1, 1.5]);
        }

        #[test]
        fn without_a_floor_nothing_is_compared() {
            let mut only = round((40_000, 200), (32_000, 250, 22));
            only.remove(1);
            let ratios = same_round_ratios(&[only]);
            assert_eq!(ratios.len(), 1);
            assert!(ratios[0].rps.is_empty() && ratios[0].latency.is_empty());
            assert!(same_round_ratios(&[]).is_empty());
        }

        #[test]
        fn each_case_keeps_its_median_round_and_of_two_the_slower() {
            let rounds = vec![
                round((40_000, 200), (30_000, 250, 22)),
                round((20_000, 300), (10_000, 400, 30)),
                round((30_000, 250), (20_000, 300, 25)),
            ];
            let kept = median_rounds(rounds);
            let rps: Vec<u64> = kept.iter().map(|m| m.outcome.requests).collect();
            assert_eq!(rps, vec![50_000, 30_000, 20_000]);
            assert_eq!(kept[2].case.route, Route::Relayed(Transport::Ws));

            let two = vec![
                round((40_000, 200), (30_000, 250, 22)),
                round((20_000, 300), (10_000, 400, 30)),
            ];
            let kept = median_rounds(two);
            assert_eq!(kept[1].outcome.requests, 20_000);
            assert_eq!(kept[2].outcome.requests, 10_000);
        }

        #[test]
        fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
            assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
            assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
            assert_eq!(median(Vec::new()), None);
        }
    }
}

/// Issue #16's second figure: how long a streamed answer pauses when its publisher's
/// link drops. A resumable publisher per transport reaches the gateway through a TCP
/// proxy ([`CutProxy`]) that loadgen cuts in the middle of a paced answer (a chunk
/// every [`mock::PACE`](super::mock::PACE)), while the client reads the gateway
/// directly:
///
/// - *link back at once*: every connection through the proxy is closed and the next
///   one goes through (a NAT rebinding, a proxy restart). The pause is the publisher
///   noticing, reconnecting with its session, registering and replaying.
/// - *link down 500 ms*: the proxy also refuses connections for 500 ms; the pause is
///   counted from the moment the link is back, so it shows the publisher's retry pace.
///
/// Each cut checks that the client got every chunk once and in order.
mod flap {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use comfy_table::Table;
    use comfy_table::presets::ASCII_MARKDOWN;
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    use serde_json::{Value, json};
    use tokio::sync::watch;

    use super::{Binaries, BoxError, GatewayChild, Transport, mock, spawn_publisher};

    /// Cuts per transport and way.
    const CUTS: usize = 8;
    /// The chunk after which the link is cut.
    const CUT_AFTER: usize = 10;
    /// How long the link stays down in the second way.
    const DOWN: Duration = Duration::from_millis(500);
    /// The longest a client waits for a chunk: past the resume window, a stall.
    const STALL: Duration = Duration::from_secs(15);

    /// A TCP proxy to the gateway that closes every connection through it on
    /// [`CutProxy::cut`] and refuses new ones while told to.
    struct CutProxy {
        url: String,
        /// Bumped by each cut; a connection lives only in the epoch it began in.
        epoch: watch::Sender<u64>,
        refusing: Arc<AtomicBool>,
    }

    impl CutProxy {
        async fn start(target: SocketAddr) -> std::io::Result<Self> {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let (epoch, epochs) = watch::channel(0u64);
            let refusing = Arc::new(AtomicBool::new(false));
            let refused = refusing.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refused.load(Ordering::SeqCst) {
                        continue; // closed at once: the publisher's connect fails
                    }
                    let mut epochs = epochs.clone();
                    let born = *epochs.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            // Cut: both sockets close here, mid-flight.
                            _ = epochs.wait_for(|e| *e != born) => {}
                        }
                    });
                }
            });
            Ok(CutProxy {
                url,
                epoch,
                refusing,
            })
        }

        /// Closes every connection through the proxy now.
        fn cut(&self) {
            self.epoch.send_modify(|e| *e += 1);
        }

        fn refuse(&self, refuse: bool) {
            self.refusing.store(refuse, Ordering::SeqCst);
        }
    }

    /// Measures both ways on each transport and prints the table.
    pub(crate) async fn run(
        bins: &Binaries,
        dir: &std::path::Path,
        http: &reqwest::Client,
        gateway: &GatewayChild,
        upstream: SocketAddr,
        transports: &[Transport],
    ) -> Result<(), BoxError> {
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "transport",
            "link",
            "cuts",
            "pause p50 ms",
            "pause max ms",
            "every chunk once, in order",
        ]);
        for &transport in transports {
            let proxy = CutProxy::start(gateway.addr).await?;
            let tag = format!("{}-cut", transport.name());
            let llm = format!("bench-{tag}");
            let providers = json!([{
                "name": llm,
                "type": "openai",
                "model": mock::PACED_MODEL,
                "url": format!("http://{upstream}/v1"),
                "publish": true
            }]);
            let mut publisher = spawn_publisher(
                bins,
                dir,
                http,
                &proxy.url,
                transport,
                &tag,
                &providers,
                1,
                std::slice::from_ref(&llm),
                false,
            )
            .await?;
            for (way, down) in [("back at once", Duration::ZERO), ("down 500 ms", DOWN)] {
                let mut pauses = Vec::with_capacity(CUTS);
                for _ in 0..CUTS {
                    pauses.push(cut_once(http, &gateway.url, &llm, &proxy, down).await?);
                    publisher.check_running()?;
                }
                pauses.sort();
                table.add_row(vec![
                    transport.name().to_owned(),
                    way.to_owned(),
                    CUTS.to_string(),
                    format!("{:.1}", ms(pauses[CUTS / 2])),
                    format!("{:.1}", ms(pauses[CUTS - 1])),
                    "yes".to_owned(),
                ]);
            }
        }
        println!(
            "\nA stream across a cut link (issue #16): the publisher reaches the gateway through a \
             proxy cut after chunk {CUT_AFTER} of {} (a chunk every {:?}); the pause is from the \
             link's return to the next chunk at the client:\n\n{table}",
            mock::PACED_CHUNKS,
            mock::PACE
        );
        Ok(())
    }

    /// One streamed request cut after [`CUT_AFTER`] chunks: the time from the link's
    /// return to the next chunk. An error unless every chunk came once and in order.
    async fn cut_once(
        http: &reqwest::Client,
        gateway: &str,
        llm: &str,
        proxy: &CutProxy,
        down: Duration,
    ) -> Result<Duration, BoxError> {
        let response = http
            .post(format!("{gateway}/v1/chat/completions"))
            .json(&json!({"model": llm, "stream": true, "messages": [{"role": "user", "content": "count"}]}))
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("{llm}: {}", response.status()).into());
        }
        let mut events = response.bytes_stream().eventsource();
        let mut words = Vec::with_capacity(mock::PACED_CHUNKS);
        let mut next = async || -> Result<Option<String>, BoxError> {
            let event = tokio::time::timeout(STALL, events.next())
                .await
                .map_err(|_| format!("{llm}: no chunk for {STALL:?}"))?;
            let Some(event) = event else {
                return Err(format!("{llm}: the stream ended without [DONE]").into());
            };
            let event = event?;
            if event.event == "error" {
                return Err(format!("{llm}: the stream failed: {}", event.data).into());
            }
            if event.data == "[DONE]" {
                return Ok(None);
            }
            let chunk: Value = serde_json::from_str(&event.data)?;
            Ok(Some(
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ))
        };
        while words.len() < CUT_AFTER {
            words.push(next().await?.ok_or("the stream ended early")?);
        }
        proxy.refuse(!down.is_zero());
        proxy.cut();
        tokio::time::sleep(down).await;
        proxy.refuse(false);
        let back = Instant::now();
        words.push(next().await?.ok_or("the stream ended early")?);
        let pause = back.elapsed();
        while let Some(word) = next().await? {
            words.push(word);
        }
        let expected: Vec<String> = (0..mock::PACED_CHUNKS)
            .map(|i| format!("word{i} "))
            .collect();
        if words != expected {
            return Err(format!("{llm}: chunks lost or repeated across the cut: {words:?}").into());
        }
        Ok(pause)
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }
}

/// `--publishers N`: N idle publishers against a child gateway.
mod scale {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use comfy_table::Table;
    use hdrhistogram::Histogram;
    use tokio::sync::Semaphore;

    use super::{
        ASCII_MARKDOWN, Args, Binaries, BoxError, EchoProvider, GatewayChild, LlmName, LlmSpec,
        PublishedLlm, Publisher, PublisherOptions, PublisherState, Transport, WorkDir,
        control_client, duration_ns, histogram, ms, procfs, progress, wire,
    };

    pub(crate) async fn run(
        args: &Args,
        bins: &Binaries,
        transport: Transport,
        n: usize,
    ) -> Result<Run, BoxError> {
        let dir = WorkDir::new(args.keep)?;
        let http = control_client()?;
        let gateway = GatewayChild::start(bins, dir.path(), &http).await?;
        warn_if_few_ports(n);
        let pid = gateway.pid();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = procfs::usage(&pid)?;
        let fds_before = procfs::open_fds(&pid)?;

        let bar = progress(
            n as u64,
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} publishers connected {msg}",
        )?;
        let provider = Arc::new(EchoProvider::new());
        let options = PublisherOptions::default();
        // Everything a publisher needs is made before the clock starts: building an
        // `SseWire` builds an HTTP client with its TLS roots, about a millisecond of this
        // process's CPU each, which is the publisher's cost, not the gateway's.
        let mut prepared = Vec::with_capacity(n);
        for i in 0..n {
            let llm = PublishedLlm::new(
                LlmSpec {
                    name: LlmName::parse(&format!("idle-{i:06}"))?,
                    provider_type: "echo".into(),
                    model: "echo".into(),
                    tier: None,
                    pool: None,
                    max_concurrent: None,
                    state: None,
                    access: Default::default(),
                },
                provider.clone(),
            );
            prepared.push((wire(transport, &gateway.url)?, llm));
        }
        let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
        let mut publishers = Vec::with_capacity(n);
        let mut waits = tokio::task::JoinSet::new();
        let started = Instant::now();
        for (wire, llm) in prepared {
            let permit = gate.clone().acquire_owned().await?;
            let publisher = Publisher::spawn(wire, vec![llm], options.clone());
            let mut state = publisher.state();
            let bar = bar.clone();
            waits.spawn(async move {
                let t0 = Instant::now();
                let mut error = None;
                loop {
                    match &*state.borrow_and_update() {
                        PublisherState::Connected { .. } => break,
                        PublisherState::Backoff { error: e, .. } => {
                            error.get_or_insert_with(|| e.clone());
                        }
                        PublisherState::Connecting | PublisherState::Stopped => {}
                    }
                    if state.changed().await.is_err() {
                        break;
                    }
                }
                drop(permit);
                bar.inc(1);
                (t0.elapsed(), error)
            });
            publishers.push(publisher);
        }
        let mut connect = histogram()?;
        let mut failures = 0usize;
        let mut first_error = None;
        let all = async {
            while let Some(joined) = waits.join_next().await {
                let (took, error) = joined?;
                connect.saturating_record(duration_ns(took));
                if let Some(e) = error {
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
            Ok::<_, BoxError>(())
        };
        tokio::time::timeout(Duration::from_secs(300), all)
            .await
            .map_err(|_| "not every publisher connected within 300 s")??;
        let registration = started.elapsed();
        bar.finish_and_clear();
        let cpu_registering = procfs::cpu(&pid)?.saturating_sub(before.cpu);

        tokio::time::sleep(args.hold).await;
        let after = procfs::usage(&pid)?;
        let fds_after = procfs::open_fds(&pid)?;
        let active = active_rows(&http, &gateway.url).await?;

        let run = Run {
            transport,
            n,
            active,
            registration,
            connect,
            failures,
            first_error,
            cpu_registering,
            before,
            after,
            fds_before,
            fds_after,
        };
        // The gateway goes first, so that stopping the publishers does not make it
        // write 10 000 rows inactive; then the publishers, each promptly.
        drop(gateway);
        let stops = publishers.into_iter().map(|p| p.stop());
        if tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(stops))
            .await
            .is_err()
        {
            eprintln!("warning: some publishers did not stop within 30 s");
        }
        Ok(run)
    }

    /// One scale run's measurements.
    pub(crate) struct Run {
        transport: Transport,
        n: usize,
        /// Rows the registry lists as active once all connected.
        active: usize,
        registration: Duration,
        /// From spawning one publisher to its channel being bound.
        connect: Histogram<u64>,
        /// Publishers that backed off at least once on the way.
        failures: usize,
        first_error: Option<String>,
        cpu_registering: Duration,
        before: procfs::Usage,
        after: procfs::Usage,
        fds_before: usize,
        fds_after: usize,
    }

    impl Run {
        fn per_publisher(&self, after: u64, before: u64) -> f64 {
            (after as f64 - before as f64) / self.n.max(1) as f64
        }

        fn kib_per_publisher(&self) -> f64 {
            self.per_publisher(self.after.rss_kib, self.before.rss_kib)
        }
    }

    /// One row of the table: a run's figure, formatted.
    type Metric = dyn Fn(&Run) -> String;

    /// One table, a column per run, then the targets.
    pub(crate) fn print(args: &Args, runs: &[Run]) {
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        let mut header = vec!["idle publishers, one LLM each".to_owned()];
        header.extend(
            runs.iter()
                .map(|r| format!("{} × {}", r.transport.name(), r.n)),
        );
        table.set_header(header);
        let metrics: [(&str, &Metric); 9] = [
            ("rows active once connected", &|r| r.active.to_string()),
            ("registration time, all", &|r| {
                format!("{:.2} s", r.registration.as_secs_f64())
            }),
            ("registrations/s", &|r| {
                format!("{:.0}", r.n as f64 / r.registration.as_secs_f64().max(1e-9))
            }),
            ("one registration p50 / p99 / max, ms", &|r| {
                format!(
                    "{} / {} / {}",
                    ms(r.connect.value_at_quantile(0.5)),
                    ms(r.connect.value_at_quantile(0.99)),
                    ms(r.connect.max())
                )
            }),
            ("publishers that backed off", &|r| r.failures.to_string()),
            ("gateway CPU per registration", &|r| {
                format!(
                    "{:.0} µs",
                    r.cpu_registering.as_secs_f64() * 1e6 / r.n.max(1) as f64
                )
            }),
            ("gateway RSS before → after, MiB", &|r| {
                format!(
                    "{:.1} → {:.1}",
                    r.before.rss_kib as f64 / 1024.0,
                    r.after.rss_kib as f64 / 1024.0
                )
            }),
            ("gateway RSS per publisher", &|r| {
                format!("{:.1} KiB", r.kib_per_publisher())
            }),
            ("gateway file descriptors per publisher", &|r| {
                format!(
                    "{:.2}",
                    r.per_publisher(r.fds_after as u64, r.fds_before as u64)
                )
            }),
        ];
        for (name, value) in metrics {
            let mut row = vec![name.to_owned()];
            row.extend(runs.iter().map(value));
            table.add_row(row);
        }
        println!(
            "{table}\n\n{} publishers registering at once; memory read after {:?} idle.",
            args.connect_concurrency, args.hold
        );
        for r in runs {
            if let Some(e) = &r.first_error {
                println!(
                    "{} × {}: first back-off error: {e}",
                    r.transport.name(),
                    r.n
                );
            }
        }
        let mut targets = Table::new();
        targets.load_style(ASCII_MARKDOWN);
        targets.set_header(vec!["target", "measured", "met"]);
        let yes = |met: bool| if met { "yes" } else { "no" }.to_owned();
        for r in runs {
            let kib = r.kib_per_publisher();
            targets.add_row(vec![
                format!(
                    "{} × {}: gateway memory per idle publisher ≤ 16 KiB",
                    r.transport.name(),
                    r.n
                ),
                format!("{kib:.1} KiB"),
                yes(kib <= 16.0),
            ]);
            let budget = 5.0 * r.n as f64 / 10_000.0;
            targets.add_row(vec![
                format!(
                    "{} × {}: registrations ≤ {budget:.2} s (5 s per 10 000)",
                    r.transport.name(),
                    r.n
                ),
                format!("{:.2} s", r.registration.as_secs_f64()),
                yes(r.registration.as_secs_f64() <= budget),
            ]);
        }
        println!("\ntargets:\n\n{targets}\n");
    }

    async fn active_rows(http: &reqwest::Client, url: &str) -> Result<usize, BoxError> {
        let rows: Vec<serde_json::Value> = http
            .get(format!("{url}/api/v1/llms"))
            .send()
            .await?
            .json()
            .await?;
        Ok(rows.iter().filter(|r| r["status"] == "active").count())
    }

    /// Each idle publisher holds one or two connections to the one gateway address;
    /// they all need an ephemeral port.
    fn warn_if_few_ports(n: usize) {
        let range =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let ports: Vec<usize> = range
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if let [low, high] = ports[..]
            && high.saturating_sub(low) < 2 * n
        {
            eprintln!(
                "warning: {} ephemeral ports ({low}–{high}) for {n} publishers with up to 2 connections each; widen net.ipv4.ip_local_port_range",
                high - low
            );
        }
    }
}

/// `--gc-rows N`: the GC sweep over an on-disk redb registry.
mod gc {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use comfy_table::Table;

    use super::{
        ASCII_MARKDOWN, BoxError, Clock, Gateway, LlmId, LlmKind, LlmName, LlmRecord, LlmStatus,
        RedbStore, SessionId, Store, SystemClock, Timestamp, Write, progress,
    };

    /// Rows per `Store::write` batch while filling the registry.
    const BATCH: usize = 1000;

    fn name(i: usize) -> Result<LlmName, BoxError> {
        Ok(LlmName::parse(&format!("row-{i:07}"))?)
    }

    pub(crate) async fn run(rows: usize, stale: usize, repeat: usize) -> Result<Run, BoxError> {
        let stale = stale.min(rows);
        let dir = tempfile::Builder::new().prefix("loadgen-gc-").tempdir()?;
        let store = Arc::new(RedbStore::open(dir.path().join("registry.redb")).await?);
        // Started on the empty store: start-up recovery would mark live rows inactive.
        let gateway = Gateway::builder(store.clone() as Arc<dyn Store>)
            .start()
            .await?;
        let stale_after = gateway.config().stale_after;
        let now = SystemClock.now();
        let old = now.saturating_sub(stale_after + Duration::from_secs(3600));

        let bar = progress(
            rows as u64,
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows written",
        )?;
        let filling = Instant::now();
        for first in (0..rows).step_by(BATCH) {
            let mut batch = Vec::with_capacity(BATCH);
            for i in first..(first + BATCH).min(rows) {
                batch.push(Write::Insert(LlmRecord {
                    id: LlmId::generate(),
                    name: name(i)?,
                    kind: LlmKind::Virtual,
                    status: LlmStatus::Active,
                    provider_type: "openai".into(),
                    model: "some-model".into(),
                    tier: None,
                    owner: "bench".into(),
                    provider_session_id: Some(SessionId::generate()),
                    last_heartbeat_at: Some(if i < stale { old } else { now }),
                    inactive_since: None,
                    created_at: now,
                    updated_at: now,
                    revision: 0,
                    binding: None,
                    pool: None,
                    max_concurrent: None,
                    upstream: None,
                    agent: None,
                    access: Default::default(),
                }));
            }
            let written = batch.len() as u64;
            store.write(batch).await?;
            bar.inc(written);
        }
        let fill = filling.elapsed();
        bar.finish_and_clear();

        let mut queries = Vec::new();
        let mut sweeps = Vec::new();
        for round in 0..repeat.max(1) {
            if round > 0 {
                restale(&*store, stale, old).await?;
            }
            let cutoff = SystemClock.now().saturating_sub(stale_after);
            let t = Instant::now();
            let found = store.stale_virtuals(cutoff).await?;
            queries.push(t.elapsed());
            if found.len() != stale {
                return Err(
                    format!("the stale query found {} rows, not {stale}", found.len()).into(),
                );
            }
            let t = Instant::now();
            let report = gateway.sweep().await?;
            sweeps.push(t.elapsed());
            if report.marked_inactive != stale {
                return Err(format!(
                    "the sweep marked {} rows inactive, not {stale}",
                    report.marked_inactive
                )
                .into());
            }
        }
        queries.sort();
        sweeps.sort();
        store.close().await?;
        Ok(Run {
            rows,
            stale,
            sweeps,
            queries,
            fill,
        })
    }

    /// One registry size's measurements, sorted.
    pub(crate) struct Run {
        rows: usize,
        stale: usize,
        sweeps: Vec<Duration>,
        /// The indexed stale-row query alone, before each sweep.
        queries: Vec<Duration>,
        /// Writing the rows in batches of `BATCH`.
        fill: Duration,
    }

    fn median(sorted: &[Duration]) -> Duration {
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    fn millis(d: Duration) -> String {
        format!("{:.2}", d.as_secs_f64() * 1e3)
    }

    /// One table, a row per registry size, then the target.
    pub(crate) fn print(runs: &[Run]) {
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "rows",
            "stale",
            "sweeps",
            "sweep median ms",
            "sweep min ms",
            "sweep max ms",
            "stale query alone, median ms",
            "filling, batches of 1 000",
        ]);
        for r in runs {
            table.add_row(vec![
                r.rows.to_string(),
                r.stale.to_string(),
                r.sweeps.len().to_string(),
                millis(median(&r.sweeps)),
                millis(r.sweeps.first().copied().unwrap_or_default()),
                millis(r.sweeps.last().copied().unwrap_or_default()),
                millis(median(&r.queries)),
                format!(
                    "{:.2} s ({:.0} rows/s)",
                    r.fill.as_secs_f64(),
                    r.rows as f64 / r.fill.as_secs_f64().max(1e-9)
                ),
            ]);
        }
        println!("GC sweep on an on-disk redb registry:\n\n{table}");
        for r in runs.iter().filter(|r| r.rows >= 100_000) {
            let sweep = median(&r.sweeps);
            println!(
                "\ntarget, GC sweep of 100 000 rows ≤ 50 ms: {} ms at {} rows, {} stale (median): {}",
                millis(sweep),
                r.rows,
                r.stale,
                if sweep <= Duration::from_millis(50) {
                    "met"
                } else {
                    "not met"
                }
            );
        }
        println!();
    }

    /// Makes the first `stale` rows live with an old heartbeat again, undoing a sweep.
    async fn restale(store: &dyn Store, stale: usize, old: Timestamp) -> Result<(), BoxError> {
        let mut writes = Vec::with_capacity(stale);
        for i in 0..stale {
            let mut row = store.get(&name(i)?).await?.ok_or("a stale row vanished")?;
            row.status = LlmStatus::Active;
            row.inactive_since = None;
            row.last_heartbeat_at = Some(old);
            writes.push(Write::Update(row));
        }
        for batch in writes.chunks(BATCH) {
            store.write(batch.to_vec()).await?;
        }
        Ok(())
    }
}

/// `--pool N`: a pool of N publisher children against one publisher, and the admission
/// queue when the pool's capacity is less than the load.
mod pool {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use comfy_table::Table;
    use serde_json::json;

    use super::{
        ASCII_MARKDOWN, Args, Binaries, BoxError, ChildGuard, GatewayChild, Interference, Kind,
        Transport, WorkDir, control_client, load, mock, ms, print_interference, procfs, progress,
        spawn_publisher,
    };

    /// What the clients call.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Target {
        /// One publisher's row (a pool of one).
        Single,
        /// The pool's key, served by `--pool` publishers.
        Pool,
        /// The same members, each called by its own row name, in turn: the control
        /// case, the fan-out to N publishers without the gateway choosing among them.
        Members,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Case {
        target: Target,
        transport: Transport,
        kind: Kind,
        concurrency: usize,
    }

    impl Case {
        fn label(&self, members: usize) -> String {
            let target = match self.target {
                Target::Single => "single".to_owned(),
                Target::Pool => format!("pool of {members}"),
                Target::Members => format!("{members} members by name"),
            };
            let kind = match self.kind {
                Kind::Complete => "",
                Kind::Stream => ", stream",
            };
            format!("{target} {}{kind}", self.transport.name())
        }

        /// The `model`s clients ask for, in turn.
        fn keys(&self, members: usize) -> Vec<String> {
            match self.target {
                Target::Single => vec![single_name(self.transport)],
                Target::Pool => vec![pool_key(self.transport)],
                Target::Members => (0..members)
                    .map(|i| member_name(self.transport, i))
                    .collect(),
            }
        }
    }

    fn single_name(transport: Transport) -> String {
        format!("single-{}", transport.name())
    }

    fn pool_key(transport: Transport) -> String {
        format!("pool-{}", transport.name())
    }

    /// A member's row name, also the upstream model it asks the mock for, so that the
    /// mock counts what each member served.
    fn member_name(transport: Transport, i: usize) -> String {
        format!("pool-{}-m{i}", transport.name())
    }

    /// The publisher children of one transport.
    struct Side {
        transport: Transport,
        /// One publisher, one row without a pool (none with `--pool-only`).
        single: Option<ChildGuard>,
        /// One publisher per member of the pool, one row each.
        members: Vec<ChildGuard>,
    }

    impl Side {
        fn children(&mut self) -> impl Iterator<Item = &mut ChildGuard> {
            self.single.iter_mut().chain(self.members.iter_mut())
        }
    }

    /// CPU time over the measured part of a case.
    #[derive(Clone, Debug, Default)]
    struct Cpu {
        gateway: Duration,
        /// Each publisher serving the case: the single one, or one per member.
        serving: Vec<Duration>,
        /// Every publisher child (the others are idle).
        publishers: Duration,
        /// The load client and the mock.
        loadgen: Duration,
        machine: procfs::Machine,
    }

    impl Cpu {
        fn since(&self, before: &Cpu) -> Cpu {
            Cpu {
                gateway: self.gateway.saturating_sub(before.gateway),
                serving: self
                    .serving
                    .iter()
                    .zip(
                        before
                            .serving
                            .iter()
                            .chain(std::iter::repeat(&Duration::ZERO)),
                    )
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect(),
                publishers: self.publishers.saturating_sub(before.publishers),
                loadgen: self.loadgen.saturating_sub(before.loadgen),
                machine: self.machine.since(&before.machine),
            }
        }

        fn serving_total(&self) -> Duration {
            self.serving.iter().sum()
        }

        /// What processes other than these took.
        fn others(&self) -> Duration {
            self.machine.tasks.saturating_sub(
                self.gateway + self.publishers + self.loadgen + self.machine.softirqd,
            )
        }

        /// Everything one case cost the machine: our processes and the kernel's
        /// network work.
        fn ours(&self) -> Duration {
            self.gateway + self.publishers + self.loadgen + self.machine.network()
        }
    }

    /// The admission queue as the gateway's `/metrics` showed it at one moment, or
    /// the difference between two moments.
    #[derive(Clone, Debug, Default)]
    struct QueueMetrics {
        /// `virtual_llm_queue_wait_seconds`: cumulative counts by upper bound (`+Inf`
        /// last). Only requests that waited are observed; one admitted at once is not.
        buckets: Vec<(f64, u64)>,
        /// Seconds waited, summed.
        sum: f64,
        /// Requests that waited and then got a slot.
        count: u64,
        /// `virtual_llm_queue_rejections_total` by reason.
        rejections: BTreeMap<String, u64>,
    }

    impl QueueMetrics {
        async fn read(http: &reqwest::Client, gateway: &str) -> Result<Self, BoxError> {
            let response = http.get(format!("{gateway}/metrics")).send().await?;
            if !response.status().is_success() {
                return Err(format!("GET /metrics: {}", response.status()).into());
            }
            Ok(Self::parse(&response.text().await?))
        }

        /// The Prometheus text format, only the lines of the two queue metrics.
        fn parse(text: &str) -> Self {
            let mut metrics = QueueMetrics::default();
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let Ok(value) = value.trim().parse::<f64>() else {
                    continue;
                };
                let label = |name: &str| {
                    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
                    let end = series[start..].find('"')? + start;
                    Some(series[start..end].to_owned())
                };
                if series.starts_with("virtual_llm_queue_wait_seconds_bucket") {
                    let bound = match label("le").as_deref() {
                        Some("+Inf") => f64::INFINITY,
                        Some(le) => match le.parse() {
                            Ok(le) => le,
                            Err(_) => continue,
                        },
                        None => continue,
                    };
                    metrics.buckets.push((bound, value as u64));
                } else if series.starts_with("virtual_llm_queue_wait_seconds_sum") {
                    metrics.sum = value;
                } else if series.starts_with("virtual_llm_queue_wait_seconds_count") {
                    metrics.count = value as u64;
                } else if series.starts_with("virtual_llm_queue_rejections_total")
                    && let Some(reason) = label("reason")
                {
                    metrics.rejections.insert(reason, value as u64);
                }
            }
            metrics.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            metrics
        }

        fn since(&self, before: &QueueMetrics) -> QueueMetrics {
            let earlier = |bound: f64| {
                before
                    .buckets
                    .iter()
                    .find(|(b, _)| *b == bound)
                    .map_or(0, |(_, n)| *n)
            };
            QueueMetrics {
                buckets: self
                    .buckets
                    .iter()
                    .map(|&(bound, n)| (bound, n.saturating_sub(earlier(bound))))
                    .collect(),
                sum: (self.sum - before.sum).max(0.0),
                count: self.count.saturating_sub(before.count),
                rejections: self
                    .rejections
                    .iter()
                    .map(|(reason, n)| {
                        let was = before.rejections.get(reason).copied().unwrap_or(0);
                        (reason.clone(), n.saturating_sub(was))
                    })
                    .collect(),
            }
        }

        fn mean(&self) -> Option<f64> {
            (self.count > 0).then(|| self.sum / self.count as f64)
        }

        /// The `q` quantile as Prometheus's `histogram_quantile` estimates it (linear
        /// within its bucket), with the bucket's bounds, in seconds.
        fn quantile(&self, q: f64) -> Option<(f64, f64, f64)> {
            if self.count == 0 {
                return None;
            }
            let rank = q * self.count as f64;
            let (mut lower, mut below) = (0.0, 0u64);
            for &(upper, cumulative) in &self.buckets {
                if cumulative as f64 >= rank {
                    if upper.is_infinite() {
                        return Some((lower, lower, upper));
                    }
                    let inside = (cumulative - below).max(1) as f64;
                    let estimate = lower + (upper - lower) * (rank - below as f64) / inside;
                    return Some((estimate, lower, upper));
                }
                (lower, below) = (upper, cumulative);
            }
            None
        }
    }

    struct Measured {
        case: Case,
        outcome: load::Outcome,
        cpu: Cpu,
        queue: QueueMetrics,
        /// Requests the mock answered for each publisher serving the case.
        served: Vec<u64>,
        /// Times the case was measured again because other processes disturbed it.
        reruns: usize,
    }

    /// A line above the progress bar, or on stderr when the bar is hidden (no
    /// terminal), so that a log keeps it.
    fn say(bar: &indicatif::ProgressBar, line: String) {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }

    /// Above this share of the machine taken by other processes and the hypervisor
    /// (steal), a case is disturbed.
    const DISTURBED: f64 = 0.05;

    /// `cpu` as a share of all the machine's cores over `elapsed`.
    fn share(cpu: Duration, elapsed: Duration) -> f64 {
        cpu.as_secs_f64() / (procfs::cores().max(1) as f64 * elapsed.as_secs_f64()).max(1e-9)
    }

    /// Waits until other processes (than the ones `sample` reads) and the hypervisor
    /// have taken less than `DISTURBED` of the machine for three seconds in a row, at
    /// most ten minutes.
    async fn wait_quiet(sample: &(dyn Fn() -> Cpu + Sync)) {
        let second = Duration::from_secs(1);
        let mut quiet = 0;
        for _ in 0..600 {
            let before = sample();
            tokio::time::sleep(second).await;
            let cpu = sample().since(&before);
            if share(cpu.others() + cpu.machine.steal, second) < DISTURBED {
                quiet += 1;
                if quiet == 3 {
                    return;
                }
            } else {
                quiet = 0;
            }
        }
        eprintln!("warning: the machine did not get quiet within ten minutes");
    }

    pub(crate) async fn run(args: &Args, bins: &Binaries) -> Result<(), BoxError> {
        let members = args.pool.unwrap_or(1).max(1);
        let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
        let capacity = args
            .pool_capacity
            .map_or(max_concurrency, |c| c as usize)
            .max(1);
        let dir = WorkDir::new(args.keep)?;
        let http = control_client()?;
        let upstream = mock::start(args.mock_delay).await?;
        let mut gateway = GatewayChild::start(bins, dir.path(), &http).await?;
        let mut sides = Vec::new();
        for &transport in &args.transports {
            sides.push(
                start_side(
                    args,
                    bins,
                    &dir,
                    &http,
                    &gateway,
                    transport,
                    upstream.addr,
                    members,
                    capacity,
                )
                .await?,
            );
        }

        let mut cases = Vec::new();
        for &transport in &args.transports {
            for &concurrency in &args.concurrency {
                for &kind in &args.kinds {
                    let targets: &[Target] = if args.pool_only {
                        &[Target::Pool]
                    } else {
                        &[Target::Single, Target::Pool, Target::Members]
                    };
                    for &target in targets {
                        cases.push(Case {
                            target,
                            transport,
                            kind,
                            concurrency,
                        });
                    }
                }
            }
        }
        println!(
            "pool cases: a pool of {members} publishers, maxConcurrent {capacity} each (capacity {}){}; mock delay {:?}; gateway flags: {}",
            members * capacity,
            if args.pool_only {
                String::new()
            } else {
                format!(", against one publisher with maxConcurrent {capacity}")
            },
            args.mock_delay,
            if bins.gateway_flags.is_empty() {
                "none".to_owned()
            } else {
                bins.gateway_flags.join(" ")
            }
        );
        println!(
            "{} cases × ({:?} warm-up + {:?} measured)\n",
            cases.len(),
            args.warmup,
            args.duration,
        );
        let bar = progress(
            cases.len() as u64,
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )?;
        let gateway_pid = gateway.pid();
        let all_pids: Vec<String> = sides
            .iter_mut()
            .flat_map(|s| s.children().map(|c| c.pid()).collect::<Vec<_>>())
            .collect();
        let mut results = Vec::new();
        for case in cases {
            let label = case.label(members);
            bar.set_message(format!("{label} c={}", case.concurrency));
            let side = sides
                .iter_mut()
                .find(|s| s.transport == case.transport)
                .ok_or("no publishers for this transport")?;
            gateway.guard.check_running()?;
            for child in side.children() {
                child.check_running()?;
            }
            let (serving, models): (Vec<String>, Vec<String>) = match case.target {
                Target::Single => (
                    side.single.iter().map(ChildGuard::pid).collect(),
                    vec![single_name(case.transport)],
                ),
                Target::Pool | Target::Members => (
                    side.members.iter().map(ChildGuard::pid).collect(),
                    (0..members)
                        .map(|i| member_name(case.transport, i))
                        .collect(),
                ),
            };
            let stream = case.kind == Kind::Stream;
            let bodies = case
                .keys(members)
                .iter()
                .map(|model| {
                    let body = json!({
                        "model": model,
                        "stream": stream,
                        "max_tokens": 32,
                        "messages": [{"role": "user", "content": "Say hello in a few words."}]
                    });
                    Bytes::from(body.to_string())
                })
                .collect();
            let target = Arc::new(load::Target {
                addr: gateway.addr,
                bodies,
                stream,
                chunks: mock::CHUNKS,
                rate: args.rate,
            });
            let sample = || Cpu {
                gateway: procfs::cpu(&gateway_pid).unwrap_or_default(),
                serving: serving
                    .iter()
                    .map(|pid| procfs::cpu(pid).unwrap_or_default())
                    .collect(),
                publishers: all_pids
                    .iter()
                    .filter_map(|pid| procfs::cpu(pid).ok())
                    .sum(),
                loadgen: procfs::cpu("self").unwrap_or_default(),
                machine: procfs::machine().unwrap_or_default(),
            };
            let served_by = |counts: &BTreeMap<String, u64>| -> Vec<u64> {
                models
                    .iter()
                    .map(|m| counts.get(m).copied().unwrap_or(0))
                    .collect()
            };
            let mut reruns = 0;
            let measured = loop {
                // The metrics are read before the CPU at the start and after it at the
                // end, so that rendering them is not charged to the case.
                let mut before = Cpu::default();
                let mut queue_before = Ok(QueueMetrics::default());
                let mut served_before = BTreeMap::new();
                let outcome = load::run(
                    target.clone(),
                    case.concurrency,
                    args.warmup,
                    args.duration,
                    async || {
                        queue_before = QueueMetrics::read(&http, &gateway.url).await;
                        served_before = upstream.served.snapshot();
                        before = sample();
                    },
                )
                .await?;
                let cpu = sample().since(&before);
                let served_after = upstream.served.snapshot();
                // A gateway that went away says why (its exit status, its log's end).
                let queue = match (QueueMetrics::read(&http, &gateway.url).await, queue_before) {
                    (Ok(after), Ok(before)) => after.since(&before),
                    (Err(e), _) | (_, Err(e)) => {
                        gateway.guard.check_running()?;
                        return Err(format!("reading the gateway's /metrics: {e}").into());
                    }
                };
                let served = served_by(&served_after)
                    .iter()
                    .zip(served_by(&served_before))
                    .map(|(after, before)| after.saturating_sub(before))
                    .collect();
                let others = share(cpu.others() + cpu.machine.steal, outcome.elapsed);
                say(
                    &bar,
                    format!(
                        "{label:<24} c={:<3} {:>8.0} req/s  p50 {} ms  p99 {} ms  errors {}  others and steal {:.0}%",
                        case.concurrency,
                        outcome.rps(),
                        ms(outcome.latency.value_at_quantile(0.5)),
                        ms(outcome.latency.value_at_quantile(0.99)),
                        errors(&outcome),
                        100.0 * others,
                    ),
                );
                let measured = Measured {
                    case,
                    outcome,
                    cpu,
                    queue,
                    served,
                    reruns,
                };
                if others <= DISTURBED || reruns >= args.rerun_disturbed {
                    break measured;
                }
                reruns += 1;
                say(
                    &bar,
                    format!(
                        "  other processes and the hypervisor took {:.0}% of the machine: waiting for quiet, then again ({reruns} of {})",
                        100.0 * others,
                        args.rerun_disturbed
                    ),
                );
                wait_quiet(&sample).await;
            };
            results.push(measured);
            bar.inc(1);
        }
        bar.finish_and_clear();
        gateway.guard.check_running()?;
        for side in &mut sides {
            for child in side.children() {
                child.check_running()?;
            }
        }

        print_cases(members, &results);
        if !args.mock_delay.is_zero() {
            print_queue(args, members, capacity, &results);
        }
        if !args.pool_only {
            print_comparison(members, &results);
        }
        let gateway_usage = procfs::usage(&gateway_pid)?;
        println!(
            "\ngateway: {:.2} CPU s over the run, peak RSS {:.1} MiB",
            gateway_usage.cpu.as_secs_f64(),
            gateway_usage.hwm_kib as f64 / 1024.0,
        );
        for side in &sides {
            let named = side
                .single
                .iter()
                .map(|c| (single_name(side.transport), c))
                .chain(
                    side.members
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (member_name(side.transport, i), c)),
                );
            for (name, child) in named {
                let usage = procfs::usage(&child.pid())?;
                println!(
                    "publisher of {name}: {:.2} CPU s, peak RSS {:.1} MiB",
                    usage.cpu.as_secs_f64(),
                    usage.hwm_kib as f64 / 1024.0,
                );
            }
        }
        let own = procfs::usage("self")?;
        println!(
            "loadgen (load client + mock): {:.2} CPU s, peak RSS {:.1} MiB",
            own.cpu.as_secs_f64(),
            own.hwm_kib as f64 / 1024.0
        );
        for m in &results {
            if let Some(e) = &m.outcome.first_error {
                println!(
                    "first error of {} c={}: {e}",
                    m.case.label(members),
                    m.case.concurrency
                );
            }
        }
        let interference: Vec<Interference> = results
            .iter()
            .map(|m| Interference {
                case: format!("{} c={}", m.case.label(members), m.case.concurrency),
                others: m.cpu.others(),
                machine: m.cpu.machine,
                elapsed: m.outcome.elapsed,
            })
            .collect();
        print_interference(&interference);
        Ok(())
    }

    /// Starts the single publisher (unless `--pool-only`) and the pool's members of
    /// one transport, each a child with its own `--config`.
    #[allow(clippy::too_many_arguments)]
    async fn start_side(
        args: &Args,
        bins: &Binaries,
        dir: &WorkDir,
        http: &reqwest::Client,
        gateway: &GatewayChild,
        transport: Transport,
        upstream: std::net::SocketAddr,
        members: usize,
        capacity: usize,
    ) -> Result<Side, BoxError> {
        let url = format!("http://{upstream}/v1");
        let single = if args.pool_only {
            None
        } else {
            let name = single_name(transport);
            let providers = json!([{
                "name": name,
                "maxConcurrent": capacity,
                "type": "openai",
                "model": name,
                "url": url,
                "publish": true
            }]);
            Some(
                spawn_publisher(
                    bins,
                    dir.path(),
                    http,
                    &gateway.url,
                    transport,
                    &name,
                    &providers,
                    capacity,
                    std::slice::from_ref(&name),
                    false,
                )
                .await?,
            )
        };
        let mut children = Vec::with_capacity(members);
        for i in 0..members {
            let name = member_name(transport, i);
            let providers = json!([{
                "name": name,
                "pool": pool_key(transport),
                "maxConcurrent": capacity,
                "type": "openai",
                "model": name,
                "url": url,
                "publish": true
            }]);
            children.push(
                spawn_publisher(
                    bins,
                    dir.path(),
                    http,
                    &gateway.url,
                    transport,
                    &name,
                    &providers,
                    capacity,
                    std::slice::from_ref(&name),
                    false,
                )
                .await?,
            );
        }
        Ok(Side {
            transport,
            single,
            members: children,
        })
    }

    fn per_request(cpu: Duration, requests: u64) -> String {
        if requests == 0 {
            return "–".into();
        }
        format!("{:.0}", micros_per_request(cpu, requests))
    }

    fn micros_per_request(cpu: Duration, requests: u64) -> f64 {
        cpu.as_secs_f64() * 1e6 / requests.max(1) as f64
    }

    /// The error count, and by kind when there are any: `12 (429 queue_full 12)`.
    fn errors(outcome: &load::Outcome) -> String {
        if outcome.errors == 0 {
            return "0".into();
        }
        let kinds: Vec<String> = outcome
            .errors_by_kind
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        format!("{} ({})", outcome.errors, kinds.join(", "))
    }

    /// Each member's share of what the mock answered, in percent.
    fn spread(served: &[u64]) -> String {
        let total: u64 = served.iter().sum();
        if total == 0 {
            return "–".into();
        }
        let shares: Vec<String> = served
            .iter()
            .map(|n| format!("{:.0}", 100.0 * *n as f64 / total as f64))
            .collect();
        shares.join(" / ")
    }

    fn print_cases(members: usize, results: &[Measured]) {
        let single = |case: &Case| {
            results.iter().find(|m| {
                m.case.target == Target::Single
                    && m.case.transport == case.transport
                    && m.case.kind == case.kind
                    && m.case.concurrency == case.concurrency
            })
        };
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "case",
            "c",
            "req/s",
            "p50 ms",
            "p99 ms",
            "rps ÷ single",
            "gateway CPU µs/req",
            "publishers CPU µs/req",
            "each publisher CPU µs/req",
            "loadgen CPU µs/req",
            "kernel network CPU µs/req",
            "served by each, %",
            "errors",
            "re-runs",
        ]);
        for m in results {
            let o = &m.outcome;
            let ratio = match (m.case.target, single(&m.case)) {
                (Target::Pool | Target::Members, Some(s)) => {
                    format!("{:.2}", o.rps() / s.outcome.rps().max(1e-9))
                }
                _ => "–".into(),
            };
            let each: Vec<String> = m
                .cpu
                .serving
                .iter()
                .map(|c| per_request(*c, o.requests))
                .collect();
            let label = match m.case.kind {
                Kind::Complete => m.case.label(members),
                Kind::Stream => format!("{} (first chunk)", m.case.label(members)),
            };
            table.add_row(vec![
                label,
                m.case.concurrency.to_string(),
                format!("{:.0}", o.rps()),
                ms(o.latency.value_at_quantile(0.5)),
                ms(o.latency.value_at_quantile(0.99)),
                ratio,
                per_request(m.cpu.gateway, o.requests),
                per_request(m.cpu.serving_total(), o.requests),
                each.join(" / "),
                per_request(m.cpu.loadgen, o.requests),
                per_request(m.cpu.machine.network(), o.requests),
                spread(&m.served),
                errors(o),
                m.reruns.to_string(),
            ]);
        }
        println!("{table}");
    }

    /// The pool against one publisher, and against the same members called by name:
    /// throughput and CPU per request, the issue's "the pool must not cost more than
    /// 10 % per request" read on the gateway's CPU.
    fn print_comparison(members: usize, results: &[Measured]) {
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "transport, kind, c".to_owned(),
            "req/s single → by name → pool".to_owned(),
            "pool ÷ single req/s".to_owned(),
            "p50 ms single → by name → pool".to_owned(),
            "gateway CPU µs/req single → by name → pool".to_owned(),
            "gateway CPU pool ÷ single".to_owned(),
            "gateway CPU pool ÷ by name".to_owned(),
            "publishers CPU µs/req single → by name → pool".to_owned(),
            "all our CPU µs/req single → by name → pool".to_owned(),
        ]);
        let fmt3 = |f: &dyn Fn(&Measured) -> String, ms: &[Option<&Measured>]| {
            ms.iter()
                .map(|m| m.map_or("–".to_owned(), f))
                .collect::<Vec<_>>()
                .join(" → ")
        };
        for pool in results.iter().filter(|m| m.case.target == Target::Pool) {
            let find = |target: Target| {
                results.iter().find(|m| {
                    m.case
                        == Case {
                            target,
                            ..pool.case
                        }
                })
            };
            let Some(single) = find(Target::Single) else {
                continue;
            };
            let by_name = find(Target::Members);
            let three = [Some(single), by_name, Some(pool)];
            let gateway = |m: &Measured| micros_per_request(m.cpu.gateway, m.outcome.requests);
            let ratio = |a: f64, b: f64| format!("{:.2}", a / b.max(1e-9));
            table.add_row(vec![
                format!(
                    "{}, {}, c={}",
                    pool.case.transport.name(),
                    match pool.case.kind {
                        Kind::Complete => "complete",
                        Kind::Stream => "stream",
                    },
                    pool.case.concurrency
                ),
                fmt3(&|m| format!("{:.0}", m.outcome.rps()), &three),
                ratio(pool.outcome.rps(), single.outcome.rps()),
                fmt3(&|m| ms(m.outcome.latency.value_at_quantile(0.5)), &three),
                fmt3(&|m| format!("{:.0}", gateway(m)), &three),
                ratio(gateway(pool), gateway(single)),
                by_name.map_or("–".into(), |b| ratio(gateway(pool), gateway(b))),
                fmt3(
                    &|m| {
                        format!(
                            "{:.0}",
                            micros_per_request(m.cpu.serving_total(), m.outcome.requests)
                        )
                    },
                    &three,
                ),
                fmt3(
                    &|m| {
                        format!(
                            "{:.0}",
                            micros_per_request(m.cpu.ours(), m.outcome.requests)
                        )
                    },
                    &three,
                ),
            ]);
        }
        println!(
            "\npool of {members} against one publisher and against its members called by name:\n\n{table}"
        );
    }

    /// The admission queue under `--mock-delay`: throughput against what the capacity
    /// allows, latency, the time spent queued, and what failed.
    fn print_queue(args: &Args, members: usize, capacity: usize, results: &[Measured]) {
        let delay = args.mock_delay.as_secs_f64();
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "case",
            "c",
            "capacity",
            "capacity ÷ delay, req/s",
            "req/s (share)",
            "p50 / p99 ms",
            "p50 / p99 − delay, ms",
            "queued (share of upstream calls)",
            "queue wait mean ms",
            "queue wait p50 / p99 ms (bucket)",
            "queue rejections",
            "errors",
        ]);
        let bucket = |q: Option<(f64, f64, f64)>| match q {
            None => "–".to_owned(),
            Some((estimate, lower, upper)) => format!(
                "{:.1} ({:.1}–{})",
                estimate * 1e3,
                lower * 1e3,
                if upper.is_infinite() {
                    "∞".to_owned()
                } else {
                    format!("{:.1}", upper * 1e3)
                }
            ),
        };
        for m in results {
            let o = &m.outcome;
            let slots = match m.case.target {
                Target::Single => capacity,
                Target::Pool | Target::Members => members * capacity,
            };
            let rate = slots as f64 / delay.max(1e-9);
            let (p50, p99) = (
                o.latency.value_at_quantile(0.5),
                o.latency.value_at_quantile(0.99),
            );
            let delay_ns = super::duration_ns(args.mock_delay);
            let rejections: Vec<String> = m
                .queue
                .rejections
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            table.add_row(vec![
                m.case.label(members),
                m.case.concurrency.to_string(),
                slots.to_string(),
                format!("{rate:.0}"),
                format!("{:.0} ({:.0} %)", o.rps(), 100.0 * o.rps() / rate.max(1e-9)),
                format!("{} / {}", ms(p50), ms(p99)),
                format!(
                    "{} / {}",
                    ms(p50.saturating_sub(delay_ns)),
                    ms(p99.saturating_sub(delay_ns))
                ),
                // Both the gateway's histogram and the mock count in the same window,
                // requests started during the warm-up included.
                format!(
                    "{} ({:.0} %)",
                    m.queue.count,
                    100.0 * m.queue.count as f64 / m.served.iter().sum::<u64>().max(1) as f64
                ),
                m.queue
                    .mean()
                    .map_or("–".into(), |s| format!("{:.1}", s * 1e3)),
                format!(
                    "{} / {}",
                    bucket(m.queue.quantile(0.5)),
                    bucket(m.queue.quantile(0.99))
                ),
                if rejections.is_empty() {
                    "0".to_owned()
                } else {
                    rejections.join(", ")
                },
                errors(o),
            ]);
        }
        println!(
            "\nadmission queue, mock delay {:?} (queue wait: the gateway's virtual_llm_queue_wait_seconds over the measured time, requests that waited only; p50/p99 estimated within the histogram's buckets):\n\n{table}",
            args.mock_delay
        );
    }
}

/// Replicas mode (issue #15, `--replicas 2`): what the hop between two gateway
/// replicas costs. Two gateway children (`--store postgres://… --nats nats://…
/// --replica-id`) share one PostgreSQL and one nats-server, both started here as the
/// tests start them (temporary directories, free ports, the binaries on PATH); one
/// publisher per transport connects to replica A. Each case runs twice in the same
/// run: the client calling A (same replica as the publisher's channel) and calling B
/// (the task crosses NATS to A, its results come back). The table compares them:
/// added p50 (target ≤ 0.3 ms at c=1) and the throughput B keeps (target ≥ 60 % at
/// c=64), and the CPU time per request of replica A, replica B, nats-server and the
/// case's publisher over the measured time (`/proc`): a figure that moves less from
/// run to run than latency on a shared two-core machine.
mod replicas {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use comfy_table::Table;
    use serde_json::json;
    use virtual_llm_nats::testing::NatsServer;
    use virtual_llm_postgres::testing::PgServer;

    use super::{
        ASCII_MARKDOWN, Args, Binaries, BoxError, GatewayChild, Kind, Transport, WorkDir,
        control_client, load, mock, ms, procfs, progress, relay,
    };

    /// One case: a transport, a kind of request, a concurrency, and which replica the
    /// client calls.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Case {
        transport: Transport,
        kind: Kind,
        concurrency: usize,
        cross: bool,
    }

    struct Measured {
        case: Case,
        outcome: load::Outcome,
        cpu: Cpu,
    }

    /// CPU time of the processes a request crosses (the load client and the mock
    /// apart), over a case's measured time.
    #[derive(Clone, Copy, Debug, Default)]
    struct Cpu {
        /// Replica A, which holds the publishers' channels.
        a: Duration,
        /// Replica B, which the client calls in the cross-replica case.
        b: Duration,
        nats: Duration,
        /// The publisher of the case's transport.
        publisher: Duration,
    }

    impl Cpu {
        fn since(&self, before: &Cpu) -> Cpu {
            Cpu {
                a: self.a.saturating_sub(before.a),
                b: self.b.saturating_sub(before.b),
                nats: self.nats.saturating_sub(before.nats),
                publisher: self.publisher.saturating_sub(before.publisher),
            }
        }

        fn total(&self) -> Duration {
            self.a + self.b + self.nats + self.publisher
        }
    }

    /// Microseconds of `cpu` per request of `outcome`.
    fn per_request(cpu: Duration, outcome: &load::Outcome) -> f64 {
        cpu.as_secs_f64() * 1e6 / (outcome.requests.max(1) as f64)
    }

    pub(crate) async fn run(args: &Args, bins: &Binaries) -> Result<(), BoxError> {
        let dir = WorkDir::new(args.keep)?;
        let http = control_client()?;
        let mut pg = PgServer::start().map_err(|e| format!("PostgreSQL: {e}"))?;
        let db = pg.create_database().await?;
        let nats = NatsServer::start().map_err(|e| format!("nats-server: {e}"))?;
        let upstream = mock::start(args.mock_delay).await?.addr;
        let mut replicas = Vec::new();
        for id in ["gw-a", "gw-b"] {
            let flags = [
                "--store",
                db.as_str(),
                "--nats",
                nats.url().as_str(),
                "--replica-id",
                id,
            ]
            .map(str::to_owned);
            replicas.push(GatewayChild::start_with(bins, dir.path(), &http, id, &flags).await?);
        }
        let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
        let mut publishers = Vec::new();
        for &transport in &args.transports {
            let child = relay::start_publisher(
                bins,
                dir.path(),
                &http,
                &replicas[0],
                transport,
                upstream,
                max_concurrency,
                true,
            )
            .await?;
            // Replica B reads the row from the shared registry.
            active_on(&http, &replicas[1].url, &child.llm).await?;
            publishers.push((transport, child));
        }

        let mut cases = Vec::new();
        for &concurrency in &args.concurrency {
            for &kind in &args.kinds {
                for &transport in &args.transports {
                    for cross in [false, true] {
                        cases.push(Case {
                            transport,
                            kind,
                            concurrency,
                            cross,
                        });
                    }
                }
            }
        }
        println!(
            "replica cases: {} × ({:?} warm-up + {:?} measured)\n",
            cases.len(),
            args.warmup,
            args.duration,
        );
        let bar = progress(
            cases.len() as u64,
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )?;
        let mut results = Vec::new();
        for case in cases {
            let label = label(&case);
            bar.set_message(format!("{label} c={}", case.concurrency));
            let (_, p) = publishers
                .iter_mut()
                .find(|(t, _)| *t == case.transport)
                .ok_or("no publisher")?;
            p.guard.check_running()?;
            for r in &mut replicas {
                r.guard.check_running()?;
            }
            let stream = case.kind == Kind::Stream;
            let body = json!({
                "model": p.llm,
                "stream": stream,
                "max_tokens": 32,
                "messages": [{"role": "user", "content": "Say hello in a few words."}]
            });
            let target = Arc::new(load::Target {
                addr: replicas[usize::from(case.cross)].addr,
                bodies: vec![Bytes::from(body.to_string())],
                stream,
                chunks: mock::CHUNKS,
                rate: None,
            });
            let nats_pid = nats.pid().map(|pid| pid.to_string());
            let (a_pid, b_pid, publisher_pid) =
                (replicas[0].pid(), replicas[1].pid(), p.guard.pid());
            let sample = || {
                let cpu = |pid: &str| procfs::cpu(pid).unwrap_or_default();
                Cpu {
                    a: cpu(&a_pid),
                    b: cpu(&b_pid),
                    nats: nats_pid.as_deref().map(cpu).unwrap_or_default(),
                    publisher: cpu(&publisher_pid),
                }
            };
            let mut before = Cpu::default();
            let outcome = load::run(
                target,
                case.concurrency,
                args.warmup,
                args.duration,
                async || before = sample(),
            )
            .await?;
            let cpu = sample().since(&before);
            bar.println(format!(
                "{label:<34} c={:<3} {:>8.0} req/s  p50 {} ms  p99 {} ms  errors {}",
                case.concurrency,
                outcome.rps(),
                ms(outcome.latency.value_at_quantile(0.5)),
                ms(outcome.latency.value_at_quantile(0.99)),
                outcome.errors
            ));
            results.push(Measured { case, outcome, cpu });
            bar.inc(1);
        }
        bar.finish_and_clear();
        print_table(&results);
        for m in &results {
            if let Some(e) = &m.outcome.first_error {
                println!(
                    "first error of {} c={}: {e}",
                    label(&m.case),
                    m.case.concurrency
                );
            }
        }
        drop(replicas);
        drop(publishers);
        pg.stop(virtual_llm_postgres::testing::StopMode::Fast);
        Ok(())
    }

    fn label(case: &Case) -> String {
        let side = if case.cross {
            "client on B (cross-replica)"
        } else {
            "client on A (same replica)"
        };
        match case.kind {
            Kind::Complete => format!("{} {side}", case.transport.name()),
            Kind::Stream => format!("{} stream {side}", case.transport.name()),
        }
    }

    /// Waits (at most 30 s) until `llm` reads active on the gateway at `url`.
    async fn active_on(http: &reqwest::Client, url: &str, llm: &str) -> Result<(), BoxError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(format!("{url}/api/v1/llms/{llm}")).send().await
                && response.status().is_success()
                && let Ok(row) = response.json::<serde_json::Value>().await
                && row["status"] == "active"
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{llm} did not become active on {url} within 30 s").into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Each case with the client on the same replica beside the same case across
    /// replicas, and the targets of issue #15.
    fn print_table(results: &[Measured]) {
        let mut table = Table::new();
        table.load_style(ASCII_MARKDOWN);
        table.set_header(vec![
            "transport",
            "kind",
            "c",
            "same p50 ms",
            "cross p50 ms",
            "added p50 ms",
            "same req/s",
            "cross req/s",
            "cross / same",
            "target",
            "same CPU µs/req",
            "cross CPU µs/req (A / B / NATS / publisher)",
        ]);
        for same in results.iter().filter(|m| !m.case.cross) {
            let Some(cross) = results.iter().find(|m| {
                m.case.cross
                    && m.case
                        == Case {
                            cross: true,
                            ..same.case
                        }
            }) else {
                continue;
            };
            let p50 = |m: &Measured| m.outcome.latency.value_at_quantile(0.5);
            let added_ms = (p50(cross) as f64 - p50(same) as f64) / 1e6;
            let ratio = cross.outcome.rps() / same.outcome.rps().max(1e-9);
            let target = match same.case.concurrency {
                1 => format!(
                    "added p50 ≤ 0.3 ms: {}",
                    if added_ms <= 0.3 { "met" } else { "MISSED" }
                ),
                64 => format!(
                    "≥ 60 % of req/s: {}",
                    if ratio >= 0.6 { "met" } else { "MISSED" }
                ),
                _ => String::new(),
            };
            table.add_row(vec![
                same.case.transport.name().to_owned(),
                match same.case.kind {
                    Kind::Complete => "complete".to_owned(),
                    Kind::Stream => "stream (first chunk)".to_owned(),
                },
                same.case.concurrency.to_string(),
                ms(p50(same)),
                ms(p50(cross)),
                format!("{added_ms:+.3}"),
                format!("{:.0}", same.outcome.rps()),
                format!("{:.0}", cross.outcome.rps()),
                format!("{:.0} %", ratio * 100.0),
                target,
                format!("{:.0}", per_request(same.cpu.total(), &same.outcome)),
                format!(
                    "{:.0} ({:.0} / {:.0} / {:.0} / {:.0})",
                    per_request(cross.cpu.total(), &cross.outcome),
                    per_request(cross.cpu.a, &cross.outcome),
                    per_request(cross.cpu.b, &cross.outcome),
                    per_request(cross.cpu.nats, &cross.outcome),
                    per_request(cross.cpu.publisher, &cross.outcome),
                ),
            ]);
        }
        println!("\n## Across replicas (issue #15)\n\n{table}");
    }
}
