//! The statements of the lock session (see `locks`): advisory lock swaps,
//! with the completion records and dedup checks that ride on them.

use super::completions::{CompletionColumns, record_completions_sql, superseded_sql};
use super::{CompletionKey, StoreError, encode_failed, failed, lock_sessions};
use sqlx::Arguments;
use sqlx::postgres::PgArguments;
use std::sync::LazyLock;
use time::OffsetDateTime;

/// The CTE of a lock swap that says whether new locks are barred: some lock
/// session is gone while its jobs may still run (see `lock_sessions`).
/// Asked only when `$2` asks for locks.
fn lock_fence_cte() -> String {
    format!(
        "fence AS MATERIALIZED (
            SELECT CASE WHEN cardinality($2::bigint[]) = 0 THEN false
                        ELSE {} END AS barred)",
        lock_sessions::orphan_blocks_sql()
    )
}

/// The select list of a lock swap (after [`lock_fence_cte`]): the count of
/// keys released from `$1`, whether each key of `$2` was taken, in order
/// (none while barred), and whether new locks were barred.
const LOCK_SWAP_COLUMNS: &str = "
    (SELECT count(*) FROM unnest($1::bigint[]) AS u(k) WHERE pg_advisory_unlock(u.k)),
    ARRAY(SELECT CASE WHEN (SELECT barred FROM fence) THEN false
                      ELSE pg_try_advisory_lock(l.k) END
          FROM unnest($2::bigint[]) WITH ORDINALITY AS l(k, i) ORDER BY l.i),
    (SELECT barred FROM fence)";

/// What a lock swap answers.
#[derive(Debug)]
pub struct LockSwap {
    /// Whether each requested key was taken, in order.
    pub taken: Vec<bool>,
    /// No lock was granted because a lost lock session may still have jobs
    /// running: see [`expire_lock_sessions`].
    pub barred: bool,
}

/// Releases the session advisory locks of `unlock` and takes, without
/// waiting, those of `lock`, on `conn`, in one statement; answers whether each
/// of `lock` was taken, in order. Locks are reentrant per session, so a key
/// in both lists stays held whichever Postgres evaluates first, and the
/// caller must not ask twice for a key it holds unless it also releases it
/// twice. Releasing a key the session does not hold is ignored (Postgres
/// logs a warning). No lock is taken while barred (see [`LockSwap`]).
pub async fn swap_advisory_locks(
    conn: &mut sqlx::PgConnection,
    unlock: &[i64],
    lock: &[i64],
) -> Result<LockSwap, StoreError> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("WITH {} SELECT {LOCK_SWAP_COLUMNS}", lock_fence_cte()));
    let (_, taken, barred): (i64, Vec<bool>, bool) = sqlx::query_as(SQL.as_str())
        .bind(unlock)
        .bind(lock)
        .fetch_one(conn)
        .await
        .map_err(failed("swap_advisory_locks"))?;
    Ok(LockSwap { taken, barred })
}

/// The advisory lock keys the session on `conn` holds.
pub async fn advisory_locks_held(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>, StoreError> {
    sqlx::query_scalar(
        "SELECT (classid::int8 << 32) | objid::int8 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = pg_backend_pid()",
    )
    .fetch_all(conn)
    .await
    .map_err(failed("advisory_locks_held"))
}

/// Lets this session's commits return before their WAL is flushed.
pub async fn relax_commit_durability(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET synchronous_commit = off")
        .execute(conn)
        .await
        .map_err(failed("relax_commit_durability"))?;
    Ok(())
}

/// One statement's worth of work on the lock session, see
/// [`exchange_on_lock_session`].
#[derive(Debug, Default)]
pub struct LockSessionBatch<'a> {
    /// Keys to release.
    pub unlock: Vec<i64>,
    /// Completions to record, each with the time its job started.
    pub record: Vec<(CompletionKey<'a>, OffsetDateTime)>,
    /// Keys to take without waiting.
    pub lock: Vec<i64>,
    /// One per `lock`: the job to check for completion dedup, with the time
    /// it was created; `None` asks nothing.
    pub check: Vec<Option<(CompletionKey<'a>, OffsetDateTime)>>,
}

/// What [`exchange_on_lock_session`] answers, in the order of the batch's
/// `lock`.
#[derive(Debug)]
pub struct LockSessionAnswers {
    pub taken: Vec<bool>,
    pub superseded: Vec<bool>,
    /// See [`LockSwap::barred`].
    pub barred: bool,
}

/// Does a [`LockSessionBatch`] in one statement on `conn`: records the
/// completions, releases and takes advisory locks (see
/// [`swap_advisory_locks`]) and answers the dedup checks. The checks read the
/// completions committed before the statement, not those it records.
pub async fn exchange_on_lock_session(
    conn: &mut sqlx::PgConnection,
    batch: &LockSessionBatch<'_>,
) -> Result<LockSessionAnswers, StoreError> {
    const OPERATION: &str = "exchange_on_lock_session";
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH recorded AS ({}), {}
            SELECT {LOCK_SWAP_COLUMNS}, {}",
            record_completions_sql(3),
            lock_fence_cte(),
            superseded_sql(9)
        )
    });
    let encode = encode_failed(OPERATION);
    let mut args = PgArguments::default();
    args.add(&batch.unlock).map_err(&encode)?;
    args.add(&batch.lock).map_err(&encode)?;
    CompletionColumns::of(&batch.record)
        .add_to(&mut args)
        .map_err(&encode)?;
    CompletionColumns::of_optional(batch.check.iter().copied())
        .add_to(&mut args)
        .map_err(&encode)?;
    let (_, taken, barred, superseded): (i64, Vec<bool>, bool, Vec<bool>) =
        sqlx::query_as_with(SQL.as_str(), args)
            .fetch_one(conn)
            .await
            .map_err(failed(OPERATION))?;
    Ok(LockSessionAnswers {
        taken,
        superseded,
        barred,
    })
}
