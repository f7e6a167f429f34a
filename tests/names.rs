//! Names as clients write them (SPEC §17): a name may hold `/` between segments, like
//! vLLM's model ids (`meta-llama/Llama-3.1-8B-Instruct`). Published over each bundled
//! transport, such a name is served end to end: by `model` on every OpenAI route, by
//! the path's remaining segments on `{base}/{name...}`, `/infer` and `/members`, and on
//! `GET /v1/models/{id...}`, percent-encoded or not. Names with an empty, `.` or `..`
//! segment, or ending in `infer` or `members`, are refused with 400.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use serde_json::{Value, json};
use virtual_llm::testkit::{SseTransport, TestGateway, Transport, WsTransport, token};
use virtual_llm::{Config, EchoProvider};

const NAME: &str = "meta-llama/Llama-3.1-8B-Instruct";

async fn post(gw: &TestGateway, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", gw.url))
        .bearer_auth(token("client"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn served_end_to_end(t: &dyn Transport) {
    let gw = TestGateway::start_for(t, Config::default()).await;
    let _publisher = gw
        .publish(t, "alice", &[NAME], Arc::new(EchoProvider::new()))
        .await;
    let base = gw.gateway.config().base_path.clone();

    // The registry, by the path's remaining segments.
    let row = gw.row(NAME).await;
    assert_eq!(
        (row["name"].as_str(), row["status"].as_str()),
        (Some(NAME), Some("active"))
    );
    let (status, members) = gw.get_registry("client", &format!("/{NAME}/members")).await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(members[0]["name"], NAME, "{members}");
    assert_eq!(gw.list().await[0]["name"], NAME);

    // Every OpenAI route, by model.
    let (status, answer) = gw.chat("client", NAME, "slash names work", false).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "slash names work"
    );
    let (status, text) = post(
        &gw,
        "/v1/completions",
        json!({"model": NAME, "prompt": "p q"}),
    )
    .await;
    assert_eq!(
        (status, text["choices"][0]["text"].as_str()),
        (200, Some("p q")),
        "{text}"
    );
    let (status, vectors) = post(&gw, "/v1/embeddings", json!({"model": NAME, "input": "e"})).await;
    assert_eq!(status, 200, "{vectors}");
    assert_eq!(vectors["data"][0]["embedding"].as_array().unwrap().len(), 8);

    // The registry's infer route, plain and percent-encoded.
    for path in [NAME.to_owned(), NAME.replace('/', "%2F")] {
        let (status, answer) = post(
            &gw,
            &format!("{base}/{path}/infer"),
            json!({"messages": [{"role": "user", "content": "via infer"}]}),
        )
        .await;
        assert_eq!(status, 200, "{path}: {answer}");
        assert_eq!(answer["choices"][0]["message"]["content"], "via infer");
    }

    // models.retrieve, plain and percent-encoded; the list names it.
    for id in [NAME.to_owned(), NAME.replace('/', "%2F")] {
        let model = gw.get_json("client", &format!("/v1/models/{id}")).await;
        assert_eq!(model["id"], NAME, "{model}");
        assert_eq!(model["object"], "model");
    }
    let models = gw.get_json("client", "/v1/models").await;
    assert_eq!(models["data"][0]["id"], NAME, "{models}");
    assert_eq!(gw.get_status("client", "meta-llama").await, 404);
    assert_eq!(gw.get_status("client", "meta-llama/Llama").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_slashes_is_served_end_to_end_over_sse() {
    served_end_to_end(&SseTransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_slashes_is_served_end_to_end_over_ws() {
    served_end_to_end(&WsTransport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_bad_segments_are_refused() {
    let gw = TestGateway::start(Config::default()).await;
    for bad in [
        "org//m",
        "org/./m",
        "org/../m",
        "/m",
        "m/",
        "org/infer",
        "org/members",
        "a b/c",
    ] {
        let body = json!({"llms": [{"name": bad, "type": "openai", "model": "m"}]});
        let status = gw
            .post_raw("alice", "_provider-register", &body.to_string())
            .await;
        assert_eq!(status, 400, "{bad:?} was accepted");
    }
    // A bad name in a path is a 400 too, never a row.
    let (status, error) = gw.get_registry("client", "/org/..%2Fm").await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_name", "{error}");
}
