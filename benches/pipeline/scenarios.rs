//! The scenarios, one function each.

use crate::env::{BenchEnv, CpuSplit, Drained, EnvOptions, signal_and_wait, signal_child, stop};
use crate::praefect::{self, Kind};
use crate::shapes::{self, Shape};
use crate::{Row, Sizes};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};
use testkit::recording_gitaly::{Behaviour, RecordingGitaly, RunningGitaly};

const BATCH: usize = 100;
/// Praefect's workers beside one: the consumer's `max_connections`.
const PRAEFECT_WORKERS: usize = 16;

pub fn opts(latency: Duration) -> EnvOptions {
    EnvOptions {
        batch_size: BATCH,
        target_latency: latency,
        max_concurrent_jobs: 256,
        pull_loops: 2,
    }
}

pub fn row(
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

/// N jobs of one kind, one per repository, through one consumer process:
/// jobs/s and what the drain measured.
async fn ours(kind: Kind, n: usize) -> anyhow::Result<(f64, Drained)> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let repos: Vec<usize> = (0..n).collect();
    let result = ours_in(&env, kind, &repos).await;
    env.cleanup().await;
    result.map(|o| (o.rate, o.drained))
}

/// What the consumer's drain of one backlog measured.
struct Ours {
    /// Jobs per second from the first call to the last acknowledgement.
    rate: f64,
    drained: Drained,
    /// Calls that reached the target: one per job, less the jobs the
    /// consumer found done already (a twin completed, or the replica up to
    /// date).
    calls: usize,
}

/// One job of `kind` per entry of `repos` (its repository) through one
/// consumer process, drained to the end.
async fn ours_in(env: &BenchEnv, kind: Kind, repos: &[usize]) -> anyhow::Result<Ours> {
    let n = repos.len();
    let jobs: Vec<_> = repos
        .iter()
        .map(|&r| match kind {
            Kind::Maintenance => env.maintenance_job(r),
            Kind::Update => env.update_job(r),
        })
        .collect();
    let mut paths: Vec<&str> = jobs.iter().map(|j| j.relative_path.as_str()).collect();
    paths.sort_unstable();
    paths.dedup();
    let distinct = paths.len();
    if kind == Kind::Update {
        // Update jobs are for repositories the store knows, at generation 1
        // on the source.
        let seeds = futures::stream::iter(paths.into_iter().map(|path| {
            let store = env.store.clone();
            let vs = env.vs.clone();
            let path = path.to_owned();
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
    }
    env.publish_all(&jobs).await?;
    let calls_before = env.target.gitaly.call_count();
    let child = env.spawn_consumer()?;
    let pid = child.id();
    // Every repository's first job calls the target; the drain ends when no
    // job is left.
    let drained = env.drain(distinct, &[pid], Duration::from_secs(600)).await;
    stop(child);
    let drained = drained?;
    let calls = env.target.gitaly.call_count() - calls_before;
    if kind == Kind::Update {
        // Every target replica must now hold generation 1.
        let sample = &jobs[jobs.len() / 2].relative_path;
        let generation = env.store.generation(&env.vs, sample, "gitaly-2").await?;
        anyhow::ensure!(
            generation == Some(1),
            "update did not record the generation"
        );
    }
    Ok(Ours {
        rate: n as f64 / drained.secs,
        drained,
        calls,
    })
}

/// N optimize_repository jobs through the consumer to a target that answers
/// at once, beside the bound of raw delivery plus one gRPC call per job.
/// Returns the rows and the rate.
pub async fn maintenance(
    s: &Sizes,
    raw: Option<f64>,
    bound: Option<f64>,
) -> anyhow::Result<(Vec<Row>, f64)> {
    let (rate, drained) = ours(Kind::Maintenance, s.jobs).await?;
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
    rows.extend(cpu_split_rows("maintenance", "", &drained.split, s.jobs));
    if let Some(raw) = raw {
        rows.push(row("maintenance", "ratio to raw", rate / raw, "x", None));
    }
    if let Some(bound) = bound {
        let ratio = rate / bound;
        rows.push(row(
            "maintenance",
            "ratio to bound",
            ratio,
            "x",
            Some((">= 0.9".into(), ratio >= 0.9)),
        ));
    }
    Ok((rows, rate))
}

/// N update jobs for distinct repositories with generations in Postgres,
/// beside the maintenance rate of the same run.
pub async fn update(s: &Sizes, maintenance: Option<f64>) -> anyhow::Result<Vec<Row>> {
    let (rate, drained) = ours(Kind::Update, s.jobs).await?;
    let mut rows = vec![
        row(
            "update",
            "update jobs with Postgres generations",
            rate,
            "jobs/s",
            Some((">= 4500".into(), rate >= 4500.0)),
        ),
        cpu_per_job("update", &drained, s.jobs),
    ];
    rows.extend(cpu_split_rows("update", "", &drained.split, s.jobs));
    if let Some(m) = maintenance {
        let ratio = rate / m;
        rows.push(row(
            "update",
            "ratio to maintenance",
            ratio,
            "x",
            Some((">= 0.5".into(), ratio >= 0.5)),
        ));
    }
    Ok(rows)
}

/// CPU per job by process; `prefix` names the run where a scenario has
/// several (Praefect's emulation, which runs in the bench process).
fn cpu_split_rows(scenario: &'static str, prefix: &str, split: &CpuSplit, jobs: usize) -> Vec<Row> {
    let per_job = |secs: f64| secs * 1e6 / jobs.max(1) as f64;
    let parts: Vec<(&str, f64)> = if prefix.is_empty() {
        vec![
            ("consumer", split.consumer),
            ("bench (target)", split.bench),
            ("NATS", split.nats),
            ("Postgres", split.postgres),
            ("other", split.other),
        ]
    } else {
        vec![
            ("emulation+target", split.bench),
            ("Postgres", split.postgres),
            ("other", split.other),
        ]
    };
    let sep = if prefix.is_empty() { "" } else { ", " };
    parts
        .into_iter()
        .map(|(what, secs)| {
            row(
                scenario,
                format!("{prefix}{sep}CPU/job: {what}"),
                per_job(secs),
                "us",
                None,
            )
        })
        .collect()
}

/// Praefect's replication queue, emulated, beside ours: backlogs of four
/// shapes, each drained to the end by both (one Praefect worker per target
/// as Praefect runs, and as many as the consumer has Postgres connections),
/// then update backlogs against targets that answer after 5 and 50 ms.
pub async fn praefect(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let enqueue_jobs = if s.quick { 1_000 } else { 2_000 };
    let enqueue = praefect::enqueue_rate(&env, enqueue_jobs).await;
    env.cleanup().await;
    rows.push(row(
        "praefect",
        format!("Enqueue, {enqueue_jobs} jobs, 16 connections"),
        enqueue?,
        "jobs/s",
        None,
    ));
    let shapes = [
        (Kind::Update, Shape::OnePerRepository),
        (
            Kind::Update,
            Shape::Zipf {
                s: 1.1,
                repositories: 1_000,
            },
        ),
        (Kind::Update, Shape::Repositories(100)),
        (Kind::Update, Shape::StaleLocks(s.stale_locks)),
        (Kind::Maintenance, Shape::OnePerRepository),
    ];
    // Each backlog on a database and stream of its own: the consumer's
    // store must not know the repositories of the one before.
    for (kind, shape) in shapes {
        let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
        let result = praefect_shape(&env, s, kind, shape, &mut rows).await;
        env.cleanup().await;
        result?;
    }
    for latency in [Duration::from_millis(5), Duration::from_millis(50)] {
        let env = BenchEnv::new(&opts(latency)).await?;
        let result = praefect_call_times(&env, s, latency, &mut rows).await;
        env.cleanup().await;
        result?;
    }
    Ok(rows)
}

/// One backlog shape drained by the consumer, then by Praefect's emulation
/// on the same database and target.
async fn praefect_shape(
    env: &BenchEnv,
    s: &Sizes,
    kind: Kind,
    shape: Shape,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = s.praefect_jobs;
    let repos = shape.repositories(n);
    let head = format!(
        "{} {}, {} ({} repositories, busiest {} jobs)",
        kind.name(),
        shapes::label(n),
        shape.label(),
        shapes::distinct(&repos),
        shapes::busiest(&repos),
    );
    let ours = ours_in(env, kind, &repos).await?;
    let stale = shape.stale_locks();
    let one = praefect::drain(env, kind, &repos, stale, 1, s.praefect_cap).await?;
    let many = praefect::drain(env, kind, &repos, stale, PRAEFECT_WORKERS, s.praefect_cap).await?;
    // The target is set at the 10k backlog; smaller ones are a check.
    compare(
        rows,
        &head,
        &ours,
        &one,
        &many,
        (n == 10_000).then_some(10.0),
    );
    if kind == Kind::Update && shape == Shape::OnePerRepository {
        rows.extend(cpu_split_rows(
            "praefect",
            &format!("{head}, 1 worker"),
            &one.cpu,
            one.left,
        ));
    }
    Ok(())
}

/// Update jobs, one per repository, against a target that answers after
/// `latency`: the call bounds a serial worker, and the consumer's
/// concurrency bounds ours.
async fn praefect_call_times(
    env: &BenchEnv,
    s: &Sizes,
    latency: Duration,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let repos: Vec<usize> = (0..s.call_time_jobs).collect();
    let head = format!(
        "update {}, target answers after {} ms",
        shapes::label(repos.len()),
        latency.as_millis()
    );
    let cap = s.praefect_cap.min(Duration::from_secs(60));
    let ours = ours_in(env, Kind::Update, &repos).await?;
    let one = praefect::drain(env, Kind::Update, &repos, 0, 1, cap).await?;
    let many = praefect::drain(env, Kind::Update, &repos, 0, PRAEFECT_WORKERS, cap).await?;
    compare(rows, &head, &ours, &one, &many, None);
    Ok(())
}

/// Rows for one backlog drained by Praefect (1 and 16 workers) and by ours:
/// whole-drain rates, and ours against Praefect's better one with the
/// times to drain.
fn compare(
    rows: &mut Vec<Row>,
    head: &str,
    ours: &Ours,
    one: &praefect::Drain,
    many: &praefect::Drain,
    target: Option<f64>,
) {
    rows.push(row(
        "praefect",
        format!("{head}: Praefect, 1 worker{}", one.note()),
        one.rate(),
        "jobs/s",
        None,
    ));
    rows.push(row(
        "praefect",
        format!(
            "{head}: Praefect, {PRAEFECT_WORKERS} workers{}",
            many.note()
        ),
        many.rate(),
        "jobs/s",
        None,
    ));
    rows.push(row(
        "praefect",
        format!(
            "{head}: ours ({} target calls for {} jobs)",
            ours.calls, one.backlog
        ),
        ours.rate,
        "jobs/s",
        None,
    ));
    let best = if one.rate() >= many.rate() { one } else { many };
    let ratio = ours.rate / best.rate();
    rows.push(row(
        "praefect",
        format!(
            "{head}: ours / Praefect's best (drained in {:.2} s / {:.1} s)",
            ours.drained.secs,
            best.whole_secs()
        ),
        ratio,
        "x",
        target.map(|t| (format!(">= {t}"), ratio >= t)),
    ));
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

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Jobs at a steady 200/s to an idle consumer: publish → dispatch start and
/// publish → ack.
pub async fn latency(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    // Praefect's idle delay takes its own environment and over 12 s of
    // mostly waiting (it idles into its longest backoff first), so it runs
    // beside ours; its idle workers poll once every 5 s.
    let probes = s.idle_probes;
    let idle = tokio::spawn(async move {
        let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
        let delays = praefect::idle_delays(&env, probes).await;
        env.cleanup().await;
        delays
    });
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
    let dispatch = env.dispatch_delays_ms(&by_correlation);
    let mut to_ack: Vec<f64> = acked
        .iter()
        .filter_map(|(seq, at)| {
            at.duration_since(*published.get(seq)?)
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    env.cleanup().await;
    to_ack.sort_by(f64::total_cmp);
    anyhow::ensure!(
        dispatch.len() == total,
        "{} of {total} jobs dispatched",
        dispatch.len()
    );
    let p99 = percentile(&dispatch, 0.99);
    let idle = idle.await??;
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
        row(
            "latency",
            format!("praefect: enqueue -> dispatch, idle queue p50 ({probes} jobs)"),
            percentile(&idle, 0.5),
            "ms",
            None,
        ),
        row(
            "latency",
            "praefect: enqueue -> dispatch, idle queue min",
            percentile(&idle, 0.0),
            "ms",
            None,
        ),
        row(
            "latency",
            "praefect: enqueue -> dispatch, idle queue max",
            percentile(&idle, 1.0),
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
        let mut memory = (0, 0, 0);
        for _ in 0..repeats {
            let (rate, published, peaks) = drain_backlog(n).await?;
            drains.push(rate);
            publish_rate = published;
            memory = peaks;
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
            let (peak, anon, file) = memory;
            let mib = |kib: u64| kib as f64 / 1024.0;
            rows.push(row(
                "backlog",
                format!("consumer peak RSS, {n} drain"),
                mib(peak),
                "MiB",
                Some(("<= 32 MiB".into(), mib(peak) <= 32.0)),
            ));
            rows.push(row(
                "backlog",
                "consumer RSS: anonymous (heap, stacks), highest sampled",
                mib(anon),
                "MiB",
                None,
            ));
            rows.push(row(
                "backlog",
                "consumer RSS: file-backed (its code, libraries)",
                mib(file),
                "MiB",
                None,
            ));
        }
    }
    Ok(rows)
}

/// Publishes `n` maintenance jobs, drains them with one consumer process;
/// returns (drain rate, publish rate, the consumer's memory in KiB: peak RSS,
/// highest anonymous and file-backed resident memory sampled).
async fn drain_backlog(n: usize) -> anyhow::Result<(f64, f64, (u64, u64, u64))> {
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
    let memory = (drained.peak_kib, drained.peak_anon_kib, drained.file_kib);
    stop(child);
    env.cleanup().await;
    Ok((n as f64 / drained.secs, publish_rate, memory))
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

/// Background verification's Postgres side on the reconciler's store: how
/// long choosing the first batch of due replicas takes, and how long
/// choosing every batch of a pass over all `n` replicas takes, each batch
/// recorded as verified (as equal checksums would) before the next.
async fn verification_costs(env: &BenchEnv, n: usize) -> anyhow::Result<(f64, f64)> {
    let storages = ["gitaly-1".to_owned(), "gitaly-2".to_owned()];
    let interval = Duration::from_secs(3600);
    let mut cursor = gitaly_replicator::VerificationCursor::default();
    let mut choosing = Duration::ZERO;
    let mut first = None;
    let mut verified = 0;
    loop {
        let started = Instant::now();
        let due = env
            .store
            .replicas_due_for_verification(&env.vs, &storages, interval, 100, &mut cursor)
            .await?;
        let took = started.elapsed();
        choosing += took;
        first.get_or_insert(took);
        if due.is_empty() {
            break;
        }
        for replica in &due {
            env.store.record_verification(replica, "bench").await?;
        }
        verified += due.len();
        anyhow::ensure!(
            verified <= n,
            "verified {verified} of {n} replicas: a pass repeats"
        );
    }
    anyhow::ensure!(verified == n, "a pass verified {verified} of {n} replicas");
    Ok((
        first.unwrap_or_default().as_secs_f64(),
        choosing.as_secs_f64(),
    ))
}

/// The reconciler's round over a store of `s.reconcile_repositories`
/// repositories with two replicas each: first all in step (the scan alone),
/// then with 1 % of them written on gitaly-1 only (the scan plus one
/// `update` published per lagging replica). Reported per 100,000
/// repositories, the unit.
pub async fn reconcile(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let env = BenchEnv::new(&opts(Duration::ZERO)).await?;
    let result = reconcile_in(&env, s).await;
    env.cleanup().await;
    result
}

async fn reconcile_in(env: &BenchEnv, s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let n = s.reconcile_repositories;
    let pool = env.store.pool();
    sqlx::query(
        "INSERT INTO repositories (virtual_storage, relative_path, generation, \"primary\", replica_path)
        SELECT $1, 'r/' || g || '.git', 1, 'gitaly-1', 'r/' || g || '.git'
        FROM generate_series(1, $2) g",
    )
    .bind(&env.vs)
    .bind(i64::try_from(n)?)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
        SELECT repository_id, virtual_storage, relative_path, s, 1
        FROM repositories, unnest(ARRAY['gitaly-1', 'gitaly-2']) s
        WHERE virtual_storage = $1",
    )
    .bind(&env.vs)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    let config = gitaly_replicator::Config::from_toml_str(&env.toml)?;
    let nodes = gitaly_replicator::NodeSet::from_config(&config)?;
    for node in nodes.iter() {
        node.set_health(gitaly_replicator::Health::Healthy);
    }
    let reconciler =
        gitaly_replicator::Reconciler::new(&config, env.store.clone(), env.js.clone(), nodes)?;
    let per_100k = |secs: f64| secs * 100_000.0 / n as f64;

    let started = Instant::now();
    let in_step = reconciler.round().await?;
    let scan_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        in_step.scanned == n as u64 && in_step.scheduled.is_empty(),
        "in-step round: {in_step:?}"
    );

    let (first_batch_secs, pass_secs) = verification_costs(env, n).await?;

    let lagging = n / 100;
    sqlx::query(
        "WITH r AS (UPDATE repositories SET generation = 2
                    WHERE virtual_storage = $1 AND repository_id % 100 = 0)
        UPDATE storage_repositories SET generation = 2
        WHERE virtual_storage = $1 AND storage = 'gitaly-1' AND repository_id % 100 = 0",
    )
    .bind(&env.vs)
    .execute(pool)
    .await?;
    let started = Instant::now();
    let healing = reconciler.round().await?;
    let healing_secs = started.elapsed().as_secs_f64();
    let scheduled: u64 = healing.scheduled.values().sum();
    anyhow::ensure!(
        scheduled == env.jobs_left().await?,
        "scheduled {scheduled}, stream holds {}",
        env.jobs_left().await?
    );
    let label = format!("{} repositories", shapes::label(n));
    Ok(vec![
        row(
            "reconcile",
            format!("verification, first batch of 100 due replicas, {label}"),
            first_batch_secs * 1000.0,
            "ms",
            None,
        ),
        row(
            "reconcile",
            format!("verification, choosing every batch of one pass, {label}, per 100k"),
            per_100k(pass_secs),
            "s",
            None,
        ),
        row(
            "reconcile",
            format!("scan, in step, {label}, per 100k"),
            per_100k(scan_secs),
            "s",
            None,
        ),
        row(
            "reconcile",
            format!("round, {lagging} lagging of {label}, per 100k"),
            per_100k(healing_secs),
            "s",
            None,
        ),
        row(
            "reconcile",
            format!("jobs scheduled, {lagging} lagging"),
            scheduled as f64,
            "jobs",
            None,
        ),
    ])
}

/// The lock lease of the fleet scenario's processes.
const FLEET_LEASE: Duration = Duration::from_secs(5);

/// The fleet's TOML for one process: the target storage at its own node,
/// a short lease, and an ack wait as short, so a stopped process's jobs are
/// delivered again within the measurement.
fn fleet_toml(env: &BenchEnv, node: &RunningGitaly) -> String {
    env.toml
        .replace(&env.target.address(), &node.address())
        .replacen(
            "\n[replication]\n",
            &format!(
                "\n[replication]\nlock_lease = \"{}s\"\n",
                FLEET_LEASE.as_secs()
            ),
            1,
        )
        .replacen("\n[nats]\n", "\n[nats]\nack_wait = \"5s\"\n", 1)
}

/// Nodes for the target storage, one per process (the environment's own
/// first), each answering after `latency`.
async fn fleet_nodes(n: usize, latency: Duration) -> anyhow::Result<Vec<RunningGitaly>> {
    let mut nodes = Vec::new();
    for _ in 1..n {
        let node = RecordingGitaly::new(Some("token-2")).serve().await?;
        node.gitaly.respond("*", Behaviour::delay(latency));
        nodes.push(node);
    }
    Ok(nodes)
}

/// A fleet of `run` processes on one consumer, each calling the target
/// through a node of its own, so each one's calls are counted by its node:
/// (a) four processes drain maintenance jobs against nodes that answer after
/// 5 ms, one is SIGKILLed, and the others' completion rate over the 5 s after
/// the kill is compared with theirs over the 5 s before; (b) three processes
/// drain jobs against nodes that answer after 200 ms, one is SIGSTOPped, and
/// the time until every repository it was running is called again through
/// another process is measured (lease 5 s, ack wait 5 s).
pub async fn fleet(s: &Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let (ratio, before, after) = fleet_kill(s).await?;
    rows.push(row(
        "fleet",
        "3 others' rate in the 5 s before a SIGKILL of the 4th",
        before,
        "jobs/s",
        None,
    ));
    rows.push(row(
        "fleet",
        "3 others' rate in the 5 s after it",
        after,
        "jobs/s",
        None,
    ));
    rows.push(row(
        "fleet",
        "after / before, 5 ms target",
        ratio,
        "x",
        Some((">= 0.7".into(), ratio >= 0.7)),
    ));
    let regrant = fleet_stop().await?;
    let bound = FLEET_LEASE + Duration::from_secs(5);
    rows.push(row(
        "fleet",
        format!(
            "SIGSTOP to its repositories run elsewhere, lease {} s",
            FLEET_LEASE.as_secs()
        ),
        regrant.as_secs_f64(),
        "s",
        Some((format!("<= {} s", bound.as_secs()), regrant <= bound)),
    ));
    Ok(rows)
}

async fn fleet_kill(s: &Sizes) -> anyhow::Result<(f64, f64, f64)> {
    let latency = Duration::from_millis(5);
    let env = BenchEnv::new(&EnvOptions {
        batch_size: BATCH,
        target_latency: latency,
        max_concurrent_jobs: 16,
        pull_loops: 1,
    })
    .await?;
    let result = fleet_kill_in(&env, s, latency).await;
    env.cleanup().await;
    result
}

async fn fleet_kill_in(
    env: &BenchEnv,
    s: &Sizes,
    latency: Duration,
) -> anyhow::Result<(f64, f64, f64)> {
    let extra = fleet_nodes(4, latency).await?;
    let nodes: Vec<&RunningGitaly> = std::iter::once(&env.target).chain(&extra).collect();
    // A first backlog; it is topped up below from the rate measured once
    // every process works, since that rate differs from machine to machine.
    let jobs_n = if s.quick { 80_000 } else { 150_000 };
    let jobs: Vec<_> = (0..jobs_n).map(|i| env.maintenance_job(i)).collect();
    env.publish_all(&jobs).await?;
    let mut children: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| env.spawn_consumer_with(&fleet_toml(env, n), &format!("fleet-{i}.toml")))
        .collect::<Result<_, _>>()?;
    // Every process works, then a few seconds of steady draining.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nodes.iter().all(|n| n.gitaly.call_count() > 100) {
        anyhow::ensure!(Instant::now() < deadline, "not every process drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let window = Duration::from_secs(5);
    let others = |nodes: &[&RunningGitaly]| -> usize {
        nodes[1..].iter().map(|n| n.gitaly.call_count()).sum()
    };
    let all =
        |nodes: &[&RunningGitaly]| -> usize { nodes.iter().map(|n| n.gitaly.call_count()).sum() };
    // Jobs must still wait when the window after the kill ends: twice what
    // the fleet drains in both windows and a few seconds more, at the rate
    // it drains now.
    let (t0, c0) = (Instant::now(), all(&nodes));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = (all(&nodes) - c0) as f64 / t0.elapsed().as_secs_f64();
    let needed = (rate * (2 * window + Duration::from_secs(5)).as_secs_f64() * 2.0) as u64;
    let waiting = pending(env).await?;
    if waiting < needed {
        let more = usize::try_from(needed - waiting)?;
        let jobs: Vec<_> = (jobs_n..jobs_n + more)
            .map(|i| env.maintenance_job(i))
            .collect();
        env.publish_all(&jobs).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let start = others(&nodes);
    tokio::time::sleep(window).await;
    let at_kill = others(&nodes);
    let killed = children.remove(0);
    signal_and_wait(killed, "KILL");
    tokio::time::sleep(window).await;
    let end = others(&nodes);
    let waiting = pending(env).await?;
    anyhow::ensure!(
        waiting > 0,
        "the backlog ran out during the measurement: raise the job count"
    );
    for c in children {
        signal_and_wait(c, "KILL");
    }
    let before = (at_kill - start) as f64 / window.as_secs_f64();
    let after = (end - at_kill) as f64 / window.as_secs_f64();
    Ok((after / before.max(f64::MIN_POSITIVE), before, after))
}

/// Jobs not yet delivered, not a killed process's unacknowledged ones,
/// which wait for their ack wait.
async fn pending(env: &BenchEnv) -> anyhow::Result<u64> {
    Ok(gitaly_replicator::queue_depth(&env.js, &env.layout)
        .await
        .map_err(anyhow::Error::msg)?
        .iter()
        .map(|d| d.pending)
        .sum())
}

async fn fleet_stop() -> anyhow::Result<Duration> {
    let latency = Duration::from_millis(200);
    let env = BenchEnv::new(&EnvOptions {
        batch_size: BATCH,
        target_latency: latency,
        max_concurrent_jobs: 8,
        pull_loops: 1,
    })
    .await?;
    let result = fleet_stop_in(&env, latency).await;
    env.cleanup().await;
    result
}

async fn fleet_stop_in(env: &BenchEnv, latency: Duration) -> anyhow::Result<Duration> {
    let extra = fleet_nodes(3, latency).await?;
    let nodes: Vec<&RunningGitaly> = std::iter::once(&env.target).chain(&extra).collect();
    for n in &nodes {
        n.gitaly.set_recording(true);
    }
    let jobs: Vec<_> = (0..600).map(|i| env.maintenance_job(i)).collect();
    env.publish_all(&jobs).await?;
    let children: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| env.spawn_consumer_with(&fleet_toml(env, n), &format!("fleet-{i}.toml")))
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes[0].gitaly.call_count() < 20 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the process to stop never ran a job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_child(&children[0], "STOP");
    let stopped_at = tokio::time::Instant::now();
    // The repositories it was running: calls its node received in the last
    // call time before the stop.
    let held: Vec<String> = nodes[0]
        .gitaly
        .calls()
        .iter()
        .filter(|c| c.received_at + latency > stopped_at)
        .map(|c| c.relative_path.clone())
        .collect();
    anyhow::ensure!(!held.is_empty(), "the stopped process was running nothing");
    let deadline = stopped_at + Duration::from_secs(120);
    let regrant = loop {
        let firsts: Vec<Option<tokio::time::Instant>> = held
            .iter()
            .map(|path| {
                nodes[1..]
                    .iter()
                    .flat_map(|n| n.gitaly.calls())
                    .filter(|c| c.relative_path == *path && c.received_at > stopped_at)
                    .map(|c| c.received_at)
                    .min()
            })
            .collect();
        if firsts.iter().all(Option::is_some) {
            break firsts.into_iter().flatten().max().unwrap_or(stopped_at) - stopped_at;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "a stopped process's repositories were not run elsewhere within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    signal_child(&children[0], "CONT");
    for c in children {
        signal_and_wait(c, "KILL");
    }
    Ok(regrant)
}
