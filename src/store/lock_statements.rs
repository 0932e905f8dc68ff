//! The statements of the lock session (see `locks`): advisory lock swaps,
//! with the completion records and dedup checks that ride on them, and the
//! session's entry in the registry (its keys and lease) kept in the same
//! statement.

use super::completions::{CompletionColumns, record_completions_sql, superseded_sql};
use super::{CompletionKey, StoreError, encode_failed, failed, lock_sessions};
use sqlx::Arguments;
use sqlx::postgres::PgArguments;
use std::sync::LazyLock;
use std::time::Duration;
use time::OffsetDateTime;

/// The CTEs of a lock swap (after `WITH`, before more CTEs or the select)
/// over parameters `$1` (keys to release), `$2` (keys to take), and the
/// session's keys held after the release `$held`, its `backend_start` `$bs`
/// and its lease in seconds `$lease`:
/// - `fence`: whether this session's lease ran out (it is fenced: nothing is
///   granted), and the keys that gone sessions bar (see `lock_sessions`);
///   read only when `$2` asks for locks;
/// - `unlocked`, `taken`: the releases, and each requested key's answer;
/// - `kept`: the session's entry lists the keys it holds now and its lease
///   is renewed, in the same statement that takes them, so a key is listed
///   before any job runs under it.
fn lock_swap_ctes(held: usize, bs: usize, lease: usize) -> String {
    format!(
        "fence AS MATERIALIZED (
            SELECT NOT EXISTS (
                       SELECT FROM replication_lock_sessions me
                       WHERE me.pid = pg_backend_pid() AND me.backend_start = ${bs}
                         AND me.lease_until > now()) AS fenced,
                   cardinality($2::bigint[]) > 0 AND {bars_all} AS all_barred,
                   CASE WHEN cardinality($2::bigint[]) = 0 THEN '{{}}'::bigint[]
                        ELSE ARRAY(SELECT DISTINCT k
                                   FROM replication_lock_sessions s, unnest(s.keys) AS k
                                   WHERE {lost}) END AS barred_keys
        ), unlocked AS MATERIALIZED (
            SELECT count(*) AS n FROM unnest($1::bigint[]) AS u(k) WHERE pg_advisory_unlock(u.k)
        ), taken AS MATERIALIZED (
            SELECT l.i, l.k,
                   NOT f.fenced AND (f.all_barred OR l.k = ANY(f.barred_keys)) AS barred,
                   CASE WHEN f.fenced OR f.all_barred OR l.k = ANY(f.barred_keys) THEN false
                        ELSE pg_try_advisory_lock(l.k) END AS t
            FROM unnest($2::bigint[]) WITH ORDINALITY AS l(k, i), fence f
        ), kept AS (
            UPDATE replication_lock_sessions
            SET keys = ${held}::bigint[] || ARRAY(SELECT k FROM taken WHERE t),
                lease_until = now() + make_interval(secs => ${lease})
            WHERE pid = pg_backend_pid() AND backend_start = ${bs}
              AND NOT (SELECT fenced FROM fence)
        )",
        bars_all = lock_sessions::bars_all_sql(),
        lost = lock_sessions::lost_sql(),
    )
}

/// The select list of a lock swap (after [`lock_swap_ctes`]): the count of
/// keys released from `$1`, whether each key of `$2` was taken, in order,
/// whether a gone session barred one of them, and whether this session is
/// fenced.
const LOCK_SWAP_COLUMNS: &str = "
    (SELECT n FROM unlocked),
    ARRAY(SELECT t FROM taken ORDER BY i),
    EXISTS (SELECT FROM taken WHERE barred),
    (SELECT fenced FROM fence)";

/// What a lock swap answers.
#[derive(Debug)]
pub struct LockSwap {
    /// Whether each requested key was taken, in order.
    pub taken: Vec<bool>,
    /// Some requested key was refused because a lost lock session that held
    /// it may still have jobs running (see `lock_sessions`).
    pub barred: bool,
    /// This session's lease ran out: nothing was granted, and its jobs must
    /// stop (see [`renew_lock_session`]).
    pub fenced: bool,
}

/// The session a lock statement runs on, for its entry in the registry.
#[derive(Debug, Clone, Copy)]
pub struct LockSessionLease<'a> {
    /// Keys the session holds after this statement's releases, each once.
    pub held: &'a [i64],
    pub backend_start: OffsetDateTime,
    pub lease: Duration,
}

/// Releases the session advisory locks of `unlock` and takes, without
/// waiting, those of `lock`, on `conn`, in one statement; answers whether each
/// of `lock` was taken, in order, and records in the session's entry the keys
/// it holds now and a renewed lease. Locks are reentrant per session, so a
/// key in both lists stays held whichever Postgres evaluates first, and the
/// caller must not ask twice for a key it holds unless it also releases it
/// twice. Releasing a key the session does not hold is ignored (Postgres
/// logs a warning). Barred keys and a fenced session are refused (see
/// [`LockSwap`]).
pub async fn swap_advisory_locks(
    conn: &mut sqlx::PgConnection,
    unlock: &[i64],
    lock: &[i64],
    session: LockSessionLease<'_>,
) -> Result<LockSwap, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH {} SELECT {LOCK_SWAP_COLUMNS}",
            lock_swap_ctes(3, 4, 5)
        )
    });
    let (_, taken, barred, fenced): (i64, Vec<bool>, bool, bool) = sqlx::query_as(SQL.as_str())
        .bind(unlock)
        .bind(lock)
        .bind(session.held)
        .bind(session.backend_start)
        .bind(lock_sessions::lease_seconds(session.lease))
        .fetch_one(conn)
        .await
        .map_err(failed("swap_advisory_locks"))?;
    Ok(LockSwap {
        taken,
        barred,
        fenced,
    })
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

/// Lets this session's commits return before their WAL is flushed, and
/// plans its statements once: the lock statements are large, and Postgres
/// would otherwise plan the plain swap anew on every call (its generic plan
/// is estimated dearer than a custom one), which cost more than running it.
pub async fn set_lock_session_options(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT set_config('synchronous_commit', 'off', false),
                set_config('plan_cache_mode', 'force_generic_plan', false)",
    )
    .execute(conn)
    .await
    .map_err(failed("set_lock_session_options"))?;
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
    /// See [`LockSwap::fenced`].
    pub fenced: bool,
}

/// Does a [`LockSessionBatch`] in one statement on `conn`: records the
/// completions, releases and takes advisory locks (see
/// [`swap_advisory_locks`]) and answers the dedup checks. The checks read the
/// completions committed before the statement, not those it records.
pub async fn exchange_on_lock_session(
    conn: &mut sqlx::PgConnection,
    batch: &LockSessionBatch<'_>,
    session: LockSessionLease<'_>,
) -> Result<LockSessionAnswers, StoreError> {
    const OPERATION: &str = "exchange_on_lock_session";
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH recorded AS ({}), {}
            SELECT {LOCK_SWAP_COLUMNS}, {}",
            record_completions_sql(3),
            lock_swap_ctes(15, 16, 17),
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
    args.add(session.held).map_err(&encode)?;
    args.add(session.backend_start).map_err(&encode)?;
    args.add(lock_sessions::lease_seconds(session.lease))
        .map_err(&encode)?;
    let (_, taken, barred, fenced, superseded): (i64, Vec<bool>, bool, bool, Vec<bool>) =
        sqlx::query_as_with(SQL.as_str(), args)
            .fetch_one(conn)
            .await
            .map_err(failed(OPERATION))?;
    Ok(LockSessionAnswers {
        taken,
        superseded,
        barred,
        fenced,
    })
}
