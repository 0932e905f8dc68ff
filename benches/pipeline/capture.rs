//! The `capture` scenario: Praefect's `replication_queue` in the scenario's
//! database, captured by `praefect-queue capture`'s own library call, its
//! events published and run by a `gitaly-replicator run` process (woken by
//! the trigger's notification) while Praefect's Enqueue inserts: flat out on
//! 16 connections, against Enqueue's own rate; then at a steady 500 events/s,
//! from each INSERT to the call reaching the target.

use crate::env::{BenchEnv, stop};
use crate::praefect::{self, Kind, job_json};
use crate::scenarios::{opts, percentile, row};
use crate::{Row, Sizes};
use futures::StreamExt;
use gitaly_replicator::{Config, EmptyDatabase, connect_store};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use testkit::praefect_queue::{ENQUEUE_V14, QUEUE_TABLES};

const SCENARIO: &str = "capture";
/// Praefect's request handlers enqueue concurrently; as many connections
/// as the consumer's pool.
const CONNECTIONS: u32 = 16;
/// Events of the warm-up, not measured.
const WARM_UP: usize = 50;
/// The steady rate of the latency part.
const STEADY_RATE: u64 = 500;

pub async fn capture(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let result = capture_in(&env, s).await;
    env.cleanup().await;
    result
}

async fn capture_in(env: &BenchEnv, s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Enqueue on a queue of its own, nothing captured: what Praefect does
    // without us.
    let plain = praefect::enqueue_rate(env, s.capture_events).await?;

    sqlx::raw_sql(QUEUE_TABLES)
        .execute(env.store.pool())
        .await?;
    // As `gitaly-replicator praefect-queue capture` does it.
    let config = Config::from_toml_str(&env.toml)?;
    let store = connect_store(&config, EmptyDatabase::Refuse).await?;
    anyhow::ensure!(
        store.install_capture().await?,
        "no Praefect replication_queue found"
    );
    store.pool().close().await;
    let praefect = PgPoolOptions::new()
        .max_connections(CONNECTIONS)
        .connect(&env.db_url())
        .await?;
    let child = env.spawn_consumer()?;
    let result = measure(env, s, &praefect, plain, &mut rows).await;
    stop(child);
    praefect.close().await;
    result?;
    Ok(rows)
}

async fn measure(
    env: &BenchEnv,
    s: &Sizes,
    praefect: &PgPool,
    plain: f64,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // A process that has run for a while: connected, leading the capture,
    // listening, its channels to the target open.
    for i in 0..WARM_UP {
        enqueue(praefect, &env.vs, 1_000_000 + i, "warm-up").await?;
    }
    settled(env, praefect, Duration::from_secs(60)).await?;
    let mut stream = env.js.get_stream(&env.layout.stream).await?;
    let before = stream.info().await?.state.last_sequence;

    // Flat out: 16 connections insert as fast as Enqueue goes.
    let n = s.capture_events;
    let started = Instant::now();
    let watch = {
        let mut stream = stream.clone();
        let want = before + n as u64;
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match stream.info().await {
                    Ok(info) if info.state.last_sequence >= want => return Some(Instant::now()),
                    _ if Instant::now() > deadline => return None,
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
    };
    let inserted = futures::stream::iter(0..n)
        .map(|i| enqueue(praefect, &env.vs, i, "flat"))
        .buffer_unordered(CONNECTIONS as usize)
        .collect::<Vec<_>>()
        .await;
    let insert_secs = started.elapsed().as_secs_f64();
    for r in inserted {
        r?;
    }
    let published_at = watch
        .await?
        .ok_or_else(|| anyhow::anyhow!("the captured events were not all published in 120 s"))?;
    let publish_secs = published_at.duration_since(started).as_secs_f64();
    settled(env, praefect, Duration::from_secs(120)).await?;
    let settle_secs = started.elapsed().as_secs_f64();
    let insert_rate = n as f64 / insert_secs;
    let publish_rate = n as f64 / publish_secs;
    let ratio = publish_rate / insert_rate;
    rows.push(row(
        SCENARIO,
        format!("Enqueue, {n} events, 16 connections, no capture"),
        plain,
        "ev/s",
        None,
    ));
    rows.push(row(
        SCENARIO,
        format!("Enqueue, {n} events, 16 connections, captured"),
        insert_rate,
        "ev/s",
        None,
    ));
    rows.push(row(
        SCENARIO,
        "captured and published (first INSERT -> last stored)",
        publish_rate,
        "ev/s",
        None,
    ));
    rows.push(row(
        SCENARIO,
        "published / inserted",
        ratio,
        "x",
        Some((">= 0.9".into(), ratio >= 0.9)),
    ));
    rows.push(row(
        SCENARIO,
        "captured, run and settled (Praefect's rows gone)",
        n as f64 / settle_secs,
        "ev/s",
        None,
    ));

    // Steady: one INSERT every 2 ms, each on its own task so that a slow
    // one does not hold back the next.
    env.target.gitaly.clear_calls();
    env.target.gitaly.set_recording(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let total = (STEADY_RATE * s.latency_secs) as usize;
    let sent: Arc<std::sync::Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / STEADY_RATE));
    let mut tasks = Vec::with_capacity(total);
    let steady_started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let (pool, vs, sent) = (praefect.clone(), env.vs.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let at = SystemTime::now();
            enqueue(&pool, &vs, 2_000_000 + i, "steady").await?;
            if let Ok(mut sent) = sent.lock() {
                sent.insert(format!("steady-{}", 2_000_000 + i), at);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let steady_rate = total as f64 / steady_started.elapsed().as_secs_f64();
    settled(env, praefect, Duration::from_secs(60)).await?;
    let sent = sent
        .lock()
        .map_err(|_| anyhow::anyhow!("insert times poisoned"))?
        .clone();
    let dispatch = env.dispatch_delays_ms(&sent);
    anyhow::ensure!(
        dispatch.len() == total,
        "{} of {total} captured events dispatched",
        dispatch.len()
    );
    let p99 = percentile(&dispatch, 0.99);
    rows.push(row(
        SCENARIO,
        format!("INSERT -> dispatch start p50 ({steady_rate:.0} events/s)"),
        percentile(&dispatch, 0.5),
        "ms",
        None,
    ));
    rows.push(row(
        SCENARIO,
        "INSERT -> dispatch start p99",
        p99,
        "ms",
        Some(("<= 50 ms".into(), p99 <= 50.0)),
    ));
    rows.push(row(
        SCENARIO,
        "INSERT -> dispatch start max",
        percentile(&dispatch, 1.0),
        "ms",
        None,
    ));
    Ok(())
}

/// Praefect's Enqueue of the maintenance job of repository `i`, with the
/// correlation id `<label>-<i>`.
async fn enqueue(pool: &PgPool, vs: &str, i: usize, label: &str) -> anyhow::Result<()> {
    let job = job_json(vs, Kind::Maintenance, i);
    let meta = json!({ "correlation_id": format!("{label}-{i}") }).to_string();
    sqlx::query(ENQUEUE_V14)
        .bind(vs)
        .bind(praefect::TARGET)
        .bind(praefect::relative_path(i))
        .bind(job)
        .bind(meta)
        .execute(pool)
        .await?;
    Ok(())
}

/// Waits until Praefect's table is empty: every captured event was run and
/// settled (its row deleted, as Praefect's Acknowledge deletes a completed
/// one).
async fn settled(env: &BenchEnv, praefect: &PgPool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM replication_queue")
            .fetch_one(praefect)
            .await?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} captured events not settled in {timeout:?} (jobs left in the stream: {})",
            env.jobs_left().await?
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
