//! Commands of the `gitaly-replicator` binary.

mod dead;
mod deploy_manifests;
mod publish;
mod status;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gitaly_replicator::{Config, LogFormat, LoggingConfig};
use std::path::{Path, PathBuf};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume replication jobs until SIGINT/SIGTERM.
    Run,
    /// Create or update the streams and consumers, then exit.
    Setup,
    /// Apply the database migrations, then exit.
    Migrate,
    /// Publish jobs: one from flags, or JSON lines from stdin with --stdin.
    Publish(publish::PublishArgs),
    /// Show queue depth per (virtual storage, target).
    Status,
    /// Inspect and handle the dead-letter stream.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
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

/// Exit code for a bad configuration or bad usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("gitaly-replicator: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_logging(logging: &LoggingConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(logging.filter_directive()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match logging.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
            tracing::error!(error = format!("{e:#}"), "failed");
            eprintln!("gitaly-replicator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn dispatch(args: Args) -> ExitCode {
    if let Command::DeployManifests(d) = &args.command {
        return deploy_manifests::run(&args.config, d);
    }
    if let Command::CheckConfig { file } = &args.command {
        let path = file.as_deref().unwrap_or(&args.config);
        return match load_config(path) {
            Ok(c) => {
                print!("{}", c.to_masked_toml());
                eprintln!("gitaly-replicator: {} is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    let config = match load_config(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.logging);
    match args.command {
        Command::Run => report(
            gitaly_replicator::run(config, shutdown_signal())
                .await
                .context("run"),
        ),
        Command::Setup => report(setup(&config).await),
        Command::Migrate => report(
            gitaly_replicator::connect_store(&config)
                .await
                .map(|_| println!("migrations applied"))
                .context("migrate"),
        ),
        Command::Publish(p) => publish::run(&config, p).await,
        Command::Status => report(status::run(&config).await),
        Command::Dead(d) => report(dead::run(&config, d).await),
        Command::CheckConfig { .. } => ExitCode::SUCCESS,
        Command::DeployManifests(_) => ExitCode::SUCCESS,
    }
}

async fn setup(config: &Config) -> anyhow::Result<()> {
    let client = gitaly_replicator::connect_nats(&config.nats, "gitaly-replicator setup").await?;
    let layout = gitaly_replicator::Layout::from_config(config);
    for change in gitaly_replicator::provision(&client, &layout).await? {
        println!("{change}");
    }
    Ok(())
}
