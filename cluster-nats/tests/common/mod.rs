//! Fixtures of the NATS plane's tests: replicas linked through a `nats-server` of the
//! test binary (or of the test's own), and the readiness check that skips loudly when
//! `nats-server` is not installed.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use virtual_llm_core::protocol::{LlmSpec, RegisterRequest};
use virtual_llm_core::testkit::FakeChannel;
use virtual_llm_core::{
    Binding, Config, Gateway, InferRequest, LlmName, MemoryStore, Principal, ReplicaId, Role,
    SessionId, Store,
};
use virtual_llm_nats::testing;
use virtual_llm_nats::{NatsOptions, NatsPlane};

/// Whether `nats-server` is here; prints the loud skip line when it is not (and
/// panics when services are required).
pub fn nats_installed() -> bool {
    testing::shared().is_some()
}

pub fn id(s: &str) -> ReplicaId {
    ReplicaId::parse(s).unwrap()
}

/// Options for one test: a prefix of its own.
pub fn options() -> NatsOptions {
    NatsOptions::default().with_prefix(testing::fresh_prefix())
}

/// Replicas `a` and `b` on the server at `url`, each knowing the other.
pub async fn two_planes_on(url: &str, options: NatsOptions) -> (NatsPlane, NatsPlane) {
    let a = NatsPlane::connect(url, id("gw-a"), options.clone())
        .await
        .unwrap();
    let b = NatsPlane::connect(url, id("gw-b"), options).await.unwrap();
    let within = Duration::from_secs(10);
    assert!(a.wait_for_peers(1, within).await, "a hears of b");
    assert!(b.wait_for_peers(1, within).await, "b hears of a");
    (a, b)
}

/// Replicas `a` and `b` on the shared server.
pub async fn two_planes() -> (NatsPlane, NatsPlane) {
    let server = testing::shared().expect("callers check nats_installed first");
    two_planes_on(&server.url(), options()).await
}

/// Two gateways over one in-memory store, linked by `planes`.
pub async fn gateways(planes: &(NatsPlane, NatsPlane)) -> (Gateway, Gateway) {
    gateways_with(planes, Config::default()).await
}

/// [`gateways`], both with `config`.
pub async fn gateways_with(planes: &(NatsPlane, NatsPlane), config: Config) -> (Gateway, Gateway) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let builder = || Gateway::builder(store.clone()).config(config.clone());
    let a = planes.0.join(builder()).await.unwrap();
    let b = planes.1.join(builder()).await.unwrap();
    (a, b)
}

/// A resume window short enough for a test to wait out.
pub fn short_resume_window() -> Config {
    Config {
        resume_window: Duration::from_millis(300),
        ..Config::default()
    }
}

pub fn alice() -> Principal {
    Principal::new("alice", [Role::Publisher])
}

pub fn carol() -> Principal {
    Principal::new("carol", [Role::Client])
}

pub fn chat(model: &str, text: &str, stream: bool) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model, "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

/// Registers `name` on `on` and binds a recording channel to it.
pub async fn bind_fake(on: &Gateway, name: &str) -> (SessionId, Binding, FakeChannel) {
    bind_fake_declaring(on, name, Vec::new()).await
}

/// [`bind_fake`], the register declaring `capabilities`.
pub async fn bind_fake_declaring(
    on: &Gateway,
    name: &str,
    capabilities: Vec<String>,
) -> (SessionId, Binding, FakeChannel) {
    let answer = on
        .register(
            &alice(),
            RegisterRequest {
                agents: Vec::new(),
                provider_session_id: None,
                protocol_version: Some(virtual_llm_core::protocol::PROTOCOL_VERSION),
                capabilities,
                llms: vec![LlmSpec::new(
                    LlmName::parse(name).unwrap(),
                    "openai",
                    format!("{name}-model"),
                )],
            },
        )
        .await
        .unwrap();
    let session = answer.provider_session_id;
    let channel = FakeChannel::new();
    let binding = on
        .bind(&alice(), &session, Arc::new(channel.clone()))
        .await
        .unwrap();
    (session, binding, channel)
}

/// `fut`, which must end within `secs` seconds (a bound for a hang, not a delay).
pub async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {secs} s"))
}
