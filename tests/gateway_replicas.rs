//! Two reference gateways as replicas (`--store postgres://… --nats nats://…
//! --replica-id ID`) on one PostgreSQL and one `nats-server`: a publisher connected
//! to replica A answers a client of replica B, whole and streamed, over SSE and over
//! WebSocket; then replica A is killed (SIGKILL) in the middle of a stream: the
//! client on B gets an error event, not a hang, and the publisher (given `--gateway
//! A,B`) serves again through B. A rolling restart of both replicas under a steady
//! load loses no request but those in flight on the replica killed. Skipped, loudly,
//! where PostgreSQL or `nats-server` is not installed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use binary::{GatewayProcess, PublisherProcess, TempDir, free_addr, poll_until, temp_dir, try_row};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtual_llm::nats::testing::{NatsServer, available};
use virtual_llm::postgres::testing as pg;

const CAP: Duration = Duration::from_secs(30);

/// Two gateway replicas on one database and one NATS server.
struct Replicas {
    a: Option<GatewayProcess>,
    _b: GatewayProcess,
    url_a: String,
    url_b: String,
    dir: TempDir,
    _nats: NatsServer,
}

async fn replicas() -> Option<Replicas> {
    let db = pg::fresh_database().await?;
    let nats = available(NatsServer::start())?;
    let dir = temp_dir();
    let (a, b) = (free_addr(), free_addr());
    let nats_url = nats.url();
    let flags = |replica: &'static str| {
        [
            "--store",
            db.as_str(),
            "--nats",
            nats_url.as_str(),
            "--replica-id",
            replica,
            "--heartbeat-every",
            "1s",
        ]
    };
    let gw_a = GatewayProcess::start_env(a, &dir.0.join("a"), &flags("gw-a"), &[]);
    let gw_b = GatewayProcess::start_env(b, &dir.0.join("b"), &flags("gw-b"), &[]);
    let (url_a, url_b) = (format!("http://{a}"), format!("http://{b}"));
    binary::ready(&url_a).await;
    binary::ready(&url_b).await;
    Some(Replicas {
        a: Some(gw_a),
        _b: gw_b,
        url_a,
        url_b,
        dir,
        _nats: nats,
    })
}

async fn active_on(url: &str, name: &str) {
    poll_until(&format!("{name} is active on {url}"), CAP, || async {
        try_row(url, name)
            .await
            .is_some_and(|r| r["status"] == "active")
    })
    .await;
}

fn chat(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// The concatenated `delta.content` of an SSE body.
fn sse_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_one_replica_is_answered_through_the_other() {
    let Some(r) = replicas().await else {
        return;
    };
    let http = reqwest::Client::new();
    for transport in ["sse", "ws"] {
        let name = format!("echo-{transport}");
        let session_file = r.dir.0.join(format!("session-{transport}"));
        let publisher =
            PublisherProcess::start(&r.url_a, transport, &session_file, &["--echo", &name]);
        poll_until("the publisher serves through gateway A", CAP, || async {
            !publisher
                .lines_with("connected; serving requests")
                .is_empty()
        })
        .await;
        active_on(&r.url_b, &name).await;

        let text = format!("whole over {transport}");
        let response = http
            .post(format!("{}/v1/chat/completions", r.url_b))
            .json(&chat(&name, &text, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{transport}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], text.as_str());

        let text = format!("streamed over {transport} in several words");
        let response = http
            .post(format!("{}/v1/chat/completions", r.url_b))
            .json(&chat(&name, &text, true))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{transport}");
        let body = response.text().await.unwrap();
        assert!(body.contains("data: [DONE]"), "{body}");
        assert_eq!(sse_text(&body), text, "{body}");
        drop(publisher);
    }
}

/// An OpenAI-compatible upstream on 127.0.0.1:0 whose every answer is a stream of
/// one word every 100 ms for a minute: a stream long enough to kill a replica in.
async fn slow_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The request: its head, then the body its content-length says.
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    read.extend_from_slice(&buf[..n]);
                    if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let head = String::from_utf8_lossy(&read[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while read.len() < head_end + length {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            connection: close\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..600 {
                    let chunk = json!({"choices": [{"index": 0, "delta": {"content": "word "}}]});
                    let event = format!("data: {chunk}\n\n");
                    if socket.write_all(event.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = socket.write_all(b"data: [DONE]\n\n").await;
            });
        }
    });
    addr
}

/// SIGKILL of the replica holding the publisher's channel, mid-stream, the client on
/// the other replica. A publisher that resumes (the default, SPEC §15) moves to B and
/// replays its task there: the client's stream goes on. One started with
/// `--no-resume` gets the version 1 rule: the stream ends with an error event. Either
/// way never a hang, and the publisher serves again through B.
async fn killing_the_replica_holding_the_channel(resume: bool) {
    let Some(mut r) = replicas().await else {
        return;
    };
    let upstream = slow_upstream().await;
    let config = r.dir.0.join("providers.json");
    std::fs::write(
        &config,
        json!([{"name": "slow", "model": "m", "url": format!("http://{upstream}/v1"),
                "publish": true}])
        .to_string(),
    )
    .unwrap();
    let gateways = format!("{},{}", r.url_a, r.url_b);
    let mut flags = vec!["--echo", "quick", "--config", config.to_str().unwrap()];
    if !resume {
        flags.push("--no-resume");
    }
    let publisher = PublisherProcess::start(&gateways, "sse", &r.dir.0.join("session"), &flags);
    poll_until("the publisher serves through gateway A", CAP, || async {
        publisher.lines_with("connected; serving requests").len() == 1
    })
    .await;
    active_on(&r.url_b, "slow").await;

    let http = reqwest::Client::new();
    let mut response = http
        .post(format!("{}/v1/chat/completions", r.url_b))
        .json(&chat("slow", "go", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = String::new();
    while sse_text(&body).split_whitespace().count() < 3 {
        let chunk = tokio::time::timeout(CAP, response.chunk())
            .await
            .expect("the stream flows")
            .unwrap()
            .expect("the stream goes on");
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    r.a.take().unwrap().sigkill();
    if resume {
        // The publisher moves to B and resumes: more words come, and no error.
        let before = sse_text(&body).split_whitespace().count();
        while sse_text(&body).split_whitespace().count() < before + 3 {
            let chunk = tokio::time::timeout(CAP, response.chunk())
                .await
                .expect("the stream goes on after the move")
                .unwrap()
                .expect("the stream goes on after the move");
            body.push_str(&String::from_utf8_lossy(&chunk));
            assert!(!body.contains("event: error"), "{body}");
        }
    } else {
        // B hears that A is gone (its probe finds no responders) and fails the task:
        // the stream ends with an error event, long before the upstream's minute is up.
        let rest = tokio::time::timeout(CAP, async {
            while let Some(chunk) = response.chunk().await.unwrap_or(None) {
                body.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await;
        assert!(rest.is_ok(), "the client's stream ended: {body}");
        assert!(!body.contains("data: [DONE]"), "{body}");
        assert!(body.contains("event: error"), "{body}");
    }

    poll_until(
        "the publisher serves again, through gateway B",
        CAP,
        || async { publisher.lines_with("connected; serving requests").len() >= 2 },
    )
    .await;
    poll_until("a request to B is answered again", CAP, || async {
        let response = http
            .post(format!("{}/v1/chat/completions", r.url_b))
            .json(&chat("quick", "again", false))
            .send()
            .await
            .unwrap();
        response.status() == 200
            && response.json::<Value>().await.unwrap()["choices"][0]["message"]["content"]
                == "again"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_holding_the_channel_moves_the_publisher_and_its_stream_resumes() {
    killing_the_replica_holding_the_channel(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_holding_the_channel_fails_a_non_resuming_stream_and_the_publisher_moves()
 {
    killing_the_replica_holding_the_channel(false).await;
}

/// What a client of the load below saw of one request.
#[derive(Debug)]
enum Seen {
    Answered,
    /// Its connection was cut after it was sent: it was in flight on a replica that
    /// was killed.
    Cut,
    /// Anything else: a request lost.
    Lost(String),
}

/// One request as a client behind a load balancer makes it: a replica that refuses
/// the connection is passed over for the other; a 503 that says when to retry is
/// retried then (at most 200 ms later), for at most 20 s in all.
async fn through_the_balancer(http: &reqwest::Client, urls: [&str; 2], n: usize) -> Seen {
    let text = format!("request {n}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut turn = n;
    loop {
        if tokio::time::Instant::now() > deadline {
            return Seen::Lost(format!("{text}: not answered within 20 s"));
        }
        let url = urls[turn % 2];
        turn += 1;
        let sent = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("roll", &text, false))
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Seen::Lost(format!("{text}: no answer from {url} within 20 s"));
            }
            Err(e) if e.is_connect() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => return Seen::Cut,
        };
        let status = response.status().as_u16();
        let retry = response.headers().contains_key("retry-after");
        let Ok(body) = response.text().await else {
            return Seen::Cut;
        };
        match status {
            200 => {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
                return Seen::Answered;
            }
            503 if retry => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => return Seen::Lost(format!("{text}: {status} {body}")),
        }
    }
}

/// A rolling restart of every replica under a steady load: two publishers of the pool
/// `roll`, each given both gateways (one A first, one B first), and four clients
/// calling both replicas through a load balancer's rules. Each replica in turn is
/// killed (SIGKILL), started again on its address, and waited for; then the next.
/// No request is lost but those in flight on a replica as it was killed, and after
/// the rollout both replicas answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_replica_loses_only_the_requests_in_flight_on_the_one_killed() {
    let Some(db) = pg::fresh_database().await else {
        return;
    };
    let Some(nats) = available(NatsServer::start()) else {
        return;
    };
    let dir = temp_dir();
    let addrs = [free_addr(), free_addr()];
    let urls = addrs.map(|a| format!("http://{a}"));
    let nats_url = nats.url();
    let start = |i: usize| {
        let replica = ["gw-a", "gw-b"][i];
        let flags = [
            "--store",
            db.as_str(),
            "--nats",
            nats_url.as_str(),
            "--replica-id",
            replica,
            "--heartbeat-every",
            "1s",
        ];
        GatewayProcess::start_env(addrs[i], &dir.0.join(replica), &flags, &[])
    };
    let mut gateways = [Some(start(0)), Some(start(1))];
    for url in &urls {
        binary::ready(url).await;
    }
    let a_first = format!("{},{}", urls[0], urls[1]);
    let b_first = format!("{},{}", urls[1], urls[0]);
    let _p1 = PublisherProcess::start(&a_first, "sse", &dir.0.join("p1"), &["--echo", "r1@roll"]);
    let _p2 = PublisherProcess::start(&b_first, "ws", &dir.0.join("p2"), &["--echo", "r2@roll"]);
    for url in &urls {
        active_on(url, "r1").await;
        active_on(url, "r2").await;
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = reqwest::Client::new();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, http, urls) = (stop.clone(), http.clone(), urls.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut n = c * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seen.push(through_the_balancer(&http, [&urls[0], &urls[1]], n).await);
                    n += 1;
                }
                seen
            })
        })
        .collect();

    for i in 0..2 {
        // Some load on both replicas before each kill.
        tokio::time::sleep(Duration::from_millis(500)).await;
        gateways[i].take().unwrap().sigkill();
        gateways[i] = Some(start(i));
        binary::ready(&urls[i]).await;
        active_on(&urls[i], "r1").await;
        active_on(&urls[i], "r2").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(tokio::time::timeout(CAP, client).await.unwrap().unwrap());
    }
    let lost: Vec<&String> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Lost(why) => Some(why),
            _ => None,
        })
        .collect();
    let cut = seen.iter().filter(|s| matches!(s, Seen::Cut)).count();
    let ok = seen.iter().filter(|s| matches!(s, Seen::Answered)).count();
    assert!(lost.is_empty(), "lost requests: {lost:?}");
    // At most one request per client was in flight on each replica killed.
    assert!(cut <= 2 * 4, "{cut} requests cut, {ok} answered");
    assert!(ok > 0);
    for url in &urls {
        let response = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("roll", "after", false))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "{url} answers after the rollout: {body}");
    }
}
