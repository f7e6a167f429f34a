//! Fixtures shared by the redb store's tests: a store in a temporary directory that
//! lives as long as the guard, a closed file made one of an older schema version,
//! principals and register requests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, TableDefinition};
use tempfile::TempDir;
use virtual_llm_core::protocol::{LlmSpec, RegisterRequest};
use virtual_llm_core::testkit::record;
use virtual_llm_core::{LlmName, Principal, Role, SessionId, Store, Write};
use virtual_llm_redb::{RedbOptions, RedbStore};

/// A store whose file lives in a temporary directory, removed when the guard drops.
pub struct TempStore {
    pub store: Arc<RedbStore>,
    pub dir: TempDir,
}

impl TempStore {
    pub async fn new() -> Self {
        Self::with(RedbOptions::default()).await
    }

    pub async fn with(options: RedbOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open_with(dir.path().join("registry.redb"), options)
            .await
            .unwrap();
        TempStore {
            store: Arc::new(store),
            dir,
        }
    }

    /// The store, shared (for a `Gateway`).
    pub fn arc(&self) -> Arc<RedbStore> {
        self.store.clone()
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("registry.redb")
    }

    /// A store holding one row, `row`, already closed.
    pub async fn closed_with_one_row() -> Self {
        let store = TempStore::new().await;
        store
            .write(vec![Write::Insert(record("row"))])
            .await
            .unwrap();
        store.close().await.unwrap();
        store
    }

    /// Closes the store and opens the same file again.
    pub async fn reopen(self) -> Self {
        self.store.close().await.unwrap();
        let TempStore { store, dir } = self;
        drop(store);
        let store = RedbStore::open(dir.path().join("registry.redb"))
            .await
            .unwrap();
        TempStore {
            store: Arc::new(store),
            dir,
        }
    }
}

impl Deref for TempStore {
    type Target = RedbStore;
    fn deref(&self) -> &RedbStore {
        &self.store
    }
}

/// The tables each schema version added after the first, by the version that added
/// it.
const ADDED: [(u64, &str); 3] = [
    (2, "rows_by_replica"),
    (3, "rows_by_pool"),
    (5, "rows_by_folded"),
];

/// Makes the closed registry at `path` a file of schema version `to`, as a build of
/// that version leaves one: the tables later versions added are dropped and the
/// version is set back. The rows are left as they are, so a row may carry a field
/// its version's build never wrote (a binding in a version-1 file, say): what the
/// upgrade must index all the same.
pub fn downgrade(path: &Path, to: u64) {
    const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    for (since, table) in ADDED {
        if since > to {
            let def: TableDefinition<'static, (&str, &str), ()> = TableDefinition::new(table);
            assert!(txn.delete_table(def).unwrap(), "{table} is there to drop");
        }
    }
    txn.open_table(META)
        .unwrap()
        .insert("schema_version", to)
        .unwrap();
    txn.commit().unwrap();
}

pub fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

pub fn publisher(id: &str) -> Principal {
    Principal::new(id, [Role::Publisher])
}

pub fn request(session: Option<&SessionId>, names: &[&str]) -> RegisterRequest {
    RegisterRequest {
        agents: Vec::new(),
        provider_session_id: session.cloned(),
        protocol_version: None,
        llms: names
            .iter()
            .map(|n| LlmSpec {
                name: name(n),
                provider_type: "openai".into(),
                model: format!("{n}-model"),
                tier: None,
                pool: None,
                max_concurrent: None,
                state: None,
                access: Default::default(),
            })
            .collect(),
        capabilities: Vec::new(),
    }
}
