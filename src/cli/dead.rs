//! `dead list | replay | purge`: the dead-letter stream for operators.

use clap::Subcommand;
use gitaly_replicator::Config;
use gitaly_replicator::Layout;
use gitaly_replicator::connect_nats;
use gitaly_replicator::dead_letter_prefix;
use gitaly_replicator::dead_letters::{self, headers};
use gitaly_replicator::parse_job_subject;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead jobs, oldest first.
    List {
        /// Start at this dead-letter sequence.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// List at most this many jobs.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print each job as one JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send dead jobs back to work (fresh attempts) and remove them here.
    Replay(Selection),
    /// Delete dead jobs.
    Purge(Selection),
}

/// Which dead jobs: named, or all of them. One is required, so a forgotten
/// argument is a usage error rather than a command that does nothing.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Selection {
    /// Dead-letter sequences, as `dead list` shows them.
    #[arg(value_name = "SEQUENCE")]
    sequences: Vec<u64>,
    /// Every dead job.
    #[arg(long)]
    all: bool,
}

pub async fn run(config: &Config, command: DeadCommand) -> anyhow::Result<()> {
    let client = connect_nats(&config.nats, "gitaly-replicator dead").await?;
    let js = async_nats::jetstream::new(client.clone());
    let layout = Layout::from_config(config);
    layout.require_streams(&js).await?;
    match command {
        DeadCommand::List { from, limit, json } => {
            let dead = dead_letters::list(&js, &layout, from, limit).await?;
            for m in &dead {
                let storages =
                    parse_job_subject(&dead_letter_prefix(&layout.subject_prefix), &m.subject)
                        .map(|(vs, t)| format!("{vs}/{t}"))
                        .unwrap_or_else(|_| m.subject.clone());
                let job: serde_json::Value =
                    serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
                if json {
                    let line = serde_json::json!({
                        "sequence": m.sequence,
                        "time": m.time.format(&Rfc3339).unwrap_or_default(),
                        "target": storages,
                        "reason": m.header(headers::REASON),
                        "attempts": number(m.header(headers::ATTEMPTS)),
                        "deliveries": number(m.header(headers::DELIVERIES)),
                        "error": m.header(headers::ERROR),
                        "original_subject": m.header(headers::ORIGINAL_SUBJECT),
                        "payload": String::from_utf8_lossy(&m.payload),
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{:>6}  {}  {}  {} {}  reason={} attempts={} deliveries={}  {}",
                        m.sequence,
                        m.time.format(&Rfc3339).unwrap_or_default(),
                        storages,
                        job.get("change").and_then(|v| v.as_str()).unwrap_or("?"),
                        job.get("relative_path")
                            .and_then(|v| v.as_str())
                            .unwrap_or("?"),
                        m.header(headers::REASON).unwrap_or("?"),
                        m.header(headers::ATTEMPTS).unwrap_or("?"),
                        m.header(headers::DELIVERIES).unwrap_or("?"),
                        m.header(headers::ERROR).unwrap_or(""),
                    );
                }
            }
            if dead.is_empty() {
                eprintln!("no dead jobs");
            }
        }
        DeadCommand::Replay(Selection { sequences, all }) => {
            let chosen = choose(&js, &layout, sequences, all).await?;
            let superseded = count_superseded(config, &js, &layout, &chosen).await;
            let mut refused = 0;
            for m in &chosen {
                match dead_letters::replay(&js, &layout, m).await {
                    Ok(()) => {}
                    Err(e @ dead_letters::DeadLetterError::ForeignSubject { .. }) => {
                        eprintln!("gitaly-replicator: {e}");
                        refused += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            println!("replayed {} job(s)", chosen.len() - refused);
            match superseded {
                Ok(0) => {}
                Ok(n) => println!(
                    "{n} of them were superseded by a later job of their replica (or their repository was created again): they keep their place in its order and are skipped as out of order"
                ),
                Err(e) => eprintln!(
                    "gitaly-replicator: could not tell how many replayed jobs a later job superseded (those are skipped as out of order when they run): {e:#}"
                ),
            }
            if refused > 0 {
                anyhow::bail!(
                    "{refused} dead job(s) refused: not on a work subject of this deployment"
                );
            }
        }
        DeadCommand::Purge(Selection { sequences, all }) => {
            if all {
                println!(
                    "purged {} job(s)",
                    dead_letters::purge_all(&js, &layout).await?
                );
            } else {
                for s in &sequences {
                    dead_letters::delete(&js, &layout, *s).await?;
                }
                println!("purged {} job(s)", sequences.len());
            }
        }
    }
    client.flush().await.ok();
    Ok(())
}

/// How many of `chosen` a later job of their replica superseded, read
/// before they are replayed.
async fn count_superseded(
    config: &Config,
    js: &async_nats::jetstream::Context,
    layout: &Layout,
    chosen: &[dead_letters::DeadMessage],
) -> anyhow::Result<usize> {
    let mut work = js.get_stream(&layout.stream).await?;
    let incarnation = gitaly_replicator::Incarnation::of(work.info().await?);
    let store = gitaly_replicator::open_store(config, 1).await?;
    let mut superseded = 0;
    for m in chosen {
        if dead_letters::superseded(&store, &incarnation, m).await? {
            superseded += 1;
        }
    }
    Ok(superseded)
}

async fn choose(
    js: &async_nats::jetstream::Context,
    layout: &Layout,
    sequences: Vec<u64>,
    all: bool,
) -> anyhow::Result<Vec<dead_letters::DeadMessage>> {
    let every = dead_letters::list(js, layout, 1, usize::MAX).await?;
    if all {
        return Ok(every);
    }
    let found: Vec<_> = every
        .into_iter()
        .filter(|m| sequences.contains(&m.sequence))
        .collect();
    if found.len() != sequences.len() {
        let missing: Vec<_> = sequences
            .iter()
            .filter(|s| !found.iter().any(|m| m.sequence == **s))
            .collect();
        anyhow::bail!("no dead job with sequence {missing:?}");
    }
    Ok(found)
}

/// A count header as a JSON number (null when absent or not a number).
fn number(header: Option<&str>) -> serde_json::Value {
    header
        .and_then(|h| h.trim().parse::<u64>().ok())
        .map_or(serde_json::Value::Null, Into::into)
}
