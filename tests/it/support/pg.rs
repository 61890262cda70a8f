//! A fresh Postgres database per test, on the server named by `ORCH_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`). An unreachable server fails the
//! test: CI must never pass by skipping.
//!
//! Tests that restart the server take `exclusive()`; every other Postgres test holds a
//! shared guard for its life, so a restart never pulls the database from under them.

use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static SERVER: RwLock<()> = RwLock::const_new(());

pub fn server_url() -> String {
    std::env::var("ORCH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

async fn admin() -> PgConnection {
    let url = server_url();
    match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!("Postgres at ORCH_TEST_POSTGRES_URL ({url}) is unreachable: {e}"),
        Err(_) => panic!("Postgres at ORCH_TEST_POSTGRES_URL ({url}) did not answer in 10 s"),
    }
}

/// A database that exists for one test and is dropped (best-effort) after it.
pub struct TestDb {
    pub url: String,
    name: String,
    _shared: Option<RwLockReadGuard<'static, ()>>,
}

impl TestDb {
    pub async fn create() -> Self {
        let shared = SERVER.read().await;
        Self::create_holding(Some(shared)).await
    }

    /// A database for a test that already holds `exclusive()`.
    pub async fn create_unshared() -> Self {
        Self::create_holding(None).await
    }

    async fn create_holding(shared: Option<RwLockReadGuard<'static, ()>>) -> Self {
        let name = format!("orch_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin().await;
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = conn.close().await;
        Self {
            url: with_database(&server_url(), &name),
            name,
            _shared: shared,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(Ok(mut conn)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    PgConnection::connect(&server_url()),
                )
                .await
                {
                    let _ = conn
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Sole use of the server (to restart it): waits for every other Postgres test to end.
pub async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERVER.write().await
}
