//! The seams proven: two gateways in one process over one `MemoryStore`, linked by the
//! test kit's in-memory channel directory and task router, pass the replica plane
//! suite (the publisher bound to the first, clients on the second), and both seams
//! pass their conformance suites. The `LocalDirectory` passes the single-replica
//! directory suite, and the `PoolRouter` the router suite.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use virtual_llm_core::testkit::MemoryCluster;
use virtual_llm_core::{ChannelDirectory, Gateway, LocalDirectory, MemoryStore, ReplicaId, Store};

fn id(s: &str) -> ReplicaId {
    ReplicaId::parse(s).unwrap()
}

async fn two_replicas() -> (Gateway, Gateway) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cluster = MemoryCluster::new();
    let a = cluster
        .join(Gateway::builder(store.clone()), id("gw-a"))
        .await
        .unwrap();
    let b = cluster
        .join(Gateway::builder(store), id("gw-b"))
        .await
        .unwrap();
    (a, b)
}

virtual_llm_core::plane_conformance_tests!(two_replicas);

mod local_directory {
    use super::*;

    async fn local() -> Arc<dyn ChannelDirectory> {
        Arc::new(LocalDirectory::new(id("local")))
    }

    virtual_llm_core::directory_conformance_tests!(local);
}

mod memory_cluster_directory {
    use super::*;

    async fn pair() -> (Arc<dyn ChannelDirectory>, Arc<dyn ChannelDirectory>) {
        let cluster = MemoryCluster::new();
        (cluster.directory(id("a")), cluster.directory(id("b")))
    }

    virtual_llm_core::cluster_directory_conformance_tests!(pair);
}

mod lifecycle_across_replicas {
    use super::*;
    use std::time::Duration;

    use virtual_llm_core::protocol::{LlmSpec, RegisterRequest};
    use virtual_llm_core::testkit::{FakeChannel, ManualClock, at, record};
    use virtual_llm_core::{
        ChannelBinding, Config, LlmName, LlmStatus, Principal, Role, Timestamp, Write,
    };

    fn alice() -> Principal {
        Principal::new("alice", [Role::Publisher])
    }

    fn name(s: &str) -> LlmName {
        LlmName::parse(s).unwrap()
    }

    /// A replica that starts demotes the rows bound to itself (its channels died with
    /// its last run) and live rows bound to nobody (written before bindings existed),
    /// and leaves the rows another replica holds as they are.
    #[tokio::test]
    async fn a_starting_replica_demotes_only_its_own_rows() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let bound = |n: &str, replica: &str| {
            let mut r = record(n);
            r.binding = Some(ChannelBinding {
                replica: id(replica),
                epoch: 3,
            });
            r
        };
        store
            .write(vec![
                Write::Insert(bound("mine", "gw-a")),
                Write::Insert(bound("theirs", "gw-b")),
                Write::Insert(record("unbound")),
            ])
            .await
            .unwrap();
        let clock = ManualClock::new(at(1_000));
        Gateway::builder(store.clone())
            .clock(Arc::new(clock))
            .replica(id("gw-a"))
            .start()
            .await
            .unwrap();
        let row = |n: &'static str| {
            let store = store.clone();
            async move { store.get(&name(n)).await.unwrap().unwrap() }
        };
        let mine = row("mine").await;
        assert_eq!(mine.status, LlmStatus::Inactive);
        assert_eq!(mine.binding, None);
        assert_eq!(mine.inactive_since, Some(at(1_000)));
        let theirs = row("theirs").await;
        assert_eq!(theirs.status, LlmStatus::Active, "another replica's row");
        assert_eq!(theirs.binding.unwrap().replica, id("gw-b"));
        assert_eq!(row("unbound").await.status, LlmStatus::Inactive);
    }

    /// A heartbeat reaching a replica that does not hold the channel still revives the
    /// session's rows the GC took out of service: the row says the channel is bound.
    #[tokio::test]
    async fn a_heartbeat_on_another_replica_revives_from_the_row() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock = ManualClock::new(at(1_000));
        let cluster = MemoryCluster::new();
        let config = Config::default();
        let builder = |store: &Arc<dyn Store>| {
            Gateway::builder(store.clone())
                .clock(Arc::new(clock.clone()))
                .config(config.clone())
        };
        let a = cluster.join(builder(&store), id("gw-a")).await.unwrap();
        let b = cluster.join(builder(&store), id("gw-b")).await.unwrap();
        let answer = a
            .register(
                &alice(),
                RegisterRequest {
                    agents: Vec::new(),
                    provider_session_id: None,
                    protocol_version: None,
                    llms: vec![LlmSpec {
                        name: name("llm"),
                        provider_type: "openai".into(),
                        model: "m".into(),
                        tier: None,
                        pool: None,
                        max_concurrent: None,
                        state: None,
                        access: Default::default(),
                    }],
                    capabilities: Vec::new(),
                },
            )
            .await
            .unwrap();
        let session = answer.provider_session_id;
        let _binding = a
            .bind(&alice(), &session, Arc::new(FakeChannel::new()))
            .await
            .unwrap();
        clock.advance(config.stale_after + Duration::from_secs(1));
        assert_eq!(b.sweep().await.unwrap().marked_inactive, 1);
        let stale = store.get(&name("llm")).await.unwrap().unwrap();
        assert_eq!(stale.status, LlmStatus::Inactive);
        assert!(stale.binding.is_some(), "the GC keeps the binding");
        assert_eq!(b.local_channels(), 0, "b holds no channel");
        b.heartbeat(&alice(), &session).await.unwrap();
        let revived = store.get(&name("llm")).await.unwrap().unwrap();
        assert_eq!(revived.status, LlmStatus::Active);
        assert_eq!(revived.last_heartbeat_at, Some(clock_now(&clock)));
    }

    /// Two replicas on one `MemoryStore`, linked by a memory cluster.
    async fn pair() -> (MemoryCluster, Gateway, Gateway) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cluster = MemoryCluster::new();
        let a = cluster
            .join(Gateway::builder(store.clone()), id("gw-a"))
            .await
            .unwrap();
        let b = cluster
            .join(Gateway::builder(store), id("gw-b"))
            .await
            .unwrap();
        (cluster, a, b)
    }

    /// Registers alice's `llm` on `on`, speaking protocol 2.
    async fn register_v2(on: &Gateway) -> virtual_llm_core::SessionId {
        register_declaring(on, Vec::new()).await
    }

    /// Registers alice's `llm` on `on`, speaking protocol 2 with `capabilities`.
    async fn register_declaring(
        on: &Gateway,
        capabilities: Vec<String>,
    ) -> virtual_llm_core::SessionId {
        use virtual_llm_core::protocol::PROTOCOL_VERSION;
        on.register(
            &alice(),
            RegisterRequest {
                agents: Vec::new(),
                provider_session_id: None,
                protocol_version: Some(PROTOCOL_VERSION),
                llms: vec![LlmSpec {
                    name: name("llm"),
                    provider_type: "openai".into(),
                    model: "m".into(),
                    tier: None,
                    pool: None,
                    max_concurrent: None,
                    state: None,
                    access: Default::default(),
                }],
                capabilities,
            },
        )
        .await
        .unwrap()
        .provider_session_id
    }

    fn streamed() -> virtual_llm_core::InferRequest {
        virtual_llm_core::InferRequest::from_chat_body(serde_json::json!({
            "model": "llm",
            "stream": true,
            "messages": [{"role": "user", "content": "x"}],
        }))
        .unwrap()
    }

    /// The replica holding a channel dies, and the publisher binds its session again
    /// on another replica: nobody announces that the old channel closed, so the tasks
    /// sent through it wait the resume window for a sign of life. One its publisher
    /// resumes and one it posts a result for go on; one it never got (its frame died
    /// with the replica) fails with 503 when the window ends, not at its deadline.
    #[tokio::test(start_paused = true)]
    async fn tasks_sent_through_a_channel_lost_unannounced_wait_the_window_then_fail() {
        use virtual_llm_core::TaskEvent;
        use virtual_llm_core::protocol::TaskResult;

        let (_cluster, a, b) = pair().await;
        let session = register_v2(&a).await;
        let old = FakeChannel::new();
        let _old = a
            .bind(&alice(), &session, Arc::new(old.clone()))
            .await
            .unwrap();
        let client = Principal::new("client", [Role::Client]);
        let rows = b.route(&client, "llm").await.unwrap();
        let start = || {
            let handle = b.start_task(&client, &rows.rows[0], streamed()).unwrap();
            (handle.id().clone(), handle)
        };
        let (_, mut never) = start();
        let (resumed, mut resumed_handle) = start();
        let (posting, mut posting_handle) = start();
        for _ in 0..3 {
            old.next_task().await;
        }

        // The publisher is back, on b.
        let window = Config::default().resume_window;
        let new = FakeChannel::new();
        let _new = b.bind(&alice(), &session, Arc::new(new)).await.unwrap();
        b.deliver(
            &alice(),
            &session,
            &resumed,
            TaskResult::Resume { from_seq: 0 },
        )
        .await
        .unwrap();
        let chunk = |seq, done| TaskResult::Chunk {
            data: format!("c{seq}"),
            done,
            seq: Some(seq),
        };
        b.deliver(&alice(), &session, &posting, chunk(0, false))
            .await
            .unwrap();
        assert_eq!(
            posting_handle.next().await.unwrap().unwrap(),
            TaskEvent::Chunk("c0".into())
        );

        tokio::time::sleep(window + Duration::from_secs(1)).await;
        let failed = never.next().await.unwrap().unwrap_err();
        assert_eq!(failed.status(), 503, "{failed}");
        for (task, handle, seq) in [
            (&resumed, &mut resumed_handle, 0),
            (&posting, &mut posting_handle, 1),
        ] {
            b.deliver(&alice(), &session, task, chunk(seq, true))
                .await
                .unwrap();
            assert_eq!(
                handle.next().await.unwrap().unwrap(),
                TaskEvent::Chunk(format!("c{seq}"))
            );
            assert_eq!(handle.next().await.unwrap().unwrap(), TaskEvent::Done);
        }
        assert_eq!(b.in_flight(), 0);
    }

    /// A resuming session's channel closes on the replica holding it, and the
    /// publisher binds again within the window but resumes only one of the two tasks
    /// that clients on the other replica wait on (it lost the other, e.g. it
    /// restarted): the task it resumes goes on, and the other fails with 503 when the
    /// window ends, not at its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_task_on_another_replica_that_is_not_resumed_fails_when_the_window_ends() {
        use virtual_llm_core::TaskEvent;
        use virtual_llm_core::protocol::{RESUME, TaskResult};

        let (_cluster, a, b) = pair().await;
        let session = register_declaring(&a, vec![RESUME.to_owned()]).await;
        let old = FakeChannel::new();
        let binding = a
            .bind(&alice(), &session, Arc::new(old.clone()))
            .await
            .unwrap();
        let client = Principal::new("client", [Role::Client]);
        let rows = b.route(&client, "llm").await.unwrap();
        let mut lost = b.start_task(&client, &rows.rows[0], streamed()).unwrap();
        let mut kept = b.start_task(&client, &rows.rows[0], streamed()).unwrap();
        let kept_id = kept.id().clone();
        for _ in 0..2 {
            old.next_task().await;
        }
        let started = tokio::time::Instant::now();
        assert!(binding.release().await.unwrap(), "it was current");

        // Back at once, on a; only one task is resumed, and it goes on.
        let _new = a
            .bind(&alice(), &session, Arc::new(FakeChannel::new()))
            .await
            .unwrap();
        a.deliver(
            &alice(),
            &session,
            &kept_id,
            TaskResult::Resume { from_seq: 0 },
        )
        .await
        .unwrap();
        let window = Config::default().resume_window;
        let failed = lost.next().await.unwrap().unwrap_err();
        assert_eq!(failed.status(), 503, "{failed}");
        assert!(
            started.elapsed() <= window + Duration::from_secs(1),
            "failed when the window ended, not at the deadline: {:?}",
            started.elapsed()
        );
        a.deliver(
            &alice(),
            &session,
            &kept_id,
            TaskResult::Chunk {
                data: "c0".into(),
                done: true,
                seq: Some(0),
            },
        )
        .await
        .expect("the resumed task outlived the window");
        assert_eq!(
            kept.next().await.unwrap().unwrap(),
            TaskEvent::Chunk("c0".into())
        );
        assert_eq!(kept.next().await.unwrap().unwrap(), TaskEvent::Done);
        assert_eq!(b.in_flight(), 0);
    }

    /// A stream's chunks posted together on the replica holding the channel cross to
    /// the task's replica in one hop, and the client gets each once, in order.
    #[tokio::test]
    async fn results_posted_together_cross_in_one_hop() {
        use virtual_llm_core::TaskEvent;
        use virtual_llm_core::protocol::TaskResult;

        let (cluster, a, b) = pair().await;
        let session = register_v2(&a).await;
        let channel = FakeChannel::new();
        let _binding = a
            .bind(&alice(), &session, Arc::new(channel.clone()))
            .await
            .unwrap();
        let client = Principal::new("client", [Role::Client]);
        let rows = b.route(&client, "llm").await.unwrap();
        let mut handle = b.start_task(&client, &rows.rows[0], streamed()).unwrap();
        let task = channel.next_task().await.task_id;
        let results: Vec<TaskResult> = (0..8)
            .map(|seq| TaskResult::Chunk {
                data: format!("c{seq}"),
                done: seq == 7,
                seq: Some(seq),
            })
            .collect();
        let before = cluster.deliveries();
        a.deliver_all(&alice(), &session, &task, results)
            .await
            .unwrap();
        assert_eq!(cluster.deliveries() - before, 1, "eight results, one hop");
        let mut seen = Vec::new();
        while let Some(event) = handle.next().await {
            seen.push(event.unwrap());
        }
        let expected: Vec<TaskEvent> = (0..8)
            .map(|i| TaskEvent::Chunk(format!("c{i}")))
            .chain([TaskEvent::Done])
            .collect();
        assert_eq!(seen, expected);
    }

    /// Two replicas sharing a store, a ManualClock and the in-memory plane; alice's
    /// `llm` registered and bound on `a`, and `theirs` bound on `b`.
    async fn leased() -> (
        Arc<dyn Store>,
        ManualClock,
        Gateway,
        Gateway,
        (virtual_llm_core::Binding, FakeChannel),
    ) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let clock = ManualClock::new(at(1_000));
        let cluster = MemoryCluster::new();
        let builder =
            |store: &Arc<dyn Store>| Gateway::builder(store.clone()).clock(Arc::new(clock.clone()));
        let a = cluster.join(builder(&store), id("gw-a")).await.unwrap();
        let b = cluster.join(builder(&store), id("gw-b")).await.unwrap();
        let mut theirs = record("theirs");
        theirs.binding = Some(ChannelBinding {
            replica: id("gw-b"),
            epoch: 1,
        });
        store.write(vec![Write::Insert(theirs)]).await.unwrap();
        let answer = a
            .register(
                &alice(),
                RegisterRequest {
                    agents: Vec::new(),
                    provider_session_id: None,
                    protocol_version: None,
                    llms: vec![LlmSpec {
                        name: name("llm"),
                        provider_type: "openai".into(),
                        model: "m".into(),
                        tier: None,
                        pool: None,
                        max_concurrent: None,
                        state: None,
                        access: Default::default(),
                    }],
                    capabilities: Vec::new(),
                },
            )
            .await
            .unwrap();
        let channel = FakeChannel::new();
        let binding = a
            .bind(
                &alice(),
                &answer.provider_session_id,
                Arc::new(channel.clone()),
            )
            .await
            .unwrap();
        for gw in [&a, &b] {
            let report = gw.lease_tick(false).await.unwrap();
            assert_eq!(report.renewal, virtual_llm_core::LeaseRenewal::Started);
        }
        (store, clock, a, b, (binding, channel))
    }

    /// SPEC §14: when a replica stops renewing its lease (it died), a live replica's
    /// lease tick takes the rows whose channels it held out of service once the lease
    /// and the skew margin have passed — not before, and long before the heartbeat
    /// timeout — and leaves its own rows alone. A second tick finds nothing to end.
    #[tokio::test]
    async fn a_dead_replicas_rows_go_inactive_when_its_lease_runs_out() {
        let (store, clock, _a, b, _binding) = leased().await;
        let config = Config::default();
        // a dies now: it renews no more. Just before lease + skew: nothing happens.
        clock.advance(config.lease + config.lease_skew);
        let report = b.lease_tick(true).await.unwrap();
        assert_eq!(report.renewal, virtual_llm_core::LeaseRenewal::Renewed);
        assert!(report.ended.is_empty(), "not yet: {report:?}");
        assert_eq!(
            store.get(&name("llm")).await.unwrap().unwrap().status,
            LlmStatus::Active
        );
        clock.advance(Duration::from_millis(1));
        let report = b.lease_tick(true).await.unwrap();
        assert_eq!(report.ended, [id("gw-a")]);
        assert_eq!(report.demoted, 1);
        let row = store.get(&name("llm")).await.unwrap().unwrap();
        assert_eq!(row.status, LlmStatus::Inactive);
        assert_eq!(row.binding, None, "a's channel is gone");
        assert!(
            config.lease + config.lease_skew < config.stale_after,
            "sooner than the heartbeat timeout"
        );
        let theirs = store.get(&name("theirs")).await.unwrap().unwrap();
        assert_eq!(theirs.status, LlmStatus::Active, "b's own row");
        assert_eq!(theirs.binding.unwrap().replica, id("gw-b"));
        let again = b.lease_tick(true).await.unwrap();
        assert!(again.ended.is_empty() && again.demoted == 0, "{again:?}");
    }

    /// A replica that renews on time keeps its lease and its rows, however often its
    /// peers look.
    #[tokio::test]
    async fn a_live_replica_keeps_its_lease() {
        let (store, clock, a, b, _binding) = leased().await;
        let config = Config::default();
        for _ in 0..10 {
            clock.advance(config.lease_renew);
            assert!(!a.lease_tick(true).await.unwrap().lost);
            assert!(b.lease_tick(true).await.unwrap().ended.is_empty());
        }
        assert_eq!(
            store.get(&name("llm")).await.unwrap().unwrap().status,
            LlmStatus::Active
        );
        assert_eq!(a.local_channels(), 1);
    }

    /// A replica that stalled past its lease (a peer ended it and demoted its rows)
    /// learns it at its next renewal and closes its channels, so their publishers
    /// reconnect and register again instead of serving rows that are out of service.
    #[tokio::test]
    async fn a_replica_that_lost_its_lease_closes_its_channels() {
        let (_store, clock, a, b, (_binding, channel)) = leased().await;
        let config = Config::default();
        clock.advance(config.lease + config.lease_skew + Duration::from_secs(1));
        assert_eq!(b.lease_tick(true).await.unwrap().ended, [id("gw-a")]);
        assert!(channel.take().is_empty());
        let report = a.lease_tick(true).await.unwrap();
        assert_eq!(report.renewal, virtual_llm_core::LeaseRenewal::Started);
        assert!(report.lost);
        assert!(
            matches!(
                channel.take().as_slice(),
                [virtual_llm_core::protocol::GatewayFrame::Closing(_)]
            ),
            "its channels are told to close"
        );
        // From then on it holds a lease again.
        clock.advance(config.lease_renew);
        assert!(!a.lease_tick(true).await.unwrap().lost);
    }

    fn clock_now(clock: &ManualClock) -> Timestamp {
        use virtual_llm_core::Clock;
        clock.now()
    }
}

mod pool_router {
    use super::*;
    use virtual_llm_core::{PoolRouter, Router};

    async fn setup() -> (Arc<dyn Router>, Arc<dyn Store>) {
        (Arc::new(PoolRouter), Arc::new(MemoryStore::new()))
    }

    virtual_llm_core::router_conformance_tests!(setup);
}
