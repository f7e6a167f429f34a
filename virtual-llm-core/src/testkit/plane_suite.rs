//! The replica plane conformance suite: two gateway replicas over one store, linked by
//! a [`ChannelDirectory`](crate::ChannelDirectory) and a
//! [`TaskRouter`](crate::TaskRouter), with the publisher's channel on the first and
//! the clients on the second. Everything a client sees must be what it would see on
//! one gateway: whole answers, streams, cancels reaching the publisher, results checked
//! for ownership, and a channel loss failing the tasks at once.
//!
//! Each case takes the two gateways; run them all with
//! [`plane_conformance_tests!`](crate::plane_conformance_tests). The test kit's own
//! [`MemoryCluster`](crate::testkit::MemoryCluster) runs them in the core; a network
//! plane runs the same cases.

use std::sync::Arc;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::protocol::{LlmSpec, RegisterRequest, TaskResult};
use crate::testkit::{FakeChannel, LoopbackWire};
use crate::{
    Binding, EchoProvider, Gateway, InferRequest, LlmName, LlmStatus, Principal, PublishedLlm,
    Publisher, PublisherOptions, Reply, Role, SessionId,
};

fn alice() -> Principal {
    Principal::new("alice", [Role::Publisher])
}

fn client() -> Principal {
    Principal::new("carol", [Role::Client])
}

fn spec(name: &str) -> LlmSpec {
    LlmSpec::new(
        LlmName::parse(name).expect("test names are valid"),
        "openai",
        format!("{name}-model"),
    )
}

fn chat(model: &str, text: &str, stream: bool) -> InferRequest {
    InferRequest::from_chat_body(json!({
        "model": model, "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }))
    .expect("a valid chat request")
}

/// Publishes the echo model `name` on `on` through the core publisher (protocol 2).
async fn publish_echo(on: &Gateway, name: &str) -> (Publisher, SessionId) {
    let wire = Arc::new(LoopbackWire::new(on.clone(), alice()));
    let llms = vec![PublishedLlm::new(spec(name), Arc::new(EchoProvider::new()))];
    let publisher = Publisher::spawn(wire, llms, PublisherOptions::default());
    let session = publisher.connected().await;
    (publisher, session)
}

/// Registers `name` on `on` and binds a recording channel to it.
async fn bind_fake(on: &Gateway, name: &str) -> (SessionId, Binding, FakeChannel) {
    let answer = on
        .register(
            &alice(),
            RegisterRequest {
                agents: Vec::new(),
                provider_session_id: None,
                protocol_version: Some(crate::protocol::PROTOCOL_VERSION),
                llms: vec![spec(name)],
                capabilities: Vec::new(),
            },
        )
        .await
        .expect("register");
    let session = answer.provider_session_id;
    let channel = FakeChannel::new();
    let binding = on
        .bind(&alice(), &session, Arc::new(channel.clone()))
        .await
        .expect("bind");
    (session, binding, channel)
}

/// Chunk `seq` of a stream, `c{seq}`.
fn chunk(seq: u64) -> TaskResult {
    TaskResult::Chunk {
        data: format!("c{seq}"),
        done: false,
        seq: Some(seq),
    }
}

/// The end of a stream, numbered `seq`.
fn done(seq: u64) -> TaskResult {
    TaskResult::Chunk {
        data: String::new(),
        done: true,
        seq: Some(seq),
    }
}

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A whole answer: the client on `b` gets the answer of the publisher bound on `a`,
/// and no task is left on either replica.
pub async fn a_whole_answer_crosses_replicas(a: &Gateway, b: &Gateway) {
    let (publisher, session) = publish_echo(a, "echo").await;
    assert!(b.is_bound(&session), "b sees the channel a holds");
    assert_eq!((a.local_channels(), b.local_channels()), (1, 0));
    let reply = b
        .infer(&client(), chat("echo", "across replicas", false))
        .await
        .expect("answered");
    let Reply::Complete(c) = reply else {
        panic!("a whole answer")
    };
    assert_eq!(c.status, 200);
    assert_eq!(content(&c.json()), "across replicas");
    assert_eq!((a.in_flight(), b.in_flight()), (0, 0), "no task lingers");
    publisher.stop().await;
}

/// A stream: every chunk once, in order, then the end.
pub async fn a_stream_crosses_replicas(a: &Gateway, b: &Gateway) {
    let (publisher, _) = publish_echo(a, "echo").await;
    let reply = b
        .infer(&client(), chat("echo", "one two three four five", true))
        .await
        .expect("answered");
    let Reply::Stream(chunks) = reply else {
        panic!("a stream")
    };
    let text: String = chunks
        .map(|c| {
            let v: Value = serde_json::from_str(&c.expect("a chunk")).expect("json");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .await
        .concat();
    assert_eq!(text, "one two three four five");
    assert_eq!(b.in_flight(), 0);
    publisher.stop().await;
}

/// A client on `b` that goes away: the publisher on `a` gets the cancel, and a late
/// result for the task is refused as unknown.
pub async fn a_cancel_crosses_replicas(a: &Gateway, b: &Gateway) {
    let (session, _binding, channel) = bind_fake(a, "llm").await;
    let rows = b.route(&client(), "llm").await.expect("routed");
    let handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "x", true))
        .expect("started");
    let task = channel.next_task().await;
    assert_eq!(&task.task_id, handle.id());
    assert_eq!(task.task_id.replica().as_ref(), Some(b.replica()));
    drop(handle);
    assert_eq!(channel.next_cancel().await.task_id, task.task_id);
    let late = a
        .deliver(
            &alice(),
            &session,
            &task.task_id,
            TaskResult::Completed {
                status: 200,
                body: json!({}).into(),
                retry_after: None,
            },
        )
        .await
        .expect_err("the task is gone");
    assert_eq!(late.status(), 404);
    assert_eq!(b.in_flight(), 0);
}

/// Results posted through `a` for a task on `b` are checked on `b`: another principal
/// or another session gets 404 and the task is untouched; a replayed final result is a
/// 409 for its own session only; numbered chunks are deduplicated across the hop.
pub async fn results_are_checked_where_the_task_lives(a: &Gateway, b: &Gateway) {
    let (session, _binding, _channel) = bind_fake(a, "llm").await;
    let rows = b.route(&client(), "llm").await.expect("routed");
    let mut handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "x", true))
        .expect("started");
    let id = handle.id().clone();
    let mallory = Principal::new("mallory", [Role::Publisher]);
    let refused = a.deliver(&mallory, &session, &id, chunk(0)).await;
    assert_eq!(refused.expect_err("not hers").status(), 404);
    let stranger = SessionId::generate();
    let refused = a.deliver(&alice(), &stranger, &id, chunk(0)).await;
    assert_eq!(refused.expect_err("not that session").status(), 404);
    a.deliver(&alice(), &session, &id, chunk(0))
        .await
        .expect("c0");
    a.deliver(&alice(), &session, &id, chunk(0))
        .await
        .expect("a replayed chunk is dropped, not refused");
    a.deliver(&alice(), &session, &id, chunk(1))
        .await
        .expect("c1");
    let done = done(2);
    a.deliver(&alice(), &session, &id, done.clone())
        .await
        .expect("done");
    let mut seen = Vec::new();
    while let Some(event) = handle.next().await {
        seen.push(event.expect("no error"));
    }
    use crate::TaskEvent::{Chunk, Done};
    assert_eq!(seen, [Chunk("c0".into()), Chunk("c1".into()), Done]);
    let replay = a.deliver(&alice(), &session, &id, done.clone()).await;
    assert_eq!(replay.expect_err("finished").status(), 409);
    let replay = a.deliver(&mallory, &session, &id, done).await;
    assert_eq!(replay.expect_err("finished, but not hers").status(), 404);
}

/// Results posted together through `a` for a task on `b` cross together and arrive
/// in order, a replayed chunk among them dropped; a batch that skips a chunk is
/// refused (400) at the gap, after the results before it, and fails the task.
pub async fn results_sent_together_arrive_in_order(a: &Gateway, b: &Gateway) {
    let (session, _binding, _channel) = bind_fake(a, "llm").await;
    let rows = b.route(&client(), "llm").await.expect("routed");
    let mut handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "x", true))
        .expect("started");
    let id = handle.id().clone();
    a.deliver_all(
        &alice(),
        &session,
        &id,
        vec![chunk(0), chunk(1), chunk(0), chunk(2)],
    )
    .await
    .expect("a batch");
    a.deliver_all(&alice(), &session, &id, vec![chunk(3), done(4)])
        .await
        .expect("the last batch");
    let mut seen = Vec::new();
    while let Some(event) = handle.next().await {
        seen.push(event.expect("no error"));
    }
    use crate::TaskEvent::{Chunk, Done};
    let expected: Vec<_> = (0..4)
        .map(|i| Chunk(format!("c{i}")))
        .chain([Done])
        .collect();
    assert_eq!(seen, expected);

    let mut handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "y", true))
        .expect("started");
    let id = handle.id().clone();
    let gap = a
        .deliver_all(&alice(), &session, &id, vec![chunk(0), chunk(2), done(3)])
        .await;
    assert_eq!(gap.expect_err("a gap").status(), 400);
    assert_eq!(
        handle.next().await.expect("c0").expect("c0 arrived"),
        Chunk("c0".into())
    );
    let failed = handle.next().await.expect("an outcome");
    assert!(failed.is_err(), "the task failed at the gap: {failed:?}");
    assert_eq!(b.in_flight(), 0);
}

/// A task's last results posted through `a` with no use for the answer
/// ([`Gateway::deliver_last`]) reach the task on `b` in order, checked there all the
/// same: another principal's are dropped on `b` (the call, not waiting for `b`, cannot
/// say so) and leave the task to its own publisher's; a resumed task's are answered.
pub async fn last_results_cross_without_an_answer(a: &Gateway, b: &Gateway) {
    let (session, _binding, _channel) = bind_fake(a, "llm").await;
    let rows = b.route(&client(), "llm").await.expect("routed");
    let mut handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "x", true))
        .expect("started");
    let id = handle.id().clone();
    let mallory = Principal::new("mallory", [Role::Publisher]);
    let forged = a
        .deliver_last(&mallory, &session, &id, vec![chunk(0), done(1)])
        .await;
    if let Err(e) = forged {
        // A plane that waits for the answer says what `b` said.
        assert_eq!(e.status(), 404, "not hers");
    }
    a.deliver_last(&alice(), &session, &id, vec![chunk(0), chunk(1), done(2)])
        .await
        .expect("on their way");
    let mut seen = Vec::new();
    while let Some(event) = handle.next().await {
        seen.push(event.expect("no error"));
    }
    use crate::TaskEvent::{Chunk, Done};
    assert_eq!(seen, [Chunk("c0".into()), Chunk("c1".into()), Done]);
    assert_eq!(b.in_flight(), 0);

    // A whole answer in one result, as a publisher over a socket sends it.
    let handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "y", false))
        .expect("started");
    let id = handle.id().clone();
    let whole = TaskResult::Completed {
        status: 200,
        body: json!({"answer": 42}).into(),
        retry_after: None,
    };
    a.deliver_last(&alice(), &session, &id, vec![whole])
        .await
        .expect("on its way");
    let Reply::Complete(answer) = handle.into_reply().await.expect("answered") else {
        panic!("a whole answer")
    };
    assert_eq!((answer.status, answer.json()), (200, json!({"answer": 42})));
    assert_eq!(b.in_flight(), 0);

    // A resume is answered (it decides whether the publisher is told to stop): here
    // for a task its client gave up.
    let handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "z", true))
        .expect("started");
    let id = handle.id().clone();
    drop(handle);
    let resumed = a
        .deliver_last(
            &alice(),
            &session,
            &id,
            vec![TaskResult::Resume { from_seq: 0 }, done(0)],
        )
        .await;
    assert_eq!(resumed.expect_err("the task is gone").status(), 404);
}

/// A task's whole answer alone, posted through `a` by a publisher that reads the
/// answer ([`Gateway::deliver`], as over HTTP), keeps every refusal the task's replica
/// `b` would give, whether or not the plane answers it without asking `b`
/// ([`TaskRouter::deliver_final`](crate::TaskRouter::deliver_final)): another
/// principal's or session's is 404, the task's own is taken, a second is 409, and one
/// for a task whose client left, once its cancel reached the publisher, is 404. `b`'s
/// [`TaskInbound::expects`](crate::TaskInbound::expects) says which deliveries its
/// task waits for: only its own session's and principal's, until it is answered.
pub async fn a_whole_answer_keeps_its_refusals(a: &Gateway, b: &Gateway) {
    let (session, _binding, channel) = bind_fake(a, "llm").await;
    let rows = b.route(&client(), "llm").await.expect("routed");
    let handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "x", false))
        .expect("started");
    let id = handle.id().clone();
    channel.next_task().await;
    let answer = |n: u32| TaskResult::Completed {
        status: 200,
        body: json!({ "n": n }).into(),
        retry_after: None,
    };
    // What a plane asks before it takes a delivery as a sign of its task.
    let expects = |session: &SessionId, owner: &str| {
        b.inbound().expects(&crate::Delivery {
            session: session.clone(),
            owner: owner.to_owned(),
            task: id.clone(),
            results: vec![answer(0)],
        })
    };
    let stranger = SessionId::generate();
    assert!(expects(&session, "alice"), "its session's and owner's");
    assert!(!expects(&session, "mallory"), "not another principal's");
    assert!(!expects(&stranger, "alice"), "not another session's");
    let mallory = Principal::new("mallory", [Role::Publisher]);
    let refused = a.deliver(&mallory, &session, &id, answer(0)).await;
    assert_eq!(refused.expect_err("not hers").status(), 404);
    let refused = a.deliver(&alice(), &stranger, &id, answer(0)).await;
    assert_eq!(refused.expect_err("not that session's").status(), 404);
    a.deliver(&alice(), &session, &id, answer(1))
        .await
        .expect("taken");
    let Reply::Complete(taken) = handle.into_reply().await.expect("answered") else {
        panic!("a whole answer")
    };
    assert_eq!((taken.status, taken.json()), (200, json!({"n": 1})));
    let again = a.deliver(&alice(), &session, &id, answer(2)).await;
    assert_eq!(again.expect_err("answered already").status(), 409);
    assert!(
        !expects(&session, "alice"),
        "a finished task expects nothing"
    );

    let gone = b
        .start_task(&client(), &rows.rows[0], chat("llm", "y", false))
        .expect("started");
    let id = gone.id().clone();
    channel.next_task().await;
    drop(gone);
    assert_eq!(channel.next_cancel().await.task_id, id);
    let late = a.deliver(&alice(), &session, &id, answer(3)).await;
    assert_eq!(late.expect_err("its client left").status(), 404);
    assert_eq!(b.in_flight(), 0);
}

/// The publisher's channel closes on `a`: the task a client on `b` waits on fails at
/// once with 503, and the rows go inactive for both replicas.
pub async fn a_channel_loss_fails_tasks_on_other_replicas(a: &Gateway, b: &Gateway) {
    let (session, binding, channel) = bind_fake(a, "llm").await;
    let rows = b.route(&client(), "llm").await.expect("routed");
    let mut handle = b
        .start_task(&client(), &rows.rows[0], chat("llm", "x", false))
        .expect("started");
    channel.next_task().await;
    assert!(binding.release().await.expect("released"), "it was current");
    let err = handle
        .next()
        .await
        .expect("an outcome")
        .expect_err("the channel is gone");
    assert_eq!(err.status(), 503, "{err}");
    assert_eq!(b.in_flight(), 0);
    assert!(!b.is_bound(&session));
    let row = b
        .store()
        .get(&LlmName::parse("llm").expect("valid"))
        .await
        .expect("read")
        .expect("row");
    assert_eq!(row.status, LlmStatus::Inactive);
    assert_eq!(row.binding, None, "the binding is cleared");
    let err = b
        .infer(&client(), chat("llm", "x", false))
        .await
        .expect_err("offline");
    assert_eq!(err.status(), 503);
}

/// A channel replaced on `b` (the publisher reconnected to the other replica): the
/// rows record `b`'s bind, and `a`'s late release demotes nothing.
pub async fn a_late_release_on_one_replica_keeps_the_others_bind(a: &Gateway, b: &Gateway) {
    let (session, old, _channel) = bind_fake(a, "llm").await;
    let newer = b
        .bind(&alice(), &session, Arc::new(FakeChannel::new()))
        .await
        .expect("rebind on b");
    assert!(
        !old.release().await.expect("released"),
        "a's release is stale"
    );
    let row = a
        .store()
        .get(&LlmName::parse("llm").expect("valid"))
        .await
        .expect("read")
        .expect("row");
    assert_eq!(row.status, LlmStatus::Active, "still served through b");
    assert_eq!(row.binding.as_ref(), Some(newer.binding()));
    assert_eq!(&newer.binding().replica, b.replica());
    assert!(newer.release().await.expect("released"));
}

/// Stamps out one `#[tokio::test]` per case of the replica plane suite. `$setup` is an
/// async fn returning two started gateway replicas `(a, b)` over one store, linked by
/// the plane under test. With `if = $ready` (a fn returning `bool`), each test
/// returns at once when it is `false`: a plane whose server is not installed.
#[macro_export]
macro_rules! plane_conformance_tests {
    ($setup:path) => {
        $crate::plane_conformance_tests!($setup, if = $crate::testkit::store_suite::always);
    };
    ($setup:path, if = $ready:path) => {
        $crate::plane_conformance_tests!(@cases $setup, $ready;
            a_whole_answer_crosses_replicas,
            a_stream_crosses_replicas,
            a_cancel_crosses_replicas,
            results_are_checked_where_the_task_lives,
            results_sent_together_arrive_in_order,
            last_results_cross_without_an_answer,
            a_whole_answer_keeps_its_refusals,
            a_channel_loss_fails_tasks_on_other_replicas,
            a_late_release_on_one_replica_keeps_the_others_bind,
        );
    };
    (@cases $setup:path, $ready:path; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if !$ready() {
                    return;
                }
                let (a, b) = $setup().await;
                $crate::testkit::plane_suite::$case(&a, &b).await;
            }
        )*
    };
}
