//! Multi-tenant controls through the HTTP surface (SPEC §16): access per LLM, pool and
//! agent (a caller without access gets the very 404 of a name nobody registered, and
//! no listing shows the row), the limits per principal (`requestsPerMinute`,
//! `tokensPerMinute`, `maxConcurrent`: 429 `rate_limited` with `Retry-After` and the
//! `x-ratelimit-*` headers, and recovery once the gateway's clock moved on; `maxNames`
//! and `maxSessions`: 403 `quota_exceeded`, nothing written), and the usage route.
//! Time is the gateway's [`ManualClock`]: nothing sleeps.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use virtual_llm::access::Access;
use virtual_llm::limits::Limits;
use virtual_llm::protocol::{AgentSpec, LlmSpec, TaskFrame};
use virtual_llm::testkit::{
    Gated, ManualClock, SseTransport as Sse, TestGateway, Transport, at, token,
};
use virtual_llm::{
    Completion, Config, EchoProvider, Error, LlmName, Principal, Provider, PublishedLlm, Publisher,
    PublisherOptions, Reply, Role, StaticTokens,
};

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

/// Answers every request with its own name as the content, so a test can tell which
/// member of a pool answered.
#[derive(Debug)]
struct Named(&'static str);

#[async_trait]
impl Provider for Named {
    async fn infer(&self, _task: TaskFrame) -> Result<Reply, Error> {
        Ok(Reply::Complete(Completion::ok(json!({
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.0}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }))))
    }
}

fn limited(id: &str, roles: &[Role], limits: Limits) -> Principal {
    Principal::new(id, roles.iter().copied()).with_limits(limits)
}

/// A gateway with these principals (token `<id>-token` each) on a manual clock.
async fn gateway() -> (TestGateway, ManualClock) {
    let clock = ManualClock::new(at(1_000_000));
    let principals = [
        Principal::new("alice", [Role::Publisher, Role::Client]),
        Principal::new("bob", [Role::Client]),
        Principal::new("carol", [Role::Client]),
        Principal::new("root", [Role::Admin]),
        limited(
            "rpm",
            &[Role::Client],
            Limits {
                requests_per_minute: Some(2),
                ..Limits::default()
            },
        ),
        limited(
            "tpm",
            &[Role::Client],
            Limits {
                tokens_per_minute: Some(10),
                ..Limits::default()
            },
        ),
        limited(
            "conc",
            &[Role::Client],
            Limits {
                max_concurrent: Some(1),
                ..Limits::default()
            },
        ),
        limited(
            "quota",
            &[Role::Publisher],
            Limits {
                max_names: Some(2),
                max_sessions: Some(1),
                ..Limits::default()
            },
        ),
    ];
    let auth = principals
        .into_iter()
        .fold(StaticTokens::new(), |t, p| t.with(token(&p.id), p));
    let auth = Arc::new(auth);
    let hook_clock = clock.clone();
    let gw = TestGateway::start_on_with(&Sse, None, Config::default(), &move |b| {
        b.authenticator(auth.clone())
            .clock(Arc::new(hook_clock.clone()))
    })
    .await;
    (gw, clock)
}

fn spec(n: &str, pool: Option<&str>, access: Access) -> LlmSpec {
    let mut spec = LlmSpec::new(name(n), "openai", format!("{n}-model"));
    spec.pool = pool.map(name);
    spec.access = access;
    spec
}

/// Publishes `llms` and `agents` as `who` over SSE and waits until connected.
async fn publish(
    gw: &TestGateway,
    who: &str,
    llms: Vec<PublishedLlm>,
    agents: Vec<AgentSpec>,
) -> Publisher {
    let options = PublisherOptions {
        agents,
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(Sse.wire(&gw.publisher_url, Some(token(who))), llms, options);
    tokio::time::timeout(Duration::from_secs(10), publisher.connected())
        .await
        .expect("the publisher connects");
    publisher
}

fn echo() -> Arc<dyn Provider> {
    Arc::new(EchoProvider::new())
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn call(method: reqwest::Method, url: String, who: &str, body: Option<Value>) -> Answer {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token(who));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn get(gw: &TestGateway, who: &str, path: &str) -> Answer {
    call(reqwest::Method::GET, format!("{}{path}", gw.url), who, None).await
}

async fn post(gw: &TestGateway, who: &str, path: &str, body: Value) -> Answer {
    call(
        reqwest::Method::POST,
        format!("{}{path}", gw.url),
        who,
        Some(body),
    )
    .await
}

async fn chat(gw: &TestGateway, who: &str, model: &str, text: &str) -> Answer {
    let body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    post(gw, who, "/v1/chat/completions", body).await
}

/// The ids `/v1/models` lists for `who`.
async fn model_ids(gw: &TestGateway, who: &str) -> Vec<String> {
    let answer = get(gw, who, "/v1/models").await;
    assert_eq!(answer.status, 200);
    let mut ids: Vec<String> = answer.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The `name`s of a JSON list answer.
fn names(answer: &Answer) -> Vec<String> {
    assert_eq!(answer.status, 200, "{}", answer.body);
    let mut names: Vec<String> = answer
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Asserts `answer` is the 404 a name nobody registered gets, `ghost` standing for it.
fn as_if_absent(answer: &Answer, ghost: &Answer, hidden: &str, what: &str) {
    assert_eq!(answer.status, 404, "{what}: {}", answer.body);
    assert_eq!(ghost.status, 404, "{what} (ghost): {}", ghost.body);
    let text = answer.body.to_string();
    assert_eq!(
        text,
        ghost.body.to_string().replace("ghost-name", hidden),
        "{what}: the same body as for a name nobody registered"
    );
}

#[tokio::test]
async fn a_caller_without_access_finds_nothing_and_others_call_as_before() {
    let (gw, _clock) = gateway().await;
    let llms = vec![
        PublishedLlm::new(spec("mine", None, Access::Owner), echo()),
        PublishedLlm::new(
            spec("team", None, Access::Principals(vec!["bob".into()])),
            echo(),
        ),
        PublishedLlm::new(spec("open", None, Access::Public), echo()),
        PublishedLlm::new(
            spec("shared-a", Some("shared"), Access::Public),
            Arc::new(Named("shared-a")),
        ),
        PublishedLlm::new(
            spec("shared-b", Some("shared"), Access::Owner),
            Arc::new(Named("shared-b")),
        ),
    ];
    let helper = AgentSpec::new(name("helper"), name("open"));
    let mut secret = AgentSpec::new(name("secret-helper"), name("open"));
    secret.access = Access::Owner;
    let _p = publish(&gw, "alice", llms, vec![helper, secret]).await;
    let base = gw.gateway.config().base_path.clone();

    // Carol: public rows only, in every listing.
    assert_eq!(model_ids(&gw, "carol").await, ["helper", "open", "shared"]);
    assert_eq!(names(&get(&gw, "carol", &base).await), ["open", "shared-a"]);
    assert_eq!(
        names(&get(&gw, "carol", &format!("{base}/shared/members")).await),
        ["shared-a"]
    );
    assert_eq!(
        names(&get(&gw, "carol", "/api/v1/agents").await),
        ["helper"]
    );

    // Every route that takes a name answers as if it did not exist.
    for hidden in ["mine", "team", "secret-helper"] {
        let chat_of =
            |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let prompt_of = |model: &str| json!({"model": model, "prompt": "hi"});
        let embed_of = |model: &str| json!({"model": model, "input": "hi"});
        for (path, body) in [
            ("/v1/chat/completions", chat_of as fn(&str) -> Value),
            ("/v1/completions", prompt_of),
            ("/v1/embeddings", embed_of),
        ] {
            let answer = post(&gw, "carol", path, body(hidden)).await;
            let ghost = post(&gw, "carol", path, body("ghost-name")).await;
            as_if_absent(&answer, &ghost, hidden, &format!("{path} {hidden}"));
            assert_eq!(answer.body["error"]["code"], "model_not_found");
        }
        for path in [
            "/v1/models/{}".to_owned(),
            format!("{base}/{{}}"),
            "/api/v1/agents/{}".to_owned(),
        ] {
            let answer = get(&gw, "carol", &path.replace("{}", hidden)).await;
            let ghost = get(&gw, "carol", &path.replace("{}", "ghost-name")).await;
            // An LLM is no agent and an agent no registry row: those are 404 to
            // anyone; what matters is that the answer is a stranger's.
            as_if_absent(&answer, &ghost, hidden, &format!("GET {path} {hidden}"));
        }
        let infer = post(
            &gw,
            "carol",
            &format!("{base}/{hidden}/infer"),
            json!({"messages": []}),
        )
        .await;
        let ghost = post(
            &gw,
            "carol",
            &format!("{base}/ghost-name/infer"),
            json!({"messages": []}),
        )
        .await;
        as_if_absent(&infer, &ghost, hidden, "infer");
    }
    let members = get(&gw, "carol", &format!("{base}/mine/members")).await;
    assert_eq!(members.status, 404);

    // A pool serves carol with the members she may call, and never the others.
    for _ in 0..6 {
        let answer = chat(&gw, "carol", "shared", "hi").await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["choices"][0]["message"]["content"], "shared-a");
    }
    assert_eq!(chat(&gw, "carol", "open", "hello there").await.status, 200);
    assert_eq!(chat(&gw, "carol", "helper", "hi").await.status, 200);

    // Bob is on the list of `team`.
    assert_eq!(
        model_ids(&gw, "bob").await,
        ["helper", "open", "shared", "team"]
    );
    let answer = chat(&gw, "bob", "team", "hello bob").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(chat(&gw, "bob", "mine", "hi").await.status, 404);

    // The owner and an admin see and call everything.
    for who in ["alice", "root"] {
        assert_eq!(
            model_ids(&gw, who).await,
            ["helper", "mine", "open", "secret-helper", "shared", "team"]
        );
        assert_eq!(
            names(&get(&gw, who, &base).await),
            ["mine", "open", "shared-a", "shared-b", "team"]
        );
        assert_eq!(
            names(&get(&gw, who, "/api/v1/agents").await),
            ["helper", "secret-helper"]
        );
        for model in ["mine", "team", "secret-helper"] {
            let answer = chat(&gw, who, model, "hi").await;
            assert_eq!(answer.status, 200, "{who} calls {model}: {}", answer.body);
        }
        assert_eq!(get(&gw, who, "/v1/models/mine").await.status, 200);
        assert_eq!(get(&gw, who, &format!("{base}/shared-b")).await.status, 200);
    }
}

#[tokio::test]
async fn requests_per_minute_answer_429_with_the_openai_headers_then_recover() {
    let (gw, clock) = gateway().await;
    let _p = publish(
        &gw,
        "alice",
        vec![PublishedLlm::new(
            spec("open", None, Access::Public),
            echo(),
        )],
        vec![],
    )
    .await;
    for remaining in [1, 0] {
        let answer = chat(&gw, "rpm", "open", "hi").await;
        assert_eq!(answer.status, 200, "{remaining}: {}", answer.body);
    }
    let refused = chat(&gw, "rpm", "open", "hi").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "rate_limited");
    assert_eq!(refused.body["error"]["type"], "rate_limit_error");
    let header = |name: &str| refused.headers[name].to_str().unwrap().to_owned();
    assert_eq!(header("retry-after"), "30", "one request every 30 s");
    assert_eq!(header("x-ratelimit-limit-requests"), "2");
    assert_eq!(header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(header("x-ratelimit-reset-requests"), "1m0s");
    assert!(!refused.headers.contains_key("x-ratelimit-limit-tokens"));
    // Another principal is not limited by rpm's use; an unknown model costs nothing.
    assert_eq!(chat(&gw, "carol", "open", "hi").await.status, 200);
    assert_eq!(chat(&gw, "rpm", "ghost", "hi").await.status, 404);

    clock.advance(Duration::from_secs(29));
    assert_eq!(chat(&gw, "rpm", "open", "hi").await.status, 429);
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        chat(&gw, "rpm", "open", "hi").await.status,
        200,
        "recovered"
    );
    assert_eq!(chat(&gw, "rpm", "open", "hi").await.status, 429);
}

#[tokio::test]
async fn tokens_per_minute_count_the_answers_usage() {
    let (gw, clock) = gateway().await;
    let _p = publish(
        &gw,
        "alice",
        vec![PublishedLlm::new(
            spec("open", None, Access::Public),
            echo(),
        )],
        vec![],
    )
    .await;
    // The echo model counts words: 6 prompt + 6 completion tokens, over the 10 a
    // minute tpm has; the first request is let in (the bucket was full), the next
    // finds it 2 tokens in debt.
    let text = "one two three four five six";
    assert_eq!(chat(&gw, "tpm", "open", text).await.status, 200);
    let refused = chat(&gw, "tpm", "open", text).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "rate_limited");
    let header = |name: &str| refused.headers[name].to_str().unwrap().to_owned();
    assert_eq!(header("x-ratelimit-limit-tokens"), "10");
    assert_eq!(header("x-ratelimit-remaining-tokens"), "0");
    assert_eq!(header("retry-after"), "12", "2 tokens at 10 a minute");
    assert_eq!(header("x-ratelimit-reset-tokens"), "1m12s");
    clock.advance(Duration::from_secs(12));
    // A stream reports its usage in its last chunk when asked to: 1 + 1 tokens.
    let body = json!({"model": "open", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    let streamed = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(token("tpm"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let usage = get(&gw, "tpm", "/api/v1/usage").await;
    assert_eq!(
        usage.body,
        json!({"usage": [{"principal": "tpm", "llm": "open", "requests": 2,
            "promptTokens": 7, "completionTokens": 7}]})
    );
}

#[tokio::test]
async fn max_concurrent_refuses_a_second_request_until_the_first_ends() {
    let (gw, _clock) = gateway().await;
    let gated = Arc::new(Gated::default());
    let _p = publish(
        &gw,
        "alice",
        vec![
            PublishedLlm::new(spec("slow", None, Access::Public), gated.clone()),
            PublishedLlm::new(spec("open", None, Access::Public), echo()),
        ],
        vec![],
    )
    .await;
    let stream = gw.chat_stream("conc", "slow", "hi").await;
    let refused = chat(&gw, "conc", "open", "hi").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "rate_limited");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        chat(&gw, "carol", "open", "hi").await.status,
        200,
        "others go on"
    );
    gated.release();
    let text = stream.text().await;
    assert!(text.contains("second"), "{text}");
    virtual_llm::testkit::eventually("the slot frees", || async {
        chat(&gw, "conc", "open", "hi").await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_register_over_max_names_or_max_sessions_is_403_and_writes_nothing() {
    let (gw, _clock) = gateway().await;
    let base = gw.gateway.config().base_path.clone();
    let register = |body: Value| {
        let gw = gw.clone();
        let base = base.clone();
        async move { post(&gw, "quota", &format!("{base}/_provider-register"), body).await }
    };
    let llm = |n: &str| json!({"name": n, "type": "openai", "model": "m"});
    let everything = || async { names(&get(&gw, "root", &base).await) };

    let over = register(json!({"llms": [llm("q1"), llm("q2"), llm("q3")]})).await;
    assert_eq!(over.status, 403, "{}", over.body);
    assert_eq!(over.body["error"]["code"], "quota_exceeded");
    assert!(everything().await.is_empty(), "nothing written");

    let first = register(json!({"llms": [llm("q1"), llm("q2")]})).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let session = first.body["providerSessionId"].clone();
    // An agent takes a name too.
    let with_agent = register(
        json!({"providerSessionId": session, "llms": [llm("q1"), llm("q2")],
        "agents": [{"name": "qa", "llm": "q1"}]}),
    )
    .await;
    assert_eq!(with_agent.status, 403, "{}", with_agent.body);
    // A second session is one too many.
    let other = register(json!({"llms": [llm("q1")]})).await;
    assert_eq!(other.status, 403, "{}", other.body);
    assert!(
        other.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sessions"),
        "{}",
        other.body
    );
    assert_eq!(everything().await, ["q1", "q2"], "nothing written");
    // What it already holds it may register again.
    let again =
        register(json!({"providerSessionId": session, "llms": [llm("q2"), llm("q1")]})).await;
    assert_eq!(again.status, 200, "{}", again.body);
}

#[tokio::test]
async fn the_usage_route_counts_per_principal_and_llm_and_shows_each_its_own() {
    let (gw, _clock) = gateway().await;
    let _p = publish(
        &gw,
        "alice",
        vec![
            PublishedLlm::new(spec("open", None, Access::Public), echo()),
            PublishedLlm::new(
                spec("team", None, Access::Principals(vec!["bob".into()])),
                echo(),
            ),
        ],
        vec![],
    )
    .await;
    // Echo usage: prompt words, completion words.
    assert_eq!(chat(&gw, "bob", "open", "a b c").await.status, 200);
    assert_eq!(chat(&gw, "bob", "open", "a b").await.status, 200);
    assert_eq!(chat(&gw, "bob", "team", "x").await.status, 200);
    assert_eq!(chat(&gw, "carol", "open", "one").await.status, 200);
    assert_eq!(chat(&gw, "carol", "team", "hidden").await.status, 404);

    let bob = get(&gw, "bob", "/api/v1/usage").await;
    assert_eq!(bob.status, 200);
    assert_eq!(
        bob.body,
        json!({"usage": [
            {"principal": "bob", "llm": "open", "requests": 2, "promptTokens": 5, "completionTokens": 5},
            {"principal": "bob", "llm": "team", "requests": 1, "promptTokens": 1, "completionTokens": 1},
        ]})
    );
    let carol = get(&gw, "carol", "/api/v1/usage").await;
    assert_eq!(
        carol.body,
        json!({"usage": [
            {"principal": "carol", "llm": "open", "requests": 1, "promptTokens": 1, "completionTokens": 1},
        ]}),
        "a 404 is no request of an llm"
    );
    let all = get(&gw, "root", "/api/v1/usage").await;
    assert_eq!(all.body["usage"].as_array().unwrap().len(), 3);
    assert_eq!(get(&gw, "nobody", "/api/v1/usage").await.status, 401);
}
