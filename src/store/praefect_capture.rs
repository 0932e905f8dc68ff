//! Praefect's `replication_queue`, captured: the SQL side.
//!
//! Installing puts two triggers on Praefect's table, in one transaction.
//! Before each insert, the event's state becomes `in_progress`: Praefect's
//! Dequeue takes only `ready` and `failed` events and its stale sweep only
//! events with a `replication_queue_job_lock` row, so its workers never
//! take it, while `valid_primaries`, its queue-depth metric and `praefect
//! dataloss` count it as pending. After the insert, the event is copied into
//! `replication_captured_events` (same transaction) and, if the publisher
//! waits for one, a notification wakes it. Both run as their owner (`SECURITY DEFINER`), so
//! Praefect's database user needs no right on our table, and neither can
//! make Praefect's insert fail or return no row.
//!
//! Settling follows Praefect's Acknowledge: a job that completed (or had
//! nothing to do) deletes its event, a dead-lettered one leaves it `dead`.
//! Releasing removes the triggers and hands every event not yet settled back
//! to Praefect (`ready`).

use super::{RepositoryStore, StoreError, failed};

/// The notification channel that wakes the publisher.
pub const CAPTURE_CHANNEL: &str = "replication_captured_events";

/// The mark a second identical event gets while the first is still ours:
/// Praefect 15.9 and later keep `(job, state)` unique, and Go ignores a key
/// it does not know.
pub const DUPLICATE_MARK: &str = "gitaly_replicator_event";

/// A captured event, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedEvent {
    pub event_id: i64,
    pub virtual_storage: String,
    pub target_storage: String,
    /// `virtual storage|target|relative path`: Praefect's lock id, one per
    /// replica.
    pub replica: String,
    /// Praefect's `ReplicationEvent` JSON: `ID`, `Job`, `Meta`, `CreatedAt`.
    pub payload: String,
}

/// Whether the capture is installed, and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureStatus {
    pub installed: bool,
    pub unpublished: i64,
    pub unsettled: i64,
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Released {
    /// Events handed back to Praefect as `ready`.
    pub handed_back: i64,
    /// Events dropped because an identical `ready` one was already waiting
    /// for Praefect (it does the work).
    pub merged: i64,
}

fn install_sql(schema: &str) -> String {
    let schema = schema.replace('"', "\"\"");
    format!(
        r#"
CREATE OR REPLACE FUNCTION replication_capture_take() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_temp AS $$
BEGIN
    NEW.state := 'in_progress';
    IF to_regclass('replication_queue_constraint') IS NOT NULL AND EXISTS (
        SELECT FROM replication_queue WHERE job = NEW.job AND state = 'in_progress'
    ) THEN
        NEW.job := NEW.job || jsonb_build_object('{DUPLICATE_MARK}', NEW.id);
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION replication_capture_keep() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_temp AS $$
BEGIN
    INSERT INTO replication_captured_events (event_id, job, meta, created_at)
    VALUES (NEW.id, NEW.job - '{DUPLICATE_MARK}', NEW.meta, NEW.created_at)
    ON CONFLICT (event_id) DO NOTHING;
    -- Only a waiting publisher is notified: notifying transactions commit
    -- one at a time (see migration 0008).
    IF (SELECT waiting FROM replication_capture_wakeup) IS NOT FALSE THEN
        BEGIN
            PERFORM pg_notify('{CAPTURE_CHANNEL}', '');
        EXCEPTION WHEN OTHERS THEN
            -- A full notification queue must not fail Praefect's insert:
            -- the publisher's poll finds the event.
            NULL;
        END;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS replication_capture_take ON replication_queue;
DROP TRIGGER IF EXISTS replication_capture_keep ON replication_queue;
CREATE TRIGGER replication_capture_take BEFORE INSERT ON replication_queue
    FOR EACH ROW EXECUTE FUNCTION replication_capture_take();
CREATE TRIGGER replication_capture_keep AFTER INSERT ON replication_queue
    FOR EACH ROW EXECUTE FUNCTION replication_capture_keep();
"#
    )
}

const RELEASE_SQL: &str = "
DROP TRIGGER IF EXISTS replication_capture_take ON replication_queue;
DROP TRIGGER IF EXISTS replication_capture_keep ON replication_queue;
";

/// An event of ours still waiting in Praefect's table: `in_progress`, and
/// no worker of Praefect's holds it.
const OURS: &str = "q.state = 'in_progress'
    AND NOT EXISTS (SELECT FROM replication_queue_job_lock l WHERE l.job_id = q.id)";

impl RepositoryStore {
    /// Whether this database holds Praefect's replication queue.
    async fn has_praefect_queue(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT to_regclass('replication_queue') IS NOT NULL
                AND to_regclass('replication_queue_job_lock') IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(failed("capture"))
    }

    /// Installs the capture (idempotent); `Ok(false)` when the database holds
    /// no Praefect replication queue.
    pub async fn install_capture(&self) -> Result<bool, StoreError> {
        if !self.has_praefect_queue().await? {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await.map_err(failed("capture"))?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&mut *tx)
            .await
            .map_err(failed("capture"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(install_sql(&schema)))
            .execute(&mut *tx)
            .await
            .map_err(failed("capture"))?;
        tx.commit().await.map_err(failed("capture"))?;
        Ok(true)
    }

    /// Removes the capture and hands every event not yet settled back to
    /// Praefect, in one transaction.
    pub async fn release_capture(&self) -> Result<Released, StoreError> {
        if !self.has_praefect_queue().await? {
            return Ok(Released::default());
        }
        let mut tx = self.pool.begin().await.map_err(failed("release"))?;
        sqlx::raw_sql(RELEASE_SQL)
            .execute(&mut *tx)
            .await
            .map_err(failed("release"))?;
        let (handed_back, merged): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH mine AS (
                DELETE FROM replication_captured_events RETURNING event_id
            ), waiting AS (
                SELECT q.id, q.job FROM replication_queue q JOIN mine ON q.id = mine.event_id
                WHERE {OURS}
            ), merged AS (
                DELETE FROM replication_queue q USING waiting w
                WHERE q.id = w.id AND EXISTS (
                    SELECT FROM replication_queue r WHERE r.job = w.job AND r.state = 'ready')
                RETURNING q.id
            ), handed AS (
                UPDATE replication_queue q SET state = 'ready'
                FROM waiting w
                WHERE q.id = w.id AND w.id NOT IN (SELECT id FROM merged)
                RETURNING q.id
            )
            SELECT (SELECT count(*) FROM handed), (SELECT count(*) FROM merged)"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(failed("release"))?;
        tx.commit().await.map_err(failed("release"))?;
        Ok(Released {
            handed_back,
            merged,
        })
    }

    /// Whether the capture is installed, and how many events it holds.
    pub async fn capture_status(&self) -> Result<CaptureStatus, StoreError> {
        let (installed, unpublished, unsettled): (bool, i64, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'replication_capture_take'),
                    (SELECT count(*) FROM replication_captured_events WHERE published_at IS NULL),
                    (SELECT count(*) FROM replication_captured_events)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(failed("capture_status"))?;
        Ok(CaptureStatus {
            installed,
            unpublished,
            unsettled,
        })
    }

    /// Up to `limit` captured events not yet published, in event order.
    pub async fn unpublished_events(&self, limit: i64) -> Result<Vec<CapturedEvent>, StoreError> {
        let rows: Vec<(i64, String, String, String, String)> = sqlx::query_as(
            "SELECT event_id,
                    COALESCE(job->>'virtual_storage', ''),
                    COALESCE(job->>'target_node_storage', ''),
                    COALESCE(job->>'virtual_storage', '') || '|'
                        || COALESCE(job->>'target_node_storage', '') || '|'
                        || COALESCE(job->>'relative_path', ''),
                    jsonb_build_object(
                        'ID', event_id,
                        'Job', job,
                        'Meta', COALESCE(meta, '{}'::jsonb),
                        'CreatedAt', to_char(created_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                    )::text
             FROM replication_captured_events
             WHERE published_at IS NULL
             ORDER BY event_id
             LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(failed("unpublished_events"))?;
        Ok(rows
            .into_iter()
            .map(
                |(event_id, virtual_storage, target_storage, replica, payload)| CapturedEvent {
                    event_id,
                    virtual_storage,
                    target_storage,
                    replica,
                    payload,
                },
            )
            .collect())
    }

    /// Records that the work stream took these events.
    pub async fn mark_published(&self, event_ids: &[i64]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE replication_captured_events SET published_at = now()
             WHERE event_id = ANY($1) AND published_at IS NULL",
        )
        .bind(event_ids)
        .execute(&self.pool)
        .await
        .map_err(failed("mark_published"))?;
        Ok(())
    }

    /// Tells the capture's trigger whether the publisher waits for a
    /// notification (`true`) or polls (`false`).
    pub async fn set_capture_waiting(&self, waiting: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE replication_capture_wakeup SET waiting = $1 WHERE waiting <> $1")
            .bind(waiting)
            .execute(&self.pool)
            .await
            .map_err(failed("set_capture_waiting"))?;
        Ok(())
    }

    /// Settles a captured event whose job completed or had nothing to do:
    /// Praefect's row goes, as its Acknowledge deletes a completed event.
    /// Nothing happens for an event no longer ours (released, or taken back
    /// by Praefect).
    pub async fn settle_captured_done(&self, event_id: i64) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH mine AS (
                DELETE FROM replication_captured_events WHERE event_id = $1 RETURNING event_id
            )
            DELETE FROM replication_queue q USING mine
            WHERE q.id = mine.event_id AND {OURS}"
        )))
        .bind(event_id)
        .execute(&self.pool)
        .await
        .map_err(failed("settle_captured"))?;
        Ok(())
    }

    /// Settles a captured event whose job was dead-lettered: Praefect's row
    /// becomes `dead` (or goes, where an identical `dead` row already is,
    /// which Praefect 15.9's `(job, state)` uniqueness would refuse).
    pub async fn settle_captured_dead(&self, event_id: i64) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH mine AS (
                DELETE FROM replication_captured_events WHERE event_id = $1 RETURNING event_id
            ), waiting AS (
                SELECT q.id, q.job FROM replication_queue q JOIN mine ON q.id = mine.event_id
                WHERE {OURS}
            ), twin AS (
                DELETE FROM replication_queue q USING waiting w
                WHERE q.id = w.id AND EXISTS (
                    SELECT FROM replication_queue d WHERE d.job = w.job AND d.state = 'dead')
                RETURNING q.id
            )
            UPDATE replication_queue q
            SET state = 'dead', updated_at = NOW() AT TIME ZONE 'UTC'
            FROM waiting w
            WHERE q.id = w.id AND w.id NOT IN (SELECT id FROM twin)"
        )))
        .bind(event_id)
        .execute(&self.pool)
        .await
        .map_err(failed("settle_captured"))?;
        Ok(())
    }
}
