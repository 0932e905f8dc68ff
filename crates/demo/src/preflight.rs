//! Before anything is created: are NATS (with JetStream) and Postgres there?
//! Each one that is not is named with the address tried and the command
//! that starts it on this kind of machine (the ones `.ci/run` uses).

use crate::error::{DemoError, Unreachable};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::str::FromStr;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Checks both services at once; reports every one that is down.
pub async fn check(nats_url: &str, database_url: &str) -> Result<(), DemoError> {
    check_nats_url(nats_url)?;
    let server = server_options(database_url)?;
    let (nats, postgres) = tokio::join!(check_nats(nats_url), check_postgres(database_url, server));
    let down: Vec<Unreachable> = [nats.err(), postgres.err()].into_iter().flatten().collect();
    if down.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Unreachable(down))
    }
}

/// `--nats-url` is one or more `nats://`, `tls://`, `ws://` or `wss://`
/// URLs (or bare `host:port`), separated by commas: anything else is a
/// usage error, not an outage.
pub fn check_nats_url(nats_url: &str) -> Result<(), DemoError> {
    for server in nats_url.split(',').map(str::trim) {
        let with_scheme = if server.contains("://") {
            server.to_owned()
        } else {
            format!("nats://{server}")
        };
        let bad =
            |why: String| DemoError::Usage(format!("--nats-url {}: {why}", mask_password(server)));
        let url = url::Url::parse(&with_scheme).map_err(|e| bad(e.to_string()))?;
        if !["nats", "tls", "ws", "wss"].contains(&url.scheme()) {
            return Err(bad(format!(
                "unknown scheme {:?}; expected nats://, tls://, ws:// or wss://",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host".into()));
        }
    }
    Ok(())
}

/// The connect options of `--database-url`.
pub fn server_options(database_url: &str) -> Result<PgConnectOptions, DemoError> {
    if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
        return Err(DemoError::Usage(format!(
            "--database-url {}: expected a postgres:// URL",
            mask_password(database_url)
        )));
    }
    PgConnectOptions::from_str(database_url).map_err(|e| {
        DemoError::Usage(format!(
            "--database-url {}: {e}",
            mask_password(database_url)
        ))
    })
}

/// The URL with its password replaced by `****`, for messages.
pub fn mask_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

async fn check_nats(url: &str) -> Result<(), Unreachable> {
    let down = |service: &'static str, reason: String| Unreachable {
        service,
        address: mask_password(url),
        reason,
        start_command: nats_start_command(url),
    };
    let connect = async_nats::ConnectOptions::new()
        .name("gitaly-replicator demo (preflight)")
        .connection_timeout(TIMEOUT)
        .connect(url);
    let client = match tokio::time::timeout(TIMEOUT, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(down("NATS", e.to_string())),
        Err(_) => return Err(down("NATS", format!("no answer within {TIMEOUT:?}"))),
    };
    // The raw API call: async-nats' typed account info does not parse the
    // answer of nats-server 2.9.
    let info = client.request("$JS.API.INFO", bytes::Bytes::new());
    let answer = match tokio::time::timeout(TIMEOUT, info).await {
        Ok(Ok(message)) => message,
        Ok(Err(e)) => {
            return Err(down(
                "NATS JetStream",
                format!(
                    "the server answers but JetStream is not enabled ({e}); restart it with -js"
                ),
            ));
        }
        Err(_) => {
            return Err(down(
                "NATS JetStream",
                format!("no answer from the JetStream API within {TIMEOUT:?}"),
            ));
        }
    };
    let body: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap_or_default();
    match body.get("error") {
        None => Ok(()),
        Some(error) => Err(down(
            "NATS JetStream",
            format!("the JetStream API refused the account: {error}"),
        )),
    }
}

async fn check_postgres(url: &str, options: PgConnectOptions) -> Result<(), Unreachable> {
    let down = |reason: String| Unreachable {
        service: "Postgres",
        address: mask_password(url),
        reason,
        start_command:
            "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql)\" main start"
                .to_owned(),
    };
    match tokio::time::timeout(TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(down(e.to_string())),
        Err(_) => Err(down(format!("no answer within {TIMEOUT:?}"))),
    }
}

/// `.ci/run`'s command, on the port of `url` (4222 when it names none).
fn nats_start_command(url: &str) -> String {
    let first = url.split(',').next().unwrap_or(url).trim();
    let port = url::Url::parse(first)
        .ok()
        .and_then(|u| u.port())
        .unwrap_or(4222);
    format!(
        "mkdir -p /var/lib/nats-server && start-stop-daemon --start --oknodo --background \
--exec /usr/sbin/nats-server -- -a 127.0.0.1 -p {port} -js -sd /var/lib/nats-server \
-l /var/log/nats-server.log"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_the_nats_port_is_kept() {
        assert_eq!(
            mask_password("postgres://u:secret@h:5432/db"),
            "postgres://u:****@h:5432/db"
        );
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
        assert!(nats_start_command("nats://127.0.0.1:4333").contains("-p 4333 -js"));
        assert!(nats_start_command("nats://127.0.0.1").contains("-p 4222 -js"));
    }
}
