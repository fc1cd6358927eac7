//! Throwaway databases for the tests, one per test, on each backend the store has.
//!
//! SQLite: a file in a fresh directory, removed with the [`TestDb`]. PostgreSQL: a fresh
//! database on the private server the test run provides in `XTLS_TEST_POSTGRES`
//! (`postgres://USER@HOST:PORT`, an account that may create databases). `scripts/test` starts
//! one (`tests/e2e/postgres.py run -- …`) and stops it by its pid afterwards, databases and all.
//! Shared by the store's unit tests (included by path) and the integration tests.

#![allow(dead_code, unused_macros)]

use std::path::PathBuf;

use sqlx::Connection as _;

/// The variable naming the PostgreSQL server for the tests.
pub const POSTGRES_VAR: &str = "XTLS_TEST_POSTGRES";

/// A database a test owns: its store URL, and the directory to remove (SQLite).
pub struct TestDb {
    /// The store URL.
    pub url: String,
    dir: Option<PathBuf>,
}

impl TestDb {
    /// A SQLite file in a fresh directory.
    pub async fn sqlite() -> TestDb {
        let dir = std::env::temp_dir().join(format!(
            "xtls-test-db-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TestDb {
            url: format!("sqlite://{}/test.db", dir.display()),
            dir: Some(dir),
        }
    }

    /// A fresh, empty database on the test run's PostgreSQL.
    pub async fn postgres() -> TestDb {
        let server = std::env::var(POSTGRES_VAR).unwrap_or_else(|_| {
            panic!(
                "{POSTGRES_VAR} is not set: these tests need a PostgreSQL server to create \
                 databases on. scripts/test provides one; to run cargo by hand, wrap it: \
                 python3 tests/e2e/postgres.py run -- cargo nextest run"
            )
        });
        let server = server.trim_end_matches('/');
        let name = format!("xtls_test_{}_{}", std::process::id(), rand::random::<u32>());
        let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {server}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        TestDb {
            url: format!("{server}/{name}"),
            dir: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs each named `async fn(TestDb)` twice, as the tests `NAME::sqlite` and `NAME::postgres`.
/// The calling module must have `TestDb` in scope.
macro_rules! on_each_backend {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn sqlite() {
                super::$test(super::TestDb::sqlite().await).await
            }

            #[tokio::test]
            async fn postgres() {
                super::$test(super::TestDb::postgres().await).await
            }
        }
    )*};
}
