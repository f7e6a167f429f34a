//! `llmctl`, the command line of a virtual-llm gateway: list the LLM registry and the
//! agents, and chat with an LLM or an agent through the OpenAI-compatible route,
//! streaming the answer as it comes.
//!
//! Run with: `cargo run --example llmctl -- get llm`
//!
//! ```text
//! llmctl get llm                          # NAME KIND STATUS TYPE MODEL TIER POOL LOAD ID
//! llmctl get llm demo -o json             # one row, as JSON
//! llmctl get agent                        # NAME LLM STATUS DESCRIPTION
//! llmctl chat poet                        # an agent answers like an LLM
//! llmctl chat demo                        # a streaming REPL; /exit or Ctrl-D leaves
//! llmctl chat demo --message "hi there"   # one answer on stdout, for scripts
//! ```
//!
//! `--gateway URL` (env `VIRTUAL_LLM_GATEWAY`) and `--token` (env `VIRTUAL_LLM_TOKEN`)
//! go before or after the subcommand. Errors are one line on stderr and exit code 1.
//!
//! In the REPL each answer is followed, on stderr, by a status line: how many tokens
//! the answer had (the upstream's `usage.completion_tokens`: a stream asks for it with
//! `stream_options.include_usage`; content chunks when an upstream reports no usage),
//! the rate after the first one, and the time to the first one.
//! Ctrl-C during an answer drops the request (the gateway cancels the task) and returns
//! to the prompt. When stdin is not a terminal, the REPL reads one message per line and
//! prints no prompt, so a conversation can be scripted.

use std::error::Error as StdError;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use virtual_llm::error::bounded;
use virtual_llm::protocol::{AgentView, ErrorBody};
use virtual_llm::{LlmName, LlmStatus, LlmView};

#[derive(Parser, Debug)]
#[command(
    name = "llmctl",
    about = "Command line of a virtual-llm gateway",
    version
)]
struct Cli {
    /// The gateway's URL.
    #[arg(
        long,
        global = true,
        env = "VIRTUAL_LLM_GATEWAY",
        default_value = "http://127.0.0.1:8080"
    )]
    gateway: String,
    /// Bearer token (client role to chat).
    #[arg(long, global = true, env = "VIRTUAL_LLM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The gateway's base path of the registry routes.
    #[arg(long, global = true, default_value = "/api/v1/llms")]
    base_path: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show registry rows: `get llm` lists them, `get llm NAME` shows one; `get agent`
    /// and `get agent NAME` the same for agents.
    Get(GetArgs),
    /// Chat with an LLM or an agent: a streaming REPL, or one answer with `--message`.
    Chat(ChatArgs),
    /// Remove a registry row, whoever owns it (an admin token): `delete llm NAME` takes
    /// a name back, e.g. from a publisher that took the name of a public LLM first.
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
struct DeleteArgs {
    /// What to remove (`llm`: a row, an agent's too).
    #[arg(value_enum)]
    resource: Resource,
    /// Its name.
    name: String,
}

#[derive(Args, Debug)]
struct GetArgs {
    /// What to show.
    #[arg(value_enum)]
    resource: Resource,
    /// One by name; all of them without.
    name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Resource {
    /// LLM registry rows.
    #[value(alias = "llms")]
    Llm,
    /// Agents: personas over a published LLM.
    #[value(alias = "agents")]
    Agent,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    /// An aligned table.
    Table,
    /// The gateway's JSON, pretty-printed.
    Json,
}

#[derive(Args, Debug)]
struct ChatArgs {
    /// The LLM or agent to talk to (its name, the OpenAI `model`).
    name: String,
    /// Ask this once, print only the answer, and exit.
    #[arg(short, long)]
    message: Option<String>,
    /// A system prompt that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Most tokens an answer may have.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Ask for the whole answer in one response instead of a stream.
    #[arg(long)]
    no_stream: bool,
}

/// What went wrong, in one line for the user.
#[derive(Debug)]
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure(message)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match Client::new(&cli) {
        Ok(client) => match &cli.command {
            Command::Get(args) => get(&client, args).await,
            Command::Chat(args) => chat(&client, args).await,
            Command::Delete(args) => delete(&client, args).await,
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", paint(Paint::Error, &format!("error: {e}")));
            ExitCode::FAILURE
        }
    }
}

/// The gateway as this CLI speaks to it.
struct Client {
    http: reqwest::Client,
    /// The URL as the user gave it, for messages.
    gateway: String,
    /// `{gateway}{base_path}`.
    registry: String,
    /// `{gateway}/api/v1/agents`.
    agents: String,
    /// `{gateway}/v1/chat/completions`.
    completions: String,
    token: Option<String>,
}

impl Client {
    fn new(cli: &Cli) -> Result<Self, Failure> {
        let root = cli.gateway.trim_end_matches('/');
        let parsed = reqwest::Url::parse(root)
            .map_err(|e| format!("invalid --gateway URL {:?}: {e}", cli.gateway))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "invalid --gateway URL {:?}: use http:// or https://",
                cli.gateway
            )
            .into());
        }
        let base = format!("/{}", cli.base_path.trim_matches('/'));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot set up HTTP: {}", root_cause(&e)))?;
        Ok(Client {
            http,
            gateway: root.to_owned(),
            registry: format!("{root}{base}"),
            agents: format!("{root}/api/v1/agents"),
            completions: format!("{root}/v1/chat/completions"),
            token: cli.token.clone().filter(|t| !t.is_empty()),
        })
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; a non-2xx answer becomes its one-line message.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.refusal(response).await)
        }
    }

    /// GET `url` as JSON.
    async fn get_json(&self, url: &str) -> Result<Value, Failure> {
        let response = self
            .send(
                self.request(reqwest::Method::GET, url)
                    .timeout(Duration::from_secs(30)),
            )
            .await?;
        response.json().await.map_err(|e| self.unreachable(&e))
    }

    /// The one line for a request that got no HTTP answer (or a broken one).
    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        let cause = root_cause(e);
        let message = if e.is_connect() {
            format!("gateway not reachable at {} ({cause})", self.gateway)
        } else if e.is_timeout() {
            format!("the gateway at {} did not answer in time", self.gateway)
        } else if e.is_decode() {
            format!(
                "unexpected answer from the gateway at {}: {cause}",
                self.gateway
            )
        } else {
            format!("request to the gateway at {} failed: {cause}", self.gateway)
        };
        Failure(message)
    }

    /// The one line for a non-2xx answer: the OpenAI error body's message, which the
    /// gateway words for people (`llm demo is inactive (publisher offline since …)`).
    async fn refusal(&self, response: reqwest::Response) -> Failure {
        let status = response.status().as_u16();
        if status == 401 && self.token.is_none() {
            return Failure(
                "the gateway wants a token (401): pass --token or set VIRTUAL_LLM_TOKEN".to_owned(),
            );
        }
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text);
        if status == 401 || status == 403 {
            // 403 says what the token may not do (`this token may not call`).
            return Failure(match body {
                Ok(body) if status == 403 => {
                    format!(
                        "the gateway refused the token (403): {}",
                        body.error.message
                    )
                }
                _ => format!("the gateway refused the token ({status})"),
            });
        }
        match body {
            Ok(body) => Failure(body.error.message),
            Err(_) => {
                let snippet = bounded(text.lines().next().unwrap_or(""), 200);
                if snippet.trim().is_empty() {
                    Failure(format!("the gateway answered {status}"))
                } else {
                    Failure(format!("the gateway answered {status}: {snippet}"))
                }
            }
        }
    }
}

/// The innermost cause of `e`, as a short phrase: `connection refused`.
fn root_cause(e: &(dyn StdError + 'static)) -> String {
    let mut inner = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    let text = inner.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).trim();
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        // `Connection refused` → `connection refused`, but leave `DNS …` alone.
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => {
            first.to_lowercase().chain(text.chars().skip(1)).collect()
        }
        _ => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------------
// get llm
// ---------------------------------------------------------------------------------

async fn get(client: &Client, args: &GetArgs) -> Result<(), Failure> {
    if let Resource::Agent = args.resource {
        return get_agents(client, args).await;
    }
    let (rows, one) = match args.name.as_deref() {
        Some(name) => fetch::<LlmView>(client, &client.registry, Some(name)).await?,
        None => (fetch_pages(client).await?, false),
    };
    let mut stdout = std::io::stdout().lock();
    match args.output {
        // Through `LlmView`: the fields in the order of the SPEC.
        Output::Json => write_json(&mut stdout, &rows, one)?,
        Output::Table if rows.is_empty() => eprintln!("no llms in the registry"),
        Output::Table => {
            for line in table(&rows) {
                writeln!(stdout, "{line}").map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// `delete llm NAME`: `DELETE {base}/{name}`; prints what was removed.
async fn delete(client: &Client, args: &DeleteArgs) -> Result<(), Failure> {
    let name = LlmName::parse(&args.name).map_err(|e| e.to_string())?;
    let response = client
        .send(
            client
                .request(
                    reqwest::Method::DELETE,
                    &format!("{}/{name}", client.registry),
                )
                .timeout(Duration::from_secs(30)),
        )
        .await?;
    let row: LlmView = response.json().await.map_err(|e| client.unreachable(&e))?;
    println!(
        "deleted {} ({}, {})",
        row.name,
        label(&row.kind),
        label(&row.status)
    );
    Ok(())
}

/// `get agent [NAME]`: the table `NAME LLM STATUS DESCRIPTION`, or the gateway's JSON.
async fn get_agents(client: &Client, args: &GetArgs) -> Result<(), Failure> {
    let (agents, one) = fetch::<AgentView>(client, &client.agents, args.name.as_deref()).await?;
    let mut stdout = std::io::stdout().lock();
    match args.output {
        Output::Json => write_json(&mut stdout, &agents, one)?,
        Output::Table if agents.is_empty() => eprintln!("no agents in the registry"),
        Output::Table => {
            let mut table = Table::new();
            table
                .load_style(presets::NOTHING)
                .set_header(["NAME", "LLM", "STATUS", "DESCRIPTION"]);
            for agent in &agents {
                table.add_row([
                    agent.name.to_string(),
                    agent.llm.to_string(),
                    label(&agent.status),
                    agent
                        .description
                        .as_deref()
                        .map_or_else(|| "-".to_owned(), |d| inert(d).into_owned()),
                ]);
            }
            for column in table.column_iter_mut() {
                column.set_padding((0, 3));
            }
            for line in table.lines() {
                writeln!(stdout, "{}", line.trim_end()).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// `GET {base}/{name}` (one, when `name` is given) or `GET {base}` (all), read as `T`s;
/// and whether one was asked for.
async fn fetch<T: serde::de::DeserializeOwned>(
    client: &Client,
    base: &str,
    name: Option<&str>,
) -> Result<(Vec<T>, bool), Failure> {
    let url = match name {
        Some(name) => {
            let name = LlmName::parse(name).map_err(|e| e.to_string())?;
            format!("{base}/{name}")
        }
        None => base.to_owned(),
    };
    let body = client.get_json(&url).await?;
    let rows = if name.is_some() {
        vec![serde_json::from_value(body).map_err(|e| unexpected(client, &e))?]
    } else {
        serde_json::from_value(body).map_err(|e| unexpected(client, &e))?
    };
    Ok((rows, name.is_some()))
}

/// Rows of `GET {base}` read in one request.
const PAGE: usize = 1000;

/// Every registry row, a page at a time (`GET {base}?limit=&after=`), so that neither
/// side holds a large registry as one answer. A gateway older than paging ignores the
/// parameters and answers every row as one array: taken as it is.
async fn fetch_pages(client: &Client) -> Result<Vec<LlmView>, Failure> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Listing {
        All(Vec<LlmView>),
        Page {
            llms: Vec<LlmView>,
            next: Option<String>,
        },
    }
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = reqwest::Url::parse(&client.registry).map_err(|e| e.to_string())?;
        url.query_pairs_mut()
            .append_pair("limit", &PAGE.to_string());
        if let Some(after) = &after {
            url.query_pairs_mut().append_pair("after", after);
        }
        let body = client.get_json(url.as_str()).await?;
        match serde_json::from_value(body).map_err(|e| unexpected(client, &e))? {
            Listing::All(all) => return Ok(all),
            Listing::Page { llms, next } => {
                rows.extend(llms);
                match next {
                    // A cursor that does not move on would page forever.
                    Some(next) if after.as_deref() != Some(next.as_str()) => after = Some(next),
                    _ => return Ok(rows),
                }
            }
        }
    }
}

/// `rows` as JSON, as the gateway answered: an object for one name, a list otherwise.
fn write_json<T: serde::Serialize>(
    out: &mut impl Write,
    rows: &[T],
    one: bool,
) -> Result<(), Failure> {
    let text = match rows.first() {
        Some(row) if one => serde_json::to_string_pretty(row),
        _ => serde_json::to_string_pretty(rows),
    }
    .map_err(|e| e.to_string())?;
    writeln!(out, "{text}").map_err(|e| Failure(e.to_string()))
}

fn unexpected(client: &Client, e: &serde_json::Error) -> Failure {
    Failure(format!(
        "unexpected answer from the gateway at {}: {e}",
        client.gateway
    ))
}

/// `NAME KIND STATUS TYPE MODEL TIER POOL LOAD ID`, aligned, no borders, no colours.
/// POOL is the row's pool key (its own name when it serves alone); LOAD is
/// `inFlight/maxConcurrent`, `inFlight/-` for a row without a limit.
fn table(rows: &[LlmView]) -> Vec<String> {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_header([
        "NAME", "KIND", "STATUS", "TYPE", "MODEL", "TIER", "POOL", "LOAD", "ID",
    ]);
    for row in rows {
        table.add_row([
            row.name.to_string(),
            label(&row.kind),
            label(&row.status),
            row.provider_type.clone(),
            row.model.clone(),
            row.tier.clone().unwrap_or_else(|| "-".to_owned()),
            row.pool
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            load(row),
            row.id.to_string(),
        ]);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
    }
    table.lines().map(|l| l.trim_end().to_owned()).collect()
}

/// `inFlight/maxConcurrent`, or `inFlight/-` when the row takes any number.
fn load(row: &LlmView) -> String {
    match row.max_concurrent {
        Some(max) => format!("{}/{max}", row.in_flight),
        None => format!("{}/-", row.in_flight),
    }
}

/// A serde enum's wire name: `LlmKind::Virtual` → `virtual`.
fn label<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        _ => "?".to_owned(),
    }
}

// ---------------------------------------------------------------------------------
// chat
// ---------------------------------------------------------------------------------

async fn chat(client: &Client, args: &ChatArgs) -> Result<(), Failure> {
    let name = LlmName::parse(&args.name).map_err(|e| e.to_string())?;
    let mut conversation = Conversation::new(name, args);
    match &args.message {
        Some(message) => one_shot(client, &mut conversation, message).await,
        None => repl(client, conversation).await,
    }
}

/// `--message`: one answer on stdout, nothing else; a failure is the caller's one line.
async fn one_shot(
    client: &Client,
    conversation: &mut Conversation,
    message: &str,
) -> Result<(), Failure> {
    let mut out = Sink::stdout();
    conversation.push_user(message);
    let result = conversation.ask(client, &mut out).await;
    out.end_line();
    result.map(|_| ())
}

/// The interactive loop: line editing and history on a terminal, plain lines otherwise.
async fn repl(client: &Client, mut conversation: Conversation) -> Result<(), Failure> {
    let mut input = Input::new()?;
    let interactive = input.is_editor();
    // Fail fast on a wrong name or gateway, and say what we talk to.
    let view: LlmView = serde_json::from_value(
        client
            .get_json(&format!("{}/{}", client.registry, conversation.model))
            .await?,
    )
    .map_err(|e| unexpected(client, &e))?;
    if interactive {
        let tier = view
            .tier
            .as_deref()
            .map(|t| format!(", tier {t}"))
            .unwrap_or_default();
        eprintln!(
            "{}",
            paint(
                Paint::Dim,
                &format!(
                    "{} · {} · {} · {}/{}{tier} at {}\n/exit or Ctrl-D leaves · Ctrl-C cancels an answer · /reset forgets the conversation",
                    view.name,
                    label(&view.kind),
                    label(&view.status),
                    view.provider_type,
                    view.model,
                    client.gateway
                )
            )
        );
        if view.status != LlmStatus::Active {
            eprintln!(
                "{}",
                paint(
                    Paint::Error,
                    &format!("note: {} is {} now", view.name, label(&view.status))
                )
            );
        }
    }
    let mut out = Sink::stdout();
    loop {
        let Some(line) = input.next_line("> ").await? else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conversation.reset();
                eprintln!("{}", paint(Paint::Dim, "(conversation forgotten)"));
                continue;
            }
            "/help" => {
                eprintln!(
                    "/exit leaves · /reset forgets the conversation · Ctrl-C cancels an answer"
                );
                continue;
            }
            _ => {}
        }
        conversation.push_user(line);
        let outcome = tokio::select! {
            result = conversation.ask(client, &mut out) => Some(result),
            _ = tokio::signal::ctrl_c() => None,
        };
        out.end_line();
        match outcome {
            Some(Ok(stats)) => eprintln!("{}", paint(Paint::Dim, &stats.to_string())),
            Some(Err(e)) => {
                conversation.drop_last_user();
                eprintln!("{}", paint(Paint::Error, &format!("error: {e}")));
            }
            None => {
                conversation.drop_last_user();
                eprintln!("{}", paint(Paint::Dim, "(cancelled)"));
            }
        }
    }
    Ok(())
}

/// Where the REPL's lines come from.
enum Input {
    /// A terminal: rustyline's line editing and in-memory history.
    Editor(Box<DefaultEditor>),
    /// A pipe or file: one message per line, no prompt.
    Lines(tokio::io::Lines<BufReader<tokio::io::Stdin>>),
}

impl Input {
    fn new() -> Result<Self, Failure> {
        if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
            let editor =
                DefaultEditor::new().map_err(|e| format!("cannot set up line editing: {e}"))?;
            Ok(Input::Editor(Box::new(editor)))
        } else {
            Ok(Input::Lines(BufReader::new(tokio::io::stdin()).lines()))
        }
    }

    fn is_editor(&self) -> bool {
        matches!(self, Input::Editor(_))
    }

    /// The next line, or `None` at the end (Ctrl-D, end of input).
    async fn next_line(&mut self, prompt: &str) -> Result<Option<String>, Failure> {
        match self {
            Input::Editor(editor) => loop {
                // rustyline blocks; let the runtime move other work off this thread.
                match tokio::task::block_in_place(|| editor.readline(prompt)) {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = editor.add_history_entry(line.as_str());
                        }
                        return Ok(Some(line));
                    }
                    Err(ReadlineError::Eof) => return Ok(None),
                    // Ctrl-C at the prompt clears the line, as in a shell.
                    Err(ReadlineError::Interrupted | ReadlineError::Signal(_)) => continue,
                    Err(e) => return Err(format!("cannot read the terminal: {e}").into()),
                }
            },
            Input::Lines(lines) => tokio::select! {
                line = lines.next_line() => line.map_err(|e| format!("cannot read stdin: {e}").into()),
                // The REPL owns SIGINT from its first answer on; here it still means quit.
                _ = tokio::signal::ctrl_c() => Ok(None),
            },
        }
    }
}

/// A conversation with one LLM: the messages so far and the request's options.
struct Conversation {
    model: LlmName,
    system: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    stream: bool,
    messages: Vec<Value>,
}

impl Conversation {
    fn new(model: LlmName, args: &ChatArgs) -> Self {
        let mut conversation = Conversation {
            model,
            system: args.system.clone(),
            temperature: args.temperature,
            max_tokens: args.max_tokens,
            stream: !args.no_stream,
            messages: Vec::new(),
        };
        conversation.reset();
        conversation
    }

    /// Back to the system prompt alone.
    fn reset(&mut self) {
        self.messages.clear();
        if let Some(system) = &self.system {
            self.messages
                .push(json!({"role": "system", "content": system}));
        }
    }

    fn push_user(&mut self, text: &str) {
        self.messages.push(json!({"role": "user", "content": text}));
    }

    /// Forgets an unanswered question (cancelled or failed), so the next turn starts
    /// from a conversation the model could have had.
    fn drop_last_user(&mut self) {
        if self.messages.last().and_then(|m| m.get("role")) == Some(&json!("user")) {
            self.messages.pop();
        }
    }

    fn body(&self) -> Value {
        let mut body = json!({
            "model": self.model.as_str(),
            "messages": self.messages,
            "stream": self.stream,
        });
        if self.stream {
            // The closing usage chunk: the status line counts real tokens.
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(n) = self.max_tokens {
            body["max_tokens"] = json!(n);
        }
        body
    }

    /// Asks the conversation's last message, writes the answer to `out` as it arrives,
    /// and keeps it in the conversation.
    async fn ask(&mut self, client: &Client, out: &mut Sink) -> Result<Stats, Failure> {
        let started = Instant::now();
        let request = client
            .request(reqwest::Method::POST, &client.completions)
            .json(&self.body());
        let response = client.send(request).await?;
        let (answer, stats) = if self.stream {
            stream_answer(client, response, out, started).await?
        } else {
            whole_answer(client, response, out, started).await?
        };
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        Ok(stats)
    }
}

/// Reads a `stream: true` answer: each chunk's content goes to `out` at once.
async fn stream_answer(
    client: &Client,
    response: reqwest::Response,
    out: &mut Sink,
    started: Instant,
) -> Result<(String, Stats), Failure> {
    let mut events = response.bytes_stream().eventsource();
    let mut answer = String::new();
    let mut stats = Stats::streamed();
    let mut done = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| {
            Failure(format!(
                "the stream from the gateway at {} broke: {e}",
                client.gateway
            ))
        })?;
        if event.event == "error" {
            return Err(stream_error(&event.data));
        }
        if event.data.trim() == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).map_err(|e| unexpected(client, &e))?;
        if chunk.get("error").is_some() {
            return Err(stream_error(&event.data));
        }
        if let Some(text) = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            stats.chunk(started.elapsed());
            out.write(text)?;
            answer.push_str(text);
        }
        if let Some(n) = chunk
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
        {
            stats.usage_tokens = Some(n);
        }
    }
    if !done {
        return Err(Failure(
            "the stream ended before the answer was complete".to_owned(),
        ));
    }
    stats.total = started.elapsed();
    Ok((answer, stats))
}

/// A mid-stream `error` event's message.
fn stream_error(data: &str) -> Failure {
    match serde_json::from_str::<ErrorBody>(data) {
        Ok(body) => Failure(body.error.message),
        Err(_) => Failure(format!("the stream failed: {data}")),
    }
}

/// Reads a `stream: false` answer and writes it whole.
async fn whole_answer(
    client: &Client,
    response: reqwest::Response,
    out: &mut Sink,
    started: Instant,
) -> Result<(String, Stats), Failure> {
    let body: Value = response.json().await.map_err(|e| client.unreachable(&e))?;
    let answer = body
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    out.write(&answer)?;
    let stats = Stats {
        streamed: false,
        chunks: 0,
        usage_tokens: body
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
            .filter(|n| *n > 0),
        first: None,
        last: None,
        total: started.elapsed(),
    };
    Ok((answer, stats))
}

/// What the status line after an answer reports.
#[derive(Debug)]
struct Stats {
    streamed: bool,
    /// Content chunks received.
    chunks: u64,
    /// The upstream's own count, when its stream or body carries `usage`.
    usage_tokens: Option<u64>,
    /// Since the request was sent: the first and the last content chunk.
    first: Option<Duration>,
    last: Option<Duration>,
    total: Duration,
}

impl Stats {
    fn streamed() -> Self {
        Stats {
            streamed: true,
            chunks: 0,
            usage_tokens: None,
            first: None,
            last: None,
            total: Duration::ZERO,
        }
    }

    fn chunk(&mut self, at: Duration) {
        self.chunks += 1;
        self.first.get_or_insert(at);
        self.last = Some(at);
    }
}

impl fmt::Display for Stats {
    /// `42 chunks · 18.3 chunks/s · first token 120 ms · total 2.4 s`: the rate counts what
    /// came after the first chunk over the time after it (the generation rate, without
    /// the time to first token).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (count, unit) = match self.usage_tokens {
            Some(n) => (n, "token"),
            None if self.streamed => (self.chunks, "chunk"),
            None => {
                return write!(f, "whole answer in {}", seconds(self.total));
            }
        };
        let plural = if count == 1 { "" } else { "s" };
        write!(f, "{count} {unit}{plural}")?;
        let span = match (self.first, self.last) {
            (Some(first), Some(last)) => last.saturating_sub(first),
            // Not streamed: the whole wait is generation time.
            _ => self.total,
        };
        let after_first = if self.streamed {
            count.saturating_sub(1)
        } else {
            count
        };
        if after_first > 0 && !span.is_zero() {
            write!(
                f,
                " · {:.1} {unit}s/s",
                after_first as f64 / span.as_secs_f64()
            )?;
        }
        if let Some(first) = self.first {
            write!(f, " · first token {} ms", first.as_millis())?;
        }
        write!(f, " · total {}", seconds(self.total))
    }
}

/// `120 ms` under a second, `2.4 s` above.
fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Stdout for answers: written as tokens arrive, and knows whether the cursor is at the
/// start of a line so that what follows starts on its own.
struct Sink {
    out: std::io::Stdout,
    at_line_start: bool,
}

impl Sink {
    fn stdout() -> Self {
        Sink {
            out: std::io::stdout(),
            at_line_start: true,
        }
    }

    fn write(&mut self, text: &str) -> Result<(), Failure> {
        if text.is_empty() {
            return Ok(());
        }
        let text = inert(text);
        let mut out = self.out.lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write the answer: {e}"))?;
        self.at_line_start = text.ends_with('\n');
        Ok(())
    }

    /// Ends the current line if something is on it.
    fn end_line(&mut self) {
        if !self.at_line_start {
            let mut out = self.out.lock();
            let _ = out.write_all(b"\n").and_then(|()| out.flush());
            self.at_line_start = true;
        }
    }
}

#[derive(Clone, Copy)]
enum Paint {
    Dim,
    Error,
}

/// `text` without the control characters a terminal would act on (C0 but newline and
/// tab, DEL, C1: escape sequences that set a window's title, clear the screen or write
/// the clipboard), each shown as U+FFFD. Model text and error messages come from
/// whoever publishes the model: they reach the terminal through here.
fn inert(text: &str) -> std::borrow::Cow<'_, str> {
    let acts = |c: char| c.is_control() && c != '\n' && c != '\t';
    if text.chars().any(acts) {
        text.chars()
            .map(|c| if acts(c) { '\u{fffd}' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// `text` in dim grey or red on a colour terminal (stderr, where these lines go);
/// plain when stderr is redirected or `NO_COLOR` is set. Its control characters are
/// made [inert] first: the only escapes written are the colour's own.
fn paint(style: Paint, text: &str) -> String {
    let text = inert(text);
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if !colour {
        return text.into_owned();
    }
    let code = match style {
        Paint::Dim => "2",
        Paint::Error => "31",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}
