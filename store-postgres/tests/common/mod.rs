//! Fixtures shared by the PostgreSQL store's tests: a store on a fresh database of the
//! test binary's shared server, and the readiness check that skips loudly when
//! PostgreSQL is not installed.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::ops::Deref;
use std::sync::Arc;

use virtual_llm_postgres::{PgOptions, PgStore, testing};

/// Whether PostgreSQL is here; prints the loud skip line when it is not (and panics
/// when services are required).
pub fn postgres_installed() -> bool {
    testing::shared().is_some()
}

/// A store on a new, empty database; with its URL, to open more stores on it.
pub struct TempStore {
    pub store: Arc<PgStore>,
    pub url: String,
}

impl TempStore {
    pub async fn new() -> Self {
        Self::with(PgOptions::default()).await
    }

    pub async fn with(options: PgOptions) -> Self {
        let url = testing::fresh_database()
            .await
            .expect("callers check postgres_installed first");
        let store = PgStore::connect_with(&url, options).await.unwrap();
        TempStore {
            store: Arc::new(store),
            url,
        }
    }

    /// Another store on the same database: another replica.
    pub async fn replica(&self) -> Arc<PgStore> {
        Arc::new(PgStore::connect(&self.url).await.unwrap())
    }
}

impl Deref for TempStore {
    type Target = PgStore;
    fn deref(&self) -> &PgStore {
        &self.store
    }
}

/// A tokio-postgres client on `url`, for tests that look at or change the tables
/// behind the store's back.
pub async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}
