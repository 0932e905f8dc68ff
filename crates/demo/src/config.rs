//! The service configuration a demo run uses: the three in-process nodes,
//! the run's own database, streams, subject prefix and consumers, metrics
//! on a free port of 127.0.0.1, and retry delays short enough for a demo.
//! Written as TOML and parsed by the real parser, so the demo runs exactly
//! what a user's config file would.

use crate::error::DemoError;
use crate::nodes::{DemoNodes, VIRTUAL_STORAGE};
use crate::workspace::Workspace;
use gitaly_replicator::Config;
use std::net::SocketAddr;

/// A TOML string literal (quotes and escapes).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The config file's text.
pub fn config_toml(
    workspace: &Workspace,
    nodes: &DemoNodes,
    database_url: &str,
    nats_url: &str,
    metrics: SocketAddr,
) -> String {
    let mut s = format!(
        "# gitaly-replicator demo run {id}\n\
         prometheus_listen_addr = {metrics}\n\
         graceful_stop_timeout = \"10s\"\n\n\
         [logging]\nformat = \"text\"\nlevel = \"warn\"\n\n\
         [[virtual_storage]]\nname = {vs}\n",
        id = workspace.id,
        metrics = quoted(&metrics.to_string()),
        vs = quoted(VIRTUAL_STORAGE),
    );
    for node in &nodes.nodes {
        s += &format!(
            "[[virtual_storage.node]]\nstorage = {}\naddress = {}\ntoken = {}\n",
            quoted(&node.storage),
            quoted(&node.config_address()),
            quoted(&node.token)
        );
    }
    s += &format!(
        "\n[database]\nurl = {}\nmax_connections = 8\n",
        quoted(database_url)
    );
    s += "\n[replication]\nbatch_size = 20\nmax_concurrent_jobs = 32\n\
          health_check_interval = \"500ms\"\nretry_delay = \"200ms\"\nmax_retry_delay = \"2s\"\n";
    s += &format!(
        "\n[nats]\nurl = {}\nsubject_prefix = {}\nstream = {}\ndead_letter_stream = {}\n\
         consumer_prefix = {}\nduplicate_window = \"1m\"\ndead_letter_max_age = \"24h\"\n\
         fetch_expires = \"1s\"\n",
        quoted(nats_url),
        quoted(&workspace.subject_prefix()),
        quoted(&workspace.stream()),
        quoted(&workspace.dead_letter_stream()),
        quoted(&workspace.consumer_prefix()),
    );
    s
}

/// Parses the text with the service's own parser and validation.
pub fn parse(toml: &str) -> Result<Config, DemoError> {
    Ok(Config::from_toml_str(toml)?)
}

/// A listener on a free port of 127.0.0.1 for the service's `/metrics`, and
/// its address. It stays bound and is handed to the service, so another
/// process (a second demo, say) cannot take the port in between.
pub fn bind_metrics_listener() -> Result<(std::net::TcpListener, SocketAddr), DemoError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(DemoError::io("binding a port for the metrics"))?;
    let addr = listener
        .local_addr()
        .map_err(DemoError::io("binding a port for the metrics"))?;
    Ok((listener, addr))
}
