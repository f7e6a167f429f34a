//! Readiness and recipes against small servers served by warp on 127.0.0.1:0 (SPEC
//! §12): the provider's probe is `GET {url}/models` with the API key, ready on 2xx and
//! not on a 5xx or an unreachable upstream; a `UrlRecipe` sends its method, headers and
//! body (a string as it is, anything else as JSON), succeeds on 2xx and fails with the
//! status otherwise, and with words naming no address when nothing answers.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use bytes::Bytes;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use virtual_llm_core::{Provider, Recipe};
use virtual_llm_openai::{OpenAiProvider, OpenAiUpstream, UrlRecipe};
use warp::Filter;
use warp::http::{HeaderMap, StatusCode};

/// What a server saw of one request.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

/// Answers every request with the status in `status`, and reports what it saw.
async fn server(status: Arc<AtomicU16>) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let routes = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(
            move |method: warp::http::Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  body: Bytes| {
                seen_tx
                    .send(Seen {
                        method: method.to_string(),
                        path: path.as_str().to_owned(),
                        query,
                        headers,
                        body,
                    })
                    .unwrap();
                let status = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
                warp::reply::with_status(warp::reply::json(&json!({"data": []})), status)
            },
        );
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    (addr, seen)
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    listener.local_addr().unwrap()
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_probe_is_get_models_with_the_key_and_ready_only_on_2xx() {
    let status = Arc::new(AtomicU16::new(200));
    let (addr, mut seen) = server(status.clone()).await;
    let upstream = OpenAiUpstream::new(&format!("http://{addr}/v1/"))
        .unwrap()
        .with_api_key("sk-local")
        .unwrap();
    let provider = OpenAiProvider::new(upstream, "m");
    assert!(provider.probe().await, "200: ready");
    let request = seen.recv().await.unwrap();
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(header(&request, "authorization"), Some("Bearer sk-local"));

    for not_ready in [503, 500, 404, 401] {
        status.store(not_ready, Ordering::SeqCst);
        assert!(!provider.probe().await, "{not_ready}: not ready");
        seen.recv().await.unwrap();
    }
    status.store(204, Ordering::SeqCst);
    assert!(provider.probe().await, "any 2xx is ready");
}

#[tokio::test]
async fn an_unreachable_upstream_is_not_ready() {
    let addr = closed_port().await;
    let upstream = OpenAiUpstream::new(&format!("http://{addr}/v1")).unwrap();
    assert!(!upstream.probe().await);
    assert!(!OpenAiProvider::new(upstream, "m").probe().await);
}

#[tokio::test]
async fn a_url_recipe_sends_its_method_headers_and_json_body() {
    let status = Arc::new(AtomicU16::new(200));
    let (addr, mut seen) = server(status.clone()).await;
    let recipe = UrlRecipe::new("post", &format!("http://{addr}/sleep?level=1"))
        .unwrap()
        .with_header("Authorization", "Bearer sk-local")
        .unwrap()
        .with_header("x-extra", "yes")
        .unwrap()
        .with_body(json!({"model": "llama3.2", "keep_alive": 0}));
    assert_eq!(recipe.run().await, Ok(()));
    let request = seen.recv().await.unwrap();
    assert_eq!(request.method, "POST");
    assert_eq!(
        (request.path.as_str(), request.query.as_str()),
        ("/sleep", "level=1")
    );
    assert_eq!(header(&request, "authorization"), Some("Bearer sk-local"));
    assert_eq!(header(&request, "x-extra"), Some("yes"));
    assert_eq!(header(&request, "content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&request.body).unwrap(),
        json!({"model": "llama3.2", "keep_alive": 0})
    );
}

#[tokio::test]
async fn a_string_body_is_sent_as_it_is_with_the_headers_content_type() {
    let status = Arc::new(AtomicU16::new(202));
    let (addr, mut seen) = server(status).await;
    let recipe = UrlRecipe::new("PUT", &format!("http://{addr}/hook"))
        .unwrap()
        .with_header("content-type", "text/plain")
        .unwrap()
        .with_body(json!("power on gpu-box-1"));
    assert_eq!(recipe.run().await, Ok(()), "any 2xx succeeds");
    let request = seen.recv().await.unwrap();
    assert_eq!(request.method, "PUT");
    assert_eq!(header(&request, "content-type"), Some("text/plain"));
    assert_eq!(&request.body[..], b"power on gpu-box-1");

    let bare = UrlRecipe::new("GET", &format!("http://{addr}/hook")).unwrap();
    assert_eq!(bare.run().await, Ok(()));
    let request = seen.recv().await.unwrap();
    assert_eq!(request.method, "GET");
    assert!(request.body.is_empty());
    assert_eq!(header(&request, "content-type"), None);
}

#[tokio::test]
async fn a_url_recipe_answered_non_2xx_fails_with_the_status() {
    let status = Arc::new(AtomicU16::new(503));
    let (addr, mut seen) = server(status.clone()).await;
    let recipe = UrlRecipe::new("POST", &format!("http://{addr}/wake_up")).unwrap();
    assert_eq!(
        recipe.run().await,
        Err("HTTP 503 Service Unavailable".to_owned())
    );
    seen.recv().await.unwrap();
    status.store(302, Ordering::SeqCst);
    assert_eq!(
        recipe.run().await,
        Err("HTTP 302 Found".to_owned()),
        "a redirect is not followed"
    );
    status.store(400, Ordering::SeqCst);
    assert_eq!(recipe.run().await, Err("HTTP 400 Bad Request".to_owned()));
}

#[tokio::test]
async fn a_url_recipe_nobody_answers_fails_naming_no_address() {
    let addr = closed_port().await;
    let recipe = UrlRecipe::new("POST", &format!("http://{addr}/wake_up?token=sk-in-url")).unwrap();
    let message = recipe.run().await.unwrap_err();
    assert_eq!(
        message, "the recipe url did not answer: connection refused",
        "{message}"
    );
    assert!(!message.contains(&addr.port().to_string()), "{message}");
}
