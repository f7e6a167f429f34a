//! Embedding virtual-llm in your own warp gateway: your authenticator, your base path,
//! your own routes beside ours, both transports, the GC, a graceful stop.
//!
//! Run with: `cargo run --example embed` (listens on 127.0.0.1:8090)

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use virtual_llm::{Authenticator, Config, Error, Gateway, MemoryStore, Principal, Role};
use warp::Filter;

/// Your identity system: here, any token starting with `pub-` publishes, `app-` calls.
#[derive(Debug)]
struct MyAuth;

#[async_trait]
impl Authenticator for MyAuth {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, Error> {
        match bearer {
            Some(t) if t.starts_with("pub-") => Ok(Principal::new(t, [Role::Publisher])),
            Some(t) if t.starts_with("app-") => Ok(Principal::new(t, [Role::Client])),
            _ => Err(Error::Unauthenticated),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    common::init_tracing();
    let config = Config {
        base_path: "/llm".into(),
        ..Config::default()
    };
    let gateway = Gateway::builder(Arc::new(MemoryStore::new()))
        .config(config)
        .authenticator(Arc::new(MyAuth))
        .start()
        .await?;
    let _gc = gateway.spawn_gc();

    // Your own routes, tried first; then both transports' control channels, the client
    // and provider routes, and the OpenAI-shaped 404 for anything else.
    let health = warp::path!("healthz")
        .map(|| warp::reply::Reply::into_response("ok"))
        .boxed();
    let channels = [
        virtual_llm::sse::route(gateway.clone()),
        virtual_llm::ws::route(gateway.clone()),
    ];
    let routes = virtual_llm::http::routes_with(gateway.clone(), channels, health);

    // The signals are listened for before the socket, so none can kill it unheard.
    let signal = common::shutdown_signal();
    // `http::bind` asks for a listen backlog that survives a fleet reconnecting at once.
    let listener = virtual_llm::http::bind(([127, 0, 0, 1], 8090).into())?;
    let draining = gateway.clone();
    let stop = async move {
        signal.await;
        draining.drain(Duration::from_secs(10)).await;
    };
    virtual_llm::http::serve(listener, routes, stop, Duration::from_secs(10)).await;
    Ok(())
}
