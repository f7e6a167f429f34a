//! The NATS plane under what the conformance suites do not do: messages over the
//! server's `max_payload`, a frame the holding replica's channel refuses, a replica
//! that vanishes (its connection dropped, or connected but silent), and a NATS server
//! restarted under a steady stream of requests. Each test starts its own
//! `nats-server` where it needs one of its own; all skip, loudly, where it is not
//! installed.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    alice, bind_fake, bind_fake_declaring, carol, chat, gateways, gateways_with, id,
    nats_installed, options, short_resume_window, two_planes, two_planes_on, within,
};
use futures::StreamExt;
use serde_json::{Value, json};
use virtual_llm_core::protocol::{LlmSpec, TaskResult};
use virtual_llm_core::testkit::LoopbackWire;
use virtual_llm_core::{
    Binding, Delivery, EchoProvider, Error, Gateway, LlmName, PublishedLlm, Publisher,
    PublisherOptions, Reply, SessionId, TaskEvent, TaskId, UnavailableKind,
};
use virtual_llm_nats::NatsPlane;
use virtual_llm_nats::testing::{NatsServer, available};

/// A task frame and a result each far over the server's `max_payload` cross the
/// plane whole: cut into pieces and put back together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_max_payload_are_cut_and_put_back_together() {
    let Some(server) = available(NatsServer::start_with_max_payload(4096)) else {
        return;
    };
    let planes = two_planes_on(&server.url(), options()).await;
    assert_eq!(planes.0.max_payload(), 4096, "the server's limit is read");
    let (a, b) = gateways(&planes).await;
    let (session, _binding, channel) = bind_fake(&a, "big").await;
    let prompt = "x".repeat(100_000);
    let rows = b.route(&carol(), "big").await.unwrap();
    let mut handle = b
        .start_task(&carol(), &rows.rows[0], chat("big", &prompt, false))
        .unwrap();
    let task = within(10, "the large task frame", channel.next_task()).await;
    assert_eq!(&task.task_id, handle.id());
    let body: Value = serde_json::from_str(task.body.get()).unwrap();
    assert_eq!(body["messages"][0]["content"], prompt, "the body whole");
    let answer = json!({"choices": [{"message": {"content": "y".repeat(200_000)}}]});
    a.deliver(
        &alice(),
        &session,
        &task.task_id,
        TaskResult::Completed {
            status: 200,
            body: answer.clone().into(),
            retry_after: None,
        },
    )
    .await
    .expect("the large result is taken on b");
    let event = within(10, "the answer", handle.next())
        .await
        .unwrap()
        .unwrap();
    let TaskEvent::Completed(c) = event else {
        panic!("a whole answer: {event:?}")
    };
    assert_eq!((c.status, c.json()), (200, answer));
}

/// The channel on the holding replica refuses a task frame after `start_task`
/// returned on the client's replica: the task fails there with the 503 a local
/// refusal gives (saturated for a full channel, offline for a closed one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_refused_by_the_holding_replica_fails_its_task() {
    if !nats_installed() {
        return;
    }
    let (a, b) = gateways(&two_planes().await).await;
    let (_session, _binding, channel) = bind_fake(&a, "llm").await;
    let rows = b.route(&carol(), "llm").await.unwrap();
    channel.set_full(true);
    let mut handle = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", false))
        .expect("queued for a");
    let err = within(10, "the refusal", handle.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                kind: UnavailableKind::Saturated,
                ..
            }
        ),
        "{err:?}"
    );
    channel.set_full(false);
    channel.close();
    let mut handle = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", false))
        .expect("queued for a");
    let err = within(10, "the refusal", handle.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                kind: UnavailableKind::Offline,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(b.in_flight(), 0);
}

/// A raw subscription to what replicas publish to `replica`'s deliveries.
async fn deliveries_to(
    raw: &async_nats::Client,
    prefix: &str,
    replica: &str,
) -> async_nats::Subscriber {
    raw.subscribe(format!("{prefix}.r.{replica}.deliver"))
        .await
        .unwrap()
}

fn delivery() -> Delivery {
    Delivery {
        session: SessionId::generate(),
        owner: "alice".into(),
        task: TaskId::generate(),
        results: vec![TaskResult::Failed {
            message: "x".into(),
        }],
    }
}

/// A replica whose NATS connection dropped has no responders: its peers' probes find
/// it gone, and a result for its task is answered as for an unknown task at once, not
/// after the (here hour-long) timeouts. (A result in flight at the moment it died
/// waits the deliver timeout: the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_a_vanished_replica_is_unknown_at_once() {
    if !nats_installed() {
        return;
    }
    let server = virtual_llm_nats::testing::shared().unwrap();
    let hour = Duration::from_secs(3600);
    let opts = options().with_timeout(hour).with_deliver_timeout(hour);
    let (a, b) = two_planes_on(&server.url(), opts).await;
    b.disconnect().await;
    // a's probe finds no responders: with hour-long timeouts, nothing else could
    // tell it so soon.
    assert!(within(30, "a forgets b", a.wait_for_peers(0, hour)).await);
    let router = a.task_router();
    let answer = within(
        30,
        "deliver to a vanished replica",
        router.deliver(&id("gw-b"), delivery()),
    )
    .await;
    assert!(matches!(answer, Err(Error::UnknownTask)), "{answer:?}");
}

/// A replica that is subscribed but never answers: a result for its task waits the
/// deliver timeout and no longer (time paused: the timeout passes at once).
#[tokio::test]
async fn a_result_for_a_silent_replica_is_unknown_after_the_timeout() {
    if !nats_installed() {
        return;
    }
    let server = virtual_llm_nats::testing::shared().unwrap();
    let opts = options().with_deliver_timeout(Duration::from_secs(30));
    let ghost = async_nats::connect(server.url()).await.unwrap();
    let mut silent = ghost
        .subscribe(format!("{}.r.ghost.deliver", opts.prefix))
        .await
        .unwrap();
    ghost.flush().await.unwrap();
    let a = NatsPlane::connect(&server.url(), id("gw-a"), opts)
        .await
        .unwrap();
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let answer = a.task_router().deliver(&id("ghost"), delivery()).await;
    assert!(matches!(answer, Err(Error::UnknownTask)), "{answer:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "it waited the deliver timeout: {:?}",
        started.elapsed()
    );
    tokio::time::resume();
    let heard = within(10, "the ghost heard it", silent.next())
        .await
        .unwrap();
    assert!(heard.reply.is_some(), "a request");
}

/// The replica holding a publisher's channel vanishes (its NATS connection dropped)
/// while a client on another replica waits: the task there fails with 503 within a
/// probe and a timeout, not at the task deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_waiting_on_a_vanished_replica_fail() {
    if !nats_installed() {
        return;
    }
    let planes = two_planes().await;
    let (a, b) = gateways(&planes).await;
    let (_session, _binding, channel) = bind_fake(&a, "llm").await;
    let rows = b.route(&carol(), "llm").await.unwrap();
    let mut handle = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", true))
        .unwrap();
    within(10, "the task frame", channel.next_task()).await;
    planes.0.disconnect().await;
    let err = within(20, "the failure", handle.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    assert_eq!(b.in_flight(), 0);
    assert!(!b.is_bound(&rows.rows[0].provider_session_id.clone().unwrap()));
}

/// The replica holding a resuming session's channel vanishes while a client on
/// another replica waits on a stream, and the client's replica hears of it before the
/// publisher binds again there: the task waits for its publisher as it would through
/// a dropped channel, and goes on when the publisher resumes it. (Before, the news of
/// the vanished replica failed it at once, so whether the stream survived the replica
/// depended on which arrived first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_sessions_task_outlives_the_replica_holding_its_channel() {
    if !nats_installed() {
        return;
    }
    let planes = two_planes().await;
    let (a, b) = gateways(&planes).await;
    let resume = vec![virtual_llm_core::protocol::RESUME.to_owned()];
    let (session, _binding, channel) = bind_fake_declaring(&a, "llm", resume).await;
    let rows = b.route(&carol(), "llm").await.unwrap();
    let mut handle = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", true))
        .unwrap();
    let task = handle.id().clone();
    within(10, "the task frame", channel.next_task()).await;
    planes.0.disconnect().await;
    // Within a probe and its timeout, as in `tasks_waiting_on_a_vanished_replica_fail`.
    within(20, "b hears that a is gone", async {
        while b.is_bound(&session) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(b.in_flight(), 1, "the task waits for its publisher");
    // The publisher binds again on b and resumes the task from its start.
    let _rebound = bind_and_resume(&b, &session, &task).await;
    let done = TaskResult::Chunk {
        data: "c0".into(),
        done: true,
        seq: Some(0),
    };
    b.deliver(&alice(), &session, &task, done).await.unwrap();
    let mut seen = Vec::new();
    while let Some(event) = within(10, "the resumed task", handle.next()).await {
        seen.push(event.unwrap());
    }
    assert_eq!(seen, [TaskEvent::Chunk("c0".into()), TaskEvent::Done]);
}

/// The publisher of `session` binds a new channel on `on` and resumes `task` there
/// from its start; the task must still be there to resume.
async fn bind_and_resume(on: &Gateway, session: &SessionId, task: &TaskId) -> Binding {
    let binding = on
        .bind(
            &alice(),
            session,
            Arc::new(virtual_llm_core::testkit::FakeChannel::new()),
        )
        .await
        .unwrap();
    on.deliver(&alice(), session, task, TaskResult::Resume { from_seq: 0 })
        .await
        .expect("the task is still there to resume");
    binding
}

async fn publish_echo(on: &Gateway) -> Publisher {
    let wire = Arc::new(LoopbackWire::new(on.clone(), alice()));
    let llms = vec![PublishedLlm::new(
        LlmSpec::new(LlmName::parse("echo").unwrap(), "openai", "echo-model"),
        Arc::new(EchoProvider::new()),
    )];
    let publisher = Publisher::spawn(wire, llms, PublisherOptions::default());
    publisher.connected().await;
    publisher
}

/// One request from a client on `b` for the echo model published on `a`.
async fn ask(b: &Gateway, n: usize) -> Result<(), Error> {
    let text = format!("request {n}");
    match b.infer(&carol(), chat("echo", &text, false)).await? {
        Reply::Complete(c) => {
            assert_eq!(c.json()["choices"][0]["message"]["content"], text.as_str());
            Ok(())
        }
        Reply::Stream(_) => panic!("a whole answer"),
    }
}

/// The NATS server restarts under a steady stream of requests across replicas: the
/// requests while it is down fail (none hangs), and once both replicas are back every
/// request succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_load_recovers() {
    let Some(mut server) = available(NatsServer::start()) else {
        return;
    };
    let opts = options().with_timeout(Duration::from_secs(2));
    let planes = two_planes_on(&server.url(), opts).await;
    let (a, b) = gateways(&planes).await;
    let publisher = publish_echo(&a).await;
    for n in 0..20 {
        within(30, "a request before the restart", ask(&b, n))
            .await
            .unwrap();
    }
    server.stop();
    let mut failed = 0;
    for n in 0..5 {
        if within(30, "a request while NATS is down", ask(&b, n))
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert_eq!(failed, 5, "no answer crosses a plane that is down");
    server.restart().unwrap();
    // Back within a bound: both reconnect (backoff up to 4 s) and announce themselves.
    let mut recovered = false;
    for n in 0..300 {
        if within(30, "a request after the restart", ask(&b, n))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "requests succeed again after the restart");
    for n in 0..50 {
        within(30, "a request after recovery", ask(&b, n))
            .await
            .unwrap();
    }
    publisher.stop().await;
}

/// Polls `condition` every 10 ms until it holds, for at most 10 s.
async fn eventually(what: &str, condition: impl Fn() -> bool + Send + Sync) {
    within(10, what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A peer whose map lost a channel (NATS core delivers at most once; here a forged
/// release) has it back within the resync interval: every replica announces its
/// channels again periodically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_announcement_is_mended_by_the_next_resync() {
    if !nats_installed() {
        return;
    }
    let server = virtual_llm_nats::testing::shared().unwrap();
    let opts = options().with_resync_interval(Duration::from_millis(300));
    let prefix = opts.prefix.clone();
    let (a, b) = two_planes_on(&server.url(), opts).await;
    let (on_a, on_b) = (a.directory(), b.directory());
    let session = SessionId::generate();
    let token = on_a.bind(
        &session,
        Arc::new(virtual_llm_core::testkit::FakeChannel::new()),
    );
    on_a.settled().await;
    assert_eq!(on_b.current(&session), Some(token.binding.clone()));
    let forger = async_nats::connect(server.url()).await.unwrap();
    let forged = json!({"op": "released", "session": session, "binding": token.binding});
    forger
        .publish(format!("{prefix}.all"), forged.to_string().into())
        .await
        .unwrap();
    forger.flush().await.unwrap();
    eventually("b forgets the channel", || on_b.current(&session).is_none()).await;
    eventually("b has it back", || {
        on_b.current(&session) == Some(token.binding.clone())
    })
    .await;
}

/// The replica holding a channel is gone without a word and the publisher binds its
/// session again on the client's replica: the tasks sent through the lost channel
/// wait the resume window for a sign of life, and the one its publisher never got
/// (its frame died with the replica) fails with 503 then, not at its deadline, while
/// one the publisher answers goes on. (A short window: the test waits it out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sent_through_a_channel_lost_unannounced_fail_after_the_window() {
    if !nats_installed() {
        return;
    }
    let planes = two_planes().await;
    let (a, b) = gateways_with(&planes, short_resume_window()).await;
    let (session, _old, channel) = bind_fake(&a, "llm").await;
    let rows = b.route(&carol(), "llm").await.unwrap();
    let mut never = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", true))
        .unwrap();
    let mut answered = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "y", true))
        .unwrap();
    let answered_id = answered.id().clone();
    for _ in 0..2 {
        within(10, "the task frames", channel.next_task()).await;
    }
    // The publisher binds on b; a's channel is replaced, which a tells nobody (as
    // a replica that died would not), and the frames it took are never answered.
    let _rebound = b
        .bind(
            &alice(),
            &session,
            Arc::new(virtual_llm_core::testkit::FakeChannel::new()),
        )
        .await
        .unwrap();
    let chunk = |seq, done| TaskResult::Chunk {
        data: format!("c{seq}"),
        done,
        seq: Some(seq),
    };
    b.deliver(&alice(), &session, &answered_id, chunk(0, false))
        .await
        .unwrap();
    let err = within(10, "the lost task's failure", never.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    b.deliver(&alice(), &session, &answered_id, chunk(1, true))
        .await
        .expect("the answered task outlived the window");
    let mut seen = Vec::new();
    while let Some(event) = within(10, "the answered task", answered.next()).await {
        seen.push(event.unwrap());
    }
    assert_eq!(
        seen,
        [
            TaskEvent::Chunk("c0".into()),
            TaskEvent::Chunk("c1".into()),
            TaskEvent::Done
        ]
    );
}

/// A resuming session's channel closes on a (announced), and the publisher binds
/// again on b, the clients' replica, resuming only one of the two tasks waiting there
/// (it lost the other): the resumed one goes on past the window, and the other fails
/// with 503 when the window ends, not at its deadline. (A short window: the test
/// waits it out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_not_resumed_after_an_announced_close_fails_when_the_window_ends() {
    if !nats_installed() {
        return;
    }
    let planes = two_planes().await;
    let (a, b) = gateways_with(&planes, short_resume_window()).await;
    let resume = vec![virtual_llm_core::protocol::RESUME.to_owned()];
    let (session, binding, channel) = bind_fake_declaring(&a, "llm", resume).await;
    let rows = b.route(&carol(), "llm").await.unwrap();
    let mut lost = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", true))
        .unwrap();
    let mut kept = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "y", true))
        .unwrap();
    let kept_id = kept.id().clone();
    for _ in 0..2 {
        within(10, "the task frames", channel.next_task()).await;
    }
    assert!(binding.release().await.unwrap(), "it was current");
    let _rebound = bind_and_resume(&b, &session, &kept_id).await;
    let err = within(10, "the lost task's failure", lost.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    b.deliver(
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
    let mut seen = Vec::new();
    while let Some(event) = within(10, "the resumed task", kept.next()).await {
        seen.push(event.unwrap());
    }
    assert_eq!(seen, [TaskEvent::Chunk("c0".into()), TaskEvent::Done]);
}

/// The replica holding a channel answers a taken task frame with the task's first
/// result, or, for a task that sends none for a while, late: either way the client's
/// replica never times the frame out while its task is alive. With a 400 ms plane
/// timeout: a task silent for three timeouts, then answered, completes (the late
/// answer came); a stream whose first chunk came at once and whose last comes three
/// timeouts later completes (the first chunk answered the frame: no late answer was
/// sent for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_frame_is_answered_by_its_first_result_or_late() {
    if !nats_installed() {
        return;
    }
    let server = virtual_llm_nats::testing::shared().unwrap();
    let timeout = Duration::from_millis(400);
    let planes = two_planes_on(&server.url(), options().with_timeout(timeout)).await;
    let (a, b) = gateways(&planes).await;
    let (session, _binding, channel) = bind_fake(&a, "llm").await;
    let rows = b.route(&carol(), "llm").await.unwrap();

    let mut silent = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", false))
        .unwrap();
    let silent_id = silent.id().clone();
    let mut streamed = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "y", true))
        .unwrap();
    let streamed_id = streamed.id().clone();
    for _ in 0..2 {
        within(10, "the task frames", channel.next_task()).await;
    }
    let chunk = |data: &str, done: bool, seq: u64| TaskResult::Chunk {
        data: data.into(),
        done,
        seq: Some(seq),
    };
    a.deliver(&alice(), &session, &streamed_id, chunk("c0", false, 0))
        .await
        .unwrap();
    tokio::time::sleep(timeout * 3).await;

    a.deliver(
        &alice(),
        &session,
        &silent_id,
        TaskResult::Completed {
            status: 200,
            body: json!({"late": true}).into(),
            retry_after: None,
        },
    )
    .await
    .expect("the silent task is still waiting");
    let TaskEvent::Completed(c) = within(10, "the silent task", silent.next())
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("a whole answer")
    };
    assert_eq!(c.body, json!({"late": true}).into());

    a.deliver(&alice(), &session, &streamed_id, chunk("c1", true, 1))
        .await
        .expect("the stream is still waiting");
    let mut seen = Vec::new();
    while let Some(event) = within(10, "the stream", streamed.next()).await {
        seen.push(event.unwrap());
    }
    assert_eq!(
        seen,
        [
            TaskEvent::Chunk("c0".into()),
            TaskEvent::Chunk("c1".into()),
            TaskEvent::Done
        ]
    );
}

/// A task's last results, whose answer the sender has no use for
/// (`TaskRouter::deliver_last`), go as a plain message to a replica that said it
/// takes them so, and the call does not wait for any answer; to a replica of an older
/// version (its `Hello` says none), they go as a request as before, answered. Here
/// `b` is a real replica and `old` a raw NATS client speaking the older announcements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_results_go_unanswered_only_to_replicas_that_take_them() {
    if !nats_installed() {
        return;
    }
    let server = virtual_llm_nats::testing::shared().unwrap();
    let hour = Duration::from_secs(3600);
    let opts = options().with_deliver_timeout(hour);
    let prefix = opts.prefix.clone();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut to_b = deliveries_to(&raw, &prefix, "gw-b").await;
    let mut to_old = deliveries_to(&raw, &prefix, "old").await;
    raw.flush().await.unwrap();
    let (a, _b) = two_planes_on(&server.url(), opts).await;
    let router = a.task_router();

    // b takes them unanswered: the call returns with nobody answering (the deliver
    // timeout is an hour), and the message has no reply subject.
    within(
        10,
        "last results to b",
        router.deliver_last(&id("gw-b"), delivery()),
    )
    .await;
    let heard = within(10, "b's delivery", to_b.next()).await.unwrap();
    assert!(heard.reply.is_none(), "a plain message: {:?}", heard.reply);

    // A replica from before versions: a request, and the call waits for its answer.
    raw.publish(
        format!("{prefix}.all"),
        r#"{"op":"hello","from":"old","held":[]}"#.into(),
    )
    .await
    .unwrap();
    assert!(
        a.wait_for_peers(2, Duration::from_secs(10)).await,
        "a hears of old"
    );
    let mut sent = tokio::spawn(async move { router.deliver_last(&id("old"), delivery()).await });
    let heard = within(10, "old's delivery", to_old.next()).await.unwrap();
    let reply = heard
        .reply
        .expect("a request to a replica from before versions");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut sent)
            .await
            .is_err(),
        "the call waits for old's answer"
    );
    raw.publish(reply, bytes::Bytes::new()).await.unwrap();
    within(10, "answered", sent).await.unwrap();

    // `old` upgraded: once a applied its `Here` (a barrier after it says so), its
    // last results go unanswered too.
    raw.publish(
        format!("{prefix}.all"),
        r#"{"op":"here","from":"old","held":[],"version":1}"#.into(),
    )
    .await
    .unwrap();
    let inbox = raw.new_inbox();
    let mut barrier = raw.subscribe(inbox.clone()).await.unwrap();
    raw.publish_with_reply(
        format!("{prefix}.all"),
        inbox,
        r#"{"op":"sync","from":"old"}"#.into(),
    )
    .await
    .unwrap();
    // Every replica answers the barrier; a's answer is the one that counts.
    within(10, "a applied old's announcements", async {
        while let Some(answer) = barrier.next().await {
            if &answer.payload[..] == b"gw-a" {
                return;
            }
        }
        panic!("the barrier's subscription ended");
    })
    .await;
    let router = a.task_router();
    within(
        10,
        "last results to old",
        router.deliver_last(&id("old"), delivery()),
    )
    .await;
    let heard = within(10, "old's second delivery", to_old.next())
        .await
        .unwrap();
    assert!(heard.reply.is_none(), "a plain message: {:?}", heard.reply);
}

/// A publisher answered over HTTP is told whether its result was taken, so a result
/// for a task on another replica waits for that replica's answer; a task's whole
/// answer alone (`TaskRouter::deliver_final`) does not when this replica carried the
/// task's frame to the posting session, for its owner: every refusal but a task that
/// ended meanwhile is known here. It crosses as a plain message and the client has
/// it. A result from another principal or session, or a second answer, still asks
/// the task's replica and gets its refusal (404, 409); so does an answer for a task
/// whose client left, once the cancel has crossed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_for_a_task_carried_here_crosses_unanswered() {
    if !nats_installed() {
        return;
    }
    let server = virtual_llm_nats::testing::shared().unwrap();
    let opts = options();
    let prefix = opts.prefix.clone();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut to_b = deliveries_to(&raw, &prefix, "gw-b").await;
    raw.flush().await.unwrap();
    let (a, b) = gateways(&two_planes_on(&server.url(), opts).await).await;
    let (session, _binding, channel) = bind_fake(&a, "llm").await;
    let rows = b.route(&carol(), "llm").await.unwrap();
    let mut handle = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "x", false))
        .unwrap();
    let task = handle.id().clone();
    within(10, "the task frame", channel.next_task()).await;
    let answer = |n: u32| TaskResult::Completed {
        status: 200,
        body: json!({ "n": n }).into(),
        retry_after: None,
    };
    let mut asked = async || {
        within(10, "a delivery to b", to_b.next())
            .await
            .unwrap()
            .reply
            .is_some()
    };

    // Another principal, another session: b's 404, asked of b.
    let mallory = virtual_llm_core::Principal::new("mallory", [virtual_llm_core::Role::Publisher]);
    let err = a
        .deliver(&mallory, &session, &task, answer(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownTask), "{err:?}");
    assert!(asked().await, "another principal's answer is asked of b");
    let err = a
        .deliver(&alice(), &SessionId::generate(), &task, answer(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownTask), "{err:?}");
    assert!(asked().await, "another session's answer is asked of b");

    // The session and principal the frame went to: a plain message, and the client
    // has the answer.
    a.deliver(&alice(), &session, &task, answer(1))
        .await
        .unwrap();
    assert!(!asked().await, "the carried task's answer goes unanswered");
    let TaskEvent::Completed(c) = within(10, "the answer", handle.next())
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("a whole answer")
    };
    assert_eq!(c.body, json!({"n": 1}).into());

    // A second answer: b's 409, asked of b.
    let err = a
        .deliver(&alice(), &session, &task, answer(2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TaskFinished), "{err:?}");
    assert!(asked().await, "a second answer is asked of b");

    // A task whose client left: once its cancel reached a, b's 404.
    let gone = b
        .start_task(&carol(), &rows.rows[0], chat("llm", "y", false))
        .unwrap();
    let gone_id = gone.id().clone();
    within(10, "the second task frame", channel.next_task()).await;
    drop(gone);
    assert_eq!(
        within(10, "the cancel", channel.next_cancel())
            .await
            .task_id,
        gone_id
    );
    let err = a
        .deliver(&alice(), &session, &gone_id, answer(3))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownTask), "{err:?}");
    assert!(asked().await, "an answer after the cancel is asked of b");
}
