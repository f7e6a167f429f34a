//! `llmctl` end to end: the built example binary run as a child process against a real
//! gateway on `127.0.0.1:0` with an echo publisher — the `get llm` table (with its pool
//! and load) and JSON, the `get agent` table and JSON, one-shot and scripted chats (with
//! an LLM and with an agent), the one-line errors (unreachable
//! gateway, inactive llm, tokens, a stream failing midway), and the interactive REPL
//! driven through tmux.
//!
//! The binary is `target/<profile>/examples/llmctl`, which `cargo test` builds with the
//! examples; `cargo test --test llmctl` alone does not, so build it first then
//! (`cargo build --example llmctl`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::future::Future;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};
use virtual_llm::openai::chunk_body;
use virtual_llm::protocol::{AgentSpec, LlmSpec, TaskFrame};
use virtual_llm::sse::SseWire;
use virtual_llm::{
    EchoProvider, Error, Gateway, LlmName, MemoryStore, Principal, Provider, PublishedLlm,
    Publisher, PublisherOptions, Reply, Role, StaticTokens,
};

/// The tokens of the gateway started `with_tokens`.
const CLIENT_TOKEN: &str = "client-token-0123456789";
const PUBLISHER_TOKEN: &str = "publisher-token-0123456789";

/// The echo model, plus two behaviours keyed by the message's first word: `hang` sends
/// one chunk and then nothing until the request is dropped, `fail` sends one chunk and
/// then an error. Every request body is kept for the test to look at.
#[derive(Debug)]
struct TestProvider {
    echo: EchoProvider,
    bodies: Mutex<Vec<Value>>,
    /// Notified when a `hang` stream is dropped: the publisher saw the cancel.
    hang_dropped: Arc<Notify>,
}

impl TestProvider {
    fn new() -> Self {
        TestProvider {
            echo: EchoProvider::new(),
            bodies: Mutex::new(Vec::new()),
            hang_dropped: Arc::new(Notify::new()),
        }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// What a hostile model writes to take over the client's terminal.
const ESCAPES: &str =
    "\x1b]0;pwned-title\x07\x1b[2J\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07\u{9b}31m\r";

struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl Provider for TestProvider {
    async fn infer(&self, task: TaskFrame) -> Result<Reply, Error> {
        let body = task.body.to_value().unwrap();
        self.bodies.lock().unwrap().push(body.clone());
        let last = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_owned();
        let first_word = last
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let chunk = |text: &str| Ok(chunk_body("chatcmpl-t", "m", 0, Some(text), None).to_string());
        match first_word.as_str() {
            "hang" if task.stream => {
                let guard = NotifyOnDrop(self.hang_dropped.clone());
                let first = futures::stream::iter([chunk("hang")]);
                let never = futures::stream::pending().map(move |()| {
                    let _keep = &guard;
                    chunk("never")
                });
                Ok(Reply::Stream(first.chain(never).boxed()))
            }
            "fail" if task.stream => {
                let failure = Err(Error::Upstream {
                    message: "the model crashed".into(),
                });
                Ok(Reply::Stream(
                    futures::stream::iter([chunk("fail"), failure]).boxed(),
                ))
            }
            // Red-team F11: terminal escapes in the model's text and in its error
            // (a window title, clear screen, an OSC 52 clipboard write).
            "escape" if task.stream => {
                let failure = Err(Error::Upstream {
                    message: format!("{ESCAPES}broken"),
                });
                Ok(Reply::Stream(
                    futures::stream::iter([chunk(&format!("{ESCAPES}looks harmless")), failure])
                        .boxed(),
                ))
            }
            _ => self.echo.infer(task).await,
        }
    }
}

/// A gateway with a publisher of `demo`, stopped when dropped.
struct Setup {
    url: String,
    provider: Arc<TestProvider>,
    publisher: Option<Publisher>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl Setup {
    /// Open access (the reference gateway without tokens).
    async fn start() -> Self {
        Self::start_with(Gateway::builder(Arc::new(MemoryStore::new())), None).await
    }

    /// Tokens: the publisher's, and `CLIENT_TOKEN` for clients.
    async fn with_tokens() -> Self {
        let auth = StaticTokens::new()
            .with(PUBLISHER_TOKEN, Principal::new("alice", [Role::Publisher]))
            .with(CLIENT_TOKEN, Principal::new("client", [Role::Client]));
        Self::start_with(
            Gateway::builder(Arc::new(MemoryStore::new())).authenticator(Arc::new(auth)),
            Some(PUBLISHER_TOKEN.to_owned()),
        )
        .await
    }

    async fn start_with(builder: virtual_llm::GatewayBuilder, token: Option<String>) -> Self {
        let gateway = builder.start().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, mut stop) = watch::channel(false);
        let closing = gateway.clone();
        tokio::spawn(virtual_llm::http::serve(
            listener,
            virtual_llm::http::routes(gateway.clone(), [virtual_llm::sse::route(gateway)]),
            async move {
                let _ = stop.wait_for(|s| *s).await;
                closing.close_channels("test over");
            },
            Duration::from_secs(1),
        ));
        let provider = Arc::new(TestProvider::new());
        let publisher = Publisher::spawn(
            Arc::new(SseWire::new(&url, token).unwrap()),
            vec![PublishedLlm::new(
                LlmSpec {
                    tier: Some("fast".into()),
                    pool: Some(LlmName::parse("echoes").unwrap()),
                    max_concurrent: Some(4),
                    ..LlmSpec::new(LlmName::parse("demo").unwrap(), "echo", "echo-1")
                },
                provider.clone(),
            )],
            PublisherOptions {
                agents: vec![poet()],
                ..PublisherOptions::default()
            },
        );
        within("the publisher connects", publisher.connected()).await;
        Setup {
            url,
            provider,
            publisher: Some(publisher),
            shutdown,
        }
    }

    /// Runs `llmctl --gateway URL ARGS…` to completion.
    async fn llmctl(&self, args: &[&str]) -> Run {
        let mut all = vec!["--gateway", self.url.as_str()];
        all.extend_from_slice(args);
        run_llmctl(&all, None, &[]).await
    }
}

/// The agent every setup publishes over the pool `echoes`.
fn poet() -> AgentSpec {
    AgentSpec {
        description: Some("Answers in verse".into()),
        system_prompt: Some("You answer in verse.".into()),
        default_params: serde_json::json!({"temperature": 0.9, "max_tokens": 99})
            .as_object()
            .cloned(),
        ..AgentSpec::new(
            LlmName::parse("poet").unwrap(),
            LlmName::parse("echoes").unwrap(),
        )
    }
}

/// Resolves `future`, or fails the test after 10 s.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// The built `llmctl` example, next to this test's `deps/` directory.
fn llmctl_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("llmctl{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it, `cargo test --test llmctl` does not \
         (run `cargo build --example llmctl` first)",
        path.display()
    );
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/llmctl.rs");
    let built = std::fs::metadata(&path).unwrap().modified().unwrap();
    let edited = std::fs::metadata(&source).unwrap().modified().unwrap();
    assert!(
        built >= edited,
        "{} is older than examples/llmctl.rs: run `cargo build --example llmctl`",
        path.display()
    );
    path
}

/// What a finished `llmctl` left.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "llmctl failed: {self:#?}");
        self
    }

    /// Failed, with exactly one line on stderr containing `needle`.
    fn failed_with(&self, needle: &str) {
        assert_eq!(self.code, Some(1), "{self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line of error: {self:#?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{needle:?} in {self:#?}"
        );
    }
}

async fn run_llmctl(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(llmctl_path());
    command
        .args(args)
        .env_remove("VIRTUAL_LLM_GATEWAY")
        .env_remove("VIRTUAL_LLM_TOKEN")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = within("llmctl exits", child.wait_with_output())
        .await
        .unwrap();
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

#[tokio::test]
async fn get_llm_prints_an_aligned_table() {
    let setup = Setup::start().await;
    let run = setup.llmctl(&["get", "llm"]).await;
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:#?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "KIND", "STATUS", "TYPE", "MODEL", "TIER", "POOL", "LOAD", "ID"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..8],
        [
            "demo", "virtual", "active", "echo", "echo-1", "fast", "echoes", "0/4"
        ]
    );
    assert!(row[8].starts_with("llm_"), "{row:?}");
    // Aligned: every column starts where its header does.
    for title in [
        "KIND", "STATUS", "TYPE", "MODEL", "TIER", "POOL", "LOAD", "ID",
    ] {
        let at = lines[0].find(title).unwrap();
        assert_ne!(lines[1].as_bytes()[at], b' ', "{title} column: {run:#?}");
        assert_eq!(
            lines[1].as_bytes()[at - 1],
            b' ',
            "{title} column: {run:#?}"
        );
    }
    assert!(!run.stdout.contains('\x1b'), "no colours into a pipe");
}

/// POOL is the view's pool key and LOAD its `inFlight/maxConcurrent`: from a gateway
/// answering canned views, so the in-flight count is not zero; a view from an older
/// gateway (no pool, no capacity, no count) reads `-` and `0/-`.
#[tokio::test]
async fn get_llm_shows_pool_and_load() {
    use warp::Filter;
    let views = serde_json::json!([
        {"name": "llama-a", "id": "llm_0123456789abcdef0123456789abcdef", "kind": "virtual",
         "status": "active", "type": "openai", "model": "llama-3.1-8b", "tier": null,
         "lastHeartbeatAt": null, "inactiveSince": null,
         "pool": "llama-8b", "maxConcurrent": 8, "inFlight": 3, "queued": 5},
        {"name": "old", "id": "llm_fedcba9876543210fedcba9876543210", "kind": "virtual",
         "status": "active", "type": "openai", "model": "m", "tier": null,
         "lastHeartbeatAt": null, "inactiveSince": null},
    ]);
    let route = warp::get()
        .and(warp::path!("api" / "v1" / "llms"))
        .map(move || warp::reply::json(&views));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());

    let run = run_llmctl(&["--gateway", &url, "get", "llm"], None, &[]).await;
    run.ok();
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{run:#?}");
    assert_eq!(
        rows[1][..8],
        [
            "llama-a",
            "virtual",
            "active",
            "openai",
            "llama-3.1-8b",
            "-",
            "llama-8b",
            "3/8"
        ]
    );
    assert_eq!(
        rows[2][..8],
        ["old", "virtual", "active", "openai", "m", "-", "-", "0/-"]
    );
}

#[tokio::test]
async fn get_llm_json_parses_and_one_name_shows_one_row() {
    let setup = Setup::start().await;
    let run = setup.llmctl(&["get", "llm", "-o", "json"]).await;
    let list: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(list[0]["name"], "demo");
    assert_eq!(list[0]["kind"], "virtual");
    assert_eq!(list[0]["status"], "active");

    // The global flag after the subcommand, and `-o json` for one name.
    let run = run_llmctl(
        &["get", "llm", "demo", "-o", "json", "--gateway", &setup.url],
        None,
        &[],
    )
    .await;
    let one: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(one["name"], "demo");
    assert_eq!(one["model"], "echo-1");

    let run = setup.llmctl(&["get", "llm", "demo"]).await;
    assert_eq!(run.ok().stdout.lines().count(), 2, "{run:#?}");
    setup
        .llmctl(&["get", "llm", "nope"])
        .await
        .failed_with("unknown llm \"nope\"");
}

#[tokio::test]
async fn chat_message_prints_only_the_answer() {
    let setup = Setup::start().await;
    let run = setup
        .llmctl(&["chat", "demo", "--message", "hello there"])
        .await;
    assert_eq!(run.ok().stdout, "hello there\n");
    assert_eq!(run.stderr, "");

    let run = setup
        .llmctl(&[
            "chat",
            "demo",
            "--message",
            "hello there",
            "--no-stream",
            "--system",
            "be brief",
            "--temperature",
            "0.5",
            "--max-tokens",
            "7",
        ])
        .await;
    assert_eq!(run.ok().stdout, "hello there\n");
    let bodies = setup.provider.bodies();
    let last = bodies.last().unwrap();
    assert_eq!(last["stream"], false);
    assert_eq!(last["temperature"], 0.5);
    assert_eq!(last["max_tokens"], 7);
    assert_eq!(last["messages"][0]["role"], "system");
    assert_eq!(last["messages"][0]["content"], "be brief");
    assert_eq!(bodies[0]["stream"], true);
}

/// `get agent` prints `NAME LLM STATUS DESCRIPTION`; `-o json` the gateway's view; an
/// unknown agent is a one-line error.
#[tokio::test]
async fn get_agent_prints_its_table_and_json() {
    let setup = Setup::start().await;
    let run = setup.llmctl(&["get", "agent"]).await;
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:#?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["NAME", "LLM", "STATUS", "DESCRIPTION"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..3], ["poet", "echoes", "active"], "{run:#?}");
    assert!(lines[1].ends_with("Answers in verse"), "{run:#?}");
    let at = lines[0].find("DESCRIPTION").unwrap();
    assert_eq!(&lines[1][at..], "Answers in verse", "aligned: {run:#?}");

    let run = setup.llmctl(&["get", "agent", "poet", "-o", "json"]).await;
    let one: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(
        one,
        serde_json::json!({"name": "poet", "llm": "echoes", "description": "Answers in verse", "status": "active"})
    );
    let run = setup.llmctl(&["get", "agents", "-o", "json"]).await;
    let all: Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);

    setup
        .llmctl(&["get", "agent", "nobody"])
        .await
        .failed_with("nobody");
}

/// `chat AGENT` talks to the agent: its persona reaches the model, the user's flags
/// over its defaults.
#[tokio::test]
async fn chat_with_an_agent_sends_its_persona() {
    let setup = Setup::start().await;
    let run = setup
        .llmctl(&[
            "chat",
            "poet",
            "--message",
            "roses are red",
            "--temperature",
            "0.3",
        ])
        .await;
    assert_eq!(run.ok().stdout, "roses are red\n");
    let bodies = setup.provider.bodies();
    let last = bodies.last().unwrap();
    assert_eq!(last["messages"][0]["content"], "You answer in verse.");
    assert_eq!(last["messages"][1]["content"], "roses are red");
    assert_eq!(last["temperature"], 0.3, "the user's flag wins");
    assert_eq!(last["max_tokens"], 99, "the agent's default fills the rest");
}

#[tokio::test]
async fn an_unreachable_gateway_is_one_line() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    for args in [
        &["get", "llm"][..],
        &["chat", "demo", "--message", "hi"][..],
    ] {
        let mut all = vec!["--gateway", url.as_str()];
        all.extend_from_slice(args);
        run_llmctl(&all, None, &[]).await.failed_with(&format!(
            "gateway not reachable at {url} (connection refused)"
        ));
    }
    // The gateway from the environment.
    run_llmctl(&["get", "llm"], None, &[("VIRTUAL_LLM_GATEWAY", &url)])
        .await
        .failed_with(&format!("gateway not reachable at {url}"));
}

#[tokio::test]
async fn a_stopped_publisher_reads_inactive() {
    let mut setup = Setup::start().await;
    setup.publisher.take().unwrap().stop().await;
    for extra in [None, Some("--no-stream")] {
        let mut args = vec!["chat", "demo", "--message", "hi"];
        args.extend(extra);
        let run = setup.llmctl(&args).await;
        run.failed_with("llm demo is inactive (publisher offline since ");
        assert_eq!(run.stdout, "");
    }
    let run = setup.llmctl(&["get", "llm"]).await;
    assert!(
        run.ok()
            .stdout
            .lines()
            .nth(1)
            .unwrap()
            .contains(" inactive "),
        "{run:#?}"
    );
}

#[tokio::test]
async fn tokens_come_from_the_flag_or_the_environment() {
    let setup = Setup::with_tokens().await;
    setup
        .llmctl(&["get", "llm"])
        .await
        .failed_with("the gateway wants a token (401)");
    setup
        .llmctl(&["--token", "wrong", "chat", "demo", "--message", "hi"])
        .await
        .failed_with("the gateway refused the token (401)");
    // A publisher's token may not call: the gateway's 403 says so.
    setup
        .llmctl(&["chat", "demo", "-m", "hi", "--token", PUBLISHER_TOKEN])
        .await
        .failed_with("the gateway refused the token (403): this token may not ");
    let run = setup
        .llmctl(&["chat", "demo", "--message", "hi", "--token", CLIENT_TOKEN])
        .await;
    assert_eq!(run.ok().stdout, "hi\n");
    let run = run_llmctl(
        &["--gateway", &setup.url, "get", "llm"],
        None,
        &[("VIRTUAL_LLM_TOKEN", CLIENT_TOKEN)],
    )
    .await;
    assert!(run.ok().stdout.contains("demo"));
}

#[tokio::test]
async fn a_stream_failing_midway_ends_its_line_and_prints_the_error() {
    let setup = Setup::start().await;
    let run = setup
        .llmctl(&["chat", "demo", "--message", "fail now"])
        .await;
    assert_eq!(run.stdout, "fail\n", "{run:#?}");
    run.failed_with("the model crashed");
}

/// Red-team F11: llmctl never writes a control character a model sent (C0 but
/// newline and tab, DEL, C1), in the answer or in an error; it shows U+FFFD instead.
#[tokio::test]
async fn model_text_reaches_the_terminal_without_control_characters() {
    let setup = Setup::start().await;
    let run = setup
        .llmctl(&["chat", "demo", "--message", "escape now"])
        .await;
    for (stream, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{stream} holds a control character: {text:?}"
        );
    }
    assert!(run.stdout.ends_with("looks harmless\n"), "{run:#?}");
    assert!(run.stdout.contains('\u{fffd}'), "{run:#?}");
    run.failed_with("broken");
}

#[tokio::test]
async fn the_repl_reads_stdin_when_it_is_not_a_terminal_and_keeps_the_conversation() {
    let setup = Setup::start().await;
    let run = run_llmctl(
        &[
            "--gateway",
            &setup.url,
            "chat",
            "demo",
            "--system",
            "be brief",
        ],
        Some("first words\n\n  second   words  \n/reset\nthird\n/exit\nnever sent\n"),
        &[],
    )
    .await;
    assert_eq!(run.ok().stdout, "first words\nsecond words\nthird\n");
    let status: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains(" total "))
        .collect();
    assert_eq!(status.len(), 3, "{run:#?}");
    // The echo model's usage chunk, asked for with `stream_options`: real tokens.
    assert!(
        status[0].starts_with("2 tokens · ") && status[0].contains("first token "),
        "{run:#?}"
    );
    let bodies = setup.provider.bodies();
    assert_eq!(bodies.len(), 3);
    for body in &bodies {
        assert_eq!(body["stream_options"]["include_usage"], true, "{body}");
    }
    let roles = |body: &Value| -> Vec<(String, String)> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_owned(),
                    m["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let pair = |r: &str, c: &str| (r.to_owned(), c.to_owned());
    assert_eq!(
        roles(&bodies[1]),
        [
            pair("system", "be brief"),
            pair("user", "first words"),
            pair("assistant", "first words"),
            pair("user", "second   words"),
        ]
    );
    // `/reset` went back to the system prompt alone.
    assert_eq!(
        roles(&bodies[2]),
        [pair("system", "be brief"), pair("user", "third")]
    );
}

/// A tmux server of its own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn command(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        let out = self.command(&["capture-pane", "-p", "-t", "llmctl", "-S", "-100"]);
        // Lines without their trailing blanks (the prompt `> ` reads `>`), and no blank
        // lines below the cursor.
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        lines.join("\n").trim_end().to_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "llmctl"];
        args.extend_from_slice(keys);
        assert!(self.command(&args).status.success());
    }

    /// Waits (polling the screen every 20 ms, at most 10 s) until `condition` holds.
    async fn until(&self, what: &str, condition: impl Fn(&str) -> bool) -> String {
        for _ in 0..500 {
            let screen = self.screen();
            if condition(&screen) {
                return screen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "timed out waiting for {what}; the screen:\n{}",
            self.screen()
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interactive_repl_streams_cancels_and_keeps_history() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipped: tmux is not installed, the REPL is covered through stdin only");
        return;
    }
    let setup = Setup::start().await;
    let tmux = Tmux {
        socket: format!("llmctl-test-{}", std::process::id()),
    };
    let script = format!(
        "NO_COLOR=1 {} --gateway {} chat demo; echo EXIT=$?; sleep 600",
        llmctl_path().display(),
        setup.url
    );
    let started = tmux.command(&[
        "new-session",
        "-d",
        "-s",
        "llmctl",
        "-x",
        "150",
        "-y",
        "40",
        &script,
    ]);
    assert!(started.status.success(), "{started:?}");

    let screen = tmux
        .until("the banner and the prompt", |s| s.ends_with("\n>"))
        .await;
    assert!(
        screen.contains("demo · virtual · active · echo/echo-1, tier fast"),
        "{screen}"
    );

    // A streamed answer, then its status line.
    tmux.keys(&["hello tmux world", "Enter"]);
    tmux.until("the answer and its status line", |s| {
        s.contains("> hello tmux world\nhello tmux world\n3 tokens · ")
    })
    .await;

    // Ctrl-C while an answer streams drops the request and returns to the prompt.
    tmux.keys(&["hang on", "Enter"]);
    tmux.until("the first chunk", |s| s.contains("> hang on\nhang"))
        .await;
    tmux.keys(&["C-c"]);
    tmux.until("the cancel", |s| {
        s.contains("> hang on\nhang") && s.ends_with("(cancelled)\n>")
    })
    .await;
    within(
        "the publisher's stream is dropped",
        setup.provider.hang_dropped.notified(),
    )
    .await;

    // History: Up brings back the last line; the cancelled turn is not in the
    // conversation.
    tmux.keys(&["again", "Enter"]);
    tmux.until("the next answer", |s| {
        s.matches("again\n1 token · ").count() == 1
    })
    .await;
    tmux.keys(&["Up", "Enter"]);
    tmux.until("the recalled line's answer", |s| {
        s.matches("again\n1 token · ").count() == 2
    })
    .await;
    let bodies = setup.provider.bodies();
    let contents: Vec<&str> = bodies.last().unwrap()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        [
            "hello tmux world",
            "hello tmux world",
            "again",
            "again",
            "again"
        ]
    );

    // Ctrl-D leaves.
    tmux.keys(&["C-d"]);
    tmux.until("llmctl exits with 0", |s| s.contains("EXIT=0"))
        .await;
}
