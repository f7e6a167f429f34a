//! Fixtures shared by the core's integration tests: a gateway over a memory store with
//! a manual clock, principals, request builders, and the text of a reply.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use virtual_llm_core::protocol::{LlmSpec, RegisterRequest, RegisterResponse};
use virtual_llm_core::testkit::{FakeChannel, ManualClock, at};
use virtual_llm_core::{
    Binding, Config, Gateway, LlmName, LlmRecord, MemoryStore, Principal, Reply, Role, SessionId,
    Store,
};

pub struct Fixture {
    pub gw: Gateway,
    pub clock: ManualClock,
    pub store: Arc<MemoryStore>,
}

pub const START: u64 = 1_000_000;

pub async fn fixture() -> Fixture {
    fixture_with(Config::default()).await
}

pub async fn fixture_with(config: Config) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(at(START));
    let gw = Gateway::builder(store.clone())
        .clock(Arc::new(clock.clone()))
        .config(config)
        .start()
        .await
        .unwrap();
    Fixture { gw, clock, store }
}

pub fn publisher(id: &str) -> Principal {
    Principal::new(id, [Role::Publisher])
}

pub fn client() -> Principal {
    Principal::new("client", [Role::Client])
}

pub fn admin() -> Principal {
    Principal::new("root", [Role::Admin])
}

pub fn spec(name: &str) -> LlmSpec {
    LlmSpec {
        name: LlmName::parse(name).unwrap(),
        provider_type: "openai".into(),
        model: format!("{name}-model"),
        tier: None,
        pool: None,
        max_concurrent: None,
        state: None,
        access: Default::default(),
    }
}

pub fn request(session: Option<&SessionId>, names: &[&str]) -> RegisterRequest {
    RegisterRequest {
        agents: Vec::new(),
        provider_session_id: session.cloned(),
        protocol_version: None,
        llms: names.iter().map(|n| spec(n)).collect(),
        capabilities: Vec::new(),
    }
}

impl Fixture {
    pub async fn row(&self, name: &str) -> LlmRecord {
        self.try_row(name)
            .await
            .unwrap_or_else(|| panic!("row {name} missing"))
    }

    pub async fn try_row(&self, name: &str) -> Option<LlmRecord> {
        self.store
            .get(&LlmName::parse(name).unwrap())
            .await
            .unwrap()
    }

    pub async fn register(
        &self,
        who: &str,
        session: Option<&SessionId>,
        names: &[&str],
    ) -> RegisterResponse {
        self.gw
            .register(&publisher(who), request(session, names))
            .await
            .unwrap()
    }

    pub async fn bind(&self, who: &str, session: &SessionId) -> (Binding, FakeChannel) {
        let channel = FakeChannel::new();
        let binding = self
            .gw
            .bind(&publisher(who), session, Arc::new(channel.clone()))
            .await
            .unwrap();
        (binding, channel)
    }

    /// Registers `names` for `who` on a fresh session and binds a channel.
    pub async fn online(&self, who: &str, names: &[&str]) -> (SessionId, Binding, FakeChannel) {
        let session = self.register(who, None, names).await.provider_session_id;
        let (binding, channel) = self.bind(who, &session).await;
        (session, binding, channel)
    }

    pub fn now(&self) -> virtual_llm_core::Timestamp {
        use virtual_llm_core::Clock;
        self.clock.now()
    }
}

/// The text of a reply: a completion's message, or a stream's deltas joined.
pub async fn text_of(reply: Reply) -> String {
    match reply {
        Reply::Complete(c) => c.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        Reply::Stream(chunks) => chunks
            .map(|c| {
                let v: Value = serde_json::from_str(&c.unwrap()).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect::<Vec<_>>()
            .await
            .concat(),
    }
}

/// A spec serving in `pool` (`None`: a pool of one), taking at most `max_concurrent`
/// tasks at once (`None`: no limit).
pub fn pooled(name: &str, pool: Option<&str>, max_concurrent: Option<u32>) -> LlmSpec {
    LlmSpec {
        pool: pool.map(|p| LlmName::parse(p).unwrap()),
        max_concurrent,
        ..spec(name)
    }
}

impl Fixture {
    /// Registers `specs` for `who` on a fresh session.
    pub async fn register_specs(
        &self,
        who: &Principal,
        specs: Vec<LlmSpec>,
    ) -> Result<RegisterResponse, virtual_llm_core::Error> {
        let req = RegisterRequest {
            agents: Vec::new(),
            provider_session_id: None,
            protocol_version: None,
            llms: specs,
            capabilities: Vec::new(),
        };
        self.gw.register(who, req).await
    }

    /// Registers `specs` for `who` on a fresh session and binds a channel.
    pub async fn online_specs(
        &self,
        who: &Principal,
        specs: Vec<LlmSpec>,
    ) -> (SessionId, Binding, FakeChannel) {
        let session = self
            .register_specs(who, specs)
            .await
            .unwrap()
            .provider_session_id;
        let channel = FakeChannel::new();
        let binding = self
            .gw
            .bind(who, &session, Arc::new(channel.clone()))
            .await
            .unwrap();
        (session, binding, channel)
    }
}
