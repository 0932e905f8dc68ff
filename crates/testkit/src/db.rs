//! A Postgres database per test: created on the shared server with a unique
//! name, and dropped (with `FORCE`) when the fixture is dropped. What goes
//! into it (migrations, tables) is the test's business.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;

/// Overrides the server the test databases are created on; the URL names a
/// database to connect to for CREATE and DROP.
pub const SERVER_URL_ENV: &str = "REPLICATOR_TEST_DATABASE_URL";
const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct TestDatabase {
    /// A pool of five connections to it.
    pub pool: PgPool,
    /// URL of this test's own database.
    pub url: String,
    pub name: String,
    server: PgConnectOptions,
}

impl TestDatabase {
    /// A fresh, empty database.
    pub async fn new() -> Self {
        let server_url =
            std::env::var(SERVER_URL_ENV).unwrap_or_else(|_| DEFAULT_SERVER_URL.to_owned());
        let server = PgConnectOptions::from_str(&server_url).unwrap();
        let name = format!("gr_test_{}", uuid::Uuid::new_v4().simple());

        // Same server, user and options; only the database differs.
        let mut url = url::Url::parse(&server_url).unwrap();
        url.set_path(&name);
        let url = url.to_string();
        // Lazy, so the fixture (which drops the database) exists before the
        // database does and nothing in between can leak it.
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_lazy(&url)
            .unwrap();
        let db = Self {
            pool,
            url,
            name,
            server,
        };

        let mut admin = PgConnection::connect_with(&db.server).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{}\"",
            db.name
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        admin.close().await.unwrap();
        db
    }

    /// Another pool on the same database, as a second process would have.
    pub async fn second_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(5)
            .connect(&self.url)
            .await
            .unwrap()
    }

    /// The id of the repository at `relative_path`, if there is one.
    pub async fn repository_id(&self, virtual_storage: &str, relative_path: &str) -> Option<i64> {
        sqlx::query_scalar(
            "SELECT repository_id FROM repositories
            WHERE virtual_storage = $1 AND relative_path = $2",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on;
        // a thread with its own runtime does the async cleanup. FORCE ends
        // the sessions the test's pools still hold.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect_with(&server).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop test database {}: cleanup panicked",
                self.name
            ),
        }
    }
}
