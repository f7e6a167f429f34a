//! Crash consistency: a child process (this test binary, re-run in child mode) hammers
//! register (moving rows between pools), heartbeat, bind, unbind, sweep and flush
//! through `Gateway` over a redb store; the parent kills it with SIGKILL at a random
//! moment, twenty times, some of them while it is still opening and recovering the
//! file. After every kill the file opens, every row decodes, every index agrees with
//! the rows, the queries agree with the indexes, and a gateway starts over it.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{name, publisher, request};
use redb::{Database, ReadableDatabase, TableDefinition};
use virtual_llm_core::testkit::{FakeChannel, ManualClock, at};
use virtual_llm_core::{
    Binding, Config, Error, Gateway, LlmStatus, SessionId, Store, StoreError, Timestamp,
};
use virtual_llm_redb::{RedbOptions, RedbStore};

/// The registry file a child works on; its presence selects child mode.
const CHILD_PATH: &str = "VIRTUAL_LLM_REDB_CRASH_CHILD";
/// Where the child's manual clock starts, in seconds.
const CHILD_START: &str = "VIRTUAL_LLM_REDB_CRASH_START";
/// What the child prints once it has written through the gateway.
const READY: &str = "CRASH-CHILD-READY";
const ROUNDS: u64 = 20;

#[test]
#[ignore = "the child process of sigkill_twenty_times_leaves_a_consistent_file, run by it"]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_PATH) else {
        return;
    };
    let start: u64 = std::env::var(CHILD_START).unwrap().parse().unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(hammer(PathBuf::from(path), start));
}

/// Runs until killed.
async fn hammer(path: PathBuf, start: u64) {
    // A short flush interval, so kills land in heartbeat flushes too.
    let options = RedbOptions::default().flush_every(Duration::from_millis(3));
    let store = Arc::new(RedbStore::open_with(&path, options).await.unwrap());
    let clock = ManualClock::new(at(start));
    let config = Config {
        reap_after: Duration::from_secs(900),
        ..Config::default()
    };
    let gw = Gateway::builder(store)
        .clock(Arc::new(clock.clone()))
        .config(config)
        .start()
        .await
        .unwrap();
    let boot = format!("boot-{start}");
    gw.register(&publisher("p0"), request(None, &[boot.as_str()]))
        .await
        .unwrap();
    println!("{READY}");
    let workers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(worker(gw.clone(), clock.clone())))
        .collect();
    for w in workers {
        w.await.unwrap();
    }
}

/// One publisher-ish stream of random lifecycle calls.
async fn worker(gw: Gateway, clock: ManualClock) {
    const NAMES: [&str; 12] = [
        "m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "m9", "m10", "m11",
    ];
    let principals = [publisher("p0"), publisher("p1"), publisher("p2")];
    let mut sessions: Vec<(usize, SessionId)> = Vec::new();
    let mut bindings: Vec<Binding> = Vec::new();
    loop {
        let pick = |n: usize| rand::random_range(0..n);
        match pick(100) {
            0..30 => {
                let who = pick(principals.len());
                let known: Vec<&SessionId> = sessions
                    .iter()
                    .filter(|(p, _)| *p == who)
                    .map(|(_, s)| s)
                    .collect();
                let session =
                    (!known.is_empty() && pick(3) > 0).then(|| known[pick(known.len())].clone());
                let count = 1 + pick(3);
                let first = pick(NAMES.len());
                let names: Vec<&str> = (0..count)
                    .map(|i| NAMES[(first + i * 5) % NAMES.len()])
                    .collect();
                let mut req = request(session.as_ref(), &names);
                // A re-registration may move a row into a pool, to another, or out.
                for spec in &mut req.llms {
                    spec.pool = [None, Some("pool-a"), Some("pool-b")][pick(3)].map(name);
                }
                match gw.register(&principals[who], req).await {
                    Ok(r) => {
                        if session.as_ref() != Some(&r.provider_session_id) {
                            sessions.push((who, r.provider_session_id));
                        }
                    }
                    Err(e) => expected(&e),
                }
            }
            30..55 if !sessions.is_empty() => {
                let (who, s) = &sessions[pick(sessions.len())];
                if let Err(e) = gw.heartbeat(&principals[*who], s).await {
                    expected(&e);
                }
            }
            55..65 if !sessions.is_empty() => {
                let (who, s) = &sessions[pick(sessions.len())];
                match gw
                    .bind(&principals[*who], s, Arc::new(FakeChannel::new()))
                    .await
                {
                    Ok(b) => bindings.push(b),
                    Err(e) => expected(&e),
                }
            }
            65..75 if !bindings.is_empty() => {
                let b = bindings.swap_remove(pick(bindings.len()));
                if let Err(e) = b.release().await {
                    expected(&e);
                }
            }
            75..85 => {
                gw.sweep().await.unwrap();
            }
            85..90 => gw.flush().await.unwrap(),
            _ => clock.advance(Duration::from_secs(1 + rand::random_range(0..200))),
        }
    }
}

/// The refusals a racing publisher may get; anything else is a bug.
fn expected(e: &Error) {
    assert!(
        matches!(
            e,
            Error::Conflict { .. }
                | Error::UnknownSession
                | Error::Store(StoreError::Conflict { .. })
        ),
        "unexpected error in the crash child: {e:?}"
    );
}

fn last_stamp(path: &Path) -> u64 {
    const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
    let db = Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    meta.get("last_stamp").unwrap().unwrap().value()
}

/// Everything that must hold of a file after a crash.
async fn verify(path: &Path, round: u64) -> usize {
    let store = Arc::new(RedbStore::open(path).await.unwrap());
    let report = store.check_integrity().await.unwrap();
    assert!(report.is_ok(), "round {round}: {report:#?}");
    // Every row decodes, and the queries agree with what the rows say.
    let rows = store.list().await.unwrap();
    assert_eq!(rows.len(), report.rows);
    let live: Vec<_> = rows.iter().filter(|r| r.live_since().is_some()).collect();
    let inactive: Vec<_> = rows.iter().filter(|r| r.inactive_key().is_some()).collect();
    assert_eq!(
        store.stale_virtuals(Timestamp::MAX).await.unwrap().len(),
        live.len()
    );
    assert_eq!(
        store.expired_inactives(Timestamp::MAX).await.unwrap().len(),
        inactive.len()
    );
    for r in &rows {
        if let Some(s) = &r.provider_session_id {
            let bound = store.by_session(s).await.unwrap();
            assert!(
                bound.iter().any(|b| b == r),
                "round {round}: {} missing from its session",
                r.name
            );
            assert!(
                bound
                    .iter()
                    .all(|b| b.provider_session_id.as_ref() == Some(s))
            );
        }
        if let Some(binding) = &r.binding {
            let bound = store.bound_to(&binding.replica).await.unwrap();
            assert!(
                bound.iter().any(|b| b == r),
                "round {round}: {} missing from its replica",
                r.name
            );
        }
        let pool = store.by_pool(r.pool_key()).await.unwrap();
        assert!(
            pool.iter().any(|p| p == r),
            "round {round}: {} missing from its pool",
            r.name
        );
        assert!(pool.iter().all(|p| p.pool_key() == r.pool_key()));
    }
    // A gateway starts over the file, and no virtual row reads active before a bind.
    let gw = Gateway::builder(store.clone()).start().await.unwrap();
    assert!(
        store
            .list()
            .await
            .unwrap()
            .iter()
            .all(|r| r.kind != virtual_llm_core::LlmKind::Virtual || r.status != LlmStatus::Active),
        "round {round}: an active virtual row after restart"
    );
    drop(gw);
    store.close().await.unwrap();
    rows.len()
}

#[test]
fn sigkill_twenty_times_leaves_a_consistent_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut stamp = 0;
    let mut rows_seen = 0;
    for round in 0..ROUNDS {
        // Every fifth kill lands while the child opens (and repairs) the file.
        let early = round % 5 == 4;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_PATH, &path)
            .env(CHILD_START, (1_000_000 * (round + 1)).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        if !early {
            let stdout = child.stdout.take().unwrap();
            let ready = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line.contains(READY));
            assert!(
                ready,
                "round {round}: the child ended before it was ready: {:?}",
                child.wait()
            );
        }
        // The kill point: a random moment of real work (not a timeout being waited for).
        std::thread::sleep(Duration::from_millis(rand::random_range(if early {
            0..15
        } else {
            20..300
        })));
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the child stopped by itself: {:?}",
            child.wait()
        );
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: {status:?}");

        let rows = rt.block_on(verify(&path, round));
        rows_seen += rows;
        let now = last_stamp(&path);
        eprintln!("round {round}: killed {status:?}; {rows} rows, last write stamp {now}");
        if !early {
            assert!(
                now > stamp,
                "round {round}: the child wrote nothing ({now} <= {stamp})"
            );
        }
        stamp = now;
    }
    assert!(rows_seen > 0, "the children left rows to check");
}
