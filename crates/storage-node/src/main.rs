//! `storage-node`: a git-backed node speaking Gitaly's gRPC protocol, for
//! demos, end-to-end tests and benchmarks. Prints `listening on ADDR` as its
//! first line on stdout once it accepts calls; stops on SIGINT or SIGTERM.

use clap::Parser;
use gitaly_replicator::Secret;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use storage_node::{
    FailMethod, Faults, NodeConfig, NodeTls, OpenNode, ServeError, parse_fail_method,
    parse_failure_rate, parse_storage,
};
use tracing_subscriber::EnvFilter;

/// Exit code for a bad command line or configuration (EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "storage-node",
    version,
    about = "A git-backed storage node that speaks Gitaly's gRPC protocol",
    after_help = "Serves gitaly.RepositoryService, gitaly.ObjectPoolService, gitaly.RefService and \
grpc.health.v1.Health. Every call but health checks needs Gitaly's v2 token made from --token.\n\n\
Fault injection (never applied to health checks):\n  \
--latency 5ms                     added before every call\n  \
--failure-rate 0.1                answer 10% of calls with UNAVAILABLE\n  \
--fail-method GarbageCollect=unimplemented\n                                    \
every call to that method answers that code (repeatable;\n                                    \
METHOD is a name, Service/Method or /package.Service/Method)\n\n\
Example:\n  storage-node --listen 127.0.0.1:0 --storage gitaly-1=/tmp/gitaly-1 --token secret"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one (see the first line printed).
    #[arg(long, default_value = "127.0.0.1:8075")]
    listen: SocketAddr,
    /// A storage as NAME=DIR, a directory of bare repositories (created if missing); repeatable.
    #[arg(long = "storage", value_name = "NAME=DIR", required = true, value_parser = parse_storage)]
    storages: Vec<(String, PathBuf)>,
    /// Gitaly's auth token; an empty token turns authentication off.
    #[arg(long, env = "STORAGE_NODE_TOKEN", hide_env_values = true)]
    token: String,
    /// Latency added to every call except health checks, e.g. 5ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Share of calls (0 to 1) answered UNAVAILABLE at random.
    #[arg(long, value_parser = parse_failure_rate, default_value_t = 0.0)]
    failure_rate: f64,
    /// METHOD=CODE: every call to METHOD answers the gRPC CODE, e.g. GarbageCollect=unimplemented.
    #[arg(long = "fail-method", value_name = "METHOD=CODE", value_parser = parse_fail_method)]
    fail_methods: Vec<FailMethod>,
    /// Serve TLS with this certificate (PEM, the chain from the leaf), as
    /// Gitaly's tls_listen_addr; clients dial tls://HOST:PORT.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax); logs go to stderr.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = NodeConfig {
        storages: args.storages,
        token: Secret::new(args.token),
        faults: Faults {
            latency: args.latency,
            failure_rate: args.failure_rate,
            fail_methods: args.fail_methods,
        },
    };
    let storages: Vec<_> = config.storages.iter().map(|(n, _)| n.clone()).collect();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match NodeTls::read(cert, key) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("storage-node: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
        _ => None,
    };
    let node = match OpenNode::open(config) {
        Ok(node) => match tls {
            Some(tls) => node.with_tls(tls),
            None => node,
        },
        Err(e) => {
            eprintln!("storage-node: {e}");
            let code = match e {
                ServeError::Config(_) => EX_USAGE,
                _ => 1,
            };
            return ExitCode::from(code);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("storage-node: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(%addr, ?storages, "storage node starting");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {addr}");
    let _ = stdout.flush();
    match node.run(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storage-node: {e}");
            ExitCode::FAILURE
        }
    }
}
