//! One demo run from the preflight check to the cleanup. Everything the run
//! creates is recorded in [`Owned`] as soon as it exists, so an error or an
//! interruption at any point still removes it (unless `--keep`).

use crate::config::{bind_metrics_listener, config_toml, parse};
use crate::database::DemoDatabase;
use crate::error::DemoError;
use crate::jobs::{self, JobPlan};
use crate::measurements::Measurements;
use crate::metrics_text::{self, Samples};
use crate::nodes::DemoNodes;
use crate::progress::{Progress, Snapshot};
use crate::report::{DemoReport, Kept, RepositoryStats};
use crate::repositories::{self, RepositorySpec};
use crate::service_task::ServiceTask;
use crate::verify::verify;
use crate::workspace::Workspace;
use crate::{DemoOptions, MIN_REPOSITORIES, preflight};
use async_nats::jetstream;
use gitaly_replicator::Job;
use gitaly_replicator::Layout;
use gitaly_replicator::Publisher;
use gitaly_replicator::connect_nats;

use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// What the run has created so far, released by [`Owned::release`].
struct Owned {
    workspace: Workspace,
    database: Option<DemoDatabase>,
    nodes: Option<DemoNodes>,
    service: Option<ServiceTask>,
    /// A client and the streams it provisioned.
    streams: Option<(async_nats::Client, Vec<String>)>,
}

/// Runs the demo; `interrupted` resolving stops it (and still cleans up).
pub async fn run(
    options: DemoOptions,
    interrupted: impl Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    if options.repositories < MIN_REPOSITORIES {
        return Err(DemoError::Usage(format!(
            "--repositories must be at least {MIN_REPOSITORIES} (one is renamed, one deleted)"
        )));
    }
    let started = Instant::now();
    preflight::check(&options.nats_url, &options.database_url).await?;
    let mut owned = Owned {
        workspace: Workspace::create()?,
        database: None,
        nodes: None,
        service: None,
        streams: None,
    };
    let result = tokio::select! {
        r = body(&options, &mut owned, started) => r,
        _ = interrupted => Err(DemoError::Interrupted),
    };
    let (mut kept, mut warnings) = owned.release(options.keep).await;
    // A kept --tls run keeps its CA, so its nodes can be reached again.
    if let (Some(k), Some(tls)) = (kept.as_mut(), options.tls.as_ref()) {
        let ca = k.workspace.join("ca.pem");
        match std::fs::write(&ca, &tls.ca_pem) {
            Ok(()) => k.ca_file = Some(ca),
            Err(e) => warnings.push(format!("keeping the CA in {}: {e}", ca.display())),
        }
    }
    let out = Progress::new(options.progress);
    for w in &warnings {
        tracing::warn!("{w}");
        out.say(&format!("cleanup: {w}"));
    }
    result.map(|mut report| {
        report.kept = kept;
        report.total_time = started.elapsed();
        report
    })
}

async fn body(
    options: &DemoOptions,
    owned: &mut Owned,
    started: Instant,
) -> Result<DemoReport, DemoError> {
    let out = Progress::new(options.progress);
    let ws = owned.workspace.clone();
    out.say(&format!(
        "gitaly-replicator demo, run {} (scratch directory {})",
        ws.id,
        ws.root.display()
    ));

    let database = DemoDatabase::create(&options.database_url, &ws.database_name()).await?;
    owned.database = Some(database.clone());
    let nodes = owned
        .nodes
        .insert(DemoNodes::start(&ws, options.tls.as_ref()).await?);
    let addresses: Vec<String> = nodes
        .nodes
        .iter()
        .map(|n| format!("{} at {}", n.storage, n.config_address()))
        .collect();
    out.say(&format!(
        "  started 3 storage nodes (virtual storage \"default\"): {}",
        addresses.join(", ")
    ));

    let (ops_listener, ops) = bind_metrics_listener()?;
    let toml = config_toml(&ws, nodes, &database.url, &options.nats_url, ops);
    ws.write_config(&toml)?;
    let config = parse(&toml)?;
    let store = gitaly_replicator::connect_store(
        &config,
        gitaly_replicator::EmptyDatabase::CreateStandalone,
    )
    .await?;

    let specs = repositories::plan(options.repositories);
    repositories::create_all(&specs, &nodes.source().dir, ws.git_home(), &store).await?;
    let stats = RepositoryStats {
        created: specs.len(),
        commits: specs.iter().map(RepositorySpec::commits).sum(),
        refs: specs.iter().map(RepositorySpec::refs).sum(),
    };
    out.say(&format!(
        "  created {} repositories on gitaly-1 ({} commits, {} branches and tags), recorded in Postgres database {}",
        stats.created, stats.commits, stats.refs, database.name
    ));

    let client = connect_nats(&config.nats, "gitaly-replicator demo")
        .await
        .map_err(DemoError::nats("connecting"))?;
    let layout = Layout::from_config(&config);
    owned.streams = Some((
        client.clone(),
        vec![
            layout.stream.clone(),
            layout.dead_letter_stream.clone(),
            layout.advisory_stream.clone(),
        ],
    ));
    gitaly_replicator::provision(&client, &layout).await?;
    let js = jetstream::new(client.clone());
    let publisher = Publisher::new(js.clone(), layout.clone());
    let plan = jobs::plan(&specs, &ws.id)?;
    publish(&publisher, &plan.replication).await?;
    out.say(&format!(
        "  published {} update jobs to stream {} (subjects {}.default.*); \
         {} maintenance, rename and delete jobs follow once they are done",
        plan.replication.len(),
        layout.stream,
        layout.subject_prefix,
        plan.follow_up.len()
    ));

    let recorder = gitaly_replicator::install_metrics(
        &gitaly_replicator::DEFAULT_LATENCY_BUCKETS,
        &gitaly_replicator::DEFAULT_RECONCILIATION_BUCKETS,
    )
    .map_err(|e| DemoError::ServiceTask(format!("metrics recorder: {e}")))?;
    let baseline = Samples::parse(&recorder.render());
    let setup_time = started.elapsed();
    let service = owned
        .service
        .insert(ServiceTask::start(config, ops_listener));
    service.wait_ready(ops, Duration::from_secs(30)).await?;
    let metrics_url = format!("http://{ops}/metrics");
    out.say(&format!(
        "  replicator running in this process; metrics at {metrics_url}"
    ));

    let consumer_started = Instant::now();
    let watched = Watched {
        js: &js,
        layout: &layout,
        publisher: &publisher,
        plan: &plan,
        recorder: &recorder,
        baseline: &baseline,
    };
    let unfinished = watch(options, watched, service, consumer_started).await?;
    let jobs_time = consumer_started.elapsed();

    let scraped = match metrics_text::scrape(ops).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "scraping {metrics_url} failed; reading the recorder");
            Samples::parse(&recorder.render())
        }
    };
    let measurements = Measurements::between(&baseline, &scraped);
    if let Some(service) = owned.service.take() {
        service.stop().await?;
    }
    let dead_letters = stream_messages(&js, &layout.dead_letter_stream).await?;

    out.say("  verifying every replica against its source");
    let checks = verify(nodes, &store, ws.git_home(), &specs, &plan.what).await?;
    store.pool().close().await;

    let mut published = BTreeMap::new();
    for j in plan.replication.iter().chain(&plan.follow_up) {
        *published.entry(j.change_type()).or_insert(0) += 1;
    }
    Ok(DemoReport {
        run_id: ws.id.clone(),
        repositories: stats,
        published,
        measurements,
        dead_letters,
        unfinished,
        setup_time,
        jobs_time,
        total_time: started.elapsed(),
        checks,
        metrics_url,
        kept: None,
    })
}

/// Publishes `jobs`; the first failure is the error.
async fn publish(publisher: &Publisher, jobs: &[Job]) -> Result<(), DemoError> {
    for result in publisher.publish_many(jobs, 64).await {
        result?;
    }
    Ok(())
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> Result<u64, DemoError> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(DemoError::nats(&format!("stream {stream}")))?;
    let info = s
        .info()
        .await
        .map_err(DemoError::nats(&format!("stream {stream}")))?;
    Ok(info.state.messages)
}

/// Jobs not yet done, as the consumers see them: waiting plus delivered and
/// not acknowledged. Not the work stream's message count, which a broker
/// killed right after acknowledgements can leave above it.
async fn jobs_left(js: &jetstream::Context, layout: &Layout) -> Result<u64, DemoError> {
    let depths = gitaly_replicator::queue_depth(js, layout)
        .await
        .map_err(DemoError::nats("queue depth"))?;
    Ok(depths.iter().map(|d| d.pending + d.in_flight).sum())
}

/// What [`watch`] looks at.
struct Watched<'a> {
    js: &'a jetstream::Context,
    layout: &'a Layout,
    publisher: &'a Publisher,
    plan: &'a JobPlan,
    recorder: &'a PrometheusHandle,
    baseline: &'a Samples,
}

/// Shows progress until the work stream is empty (publishing the second
/// wave when the first is done) or the timeout passes; returns the jobs
/// left unfinished.
async fn watch(
    options: &DemoOptions,
    w: Watched<'_>,
    service: &mut ServiceTask,
    consumer_started: Instant,
) -> Result<u64, DemoError> {
    let mut progress = Progress::new(options.progress);
    let total = w.plan.total() as u64;
    let mut published = w.plan.replication.len() as u64;
    let mut second_wave = false;
    loop {
        let pending = jobs_left(w.js, w.layout).await?;
        let m = Measurements::between(w.baseline, &Samples::parse(&w.recorder.render()));
        let snapshot = Snapshot {
            done: published.saturating_sub(pending),
            total,
            failed: m.failed,
            dead: m.dead_letters,
            elapsed: consumer_started.elapsed(),
        };
        if pending == 0 && !second_wave {
            publish(w.publisher, &w.plan.follow_up).await?;
            published += w.plan.follow_up.len() as u64;
            second_wave = true;
            progress.update(&snapshot);
            continue;
        }
        if pending == 0 || consumer_started.elapsed() >= options.timeout {
            progress.finish(&snapshot);
            return Ok(total - snapshot.done);
        }
        progress.update(&snapshot);
        if let Some(e) = service.failure().await {
            progress.finish(&snapshot);
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Owned {
    /// Stops the service and the nodes; unless `keep`, deletes the streams,
    /// the database and the scratch directory. Returns what was kept and
    /// what could not be removed.
    async fn release(mut self, keep: bool) -> (Option<Kept>, Vec<String>) {
        let mut warnings = Vec::new();
        if let Some(service) = self.service.take()
            && let Err(e) = service.stop().await
        {
            warnings.push(format!("stopping the replicator: {e}"));
        }
        let storages = self
            .nodes
            .as_ref()
            .map(|n| {
                n.nodes
                    .iter()
                    .map(|n| (n.storage.clone(), n.dir.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(nodes) = self.nodes.take() {
            nodes.stop(Duration::from_secs(2)).await;
        }
        if keep {
            let kept = Kept {
                run_id: self.workspace.id.clone(),
                ca_file: None,
                workspace: self.workspace.root.clone(),
                storages,
                config_file: self.workspace.config_file(),
                database_url: self
                    .database
                    .as_ref()
                    .map(DemoDatabase::display_url)
                    .unwrap_or_default(),
                streams: self
                    .streams
                    .as_ref()
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default(),
            };
            return (Some(kept), warnings);
        }
        if let Some((client, streams)) = self.streams.take() {
            let js = jetstream::new(client.clone());
            for stream in streams {
                if let Err(e) = js.delete_stream(&stream).await {
                    warnings.push(format!("deleting stream {stream}: {e}"));
                }
            }
            let _ = client.flush().await;
        }
        if let Some(database) = self.database.take()
            && let Err(e) = database.drop_database().await
        {
            warnings.push(e.to_string());
        }
        if let Err(e) = self.workspace.remove() {
            warnings.push(e.to_string());
        }
        (None, warnings)
    }
}

/// `--clean ID`: removes what a `--keep` run kept (its streams, database
/// and directory), and answers what it removed. What is gone already is
/// not an error.
pub async fn clean(id: &str, nats_url: &str, database_url: &str) -> Result<Vec<String>, DemoError> {
    let ws = Workspace::of(id)?;
    preflight::check(nats_url, database_url).await?;
    let mut removed = Vec::new();
    let client = async_nats::connect(nats_url)
        .await
        .map_err(|e| DemoError::Usage(format!("--nats-url: {e}")))?;
    let js = jetstream::new(client.clone());
    let prefix = ws.stream();
    let mut names = js.stream_names();
    let mut ours = Vec::new();
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        match name {
            Ok(n) if n == prefix || n.starts_with(&format!("{prefix}_")) => ours.push(n),
            Ok(_) => {}
            Err(e) => return Err(DemoError::Usage(format!("listing streams: {e}"))),
        }
    }
    for stream in ours {
        js.delete_stream(&stream)
            .await
            .map_err(|e| DemoError::Usage(format!("deleting stream {stream}: {e}")))?;
        removed.push(format!("stream {stream}"));
    }
    let database = DemoDatabase::existing(database_url, &ws.database_name())?;
    if database.drop_database().await? {
        removed.push(format!("database {}", ws.database_name()));
    }
    if ws.root.exists() {
        ws.remove()?;
        removed.push(format!("directory {}", ws.root.display()));
    }
    Ok(removed)
}
