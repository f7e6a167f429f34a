//! Fixtures shared by the redb store's tests: a store in a temporary directory that
//! lives as long as the guard, principals and register requests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

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

pub fn name(s: &str) -> LlmName {
    LlmName::parse(s).unwrap()
}

pub fn publisher(id: &str) -> Principal {
    Principal::new(id, [Role::Publisher])
}

pub fn request(session: Option<&SessionId>, names: &[&str]) -> RegisterRequest {
    RegisterRequest {
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
            })
            .collect(),
    }
}
