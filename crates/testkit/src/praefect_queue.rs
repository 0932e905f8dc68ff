//! Praefect's replication queue as its migrations leave it (Gitaly v14.10's
//! `internal/praefect/datastore`), and its own statements on it: for tests
//! and the benchmark, which run Praefect's SQL against our database.

/// The queue's type, tables and indexes.
pub const QUEUE_TABLES: &str = r#"
CREATE TYPE REPLICATION_JOB_STATE AS ENUM('ready', 'in_progress', 'completed', 'cancelled', 'failed', 'dead');
CREATE TABLE replication_queue_lock (
    id TEXT PRIMARY KEY
    , acquired BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE replication_queue (
    id BIGSERIAL PRIMARY KEY
    , state REPLICATION_JOB_STATE NOT NULL DEFAULT 'ready'
    , created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC')
    , updated_at TIMESTAMP WITHOUT TIME ZONE
    , attempt INTEGER NOT NULL DEFAULT 3
    , lock_id TEXT
    , job JSONB
    , meta JSONB
);
CREATE TABLE replication_queue_job_lock (
    job_id BIGINT REFERENCES replication_queue(id)
    , lock_id TEXT REFERENCES replication_queue_lock(id)
    , triggered_at TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC')
    , CONSTRAINT replication_queue_job_lock_pk PRIMARY KEY (job_id, lock_id)
);
CREATE INDEX virtual_target_on_replication_queue_idx
    ON replication_queue USING BTREE ((job->>'virtual_storage'), (job->>'target_node_storage'));
CREATE UNIQUE INDEX delete_replica_unique_index
    ON replication_queue ((job->>'virtual_storage'), (job->>'relative_path'))
    WHERE state NOT IN ('completed', 'cancelled', 'dead') AND job->>'change' = 'delete_replica';
CREATE INDEX replication_queue_target_index
    ON replication_queue ((job->>'virtual_storage'), (job->>'relative_path'), (job->>'target_node_storage'), (job->>'change'))
    WHERE state NOT IN ('completed', 'cancelled', 'dead');
"#;

/// The insert of Praefect's reconciler (`reconciler.go`, v14.10): its jobs
/// go into `replication_queue` by `INSERT … SELECT to_jsonb(…)` inside a
/// CTE, with the lock rows made after them, and `RETURNING` what it
/// scheduled. Which replicas it picks is Praefect's scan of its tables;
/// here they come as arrays ($1 virtual storages, $2 relative paths, $3
/// sources, NULL for a `delete_replica`, $4 targets, $5 changes), so a test
/// chooses them.
pub const RECONCILER_INSERT: &str = r#"
WITH reconciliation_jobs AS (
    INSERT INTO replication_queue (lock_id, job, meta)
    SELECT
        (virtual_storage || '|' || target_node_storage || '|' || relative_path),
        to_jsonb(reconciliation_jobs),
        jsonb_build_object('correlation_id', encode(random()::text::bytea, 'base64'))
    FROM (
        SELECT
            unnest($1::text[]) AS virtual_storage,
            unnest($2::text[]) AS relative_path,
            unnest($3::text[]) AS source_node_storage,
            unnest($4::text[]) AS target_node_storage,
            unnest($5::text[]) AS change
    ) AS reconciliation_jobs
    RETURNING lock_id, meta, job
),
create_locks AS (
    INSERT INTO replication_queue_lock(id)
    SELECT lock_id
    FROM reconciliation_jobs
    ON CONFLICT (id) DO NOTHING
)
SELECT
    meta->>'correlation_id',
    job->>'change',
    job->>'virtual_storage',
    job->>'relative_path',
    job->>'source_node_storage',
    job->>'target_node_storage'
FROM reconciliation_jobs"#;

/// Praefect's `valid_primaries` view as its migration
/// `20220211161203_json_job_state` leaves it (v14.10): the storages that may
/// become a repository's primary, which leaves out one with a pending
/// `delete_replica` event. With Praefect's `repository_assignments` table.
/// `healthy_storages` (a view over Praefect's `node_status`, fed by its
/// health checks) is not here: a test defines which storages are healthy.
pub const VALID_PRIMARIES: &str = r#"
CREATE TABLE IF NOT EXISTS repository_assignments (
    virtual_storage TEXT NOT NULL,
    relative_path TEXT NOT NULL,
    storage TEXT NOT NULL,
    repository_id BIGINT,
    PRIMARY KEY (virtual_storage, relative_path, storage)
);
CREATE VIEW valid_primaries AS
SELECT repository_id, virtual_storage, relative_path, storage
FROM (
    SELECT
        repository_id,
        repositories.virtual_storage,
        repositories.relative_path,
        storage,
        repository_assignments.storage IS NOT NULL
            OR bool_and(repository_assignments.storage IS NULL) OVER (PARTITION BY repository_id) AS eligible
    FROM repositories
    JOIN (SELECT repository_id, storage, generation FROM storage_repositories) AS storage_repositories USING (repository_id, generation)
    JOIN healthy_storages USING (virtual_storage, storage)
    LEFT JOIN repository_assignments USING (repository_id, storage)
    WHERE NOT EXISTS (
        SELECT FROM replication_queue
        WHERE state NOT IN ('completed', 'dead')
            AND job->>'change' = 'delete_replica'
            AND (job->>'repository_id')::bigint = repository_id
            AND job->>'target_node_storage' = storage
    )
) AS candidates
WHERE eligible;
"#;

/// Praefect 15.9's index that keeps `(job, state)` unique (migration
/// `20230118161145_replication_queue_unique_constraint`).
pub const QUEUE_UNIQUE_V15: &str =
    "CREATE UNIQUE INDEX replication_queue_constraint ON replication_queue (job, state)";

/// Praefect v14.10's Enqueue (`queue.go`), but for `::text` casts where Go's
/// driver reads the enum and the JSON columns as text.
pub const ENQUEUE_V14: &str = r#"
WITH insert_lock AS (
    INSERT INTO replication_queue_lock(id)
    VALUES ($1 || '|' || $2 || '|' || $3)
    ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id
    RETURNING id
)
INSERT INTO replication_queue(lock_id, job, meta)
SELECT insert_lock.id, $4::jsonb, $5::jsonb
FROM insert_lock
RETURNING id, state::text, created_at, updated_at, lock_id, attempt, job::text, meta::text"#;

/// Praefect's statement, but for `::text` casts where Go's driver reads the
/// enum and the JSON columns as text (the bench's sqlx has no JSON types).
pub const DEQUEUE: &str = r#"
WITH lock AS (
    SELECT id
    FROM replication_queue_lock
    WHERE id LIKE ($1 || '|' || $2 || '|%') AND NOT acquired
    FOR UPDATE SKIP LOCKED
)
, candidate AS (
    SELECT id
    FROM replication_queue
    WHERE id IN (
        SELECT DISTINCT FIRST_VALUE(queue.id) OVER (PARTITION BY lock_id, job->>'change'  ORDER BY queue.created_at)
        FROM replication_queue AS queue
        JOIN lock ON queue.lock_id = lock.id
        WHERE queue.state IN ('ready', 'failed' )
            AND NOT EXISTS (SELECT 1 FROM replication_queue_job_lock WHERE lock_id = queue.lock_id)
    )
    ORDER BY created_at
    LIMIT $3
    FOR UPDATE
)
, job AS (
    UPDATE replication_queue AS queue
    SET attempt = CASE WHEN job->>'change' = 'delete_replica' THEN queue.attempt ELSE queue.attempt - 1 END
        , state = 'in_progress'
        , updated_at = NOW() AT TIME ZONE 'UTC'
    FROM candidate
    WHERE queue.id = candidate.id
    RETURNING queue.id, queue.state, queue.created_at, queue.updated_at, queue.lock_id, queue.attempt, queue.job, queue.meta
)
, track_job_lock AS (
    INSERT INTO replication_queue_job_lock (job_id, lock_id, triggered_at)
    SELECT job.id, job.lock_id, NOW() AT TIME ZONE 'UTC'
    FROM job
    RETURNING lock_id
)
, acquire_lock AS (
    UPDATE replication_queue_lock AS lock
    SET acquired = TRUE
    FROM track_job_lock AS tracked
    WHERE lock.id = tracked.lock_id
)
SELECT id, state::text, created_at, updated_at, lock_id, attempt, job::text, meta::text
FROM job
ORDER BY id"#;
