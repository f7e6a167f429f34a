//! Virtual agents (SPEC §13) through a gateway over the memory store, with
//! `FakeChannel` publishers: the register rules (agents beside LLMs in one atomic
//! batch, the names namespace, hostile input), the lifecycle (inactive with the
//! session, revived by a sticky reconnect, reaped with it; not active while the model
//! is not), the views, and what a request for an agent puts on its model's task.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use virtual_llm_core::agent::{AgentSpec, MAX_AGENTS_PER_REGISTER, MAX_SYSTEM_PROMPT_BYTES};
use virtual_llm_core::protocol::{
    ConflictReason, LlmSpec, LlmState, RegisterRequest, TaskResult, UpstreamState,
};
use virtual_llm_core::{Error, InferRequest, LlmName, LlmStatus, Principal, Reply, SessionId};

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

fn agent(name_: &str, llm: &str) -> AgentSpec {
    AgentSpec {
        description: Some(format!("{name_}, over {llm}")),
        system_prompt: Some(format!("You are {name_}.")),
        default_params: json!({"temperature": 0.2, "max_tokens": 64})
            .as_object()
            .cloned(),
        ..AgentSpec::new(self::name(name_), self::name(llm))
    }
}

fn with_agents(
    session: Option<&SessionId>,
    llms: Vec<LlmSpec>,
    agents: Vec<AgentSpec>,
) -> RegisterRequest {
    RegisterRequest {
        provider_session_id: session.cloned(),
        protocol_version: Some(2),
        llms,
        agents,
        capabilities: Vec::new(),
    }
}

fn alice() -> Principal {
    publisher("alice")
}

fn chat(model: &str, body: Value) -> InferRequest {
    let mut body = body;
    body["model"] = json!(model);
    InferRequest::from_chat_body(body).unwrap()
}

fn user(text: &str) -> Value {
    json!({"messages": [{"role": "user", "content": text}]})
}

fn invalid(e: Error) -> String {
    match e {
        Error::InvalidRequest { message } => message,
        other => panic!("expected a 400, got {other:?}"),
    }
}

/// A register publishing LLM `llama` and agent `helper` over it, bound.
async fn published(
    f: &Fixture,
) -> (
    SessionId,
    virtual_llm_core::Binding,
    virtual_llm_core::testkit::FakeChannel,
) {
    let answer =
        f.gw.register(
            &alice(),
            with_agents(None, vec![spec("llama")], vec![agent("helper", "llama")]),
        )
        .await
        .unwrap();
    assert_eq!(answer.agents.len(), 1, "the answer names the agent");
    assert_eq!(answer.agents[0].name.as_str(), "helper");
    assert_eq!(
        answer
            .llms
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>(),
        ["llama"],
        "an agent is no llm"
    );
    let (binding, channel) = f.bind("alice", &answer.provider_session_id).await;
    (answer.provider_session_id, binding, channel)
}

#[tokio::test]
async fn an_agent_is_listed_as_an_agent_and_a_model_never_as_an_llm() {
    let f = fixture().await;
    let _online = published(&f).await;
    let agents = f.gw.agents(&client()).await.unwrap();
    assert_eq!(agents.len(), 1);
    let helper = &agents[0];
    assert_eq!(
        (helper.name.as_str(), helper.llm.as_str(), helper.status),
        ("helper", "llama", LlmStatus::Active)
    );
    assert_eq!(helper.description.as_deref(), Some("helper, over llama"));
    assert_eq!(f.gw.agent(&client(), "helper").await.unwrap(), *helper);
    assert!(matches!(
        f.gw.agent(&client(), "llama").await,
        Err(Error::UnknownLlm { .. })
    ));
    // Not an LLM: not listed, not got, not a pool.
    let llms = f.gw.list(&client()).await.unwrap();
    assert_eq!(
        llms.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["llama"]
    );
    assert!(matches!(
        f.gw.get(&client(), "helper").await,
        Err(Error::UnknownLlm { .. })
    ));
    assert!(matches!(
        f.gw.members(&client(), "helper").await,
        Err(Error::UnknownLlm { .. })
    ));
    let models: Vec<String> = (f.gw.active_models(&client()).await.unwrap())
        .into_iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(
        models,
        ["helper", "llama"],
        "/v1/models lists active agents"
    );
    // The row itself round-trips the persona.
    let row = f.row("helper").await;
    let persona = row.agent.unwrap();
    assert_eq!(persona.system_prompt.as_deref(), Some("You are helper."));
    assert_eq!(persona.default_params.unwrap()["max_tokens"], 64);
}

#[tokio::test]
async fn a_request_for_an_agent_reaches_its_model_as_the_agent_puts_it() {
    let f = fixture().await;
    let (session, _binding, channel) = published(&f).await;
    let body = json!({
        "temperature": 0.9,
        "top_p": null,
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "hello"},
        ],
    });
    let gw = f.gw.clone();
    let asked = tokio::spawn(async move { gw.infer(&client(), chat("helper", body)).await });
    let task = channel.next_task().await;
    assert_eq!(
        task.llm.as_str(),
        "llama",
        "the task goes to the agent's llm"
    );
    let body = task.body.to_value().unwrap();
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(
        messages[0],
        json!({"role": "system", "content": "You are helper."}),
        "the agent's system prompt comes first"
    );
    assert_eq!(messages[1]["content"], "Answer in French.");
    assert_eq!(messages[2]["content"], "hello");
    assert_eq!(messages.len(), 3);
    assert_eq!(body["temperature"], 0.9, "the client's own value wins");
    assert_eq!(
        body["max_tokens"], 64,
        "a default fills what the client left out"
    );
    assert_eq!(body["model"], "llama");
    f.gw.deliver(
        &alice(),
        &session,
        &task.task_id,
        TaskResult::Completed {
            status: 200,
            body: json!({"choices": [{"message": {"content": "bonjour"}}]}).into(),
            retry_after: None,
        },
    )
    .await
    .unwrap();
    let reply = asked.await.unwrap().unwrap();
    assert!(matches!(&reply, Reply::Complete(c) if c.status == 200));
    assert_eq!(text_of(reply).await, "bonjour");
}

#[tokio::test]
async fn an_agent_over_a_pool_key_is_served_by_the_pool() {
    let f = fixture().await;
    let answer =
        f.gw.register(
            &alice(),
            with_agents(
                None,
                vec![pooled("m1", Some("llama"), None)],
                vec![agent("helper", "llama")],
            ),
        )
        .await
        .unwrap();
    let (_b, channel) = f.bind("alice", &answer.provider_session_id).await;
    assert_eq!(
        f.gw.agent(&client(), "helper").await.unwrap().status,
        LlmStatus::Active
    );
    let gw = f.gw.clone();
    let _asked = tokio::spawn(async move { gw.infer(&client(), chat("helper", user("hi"))).await });
    let task = channel.next_task().await;
    assert_eq!(task.llm.as_str(), "m1");
}

#[tokio::test]
async fn an_agents_name_taken_refuses_the_whole_register_and_writes_nothing() {
    let f = fixture().await;
    f.register("bob", None, &["helper"]).await;
    let err =
        f.gw.register(
            &alice(),
            with_agents(None, vec![spec("alpha")], vec![agent("helper", "alpha")]),
        )
        .await
        .unwrap_err();
    let Error::Conflict { conflicts } = err else {
        panic!("expected a 409, got {err:?}");
    };
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].name, "helper");
    assert_eq!(conflicts[0].reason, ConflictReason::OwnedByAnother);
    assert!(
        f.try_row("alpha").await.is_none(),
        "the llm was not written either"
    );
    assert_eq!(f.row("helper").await.owner, "bob", "bob's row is untouched");
    assert!(f.row("helper").await.agent.is_none());

    // An llm named like another principal's agent: the same.
    let err =
        f.gw.register(
            &publisher("carol"),
            with_agents(None, vec![spec("beta")], vec![agent("carols", "beta")]),
        )
        .await;
    assert!(err.is_ok());
    let err =
        f.gw.register(&publisher("dave"), request(None, &["gamma", "carols"]))
            .await
            .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref conflicts } if conflicts.iter().any(|c| c.name == "carols" && c.reason == ConflictReason::OwnedByAnother))
    );
    assert!(f.try_row("gamma").await.is_none());
}

#[tokio::test]
async fn agent_names_and_pool_keys_share_one_namespace() {
    let f = fixture().await;
    // A pool `shared` of bob's: an agent may not be named like it.
    f.register_specs(&publisher("bob"), vec![pooled("b1", Some("shared"), None)])
        .await
        .unwrap();
    let err =
        f.gw.register(
            &alice(),
            with_agents(None, vec![spec("alpha")], vec![agent("shared", "alpha")]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref conflicts } if conflicts[0].name == "shared" && conflicts[0].reason == ConflictReason::PoolNameTaken),
        "{err:?}"
    );
    assert!(f.try_row("alpha").await.is_none());
    // Alice's agent `persona`: a pool may not be keyed by its name.
    f.gw.register(
        &alice(),
        with_agents(None, vec![spec("alpha")], vec![agent("persona", "alpha")]),
    )
    .await
    .unwrap();
    let err = f
        .register_specs(&alice(), vec![pooled("a2", Some("persona"), None)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref conflicts } if conflicts[0].reason == ConflictReason::PoolNameTaken),
        "{err:?}"
    );
    assert!(f.try_row("a2").await.is_none());
    // A public llm may not take an agent's name.
    let err =
        f.gw.put_public(&admin(), spec("persona"))
            .await
            .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
}

#[tokio::test]
async fn hostile_agents_are_400_and_write_nothing() {
    let f = fixture().await;
    let cases: Vec<(Vec<AgentSpec>, &str)> = vec![
        (vec![agent("helper", "elsewhere")], "which is no llm"),
        (vec![agent("llama", "llama")], "named twice"),
        (
            vec![agent("helper", "llama"), agent("helper", "llama")],
            "named twice",
        ),
        (
            vec![AgentSpec {
                system_prompt: Some("x".repeat(MAX_SYSTEM_PROMPT_BYTES + 1)),
                ..agent("helper", "llama")
            }],
            "systemPrompt",
        ),
        (
            vec![AgentSpec {
                default_params: json!({"messages": []}).as_object().cloned(),
                ..agent("helper", "llama")
            }],
            "may not set messages",
        ),
        (
            vec![AgentSpec {
                default_params: json!({"stop": "y".repeat(20_000)}).as_object().cloned(),
                ..agent("helper", "llama")
            }],
            "defaultParams",
        ),
        (
            vec![AgentSpec {
                description: Some("d".repeat(5_000)),
                ..agent("helper", "llama")
            }],
            "description",
        ),
        (
            (0..=MAX_AGENTS_PER_REGISTER)
                .map(|i| agent(&format!("a{i}"), "llama"))
                .collect(),
            "at most",
        ),
    ];
    for (agents, says) in cases {
        let err =
            f.gw.register(&alice(), with_agents(None, vec![spec("llama")], agents))
                .await
                .unwrap_err();
        let message = invalid(err);
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    // An agent named like a pool of the same register.
    let err =
        f.gw.register(
            &alice(),
            with_agents(
                None,
                vec![pooled("m1", Some("p"), None)],
                vec![agent("p", "m1")],
            ),
        )
        .await
        .unwrap_err();
    invalid(err);
    // A bad name never parses.
    let raw: Result<RegisterRequest, _> = serde_json::from_value(json!({
        "llms": [{"name": "llama", "type": "openai", "model": "m"}],
        "agents": [{"name": "_bad", "llm": "llama"}],
    }));
    assert!(raw.is_err(), "an agent name follows the name rules");
    assert!(f.store_is_empty().await, "nothing was written");
}

impl Fixture {
    async fn store_is_empty(&self) -> bool {
        use virtual_llm_core::Store;
        self.store.list().await.unwrap().is_empty()
    }
}

#[tokio::test]
async fn an_agent_lives_and_dies_with_its_session() {
    let f = fixture().await;
    let (session, binding, _channel) = published(&f).await;
    // The channel closes: the agent is inactive and a request for it is a 503.
    binding.release().await.unwrap();
    assert_eq!(f.row("helper").await.status, LlmStatus::Inactive);
    assert_eq!(
        f.gw.agent(&client(), "helper").await.unwrap().status,
        LlmStatus::Inactive
    );
    let err =
        f.gw.infer(&client(), chat("helper", user("hi")))
            .await
            .unwrap_err();
    assert_eq!(err.status(), 503, "{err:?}");
    assert!(err.to_string().contains("helper"), "{err}");
    let models = f.gw.active_models(&client()).await.unwrap();
    assert!(models.is_empty(), "{models:?}");
    // A sticky reconnect (the same session) revives the same row.
    let id = f.row("helper").await.id;
    let again =
        f.gw.register(
            &alice(),
            with_agents(
                Some(&session),
                vec![spec("llama")],
                vec![agent("helper", "llama")],
            ),
        )
        .await
        .unwrap();
    assert_eq!(again.provider_session_id, session);
    let (binding, _channel) = f.bind("alice", &session).await;
    let row = f.row("helper").await;
    assert_eq!((row.status, row.id), (LlmStatus::Active, id));
    // A re-register without the agent: it goes inactive and is detached.
    f.gw.register(
        &alice(),
        with_agents(Some(&session), vec![spec("llama")], vec![]),
    )
    .await
    .unwrap();
    let row = f.row("helper").await;
    assert_eq!(row.status, LlmStatus::Inactive);
    assert_eq!(row.provider_session_id, None);
    f.gw.register(
        &alice(),
        with_agents(
            Some(&session),
            vec![spec("llama")],
            vec![agent("helper", "llama")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        f.row("helper").await.status,
        LlmStatus::Active,
        "adopted back"
    );
    // The channel goes for good: stale, then reaped with the llm.
    drop(binding);
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    assert_eq!(f.row("helper").await.status, LlmStatus::Inactive);
    f.clock.advance(Duration::from_secs(4 * 3600 + 1));
    let swept = f.gw.sweep().await.unwrap();
    assert_eq!(swept.deleted, 2, "the llm and its agent");
    assert!(f.try_row("helper").await.is_none());
    assert!(f.gw.agents(&client()).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_agent_whose_model_is_not_active_is_not_active() {
    let f = fixture().await;
    let (session, _binding, _channel) = published(&f).await;
    let report = |state| {
        vec![LlmState {
            name: name("llama"),
            state,
            wake_failed: None,
        }]
    };
    f.gw.heartbeat_with(&alice(), &session, &report(UpstreamState::Unavailable))
        .await
        .unwrap();
    assert_eq!(f.row("llama").await.status, LlmStatus::Inactive);
    assert_eq!(
        f.row("helper").await.status,
        LlmStatus::Active,
        "its session is live"
    );
    let view = f.gw.agent(&client(), "helper").await.unwrap();
    assert_eq!(view.status, LlmStatus::Inactive, "but its model is not");
    assert!(
        !(f.gw.active_models(&client()).await.unwrap())
            .iter()
            .any(|m| m.id.as_str() == "helper")
    );
    let err =
        f.gw.infer(&client(), chat("helper", user("hi")))
            .await
            .unwrap_err();
    assert_eq!(err.status(), 503, "{err:?}");
    f.gw.heartbeat_with(&alice(), &session, &report(UpstreamState::Asleep))
        .await
        .unwrap();
    assert_eq!(
        f.gw.agent(&client(), "helper").await.unwrap().status,
        LlmStatus::Hibernating
    );
    f.gw.heartbeat_with(&alice(), &session, &report(UpstreamState::Ready))
        .await
        .unwrap();
    assert_eq!(
        f.gw.agent(&client(), "helper").await.unwrap().status,
        LlmStatus::Active
    );
}

#[tokio::test]
async fn a_publisher_may_turn_its_llm_into_an_agent_and_back() {
    let f = fixture().await;
    let answer =
        f.gw.register(
            &alice(),
            with_agents(None, vec![spec("llama"), spec("other")], vec![]),
        )
        .await
        .unwrap();
    let session = answer.provider_session_id;
    let id = f.row("other").await.id;
    f.gw.register(
        &alice(),
        with_agents(
            Some(&session),
            vec![spec("llama")],
            vec![agent("other", "llama")],
        ),
    )
    .await
    .unwrap();
    let row = f.row("other").await;
    assert!(row.agent.is_some());
    assert_eq!(row.id, id, "the same name, the same row");
    assert!(matches!(
        f.gw.get(&client(), "other").await,
        Err(Error::UnknownLlm { .. })
    ));
    f.gw.register(
        &alice(),
        with_agents(Some(&session), vec![spec("llama"), spec("other")], vec![]),
    )
    .await
    .unwrap();
    assert!(f.row("other").await.agent.is_none());
    assert_eq!(
        f.gw.get(&client(), "other").await.unwrap().name.as_str(),
        "other"
    );
}

/// A request for an agent whose model sleeps wakes the model, as a request for the
/// model itself does, and is answered once the model is ready, with the persona.
#[tokio::test]
async fn a_request_for_an_agent_wakes_its_sleeping_model() {
    let f = fixture().await;
    let (session, _binding, channel) = published(&f).await;
    let asleep = vec![LlmState {
        name: name("llama"),
        state: UpstreamState::Asleep,
        wake_failed: None,
    }];
    f.gw.heartbeat_with(&alice(), &session, &asleep)
        .await
        .unwrap();
    assert_eq!(f.row("llama").await.status, LlmStatus::Hibernating);
    let gw = f.gw.clone();
    let asked =
        tokio::spawn(async move { gw.infer(&client(), chat("helper", user("wake up"))).await });
    let wake = loop {
        match channel.next().await {
            virtual_llm_core::protocol::GatewayFrame::Wake(w) => break w,
            _ => continue,
        }
    };
    assert_eq!(wake.llm.as_str(), "llama", "the agent's model is woken");
    let ready = vec![LlmState {
        name: name("llama"),
        state: UpstreamState::Ready,
        wake_failed: None,
    }];
    f.gw.heartbeat_with(&alice(), &session, &ready)
        .await
        .unwrap();
    let task = channel.next_task().await;
    assert_eq!(task.llm.as_str(), "llama");
    assert_eq!(
        task.body.to_value().unwrap()["messages"][0]["content"],
        "You are helper."
    );
    f.gw.deliver(
        &alice(),
        &session,
        &task.task_id,
        TaskResult::Completed {
            status: 200,
            body: json!({"choices": [{"message": {"content": "awake"}}]}).into(),
            retry_after: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(text_of(asked.await.unwrap().unwrap()).await, "awake");
}

/// An agent has no upstream: a heartbeat reporting a state under an agent's name
/// changes nothing, and the agent's row keeps being touched with its session's.
#[tokio::test]
async fn a_state_reported_for_an_agent_is_ignored() {
    let f = fixture().await;
    let (session, _binding, _channel) = published(&f).await;
    let before = f.row("helper").await;
    let states = vec![LlmState {
        name: name("helper"),
        state: UpstreamState::Asleep,
        wake_failed: Some("no such thing".into()),
    }];
    f.clock.advance(Duration::from_secs(5));
    f.gw.heartbeat_with(&alice(), &session, &states)
        .await
        .unwrap();
    let after = f.row("helper").await;
    assert_eq!(after.status, LlmStatus::Active);
    assert_eq!(after.upstream, None);
    assert_eq!(after.revision, before.revision, "nothing written");
    assert_eq!(
        after.last_heartbeat_at,
        Some(f.now()),
        "touched with its session"
    );
}
