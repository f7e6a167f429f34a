//! A proptest of the lifecycle against a reference model of SPEC §3.
//!
//! Random sequences of register / heartbeat / bind / unbind / forget-session-file /
//! advance-time / sweep are applied both to a `Gateway` (memory store, manual clock)
//! and to `Model`, a few lines per rule written straight from the spec's table. After
//! every step the rows, the bound channels and every answer must agree.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use virtual_llm_core::protocol::ConflictReason;
use virtual_llm_core::{Binding, Error, LlmId, LlmStatus, SessionId, Store, Timestamp};

const NAMES: [&str; 3] = ["a", "b", "c"];
/// Publishers 0 and 1 share an owner (adoption between them is allowed); 2 is another.
const OWNERS: [&str; 3] = ["alice", "alice", "bob"];
const STALE: Duration = Duration::from_secs(90);
const REAP: Duration = Duration::from_secs(4 * 3600);

#[derive(Clone, Debug)]
enum Op {
    Register { p: usize, names: Vec<usize> },
    Heartbeat { p: usize },
    Bind { p: usize },
    Unbind { p: usize },
    ForgetSession { p: usize },
    Advance { secs: u64 },
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..3usize;
    prop_oneof![
        4 => (p.clone(), proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3))
            .prop_map(|(p, names)| Op::Register { p, names }),
        2 => p.clone().prop_map(|p| Op::Heartbeat { p }),
        3 => p.clone().prop_map(|p| Op::Bind { p }),
        2 => p.clone().prop_map(|p| Op::Unbind { p }),
        1 => p.prop_map(|p| Op::ForgetSession { p }),
        3 => prop_oneof![0..120u64, Just(14_400u64), 14_000..15_000u64].prop_map(|secs| Op::Advance { secs }),
        2 => Just(Op::Sweep),
    ]
}

#[derive(Clone, Debug)]
struct Row {
    owner: &'static str,
    session: Option<SessionId>,
    status: LlmStatus,
    heartbeat: Option<Timestamp>,
    inactive_since: Option<Timestamp>,
    /// Learned from the gateway on first sight; must never change while the row lives.
    id: Option<LlmId>,
}

#[derive(Default)]
struct Model {
    rows: BTreeMap<&'static str, Row>,
    /// Session → token of its current binding.
    bound: HashMap<SessionId, u64>,
}

impl Model {
    fn known(&self, session: &SessionId, owner: &str) -> bool {
        let mut rows = self
            .rows
            .values()
            .filter(|r| r.session.as_ref() == Some(session))
            .peekable();
        rows.peek().is_some() && rows.all(|r| r.owner == owner)
    }

    fn session_rows(&mut self, session: &SessionId) -> impl Iterator<Item = &mut Row> {
        self.rows
            .values_mut()
            .filter(move |r| r.session.as_ref() == Some(session))
    }
}

fn activate(r: &mut Row, now: Timestamp) {
    r.status = LlmStatus::Active;
    r.inactive_since = None;
    r.heartbeat = Some(now);
}

fn deactivate(r: &mut Row, now: Timestamp) {
    if r.status == LlmStatus::Active {
        r.status = LlmStatus::Inactive;
        r.inactive_since = Some(now);
    }
}

#[derive(Default)]
struct Publisher {
    session: Option<SessionId>,
    bindings: Vec<(Binding, SessionId, u64)>,
}

async fn run(ops: Vec<Op>) {
    let f = fixture().await;
    let mut model = Model::default();
    let mut pubs: Vec<Publisher> = (0..3).map(|_| Publisher::default()).collect();
    let mut next_token = 0u64;
    for (step, op) in ops.into_iter().enumerate() {
        let now = f.now();
        match op {
            Op::Register { p, names } => {
                let owner = OWNERS[p];
                let names: Vec<&'static str> = names.into_iter().map(|i| NAMES[i]).collect();
                let requested = pubs[p].session.clone();
                let known = requested.as_ref().is_some_and(|s| model.known(s, owner));
                let plan_session = if known { requested.clone() } else { None };
                let mut expected_conflicts = Vec::new();
                for n in &names {
                    let Some(r) = model.rows.get(n) else { continue };
                    let reason = if r.owner != owner {
                        Some(ConflictReason::OwnedByAnother)
                    } else if (plan_session.is_some() && r.session == plan_session)
                        || r.status != LlmStatus::Active
                    {
                        None
                    } else {
                        Some(ConflictReason::ActiveInAnotherSession)
                    };
                    expected_conflicts.extend(reason.map(|reason| ((*n).to_owned(), reason)));
                }
                let result =
                    f.gw.register(&publisher(owner), request(requested.as_ref(), &names))
                        .await;
                if !expected_conflicts.is_empty() {
                    let Err(Error::Conflict { conflicts }) = result else {
                        panic!(
                            "step {step}: expected conflicts {expected_conflicts:?}, got {result:?}"
                        )
                    };
                    let got: Vec<_> = conflicts.into_iter().map(|c| (c.name, c.reason)).collect();
                    assert_eq!(got, expected_conflicts, "step {step}");
                } else {
                    let answer =
                        result.unwrap_or_else(|e| panic!("step {step}: register refused: {e:?}"));
                    let session = answer.provider_session_id;
                    if known {
                        assert_eq!(
                            Some(&session),
                            requested.as_ref(),
                            "step {step}: known session kept"
                        );
                    } else {
                        assert_ne!(
                            Some(&session),
                            requested.as_ref(),
                            "step {step}: fresh session issued"
                        );
                    }
                    for n in &names {
                        let row = model.rows.entry(n).or_insert_with(|| Row {
                            owner,
                            session: None,
                            status: LlmStatus::Active,
                            heartbeat: None,
                            inactive_since: None,
                            id: None,
                        });
                        row.owner = owner;
                        row.session = Some(session.clone());
                        activate(row, now);
                    }
                    for (n, r) in model.rows.iter_mut() {
                        if r.session.as_ref() == Some(&session) && !names.contains(n) {
                            deactivate(r, now);
                            r.session = None;
                        }
                    }
                    pubs[p].session = Some(session);
                }
            }
            Op::Heartbeat { p } => {
                let Some(session) = pubs[p].session.clone() else {
                    continue;
                };
                let result = f.gw.heartbeat(&publisher(OWNERS[p]), &session).await;
                if !model.known(&session, OWNERS[p]) {
                    assert_eq!(result.unwrap_err().status(), 404, "step {step}");
                    continue;
                }
                let count = model.session_rows(&session).count();
                assert_eq!(result.unwrap().llms, count, "step {step}");
                let bound = model.bound.contains_key(&session);
                for r in model.session_rows(&session) {
                    r.heartbeat = Some(now);
                    if bound && r.status != LlmStatus::Active {
                        activate(r, now);
                    }
                }
            }
            Op::Bind { p } => {
                let Some(session) = pubs[p].session.clone() else {
                    continue;
                };
                let channel = std::sync::Arc::new(virtual_llm_core::testkit::FakeChannel::new());
                let result = f.gw.bind(&publisher(OWNERS[p]), &session, channel).await;
                if !model.known(&session, OWNERS[p]) {
                    assert_eq!(result.unwrap_err().status(), 404, "step {step}");
                    continue;
                }
                next_token += 1;
                pubs[p]
                    .bindings
                    .push((result.unwrap(), session.clone(), next_token));
                model.bound.insert(session.clone(), next_token);
                for r in model.session_rows(&session) {
                    activate(r, now);
                }
            }
            Op::Unbind { p } => {
                let Some((binding, session, token)) = pubs[p].bindings.pop() else {
                    continue;
                };
                let current = model.bound.get(&session) == Some(&token);
                assert_eq!(
                    binding.release().await.unwrap(),
                    current,
                    "step {step}: generation check"
                );
                if current {
                    model.bound.remove(&session);
                    for r in model.session_rows(&session) {
                        if r.status == LlmStatus::Active {
                            deactivate(r, now);
                        }
                    }
                }
            }
            Op::ForgetSession { p } => pubs[p].session = None,
            Op::Advance { secs } => f.clock.advance(Duration::from_secs(secs)),
            Op::Sweep => {
                let report = f.gw.sweep().await.unwrap();
                let stale_cutoff = now.saturating_sub(STALE);
                let mut marked = 0;
                for r in model.rows.values_mut() {
                    if r.status == LlmStatus::Active
                        && r.heartbeat.unwrap_or(Timestamp::EPOCH) < stale_cutoff
                    {
                        deactivate(r, now);
                        marked += 1;
                    }
                }
                let reap_cutoff = now.saturating_sub(REAP);
                let before = model.rows.len();
                model.rows.retain(|_, r| {
                    !(r.status == LlmStatus::Inactive
                        && r.inactive_since.unwrap_or(Timestamp::EPOCH) < reap_cutoff)
                });
                assert_eq!(report.marked_inactive, marked, "step {step}: stale rows");
                assert_eq!(
                    report.deleted,
                    before - model.rows.len(),
                    "step {step}: reaped rows"
                );
            }
        }
        compare(&f, &mut model, step).await;
    }
}

async fn compare(f: &Fixture, model: &mut Model, step: usize) {
    let stored = f.store.list().await.unwrap();
    let stored_names: Vec<_> = stored.iter().map(|r| r.name.to_string()).collect();
    let model_names: Vec<_> = model.rows.keys().map(|n| (*n).to_owned()).collect();
    assert_eq!(stored_names, model_names, "step {step}: which rows exist");
    for r in stored {
        let m = model.rows.get_mut(r.name.as_str()).unwrap();
        let what = format!("step {step}: row {}", r.name);
        assert_eq!(r.owner, m.owner, "{what}: owner");
        assert_eq!(r.provider_session_id, m.session, "{what}: session");
        assert_eq!(r.status, m.status, "{what}: status");
        assert_eq!(r.last_heartbeat_at, m.heartbeat, "{what}: heartbeat");
        assert_eq!(r.inactive_since, m.inactive_since, "{what}: inactive since");
        assert_eq!(
            m.id.get_or_insert_with(|| r.id.clone()),
            &r.id,
            "{what}: id is stable"
        );
    }
    for session in model.bound.keys() {
        assert!(
            f.gw.is_bound(session),
            "step {step}: {session} should be bound"
        );
    }
    assert_eq!(
        f.gw.local_channels(),
        model.bound.len(),
        "step {step}: bound channels"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_gateway_follows_the_spec_model(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops));
    }
}
