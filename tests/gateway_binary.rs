//! The reference gateway's configuration, end to end: without tokens it refuses a
//! non-loopback address; with a `--config` file every route checks the tokens and
//! their roles, rows belong to who registered them, and public LLMs are served.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::process::{Command, Stdio};

use binary::{GatewayProcess, free_addr, gateway_binary, temp_dir};
use serde_json::{Value, json};

#[test]
fn without_tokens_it_refuses_to_listen_beyond_loopback() {
    let dir = temp_dir();
    let output = Command::new(gateway_binary())
        .args([
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.0.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without tokens"),
        "{stderr}"
    );
    assert!(
        !dir.0.join("registry.redb").exists(),
        "it stopped before touching the store"
    );
}

/// Red-team finding F7: an empty `registry.redb` (a failed restore, a copy onto a
/// full disk) was silently taken as a new registry, freeing every name. The gateway
/// refuses it, names the flag, and starts on it only with `--fresh-store`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_registry_file_is_refused_unless_fresh_store_is_passed() {
    let dir = temp_dir();
    let registry = dir.0.join("registry.redb");
    std::fs::write(&registry, b"").unwrap();
    let refused = Command::new(gateway_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.0.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "it must not start on an empty registry"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("store corrupted"), "{stderr}");
    assert!(stderr.contains("is empty (0 bytes)"), "{stderr}");
    assert!(stderr.contains("--fresh-store"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&registry).unwrap().len(),
        0,
        "left as it was"
    );

    let addr = free_addr();
    let url = format!("http://{addr}");
    let gateway = GatewayProcess::start_env(addr, &dir.0, &["--fresh-store"], &[]);
    binary::ready(&url).await;
    gateway.sigterm();
    assert!(
        std::fs::metadata(&registry).unwrap().len() > 0,
        "a new registry was written into it"
    );
    // From then on it is a registry like any other: it starts without the flag.
    let gateway = GatewayProcess::start(addr, &dir.0);
    binary::ready(&url).await;
    gateway.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_public_llms_come_from_the_config_file() {
    let dir = temp_dir();
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        r#"
[gateway]
staleAfter = "2m"

[[tokens]]
token = "publisher-token-0123456789"
principal = "alice"
roles = ["publisher"]

[[tokens]]
tokenEnv = "TEST_CLIENT_TOKEN"
principal = "app"
roles = ["client"]

[[public]]
name = "gpt-public"
url = "http://127.0.0.1:9/v1"
model = "gpt-4o-mini"
"#,
    )
    .unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    // The client token reaches the child through its environment only.
    let gateway = GatewayProcess::start_env(
        addr,
        &dir.0.join("data"),
        &["--config", config.to_str().unwrap()],
        &[("TEST_CLIENT_TOKEN", "client-token-0123456789")],
    );
    let http = reqwest::Client::new();
    let models = |token: Option<&'static str>| {
        let mut request = http.get(format!("{url}/v1/models"));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    for _ in 0..500 {
        if models(Some("client-token-0123456789"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let listed: Value = models(Some("client-token-0123456789"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["data"][0]["id"], "gpt-public",
        "the public llm from the config"
    );
    assert_eq!(listed["data"][0]["owned_by"], "public");
    assert_eq!(models(None).await.unwrap().status(), 401, "no token");
    assert_eq!(
        models(Some("wrong-token-0123456789"))
            .await
            .unwrap()
            .status(),
        401
    );

    let register = |token: &'static str| {
        http.post(format!("{url}/api/v1/llms/_provider-register"))
            .bearer_auth(token)
            .json(&json!({"llms": [{"name": "mine", "type": "openai", "model": "m"}]}))
            .send()
    };
    assert_eq!(
        register("client-token-0123456789").await.unwrap().status(),
        403,
        "a client cannot publish"
    );
    let answer = register("publisher-token-0123456789").await.unwrap();
    assert_eq!(answer.status(), 200);
    let metrics = http
        .get(format!("{url}/metrics"))
        .bearer_auth("client-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 403, "metrics are for admins");
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "health needs no token");
    assert_eq!(health.text().await.unwrap(), "ok");
    let taken = http
        .post(format!("{url}/api/v1/llms/_provider-register"))
        .bearer_auth("publisher-token-0123456789")
        .json(&json!({"llms": [{"name": "gpt-public", "type": "openai", "model": "m"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        taken.status(),
        409,
        "a publisher cannot take a public llm's name"
    );
    // The public upstream (port 9, discard) is unreachable: a clean 502, not a hang.
    let chat = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("client-token-0123456789")
        .json(&json!({"model": "gpt-public", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 502);

    // `/mcp` takes the same tokens: 401 without one, before the MCP SDK sees the
    // request; with one, an MCP session opens.
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "1"}}});
    let mcp = |token: Option<&'static str>| {
        let mut request = http
            .post(format!("{url}/mcp"))
            .header("accept", "application/json, text/event-stream")
            .json(&initialize);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    for token in [None, Some("wrong-token-0123456789")] {
        let refused = mcp(token).await.unwrap();
        assert_eq!(refused.status(), 401, "{token:?}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthenticated");
    }
    let opened = mcp(Some("client-token-0123456789")).await.unwrap();
    assert_eq!(opened.status(), 200);
    assert!(opened.headers().contains_key("mcp-session-id"));
    assert!(
        opened.text().await.unwrap().contains("\"tools\""),
        "the server offers tools"
    );
    drop(gateway);
}

/// A token's `pools` grant, from the config file: alice's first row makes the pool
/// hers; bob, granted it, joins with a row of his own; mallory, not granted, is 409
/// `poolOwnedByAnother` and writes nothing. The pool flags reach the configuration
/// (a zero `--cooldown` is refused, naming the flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_pools_grant_lets_it_join_another_principals_pool() {
    let dir = temp_dir();
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        r#"
[[tokens]]
token = "alice-token-0123456789"
principal = "alice"
roles = ["publisher"]

[[tokens]]
token = "bob-token-0123456789ab"
principal = "bob"
roles = ["publisher"]
pools = ["llama-8b"]

[[tokens]]
token = "mallory-token-0123456789"
principal = "mallory"
roles = ["publisher", "client"]
"#,
    )
    .unwrap();
    let refused = Command::new(gateway_binary())
        .args(["--data-dir", dir.0.join("x").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap(), "--cooldown", "0s"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--cooldown"), "{stderr}");

    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start_env(
        addr,
        &dir.0.join("data"),
        &["--config", config.to_str().unwrap(), "--queue-depth", "8"],
        &[],
    );
    let http = reqwest::Client::new();
    let register = |token: &'static str, name: &'static str| {
        http.post(format!("{url}/api/v1/llms/_provider-register"))
            .bearer_auth(token)
            .json(
                &json!({"llms": [{"name": name, "pool": "llama-8b", "maxConcurrent": 4,
                                     "type": "openai", "model": "m"}]}),
            )
            .send()
    };
    let mut first = None;
    for _ in 0..500 {
        if let Ok(answer) = register("alice-token-0123456789", "alice-box").await {
            first = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        first.unwrap().status(),
        200,
        "alice's first row makes the pool"
    );
    let bob = register("bob-token-0123456789ab", "bob-box").await.unwrap();
    assert_eq!(bob.status(), 200, "bob was granted the pool");
    let mallory = register("mallory-token-0123456789", "mallory-box")
        .await
        .unwrap();
    assert_eq!(mallory.status(), 409);
    let body: Value = mallory.json().await.unwrap();
    assert_eq!(body["error"]["code"], "name_conflict");
    assert_eq!(
        body["error"]["conflicts"][0]["reason"],
        "poolOwnedByAnother"
    );
    let members: Value = http
        .get(format!("{url}/api/v1/llms/llama-8b/members"))
        .bearer_auth("mallory-token-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["alice-box", "bob-box"],
        "mallory's row was not written"
    );
}

/// A `[[wake]]` webhook from the config file: a request for a row whose publisher has
/// no channel fires it once (method, headers and body as written), waits, and is
/// served once the publisher's channel binds. A typo in a `[[wake]]` table is refused
/// at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_webhook_from_the_config_wakes_a_host_whose_publisher_then_connects() {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;

    // The webhook's receiver: records each request's head and body.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let (fired_tx, mut fired) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = hook.accept().await {
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.unwrap();
            fired_tx
                .send(String::from_utf8_lossy(&request[..n]).into_owned())
                .unwrap();
            socket
                .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        }
    });
    let dir = temp_dir();
    let config = dir.0.join("gateway.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                r#"
[[wake]]
pool = "far"
url = "http://{hook_addr}/wake/gpu-7"
method = "PUT"
headers = {{ x-wake-token = "s3cret" }}
body = {{ host = "gpu-7" }}
{extra}
"#
            ),
        )
        .unwrap();
    };
    write("typo = 1");
    let refused = Command::new(gateway_binary())
        .args(["--data-dir", dir.0.join("x").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a typo is refused");
    write("");
    let addr = free_addr();
    let url = format!("http://{addr}");
    let base = format!("{url}/api/v1/llms");
    let _gateway = GatewayProcess::start_env(
        addr,
        &dir.0.join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let http = reqwest::Client::new();
    let register = json!({"protocolVersion": 2,
        "llms": [{"name": "far", "type": "openai", "model": "m", "state": "ready"}]});
    let mut answer = None;
    for _ in 0..500 {
        if let Ok(a) = http
            .post(format!("{base}/_provider-register"))
            .json(&register)
            .send()
            .await
        {
            answer = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let answer: Value = answer.unwrap().json().await.unwrap();
    let session = answer["providerSessionId"].as_str().unwrap().to_owned();
    // No channel: the host sleeps. A client's request fires the webhook and waits.
    let request = {
        let http = http.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let response = http
                .post(format!("{url}/v1/chat/completions"))
                .json(&json!({"model": "far", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    };
    let webhook = fired.recv().await.unwrap();
    assert!(webhook.starts_with("PUT /wake/gpu-7 "), "{webhook}");
    assert!(
        webhook
            .to_ascii_lowercase()
            .contains("x-wake-token: s3cret"),
        "{webhook}"
    );
    assert!(webhook.ends_with(r#"{"host":"gpu-7"}"#), "{webhook}");
    // The host woke: its publisher opens its channel and answers the waiting task.
    let stream = http
        .get(format!("{base}/_provider-stream"))
        .header("x-provider-session", &session)
        .header("x-provider-protocol", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut events = stream.bytes_stream().eventsource();
    let task = loop {
        let event = events.next().await.unwrap().unwrap();
        if event.event == "task" {
            break serde_json::from_str::<Value>(&event.data).unwrap();
        }
    };
    let task_id = task["taskId"].as_str().unwrap();
    let posted = http
        .post(format!("{base}/_provider-task/{task_id}/result"))
        .header("x-provider-session", &session)
        .json(&json!({"status": 200, "body": {"choices": [{"message": {"content": "awake"}}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 204);
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("awake"), "{body}");
    assert!(fired.try_recv().is_err(), "the webhook fired once");
}

/// Runs the gateway to its failure with `args`; its stderr.
fn failed_start(args: &[&str]) -> String {
    let dir = temp_dir();
    let output = Command::new(gateway_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.0.to_str().unwrap(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "it must not start: {args:?}");
    String::from_utf8(output.stderr).unwrap()
}

#[test]
fn startup_errors_are_one_readable_line_without_colour() {
    let dir = temp_dir();
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        "[gateway]\nstaleAfter = \"90s\"\nnot toml at all\n",
    )
    .unwrap();
    let unknown = dir.0.join("unknown.toml");
    std::fs::write(&unknown, "[[tokens]]\ntoken = \"0123456789abcdef\"\nprincipal = \"p\"\nroles = [\"client\"]\ncolour = 1\n").unwrap();
    for (args, needle) in [
        (
            vec!["--config", config.to_str().unwrap()],
            "gateway.toml: line 3, column 5: ",
        ),
        (
            vec!["--config", unknown.to_str().unwrap()],
            "unknown field `colour`",
        ),
        (
            vec!["--cors-origin", "chat.example.com"],
            "CORS origin \"chat.example.com\" is not an origin",
        ),
        (
            vec!["--stale-after", "1s", "--heartbeat-every", "30s"],
            "--stale-after",
        ),
    ] {
        let stderr = failed_start(&args);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{needle}: {stderr}"
        );
        for debug in ["{ ", " }", "Error {", "\u{1b}["] {
            assert!(
                !stderr.contains(debug),
                "no Debug struct, no colour: {stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_have_no_colour_and_the_probes_answer() {
    let dir = temp_dir();
    let addr = free_addr();
    let mut child = Command::new(gateway_binary())
        .args([
            "--listen",
            &addr.to_string(),
            "--data-dir",
            dir.0.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        lines.find_map(|l| l.ok().filter(|l| l.contains("gateway ready")))
    });
    let line = ready.await.unwrap().expect("the gateway says it is ready");
    assert!(
        !line.contains('\u{1b}'),
        "no ANSI colour in a pipe: {line:?}"
    );
    let http = reqwest::Client::new();
    for probe in ["healthz", "readyz"] {
        let answer = http
            .get(format!("http://{addr}/{probe}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{probe}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// F3 of the red team's report: without tokens every caller is an admin, and a web
/// page in the local user's browser is a caller on loopback too. The gateway answers
/// programs of this machine (no `Origin`, a loopback `Host`, a JSON body) and its own
/// origin, and refuses a foreign `Host` (DNS rebinding), a foreign `Origin` (the
/// publisher WebSocket included, which CORS does not cover) and a body a page can send
/// without a preflight; a refusal writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_web_pages_and_foreign_hosts_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let dir = temp_dir();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let _gateway = GatewayProcess::start(addr, &dir.0);
    binary::ready(&url).await;
    let http = reqwest::Client::new();
    let register = format!("{url}/api/v1/llms/_provider-register");
    let body = json!({"llms": [{"name": "local-llama", "type": "openai", "model": "m"}]});

    // What a page can send without a preflight: text/plain, a form, no content type.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = http.post(&register).body(body.to_string());
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 415, "{content_type:?}");
        let error: Value = refused.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unsupported_media_type");
    }
    let chat = http
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body(r#"{"model":"local-llama","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 415);

    // A rebound host name, and a page of another origin.
    let foreign_host = http
        .get(format!("{url}/api/v1/llms"))
        .header("host", format!("attacker.example:{}", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_host.status(), 403);
    let error: Value = foreign_host.json().await.unwrap();
    assert_eq!(error["error"]["code"], "not_local");
    let foreign_origin = http
        .post(&register)
        .header("origin", "https://attacker.example")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_origin.status(), 403);

    // The publisher WebSocket from a page: refused before the upgrade.
    let mut upgrade = format!("ws://{addr}/api/v1/llms/_provider-ws")
        .into_client_request()
        .unwrap();
    upgrade
        .headers_mut()
        .insert("origin", "https://attacker.example".parse().unwrap());
    match tokio_tungstenite::connect_async(upgrade).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a page's WebSocket must be refused, got {other:?}"),
    }
    let listed: Value = http
        .get(format!("{url}/api/v1/llms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!([]), "no refusal wrote anything");

    // Programs, and the gateway's own page (its own origin), are answered.
    let own = http
        .post(&register)
        .header("origin", url.clone())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    for host in [format!("localhost:{}", addr.port()), addr.to_string()] {
        let answer = http
            .get(format!("{url}/api/v1/llms/local-llama"))
            .header("host", host.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{host}");
    }
    let upgrade = format!("ws://{addr}/api/v1/llms/_provider-ws")
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(upgrade).await {
        // A program gets past the guard: the route itself asks for a session.
        Ok(_) => {}
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_ne!(response.status(), 403, "a program is not refused as a page")
        }
        Err(e) => panic!("{e}"),
    }
}

/// F8 of the red team's report: a publisher that took the name of a public LLM the
/// operator adds later no longer stops the gateway from starting: it starts, says
/// which public LLM it could not publish and how to take the name back, and an admin
/// removes the row with `llmctl delete llm NAME` (another principal cannot); at the
/// next start the public LLM is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_public_name_is_reported_and_taken_back_with_llmctl() {
    let dir = temp_dir();
    let tokens = r#"
[[tokens]]
token = "mallory-token-0123456789"
principal = "mallory"
roles = ["publisher", "client"]

[[tokens]]
token = "admin-token-0123456789"
principal = "ops"
roles = ["admin"]
"#;
    let config = dir.0.join("gateway.toml");
    std::fs::write(&config, tokens).unwrap();
    let data = dir.0.join("data");
    let addr = free_addr();
    let url = format!("http://{addr}");
    let http = reqwest::Client::new();

    // mallory takes the name while the operator has not made it public yet.
    let gateway =
        GatewayProcess::start_env(addr, &data, &["--config", config.to_str().unwrap()], &[]);
    binary::ready_with_tokens(&url).await;
    let taken = http
        .post(format!("{url}/api/v1/llms/_provider-register"))
        .bearer_auth("mallory-token-0123456789")
        .json(&json!({"llms": [{"name": "gpt-4o-mini", "type": "openai", "model": "m"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), 200);
    gateway.sigterm();

    // The operator adds the public LLM: the gateway starts anyway and says so.
    std::fs::write(
        &config,
        format!("{tokens}\n[[public]]\nname = \"gpt-4o-mini\"\nurl = \"http://127.0.0.1:9/v1\"\nmodel = \"gpt-4o-mini\"\n"),
    )
    .unwrap();
    let log = dir.0.join("gateway.log");
    let child = Command::new(gateway_binary())
        .args(["--listen", &addr.to_string(), "--data-dir"])
        .arg(&data)
        .args(["--grace", "2s", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let gateway = GatewayProcess(child);
    binary::ready_with_tokens(&url).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("public llm not published")
            && logged.contains("llmctl delete llm gpt-4o-mini"),
        "{logged}"
    );
    let row = |token: &'static str| {
        http.get(format!("{url}/api/v1/llms/gpt-4o-mini"))
            .bearer_auth(token)
            .send()
    };
    let before: Value = row("admin-token-0123456789")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(before["kind"], "virtual", "still mallory's");

    let llmctl = |token: &str| {
        Command::new(binary::llmctl_binary())
            .args([
                "--gateway",
                &url,
                "--token",
                token,
                "delete",
                "llm",
                "gpt-4o-mini",
            ])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let refused = llmctl("mallory-token-0123456789");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    let after: Value = row("admin-token-0123456789")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after, before, "a refused delete changes nothing");

    let deleted = llmctl("admin-token-0123456789");
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&deleted.stdout).trim(),
        "deleted gpt-4o-mini (virtual, inactive)"
    );
    assert_eq!(row("admin-token-0123456789").await.unwrap().status(), 404);
    gateway.sigterm();

    // The next start publishes the public LLM.
    let gateway =
        GatewayProcess::start_env(addr, &data, &["--config", config.to_str().unwrap()], &[]);
    binary::ready_with_tokens(&url).await;
    let public: Value = row("admin-token-0123456789")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(public["kind"], "public");
    gateway.sigterm();
}

/// The server's limits come from the `[server]` table (and flags of the same names):
/// a body read timeout not above the task deadline is refused at start, naming the
/// setting and its flag; a short one, set in the file, cuts off a body that stops
/// coming (400 naming the body read timeout), so the table reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_limits_come_from_the_server_table() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = temp_dir();
    let config = dir.0.join("gateway.toml");
    std::fs::write(&config, "[server]\nbodyReadTimeout = \"1m\"\n").unwrap();
    let refused = Command::new(gateway_binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.0.join("data"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("bodyReadTimeout"), "{stderr}");
    assert!(stderr.contains("--body-read-timeout"), "{stderr}");
    assert!(stderr.contains("taskDeadline"), "{stderr}");

    std::fs::write(
        &config,
        "[gateway]\ntaskDeadline = \"200ms\"\nstreamIdleTimeout = \"200ms\"\n\n\
         [server]\nbodyReadTimeout = \"500ms\"\nwriteTimeout = \"5s\"\nmaxConnections = 64\n\
         http2IdleTimeout = \"10s\"\nlinger = \"1s\"\n",
    )
    .unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let data = dir.0.join("data");
    let gateway =
        GatewayProcess::start_env(addr, &data, &["--config", config.to_str().unwrap()], &[]);
    binary::ready(&url).await;
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            b"POST /api/v1/llms/_provider-register HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"llms\":",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stalled.read_to_end(&mut answer),
    )
    .await
    .expect("the stalled body is cut off")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("body read timeout"), "{answer}");
    gateway.sigterm();
}
