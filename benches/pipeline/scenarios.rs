//! The scenarios, one function each.

use crate::env::{BenchEnv, Drained, EnvOptions, stop};
use crate::{Row, Sizes};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

const BATCH: usize = 100;

fn opts(latency: Duration) -> EnvOptions {
    EnvOptions {
        batch_size: BATCH,
        target_latency: latency,
        max_concurrent_jobs: 256,
        pull_loops: 2,
    }
}

fn row(
    scenario: &'static str,
    metric: impl Into<String>,
    value: f64,
    unit: &'static str,
    target: Option<(String, bool)>,
) -> Row {
    Row {
        scenario,
        metric: metric.into(),
        value,
        unit,
        target,
    }
}

/// Publish N jobs, then pull + plain-ack them with no work at batch 100:
/// the broker's limit on this machine.
pub async fn raw(s: &Sizes) -> anyhow::Result<Row> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let jobs: Vec<_> = (0..s.jobs).map(|i| env.maintenance_job(i)).collect();
    env.publish_all(&jobs).await?;
    let durable = env
        .layout
        .consumers
        .iter()
        .find(|c| c.target_storage == "gitaly-2")
        .map(|c| c.durable_name.clone())
        .unwrap_or_default();
    let consumer: async_nats::jetstream::consumer::PullConsumer = env
        .js
        .get_stream(&env.layout.stream)
        .await?
        .get_consumer(&durable)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let started = Instant::now();
    let mut done = 0;
    while done < s.jobs {
        let mut batch = consumer
            .fetch()
            .max_messages(BATCH)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!(e))?;
            m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
            done += 1;
        }
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    env.client.flush().await?;
    env.cleanup().await;
    Ok(row(
        "raw",
        format!("pull+ack, no work, batch {BATCH}"),
        rate,
        "msgs/s",
        None,
    ))
}

/// Unary gRPC calls from one channel to the same in-process target, 256 at
/// a time, with no queue and no database: the ceiling of one dispatch per job
/// on this machine.
pub async fn grpc_ceiling(s: &Sizes) -> anyhow::Result<Row> {
    use gitaly_replicator::proto::gitaly as pb;
    use gitaly_replicator::{CallContext, NodeSet};
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let config = gitaly_replicator::Config::from_toml_str(&env.toml)?;
    let nodes = NodeSet::from_config(&config)?;
    let node = nodes
        .get(&env.vs, "gitaly-2")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no target node"))?;
    let started = Instant::now();
    let results = futures::stream::iter(0..s.jobs)
        .map(|i| {
            let node = node.clone();
            async move {
                let ctx = CallContext::new(None, None);
                let mut client = node.repository_service();
                let request = node.request(
                    pb::OptimizeRepositoryRequest {
                        repository: Some(pb::Repository {
                            storage_name: "gitaly-2".into(),
                            relative_path: format!("{i}.git"),
                            ..Default::default()
                        }),
                    },
                    &ctx,
                );
                node.call(
                    "OptimizeRepository",
                    &ctx,
                    client.optimize_repository(request),
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let rate = s.jobs as f64 / started.elapsed().as_secs_f64();
    env.cleanup().await;
    for r in results {
        r?;
    }
    Ok(row(
        "grpc",
        "unary calls, no queue, no database",
        rate,
        "calls/s",
        None,
    ))
}

/// N optimize_repository jobs through the consumer to a target that answers at once.
pub async fn maintenance(s: &Sizes, raw: Option<f64>) -> anyhow::Result<Vec<Row>> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let jobs: Vec<_> = (0..s.jobs).map(|i| env.maintenance_job(i)).collect();
    env.publish_all(&jobs).await?;
    let child = env.spawn_consumer()?;
    let drained = env.drain(s.jobs, &[], Duration::from_secs(600)).await?;
    let secs = drained.secs;
    stop(child);
    env.cleanup().await;
    let rate = s.jobs as f64 / secs;
    let mut rows = vec![
        row(
            "maintenance",
            "optimize_repository jobs, batch 100",
            rate,
            "jobs/s",
            None,
        ),
        cpu_per_job("maintenance", &drained, s.jobs),
    ];
    if let Some(raw) = raw {
        let ratio = rate / raw;
        rows.push(row(
            "maintenance",
            "ratio to raw",
            ratio,
            "x",
            Some((">= 0.25".into(), ratio >= 0.25)),
        ));
    }
    Ok(rows)
}

/// N update jobs for distinct repositories with generations in Postgres.
pub async fn update(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let jobs: Vec<_> = (0..s.jobs).map(|i| env.update_job(i)).collect();
    let seeds = futures::stream::iter(jobs.iter().map(|j| {
        let store = env.store.clone();
        let vs = env.vs.clone();
        let path = j.relative_path.clone();
        async move {
            store
                .create_repository(&vs, &path, "gitaly-1", 1, &["gitaly-1"])
                .await
        }
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    for r in seeds {
        r?;
    }
    env.publish_all(&jobs).await?;
    let child = env.spawn_consumer()?;
    let drained = env.drain(s.jobs, &[], Duration::from_secs(600)).await?;
    let secs = drained.secs;
    stop(child);
    // Every target replica must now hold generation 1.
    let sample = &jobs[jobs.len() / 2].relative_path;
    let generation = env.store.generation(&env.vs, sample, "gitaly-2").await?;
    env.cleanup().await;
    anyhow::ensure!(
        generation == Some(1),
        "update did not record the generation"
    );
    let rate = s.jobs as f64 / secs;
    Ok(vec![
        row(
            "update",
            "update jobs with Postgres generations",
            rate,
            "jobs/s",
            Some((">= 4500".into(), rate >= 4500.0)),
        ),
        cpu_per_job("update", &drained, s.jobs),
    ])
}

/// The machine's busy CPU time per job during a drain: every process
/// counted, which time stolen by a shared host's neighbours does not
/// inflate as it does the jobs/s figure.
fn cpu_per_job(scenario: &'static str, drained: &Drained, jobs: usize) -> Row {
    row(
        scenario,
        "CPU per job, all processes",
        drained.cpu_secs * 1e6 / jobs.max(1) as f64,
        "us",
        None,
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Jobs at a steady 200/s to an idle consumer: publish → dispatch start and
/// publish → ack.
pub async fn latency(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    env.target.gitaly.set_recording(true);
    // Acks are plain publishes to $JS.ACK.<stream>.…; watching them gives ack times.
    let mut acks = env
        .client
        .subscribe(format!("$JS.ACK.{}.>", env.layout.stream))
        .await?;
    // Read acks while publishing, so each is timed when it arrives.
    let ack_watch = tokio::spawn(async move {
        let mut acked: HashMap<u64, SystemTime> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(3), acks.next()).await {
                Ok(Some(m)) if m.payload.is_empty() || m.payload.as_ref() == b"+ACK" => {
                    // $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
                    let tokens: Vec<&str> = m.subject.split('.').collect();
                    if let Some(seq) = tokens
                        .len()
                        .checked_sub(4)
                        .and_then(|i| tokens[i].parse().ok())
                    {
                        acked.entry(seq).or_insert_with(SystemTime::now);
                    }
                }
                Ok(Some(_)) => {}
                // Quiet for 3 s after the last ack: all are in.
                Ok(None) | Err(_) if !acked.is_empty() => break,
                _ => {}
            }
        }
        acked
    });
    let child = env.spawn_consumer()?;
    let publisher = gitaly_replicator::Publisher::new(env.js.clone(), env.layout.clone());
    // An idle consumer that has run for a while: let it connect, provision,
    // find the target healthy and open its connections with a few jobs
    // (not measured), then let it idle.
    for i in 0..50 {
        publisher
            .publish(&env.maintenance_job(1_000_000 + i), None)
            .await?;
    }
    env.drain(50, &[], Duration::from_secs(30)).await?;
    env.target.gitaly.clear_calls();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let total = (200 * s.latency_secs) as usize;
    let mut published: HashMap<u64, SystemTime> = HashMap::new();
    let mut by_correlation: HashMap<String, SystemTime> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for i in 0..total {
        tick.tick().await;
        let mut job = env.maintenance_job(i);
        job.correlation_id = Some(format!("lat-{i}"));
        let at = SystemTime::now();
        let p = publisher.publish(&job, None).await?;
        published.insert(p.sequence, at);
        by_correlation.insert(format!("lat-{i}"), at);
    }
    let acked = ack_watch.await?;
    stop(child);
    let mut dispatch: Vec<f64> = env
        .target
        .gitaly
        .calls()
        .iter()
        .filter_map(|c| {
            let sent = by_correlation.get(c.correlation_id.as_deref()?)?;
            c.received_wall
                .duration_since(*sent)
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    let mut to_ack: Vec<f64> = acked
        .iter()
        .filter_map(|(seq, at)| {
            at.duration_since(*published.get(seq)?)
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    env.cleanup().await;
    dispatch.sort_by(f64::total_cmp);
    to_ack.sort_by(f64::total_cmp);
    anyhow::ensure!(
        dispatch.len() == total,
        "{} of {total} jobs dispatched",
        dispatch.len()
    );
    let p99 = percentile(&dispatch, 0.99);
    Ok(vec![
        row(
            "latency",
            "publish -> dispatch start p50 (200 jobs/s)",
            percentile(&dispatch, 0.5),
            "ms",
            None,
        ),
        row(
            "latency",
            "publish -> dispatch start p99",
            p99,
            "ms",
            Some(("<= 5 ms".into(), p99 <= 5.0)),
        ),
        row(
            "latency",
            "publish -> dispatch start max",
            percentile(&dispatch, 1.0),
            "ms",
            None,
        ),
        row(
            "latency",
            "publish -> ack p50",
            percentile(&to_ack, 0.5),
            "ms",
            None,
        ),
        row(
            "latency",
            "publish -> ack p99",
            percentile(&to_ack, 0.99),
            "ms",
            None,
        ),
        row(
            "latency",
            "publish -> ack max",
            percentile(&to_ack, 1.0),
            "ms",
            None,
        ),
    ])
}

/// Drain rate of maintenance jobs from growing backlogs, and the consumer's
/// peak memory during the largest. The smallest backlog drains in well under
/// a second, so its rate is the median of three drains; a single one varied
/// by a third between runs.
pub async fn backlog(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut rates = Vec::new();
    for (i, &n) in s.backlogs.iter().enumerate() {
        let repeats = if i == 0 { 3 } else { 1 };
        let mut drains = Vec::new();
        let mut publish_rate = 0.0;
        let mut peak_kib = 0;
        for _ in 0..repeats {
            let (rate, published, peak) = drain_backlog(n).await?;
            drains.push(rate);
            publish_rate = published;
            peak_kib = peak;
        }
        drains.sort_by(f64::total_cmp);
        let rate = drains[drains.len() / 2];
        rates.push(rate);
        rows.push(row(
            "backlog",
            if repeats > 1 {
                format!("drain rate from {n} jobs (median of {repeats})")
            } else {
                format!("drain rate from {n} jobs")
            },
            rate,
            "jobs/s",
            None,
        ));
        if i == 0 {
            rows.push(row(
                "backlog",
                "publish rate (1,000 acks outstanding)",
                publish_rate,
                "jobs/s",
                None,
            ));
        }
        if i + 1 == s.backlogs.len() {
            let ratio = rate / rates[0];
            rows.push(row(
                "backlog",
                format!("drain rate {n} / {}", s.backlogs[0]),
                ratio,
                "x",
                Some((">= 0.8".into(), ratio >= 0.8)),
            ));
            let mib = peak_kib as f64 / 1024.0;
            rows.push(row(
                "backlog",
                format!("consumer peak RSS, {n} drain"),
                mib,
                "MiB",
                Some(("<= 64 MiB".into(), mib <= 64.0)),
            ));
        }
    }
    Ok(rows)
}

/// Publishes `n` maintenance jobs, drains them with one consumer process;
/// returns (drain rate, publish rate, the consumer's peak RSS in KiB).
async fn drain_backlog(n: usize) -> anyhow::Result<(f64, f64, u64)> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let mut publish_rate = 0.0;
    for start in (0..n).step_by(100_000) {
        let jobs: Vec<_> = (start..(start + 100_000).min(n))
            .map(|i| env.maintenance_job(i))
            .collect();
        publish_rate = env.publish_all(&jobs).await?;
    }
    let child = env.spawn_consumer()?;
    let pid = child.id();
    let drained = env.drain(n, &[pid], Duration::from_secs(1800)).await?;
    let (secs, peak_kib) = (drained.secs, drained.peak_kib);
    stop(child);
    env.cleanup().await;
    Ok((n as f64 / secs, publish_rate, peak_kib))
}

/// One versus two consumer processes against a target with 5 ms per call,
/// at two per-process concurrencies: 16 jobs in flight, where one process is
/// bound by the target's latency (the case scaling out is for), and the
/// default 64, where one process already approaches what the machine's
/// cores can do with NATS, Postgres and the target beside it.
pub async fn scale_out(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (in_flight, with_target) in [(16, true), (64, false)] {
        let mut rates = Vec::new();
        for processes in [1, 2] {
            let env = BenchEnv::new(&EnvOptions {
                batch_size: BATCH,
                target_latency: Duration::from_millis(5),
                max_concurrent_jobs: in_flight,
                pull_loops: 1,
            })
            .await?;
            let jobs: Vec<_> = (0..s.scale_out_jobs)
                .map(|i| env.maintenance_job(i))
                .collect();
            env.publish_all(&jobs).await?;
            let children: Vec<_> = (0..processes)
                .map(|_| env.spawn_consumer())
                .collect::<Result<_, _>>()?;
            let secs = env
                .drain(s.scale_out_jobs, &[], Duration::from_secs(600))
                .await?
                .secs;
            for c in children {
                stop(c);
            }
            env.cleanup().await;
            rates.push(s.scale_out_jobs as f64 / secs);
        }
        let ratio = rates[1] / rates[0];
        rows.push(row(
            "scale-out",
            format!("1 process, {in_flight} in flight, 5 ms target"),
            rates[0],
            "jobs/s",
            None,
        ));
        rows.push(row(
            "scale-out",
            format!("2 processes, {in_flight} in flight each"),
            rates[1],
            "jobs/s",
            None,
        ));
        let target = with_target.then(|| (">= 1.8".to_owned(), ratio >= 1.8));
        rows.push(row(
            "scale-out",
            format!("2 processes / 1, {in_flight} in flight"),
            ratio,
            "x",
            target,
        ));
    }
    Ok(rows)
}
