//! The reference publisher binary against the reference gateway binary, in real time.
//!
//! With a heartbeat interval far below the gateway's keep-alive ping, a publisher keeps
//! its one control channel on either transport (it used to drop an SSE channel every
//! three heartbeats, waiting for a ping that comes every 20 s). A second publisher on
//! the same session file refuses to start instead of evicting the first one forever.
//! Timings that cannot work together stop the gateway with a one-line error. Every
//! published LLM carries its pool and `maxConcurrent` (`--echo NAME@POOL`,
//! `--max-concurrent`, a config entry's own), and a bad one is a one-line error. A
//! config entry's wake and sleep settings (`wake`, `sleep`, `idleAfter`,
//! `readyTimeout`) are taken, an idle LLM's sleep recipe is called as written, and a
//! bad setting is a one-line error. A config object publishes agents next to the LLMs,
//! and a bad agent is a one-line error. `--discover URL --prefix P` publishes what the
//! upstream lists and follows the list as it changes.
//!
//! These tests run the binaries for a few seconds; they poll for conditions with a
//! generous cap and never assert how long anything took.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use binary::{
    GatewayProcess, PublisherProcess, free_addr, gateway_binary, poll_until, ready, temp_dir,
    try_row,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warp::Filter;

/// Generous cap for anything that normally takes well under a second.
const CAP: Duration = Duration::from_secs(60);

/// The log lines that show a publisher lost or never had its channel.
const DROPPED: [&str; 2] = ["disconnected", "not connected"];

fn heartbeat_at(row: &Value) -> SystemTime {
    humantime::parse_rfc3339_weak(row["lastHeartbeatAt"].as_str().unwrap()).unwrap()
}

fn dropped_lines(publisher: &PublisherProcess) -> Vec<String> {
    DROPPED
        .iter()
        .flat_map(|d| publisher.lines_with(d))
        .collect()
}

/// What the fake upstream saw of one request.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// An OpenAI-compatible upstream (and recipe endpoint) on 127.0.0.1:0: it lists its
/// models at `GET /v1/models`, answers every other request 200, and reports each one.
async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let routes = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::bytes())
        .map(
            move |method: warp::http::Method,
                  path: warp::path::FullPath,
                  query: String,
                  authorization: Option<String>,
                  body: bytes::Bytes| {
                // The receiver may be gone once the test has seen what it waited for.
                let _ = seen_tx.send(Seen {
                    method: method.to_string(),
                    path: path.as_str().to_owned(),
                    query,
                    authorization,
                    body: body.to_vec(),
                });
                warp::reply::json(&json!({"object": "list", "data": [{"id": "m"}]}))
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    (addr, seen)
}

async fn echo(url: &str, model: &str, text: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A gateway heartbeating every second (its keep-alive ping stays at 20 s): the
/// publisher's channel outlives several heartbeat periods, well past the three
/// intervals after which it used to give up, and the row stays active on the same
/// session throughout.
async fn keeps_its_channel_with_one_second_heartbeats(transport: &str) {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start_env(
        addr,
        &dir.0.join("data"),
        &["--heartbeat-every", "1s", "--stale-after", "30s"],
        &[],
    );
    ready(&url).await;
    let session_file = dir.0.join("publisher-session");
    let publisher = PublisherProcess::start(&url, transport, &session_file, &["--echo", "demo"]);
    // Serving: the session is persisted and the row is active.
    poll_until("the publisher serves", CAP, || async {
        !publisher
            .lines_with("connected; serving requests")
            .is_empty()
            && try_row(&url, "demo")
                .await
                .is_some_and(|r| r["status"] == "active")
    })
    .await;
    let session = std::fs::read_to_string(&session_file).unwrap();
    let first = heartbeat_at(&try_row(&url, "demo").await.unwrap());
    // Six heartbeats later (the gateway's own clock says so), nothing was dropped.
    poll_until("six more heartbeats arrived", CAP, || async {
        let row = try_row(&url, "demo").await.unwrap();
        assert_eq!(
            row["status"], "active",
            "the row never leaves service: {row}"
        );
        assert_eq!(dropped_lines(&publisher), Vec::<String>::new());
        heartbeat_at(&row)
            .duration_since(first)
            .is_ok_and(|d| d >= Duration::from_secs(6))
    })
    .await;
    assert_eq!(
        publisher.lines_with("connected; serving requests").len(),
        1,
        "one connection all along: {:#?}",
        publisher.log()
    );
    assert_eq!(dropped_lines(&publisher), Vec::<String>::new());
    assert_eq!(
        std::fs::read_to_string(&session_file).unwrap(),
        session,
        "the same session"
    );
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "virtual_llm_publishers_connected 1"),
        "{metrics}"
    );
    let (status, body) = echo(&url, "demo", "still here").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_publisher_keeps_its_channel_with_one_second_heartbeats() {
    keeps_its_channel_with_one_second_heartbeats("sse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ws_publisher_keeps_its_channel_with_one_second_heartbeats() {
    keeps_its_channel_with_one_second_heartbeats("ws").await;
}

/// Two publishers started in one directory used to share `./publisher-session` and
/// replace each other's channel every few seconds. The second one now refuses to
/// start, naming `--session-file`, and the first one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_publisher_on_the_same_session_file_refuses_to_start() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let session_file = dir.0.join("publisher-session");
    let first = PublisherProcess::start(&url, "sse", &session_file, &["--echo", "demo"]);
    poll_until("the first publisher is serving", CAP, || async {
        !first.lines_with("connected; serving requests").is_empty()
    })
    .await;

    let second = PublisherProcess::start(&url, "sse", &session_file, &["--echo", "other"]);
    let (status, log) = second.exited(CAP).await;
    assert!(
        !status.success(),
        "the second publisher must not run: {log:#?}"
    );
    let refusal = log
        .iter()
        .find(|l| l.contains("--session-file"))
        .unwrap_or_else(|| panic!("the refusal names --session-file: {log:#?}"));
    assert!(
        refusal.contains(session_file.to_str().unwrap()),
        "and the file: {refusal}"
    );
    assert!(
        try_row(&url, "other").await.is_none(),
        "the second publisher registered nothing"
    );

    let (status, body) = echo(&url, "demo", "first one serves").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "first one serves");
    assert_eq!(try_row(&url, "demo").await.unwrap()["status"], "active");
    assert_eq!(first.lines_with("connected; serving requests").len(), 1);
    assert_eq!(dropped_lines(&first), Vec::<String>::new());
}

/// A stale timeout that one late heartbeat would trip is refused at start: the
/// gateway exits non-zero with one readable line naming the settings, not a Debug
/// struct, before it touches its store.
#[tokio::test]
async fn the_gateway_refuses_timings_that_cannot_work_together() {
    let dir = temp_dir();
    let mut child = Command::new(gateway_binary())
        .args(["--listen", &free_addr().to_string(), "--data-dir"])
        .arg(dir.0.join("data"))
        .args(["--heartbeat-every", "10s", "--stale-after", "15s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + CAP;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the gateway started with a stale timeout under two heartbeats");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    let line = stderr.trim();
    assert_eq!(line.lines().count(), 1, "one line: {stderr}");
    for needle in [
        "staleAfter",
        "--stale-after",
        "heartbeatInterval",
        "--heartbeat-every",
    ] {
        assert!(line.contains(needle), "{needle} in: {line}");
    }
    assert!(!line.contains('{'), "not a Debug struct: {line}");
    assert!(
        !dir.0.join("data").join("registry.redb").exists(),
        "it stopped before touching the store"
    );
}

/// Every LLM the reference publisher registers carries a `maxConcurrent`: the
/// `--max-concurrent` default of 32, the flag's value, or its config entry's own; and
/// `--echo NAME@POOL` and a config entry's `pool` put it in that pool. The registry
/// shows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_llms_carry_their_pool_and_max_concurrent() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;

    let defaults = PublisherProcess::start(
        &url,
        "sse",
        &dir.0.join("session-a"),
        &["--echo", "demo@echoes", "--echo", "solo"],
    );
    // The upstream lists its models: the LLMs register ready.
    let (upstream, _seen) = upstream().await;
    let upstream = format!("http://{upstream}/v1");
    let config = dir.0.join("providers.json");
    std::fs::write(
        &config,
        json!([
            {"name": "llama-a", "model": "llama-3.1-8b", "url": upstream,
             "publish": true, "pool": "llamas", "maxConcurrent": 8},
            {"name": "llama-b", "model": "llama-3.1-8b", "url": upstream,
             "publish": true},
            {"name": "unpublished", "model": "m", "url": upstream},
        ])
        .to_string(),
    )
    .unwrap();
    let flagged = PublisherProcess::start(
        &url,
        "ws",
        &dir.0.join("session-b"),
        &[
            "--max-concurrent",
            "5",
            "--echo",
            "five",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    for name in ["demo", "solo", "five", "llama-a", "llama-b"] {
        poll_until(&format!("{name} is active"), CAP, || async {
            try_row(&url, name)
                .await
                .is_some_and(|r| r["status"] == "active")
        })
        .await;
    }
    let shown = |row: Value| (row["pool"].clone(), row["maxConcurrent"].clone());
    for (name, pool, max) in [
        ("demo", "echoes", 32),
        ("solo", "solo", 32), // a row without a pool is the pool of one named after it
        ("five", "five", 5),
        ("llama-a", "llamas", 8),
        ("llama-b", "llama-b", 5),
    ] {
        assert_eq!(
            shown(try_row(&url, name).await.unwrap()),
            (json!(pool), json!(max)),
            "{name}"
        );
    }
    assert!(try_row(&url, "unpublished").await.is_none());
    let (status, body) = echo(&url, "demo", "in a pool").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "in a pool");
    assert_eq!(dropped_lines(&defaults), Vec::<String>::new());
    assert_eq!(dropped_lines(&flagged), Vec::<String>::new());
}

/// `--config` as an object: `{"providers": [...], "agents": [...]}` publishes the agents
/// next to the LLMs, over a provider's pool or an `--echo` LLM; the upstream behind the
/// publisher gets an agent's request with the agent's system prompt first and its
/// defaults under the client's own values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_object_publishes_agents_next_to_the_llms() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let (upstream, mut seen) = upstream().await;
    let upstream = format!("http://{upstream}/v1");
    let config = dir.0.join("publisher.json");
    std::fs::write(
        &config,
        json!({
            "providers": [{"name": "llama-a", "model": "llama-3.1-8b", "url": upstream,
                           "publish": true, "pool": "llamas"}],
            "agents": [
                {"name": "reviewer", "llm": "llamas", "description": "Reviews",
                 "systemPrompt": "You review code.",
                 "defaultParams": {"max_tokens": 7, "temperature": 0.1}},
                {"name": "poet", "llm": "demo", "systemPrompt": "You answer in verse."},
            ],
        })
        .to_string(),
    )
    .unwrap();
    let publisher = PublisherProcess::start(
        &url,
        "ws",
        &dir.0.join("session"),
        &["--echo", "demo", "--config", config.to_str().unwrap()],
    );
    let agent = |name: &'static str| {
        let url = url.clone();
        async move {
            reqwest::get(format!("{url}/api/v1/agents/{name}"))
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    for name in ["reviewer", "poet"] {
        poll_until(&format!("{name} is active"), CAP, || async {
            agent(name).await["status"] == "active"
        })
        .await;
    }
    assert_eq!(
        agent("reviewer").await,
        json!({"name": "reviewer", "llm": "llamas", "description": "Reviews", "status": "active"})
    );
    let (status, body) = echo(&url, "poet", "roses are red").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "roses are red");

    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "reviewer", "temperature": 0.5,
                      "messages": [{"role": "system", "content": "Be kind."},
                                   {"role": "user", "content": "fn f() {}"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent: Value = loop {
        let request = tokio::time::timeout(CAP, seen.recv())
            .await
            .unwrap()
            .unwrap();
        if request.method == "POST" && request.path.ends_with("/chat/completions") {
            break serde_json::from_slice(&request.body).unwrap();
        }
    };
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "You review code."},
               {"role": "system", "content": "Be kind."},
               {"role": "user", "content": "fn f() {}"}])
    );
    assert_eq!(
        (sent["temperature"].clone(), sent["max_tokens"].clone()),
        (json!(0.5), json!(7))
    );
    assert_eq!(dropped_lines(&publisher), Vec::<String>::new());
}

/// An agent over an LLM the publisher does not publish, or over the limits, stops the
/// publisher at start with one line saying which, before it registers anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_agent_is_a_one_line_error() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    for (agents, needles) in [
        (
            json!([{"name": "poet", "llm": "nowhere"}]),
            vec!["agent poet speaks through nowhere"],
        ),
        (
            json!([{"name": "poet", "llm": "demo", "defaultParams": {"messages": []}}]),
            vec!["(agent poet)", "may not set messages"],
        ),
        (
            json!([{"name": "_poet", "llm": "demo"}]),
            vec!["publisher.json"],
        ),
    ] {
        let config = dir.0.join("publisher.json");
        std::fs::write(
            &config,
            json!({"providers": [], "agents": agents}).to_string(),
        )
        .unwrap();
        let args = ["--echo", "demo", "--config", config.to_str().unwrap()];
        let publisher = PublisherProcess::start(&url, "sse", &dir.0.join("session"), &args);
        let (status, log) = publisher.exited(CAP).await;
        assert!(!status.success(), "{agents}: {log:#?}");
        assert_eq!(log.len(), 1, "one line for {agents}: {log:#?}");
        assert!(log[0].starts_with("error: "), "{log:#?}");
        for needle in needles {
            assert!(log[0].contains(needle), "{needle:?} in {log:#?}");
        }
    }
    assert!(try_row(&url, "demo").await.is_none(), "nothing registered");
}

/// A bad `--echo NAME@POOL`, or a config entry whose `maxConcurrent` is out of range,
/// stops the publisher with one line saying what is wrong, before it registers
/// anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pool_or_capacity_is_a_one_line_error() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let config = dir.0.join("providers.json");
    std::fs::write(
        &config,
        json!([{"name": "big", "model": "m", "url": "http://127.0.0.1:9/v1",
                "publish": true, "maxConcurrent": 10001}])
        .to_string(),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for (args, needles) in [
        (
            vec!["--echo", "demo@bad pool"],
            vec![
                "--echo demo@bad pool",
                "pool \"bad pool\" is not a valid name",
            ],
        ),
        (
            vec!["--echo", "_demo@pool"],
            vec!["--echo _demo@pool", "name \"_demo\" is not a valid name"],
        ),
        (
            vec!["--config", config],
            vec!["providers.json (big)", "maxConcurrent of big is 10001"],
        ),
    ] {
        let publisher = PublisherProcess::start(&url, "sse", &dir.0.join("session"), &args);
        let (status, log) = publisher.exited(CAP).await;
        assert!(!status.success(), "{args:?}: {log:#?}");
        assert_eq!(log.len(), 1, "one line for {args:?}: {log:#?}");
        assert!(log[0].starts_with("error: "), "{log:#?}");
        for needle in needles {
            assert!(log[0].contains(needle), "{needle:?} in {log:#?}");
        }
    }
    assert_eq!(
        reqwest::get(format!("{url}/api/v1/llms"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
        json!([]),
        "nothing registered"
    );
}

/// A config entry's wake and sleep settings are taken: both recipe shapes, `idleAfter`
/// and `readyTimeout`. The upstreams are probed (`GET {url}/models`); one that does
/// not answer is `asleep` when it has a wake recipe; and an LLM idle for its
/// `idleAfter` has its sleep recipe called as written (method, query, headers, JSON
/// body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_and_sleep_settings_are_taken_and_an_idle_llm_is_put_to_sleep() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let (upstream, mut seen) = upstream().await;
    let config = dir.0.join("providers.json");
    std::fs::write(
        &config,
        json!([
            {"name": "vllm-a", "model": "m", "url": format!("http://{upstream}/v1"),
             "publish": true,
             "wake": {"url": format!("http://{upstream}/wake_up")},
             "sleep": {"url": format!("http://{upstream}/sleep?level=1"), "method": "post",
                       "headers": {"authorization": "Bearer sk-local"}, "body": {"level": 1}},
             "idleAfter": "1s", "readyTimeout": "30s"},
            {"name": "ollama-b", "model": "m", "url": format!("http://{upstream}/v1"),
             "publish": true,
             "wake": {"command": ["true"]}, "sleep": {"command": ["true"]},
             "idleAfter": "15m", "readyTimeout": "2m"},
            // Nothing listens there.
            {"name": "down-c", "model": "m", "url": "http://127.0.0.1:9/v1", "publish": true,
             "wake": {"command": ["true"]}},
        ])
        .to_string(),
    )
    .unwrap();
    let publisher = PublisherProcess::start(
        &url,
        "ws",
        &dir.0.join("session"),
        &["--config", config.to_str().unwrap()],
    );
    poll_until("the publisher serves", CAP, || async {
        !publisher
            .lines_with("connected; serving requests")
            .is_empty()
    })
    .await;
    for name in ["vllm-a", "ollama-b", "down-c"] {
        assert!(try_row(&url, name).await.is_some(), "{name} is registered");
    }
    let down = publisher.lines_with("down-c");
    assert!(
        down.iter()
            .any(|l| l.contains("upstream state") && l.contains("asleep")),
        "an upstream that does not answer, with a wake recipe, is asleep: {down:#?}"
    );

    let sleep = tokio::time::timeout(CAP, async {
        loop {
            let request = seen.recv().await.unwrap();
            if request.path == "/sleep" {
                return request;
            }
            assert_eq!(
                (request.method.as_str(), request.path.as_str()),
                ("GET", "/v1/models"),
                "before the sleep, only probes"
            );
        }
    })
    .await
    .expect("the sleep recipe was called");
    assert_eq!(sleep.method, "POST");
    assert_eq!(sleep.query, "level=1");
    assert_eq!(sleep.authorization.as_deref(), Some("Bearer sk-local"));
    assert_eq!(
        serde_json::from_slice::<Value>(&sleep.body).unwrap(),
        json!({"level": 1})
    );
    poll_until("the publisher says vllm-a sleeps", CAP, || async {
        publisher
            .lines_with("idle: put to sleep")
            .iter()
            .any(|l| l.contains("vllm-a"))
    })
    .await;
    assert!(
        publisher
            .lines_with("idle: put to sleep")
            .iter()
            .all(|l| !l.contains("ollama-b")),
        "ollama-b idles for 15m"
    );
    assert_eq!(dropped_lines(&publisher), Vec::<String>::new());
    assert!(
        publisher.log().iter().all(|l| !l.contains("sk-local")),
        "no secret in the log"
    );
}

/// A bad wake or sleep setting stops the publisher with one line saying which entry
/// and what is wrong, before it registers anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_wake_or_sleep_setting_is_a_one_line_error() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let wake = json!({"command": ["true"]});
    let cases = [
        (
            json!({"wake": {"command": ["true"], "url": "http://h/wake"}}),
            "wake: either command or url, not both",
        ),
        (json!({"wake": {}}), "wake: needs a command or a url"),
        (
            json!({"wake": {"command": []}}),
            "wake: a command recipe must name a program",
        ),
        (
            json!({"wake": wake, "idleAfter": "1m",
                   "sleep": {"command": ["true"], "body": "x"}}),
            "sleep: method, headers and body go with url, not command",
        ),
        (
            json!({"wake": {"url": "ftp://h/wake"}}),
            "wake: a recipe url must be http or https",
        ),
        (
            json!({"wake": {"url": "http://h/wake", "method": "PO ST"}}),
            "wake: \"PO ST\" is not an HTTP method",
        ),
        (
            json!({"wake": {"url": "http://h/wake", "headers": {"x-key": "a\nb"}}}),
            "wake: the value of header x-key is not valid",
        ),
        (
            json!({"wake": wake, "idleAfter": "soon"}),
            "idleAfter \"soon\" is not a duration like \"15m\"",
        ),
        (
            json!({"wake": wake, "readyTimeout": "0s"}),
            "readyTimeout must be more than zero",
        ),
        (
            json!({"wake": wake, "sleep": wake}),
            "sleep needs idleAfter",
        ),
        (json!({"idleAfter": "15m"}), "idleAfter needs a wake recipe"),
        (json!({"wake": {"cmd": ["true"]}}), "unknown field `cmd`"),
        (
            json!({"wake": {"command": "systemctl start vllm"}}),
            "expected a sequence",
        ),
    ];
    let config = dir.0.join("providers.json");
    for (settings, needle) in cases {
        let mut entry = json!({"name": "gpu", "model": "m", "url": "http://127.0.0.1:9/v1",
                               "publish": true});
        for (key, value) in settings.as_object().unwrap() {
            entry[key] = value.clone();
        }
        std::fs::write(&config, json!([entry]).to_string()).unwrap();
        let publisher = PublisherProcess::start(
            &url,
            "sse",
            &dir.0.join("session"),
            &["--config", config.to_str().unwrap()],
        );
        let (status, log) = publisher.exited(CAP).await;
        assert!(!status.success(), "{settings}: {log:#?}");
        assert_eq!(log.len(), 1, "one line for {settings}: {log:#?}");
        assert!(log[0].starts_with("error: "), "{log:#?}");
        assert!(log[0].contains("providers.json"), "{log:#?}");
        assert!(log[0].contains(needle), "{needle:?} in {log:#?}");
    }
    assert_eq!(
        reqwest::get(format!("{url}/api/v1/llms"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
        json!([]),
        "nothing registered"
    );
}

/// An upstream listing the models in `models` at `GET /v1/models`, which the test
/// changes.
async fn listing_upstream(
    models: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
) -> SocketAddr {
    let routes = warp::path!("v1" / "models").map(move || {
        let data: Vec<Value> = models
            .lock()
            .unwrap()
            .iter()
            .map(|id| json!({"id": id, "object": "model"}))
            .collect();
        warp::reply::json(&json!({"object": "list", "data": data}))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_publishes_what_the_upstream_lists_and_follows_it() {
    let models = std::sync::Arc::new(std::sync::Mutex::new(vec![
        "meta-llama/Llama-3.1-8B-Instruct",
        "qwen2.5:7b q4",
    ]));
    let upstream = listing_upstream(models.clone()).await;
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start_env(
        addr,
        &dir.0.join("data"),
        &["--heartbeat-every", "1s", "--stale-after", "30s"],
        &[],
    );
    ready(&url).await;
    let discover = format!("http://{upstream}/v1");
    let publisher = PublisherProcess::start(
        &url,
        "sse",
        &dir.0.join("publisher-session"),
        &[
            "--discover",
            &discover,
            "--prefix",
            "box1/",
            "--echo",
            "demo",
        ],
    );
    let active = |name: &'static str| {
        let url = url.clone();
        async move {
            try_row(&url, name)
                .await
                .is_some_and(|r| r["status"] == "active")
        }
    };
    poll_until(
        "every listed model is published, beside the echo",
        CAP,
        || async {
            active("box1/meta-llama/Llama-3.1-8B-Instruct").await
                && active("box1/qwen2.5:7b-q4").await
                && active("demo").await
        },
    )
    .await;
    let row = try_row(&url, "box1/qwen2.5:7b-q4").await.unwrap();
    assert_eq!(
        row["model"], "qwen2.5:7b q4",
        "the upstream's own id: {row}"
    );

    *models.lock().unwrap() = vec!["qwen2.5:7b q4", "phi-4"];
    poll_until("the new model is published", CAP, || active("box1/phi-4")).await;
    poll_until("the model that went is dropped", CAP, || async {
        try_row(&url, "box1/meta-llama/Llama-3.1-8B-Instruct")
            .await
            .is_some_and(|r| r["status"] == "inactive")
    })
    .await;
    assert!(active("box1/qwen2.5:7b-q4").await && active("demo").await);
    assert!(
        !publisher
            .lines_with("the catalog changed; registering the new set")
            .is_empty(),
        "{:?}",
        publisher.log()
    );
}

/// `--gateway` takes several gateways (SPEC §14), comma-separated or repeated: with
/// the first unreachable, the publisher publishes through the next at once, on both
/// transports, and says it moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_given_several_gateways_publishes_through_one_it_reaches() {
    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0.join("data"));
    ready(&url).await;
    let down = format!("http://{}", free_addr());
    for (transport, model) in [("sse", "via-sse"), ("ws", "via-ws")] {
        let gateways = format!("{down},{url}");
        let publisher = PublisherProcess::start(
            &gateways,
            transport,
            &dir.0.join(format!("session-{transport}")),
            &["--echo", model],
        );
        poll_until("the row is active", Duration::from_secs(20), || async {
            try_row(&url, model)
                .await
                .is_some_and(|r| r["status"] == "active")
        })
        .await;
        let (status, body) = echo(&url, model, "hello").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            !publisher.lines_with("trying the next one").is_empty(),
            "{:?}",
            publisher.log()
        );
    }
}
