//! Whose schema the database holds, checked before any migration runs.
//!
//! The repository store is Praefect's: on a Praefect database the tables are
//! Praefect's, created and upgraded by `praefect sql-migrate`, and only our
//! own tables are added. Creating Praefect's tables ourselves would make
//! Praefect's first migrations fail later, so on an empty database nothing
//! is created unless asked for a cluster without Praefect (`migrate
//! --standalone`), which creates the tables in Praefect's shape for our use
//! only.

use sqlx::PgConnection;

use super::StoreError;
use super::error::failed;

/// The Praefect migration whose schema the store needs: `storage_repositories`
/// keyed by `repository_id` with cascading deletes, Praefect 14.5's schema.
pub const REQUIRED_PRAEFECT_MIGRATION: &str = "20210922143752_storage_repositories_cascade_delete";
/// The Praefect release that first has [`REQUIRED_PRAEFECT_MIGRATION`].
pub const REQUIRED_PRAEFECT_VERSION: &str = "14.5";

/// What may be done with a database that holds no repository store yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyDatabase {
    /// Refuse: Praefect's own migrations must create its tables.
    Refuse,
    /// Create the tables for a cluster without Praefect.
    CreateStandalone,
}

/// What the database holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaFound {
    /// Praefect's `schema_migrations`, newest migration first.
    Praefect {
        has_required: bool,
        newest: Option<String>,
    },
    /// Tables created by `migrate --standalone` (ours, no Praefect).
    Standalone,
    /// Neither Praefect's tables nor ours.
    Empty,
    /// A `repositories` table that neither Praefect's migrations nor ours record.
    Unknown,
}

/// Reads what the database on `conn` holds.
pub async fn inspect(conn: &mut PgConnection) -> Result<SchemaFound, StoreError> {
    const OPERATION: &str = "inspect_schema";
    let (praefect, ours, repositories): (bool, bool, bool) = sqlx::query_as(
        "SELECT to_regclass('schema_migrations') IS NOT NULL,
                to_regclass('_sqlx_migrations') IS NOT NULL,
                to_regclass('repositories') IS NOT NULL",
    )
    .persistent(false)
    .fetch_one(&mut *conn)
    .await
    .map_err(failed(OPERATION))?;
    if praefect {
        let (has_required, newest): (bool, Option<String>) = sqlx::query_as(
            "SELECT EXISTS (SELECT FROM schema_migrations WHERE id = $1), max(id)
            FROM schema_migrations",
        )
        .bind(REQUIRED_PRAEFECT_MIGRATION)
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
        .map_err(failed(OPERATION))?;
        return Ok(SchemaFound::Praefect {
            has_required,
            newest,
        });
    }
    Ok(match (repositories, ours) {
        (false, _) => SchemaFound::Empty,
        (true, true) => SchemaFound::Standalone,
        (true, false) => SchemaFound::Unknown,
    })
}

/// Whether migrations may run on what was found; the error says what to do.
pub fn check(found: &SchemaFound, empty: EmptyDatabase) -> Result<(), StoreError> {
    match found {
        SchemaFound::Praefect {
            has_required: true, ..
        }
        | SchemaFound::Standalone => Ok(()),
        SchemaFound::Empty if empty == EmptyDatabase::CreateStandalone => Ok(()),
        SchemaFound::Praefect {
            has_required: false,
            newest,
        } => Err(StoreError::Schema {
            problem: format!(
                "Praefect's schema here is older than Praefect {REQUIRED_PRAEFECT_VERSION} \
                 (its newest migration is {}; needed: {REQUIRED_PRAEFECT_MIGRATION})",
                newest.as_deref().unwrap_or("none")
            ),
            fix: format!(
                "upgrade Praefect to {REQUIRED_PRAEFECT_VERSION} or later and run \
                 `praefect -config <praefect config.toml> sql-migrate` first"
            ),
        }),
        SchemaFound::Empty => Err(StoreError::Schema {
            problem: "the database holds no Praefect schema".into(),
            fix: "run `praefect -config <praefect config.toml> sql-migrate` first; for a \
                  cluster without Praefect, run `gitaly-replicator migrate --standalone` \
                  (Praefect cannot take such a database over later)"
                .into(),
        }),
        SchemaFound::Unknown => Err(StoreError::Schema {
            problem: "the database has a repositories table but neither Praefect's \
                      schema_migrations nor gitaly-replicator's migrations"
                .into(),
            fix: "point [database] at Praefect's database".into(),
        }),
    }
}
