//! A `PgStore` whose PostgreSQL goes away under it: while the server is down every
//! call fails with a clear `Unavailable` (never a conflict, never a hang), the change
//! feed tells its receivers to forget everything, and once the server is back the same
//! store reads, writes, heartbeats and reports changes again. A server crash keeps
//! every committed batch; connections killed under the store are replaced, and what
//! is safe to run again runs again.
//!
//! Each test starts a server of its own, since it stops it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::sql;
use tokio::sync::broadcast::error::TryRecvError;
use virtual_llm_core::testkit::{at, record};
use virtual_llm_core::{LlmName, Store, StoreError, Write};
use virtual_llm_postgres::testing::{PgServer, StopMode, available};
use virtual_llm_postgres::{PgOptions, PgStore};

fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

fn options() -> PgOptions {
    PgOptions::default().connect_timeout(Duration::from_secs(2))
}

/// Polls `f` until it returns true, for at most `secs` seconds (a bound, not a delay).
async fn eventually<F: AsyncFnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_fails_calls_clearly_then_the_store_recovers() {
    let Some(mut server) = available(PgServer::start()) else {
        return;
    };
    let url = server.create_database().await.unwrap();
    let store = PgStore::connect_with(&url, options()).await.unwrap();
    let row = store
        .write(vec![Write::Insert(record("before"))])
        .await
        .unwrap()
        .remove(0);
    let mut feed = store.changes().unwrap();
    while feed.try_recv().is_ok() {}

    server.stop(StopMode::Fast);
    let err = store.get(&row.name).await.expect_err("the server is down");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("reading a row"), "says what failed: {text}");
    let err = store
        .write(vec![Write::Insert(record("during"))])
        .await
        .expect_err("the server is down");
    assert!(
        matches!(err, StoreError::Unavailable { .. }),
        "not a conflict: {err:?}"
    );
    let err = store
        .touch(std::slice::from_ref(&row.name), at(5))
        .await
        .expect_err("the server is down");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    // The feed's receivers are told to forget everything.
    eventually(10, "the feed reports the loss", async || {
        matches!(feed.try_recv(), Err(TryRecvError::Lagged(_)))
    })
    .await;

    server.restart().unwrap();
    assert_eq!(store.get(&row.name).await.unwrap(), Some(row.clone()));
    assert_eq!(
        store.get(&name("during")).await.unwrap(),
        None,
        "the failed write wrote nothing"
    );
    store
        .write(vec![Write::Insert(record("after"))])
        .await
        .unwrap();
    assert_eq!(
        store
            .touch(std::slice::from_ref(&row.name), at(9))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .get(&row.name)
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat_at,
        Some(at(9))
    );
    // The feed listens again: a later write of another replica is reported.
    eventually(20, "the feed listens again", async || {
        store.stats().feed_resets >= 2
    })
    .await;
    let other = PgStore::connect(&url).await.unwrap();
    other
        .write(vec![Write::Insert(record("heard"))])
        .await
        .unwrap();
    eventually(10, "the write is heard", async || {
        loop {
            match feed.try_recv() {
                Ok(c) if c.name.as_str() == "heard" => return true,
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_keeps_every_committed_batch() {
    let Some(mut server) = available(PgServer::start()) else {
        return;
    };
    let url = server.create_database().await.unwrap();
    let store = PgStore::connect_with(&url, options()).await.unwrap();
    let mut written = Vec::new();
    for i in 0..50 {
        let mut r = record(&format!("row-{i}"));
        r.model = format!("model-{i}");
        written.extend(store.write(vec![Write::Insert(r)]).await.unwrap());
    }
    let mut updated = written[7].clone();
    updated.model = "changed".into();
    written[7] = store
        .write(vec![Write::Update(updated)])
        .await
        .unwrap()
        .remove(0);
    server.stop(StopMode::Immediate);
    server.restart().unwrap();
    written.sort_by(|a, b| a.name.cmp(&b.name));
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), written.len());
    for (got, want) in listed.iter().zip(&written) {
        assert_eq!(got, want, "row {} after the crash", want.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_under_the_store_are_replaced() {
    let Some(server) = available(PgServer::start()) else {
        return;
    };
    let url = server.create_database().await.unwrap();
    let store = PgStore::connect_with(&url, options()).await.unwrap();
    let row = store
        .write(vec![Write::Insert(record("row"))])
        .await
        .unwrap()
        .remove(0);
    store
        .touch(std::slice::from_ref(&row.name), at(1))
        .await
        .unwrap();
    let admin = sql(&server.url("postgres")).await;
    let kill = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        url.rsplit('/').next().unwrap().split('?').next().unwrap()
    );
    let killed: i64 = admin.query_one(&kill, &[]).await.unwrap().get(0);
    assert!(
        killed >= 3,
        "the pool's, the heartbeats' and the feed's: {killed}"
    );
    // Each call runs on a fresh connection, or again on one when its own turns out
    // to be gone: none of this reaches the caller. Killed again before every kind of
    // call, a few times over (whether the pool or the retry notices first is a race).
    for i in 0..5 {
        assert_eq!(store.get(&row.name).await.unwrap().unwrap().id, row.id);
        admin.query_one(&kill, &[]).await.unwrap();
        assert_eq!(
            store
                .touch(std::slice::from_ref(&row.name), at(2 + i))
                .await
                .unwrap(),
            1
        );
        admin.query_one(&kill, &[]).await.unwrap();
        let mut update = store.get(&row.name).await.unwrap().unwrap();
        admin.query_one(&kill, &[]).await.unwrap();
        update.model = format!("after-{i}");
        store.write(vec![Write::Update(update)]).await.unwrap();
        admin.query_one(&kill, &[]).await.unwrap();
    }
    let last = store.get(&row.name).await.unwrap().unwrap();
    assert_eq!((last.model.as_str(), last.revision), ("after-4", 6));
    assert_eq!(last.last_heartbeat_at, Some(at(6)));
    eventually(20, "the feed reconnects", async || {
        store.stats().feed_resets >= 2
    })
    .await;
}

/// A TCP proxy in front of PostgreSQL that, once armed, lets the next `COMMIT`
/// through to the server, waits for the server's answer, and then cuts the
/// connection without passing the answer on: the batch is committed, and the client
/// cannot know it.
struct CommitCutter {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CommitCutter {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let arming = armed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let armed = arming.clone();
                // Set once this connection sent the armed COMMIT.
                let cut = std::sync::Arc::new(tokio::sync::Notify::new());
                let committing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (cut_up, committing_up) = (cut.clone(), committing.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        if chunk.windows(6).any(|w| w == b"COMMIT")
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            committing_up.store(true, Ordering::SeqCst);
                        }
                        if server_tx.write_all(chunk).await.is_err() {
                            return;
                        }
                        if committing_up.load(Ordering::SeqCst) {
                            cut_up.notified().await;
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if committing.load(Ordering::SeqCst) {
                            // The server answered the COMMIT: it is done. Drop both
                            // sides without passing the answer on.
                            cut.notify_one();
                            return;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        CommitCutter { port, armed }
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_commit_is_an_unknown_outcome_not_a_retry() {
    let Some(server) = virtual_llm_postgres::testing::shared() else {
        return;
    };
    let url = server.create_database().await.unwrap();
    let proxy = CommitCutter::start(server.port()).await;
    let proxied = url.replace(
        &format!(":{}/", server.port()),
        &format!(":{}/", proxy.port),
    );
    let store = PgStore::connect_with(&proxied, options()).await.unwrap();
    proxy.arm();
    let err = store
        .write(vec![Write::Insert(record("maybe"))])
        .await
        .expect_err("the answer to COMMIT never arrives");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("may or may not have been written"), "{text}");
    assert_eq!(
        store.stats().retries,
        0,
        "a batch that may have committed is not run again"
    );
    // It did commit: running it again would have failed its own compare-and-set.
    let row = store.get(&name("maybe")).await.unwrap();
    assert_eq!(row.map(|r| r.revision), Some(1));
    let again = store.write(vec![Write::Insert(record("maybe"))]).await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
}
