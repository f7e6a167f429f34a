//! The reference gateway binary keeps its registry across restarts: after SIGKILL the
//! redb file reopens, no virtual row reads active until its publisher is back, and the
//! publisher comes back with its session to the same rows; after SIGTERM the gateway
//! tells publishers it is closing, flushes, and they reconnect on their own. Killed
//! under load (clients, registers and heartbeats in flight), its redb file passes the
//! integrity check, keeps every acknowledged register, and every publisher comes back
//! to its session.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use binary::{GatewayProcess, free_addr, ready, row, temp_dir};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use virtual_llm::protocol::LlmSpec;
use virtual_llm::publisher::{PublisherState, Wire};
use virtual_llm::redb::RedbStore;
use virtual_llm::{
    EchoProvider, LlmName, PublishedLlm, Publisher, PublisherOptions, SessionId, Store,
};

fn publisher(wire: Arc<dyn Wire>, session_file: &Path) -> Publisher {
    publisher_named(wire, session_file, "echo")
}

fn publisher_named(wire: Arc<dyn Wire>, session_file: &Path, name: &str) -> Publisher {
    let llm = PublishedLlm::new(
        LlmSpec {
            name: LlmName::parse(name).unwrap(),
            provider_type: "echo".into(),
            model: "echo".into(),
            tier: None,
            pool: None,
            max_concurrent: None,
            state: None,
            access: Default::default(),
        },
        Arc::new(EchoProvider::new()),
    );
    let options = PublisherOptions {
        session_file: Some(session_file.to_owned()),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
        ..PublisherOptions::default()
    };
    Publisher::spawn(wire, vec![llm], options)
}

async fn connected(p: &Publisher) -> SessionId {
    tokio::time::timeout(Duration::from_secs(10), p.connected())
        .await
        .expect("the publisher connects")
}

async fn answer(url: &str) -> String {
    let body = serde_json::json!({"model": "echo", "messages": [{"role": "user", "content": "still here"}]});
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn survives_sigkill(make_wire: fn(&str) -> Arc<dyn Wire>) {
    let dir = temp_dir();
    let (addr, data, session_file) = (free_addr(), dir.0.join("data"), dir.0.join("session"));
    let url = format!("http://{addr}");
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    let p = publisher(make_wire(&url), &session_file);
    let session = connected(&p).await;
    let before = row(&url, "echo").await;
    assert_eq!(before["status"], "active");

    gateway.sigkill();
    p.stop().await; // it cannot tell the dead gateway; the row stays "active" on disk
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    let after = row(&url, "echo").await;
    assert_eq!(after["id"], before["id"], "the row survived the SIGKILL");
    assert_eq!(
        after["status"], "inactive",
        "no virtual row reads active after a restart"
    );

    let p = publisher(make_wire(&url), &session_file);
    assert_eq!(
        connected(&p).await,
        session,
        "the publisher comes back with its session"
    );
    let revived = row(&url, "echo").await;
    assert_eq!(
        (&revived["id"], &revived["status"]),
        (&before["id"], &Value::from("active"))
    );
    assert_eq!(answer(&url).await, "still here");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for line in [
        "virtual_llm_publishers_connected 1",
        "virtual_llm_task_outcomes_total{code=\"ok\"} 1",
        "virtual_llm_rows{kind=\"virtual\",status=\"active\"} 1",
    ] {
        assert!(text.contains(line), "/metrics lacks {line}:\n{text}");
    }
    p.stop().await;
    drop(gateway);
}

async fn survives_sigterm(make_wire: fn(&str) -> Arc<dyn Wire>) {
    let dir = temp_dir();
    let (addr, data, session_file) = (free_addr(), dir.0.join("data"), dir.0.join("session"));
    let url = format!("http://{addr}");
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    let p = publisher(make_wire(&url), &session_file);
    let session = connected(&p).await;
    let id = row(&url, "echo").await["id"].clone();
    let mut state = p.state();

    gateway.sigterm();
    state
        .wait_for(|s| !matches!(s, PublisherState::Connected { .. }))
        .await
        .unwrap();
    let gateway = GatewayProcess::start(addr, &data);
    ready(&url).await;
    // The publisher was told the gateway was closing, and reconnects by itself.
    state
        .wait_for(|s| matches!(s, PublisherState::Connected { .. }))
        .await
        .unwrap();
    assert_eq!(connected(&p).await, session);
    let revived = row(&url, "echo").await;
    assert_eq!(
        (&revived["id"], &revived["status"]),
        (&id, &Value::from("active"))
    );
    assert_eq!(answer(&url).await, "still here");
    p.stop().await;
    drop(gateway);
}

/// What the load saw: answers, refusals (any other status, e.g. 503 while publishers
/// reconnect), broken connections (the kill), and requests that hung.
#[derive(Debug, Default)]
struct Tally {
    answered: usize,
    refused: usize,
    broken: usize,
    hung: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.answered += other.answered;
        self.refused += other.refused;
        self.broken += other.broken;
        self.hung += other.hung;
    }
}

/// One client's requests, in a loop until `stop`: streaming and not, to each publisher
/// in turn. Every answer must be the right echo, and is counted in `answers` as well,
/// shared by the clients so that the test can wait for them.
async fn client_load(
    url: String,
    names: Vec<String>,
    stop: watch::Receiver<bool>,
    answers: Arc<AtomicUsize>,
) -> Tally {
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut tally = Tally::default();
    for i in 0usize.. {
        if *stop.borrow() {
            break;
        }
        let (name, stream) = (&names[i % names.len()], i % 2 == 0);
        let text = format!("load {i} for {name}");
        let body = serde_json::json!({"model": name, "stream": stream, "messages": [{"role": "user", "content": text}]});
        let outcome = async {
            let response = http
                .post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        }
        .await;
        match outcome {
            Ok((status, bytes)) if status == 200 => {
                let body = String::from_utf8_lossy(&bytes);
                let done = body.lines().any(|l| data_of(l) == Some("[DONE]"));
                if stream && done {
                    assert_eq!(sse_text(&body), text, "{body}");
                    tally.answered += 1;
                    answers.fetch_add(1, Ordering::SeqCst);
                } else if stream {
                    // Cut off by the kill midway: an error event or a torn body.
                    tally.broken += 1;
                } else {
                    let body: Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(body["choices"][0]["message"]["content"], text);
                    tally.answered += 1;
                    answers.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(_) => tally.refused += 1,
            Err(e) if e.is_timeout() => tally.hung += 1,
            Err(_) => {
                tally.broken += 1;
                // The gateway is down; don't spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    tally
}

/// Waits until the clients have had `n` answers: a load measured in requests served,
/// not in milliseconds, which a busy machine would fill with fewer. At most 30 s (a
/// hang guard); then the caller's assertions on the tallies say what went wrong.
async fn until_answered(answers: &AtomicUsize, n: usize) {
    let waiting = async {
        while answers.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .is_err()
    {
        eprintln!(
            "only {} of {n} answers after 30 s",
            answers.load(Ordering::SeqCst)
        );
    }
}

/// The data of an event-stream `data:` line.
fn data_of(line: &str) -> Option<&str> {
    line.strip_prefix("data:").map(str::trim_start)
}

/// The delta contents of an OpenAI event stream, concatenated.
fn sse_text(body: &str) -> String {
    body.lines()
        .filter_map(data_of)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let chunk: Value = serde_json::from_str(d).ok()?;
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Registers in a loop until `stop`: a fresh session with two names, then the same
/// session without the second (one write that updates a row and detaches another).
/// Returns the names whose register was acknowledged.
async fn register_load(url: String, stop: watch::Receiver<bool>) -> Vec<String> {
    let http = reqwest::Client::new();
    let register = format!("{url}/api/v1/llms/_provider-register");
    let mut acked = Vec::new();
    for n in 0usize.. {
        if *stop.borrow() {
            break;
        }
        let (a, b) = (format!("churn-{n}-a"), format!("churn-{n}-b"));
        let llms = |names: &[&String]| -> Vec<Value> {
            names
                .iter()
                .map(|n| serde_json::json!({"name": n, "type": "openai", "model": "m"}))
                .collect()
        };
        let first = http
            .post(&register)
            .json(&serde_json::json!({"llms": llms(&[&a, &b])}))
            .send()
            .await;
        let Ok(first) = first else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Ok(answer) = first.json::<Value>().await else {
            continue;
        };
        let session = answer["providerSessionId"].clone();
        acked.push(b.clone());
        let again = http
            .post(&register)
            .json(&serde_json::json!({"providerSessionId": session, "llms": llms(&[&a])}))
            .send()
            .await;
        if again.is_ok_and(|r| r.status() == 200) {
            acked.push(a);
        }
    }
    acked
}

/// SIGKILL under load: clients streaming and not, registers writing rows, publishers
/// heartbeating every 100 ms. After the kill, the redb file opened in this process
/// passes the integrity check and holds every acknowledged register and every
/// publisher's row; restarted, the gateway gets every publisher back on its session,
/// and no client request ever hung.
async fn survives_sigkill_under_load(make_wire: fn(&str) -> Arc<dyn Wire>) {
    const PUBLISHERS: usize = 6;
    const CLIENTS: usize = 8;
    let dir = temp_dir();
    let (addr, data) = (free_addr(), dir.0.join("data"));
    let url = format!("http://{addr}");
    let args = ["--heartbeat-every", "100ms"];
    let gateway = GatewayProcess::start_env(addr, &data, &args, &[]);
    ready(&url).await;
    let names: Vec<String> = (0..PUBLISHERS).map(|i| format!("pub-{i}")).collect();
    let publishers: Vec<Publisher> = names
        .iter()
        .map(|n| publisher_named(make_wire(&url), &dir.0.join(n), n))
        .collect();
    let mut sessions = Vec::new();
    for p in &publishers {
        sessions.push(connected(p).await);
    }
    let mut ids = Vec::new();
    for n in &names {
        ids.push(row(&url, n).await["id"].clone());
    }

    let (stop, stopped) = watch::channel(false);
    let answers = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let load = client_load(url.clone(), names.clone(), stopped.clone(), answers.clone());
            tokio::spawn(load)
        })
        .collect();
    let registers = tokio::spawn(register_load(url.clone(), stopped.clone()));
    // Let the load run (a few answers a client), then kill the gateway in the middle of
    // it.
    let before_kill = Instant::now();
    until_answered(&answers, CLIENTS * 3).await;
    gateway.sigkill();
    let killed = Instant::now();
    eprintln!("killed after {:?} of load", killed - before_kill);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send_replace(true);
    let mut tally = Tally::default();
    for c in clients {
        tally.add(&c.await.unwrap());
    }
    let acked = registers.await.unwrap();
    eprintln!("load: {tally:?}; {} registers acknowledged", acked.len());
    assert_eq!(tally.hung, 0, "no request hung");
    assert!(tally.answered > 0, "the load was served before the kill");

    // The file, opened in this process now that the gateway is dead.
    let store = RedbStore::open(data.join("registry.redb")).await.unwrap();
    let report = store.check_integrity().await.unwrap();
    eprintln!(
        "integrity: {} rows, repaired: {}",
        report.rows, report.repaired
    );
    assert!(report.is_ok(), "{:?}", report.problems);
    for name in &acked {
        assert!(
            store
                .get(&LlmName::parse(name).unwrap())
                .await
                .unwrap()
                .is_some(),
            "the acknowledged register of {name} was lost"
        );
    }
    for (i, name) in names.iter().enumerate() {
        let r = store
            .get(&LlmName::parse(name).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(serde_json::to_value(&r.id).unwrap(), ids[i]);
        assert_eq!(r.provider_session_id.as_ref(), Some(&sessions[i]));
    }
    store.close().await.unwrap();

    let gateway = GatewayProcess::start_env(addr, &data, &args, &[]);
    ready(&url).await;
    if let Some(name) = acked.first() {
        assert_eq!(
            row(&url, name).await["status"],
            "inactive",
            "no virtual row reads active until its publisher is back"
        );
    }
    for (i, name) in names.iter().enumerate() {
        binary_eventually(&url, name).await;
        let r = row(&url, name).await;
        assert_eq!(r["id"], ids[i], "{name} kept its row");
        assert_eq!(
            connected(&publishers[i]).await,
            sessions[i],
            "{name} came back with its session"
        );
    }
    let (stop, stopped) = watch::channel(false);
    let answers = Arc::new(AtomicUsize::new(0));
    let client = tokio::spawn(client_load(
        url.clone(),
        names.clone(),
        stopped,
        answers.clone(),
    ));
    // A round of requests to every publisher, however long that takes.
    until_answered(&answers, 2 * names.len()).await;
    stop.send_replace(true);
    let after = client.await.unwrap();
    assert!(
        after.answered > 0 && after.refused + after.broken + after.hung == 0,
        "after the restart: {after:?}"
    );
    for p in publishers {
        p.stop().await;
    }
    drop(gateway);
}

/// Waits (at most 10 s) until `name` reads active.
async fn binary_eventually(url: &str, name: &str) {
    for _ in 0..1000 {
        if row(url, name).await["status"] == "active" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never came back");
}

fn sse(url: &str) -> Arc<dyn Wire> {
    Arc::new(virtual_llm::sse::SseWire::new(url, None).unwrap())
}

fn ws(url: &str) -> Arc<dyn Wire> {
    Arc::new(virtual_llm::ws::WsWire::new(url, None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_sigkill_over_sse() {
    survives_sigkill(sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_sigkill_over_ws() {
    survives_sigkill(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_come_back_after_a_sigterm_over_sse() {
    survives_sigterm(sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_come_back_after_a_sigterm_over_ws() {
    survives_sigterm(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_reopens_consistent_after_a_sigkill_under_load_over_sse() {
    survives_sigkill_under_load(sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_reopens_consistent_after_a_sigkill_under_load_over_ws() {
    survives_sigkill_under_load(ws).await;
}
