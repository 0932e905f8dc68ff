//! The demo's own database: created on the server `--database-url` names,
//! under a name unique to the run, and dropped at the end (`WITH (FORCE)`,
//! which ends the sessions the service may still hold).

use crate::error::DemoError;
use crate::preflight::{mask_password, server_options};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

#[derive(Debug, Clone)]
pub struct DemoDatabase {
    pub name: String,
    /// URL of the demo database: the server URL with its path replaced.
    pub url: String,
    server: PgConnectOptions,
}

impl DemoDatabase {
    /// `CREATE DATABASE <name>` on the server of `server_url`.
    pub async fn create(server_url: &str, name: &str) -> Result<DemoDatabase, DemoError> {
        let server = server_options(server_url)?;
        let mut url = url::Url::parse(server_url).map_err(|e| {
            DemoError::Usage(format!(
                "--database-url {}: expected a postgres:// URL: {e}",
                mask_password(server_url)
            ))
        })?;
        url.set_path(name);
        let mut admin = PgConnection::connect_with(&server)
            .await
            .map_err(DemoError::database("connecting to Postgres"))?;
        // The name is ours (letters, digits, underscores): safe to splice.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .map_err(DemoError::database(format!("creating database {name}")))?;
        let _ = admin.close().await;
        Ok(DemoDatabase {
            name: name.to_owned(),
            url: url.to_string(),
            server,
        })
    }

    /// The URL to show: password masked.
    pub fn display_url(&self) -> String {
        mask_password(&self.url)
    }

    /// The database `name` of an earlier run, on the server of `server_url`.
    pub fn existing(server_url: &str, name: &str) -> Result<DemoDatabase, DemoError> {
        Ok(DemoDatabase {
            name: name.to_owned(),
            url: String::new(),
            server: server_options(server_url)?,
        })
    }

    /// Drops the database, ending its sessions first; answers whether it
    /// was there.
    pub async fn drop_database(&self) -> Result<bool, DemoError> {
        let mut admin = PgConnection::connect_with(&self.server)
            .await
            .map_err(DemoError::database("connecting to Postgres"))?;
        let existed: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
                .bind(&self.name)
                .fetch_one(&mut admin)
                .await
                .map_err(DemoError::database("connecting to Postgres"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .map_err(DemoError::database(format!(
            "dropping database {}",
            self.name
        )))?;
        let _ = admin.close().await;
        Ok(existed)
    }
}
