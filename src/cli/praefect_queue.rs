//! `praefect-queue capture | release | status`: take Praefect's replication
//! queue over without changing Praefect, and hand it back.

use clap::Subcommand;
use gitaly_replicator::{Config, EmptyDatabase, connect_store};

#[derive(Debug, Subcommand)]
pub enum PraefectQueueCommand {
    /// Install the capture on Praefect's replication_queue: from now on
    /// every event Praefect writes is published to NATS and settled here
    /// (Praefect's own workers leave it alone, and still count it pending).
    Capture,
    /// Remove the capture and hand every event not yet settled back to
    /// Praefect's replication manager (as `ready`).
    Release,
    /// Whether the capture is installed, and the events it holds.
    Status,
}

pub async fn run(config: &Config, command: PraefectQueueCommand) -> anyhow::Result<()> {
    // Applies this release's migrations first: the capture's table is one.
    let store = connect_store(config, EmptyDatabase::Refuse).await?;
    match command {
        PraefectQueueCommand::Capture => {
            if !store.install_capture().await? {
                anyhow::bail!(
                    "the database holds no Praefect replication_queue: point [database] at Praefect's database"
                );
            }
            println!(
                "capturing Praefect's replication_queue: every event Praefect writes from now on is published by `gitaly-replicator run` (events already queued stay with Praefect)"
            );
        }
        PraefectQueueCommand::Release => {
            let released = store.release_capture().await?;
            println!(
                "released Praefect's replication_queue: {} unsettled event(s) handed back to Praefect as ready{}",
                released.handed_back,
                if released.merged > 0 {
                    format!(
                        ", {} dropped as the twin of one already ready",
                        released.merged
                    )
                } else {
                    String::new()
                }
            );
        }
        PraefectQueueCommand::Status => {
            let s = store.capture_status().await?;
            println!(
                "capture {}; {} event(s) not yet published, {} not yet settled",
                if s.installed {
                    "installed"
                } else {
                    "not installed"
                },
                s.unpublished,
                s.unsettled
            );
        }
    }
    Ok(())
}
