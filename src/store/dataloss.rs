//! Lagging replicas, as `praefect dataloss` finds them: repositories of the
//! given virtual storages with an assigned replica that is outdated (its
//! generation is below the repository's) or missing (no
//! `storage_repositories` row). Assignment follows Praefect: the
//! `repository_assignments` rows of configured storages when the table
//! exists and holds some for the repository, otherwise every configured
//! storage of the virtual storage.

use super::RepositoryStore;
use super::StoreError;
use super::failed;

/// One storage of a lagging repository: a replica row, an assigned storage
/// without one, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    pub storage: String,
    /// The replica's generation; `None` when it has no row.
    pub generation: Option<i64>,
    pub assigned: bool,
    /// Whether the storage is configured for the virtual storage; a row may
    /// remain for a storage taken out of the configuration.
    pub configured: bool,
}

/// A repository with at least one assigned replica behind its generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaggingRepository {
    pub repository_id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    /// Where its replicas live on disk (Praefect 14.5 and later); `None`
    /// means the relative path.
    pub replica_path: Option<String>,
    pub primary: Option<String>,
    /// The latest generation: the repository's, or a replica's when higher.
    pub generation: i64,
    /// Sorted by storage name.
    pub replicas: Vec<ReplicaState>,
}

// The assigned storages of each repository, with and without Praefect's
// assignments table (a standalone store has none).
pub(super) const ASSIGNED_BY_TABLE: &str = "
    SELECT r.repository_id, c.storage
    FROM repos r
    JOIN configured c USING (virtual_storage)
    WHERE (
        SELECT COUNT(*) = 0 OR COUNT(*) FILTER (WHERE a.storage = c.storage) > 0
        FROM repository_assignments a
        WHERE a.repository_id = r.repository_id
        AND (a.virtual_storage, a.storage) IN (SELECT virtual_storage, storage FROM configured)
    )";
pub(super) const ASSIGNED_ALL: &str = "
    SELECT r.repository_id, c.storage
    FROM repos r
    JOIN configured c USING (virtual_storage)";

/// A repository with an assigned replica behind its latest generation.
pub(super) const LAGGING: &str =
    "bool_or(p.assigned AND COALESCE(p.generation, -1) < l.generation)";

/// The per-repository statement over the repositories of `$3` (virtual
/// storages), given the configured pairs `$1`/`$2`: with `range`, only ids in
/// `($4, $5]`; only the repositories `having` holds for.
pub(super) fn query(assigned: &str, range: bool, having: &str) -> String {
    // The replica rows are bounded by the range too, so each batch reads
    // them by the (repository_id, storage) index instead of scanning them.
    let (range, replica_range) = if range {
        (
            "AND repository_id > $4 AND repository_id <= $5",
            "WHERE storage_repositories.repository_id > $4 AND storage_repositories.repository_id <= $5",
        )
    } else {
        ("", "")
    };
    format!(
        "WITH configured AS (
            SELECT unnest($1::text[]) AS virtual_storage, unnest($2::text[]) AS storage
        ),
        repos AS (
            SELECT repository_id, virtual_storage, relative_path, replica_path, \"primary\",
                   generation
            FROM repositories
            WHERE virtual_storage = ANY($3) {range}
        ),
        assigned AS ({assigned}),
        replicas AS (
            SELECT repository_id, storage, sr.generation, assigned.storage IS NOT NULL AS assigned
            FROM (
                SELECT repository_id, storage, storage_repositories.generation
                FROM storage_repositories
                JOIN repos USING (repository_id)
                {replica_range}
            ) AS sr
            FULL JOIN assigned USING (repository_id, storage)
        ),
        latest AS (
            SELECT r.repository_id,
                   GREATEST(COALESCE(r.generation, -1), COALESCE(MAX(p.generation), -1)) AS generation
            FROM repos r
            JOIN replicas p USING (repository_id)
            GROUP BY r.repository_id, r.generation
        )
        SELECT r.repository_id, r.virtual_storage, r.relative_path, r.replica_path, r.\"primary\",
               l.generation,
               array_agg(p.storage ORDER BY p.storage),
               array_agg(COALESCE(p.generation, -1) ORDER BY p.storage),
               array_agg(p.generation IS NOT NULL ORDER BY p.storage),
               array_agg(p.assigned ORDER BY p.storage),
               array_agg(c.storage IS NOT NULL ORDER BY p.storage)
        FROM repos r
        JOIN latest l USING (repository_id)
        JOIN replicas p USING (repository_id)
        LEFT JOIN configured c ON c.virtual_storage = r.virtual_storage AND c.storage = p.storage
        GROUP BY r.repository_id, r.virtual_storage, r.relative_path, r.replica_path,
                 r.\"primary\", l.generation
        HAVING {having}
        ORDER BY r.virtual_storage, r.relative_path"
    )
}

pub(super) type Row = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    Vec<String>,
    Vec<i64>,
    Vec<bool>,
    Vec<bool>,
    Vec<bool>,
);

impl RepositoryStore {
    /// The lagging repositories of `virtual_storages`, given the configured
    /// (virtual storage, storage) pairs; ordered by virtual storage and path.
    /// Reads only.
    pub async fn lagging_repositories(
        &self,
        configured: &[(String, String)],
        virtual_storages: &[String],
    ) -> Result<Vec<LaggingRepository>, StoreError> {
        const OPERATION: &str = "lagging_repositories";
        let pool = self.pool();
        let (has_assignments,): (bool,) =
            sqlx::query_as("SELECT to_regclass('repository_assignments') IS NOT NULL")
                .persistent(false)
                .fetch_one(pool)
                .await
                .map_err(failed(OPERATION))?;
        static WITH_TABLE: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| query(ASSIGNED_BY_TABLE, false, LAGGING));
        static WITHOUT_TABLE: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| query(ASSIGNED_ALL, false, LAGGING));
        let sql: &'static str = if has_assignments {
            WITH_TABLE.as_str()
        } else {
            WITHOUT_TABLE.as_str()
        };
        let (vs, storages): (Vec<String>, Vec<String>) = configured.iter().cloned().unzip();
        let rows: Vec<Row> = sqlx::query_as(sql)
            .bind(vs)
            .bind(storages)
            .bind(virtual_storages)
            .persistent(false)
            .fetch_all(pool)
            .await
            .map_err(failed(OPERATION))?;
        Ok(rows.into_iter().map(LaggingRepository::from_row).collect())
    }
}

impl LaggingRepository {
    pub(super) fn from_row(row: Row) -> Self {
        let (id, vs, path, replica_path, primary, generation, names, gens, present, assigned, conf) =
            row;
        let replicas = names
            .into_iter()
            .zip(gens)
            .zip(present)
            .zip(assigned.into_iter().zip(conf))
            .map(
                |(((storage, g), present), (assigned, configured))| ReplicaState {
                    storage,
                    generation: present.then_some(g),
                    assigned,
                    configured,
                },
            )
            .collect();
        LaggingRepository {
            repository_id: id,
            virtual_storage: vs,
            relative_path: path,
            replica_path,
            primary,
            generation,
            replicas,
        }
    }
}
