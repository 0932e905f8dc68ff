//! `publish`: one job from flags, or JSON lines from stdin.

use anyhow::Context as _;
use clap::Args;
use gitaly_replicator::ChangeType;
use gitaly_replicator::Config;
use gitaly_replicator::Job;
use gitaly_replicator::Layout;
use gitaly_replicator::Publisher;
use gitaly_replicator::connect_nats;
use serde_json::{Map, Value};
use std::io::BufRead;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Read one JSON job per line from stdin instead of flags.
    #[arg(long, conflicts_with_all = ["change", "relative_path"])]
    stdin: bool,
    /// The change type, as the job contract spells it.
    #[arg(long, required_unless_present = "stdin", value_parser = super::one_of(ChangeType::ALL.map(ChangeType::as_str), ChangeType::parse))]
    change: Option<ChangeType>,
    /// The virtual storage the repository belongs to.
    #[arg(long, default_value = "default")]
    virtual_storage: String,
    /// The repository's path relative to its storage, e.g. @hashed/aa/bb/aabb.git.
    #[arg(long, required_unless_present = "stdin")]
    relative_path: Option<String>,
    /// Target storage.
    #[arg(long, required_unless_present = "stdin")]
    target: Option<String>,
    /// Source storage (update and create).
    #[arg(long)]
    source: Option<String>,
    /// A param as key=value, e.g. --param prune=true (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Ties the job to the request that caused it, in logs and traces.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Idempotency key used as Nats-Msg-Id (a fresh UUID by default). Reuse it
    /// only to retry the same logical publish.
    #[arg(long)]
    message_id: Option<String>,
}

fn job_from_flags(a: &PublishArgs) -> anyhow::Result<Job> {
    let mut m = Map::new();
    m.insert(
        "change".into(),
        a.change.map(ChangeType::as_str).unwrap_or_default().into(),
    );
    m.insert("virtual_storage".into(), a.virtual_storage.clone().into());
    m.insert(
        "relative_path".into(),
        a.relative_path.clone().unwrap_or_default().into(),
    );
    m.insert(
        "target_node_storage".into(),
        a.target.clone().unwrap_or_default().into(),
    );
    if let Some(s) = &a.source {
        m.insert("source_node_storage".into(), s.clone().into());
    }
    if let Some(c) = &a.correlation_id {
        m.insert("correlation_id".into(), c.clone().into());
    }
    if !a.params.is_empty() {
        let mut p = Map::new();
        for kv in &a.params {
            let (k, v) = kv.split_once('=').ok_or_else(|| UsageError {
                flag: format!("--param {kv}"),
                reason: "expected KEY=VALUE".into(),
            })?;
            // true/false/numbers as JSON, anything else as a string.
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
            p.insert(k.to_owned(), value);
        }
        m.insert("params".into(), Value::Object(p));
    }
    Job::from_value(&Value::Object(m)).map_err(|e| {
        UsageError {
            flag: flag_of(&e.field),
            reason: e.reason,
        }
        .into()
    })
}

/// A job the flags describe wrongly: exit 64, naming the flag to change.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {reason}")]
struct UsageError {
    flag: String,
    reason: String,
}

/// The flag that sets the job field `field` (a JSON path such as
/// `params.prune`).
fn flag_of(field: &str) -> String {
    match field {
        "change" => "--change".into(),
        "virtual_storage" => "--virtual-storage".into(),
        "relative_path" => "--relative-path".into(),
        "target_node_storage" => "--target".into(),
        "source_node_storage" => "--source".into(),
        "correlation_id" => "--correlation-id".into(),
        "params" => "--param".into(),
        other => match other.strip_prefix("params.") {
            Some(key) => format!("--param {key}=…"),
            None => other.to_owned(),
        },
    }
}

pub async fn run(config: &Config, args: PublishArgs) -> ExitCode {
    match publish(config, args).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("gitaly-replicator: {failed} job(s) not published");
            ExitCode::FAILURE
        }
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("gitaly-replicator: publish: {e}");
            ExitCode::from(super::EXIT_USAGE)
        }
        Err(e) => super::report(Err(e)),
    }
}

/// Returns how many jobs failed.
async fn publish(config: &Config, args: PublishArgs) -> anyhow::Result<usize> {
    let mut jobs = Vec::new();
    let mut failed = 0;
    if args.stdin {
        for (n, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            match Job::from_json(line.as_bytes()) {
                Ok(j) => jobs.push(j),
                Err(e) => {
                    println!("line {}: not published: {e}", n + 1);
                    failed += 1;
                }
            }
        }
    } else {
        jobs.push(job_from_flags(&args)?);
    }
    let client = connect_nats(&config.nats, "gitaly-replicator publish").await?;
    let publisher = Publisher::new(
        async_nats::jetstream::new(client.clone()),
        Layout::from_config(config),
    );
    if let (Some(id), [job]) = (&args.message_id, jobs.as_slice()) {
        let p = publisher.publish(job, Some(id)).await?;
        println!(
            "published sequence={} message_id={} subject={}{}",
            p.sequence,
            p.message_id,
            p.subject,
            if p.duplicate {
                " (duplicate dropped by the stream)"
            } else {
                ""
            }
        );
    } else {
        for (job, r) in jobs.iter().zip(publisher.publish_many(&jobs, 1000).await) {
            match r {
                Ok(p) => println!(
                    "published sequence={} message_id={} subject={}{}",
                    p.sequence,
                    p.message_id,
                    p.subject,
                    if p.duplicate { " (duplicate)" } else { "" }
                ),
                Err(e) => {
                    println!(
                        "{} {}: not published: {}",
                        job.change_type(),
                        job.relative_path,
                        gitaly_replicator::display_error_chain(&e)
                    );
                    failed += 1;
                }
            }
        }
    }
    client.flush().await.ok();
    Ok(failed)
}
