//! The reference publisher: publishes local OpenAI-compatible models (vLLM, llama.cpp,
//! Ollama, LM Studio) and built-in echo models into a gateway, and answers the
//! requests the gateway relays.
//!
//! Run with: `cargo run --release --example publisher -- --echo demo`
//!
//! `--config FILE` is a JSON list of providers; only `"publish": true` entries are
//! published. `pool` and `maxConcurrent` are optional:
//!
//! ```json
//! [{ "name": "vllm-local", "type": "openai", "model": "meta-llama/Llama-3.1-8B-Instruct",
//!    "url": "http://127.0.0.1:8000/v1", "apiKey": "…", "publish": true,
//!    "pool": "llama-8b", "maxConcurrent": 8 }]
//! ```
//!
//! Every LLM is registered with a `maxConcurrent`: its entry's, or `--max-concurrent`
//! (32). The gateway never has more of its tasks in flight; this publisher runs up to
//! the sum of them at once, so it never holds back a task the gateway counts as
//! running. `--echo NAME@POOL` publishes an echo LLM in a pool.
//!
//! An entry may also say how its upstream wakes and sleeps (SPEC §12): `wake` and
//! `sleep` recipes, each `{"command": ["systemctl", "--user", "start", "vllm"]}` (no
//! shell) or `{"url": "…", "method": "POST", "headers": {…}, "body": …}` (`method`
//! defaults to `POST`; a string `body` is sent as it is, anything else as JSON);
//! `idleAfter` (e.g. `"15m"`: run `sleep` after that long without a task) and
//! `readyTimeout` (default `"120s"`: how long a wake may take to make the upstream
//! answer):
//!
//! ```json
//! [{ "name": "vllm-local", "model": "Qwen/Qwen2.5-7B-Instruct",
//!    "url": "http://127.0.0.1:8000/v1", "publish": true,
//!    "wake": {"url": "http://127.0.0.1:8000/wake_up"},
//!    "sleep": {"url": "http://127.0.0.1:8000/sleep?level=1"},
//!    "idleAfter": "15m", "readyTimeout": "60s" }]
//! ```
//!
//! Each upstream is probed (`GET {url}/models`) before every register and heartbeat:
//! one that does not answer is registered `asleep` when it has a `wake` recipe (the
//! gateway holds its requests and asks for a wake), else `unavailable`. `--echo` LLMs
//! are always ready and have no recipes.
//!
//! The file may also be an object, `{"providers": [...], "agents": [...]}`, to publish
//! agents (SPEC §13) next to the LLMs: personas over a published LLM (its name or pool
//! key, `--echo` ones included). `defaultParams` holds OpenAI request fields under
//! their own names:
//!
//! ```json
//! { "providers": [],
//!   "agents": [{ "name": "poet", "llm": "demo", "description": "Answers in verse",
//!                "systemPrompt": "You answer in verse.",
//!                "defaultParams": {"temperature": 0.9, "max_tokens": 256} }] }
//! ```

/// mimalloc rather than the system allocator: a relayed request allocates and frees
/// many small buffers across threads, which glibc's allocator served with 15–20 % of
/// the process's CPU (docs/benchmarks.md, "The relay against the proxy floor").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
#[path = "common/recipe.rs"]
mod recipes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use recipes::{RecipeConfig, recipe};
use serde::Deserialize;
use virtual_llm::openai::{OpenAiCatalog, OpenAiProvider, OpenAiUpstream};
use virtual_llm::protocol::{AgentSpec, LlmSpec, MAX_CONCURRENT};
use virtual_llm::publisher::{Catalog, FailoverWire, PublisherState, Wire};
use virtual_llm::sse::SseWire;
use virtual_llm::{
    EchoProvider, Error, LlmName, PublishedLlm, Publisher, PublisherOptions, SessionFileError,
    SessionFileLock,
};

#[derive(Parser, Debug)]
#[command(name = env!("CARGO_BIN_NAME"), about = "virtual-llm reference publisher", version)]
struct Args {
    /// The gateway's URL. Several gateway replicas: repeat the flag or separate the
    /// URLs with commas; the publisher connects through the first it reaches and moves
    /// on to the next when the one it uses cannot be reached.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_delimiter = ',', num_args = 1..)]
    gateway: Vec<String>,
    /// Bearer token with the publisher role.
    #[arg(long, env = "VIRTUAL_LLM_TOKEN")]
    token: Option<String>,
    /// How to reach the gateway.
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    transport: Transport,
    /// Where the session id is kept, for sticky reconnects across restarts. Locked
    /// while this publisher runs: a second publisher needs a file of its own.
    #[arg(long, default_value = "./publisher-session")]
    session_file: PathBuf,
    /// Do not keep tasks through a dropped channel (SPEC §15): without this, upstream
    /// calls go on while the channel is down and are replayed on the next one, when
    /// the gateway grants it.
    #[arg(long)]
    no_resume: bool,
    /// How long tasks wait for the next channel before they stop (match the
    /// gateway's `--resume-window`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    resume_window: std::time::Duration,
    /// The most bytes of results a task keeps for a replay; a task that produces
    /// more while the channel is down is lost.
    #[arg(long, default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    resume_buffer: u64,
    /// JSON list of providers to publish.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Publish a built-in echo model under this name (repeatable); `NAME@POOL`
    /// publishes it in pool POOL.
    #[arg(long = "echo", value_name = "NAME[@POOL]")]
    echo: Vec<String>,
    /// How many requests each LLM takes at once: sent to the gateway as its
    /// maxConcurrent (1–10000), unless its --config entry sets its own. The gateway
    /// never sends an LLM more; this publisher runs up to the sum over its LLMs at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONCURRENT)))]
    max_concurrent: u32,
    /// Publish every model this OpenAI-compatible server lists at `GET URL/models`
    /// (e.g. `http://127.0.0.1:8000/v1`), re-read every heartbeat: a model that
    /// appears is published, one that goes is dropped. Beside --echo and --config.
    #[arg(long, value_name = "URL")]
    discover: Option<String>,
    /// With --discover: each model is named this prefix followed by its id (each
    /// character outside [A-Za-z0-9._:-/] replaced by `-`).
    #[arg(long, default_value = "", requires = "discover")]
    prefix: String,
    /// With --discover: the API key of that server.
    #[arg(long, env = "VIRTUAL_LLM_DISCOVER_API_KEY", requires = "discover")]
    discover_api_key: Option<String>,
    /// Runtime worker threads. The default, 1, runs everything on one thread: a
    /// publisher relays bytes between two sockets and needs no parallelism, and each
    /// hand-off between threads costs a wake-up on the request's path. Raise it for a
    /// provider that computes in-process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Transport {
    /// Server-sent events down, HTTP posts up.
    Sse,
    /// One WebSocket both ways.
    Ws,
}

/// The `--config` file as an object: providers and agents. (The version 1 file, a
/// list of providers, is still read as it was.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    providers: Vec<ProviderConfig>,
    #[serde(default)]
    agents: Vec<AgentSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProviderConfig {
    name: String,
    #[serde(rename = "type", default = "common::openai")]
    provider_type: String,
    model: String,
    url: String,
    api_key: Option<String>,
    tier: Option<String>,
    /// The pool it serves in; absent: a pool of one, named after it.
    pool: Option<String>,
    /// How many requests it takes at once; absent: `--max-concurrent`.
    max_concurrent: Option<u32>,
    /// Who may see and call it: `"public"` (default), `"owner"`, or principal ids.
    #[serde(default)]
    access: virtual_llm::access::Access,
    #[serde(default)]
    publish: bool,
    /// Wakes its upstream when the gateway asks for it.
    wake: Option<RecipeConfig>,
    /// Puts its upstream to sleep after `idleAfter` without a task.
    sleep: Option<RecipeConfig>,
    /// How long without a task before it is put to sleep, e.g. `"15m"`.
    idle_after: Option<String>,
    /// How long a wake may take to make the upstream answer; default `"120s"`.
    ready_timeout: Option<String>,
}

fn main() -> std::process::ExitCode {
    common::init_tracing();
    let args = Args::parse();
    common::exit(
        common::runtime(args.threads)
            .map_err(Into::into)
            .and_then(|rt| rt.block_on(run(args))),
    )
}

async fn run(args: Args) -> Result<(), common::BoxError> {
    // First: a second publisher on the same session file would register as the same
    // session and evict this one's channel (and be evicted) for ever.
    let _session_lock = SessionFileLock::acquire(&args.session_file).map_err(|e| match e {
        SessionFileError::Held { .. } => {
            format!("{e}; pass --session-file PATH to run a second one").into()
        }
        other => common::BoxError::from(other),
    })?;
    let mut llms = Vec::new();
    for arg in &args.echo {
        let mut spec = echo_spec(arg)?;
        spec.max_concurrent = Some(args.max_concurrent);
        // Nothing to wake: an echo LLM is always ready.
        llms.push(PublishedLlm::new(spec, Arc::new(EchoProvider::new())));
    }
    let mut agents = Vec::new();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let in_file = |e: serde_json::Error| format!("{}: {e}", path.display());
        // A list is the version 1 file; an object has providers and agents.
        let (providers, listed) = if text.trim_start().starts_with('[') {
            let providers: Vec<ProviderConfig> = serde_json::from_str(&text).map_err(in_file)?;
            (providers, Vec::new())
        } else {
            let file: ConfigFile = serde_json::from_str(&text).map_err(in_file)?;
            (file.providers, file.agents)
        };
        for agent in &listed {
            agent
                .validate()
                .map_err(|e| format!("{} (agent {}): {e}", path.display(), agent.name))?;
        }
        agents = listed;
        for p in providers.into_iter().filter(|p| p.publish) {
            let in_entry =
                |e: &dyn std::fmt::Display| format!("{} ({}): {e}", path.display(), p.name);
            let mut upstream = OpenAiUpstream::new(&p.url).map_err(|e| in_entry(&e))?;
            if let Some(key) = &p.api_key {
                upstream = upstream.with_api_key(key).map_err(|e| in_entry(&e))?;
            }
            let mut spec = LlmSpec::new(
                name("name", &p.name).map_err(|e| in_entry(&e))?,
                p.provider_type.clone(),
                p.model.clone(),
            );
            spec.tier.clone_from(&p.tier);
            spec.pool = p
                .pool
                .as_deref()
                .map(|pool| name("pool", pool))
                .transpose()
                .map_err(|e| in_entry(&e))?;
            spec.max_concurrent = Some(p.max_concurrent.unwrap_or(args.max_concurrent));
            spec.access = p.access.clone();
            spec.validate().map_err(|e| in_entry(&e))?;
            let llm = PublishedLlm::new(
                spec,
                Arc::new(OpenAiProvider::new(upstream, p.model.clone())),
            );
            llms.push(lifecycle(llm, &p).map_err(|e| in_entry(&e))?);
        }
    }
    let discover = match &args.discover {
        Some(url) => {
            let mut upstream = OpenAiUpstream::new(url).map_err(|e| format!("--discover: {e}"))?;
            if let Some(key) = &args.discover_api_key {
                upstream = upstream.with_api_key(key)?;
            }
            Some(
                OpenAiCatalog::new(upstream, args.prefix.clone())
                    .with_max_concurrent(args.max_concurrent),
            )
        }
        None => None,
    };
    if llms.is_empty() && discover.is_none() {
        return Err(
            "nothing to publish: pass --echo NAME, --discover URL or a --config with \"publish\": true entries"
                .into(),
        );
    }
    // An agent speaks through an LLM of this publisher: say so now, not as a register
    // the gateway refuses on every reconnect.
    for agent in &agents {
        if !llms
            .iter()
            .any(|l| l.spec.name == agent.llm || *l.spec.pool_key() == agent.llm)
        {
            return Err(format!(
                "agent {} speaks through {}, which this publisher does not publish (an llm's name or pool)",
                agent.name, agent.llm
            )
            .into());
        }
    }
    let names: Vec<String> = llms.iter().map(|l| l.spec.name.to_string()).collect();
    let agent_names: Vec<String> = agents.iter().map(|a| a.name.to_string()).collect();
    let mut wires = Vec::with_capacity(args.gateway.len());
    for url in &args.gateway {
        let wire: Arc<dyn Wire> = match args.transport {
            Transport::Sse => Arc::new(SseWire::new(url, args.token.clone())?),
            Transport::Ws => Arc::new(virtual_llm::ws::WsWire::new(url, args.token.clone())?),
        };
        wires.push(wire);
    }
    let wire: Arc<dyn Wire> = match wires.len() {
        1 => wires.remove(0),
        _ => Arc::new(FailoverWire::new(wires).ok_or("--gateway names no gateway")?),
    };
    // The gateway sends each LLM at most its maxConcurrent: this many never wait here
    // (discovered models: as many as their number at start, and never fewer than 32).
    let max_concurrent_tasks = llms
        .iter()
        .filter_map(|l| l.spec.max_concurrent)
        .map(|n| n as usize)
        .sum::<usize>()
        .max(if discover.is_some() { 32 } else { 0 });
    let options = PublisherOptions {
        session_file: Some(args.session_file.clone()),
        max_concurrent_tasks,
        agents,
        resume: !args.no_resume,
        resume_window: args.resume_window,
        resume_buffer: usize::try_from(args.resume_buffer)?,
        ..PublisherOptions::default()
    };
    let publisher = match discover {
        Some(discovered) => {
            tracing::info!(url = %discovered_url(&args), prefix = %args.prefix, "discovering the upstream's models");
            let catalog = Discovered {
                fixed: llms,
                discovered,
            };
            Publisher::spawn_discovering(wire, Arc::new(catalog), options)
        }
        None => Publisher::spawn(wire, llms, options),
    };
    let mut state = publisher.state();
    tracing::info!(gateway = %args.gateway.join(","), llms = ?names, agents = ?agent_names, "publishing");
    loop {
        tokio::select! {
            () = common::shutdown_signal() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                match &*state.borrow_and_update() {
                    PublisherState::Connected { session } => tracing::info!(%session, "connected; serving requests"),
                    PublisherState::Backoff { error, delay } => tracing::warn!(%error, retry_in = ?delay, "not connected"),
                    PublisherState::Connecting | PublisherState::Stopped => {}
                }
            }
        }
    }
    tracing::info!("stopping: the gateway takes our llms out of service");
    publisher.stop().await;
    Ok(())
}

/// What a discovering publisher publishes: its --echo and --config LLMs, and every
/// model the --discover server lists now.
#[derive(Debug)]
struct Discovered {
    fixed: Vec<PublishedLlm>,
    discovered: OpenAiCatalog,
}

#[async_trait::async_trait]
impl Catalog for Discovered {
    async fn llms(&self) -> Result<Vec<PublishedLlm>, Error> {
        let mut llms = self.fixed.clone();
        for llm in self.discovered.llms().await? {
            if llms.iter().any(|l| l.spec.name == llm.spec.name) {
                tracing::warn!(name = %llm.spec.name, "a discovered model is named like a published llm; not published twice");
            } else {
                llms.push(llm);
            }
        }
        Ok(llms)
    }
}

fn discovered_url(args: &Args) -> &str {
    args.discover.as_deref().unwrap_or_default()
}

/// `llm` with the wake and sleep settings of its entry, checked: each recipe is a
/// command or a URL, durations are human (`"15m"`) and not zero, `sleep` comes with
/// the `idleAfter` that runs it, and an LLM put to sleep has a `wake` to wake it.
fn lifecycle(mut llm: PublishedLlm, p: &ProviderConfig) -> Result<PublishedLlm, String> {
    if let Some(wake) = &p.wake {
        llm = llm.with_wake(recipe("wake", wake)?);
    }
    if let Some(sleep) = &p.sleep {
        llm = llm.with_sleep(recipe("sleep", sleep)?);
    }
    if let Some(idle) = &p.idle_after {
        llm = llm.with_idle_after(duration("idleAfter", idle)?);
    }
    if let Some(timeout) = &p.ready_timeout {
        llm = llm.with_ready_timeout(duration("readyTimeout", timeout)?);
    }
    if llm.sleep.is_some() && llm.idle_after.is_none() {
        return Err("sleep needs idleAfter: how long without a task before it runs".into());
    }
    if llm.idle_after.is_some() && llm.wake.is_none() {
        return Err("idleAfter needs a wake recipe: an llm put to sleep could not be woken".into());
    }
    Ok(llm)
}

/// A human duration (`"15m"`, `"120s"`) that is not zero.
fn duration(what: &str, text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{what} {text:?} is not a duration like \"15m\": {e}"))?;
    if d.is_zero() {
        return Err(format!("{what} must be more than zero"));
    }
    Ok(d)
}

/// The echo LLM of `--echo NAME` or `--echo NAME@POOL`, both checked as names.
fn echo_spec(arg: &str) -> Result<LlmSpec, String> {
    let in_flag = |e: String| format!("--echo {arg}: {e}");
    let (llm, pool) = match arg.split_once('@') {
        Some((llm, pool)) => (llm, Some(pool)),
        None => (arg, None),
    };
    let mut spec = LlmSpec::new(name("name", llm).map_err(in_flag)?, "echo", "echo");
    spec.pool = pool.map(|p| name("pool", p)).transpose().map_err(in_flag)?;
    Ok(spec)
}

/// `text` as a name (an LLM's or a pool's: the same rules), or why not, in one line
/// that says which it was (a long name is cut).
fn name(what: &str, text: &str) -> Result<LlmName, String> {
    LlmName::parse(text).map_err(|e| match e {
        Error::InvalidName { name, reason } => {
            format!("{what} {name:?} is not a valid name: {reason}")
        }
        other => format!("{what}: {other}"),
    })
}
