//! The agent conformance suite: virtual agents (SPEC §13) end to end over a transport.
//! A publisher publishes an LLM and an agent over it; clients call the agent on
//! `/v1/chat/completions` and `{base}/{name}/infer`, and a [`Recording`] provider
//! shows what reached the model: the agent's system prompt first, its default
//! parameters under the client's own. The views, an atomic conflict, and the
//! lifecycle with a killed publisher follow.
//!
//! Each case is a `pub async fn` taking the transport and an optional replica plane;
//! [`agent_conformance_tests!`](crate::agent_conformance_tests) stamps out one
//! `#[tokio::test]` per case.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::gateway::TestGateway;
use super::plane::Plane;
use super::providers::Recording;
use super::support::{TempDir, eventually};
use super::transport::Transport;
use crate::protocol::AgentSpec;
use crate::{EchoProvider, LlmName, PublisherOptions};

/// The agent `helper` over the LLM `llama`: a system prompt, a description and two
/// default parameters.
pub fn helper() -> AgentSpec {
    AgentSpec {
        description: Some("Answers like a helper".into()),
        system_prompt: Some("You are a helper.".into()),
        default_params: json!({"temperature": 0.2, "max_tokens": 64})
            .as_object()
            .cloned(),
        ..AgentSpec::new(
            LlmName::parse("helper").unwrap(),
            LlmName::parse("llama").unwrap(),
        )
    }
}

fn with_helper() -> PublisherOptions {
    PublisherOptions {
        agents: vec![helper()],
        ..PublisherOptions::default()
    }
}

/// The messages of a recorded body.
fn messages(body: &Value) -> Vec<Value> {
    body["messages"].as_array().cloned().unwrap_or_default()
}

/// A request for an agent reaches its model, on both client routes and streamed or
/// not, with the agent's system prompt first (before the client's own system
/// message), its default parameters where the client gave none, and `model` naming
/// the agent's LLM; the answer is the model's.
pub async fn an_agent_answers_with_its_persona(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let upstream = Arc::new(Recording::new());
    let p = gw
        .publish_with(t, "alice", &["llama"], upstream.clone(), with_helper())
        .await;
    let response = gw
        .post_chat(
            "client",
            json!({
                "model": "helper",
                "temperature": 0.9,
                "messages": [
                    {"role": "system", "content": "Answer in French."},
                    {"role": "user", "content": "bonjour tout le monde"},
                ],
            }),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "bonjour tout le monde"
    );
    let sent = upstream.bodies().remove(0);
    assert_eq!(
        messages(&sent),
        [
            json!({"role": "system", "content": "You are a helper."}),
            json!({"role": "system", "content": "Answer in French."}),
            json!({"role": "user", "content": "bonjour tout le monde"}),
        ],
        "the agent's system prompt first, then the client's messages as sent"
    );
    assert_eq!(sent["temperature"], 0.9, "the client's own value wins");
    assert_eq!(
        sent["max_tokens"], 64,
        "a default fills what the client left out"
    );
    assert_eq!(sent["model"], "llama");

    // Streamed: the same persona, both defaults this time.
    let text = gw
        .chat_stream("client", "helper", "one two three")
        .await
        .text()
        .await;
    assert_eq!(text, "one two three");
    let sent = upstream.bodies().remove(1);
    assert_eq!(messages(&sent)[0]["content"], "You are a helper.");
    assert_eq!(messages(&sent)[1]["content"], "one two three");
    assert_eq!(
        (sent["temperature"].clone(), sent["max_tokens"].clone()),
        (json!(0.2), json!(64))
    );
    assert_eq!(sent["stream"], true);

    // `{base}/{name}/infer`, the registry's own route.
    let base = gw.gateway.config().base_path.clone();
    let (status, body) = gw
        .post_any(
            "client",
            &format!("{base}/helper/infer"),
            &json!({"messages": [{"role": "user", "content": "via infer"}], "max_tokens": 5}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "via infer");
    let sent = upstream.bodies().remove(2);
    assert_eq!(messages(&sent)[0]["content"], "You are a helper.");
    assert_eq!(sent["max_tokens"], 5, "the client's own value wins");
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(upstream.bodies().len(), 3, "one task per request");
    p.stop().await;
}

/// `GET /api/v1/agents` and `GET /api/v1/agents/{name}` show `name, llm,
/// description, status` (never the system prompt); `/v1/models` lists the active
/// agent; the registry of LLMs does not; an unknown agent is 404 and a missing
/// token 401.
pub async fn agents_are_listed_and_are_models(t: &dyn Transport, plane: Option<&dyn Plane>) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish_with(
            t,
            "alice",
            &["llama"],
            Arc::new(EchoProvider::new()),
            with_helper(),
        )
        .await;
    let want = json!({
        "name": "helper",
        "llm": "llama",
        "description": "Answers like a helper",
        "status": "active",
    });
    let (status, list) = gw.get_any(Some("client"), "/api/v1/agents").await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([want]));
    let (status, one) = gw.get_any(Some("client"), "/api/v1/agents/helper").await;
    assert_eq!((status, one), (200, want));
    let (status, body) = gw.get_any(Some("client"), "/api/v1/agents/nobody").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    let (status, _) = gw.get_any(Some("client"), "/api/v1/agents/llama").await;
    assert_eq!(status, 404, "an llm is no agent");
    let (status, _) = gw.get_any(None, "/api/v1/agents").await;
    assert_eq!(status, 401);
    let (status, _) = gw.get_any(None, "/api/v1/agents/helper").await;
    assert_eq!(status, 401);

    let models = gw.get_json("client", "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["helper", "llama"]);
    let rows = gw.list().await;
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama"], "an agent is no llm");
    assert_eq!(gw.get_status("client", "helper").await, 404);
    p.stop().await;
}

/// A register whose agent takes a name another principal holds is refused whole
/// (409 naming the agent) and writes nothing, its LLMs included; an agent over an LLM
/// the register does not publish is a 400 that writes nothing either.
pub async fn a_taken_agent_name_refuses_the_whole_register(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let p = gw
        .publish(t, "mallory", &["helper"], Arc::new(EchoProvider::new()))
        .await;
    let register = |llm: &str, agent_llm: &str| {
        json!({
            "protocolVersion": 2,
            "llms": [{"name": llm, "type": "openai", "model": "m"}],
            "agents": [{"name": "helper", "llm": agent_llm, "systemPrompt": "x"}],
        })
        .to_string()
    };
    let status = gw
        .post_raw("alice", "_provider-register", &register("alpha", "alpha"))
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        gw.get_status("client", "alpha").await,
        404,
        "nothing written"
    );
    let status = gw
        .post_raw(
            "alice",
            "_provider-register",
            &register("beta", "elsewhere"),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        gw.get_status("client", "beta").await,
        404,
        "nothing written"
    );
    let (status, agents) = gw.get_any(Some("client"), "/api/v1/agents").await;
    assert_eq!((status, agents), (200, json!([])));
    assert_eq!(
        gw.row_status("helper").await,
        "active",
        "bob's llm untouched"
    );
    p.stop().await;
}

/// A killed publisher (its sockets cut without a goodbye) takes its agent out of
/// service with its LLM: the agent reads `inactive`, leaves `/v1/models`, and a
/// request for it is a 503 at once. When the publisher reconnects with its session,
/// the same agent serves again.
pub async fn an_agent_goes_and_comes_back_with_its_publisher(
    t: &dyn Transport,
    plane: Option<&dyn Plane>,
) {
    let gw = TestGateway::start_on(t, plane, Default::default()).await;
    let proxy = gw.proxy().await;
    let dir = TempDir::new();
    let options = PublisherOptions {
        session_file: Some(dir.path().join("session")),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        ..with_helper()
    };
    let p = gw
        .publish_at(
            &proxy.url,
            t,
            "alice",
            &["llama"],
            Arc::new(EchoProvider::new()),
            options,
        )
        .await;
    let agent_status = || async {
        let (_, agent) = gw.get_any(Some("client"), "/api/v1/agents/helper").await;
        agent["status"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(agent_status().await, "active");
    let (status, _) = gw.chat("client", "helper", "before", false).await;
    assert_eq!(status, 200);

    proxy.kill();
    eventually("the agent goes inactive", || async {
        agent_status().await == "inactive"
    })
    .await;
    let (status, body) = gw.chat("client", "helper", "while gone", false).await;
    assert_eq!(status, 503, "{body}");
    let models = gw.get_json("client", "/v1/models").await;
    assert_eq!(
        models["data"],
        json!([]),
        "no active model, no active agent"
    );

    proxy.revive();
    eventually("the agent reads active again", || async {
        agent_status().await == "active"
    })
    .await;
    // The publisher registers again before its channel binds: in between, its rows
    // are active without a channel (a 503 `llm_unavailable`, as for any LLM), so the
    // agent serves once the channel is back.
    eventually("the agent serves again", || async {
        let (status, body) = gw.chat("client", "helper", "after", false).await;
        status == 200 && body["choices"][0]["message"]["content"] == "after"
    })
    .await;
    p.stop().await;
}

/// Stamps out one `#[tokio::test]` per case of the agent conformance suite for a
/// transport value (and, optionally, a replica plane: publishers on one replica,
/// clients on the other).
///
/// ```no_run
/// mod agents {
///     virtual_llm::agent_conformance_tests!(virtual_llm::testkit::SseTransport);
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! agent_conformance_tests {
    ($transport:expr) => {
        $crate::__agent_suite_cases!($transport, ::core::option::Option::None);
    };
    ($transport:expr, $plane:expr) => {
        $crate::__agent_suite_cases!(
            $transport,
            ::core::option::Option::Some(&$plane as &dyn $crate::testkit::Plane)
        );
    };
}

/// The cases, for the macro above.
#[doc(hidden)]
#[macro_export]
macro_rules! __agent_suite_cases {
    ($transport:expr, $plane:expr) => {
        $crate::__agent_suite_cases!(@cases $transport, $plane;
            an_agent_answers_with_its_persona,
            agents_are_listed_and_are_models,
            a_taken_agent_name_refuses_the_whole_register,
            an_agent_goes_and_comes_back_with_its_publisher,
        );
    };
    (@cases $transport:expr, $plane:expr; $($case:ident,)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testkit::agent_suite::$case(&$transport, $plane).await;
            }
        )*
    };
}
