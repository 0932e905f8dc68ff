//! Praefect's keys that gitaly-replicator accepts and does not use, so that a
//! Praefect `config.toml` loads as is and `check-config` can list them.

use std::collections::BTreeSet;

use toml::Value;

/// Praefect keys that are accepted and ignored. Paths leave out array indices
/// (`virtual_storage.default_replication_factor` covers every virtual storage);
/// a trailing `.*` covers a whole section. `logging.*` covers every logging key
/// except `format` and `level`, which are read first.
pub const PRAEFECT_IGNORED_KEYS: &[&str] = &[
    "listen_addr",
    "tls_listen_addr",
    "socket_path",
    "prometheus_exclude_database_from_default_metrics",
    "memory_queue_enabled",
    "postgres_queue_enabled",
    "i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning",
    "auth.*",
    "tls.*",
    "failover.*",
    "background_verification.delete_invalid_records",
    "prometheus.scrape_timeout",
    "sentry.*",
    "yamux.*",
    "logging.*",
    "repositories_cleanup.*",
    "failover_enabled",
    "force_create_repositories_for_testing_purposes",
    "config_command",
    "virtual_storage.default_replication_factor",
    "virtual_storage.node.primary",
];

/// Whether the key at `path` (`virtual_storage[0].node[1].primary`) is one of
/// [`PRAEFECT_IGNORED_KEYS`].
pub(super) fn is_ignored(path: &str) -> bool {
    let pattern = strip_indices(path);
    PRAEFECT_IGNORED_KEYS
        .iter()
        .any(|ignored| match ignored.strip_suffix(".*") {
            Some(section) => {
                pattern == section
                    || pattern
                        .strip_prefix(section)
                        .is_some_and(|rest| rest.starts_with('.'))
            }
            None => pattern == *ignored,
        })
}

/// `virtual_storage[0].node[1].primary` → `virtual_storage.node.primary`.
fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// Adds every leaf key under `path` to `out`, the list of ignored keys.
pub(super) fn leaves(path: &str, value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Table(t) if !t.is_empty() => {
            for (k, v) in t {
                leaves(&format!("{path}.{k}"), v, out);
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_table) => {
            for (i, v) in items.iter().enumerate() {
                leaves(&format!("{path}[{i}]"), v, out);
            }
        }
        _ => {
            out.insert(path.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_keys_match_whole_sections_and_single_keys_at_any_index() {
        for (path, ignored) in [
            ("listen_addr", true),
            ("listen_addr_x", false),
            ("auth", true),
            ("auth.token", true),
            ("authx.token", false),
            ("logging.dir", true),
            ("repositories_cleanup.run_interval", true),
            ("database.session_pooled.host", false),
            ("database.host", false),
            ("virtual_storage[3].default_replication_factor", true),
            ("virtual_storage[0].node[2].primary", true),
            ("virtual_storage[0].node[2].storage", false),
        ] {
            assert_eq!(is_ignored(path), ignored, "{path}");
        }
    }
}
