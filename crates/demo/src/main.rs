//! `gitaly-replicator-demo`: the whole system at work on this machine in one
//! command (see the `demo` library). Progress goes to stderr, the summary to
//! stdout; the exit code is 0 only when every replica matches its source.

use clap::Parser;
use demo::{DemoError, DemoOptions, DemoTls, ProgressStyle};
use std::io::IsTerminal;
use std::process::ExitCode;

/// Exit code when NATS or Postgres is not there (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for bad usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Shows gitaly-replicator at work on this machine: three storage nodes,
/// repositories, replication through NATS, a check of every replica. Needs
/// only NATS (JetStream) and Postgres; reads no config file.
#[derive(Debug, Clone, Parser)]
#[command(name = "gitaly-replicator-demo", version)]
struct DemoArgs {
    /// Repositories to create on gitaly-1 (at least 3: one is renamed, one deleted).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(3..=2000))]
    repositories: u16,
    /// Keep the streams, the database and the repositories, and print where
    /// they are and the command that removes them.
    #[arg(long)]
    keep: bool,
    /// Remove what the `--keep` run with this id kept (its streams, database
    /// and directory), then exit.
    #[arg(long, value_name = "ID", conflicts_with_all = ["keep", "tls", "repositories"])]
    clean: Option<String>,
    /// The NATS server (JetStream enabled).
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The Postgres server the demo creates its own database on; the URL
    /// names the database to connect to for CREATE DATABASE.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The storage nodes serve TLS (`tls://` in the config), with a
    /// certificate of a CA made for the run and trusted by `SSL_CERT_FILE`.
    #[arg(long)]
    tls: bool,
}

/// `--tls`: the run's certificates, and the CA written to a file that
/// `SSL_CERT_FILE` names, as a Gitaly client is told to trust a private CA.
/// Must run before any thread exists: it sets the process's environment.
fn trust_demo_ca() -> Result<(DemoTls, tempfile::TempDir), String> {
    let tls = DemoTls::generate().map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("gitaly-replicator-demo-ca-")
        .tempdir()
        .map_err(|e| format!("creating a directory for the CA: {e}"))?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &tls.ca_pem)
        .map_err(|e| format!("writing {}: {e}", ca_file.display()))?;
    // SAFETY: called from main before the runtime starts: no other thread
    // reads or writes the environment yet.
    unsafe { std::env::set_var(gitaly_replicator::SSL_CERT_FILE, &ca_file) };
    Ok((tls, dir))
}

/// Service logs stay quiet (warnings and errors) so the progress reads
/// well; `RUST_LOG` shows more.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn main() -> ExitCode {
    let args = match DemoArgs::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let tls = if args.tls {
        match trust_demo_ca() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("gitaly-replicator-demo: --tls: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    match tokio::runtime::Runtime::new() {
        // The CA's directory lives until the run is over.
        Ok(runtime) => runtime.block_on(run(&args, tls.as_ref().map(|(t, _)| t.clone()))),
        Err(e) => {
            eprintln!("gitaly-replicator-demo: cannot start the async runtime: {e}");
            ExitCode::from(70)
        }
    }
}

async fn run(args: &DemoArgs, tls: Option<DemoTls>) -> ExitCode {
    init_logging();
    if let Some(id) = &args.clean {
        return match demo::clean(id, &args.nats_url, &args.database_url).await {
            Ok(removed) if removed.is_empty() => {
                println!("nothing of run {id} was left");
                ExitCode::SUCCESS
            }
            Ok(removed) => {
                for what in removed {
                    println!("removed {what}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => failed(e),
        };
    }
    let options = DemoOptions {
        repositories: usize::from(args.repositories),
        keep: args.keep,
        nats_url: args.nats_url.clone(),
        database_url: args.database_url.clone(),
        progress: ProgressStyle::for_stderr(),
        tls,
        ..DemoOptions::default()
    };
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match demo::run(options, interrupted).await {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => failed(e),
    }
}

/// Says why the demo failed and picks the exit code.
fn failed(e: DemoError) -> ExitCode {
    eprintln!("gitaly-replicator-demo: {e}");
    match e {
        DemoError::Unreachable(_) => ExitCode::from(EXIT_UNAVAILABLE),
        DemoError::Usage(_) => ExitCode::from(EXIT_USAGE),
        DemoError::Interrupted => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    }
}
