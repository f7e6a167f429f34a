//! The operator's basics over HTTP: `GET /healthz` answers while the process lives,
//! `GET /readyz` only while the store answers and the gateway is not draining (both
//! without a token); CORS is off unless origins are listed, and then answers their
//! preflights and marks their answers, refusing other origins' preflights.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use virtual_llm::testkit::FailingStore;
use virtual_llm::{Gateway, MemoryStore, StaticTokens};

struct Served {
    url: String,
    gateway: Gateway,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(gateway: Gateway, cors: &[&str]) -> Served {
    let mut routes = virtual_llm::http::routes(gateway.clone(), []);
    if !cors.is_empty() {
        let origins: Vec<String> = cors.iter().map(|o| (*o).to_owned()).collect();
        routes = virtual_llm::http::with_cors(routes, &origins).unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(virtual_llm::http::serve(
        listener,
        routes,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    Served {
        url,
        gateway,
        _stop: stop,
    }
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_alive_and_readyz_follows_the_store_and_draining() {
    let store = Arc::new(FailingStore::new(Arc::new(MemoryStore::new())));
    // Tokens are configured, and the probes still need none.
    let gateway = Gateway::builder(store.clone())
        .authenticator(Arc::new(StaticTokens::new()))
        .start()
        .await
        .unwrap();
    let served = serve(gateway, &[]).await;
    assert_eq!(
        get(&format!("{}/healthz", served.url)).await,
        (200, "ok".into())
    );
    assert_eq!(
        get(&format!("{}/readyz", served.url)).await,
        (200, "ok".into())
    );

    store.fail_reads(true);
    let (status, body) = get(&format!("{}/readyz", served.url)).await;
    assert_eq!(status, 503, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"]["message"].is_string(),
        "OpenAI-shaped: {body}"
    );
    assert_eq!(get(&format!("{}/healthz", served.url)).await.0, 200);
    store.fail_reads(false);
    assert_eq!(get(&format!("{}/readyz", served.url)).await.0, 200);

    served.gateway.drain(Duration::from_millis(1)).await;
    let response = reqwest::get(format!("{}/readyz", served.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "llm_unavailable", "{error}");
    assert_eq!(
        get(&format!("{}/healthz", served.url)).await,
        (200, "ok".into()),
        "a draining gateway is alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_answers_listed_origins_only() {
    let gateway = || async {
        Gateway::builder(Arc::new(MemoryStore::new()))
            .start()
            .await
            .unwrap()
    };
    let http = reqwest::Client::new();
    let preflight = |url: String, origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };

    let plain = serve(gateway().await, &[]).await;
    let answer = http
        .get(format!("{}/v1/models", plain.url))
        .header("origin", "https://chat.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(!answer.headers().contains_key("access-control-allow-origin"));
    let refused = preflight(
        format!("{}/v1/chat/completions", plain.url),
        "https://chat.example.com",
    )
    .await
    .unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );

    let open = serve(gateway().await, &["https://chat.example.com"]).await;
    let allowed = preflight(
        format!("{}/v1/chat/completions", open.url),
        "https://chat.example.com",
    )
    .await
    .unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    let answer = http
        .get(format!("{}/v1/models", open.url))
        .header("origin", "https://chat.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let other = preflight(
        format!("{}/v1/chat/completions", open.url),
        "https://evil.example",
    )
    .await
    .unwrap();
    assert_eq!(other.status(), 403);
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}
