//! The reference gateway: the registry on an embedded redb file, the SSE and WebSocket
//! transports,
//! token auth, public LLMs, the GC, the active agents as MCP tools at `/mcp`, and a
//! graceful shutdown.
//!
//! Run with: `cargo run --release --example gateway` (listens on 127.0.0.1:8080, keeps
//! its registry under `./data`). `--help` lists the flags; `--config FILE` reads a TOML
//! file (see `docs/operations.md`). Built with `--features postgres`, `--store
//! postgres://…` keeps the registry in PostgreSQL instead, shared by every gateway
//! given the same URL (each with its own `--replica-id`); built with `--features nats`
//! too, `--nats nats://…` links those replicas through NATS, so a client may call any
//! of them whichever holds the publisher's channel.

/// mimalloc rather than the system allocator: a relayed request allocates and frees
/// many small buffers across threads, which glibc's allocator served with 15–20 % of
/// the process's CPU (docs/benchmarks.md, "The relay against the proxy floor").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod common;
#[path = "common/recipe.rs"]
mod recipes;

use clap::Parser;
use serde::Deserialize;
use virtual_llm::access::Access;
use virtual_llm::http::ServeOptions;
use virtual_llm::limits::Limits;
use virtual_llm::openai::{OpenAiBackend, OpenAiUpstream};
use virtual_llm::protocol::LlmSpec;
use virtual_llm::redb::{RedbOptions, RedbStore};
use virtual_llm::{
    Authenticator, Config, Gateway, LlmName, OpenAccess, Principal, RecipeWaker, ReplicaId, Role,
    StaticTokens, Store, StoreError, WakeTarget, bearer_token,
};
use warp::Filter;

#[derive(Parser, Debug)]
#[command(name = env!("CARGO_BIN_NAME"), about = "virtual-llm reference gateway", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the registry's redb file.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Keep the registry in PostgreSQL (`postgres://user:password@host/db`), shared
    /// with the other gateways given the same URL, instead of the redb file in
    /// `--data-dir`. Needs a build with the `postgres` feature.
    #[arg(long, value_name = "URL", env = "VIRTUAL_LLM_STORE")]
    store: Option<String>,
    /// This gateway's replica id, recorded on the rows whose channel it holds; keep it
    /// across restarts (so a restart releases only its own rows) and unique among the
    /// gateways sharing a `--store`. Default: `local` with the redb file, a fresh one
    /// with `--store`.
    #[arg(long, value_name = "ID")]
    replica_id: Option<String>,
    /// Link this gateway to the other replicas sharing its `--store` through the NATS
    /// server(s) at this URL (`nats://host:4222`, several comma-separated): a client
    /// of any replica reaches a publisher connected to any other. Needs `--store` and
    /// a build with the `nats` feature.
    #[arg(long, value_name = "URL", env = "VIRTUAL_LLM_NATS")]
    nats: Option<String>,
    /// How long this replica's lease runs after each renewal (every 5 s) when several
    /// gateways share a `--store`: when a replica dies, the rows whose channels it
    /// held go inactive this long (plus a 2 s clock margin) after its last renewal
    /// (default `15s`; at least `10s`). Without `--store` (one process) it is unused.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// Take an existing but empty (zero-byte) `registry.redb` as a new, empty
    /// registry. Without it such a file is refused as corrupted: it is what a failed
    /// restore or a copy onto a full disk leaves, and starting empty frees every name.
    #[arg(long)]
    fresh_store: bool,
    /// TOML file with tokens, public LLMs, limits and timings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen on a non-loopback address even though no tokens are configured.
    #[arg(long)]
    insecure: bool,
    /// Heartbeat interval sent to publishers (e.g. `30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_every: Option<Duration>,
    /// No heartbeat for this long makes a row inactive (e.g. `90s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    stale_after: Option<Duration>,
    /// Inactive rows are deleted after this long (e.g. `4h`).
    #[arg(long, value_parser = humantime::parse_duration)]
    reap_after: Option<Duration>,
    /// GC sweep period (e.g. `60s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    gc_every: Option<Duration>,
    /// Total deadline of a non-streaming request (e.g. `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    task_deadline: Option<Duration>,
    /// Keep-alive ping period on idle control channels, sent to publishers, whose
    /// watchdog waits three of them (e.g. `20s`); shorter than `--stale-after`.
    #[arg(long, value_parser = humantime::parse_duration)]
    keepalive: Option<Duration>,
    /// Most requests waiting in one pool's queue for a free slot; one more is a 429
    /// `queue_full` (default 256).
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Longest a request waits in a pool's queue before a 503 `queue_timeout`
    /// (default `30s`; a client's `x-request-timeout` may ask for less).
    #[arg(long, value_parser = humantime::parse_duration)]
    queue_wait: Option<Duration>,
    /// Other members of a pool a request is sent to when a dispatch fails before its
    /// first byte (default 2).
    #[arg(long)]
    pool_retries: Option<usize>,
    /// How long a row whose last dispatches failed is passed over (default `5s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    cooldown: Option<Duration>,
    /// Longest a request waits for a hibernating LLM to wake before a 503
    /// `wake_timeout` (default `120s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    wake_wait: Option<Duration>,
    /// After a failed wake, how long requests get 503 `wake_failed` at once and no
    /// wake is tried again (default `30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    wake_cooldown: Option<Duration>,
    /// How long the in-flight tasks of a publisher that resumes wait for its next
    /// channel after its channel drops (default `10s`; `0s` fails them at once).
    #[arg(long, value_parser = humantime::parse_duration)]
    resume_window: Option<Duration>,
    /// Let browser pages from this origin call the gateway (CORS), e.g.
    /// `https://chat.example.com` (repeatable; `*` for any origin). Off by default.
    #[arg(long, value_name = "ORIGIN")]
    cors_origin: Vec<String>,
    /// How long in-flight requests may finish at shutdown.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    grace: Duration,
    /// A client (or publisher) whose connection takes no bytes for this long is
    /// disconnected, and what it was sent is dropped (default `30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    write_timeout: Option<Duration>,
    /// Longest gap between two pieces of a request body (default `10m`); above the
    /// task deadline and the stream idle timeout, since a publisher's result post
    /// stays silent until its answer comes.
    #[arg(long, value_parser = humantime::parse_duration)]
    body_read_timeout: Option<Duration>,
    /// Most connections open at once; past it new ones wait in the listen backlog
    /// (default 32768).
    #[arg(long)]
    max_connections: Option<usize>,
    /// An HTTP/2 connection with no request in flight is closed after this long
    /// (default `75s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    http2_idle_timeout: Option<Duration>,
    /// Threads that serve connections: 0 (the default) is one per CPU; 1 runs
    /// everything on one thread, which is faster when the gateway shares a small
    /// machine with its publishers. Each thread is a worker with its connections
    /// (`virtual_llm::http::Workers`), unless `--work-stealing`.
    #[arg(long, default_value_t = 0)]
    threads: u16,
    /// Serve on tokio's work-stealing runtime with `--threads` workers (any thread
    /// runs any task) instead of a worker per thread, each with its connections.
    #[arg(long)]
    work_stealing: bool,
}

/// Where the registry lives: the redb file, or PostgreSQL (`--store`).
enum Registry {
    Redb(Arc<RedbStore>),
    #[cfg(feature = "postgres")]
    Postgres(Arc<virtual_llm::postgres::PgStore>),
}

impl Registry {
    async fn open(args: &Args) -> Result<Self, common::BoxError> {
        if let Some(url) = &args.store {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!(
                    "--store takes a PostgreSQL URL (postgres://…), not {:?}",
                    url.split(':').next().unwrap_or_default()
                )
                .into());
            }
            #[cfg(feature = "postgres")]
            return Ok(Registry::Postgres(Arc::new(
                virtual_llm::postgres::PgStore::connect(url).await?,
            )));
            #[cfg(not(feature = "postgres"))]
            return Err(
                "--store postgres://… needs a gateway built with --features postgres".into(),
            );
        }
        std::fs::create_dir_all(&args.data_dir)
            .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
        let options = RedbOptions::default().accept_empty_file(args.fresh_store);
        let store = RedbStore::open_with(args.data_dir.join("registry.redb"), options).await?;
        Ok(Registry::Redb(Arc::new(store)))
    }

    fn store(&self) -> Arc<dyn Store> {
        match self {
            Registry::Redb(s) => s.clone(),
            #[cfg(feature = "postgres")]
            Registry::Postgres(s) => s.clone(),
        }
    }

    /// For the log: the file, or the database (never its password).
    fn describe(&self) -> String {
        match self {
            Registry::Redb(s) => s.path().display().to_string(),
            #[cfg(feature = "postgres")]
            Registry::Postgres(s) => format!("postgres {}", s.target()),
        }
    }

    /// Releases the redb file; a PostgreSQL store has nothing held (its heartbeats
    /// were flushed with the gateway's).
    async fn close(&self) -> Result<(), StoreError> {
        match self {
            Registry::Redb(s) => s.close().await,
            #[cfg(feature = "postgres")]
            Registry::Postgres(_) => Ok(()),
        }
    }
}

/// How this replica reaches the others: nothing (one gateway, or replicas that share
/// only the registry), or NATS (`--nats`).
enum Plane {
    Alone,
    #[cfg(feature = "nats")]
    Nats(virtual_llm::nats::NatsPlane),
}

impl Plane {
    async fn connect(
        url: Option<&str>,
        replica: Option<ReplicaId>,
    ) -> Result<Self, common::BoxError> {
        let (Some(url), Some(replica)) = (url, replica) else {
            return Ok(Plane::Alone);
        };
        #[cfg(feature = "nats")]
        {
            let options = virtual_llm::nats::NatsOptions::default();
            let plane = virtual_llm::nats::NatsPlane::connect(url, replica, options).await?;
            tracing::info!(replica = %plane.replica(), max_payload = plane.max_payload(), "linked to the other replicas through NATS");
            Ok(Plane::Nats(plane))
        }
        #[cfg(not(feature = "nats"))]
        {
            let _ = (url, replica);
            Err("--nats nats://… needs a gateway built with --features nats".into())
        }
    }

    /// `builder` with the plane's channel directory and task router.
    fn link(&self, builder: virtual_llm::GatewayBuilder) -> virtual_llm::GatewayBuilder {
        match self {
            Plane::Alone => builder,
            #[cfg(feature = "nats")]
            Plane::Nats(p) => builder
                .directory(p.directory())
                .task_router(p.task_router()),
        }
    }

    /// Hands the started gateway what the peers forward.
    #[cfg_attr(not(feature = "nats"), allow(unused_variables))] // alone: nothing to hand
    fn serve(&self, gateway: &Gateway) {
        match self {
            Plane::Alone => {}
            #[cfg(feature = "nats")]
            Plane::Nats(p) => p.serve(gateway.inbound()),
        }
    }

    /// Tells the peers this replica leaves, once its channels are closed.
    async fn shutdown(&self) {
        match self {
            Plane::Alone => {}
            #[cfg(feature = "nats")]
            Plane::Nats(p) => p.shutdown().await,
        }
    }
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Timings and limits, keys as in `virtual_llm::Config` (`staleAfter = "90s"`).
    #[serde(default)]
    gateway: Option<Config>,
    #[serde(default)]
    tokens: Vec<TokenConfig>,
    #[serde(default)]
    public: Vec<PublicConfig>,
    /// How to wake a host whose publisher has no channel while it sleeps.
    #[serde(default)]
    wake: Vec<WakeConfig>,
    /// The server's connection limits and timeouts.
    #[serde(default)]
    server: ServerConfig,
}

/// The `[server]` table: the HTTP server's limits (`virtual_llm::http::ServeOptions`);
/// the flags of the same names override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServerConfig {
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    write_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_read_timeout: Option<Duration>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    http2_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    linger: Option<Duration>,
}

impl ServerConfig {
    /// The server's options: the flags, else this table, else the defaults; refused
    /// when a duration or the cap is zero, or the body read timeout would cut off a
    /// publisher's result post that is still within the task's deadlines.
    fn options(&self, args: &Args, config: &Config) -> Result<ServeOptions, String> {
        let mut options = ServeOptions::default();
        options.grace = args.grace;
        let durations = [
            (
                "headerReadTimeout",
                &mut options.header_read_timeout,
                None,
                self.header_read_timeout,
            ),
            (
                "writeTimeout",
                &mut options.write_timeout,
                args.write_timeout,
                self.write_timeout,
            ),
            (
                "bodyReadTimeout",
                &mut options.body_read_timeout,
                args.body_read_timeout,
                self.body_read_timeout,
            ),
            (
                "http2IdleTimeout",
                &mut options.http2_idle_timeout,
                args.http2_idle_timeout,
                self.http2_idle_timeout,
            ),
        ];
        for (name, field, flag, file) in durations {
            if let Some(value) = flag.or(file) {
                if value.is_zero() {
                    return Err(format!("[server] {name} must be more than 0"));
                }
                *field = value;
            }
        }
        if let Some(linger) = self.linger {
            options.linger = linger;
        }
        if let Some(max) = args.max_connections.or(self.max_connections) {
            if max == 0 {
                return Err(
                    "[server] maxConnections (--max-connections) must be at least 1".into(),
                );
            }
            options.max_connections = max;
        }
        let longest = config.task_deadline.max(config.stream_idle_timeout);
        if options.body_read_timeout <= longest {
            return Err(format!(
                "[server] bodyReadTimeout (--body-read-timeout, {:?}) must be longer than taskDeadline and streamIdleTimeout ({longest:?}): a publisher's result post is silent until its answer comes",
                options.body_read_timeout
            ));
        }
        Ok(options)
    }
}

/// A `[[wake]]` table: the pool or the llm it wakes, and the recipe (a webhook `url`
/// with `method`, `headers`, `body`; or a `command`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WakeConfig {
    pool: Option<String>,
    llm: Option<String>,
    #[serde(flatten)]
    recipe: recipes::RecipeConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenConfig {
    /// The token itself, or…
    token: Option<String>,
    /// …the environment variable holding it.
    token_env: Option<String>,
    principal: String,
    roles: Vec<RoleConfig>,
    /// Pools another principal owns that this one's rows may join.
    #[serde(default)]
    pools: Vec<String>,
    /// This principal's limits, over `[gateway.limits]` (SPEC §16).
    limits: Option<Limits>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RoleConfig {
    Publisher,
    Client,
    Admin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PublicConfig {
    name: String,
    url: String,
    model: String,
    #[serde(rename = "type", default = "common::openai")]
    provider_type: String,
    tier: Option<String>,
    /// Environment variable holding the upstream's API key.
    api_key_env: Option<String>,
    /// Who may see and call it: `"public"` (default), `"owner"` (admins only: the
    /// config owns public rows), or principal ids.
    #[serde(default)]
    access: Access,
}

fn main() -> std::process::ExitCode {
    common::init_tracing();
    let args = Args::parse();
    // The workers outlive `run`, and so everything it spawned on them (WebSocket
    // sessions, the store's and the completion log's background tasks); they are
    // stopped here, out of any runtime, once the store is closed.
    let workers = match (args.work_stealing, args.threads) {
        (true, _) | (false, 1) => None,
        (false, 0) => Some(std::thread::available_parallelism().map_or(1, usize::from)),
        (false, n) => Some(usize::from(n)),
    }
    .map(virtual_llm::http::Workers::start)
    .transpose();
    let outcome = workers.map_err(Into::into).and_then(|workers| {
        let handles = workers.as_ref().map(virtual_llm::http::Workers::handles);
        let outcome = common::runtime(if args.work_stealing { args.threads } else { 1 })
            .map_err(Into::into)
            .and_then(|rt| rt.block_on(run(args, handles.unwrap_or_default())));
        drop(workers);
        outcome
    });
    common::exit(outcome)
}

async fn run(args: Args, workers: Vec<tokio::runtime::Handle>) -> Result<(), common::BoxError> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| common::toml_error(path, &text, &e))?
        }
        None => FileConfig::default(),
    };
    let mut config = file.gateway.clone().unwrap_or_default();
    let overrides = [
        (&mut config.heartbeat_interval, args.heartbeat_every),
        (&mut config.stale_after, args.stale_after),
        (&mut config.reap_after, args.reap_after),
        (&mut config.gc_every, args.gc_every),
        (&mut config.task_deadline, args.task_deadline),
        (&mut config.keepalive, args.keepalive),
        (&mut config.queue_wait, args.queue_wait),
        (&mut config.cooldown, args.cooldown),
        (&mut config.wake_wait, args.wake_wait),
        (&mut config.wake_cooldown, args.wake_cooldown),
        (&mut config.lease, args.lease),
        (&mut config.resume_window, args.resume_window),
    ];
    for (field, value) in overrides {
        if let Some(value) = value {
            *field = value;
        }
    }
    for (field, value) in [
        (&mut config.queue_depth, args.queue_depth),
        (&mut config.pool_retries, args.pool_retries),
    ] {
        if let Some(value) = value {
            *field = value;
        }
    }
    // Before anything is opened: a gateway that cannot work says so and stops.
    config.validate().map_err(|e| config_error(&e))?;
    let mut serve_options = file.server.options(&args, &config)?;
    serve_options.workers = workers;
    virtual_llm::http::check_origins(&args.cors_origin).map_err(|e| config_error(&e))?;
    let auth = authenticator(&file.tokens)?;
    if file.tokens.is_empty() && !args.listen.ip().is_loopback() && !args.insecure {
        return Err(format!(
            "refusing to listen on {} without tokens: anyone could publish and call; configure [[tokens]] or pass --insecure",
            args.listen
        )
        .into());
    }

    if args.nats.is_some() && args.store.is_none() {
        return Err(
            "--nats links replicas that share a registry: give --store postgres://… too".into(),
        );
    }
    let registry = Registry::open(&args).await?;
    let mut builder = Gateway::builder(registry.store())
        .config(config)
        .authenticator(auth);
    let replica = match &args.replica_id {
        Some(id) => Some(ReplicaId::parse(id).map_err(|e| config_error(&e))?),
        None if args.store.is_some() => {
            let id = ReplicaId::generate();
            tracing::info!(replica = %id, "no --replica-id: this gateway's replica id is new");
            Some(id)
        }
        None => None,
    };
    if let Some(replica) = &replica {
        builder = builder.replica(replica.clone());
    }
    let plane = Plane::connect(args.nats.as_deref(), replica).await?;
    builder = plane.link(builder);
    if !file.public.is_empty() {
        builder = builder.public_backend(Arc::new(public_backend(&file.public)?));
    }
    if !file.wake.is_empty() {
        builder = builder.waker(Arc::new(waker(&file.wake)?));
    }
    let gateway = builder.start().await?;
    plane.serve(&gateway);
    let admin = Principal::new("config", [Role::Admin]);
    for public in &file.public {
        let spec = LlmSpec {
            name: LlmName::parse(&public.name)?,
            provider_type: public.provider_type.clone(),
            model: public.model.clone(),
            tier: public.tier.clone(),
            pool: None,
            max_concurrent: None,
            state: None,
            access: public.access.clone(),
        };
        match gateway.put_public(&admin, spec).await {
            Ok(_) => {}
            // A publisher took the name first: the gateway serves everything else, and
            // says loudly what the operator can do.
            Err(e @ virtual_llm::Error::Conflict { .. }) => tracing::warn!(
                llm = %public.name,
                error = %e,
                "public llm not published: a publisher's llm already has this name; \
                 take the name back with `llmctl delete llm {}` and restart the gateway",
                public.name
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let gc = gateway.spawn_gc();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(virtual_llm::metrics::LATENCY_BUCKETS)?
        .install_recorder()?;
    virtual_llm::metrics::describe();

    // Listening for the signals before the socket: a SIGTERM sent once it answers
    // drains it.
    let shutdown = common::shutdown_signal();
    let listener =
        virtual_llm::http::bind(args.listen).map_err(|e| format!("{}: {e}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        registry = %registry.describe(),
        auth = if file.tokens.is_empty() { "none (loopback only)" } else { "tokens" },
        "gateway ready"
    );
    let closing = gateway.clone();
    let grace = args.grace;
    let channels = [
        virtual_llm::sse::route(gateway.clone()),
        virtual_llm::ws::route(gateway.clone()),
    ];
    // The active agents as MCP tools at `/mcp`; its sessions' event streams end when
    // the shutdown starts.
    let mcp_shutdown = virtual_llm::http::mcp::CancellationToken::new();
    let mcp = virtual_llm::http::mcp::routes(gateway.clone(), mcp_shutdown.clone());
    let metrics = metrics_route(gateway.clone(), prometheus)
        .or(mcp)
        .unify()
        .boxed();
    let mut routes = virtual_llm::http::routes_with(gateway.clone(), channels, metrics);
    if !args.cors_origin.is_empty() {
        routes = virtual_llm::http::with_cors(routes, &args.cors_origin)?;
    }
    if file.tokens.is_empty() && args.listen.ip().is_loopback() {
        // Every caller is an admin: answer programs of this machine, not web pages.
        routes = virtual_llm::http::local_only(routes, &args.cors_origin);
    }
    virtual_llm::http::serve_with(
        listener,
        routes,
        async move {
            shutdown.await;
            tracing::info!(grace = ?grace, "shutting down: refusing new requests, finishing those in flight");
            mcp_shutdown.cancel();
            closing.drain(grace).await;
        },
        serve_options,
    )
    .await;
    // A WebSocket session outlives its HTTP connection (the upgrade hands the socket
    // over), so `serve` does not wait for it: wait, within the grace period, until
    // every channel is unbound and its rows written, before the store closes.
    if !gateway.settle(args.grace).await {
        tracing::warn!(grace = ?args.grace, "channels still open after the grace period; closing the store under them");
    }
    plane.shutdown().await;
    gc.shutdown().await;
    gateway.flush().await?;
    registry.close().await?;
    tracing::info!("registry flushed; bye");
    Ok(())
}

/// The flags of the reference gateway that set a [`Config`] key.
const FLAGS: [(&str, &str); 15] = [
    ("corsOrigin", "--cors-origin"),
    ("resumeWindow", "--resume-window"),
    ("lease", "--lease"),
    ("wakeWait", "--wake-wait"),
    ("wakeCooldown", "--wake-cooldown"),
    ("heartbeatInterval", "--heartbeat-every"),
    ("queueDepth", "--queue-depth"),
    ("queueWait", "--queue-wait"),
    ("poolRetries", "--pool-retries"),
    ("cooldown", "--cooldown"),
    ("staleAfter", "--stale-after"),
    ("reapAfter", "--reap-after"),
    ("gcEvery", "--gc-every"),
    ("taskDeadline", "--task-deadline"),
    ("keepalive", "--keepalive"),
];

/// A configuration error in this binary's words: the core's reason, then where each
/// setting it names is set (a flag, or the `[gateway]` table of `--config`).
fn config_error(e: &virtual_llm::Error) -> common::BoxError {
    let virtual_llm::Error::InvalidConfig { settings, .. } = e else {
        return e.to_string().into();
    };
    let flags: Vec<&str> = settings
        .iter()
        .filter_map(|key| FLAGS.iter().find(|(k, _)| k == key).map(|(_, flag)| *flag))
        .collect();
    let keys = settings.join(", ");
    let place = if flags.is_empty() {
        format!("set {keys} under [gateway] in --config")
    } else {
        format!(
            "set with {}, or {keys} under [gateway] in --config",
            flags.join(", ")
        )
    };
    format!("{e} ({place})").into()
}

/// `GET /metrics`: Prometheus text, for admins (everyone, without tokens).
fn metrics_route(
    gateway: Gateway,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .then(move |authorization: Option<String>| {
            let (gateway, prometheus) = (gateway.clone(), prometheus.clone());
            async move {
                let allowed = gateway
                    .authenticate(authorization.as_deref().and_then(bearer_token))
                    .await
                    .and_then(|who| who.require(Role::Admin));
                if let Err(e) = allowed {
                    return virtual_llm::http::error_response(&e);
                }
                if let Err(e) = gateway.refresh_gauges().await {
                    tracing::warn!(error = %e, "gauges not refreshed");
                }
                use warp::Reply;
                warp::reply::with_header(
                    prometheus.render(),
                    "content-type",
                    "text/plain; version=0.0.4",
                )
                .into_response()
            }
        })
        .boxed()
}

fn authenticator(tokens: &[TokenConfig]) -> Result<Arc<dyn Authenticator>, common::BoxError> {
    if tokens.is_empty() {
        return Ok(Arc::new(OpenAccess));
    }
    let mut table = StaticTokens::new();
    let mut seen = HashMap::new();
    let mut limits_of = HashMap::new();
    for t in tokens {
        let token = match (&t.token, &t.token_env) {
            (Some(token), None) => token.clone(),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("token of {}: ${var} is not set", t.principal))?,
            _ => {
                return Err(format!(
                    "token of {}: give exactly one of token or tokenEnv",
                    t.principal
                )
                .into());
            }
        };
        if token.len() < 16 {
            return Err(format!("token of {} is shorter than 16 characters", t.principal).into());
        }
        if seen.insert(token.clone(), t.principal.clone()).is_some() {
            return Err(format!("token of {} is used twice", t.principal).into());
        }
        let roles = t.roles.iter().map(|r| match r {
            RoleConfig::Publisher => Role::Publisher,
            RoleConfig::Client => Role::Client,
            RoleConfig::Admin => Role::Admin,
        });
        for pool in &t.pools {
            LlmName::parse(pool).map_err(|e| format!("pools of {}: {e}", t.principal))?;
        }
        let mut principal = Principal::new(t.principal.clone(), roles).with_pools(t.pools.clone());
        if let Some(own) = &t.limits {
            own.validate()
                .map_err(|e| format!("limits of {}: {e}", t.principal))?;
            principal = principal.with_limits(own.clone());
        }
        // Limits are counted per principal: its tokens must agree on them.
        if let Some(other) = limits_of.insert(t.principal.clone(), t.limits.clone())
            && other != t.limits
        {
            return Err(format!(
                "the tokens of {} set different limits; give them the same",
                t.principal
            )
            .into());
        }
        table = table.with(token, principal);
    }
    Ok(Arc::new(table))
}

/// The `[[wake]]` tables as one waker: the first table naming a row's llm or pool
/// wakes it.
fn waker(tables: &[WakeConfig]) -> Result<RecipeWaker, common::BoxError> {
    let mut waker = RecipeWaker::new();
    for (i, t) in tables.iter().enumerate() {
        let target = match (&t.pool, &t.llm) {
            (Some(pool), None) => WakeTarget::Pool(LlmName::parse(pool)?),
            (None, Some(llm)) => WakeTarget::Llm(LlmName::parse(llm)?),
            _ => {
                return Err(format!("[[wake]] #{}: give exactly one of pool or llm", i + 1).into());
            }
        };
        let recipe = recipes::recipe(&format!("[[wake]] #{}", i + 1), &t.recipe)?;
        waker = waker.with(target, recipe);
    }
    Ok(waker)
}

fn public_backend(public: &[PublicConfig]) -> Result<OpenAiBackend, common::BoxError> {
    let mut backend = OpenAiBackend::new();
    for p in public {
        let mut upstream = OpenAiUpstream::new(&p.url)?;
        if let Some(var) = &p.api_key_env {
            let key = std::env::var(var)
                .map_err(|_| format!("public llm {}: ${var} is not set", p.name))?;
            upstream = upstream.with_api_key(&key)?;
        }
        backend = backend.with_llm(LlmName::parse(&p.name)?, upstream, p.model.clone());
    }
    Ok(backend)
}
