//! Commands of the `gitaly-replicator` binary.

mod dataloss;
mod dead;
mod deploy_manifests;
mod logging;
mod praefect_queue;
mod publish;
mod status;

use anyhow::Context as _;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use gitaly_replicator::{Config, LogFormat, manifests};
use logging::Audience;
use std::path::PathBuf;
use std::process::ExitCode;

/// Keeps the replicas of Git repositories in a Gitaly Cluster in step, with
/// NATS JetStream as the replication queue.
#[derive(Debug, Parser)]
#[command(name = "gitaly-replicator", version)]
pub struct Args {
    /// The configuration file (Praefect's config.toml shape).
    #[arg(
        short,
        long,
        global = true,
        env = "GITALY_REPLICATOR_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    /// How log lines on stderr look. This flag wins; without it, [logging]
    /// format from the config (or GITALY_REPLICATOR_LOGGING__FORMAT) when set;
    /// without that, json for `run` and text for the other commands.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = one_of(LogFormat::ALL.map(LogFormat::as_str), LogFormat::parse))]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume replication jobs until SIGINT/SIGTERM.
    Run,
    /// Create or update the streams and consumers, then exit.
    Setup,
    /// Check the database holds Praefect's schema (14.5 or later), add
    /// gitaly-replicator's tables, then exit.
    Migrate {
        /// On an empty database, create the repository store's tables for a
        /// cluster without Praefect (Praefect cannot take such a database over).
        #[arg(long)]
        standalone: bool,
    },
    /// Publish jobs: one from flags, or JSON lines from stdin with --stdin.
    Publish(publish::PublishArgs),
    /// Show queue depth per (virtual storage, target).
    Status,
    /// List the repositories whose replicas lag, per virtual storage, with
    /// the storages holding the latest generation and any jobs waiting for
    /// the others (reads Postgres and JetStream only).
    Dataloss(dataloss::DatalossArgs),
    /// Inspect and handle the dead-letter stream.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Capture Praefect's replication queue (its events are then published
    /// to NATS and replicated here), or release it back to Praefect.
    #[command(subcommand)]
    PraefectQueue(praefect_queue::PraefectQueueCommand),
    /// Validate a configuration file and print it with secrets masked.
    CheckConfig {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Write the KEDA ScaledObject (one trigger per consumer), or with --nats
    /// the streams and consumers as nats CLI JSON, from the configuration;
    /// needs no secrets and contacts nothing.
    DeployManifests(deploy_manifests::DeployManifestsArgs),
}

impl Command {
    fn audience(&self) -> Audience {
        match self {
            Command::Run => Audience::Service,
            _ => Audience::Operator,
        }
    }
}

/// Exit code for a bad configuration or bad usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when NATS or Postgres did not answer within `startup_timeout`
/// (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// Prints what clap has to say and picks the exit code: 0 for `--help` and
/// `--version` (on stdout), 64 for a usage error (on stderr), instead of
/// clap's own 2, so that scripts and systemd see one code for "wrong input".
pub fn parse_error(error: &clap::Error) -> ExitCode {
    // Nothing better to do when stdout or stderr is closed.
    let _ = error.print();
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_USAGE),
    }
}

/// A value out of a closed set of names: `--help` lists them, and any other
/// value is a usage error that lists them too.
fn one_of<T: Clone + Send + Sync + 'static>(
    names: impl IntoIterator<Item = &'static str>,
    parse: fn(&str) -> Option<T>,
) -> impl TypedValueParser<Value = T> {
    // PossibleValuesParser has already refused names that `parse` does not know.
    PossibleValuesParser::new(names).try_map(move |name| parse(&name).ok_or("unknown name"))
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("signal received; draining (send it again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("gitaly-replicator: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = gitaly_replicator::display_error_chain(e.as_ref());
            // Once: a JSON line for a log collector, else plain text.
            match logging::chosen() {
                gitaly_replicator::LogFormat::Json => tracing::error!(error = text, "failed"),
                gitaly_replicator::LogFormat::Text => eprintln!("gitaly-replicator: {text}"),
            }
            let unavailable = e.chain().any(|cause| {
                cause
                    .downcast_ref::<gitaly_replicator::ServiceError>()
                    .is_some_and(gitaly_replicator::ServiceError::is_unreachable)
                    || cause
                        .downcast_ref::<gitaly_replicator::ConnectError>()
                        .is_some_and(gitaly_replicator::ConnectError::is_unreachable)
            });
            if unavailable {
                ExitCode::from(EXIT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

pub async fn dispatch(args: Args) -> ExitCode {
    let Args {
        config: path,
        log_format,
        command,
    } = args;
    let path = match &command {
        Command::CheckConfig { file: Some(file) } => file.clone(),
        _ => path,
    };
    let loaded = match &command {
        // Renders names only, so node tokens need not be set where it runs.
        Command::DeployManifests(_) => manifests::load_config_without_secrets(&path),
        _ => Config::load(&path),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gitaly-replicator: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(log_format, &config.logging, command.audience());
    if matches!(command, Command::Run) {
        for warning in config.warnings() {
            tracing::warn!(key = warning.key, "{}", warning.message);
        }
    }
    match command {
        Command::Run => report(
            gitaly_replicator::run(config, shutdown_signal())
                .await
                .context("run"),
        ),
        Command::Setup => report(setup(&config).await),
        Command::Migrate { standalone } => report(
            gitaly_replicator::connect_and_migrate(
                &config,
                if standalone {
                    gitaly_replicator::EmptyDatabase::CreateStandalone
                } else {
                    gitaly_replicator::EmptyDatabase::Refuse
                },
            )
            .await
            .map(|(_, applied)| {
                if applied.is_empty() {
                    println!("already up to date: no migration to apply");
                }
                for migration in applied {
                    println!("applied {migration}");
                }
            })
            .context("migrate"),
        ),
        Command::Publish(p) => publish::run(&config, p).await,
        Command::Status => report(status::run(&config).await),
        Command::Dead(d) => report(dead::run(&config, d).await),
        Command::PraefectQueue(p) => report(praefect_queue::run(&config, p).await),
        Command::Dataloss(d) => report(dataloss::run(&config, d).await),
        Command::CheckConfig { .. } => {
            print!("{}", config.to_masked_toml());
            for warning in config.warnings() {
                eprintln!("gitaly-replicator: warning: {warning}");
            }
            eprintln!("gitaly-replicator: {} is valid", path.display());
            ExitCode::SUCCESS
        }
        Command::DeployManifests(d) => deploy_manifests::run(&config, &d),
    }
}

async fn setup(config: &Config) -> anyhow::Result<()> {
    let client = gitaly_replicator::connect_nats(&config.nats, "gitaly-replicator setup").await?;
    let layout = gitaly_replicator::Layout::from_config(config);
    let changes = gitaly_replicator::provision(&client, &layout).await?;
    for change in &changes {
        println!("{change}");
    }
    Ok(gitaly_replicator::LayoutChange::all_applied(&changes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of `command` and its subcommands that has no help, as
    /// `path: --name`.
    fn without_help(command: &clap::Command, path: &str) -> Vec<String> {
        let path = format!("{path} {}", command.get_name()).trim().to_owned();
        let mut missing: Vec<String> = command
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| a.get_help().is_none_or(|h| h.to_string().trim().is_empty()))
            .map(|a| format!("{path}: {}", a.get_id()))
            .collect();
        for sub in command.get_subcommands() {
            missing.extend(without_help(sub, &path));
        }
        missing
    }

    #[test]
    fn every_argument_of_every_command_has_help() {
        let missing = without_help(&Args::command(), "");
        assert!(missing.is_empty(), "no help: {missing:#?}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }
}
