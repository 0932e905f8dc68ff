//! Environment overrides: `GITALY_REPLICATOR_<PATH>` sets the key at `PATH`
//! (`GITALY_REPLICATOR_NATS__URL` sets `nats.url`; inside arrays only node
//! tokens can be set, by [`node_token_env_var`]). A variable that no key
//! answers to is an error rather than silently unused, since it is most
//! likely a typo.

use std::collections::{BTreeMap, BTreeSet};

use super::suggestion::suggest;
use super::{Config, ConfigError, praefect};

/// Prefix of every environment variable that overrides a key.
pub const ENV_PREFIX: &str = "GITALY_REPLICATOR_";

/// Variables under [`ENV_PREFIX`] that are not configuration keys (the CLI reads
/// them), so a config load does not reject them as unknown.
pub const NON_CONFIG_ENV_VARS: &[&str] = &["GITALY_REPLICATOR_CONFIG"];

const NODE_TOKEN_ENV_PREFIX: &str = "GITALY_REPLICATOR_VIRTUAL_STORAGE__";
const NODE_TOKEN_ENV_FORM: &str =
    "GITALY_REPLICATOR_VIRTUAL_STORAGE__<NAME>__NODE__<STORAGE>__TOKEN";

/// The variable that sets the token of node `storage` in `virtual_storage`:
/// `GITALY_REPLICATOR_VIRTUAL_STORAGE__<NAME>__NODE__<STORAGE>__TOKEN`, names
/// upper-cased with every byte outside `[A-Z0-9]` written as `_`.
pub fn node_token_env_var(virtual_storage: &str, storage: &str) -> String {
    let mangle = |name: &str| -> String {
        name.bytes()
            .map(|b| match b.to_ascii_uppercase() {
                c @ (b'A'..=b'Z' | b'0'..=b'9') => char::from(c),
                _ => '_',
            })
            .collect()
    };
    format!(
        "{NODE_TOKEN_ENV_PREFIX}{}__NODE__{}__TOKEN",
        mangle(virtual_storage),
        mangle(storage)
    )
}

/// This process's variables under [`ENV_PREFIX`].
pub(super) fn process_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| ConfigError::env(name, "the value is not valid UTF-8"))?;
        vars.push((name.to_string(), value));
    }
    Ok(vars)
}

/// The variables one load was given, and what became of them.
pub(super) struct Overrides {
    /// `GITALY_REPLICATOR_*` variables, and whether a key used each.
    vars: BTreeMap<String, (String, bool)>,
    /// Every variable name a key would have answered to, for suggestions.
    names: BTreeSet<String>,
    /// Key path → the variable that set it, so errors can say so.
    origins: BTreeMap<String, String>,
}

impl Overrides {
    /// Keeps the variables under [`ENV_PREFIX`] that may name keys.
    pub(super) fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX) && !NON_CONFIG_ENV_VARS.contains(&k.as_str())
            })
            .map(|(k, v)| (k, (v, false)))
            .collect();
        Overrides {
            vars,
            names: BTreeSet::new(),
            origins: BTreeMap::new(),
        }
    }

    /// The value of the variable for the key at `path`, if it is set.
    pub(super) fn take(&mut self, path: &str) -> Option<String> {
        let var = format!(
            "{ENV_PREFIX}{}",
            path.to_ascii_uppercase().replace('.', "__")
        );
        self.names.insert(var.clone());
        let (value, used) = self.vars.get_mut(&var)?;
        *used = true;
        let value = value.clone();
        self.origins.insert(path.to_string(), var);
        Some(value)
    }

    /// `err`, saying which variable set its key if one did: the file is then
    /// not to blame.
    pub(super) fn blame(&self, mut err: ConfigError) -> ConfigError {
        if let Some(var) = self.origins.get(&err.key) {
            err.message = format!("{} (set by environment variable {var})", err.message);
            err.from_env = true;
        }
        err
    }

    /// Sets node tokens from `GITALY_REPLICATOR_VIRTUAL_STORAGE__<NAME>__NODE__<STORAGE>__TOKEN`.
    pub(super) fn apply_node_tokens(&mut self, config: &mut Config) -> Result<(), ConfigError> {
        for (var, (value, used)) in self.vars.iter_mut() {
            if *used || !var.starts_with(NODE_TOKEN_ENV_PREFIX) {
                continue;
            }
            let mut hits = Vec::new();
            for (i, vs) in config.virtual_storages.iter().enumerate() {
                for (j, node) in vs.nodes.iter().enumerate() {
                    if node_token_env_var(&vs.name, &node.storage) == *var {
                        hits.push((i, j));
                    }
                }
            }
            let (i, j) = match hits[..] {
                [hit] => hit,
                [] => {
                    let expected: Vec<String> = config
                        .targets()
                        .map(|(vs, node)| node_token_env_var(&vs.name, &node.storage))
                        .collect();
                    return Err(ConfigError::env(
                        var,
                        format!(
                            "names no configured node; node tokens are set with \
                             {NODE_TOKEN_ENV_FORM} (configured: {})",
                            expected.join(", ")
                        ),
                    ));
                }
                _ => {
                    return Err(ConfigError::env(
                        var,
                        "matches several nodes whose names differ only outside [A-Za-z0-9]; \
                         set their tokens in the file",
                    ));
                }
            };
            if let Some(node) = config
                .virtual_storages
                .get_mut(i)
                .and_then(|vs| vs.nodes.get_mut(j))
            {
                node.token = value.clone().into();
                *used = true;
                self.origins
                    .insert(format!("virtual_storage[{i}].node[{j}].token"), var.clone());
            }
        }
        Ok(())
    }

    /// Fails on the first variable that no key answered to.
    pub(super) fn check_all_used(&self) -> Result<(), ConfigError> {
        let Some(var) = self
            .vars
            .iter()
            .find(|(_, (_, used))| !used)
            .map(|(k, _)| k)
        else {
            return Ok(());
        };
        let path = var[ENV_PREFIX.len()..]
            .to_ascii_lowercase()
            .replace("__", ".");
        let message = if praefect::is_ignored(&path) {
            format!(
                "names `{path}`, a Praefect key that gitaly-replicator ignores; remove the variable"
            )
        } else {
            let hint = suggest(var, self.names.iter().map(String::as_str))
                .map(|name| format!("; did you mean {name}?"))
                .unwrap_or_default();
            format!("names no configuration key (it would be `{path}`){hint}")
        };
        Err(ConfigError::env(var, message))
    }
}
