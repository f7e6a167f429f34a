//! The agents as MCP tools, with the official Rust MCP SDK's client (`rmcp`) against a
//! gateway serving `/mcp` on `127.0.0.1:0` and an echo publisher publishing an agent:
//! the tool and its schema, a call answered through the agent's persona, the tool list
//! following the registry both ways (the client is told each time), a call to an
//! agent whose publisher is gone, the gateway's tokens on `/mcp`, and an agent's
//! `access` (SPEC §16: a tool a caller may not call is neither listed nor callable). (The official
//! Python SDK runs against the reference binaries in `tests/sdk/check_mcp.py`.)

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::json;
use tokio::sync::{Notify, watch};
use virtual_llm::protocol::AgentSpec;
use virtual_llm::sse::SseWire;
use virtual_llm::testkit::{Recording, TempDir};
use virtual_llm::{
    Gateway, LlmName, MemoryStore, PublishedLlm, Publisher, PublisherOptions, Role, StaticTokens,
};

const CLIENT: &str = "client-token-0123456789";
const PUBLISHER: &str = "publisher-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

/// A gateway serving the SSE channel and `/mcp`, stopped when dropped.
struct Setup {
    url: String,
    stop: watch::Sender<bool>,
    shutdown: virtual_llm::http::mcp::CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.stop.send_replace(true);
    }
}

async fn gateway() -> Setup {
    let auth = StaticTokens::new()
        .with(
            PUBLISHER,
            virtual_llm::Principal::new("alice", [Role::Publisher]),
        )
        .with(CLIENT, virtual_llm::Principal::new("app", [Role::Client]))
        .with(ADMIN, virtual_llm::Principal::new("root", [Role::Admin]));
    let gateway = Gateway::builder(Arc::new(MemoryStore::new()))
        .authenticator(Arc::new(auth))
        .start()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = virtual_llm::http::mcp::CancellationToken::new();
    let routes = virtual_llm::http::routes_with(
        gateway.clone(),
        [virtual_llm::sse::route(gateway.clone())],
        virtual_llm::http::mcp::routes(gateway.clone(), shutdown.clone()),
    );
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(virtual_llm::http::serve(
        listener,
        routes,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
            gateway.close_channels("test over");
        },
        Duration::from_secs(1),
    ));
    Setup {
        url,
        stop,
        shutdown,
    }
}

/// Publishes the echo LLM `demo` and the agent `poet` over it, answered by `upstream`.
async fn publish(url: &str, upstream: Arc<Recording>, session: &TempDir) -> Publisher {
    let poet = AgentSpec {
        description: Some("Answers in verse".into()),
        system_prompt: Some("You answer in verse.".into()),
        default_params: json!({"max_tokens": 12}).as_object().cloned(),
        ..AgentSpec::new(
            LlmName::parse("poet").unwrap(),
            LlmName::parse("demo").unwrap(),
        )
    };
    let spec = virtual_llm::protocol::LlmSpec::new(LlmName::parse("demo").unwrap(), "echo", "m");
    let publisher = Publisher::spawn(
        Arc::new(SseWire::new(url, Some(PUBLISHER.to_owned())).unwrap()),
        vec![PublishedLlm::new(spec, upstream)],
        PublisherOptions {
            agents: vec![poet],
            session_file: Some(session.path().join("session")),
            ..PublisherOptions::default()
        },
    );
    tokio::time::timeout(Duration::from_secs(10), publisher.connected())
        .await
        .expect("the publisher connects");
    publisher
}

/// An MCP client that counts the tool list changes it is told of.
#[derive(Clone, Default)]
struct Watcher {
    changed: Arc<Notify>,
}

impl ClientHandler for Watcher {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.changed.notify_one();
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::default()
    }
}

async fn connect(
    url: &str,
    token: Option<&str>,
) -> Result<RunningService<RoleClient, Watcher>, String> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(format!("{url}/mcp"));
    if let Some(token) = token {
        config = config.auth_header(token);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    Watcher::default()
        .serve(transport)
        .await
        .map_err(|e| e.to_string())
}

async fn tool_names(client: &RunningService<RoleClient, Watcher>) -> Vec<String> {
    let mut names: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    names
}

fn ask(tool: &str, message: &str) -> CallToolRequestParams {
    CallToolRequestParams::new(tool.to_owned())
        .with_arguments(json!({"message": message}).as_object().cloned().unwrap())
}

fn text(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect()
}

async fn told(watcher: &Watcher) {
    tokio::time::timeout(Duration::from_secs(10), watcher.changed.notified())
        .await
        .expect("the client is told the tool list changed");
}

/// The agent is a tool with its description and `{message}` schema; a call goes through
/// the agent's persona to its model and answers the model's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_a_tool_that_answers_through_its_persona() {
    let setup = gateway().await;
    let upstream = Arc::new(Recording::new());
    let dir = TempDir::new();
    let publisher = publish(&setup.url, upstream.clone(), &dir).await;
    let client = connect(&setup.url, Some(CLIENT)).await.unwrap();
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 1);
    let tool = &tools[0];
    assert_eq!(tool.name, "agent-poet");
    assert_eq!(tool.description.as_deref(), Some("Answers in verse"));
    assert_eq!(tool.input_schema["required"], json!(["message"]));
    assert_eq!(tool.input_schema["properties"]["message"]["type"], "string");

    let result = client
        .call_tool(ask("agent-poet", "the sea"))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(false), "{result:?}");
    assert_eq!(text(&result), "the sea");
    let sent = upstream.bodies().remove(0);
    assert_eq!(sent["messages"][0]["content"], "You answer in verse.");
    assert_eq!(
        sent["messages"][1],
        json!({"role": "user", "content": "the sea"})
    );
    assert_eq!(sent["max_tokens"], 12);
    assert_eq!(sent["stream"], json!(null), "one whole answer");

    // Bad calls are protocol errors: an unknown tool, a missing message.
    assert!(client.call_tool(ask("agent-nobody", "x")).await.is_err());
    assert!(
        client.call_tool(ask("demo", "x")).await.is_err(),
        "an llm is no tool"
    );
    let no_message = CallToolRequestParams::new("agent-poet")
        .with_arguments(json!({"text": "x"}).as_object().cloned().unwrap());
    assert!(client.call_tool(no_message).await.is_err());
    assert_eq!(upstream.bodies().len(), 1, "nothing more reached the model");
    client.cancel().await.unwrap();
    publisher.stop().await;
}

/// Tools disappear and appear with their agents, and a client is told each time; a
/// call to an agent whose publisher is gone is a tool error saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tool_list_follows_the_registry() {
    let setup = gateway().await;
    let dir = TempDir::new();
    let client = connect(&setup.url, Some(CLIENT)).await.unwrap();
    let watcher = client.service().clone();
    assert!(tool_names(&client).await.is_empty(), "no agent yet");

    let publisher = publish(&setup.url, Arc::new(Recording::new()), &dir).await;
    told(&watcher).await;
    assert_eq!(tool_names(&client).await, ["agent-poet"]);

    publisher.stop().await;
    told(&watcher).await;
    assert!(
        tool_names(&client).await.is_empty(),
        "gone with its publisher"
    );
    let result = client
        .call_tool(ask("agent-poet", "anyone?"))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(true), "{result:?}");
    assert!(
        text(&result).contains("agent poet is inactive"),
        "{result:?}"
    );

    // The publisher comes back with its session: the same tool again.
    let again = publish(&setup.url, Arc::new(Recording::new()), &dir).await;
    told(&watcher).await;
    assert_eq!(tool_names(&client).await, ["agent-poet"]);
    let result = client.call_tool(ask("agent-poet", "back")).await.unwrap();
    assert_eq!(text(&result), "back");
    client.cancel().await.unwrap();
    again.stop().await;
}

/// `/mcp` takes the gateway's tokens: without one, or with a wrong one, no session
/// opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_takes_the_gateways_tokens() {
    let setup = gateway().await;
    for token in [None, Some("wrong-token-0123456789")] {
        let refused = connect(&setup.url, token).await;
        assert!(refused.is_err(), "{token:?}");
    }
    let client = connect(&setup.url, Some(CLIENT)).await.unwrap();
    assert!(tool_names(&client).await.is_empty());
    client.cancel().await.unwrap();
}

/// An agent published with `access: "owner"` is no tool for another principal: not
/// listed, and a call is refused as for a tool that does not exist; an admin sees and
/// calls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_a_caller_may_not_call_is_neither_listed_nor_callable() {
    let setup = gateway().await;
    let upstream = Arc::new(Recording::new());
    let mut private = AgentSpec::new(
        LlmName::parse("private-poet").unwrap(),
        LlmName::parse("demo").unwrap(),
    );
    private.access = virtual_llm::access::Access::Owner;
    let open = AgentSpec::new(
        LlmName::parse("poet").unwrap(),
        LlmName::parse("demo").unwrap(),
    );
    let spec = virtual_llm::protocol::LlmSpec::new(LlmName::parse("demo").unwrap(), "echo", "m");
    let publisher = Publisher::spawn(
        Arc::new(SseWire::new(&setup.url, Some(PUBLISHER.to_owned())).unwrap()),
        vec![PublishedLlm::new(spec, upstream.clone())],
        PublisherOptions {
            agents: vec![open, private],
            ..PublisherOptions::default()
        },
    );
    tokio::time::timeout(Duration::from_secs(10), publisher.connected())
        .await
        .expect("the publisher connects");

    let app = connect(&setup.url, Some(CLIENT)).await.unwrap();
    assert_eq!(tool_names(&app).await, ["agent-poet"]);
    let hidden = app.call_tool(ask("agent-private-poet", "x")).await;
    let unknown = app.call_tool(ask("agent-nobody", "x")).await;
    assert_eq!(
        hidden
            .unwrap_err()
            .to_string()
            .replace("private-poet", "nobody"),
        unknown.unwrap_err().to_string(),
        "refused as a tool that does not exist"
    );
    assert!(upstream.bodies().is_empty(), "nothing reached the model");

    let root = connect(&setup.url, Some(ADMIN)).await.unwrap();
    assert_eq!(
        tool_names(&root).await,
        ["agent-poet", "agent-private-poet"]
    );
    let result = root
        .call_tool(ask("agent-private-poet", "the sea"))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(false), "{result:?}");
    assert_eq!(text(&result), "the sea");
    app.cancel().await.unwrap();
    root.cancel().await.unwrap();
    publisher.stop().await;
}
