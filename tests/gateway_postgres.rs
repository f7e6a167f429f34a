//! The reference gateway on PostgreSQL (`--store postgres://…`): two gateway processes
//! given the same database share one registry, so a publisher connected to one is
//! listed, active, by the other, with its heartbeats; the row's binding names the
//! replica holding its channel (`--replica-id`); a `--store` that is not a PostgreSQL
//! URL is refused. Skipped, loudly, where PostgreSQL is not installed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod binary;

use std::process::{Command, Stdio};
use std::time::Duration;

use binary::{
    GatewayProcess, PublisherProcess, free_addr, gateway_binary, poll_until, temp_dir, try_row,
};
use virtual_llm::postgres::testing;

const CAP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_database_share_the_registry() {
    let Some(db) = testing::fresh_database().await else {
        return;
    };
    let dir = temp_dir();
    let (a, b) = (free_addr(), free_addr());
    let (url_a, url_b) = (format!("http://{a}"), format!("http://{b}"));
    let flags = |replica: &'static str| {
        [
            "--store",
            db.as_str(),
            "--replica-id",
            replica,
            "--heartbeat-every",
            "1s",
        ]
    };
    let _gw_a = GatewayProcess::start_env(a, &dir.0.join("a"), &flags("gw-a"), &[]);
    let _gw_b = GatewayProcess::start_env(b, &dir.0.join("b"), &flags("gw-b"), &[]);
    binary::ready(&url_a).await;
    binary::ready(&url_b).await;
    assert!(
        !dir.0.join("a").join("registry.redb").exists(),
        "no redb file with --store"
    );

    let session_file = dir.0.join("publisher-session");
    let publisher = PublisherProcess::start(&url_a, "sse", &session_file, &["--echo", "shared"]);
    poll_until("the publisher serves through gateway A", CAP, || async {
        !publisher
            .lines_with("connected; serving requests")
            .is_empty()
    })
    .await;
    // Gateway B never spoke to the publisher: it reads the row from the database.
    poll_until("gateway B lists the row as active", CAP, || async {
        try_row(&url_b, "shared")
            .await
            .is_some_and(|r| r["status"] == "active")
    })
    .await;
    let first = try_row(&url_b, "shared").await.unwrap()["lastHeartbeatAt"].clone();
    poll_until("gateway B sees the heartbeats A records", CAP, || async {
        try_row(&url_b, "shared").await.unwrap()["lastHeartbeatAt"] != first
    })
    .await;
    // The binding names the replica that holds the channel.
    let client = virtual_llm::postgres::PgStore::connect(&db).await.unwrap();
    let row = virtual_llm::Store::get(&client, &virtual_llm::LlmName::parse("shared").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.binding
            .map(|b| b.replica.as_str().to_owned())
            .as_deref(),
        Some("gw-a")
    );
}

#[test]
fn a_store_that_is_not_postgres_is_refused() {
    let dir = temp_dir();
    let output = Command::new(gateway_binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir.0)
        .args(["--store", "mysql://db/registry"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--store takes a PostgreSQL URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("db/registry"), "{stderr}");
}
