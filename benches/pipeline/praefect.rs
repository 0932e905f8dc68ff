//! Praefect v14's replication queue and the replication manager's worker
//! loop, written from Gitaly v14.10's `internal/praefect/datastore/queue.go`,
//! `repository_store.go`, its migrations and `internal/praefect/replicator.go`:
//! the same tables, indexes and triggers, the same statements, one worker per
//! (virtual storage, target) dequeuing 10 jobs and running them one by one,
//! and the same idle backoff (1 s doubling to 5 s). It runs on the bench's
//! Postgres, in a schema of its own, and calls the bench's recording Gitaly
//! through the service's own gRPC client, so both sides pay the same call.

use crate::env::{BenchEnv, CpuSample, CpuSplit};
use backoff::backoff::Backoff;
use gitaly_replicator::NodeClient;
use gitaly_replicator::proto::gitaly as pb;
use gitaly_replicator::{CallContext, metadata};
use serde::Deserialize;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Executor, Row};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Praefect's default `replication.batch_size`.
pub const DEQUEUE_BATCH: i64 = 10;
/// `cmd/praefect/main.go`: `ExpBackoffFactory{Start: time.Second, Max: 5 * time.Second}`.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
pub const TARGET: &str = "gitaly-2";
pub const SOURCE: &str = "gitaly-1";

/// The schema as Praefect's migrations leave it in v14.10, for the tables
/// the queue and the replicator touch (`repository_assignments`,
/// `node_status` and the views are left out: nothing here reads them).
const SCHEMA: &str = r#"
CREATE TABLE repositories (
    repository_id BIGSERIAL PRIMARY KEY,
    virtual_storage TEXT,
    relative_path TEXT,
    generation BIGINT,
    "primary" TEXT,
    replica_path TEXT
);
CREATE UNIQUE INDEX repository_lookup_index ON repositories (virtual_storage, relative_path);
CREATE INDEX repository_replica_path_index ON repositories (replica_path, virtual_storage);
CREATE TABLE storage_repositories (
    virtual_storage TEXT,
    relative_path TEXT,
    storage TEXT,
    generation BIGINT NOT NULL,
    repository_id BIGINT NOT NULL REFERENCES repositories (repository_id) ON DELETE CASCADE,
    verified_at TIMESTAMPTZ,
    verification_leased_until TIMESTAMPTZ,
    PRIMARY KEY (virtual_storage, relative_path, storage)
);
CREATE UNIQUE INDEX storage_repositories_new_pkey ON storage_repositories (repository_id, storage);
CREATE INDEX verification_queue ON storage_repositories (verified_at NULLS FIRST)
    WHERE verification_leased_until IS NULL;
CREATE FUNCTION notify_on_change() RETURNS TRIGGER AS $$
    DECLARE
        old_val JSON DEFAULT NULL;
        new_val JSON DEFAULT NULL;
    BEGIN
        CASE TG_OP
        WHEN 'INSERT' THEN
            SELECT JSON_AGG(ROW_TO_JSON(t.*)) INTO new_val FROM NEW AS t;
        WHEN 'UPDATE' THEN
            SELECT JSON_AGG(ROW_TO_JSON(t.*)) INTO old_val FROM OLD AS t;
            SELECT JSON_AGG(ROW_TO_JSON(t.*)) INTO new_val FROM NEW AS t;
        WHEN 'DELETE' THEN
            SELECT JSON_AGG(ROW_TO_JSON(t.*)) INTO old_val FROM OLD AS t;
        END CASE;
        PERFORM PG_NOTIFY(TG_ARGV[TG_NARGS-1], JSON_BUILD_OBJECT('old', old_val, 'new', new_val)::TEXT);
        RETURN NULL;
    END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER notify_on_delete AFTER DELETE ON repositories
    REFERENCING OLD TABLE AS OLD FOR EACH STATEMENT
    EXECUTE FUNCTION notify_on_change('repositories_updates');
CREATE TRIGGER notify_on_insert AFTER INSERT ON storage_repositories
    REFERENCING NEW TABLE AS NEW FOR EACH STATEMENT
    EXECUTE FUNCTION notify_on_change('storage_repositories_updates');
CREATE TRIGGER notify_on_update AFTER UPDATE ON storage_repositories
    REFERENCING OLD TABLE AS OLD NEW TABLE AS NEW FOR EACH STATEMENT
    EXECUTE FUNCTION notify_on_change('storage_repositories_updates');
CREATE TRIGGER notify_on_delete AFTER DELETE ON storage_repositories
    REFERENCING OLD TABLE AS OLD FOR EACH STATEMENT
    EXECUTE FUNCTION notify_on_change('storage_repositories_updates');
"#;

use testkit::praefect_queue::{DEQUEUE, ENQUEUE_V14 as ENQUEUE};

const ACKNOWLEDGE: &str = r#"
WITH existing AS (
    SELECT id, lock_id, updated_at, job
    FROM replication_queue
    WHERE id = ANY($1)
    AND state = 'in_progress'
    FOR UPDATE
)
, deleted AS (
    DELETE FROM replication_queue AS queue
    USING existing
    WHERE ($2::REPLICATION_JOB_STATE = 'dead' AND existing.id = queue.id) OR (
        $2::REPLICATION_JOB_STATE = 'completed'
        AND (existing.id = queue.id OR (
            queue.state = 'ready'
            AND queue.created_at < existing.updated_at
            AND queue.lock_id = existing.lock_id
            AND queue.job->>'change' = existing.job->>'change'
            AND COALESCE(queue.job->>'source_node_storage', '') = COALESCE(existing.job->>'source_node_storage', ''))
        )
    )
    RETURNING queue.id, queue.lock_id
)
, updated AS (
    UPDATE replication_queue AS queue
    SET state = $2::REPLICATION_JOB_STATE,
        updated_at = NOW() AT TIME ZONE 'UTC'
    FROM existing
    WHERE existing.id = queue.id
    RETURNING queue.id, queue.lock_id
)
, removed_job_lock AS (
    DELETE FROM replication_queue_job_lock AS job_lock
    USING (SELECT * FROM deleted UNION SELECT * FROM updated) AS to_release
    WHERE job_lock.job_id = to_release.id AND job_lock.lock_id = to_release.lock_id
    RETURNING to_release.lock_id
)
, release AS (
    UPDATE replication_queue_lock
    SET acquired = FALSE
    WHERE id IN (
        SELECT existing.lock_id
        FROM (SELECT lock_id, COUNT(*) AS amount FROM removed_job_lock GROUP BY lock_id) AS removed
        JOIN (
            SELECT lock_id, COUNT(*) AS amount
            FROM replication_queue_job_lock
            WHERE lock_id IN (SELECT lock_id FROM removed_job_lock)
            GROUP BY lock_id
        ) AS existing ON removed.lock_id = existing.lock_id AND removed.amount = existing.amount
    )
)
SELECT id
FROM existing"#;

const GET_REPLICA_PATH: &str = "SELECT replica_path FROM repositories WHERE repository_id = $1";

const GET_REPLICATED_GENERATION: &str = r#"
SELECT storage, generation
FROM storage_repositories
WHERE repository_id = $1
AND storage = ANY($2)"#;

const SET_GENERATION: &str = r#"
WITH repository AS (
    UPDATE repositories SET generation = $3
    WHERE repository_id = $1
    AND   COALESCE(repositories.generation, -1) < $3
)
INSERT INTO storage_repositories (
    repository_id,
    virtual_storage,
    relative_path,
    storage,
    generation
)
SELECT
    repository_id,
    virtual_storage,
    $4,
    $2,
    $3
FROM repositories
WHERE repository_id = $1
ON CONFLICT (repository_id, storage) DO UPDATE SET
    relative_path = EXCLUDED.relative_path,
    generation = EXCLUDED.generation"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Maintenance,
    Update,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Maintenance => "maintenance",
            Kind::Update => "update",
        }
    }

    fn change(self) -> &'static str {
        match self {
            Kind::Maintenance => "optimize_repository",
            Kind::Update => "update",
        }
    }
}

/// `datastore.ReplicationJob` as Praefect stores it in `replication_queue.job`.
#[derive(Deserialize)]
struct ReplicationJob {
    repository_id: i64,
    change: String,
    relative_path: String,
    target_node_storage: String,
    source_node_storage: String,
}

struct Event {
    id: i64,
    attempt: i32,
    job: ReplicationJob,
    correlation_id: Option<String>,
}

pub fn relative_path(i: usize) -> String {
    format!("@hashed/{:02x}/{i}.git", i % 256)
}

fn replica_path(id: i64) -> String {
    format!(
        "@cluster/repositories/{:02x}/{:02x}/{id}",
        id % 256,
        (id / 256) % 256
    )
}

/// The job Praefect's coordinator enqueues for repository `i` (id `i + 1`).
pub fn job_json(vs: &str, kind: Kind, i: usize) -> String {
    let id = i as i64 + 1;
    json!({
        "repository_id": id,
        "replica_path": replica_path(id),
        "change": kind.change(),
        "relative_path": relative_path(i),
        "target_node_storage": TARGET,
        "source_node_storage": if kind == Kind::Update { SOURCE } else { "" },
        "virtual_storage": vs,
        "params": null,
    })
    .to_string()
}

/// Praefect's queue and repository store in a schema of their own.
pub struct Queue {
    pool: PgPool,
    admin: PgPool,
    schema: String,
}

impl Queue {
    pub async fn create(db_url: &str, connections: u32) -> anyhow::Result<Queue> {
        let schema = format!(
            "praefect_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(db_url)
            .await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await?;
        let options = PgConnectOptions::from_str(db_url)?.options([("search_path", &schema)]);
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(testkit::praefect_queue::QUEUE_TABLES)
            .execute(&pool)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Queue {
            pool,
            admin,
            schema,
        })
    }

    pub async fn drop_schema(self) {
        self.pool.close().await;
        let _ = self
            .admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                self.schema
            )))
            .await;
        self.admin.close().await;
    }

    /// `PostgresReplicationEventQueue.Enqueue`.
    pub async fn enqueue(&self, vs: &str, job: &str, meta: &str) -> anyhow::Result<i64> {
        let v: serde_json::Value = serde_json::from_str(job)?;
        let field = |k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("").to_owned();
        let row = sqlx::query(ENQUEUE)
            .bind(vs)
            .bind(field("target_node_storage"))
            .bind(field("relative_path"))
            .bind(job)
            .bind(meta)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("id")?)
    }

    /// `PostgresReplicationEventQueue.Dequeue`, decoding every column as
    /// Praefect's `scanReplicationEvents` does.
    async fn dequeue(&self, vs: &str, target: &str, count: i64) -> anyhow::Result<Vec<Event>> {
        let rows = sqlx::query(DEQUEUE)
            .bind(vs)
            .bind(target)
            .bind(count)
            .fetch_all(&self.pool)
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let _state: String = row.try_get("state")?;
            let _created: time::PrimitiveDateTime = row.try_get("created_at")?;
            let _updated: Option<time::PrimitiveDateTime> = row.try_get("updated_at")?;
            let _lock: Option<String> = row.try_get("lock_id")?;
            let job: String = row.try_get("job")?;
            let meta: Option<String> = row.try_get("meta")?;
            let correlation_id = meta
                .as_deref()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .and_then(|m| m.get("correlation_id")?.as_str().map(str::to_owned));
            events.push(Event {
                id: row.try_get("id")?,
                attempt: row.try_get("attempt")?,
                job: serde_json::from_str(&job)?,
                correlation_id,
            });
        }
        Ok(events)
    }

    /// `PostgresReplicationEventQueue.Acknowledge`.
    async fn acknowledge(&self, state: &str, ids: &[i64]) -> anyhow::Result<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(ACKNOWLEDGE)
            .bind(ids)
            .bind(state)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get("id").map_err(anyhow::Error::from))
            .collect()
    }

    async fn get_replica_path(&self, repository_id: i64) -> anyhow::Result<String> {
        let row = sqlx::query(GET_REPLICA_PATH)
            .bind(repository_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| anyhow::anyhow!("repository {repository_id} not found"))?;
        Ok(row.try_get("replica_path")?)
    }

    /// `GetReplicatedGeneration`: the source's generation, or None where the
    /// target already holds it (Praefect's `DowngradeAttemptedError`, after
    /// which the job completes without replicating).
    async fn get_replicated_generation(
        &self,
        repository_id: i64,
        source: &str,
        target: &str,
    ) -> anyhow::Result<Option<i64>> {
        let rows = sqlx::query(GET_REPLICATED_GENERATION)
            .bind(repository_id)
            .bind(vec![source.to_owned(), target.to_owned()])
            .fetch_all(&self.pool)
            .await?;
        let (mut source_gen, mut target_gen) = (-1_i64, -1_i64);
        for row in rows {
            let storage: String = row.try_get("storage")?;
            let generation: i64 = row.try_get("generation")?;
            if storage == source {
                source_gen = generation;
            } else if storage == target {
                target_gen = generation;
            } else {
                anyhow::bail!("unexpected storage: {storage}");
            }
        }
        if target_gen != -1 && target_gen >= source_gen {
            return Ok(None);
        }
        Ok(Some(source_gen))
    }

    async fn set_generation(
        &self,
        repository_id: i64,
        storage: &str,
        relative_path: &str,
        generation: i64,
    ) -> anyhow::Result<()> {
        sqlx::query(SET_GENERATION)
            .bind(repository_id)
            .bind(storage)
            .bind(generation)
            .bind(relative_path)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Repositories 1..=n at generation 1 on the source, as Praefect's
    /// `CreateRepository` leaves them. The notification triggers are off
    /// meanwhile, as in Praefect's own bulk migrations: one notification
    /// for 10,000 rows exceeds NOTIFY's 8,000-byte payload.
    pub async fn seed_repositories(&self, vs: &str, n: usize) -> anyhow::Result<()> {
        sqlx::raw_sql("ALTER TABLE storage_repositories DISABLE TRIGGER USER")
            .execute(&self.pool)
            .await?;
        for start in (0..n).step_by(10_000) {
            let end = (start + 10_000).min(n);
            let ids: Vec<i64> = (start..end).map(|i| i as i64 + 1).collect();
            let paths: Vec<String> = (start..end).map(relative_path).collect();
            let replicas: Vec<String> = ids.iter().map(|&id| replica_path(id)).collect();
            sqlx::query(
                r#"INSERT INTO repositories (repository_id, virtual_storage, relative_path, generation, "primary", replica_path)
                   SELECT id, $1, p, 1, $5, r FROM unnest($2::bigint[], $3::text[], $4::text[]) AS t(id, p, r)"#,
            )
            .bind(vs)
            .bind(&ids)
            .bind(&paths)
            .bind(&replicas)
            .bind(SOURCE)
            .execute(&self.pool)
            .await?;
            sqlx::query(
                r#"INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
                   SELECT id, $1, p, $4, 1 FROM unnest($2::bigint[], $3::text[]) AS t(id, p)"#,
            )
            .bind(vs)
            .bind(&ids)
            .bind(&paths)
            .bind(SOURCE)
            .execute(&self.pool)
            .await?;
        }
        sqlx::raw_sql("ALTER TABLE storage_repositories ENABLE TRIGGER USER")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A backlog of one job per entry of `repos` (the job's repository),
    /// with the rows that many calls of `enqueue` would leave (a lock row
    /// per repository, job rows with increasing created_at), written 10,000
    /// at a time because the setup is not what is measured; then ANALYZE,
    /// as autovacuum would have done on a live queue.
    pub async fn load_backlog(&self, vs: &str, kind: Kind, repos: &[usize]) -> anyhow::Result<()> {
        for (chunk_no, chunk) in repos.chunks(10_000).enumerate() {
            let locks: Vec<String> = chunk
                .iter()
                .map(|&r| format!("{vs}|{TARGET}|{}", relative_path(r)))
                .collect();
            let jobs: Vec<String> = chunk.iter().map(|&r| job_json(vs, kind, r)).collect();
            let start = chunk_no * 10_000;
            let metas: Vec<String> = (start..start + chunk.len())
                .map(|i| json!({ "correlation_id": format!("bench-{i}") }).to_string())
                .collect();
            sqlx::query(
                r#"WITH l AS (
                       INSERT INTO replication_queue_lock(id) SELECT unnest($1::text[])
                       ON CONFLICT (id) DO NOTHING
                   )
                   INSERT INTO replication_queue(lock_id, job, meta, created_at)
                   SELECT lock_id, job::jsonb, meta::jsonb,
                          TIMESTAMP '2024-01-01' + ($4 + ord) * INTERVAL '1 microsecond'
                   FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(lock_id, job, meta, ord)"#,
            )
            .bind(&locks)
            .bind(&jobs)
            .bind(&metas)
            .bind(start as i64)
            .execute(&self.pool)
            .await?;
        }
        sqlx::raw_sql("ANALYZE").execute(&self.pool).await?;
        Ok(())
    }

    /// Lock rows of `n` repositories that had jobs for the target once and
    /// have none now: Praefect v14.10 creates one per repository and target
    /// on Enqueue and never deletes it, and its Dequeue locks every one of
    /// the target's that is not acquired.
    pub async fn add_stale_locks(&self, vs: &str, n: usize) -> anyhow::Result<()> {
        for start in (0..n).step_by(10_000) {
            let end = (start + 10_000).min(n);
            let locks: Vec<String> = (start..end)
                .map(|i| format!("{vs}|{TARGET}|@hashed/gone/{i}.git"))
                .collect();
            sqlx::query("INSERT INTO replication_queue_lock(id) SELECT unnest($1::text[])")
                .bind(&locks)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Rows still in `replication_queue`: a completed job's row and its
    /// ready twins are deleted by Acknowledge, so a drain is done when none
    /// is left. Counted over the admin connection, not a worker's.
    async fn rows_left(&self) -> anyhow::Result<i64> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) AS n FROM {}.replication_queue",
            self.schema
        )))
        .fetch_one(&self.admin)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Target replicas recorded by SetGeneration.
    pub async fn target_replicas(&self) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT count(*) AS n FROM storage_repositories WHERE storage = $1")
            .bind(TARGET)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

/// The replication manager: its queue, the nodes, and what the bench reads.
pub struct Manager {
    pub queue: Queue,
    target: Arc<NodeClient>,
    source: Arc<NodeClient>,
    source_address: String,
    /// Jobs acknowledged as completed.
    pub completed: AtomicUsize,
    /// Statements that failed and jobs that did, which Praefect logs and
    /// goes on from.
    pub errors: AtomicUsize,
    /// (correlation id, when its dispatch started), where `record` is set.
    pub dispatched: Mutex<Vec<(String, Instant)>>,
    record: bool,
}

impl Manager {
    pub fn new(queue: Queue, env: &BenchEnv, record: bool) -> anyhow::Result<Manager> {
        let config = gitaly_replicator::Config::from_toml_str(&env.toml)?;
        let nodes = gitaly_replicator::NodeSet::from_config(&config)?;
        let node = |s: &str| {
            nodes
                .get(&env.vs, s)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no node {s}"))
        };
        Ok(Manager {
            queue,
            target: node(TARGET)?,
            source: node(SOURCE)?,
            source_address: env.source.address(),
            completed: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            dispatched: Mutex::new(Vec::new()),
            record,
        })
    }

    /// `ReplMgr.processBacklog` for one (virtual storage, target): dequeue,
    /// run, acknowledge; on an empty dequeue wait for the backoff.
    pub async fn worker(self: Arc<Self>, vs: String, stop: CancellationToken) {
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(BACKOFF_START)
            .with_multiplier(2.0)
            .with_randomization_factor(0.0)
            .with_max_interval(BACKOFF_MAX)
            .with_max_elapsed_time(None)
            .build();
        while !stop.is_cancelled() {
            // A failed dequeue counts as none processed, as in Praefect.
            let processed = match self.handle_node(&vs).await {
                Ok(n) => n,
                Err(_) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if processed == 0 {
                let wait = backoff.next_backoff().unwrap_or(BACKOFF_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
            } else {
                backoff.reset();
            }
        }
    }

    /// `ReplMgr.handleNode`: one batch, jobs one after another, then one
    /// Acknowledge per resulting state.
    async fn handle_node(&self, vs: &str) -> anyhow::Result<usize> {
        let events = self.queue.dequeue(vs, TARGET, DEQUEUE_BATCH).await?;
        if events.is_empty() {
            return Ok(0);
        }
        let mut by_state: Vec<(&str, Vec<i64>)> = Vec::new();
        for event in &events {
            let state = match self.process(event).await {
                Ok(()) => "completed",
                Err(_) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    if event.attempt <= 0 { "dead" } else { "failed" }
                }
            };
            match by_state.iter_mut().find(|(s, _)| *s == state) {
                Some((_, ids)) => ids.push(event.id),
                None => by_state.push((state, vec![event.id])),
            }
        }
        for (state, ids) in &by_state {
            // Praefect logs a failed acknowledgement and goes on.
            match self.queue.acknowledge(state, ids).await {
                Ok(acked) if *state == "completed" => {
                    self.completed.fetch_add(acked.len(), Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(events.len())
    }

    /// `ReplMgr.processReplicationEvent` for the two kinds the bench runs.
    async fn process(&self, event: &Event) -> anyhow::Result<()> {
        let job = &event.job;
        // backfillReplicaPath: every such job reads its replica path.
        let path = self.queue.get_replica_path(job.repository_id).await?;
        let ctx = CallContext::new(event.correlation_id.clone(), None);
        if self.record
            && let Some(id) = &event.correlation_id
            && let Ok(mut d) = self.dispatched.lock()
        {
            d.push((id.clone(), Instant::now()));
        }
        let repo = |storage: &str| {
            Some(pb::Repository {
                storage_name: storage.to_owned(),
                relative_path: path.clone(),
                ..Default::default()
            })
        };
        match job.change.as_str() {
            "optimize_repository" => {
                let mut client = self.target.repository_service();
                let req = self.target.request(
                    pb::OptimizeRepositoryRequest {
                        repository: repo(&job.target_node_storage),
                    },
                    &ctx,
                );
                self.target
                    .call("OptimizeRepository", &ctx, client.optimize_repository(req))
                    .await?;
            }
            "update" => {
                // defaultReplicator.Replicate.
                let Some(generation) = self
                    .queue
                    .get_replicated_generation(
                        job.repository_id,
                        &job.source_node_storage,
                        &job.target_node_storage,
                    )
                    .await?
                else {
                    return Ok(());
                };
                let mut client = self.target.repository_service();
                let mut req = self.target.request(
                    pb::ReplicateRepositoryRequest {
                        repository: repo(&job.target_node_storage),
                        source: repo(&job.source_node_storage),
                    },
                    &ctx,
                );
                // storage.InjectGitalyServers.
                let servers = metadata::encode_gitaly_servers(
                    &job.source_node_storage,
                    &self.source_address,
                    self.source.token().expose(),
                );
                req.metadata_mut()
                    .insert(metadata::GITALY_SERVERS, servers.parse()?);
                self.target
                    .call(
                        "ReplicateRepository",
                        &ctx,
                        client.replicate_repository(req),
                    )
                    .await?;
                let mut pools = self.source.object_pool_service();
                let req = self.source.request(
                    pb::GetObjectPoolRequest {
                        repository: repo(&job.source_node_storage),
                    },
                    &ctx,
                );
                self.source
                    .call("GetObjectPool", &ctx, pools.get_object_pool(req))
                    .await?;
                if generation != -1 {
                    self.queue
                        .set_generation(
                            job.repository_id,
                            &job.target_node_storage,
                            &job.relative_path,
                            generation,
                        )
                        .await?;
                }
            }
            other => anyhow::bail!("change {other} is not emulated"),
        }
        Ok(())
    }
}

/// What a drain of Praefect's queue measured.
pub struct Drain {
    pub backlog: usize,
    /// Rows that left the queue within the measured time: completed jobs
    /// and the ready twins their Acknowledge removed.
    pub left: usize,
    /// The measured time: the whole drain, or the cap where the backlog
    /// outlasted it.
    pub secs: f64,
    /// The whole drain's time where it was cut at the cap: the measured
    /// time plus what was left at the rate of the last quarter of the
    /// measured time (the fastest part: Praefect speeds up as its backlog
    /// shrinks, so the remaining time is overstated a little, not more).
    pub extrapolated: Option<f64>,
    pub cpu: CpuSplit,
}

impl Drain {
    /// Time to drain the whole backlog, measured or extrapolated.
    pub fn whole_secs(&self) -> f64 {
        self.extrapolated.unwrap_or(self.secs)
    }

    /// Jobs per second over the whole drain.
    pub fn rate(&self) -> f64 {
        self.backlog as f64 / self.whole_secs().max(1e-9)
    }

    /// " (extrapolated from the first 30 s)" where the drain was cut.
    pub fn note(&self) -> String {
        if self.extrapolated.is_some() {
            format!(" (extrapolated from the first {:.0} s)", self.secs)
        } else {
            String::new()
        }
    }
}

/// `workers` replication workers on one target's backlog, one job per
/// entry of `repos` (its repository) of `kind`, with Praefect's lock table
/// holding `stale_locks` rows of repositories without jobs, until every
/// row has left the queue or `cap` has passed.
pub async fn drain(
    env: &BenchEnv,
    kind: Kind,
    repos: &[usize],
    stale_locks: usize,
    workers: usize,
    cap: Duration,
) -> anyhow::Result<Drain> {
    // As many connections as the consumer's pool (`max_connections = 16`).
    let queue = Queue::create(&env.db_url(), 16).await?;
    let manager = Arc::new(Manager::new(queue, env, false)?);
    let result = run_drain(&manager, env, kind, repos, stale_locks, workers, cap).await;
    if let Ok(m) = Arc::try_unwrap(manager) {
        m.queue.drop_schema().await;
    }
    result
}

async fn run_drain(
    manager: &Arc<Manager>,
    env: &BenchEnv,
    kind: Kind,
    repos: &[usize],
    stale_locks: usize,
    workers: usize,
    cap: Duration,
) -> anyhow::Result<Drain> {
    let backlog = repos.len();
    let known = repos.iter().max().map_or(0, |m| m + 1);
    manager.queue.seed_repositories(&env.vs, known).await?;
    manager.queue.add_stale_locks(&env.vs, stale_locks).await?;
    manager.queue.load_backlog(&env.vs, kind, repos).await?;
    // Open the channels first, as a running Praefect has them.
    manager.target.check_health(Duration::from_secs(5)).await?;
    manager.source.check_health(Duration::from_secs(5)).await?;
    let stop = CancellationToken::new();
    let before = CpuSample::take(&[], &env.db_name);
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| tokio::spawn(manager.clone().worker(env.vs.clone(), stop.clone())))
        .collect();
    // (seconds since the start, rows that had left the queue)
    let mut samples: Vec<(f64, usize)> = Vec::new();
    let (left, secs) = loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let remaining = manager.queue.rows_left().await?;
        let left = backlog.saturating_sub(usize::try_from(remaining).unwrap_or(0));
        let t = started.elapsed().as_secs_f64();
        samples.push((t, left));
        if left >= backlog || started.elapsed() >= cap {
            break (left, t);
        }
    };
    let cpu = CpuSample::take(&[], &env.db_name).since(&before);
    stop.cancel();
    for h in handles {
        h.await?;
    }
    anyhow::ensure!(left > 0, "Praefect's workers completed no job");
    let errors = manager.errors.load(Ordering::Relaxed);
    anyhow::ensure!(
        errors == 0,
        "{errors} failed statements or jobs in Praefect's emulation"
    );
    let extrapolated = if left < backlog {
        let from = secs * 0.75;
        let (t0, l0) = samples
            .iter()
            .copied()
            .find(|(t, _)| *t >= from)
            .unwrap_or((0.0, 0));
        let tail_rate = (left - l0) as f64 / (secs - t0).max(1e-9);
        anyhow::ensure!(
            tail_rate > 0.0,
            "Praefect's queue made no progress in the last quarter of its {secs:.0} s"
        );
        Some(secs + (backlog - left) as f64 / tail_rate)
    } else {
        if kind == Kind::Update {
            let replicas = manager.queue.target_replicas().await?;
            let wanted = crate::shapes::distinct(repos);
            anyhow::ensure!(
                replicas as usize == wanted,
                "{replicas} target generations recorded for {wanted} repositories"
            );
        }
        None
    };
    Ok(Drain {
        backlog,
        left,
        secs,
        extrapolated,
        cpu,
    })
}

/// Enqueue's rate: `n` jobs into an empty queue over 16 connections, the
/// way request handlers call it concurrently.
pub async fn enqueue_rate(env: &BenchEnv, n: usize) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let queue = Queue::create(&env.db_url(), 16).await?;
    let started = Instant::now();
    let results = futures::stream::iter(0..n)
        .map(|i| {
            let queue = &queue;
            let vs = &env.vs;
            async move {
                let meta = json!({ "correlation_id": format!("enqueue-{i}") }).to_string();
                queue
                    .enqueue(vs, &job_json(vs, Kind::Maintenance, i), &meta)
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    queue.drop_schema().await;
    for r in results {
        r?;
    }
    Ok(rate)
}

/// Time from Enqueue to dispatch start of one job published into an idle
/// queue, for `probes` (virtual storage, target) workers that have idled
/// long enough to poll at the backoff's maximum; the jobs are spread over
/// one maximum interval, so the delays sample the whole poll cycle. Returns
/// the delays in ms, sorted.
pub async fn idle_delays(env: &BenchEnv, probes: usize) -> anyhow::Result<Vec<f64>> {
    let queue = Queue::create(&env.db_url(), 4).await?;
    let manager = Arc::new(Manager::new(queue, env, true)?);
    let result = run_idle(&manager, env, probes).await;
    if let Ok(m) = Arc::try_unwrap(manager) {
        m.queue.drop_schema().await;
    }
    result
}

async fn run_idle(
    manager: &Arc<Manager>,
    env: &BenchEnv,
    probes: usize,
) -> anyhow::Result<Vec<f64>> {
    manager.queue.seed_repositories(&env.vs, probes).await?;
    manager.target.check_health(Duration::from_secs(5)).await?;
    let stop = CancellationToken::new();
    let vs = |i: usize| format!("{}-{i}", env.vs);
    let started = Instant::now();
    let handles: Vec<_> = (0..probes)
        .map(|i| tokio::spawn(manager.clone().worker(vs(i), stop.clone())))
        .collect();
    // Empty polls at 0, 1, 3 and 7 s: from 7 s on each waits 5 s.
    let settled = BACKOFF_START * 7;
    let mut enqueued = Vec::with_capacity(probes);
    for i in 0..probes {
        let at =
            started + settled + Duration::from_millis(50) + BACKOFF_MAX * i as u32 / probes as u32;
        tokio::time::sleep_until(at.into()).await;
        let meta = json!({ "correlation_id": format!("idle-{i}") }).to_string();
        let t = Instant::now();
        manager
            .queue
            .enqueue(&vs(i), &job_json(&vs(i), Kind::Maintenance, i), &meta)
            .await?;
        enqueued.push(t);
    }
    let deadline = Instant::now() + BACKOFF_MAX * 2;
    while manager.completed.load(Ordering::Relaxed) < probes && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for h in handles {
        h.await?;
    }
    let dispatched = manager
        .dispatched
        .lock()
        .map_err(|_| anyhow::anyhow!("dispatch log poisoned"))?
        .clone();
    let mut delays: Vec<f64> = dispatched
        .iter()
        .filter_map(|(id, at)| {
            let i: usize = id.strip_prefix("idle-")?.parse().ok()?;
            Some(at.checked_duration_since(*enqueued.get(i)?)?.as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(
        delays.len() == probes,
        "{} of {probes} idle-queue jobs dispatched",
        delays.len()
    );
    delays.sort_by(f64::total_cmp);
    Ok(delays)
}
