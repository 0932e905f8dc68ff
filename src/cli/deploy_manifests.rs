//! `deploy-manifests`: writes the deployment files that must follow the
//! configuration, the KEDA `ScaledObject` (one trigger per consumer) and the
//! streams and consumers as JSON for the `nats` CLI, so they never drift from
//! what `setup` creates. Needs no secrets and contacts nothing.

use gitaly_replicator::manifests::{self, ManifestFile, ScalingOptions};
use gitaly_replicator::{Config, Layout};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DeployManifestsArgs {
    /// Write the files into this directory (created if missing) instead of
    /// printing the ScaledObject on stdout.
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Write the streams and consumers as JSON for the nats CLI, and a script
    /// that creates them, instead of the ScaledObject (needs --output).
    #[arg(long, requires = "output")]
    nats: bool,
    /// The Deployment that KEDA scales (also the ScaledObject's name).
    #[arg(long, default_value = "gitaly-replicator")]
    deployment: String,
    /// Fewest replicas.
    #[arg(long, default_value_t = 1)]
    min_replicas: u32,
    /// Most replicas.
    #[arg(long, default_value_t = 10)]
    max_replicas: u32,
    /// Jobs pending or in flight on one consumer per replica
    /// [default: replication.max_concurrent_jobs].
    #[arg(long)]
    lag_threshold: Option<u64>,
    /// HOST:PORT of the NATS monitoring endpoint that KEDA reads
    /// [default: the first server of nats.url, port 8222].
    #[arg(long, value_name = "HOST:PORT")]
    monitoring_endpoint: Option<String>,
    /// The monitoring endpoint uses HTTPS.
    #[arg(long)]
    monitoring_https: bool,
    /// The NATS account of the streams ("$G" when the server has no accounts).
    #[arg(long, default_value = "$G")]
    account: String,
}

pub fn run(config: &Config, args: &DeployManifestsArgs) -> ExitCode {
    if args.min_replicas > args.max_replicas || args.max_replicas == 0 {
        eprintln!(
            "gitaly-replicator: --min-replicas {} and --max-replicas {}: need 1 <= max and min <= max",
            args.min_replicas, args.max_replicas
        );
        return ExitCode::from(super::EXIT_USAGE);
    }
    let layout = Layout::from_config(config);
    let files = if args.nats {
        match manifests::jetstream_files(&layout) {
            Ok(files) => files,
            Err(e) => {
                eprintln!("gitaly-replicator: cannot write the JetStream JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let defaults = ScalingOptions::for_config(config);
        let options = ScalingOptions {
            deployment: args.deployment.clone(),
            min_replicas: args.min_replicas,
            max_replicas: args.max_replicas,
            lag_threshold: args.lag_threshold.unwrap_or(defaults.lag_threshold),
            monitoring_endpoint: args
                .monitoring_endpoint
                .clone()
                .unwrap_or(defaults.monitoring_endpoint),
            monitoring_https: args.monitoring_https,
            account: args.account.clone(),
        };
        vec![ManifestFile {
            name: manifests::SCALED_OBJECT_FILE.into(),
            contents: manifests::scaled_object(&layout, &options),
        }]
    };
    let Some(dir) = &args.output else {
        for file in &files {
            print!("{}", file.contents);
        }
        return ExitCode::SUCCESS;
    };
    match write_files(dir, &files, args.nats) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gitaly-replicator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `files` into `dir`; with `prune`, also removes stream and consumer
/// JSON files there that the configuration no longer has.
fn write_files(dir: &Path, files: &[ManifestFile], prune: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for file in files {
        let path = dir.join(&file.name);
        std::fs::write(&path, &file.contents)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        if file.name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("cannot make {} executable: {e}", path.display()))?;
        }
        eprintln!("wrote {}", path.display());
    }
    if !prune {
        return Ok(());
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let generated = name.ends_with(".json")
            && (name.starts_with("stream.") || name.starts_with("consumer."));
        if generated && !files.iter().any(|f| f.name == name) {
            std::fs::remove_file(entry.path())
                .map_err(|e| format!("cannot remove {}: {e}", entry.path().display()))?;
            eprintln!(
                "removed {} (no longer in the configuration)",
                entry.path().display()
            );
        }
    }
    Ok(())
}
