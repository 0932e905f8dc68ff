//! `status`: queue depth per (virtual storage, target).

use gitaly_replicator::Config;
use gitaly_replicator::Layout;
use gitaly_replicator::connect_nats;
use gitaly_replicator::queue_depth;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let client = connect_nats(&config.nats, "gitaly-replicator status").await?;
    let js = async_nats::jetstream::new(client);
    let layout = Layout::from_config(config);
    layout.require_streams(&js).await?;
    let rows = queue_depth(&js, &layout)
        .await
        .map_err(anyhow::Error::msg)?;
    let vs_w = rows
        .iter()
        .map(|r| r.virtual_storage.len())
        .max()
        .unwrap_or(0)
        .max(15);
    let t_w = rows
        .iter()
        .map(|r| r.target_storage.len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!(
        "{:<vs_w$}  {:<t_w$}  {:>9}  {:>9}  {:>11}  {:>7}",
        "VIRTUAL STORAGE", "TARGET", "PENDING", "IN FLIGHT", "REDELIVERED", "DEAD"
    );
    for r in rows {
        println!(
            "{:<vs_w$}  {:<t_w$}  {:>9}  {:>9}  {:>11}  {:>7}",
            r.virtual_storage, r.target_storage, r.pending, r.in_flight, r.redelivered, r.dead
        );
    }
    Ok(())
}
