//! The walk over the file: one [`Section`] per table, from which each key is
//! taken by name and type, with its environment override, so that unknown
//! keys, wrong types, overrides and ignored Praefect keys are all decided in
//! one place, by path. Errors name the type found, never the value, which may
//! be a secret.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use super::env::Overrides;
use super::suggestion::suggest;
use super::{ConfigError, Secret, praefect};

/// State shared while the file is read: the environment and what came of it,
/// and the ignored Praefect keys found so far.
pub(super) struct Ctx {
    pub(super) env: Overrides,
    pub(super) ignored: BTreeSet<String>,
}

impl Ctx {
    pub(super) fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        Ctx {
            env: Overrides::new(env),
            ignored: BTreeSet::new(),
        }
    }
}

/// Where a key's value came from.
enum Raw {
    File(Value),
    Env(String),
}

/// One table of the file, whose keys are taken out as they are read; what is
/// left at [`Section::finish`] is either an ignored Praefect key or an error.
pub(super) struct Section {
    path: String,
    table: Table,
    /// Whether `GITALY_REPLICATOR_<PATH>__<KEY>` overrides keys here (not inside arrays).
    env: bool,
    known: Vec<&'static str>,
}

impl Section {
    /// The whole file.
    pub(super) fn root(table: Table) -> Self {
        Section {
            path: String::new(),
            table,
            env: true,
            known: Vec::new(),
        }
    }

    /// The full path of `key` in this section.
    pub(super) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn raw(&mut self, ctx: &mut Ctx, key: &'static str) -> Option<Raw> {
        self.known.push(key);
        let from_file = self.table.remove(key);
        if self.env
            && let Some(value) = ctx.env.take(&self.key(key))
        {
            return Some(Raw::Env(value));
        }
        from_file.map(Raw::File)
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Value) -> ConfigError {
        ConfigError::new(
            self.key(key),
            format!("expected {expected}, got a {}", got.type_str()),
        )
    }

    pub(super) fn string(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<String>, ConfigError> {
        match self.raw(ctx, key) {
            None => Ok(None),
            Some(Raw::Env(s) | Raw::File(Value::String(s))) => Ok(Some(s)),
            Some(Raw::File(other)) => Err(self.wrong_type(key, "a string", &other)),
        }
    }

    /// A string where, as in Praefect, empty means unset.
    pub(super) fn optional(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<String>, ConfigError> {
        Ok(self.string(ctx, key)?.filter(|s| !s.is_empty()))
    }

    pub(super) fn secret(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<Secret>, ConfigError> {
        Ok(self.optional(ctx, key)?.map(Secret::from))
    }

    pub(super) fn path(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.optional(ctx, key)?.map(PathBuf::from))
    }

    pub(super) fn integer(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<i64>, ConfigError> {
        match self.raw(ctx, key) {
            None => Ok(None),
            Some(Raw::File(Value::Integer(i))) => Ok(Some(i)),
            Some(Raw::Env(s)) => s.trim().parse().map(Some).map_err(|_| {
                ConfigError::new(self.key(key), format!("expected an integer, got {s:?}"))
            }),
            Some(Raw::File(other)) => Err(self.wrong_type(key, "an integer", &other)),
        }
    }

    /// A non-negative integer converted to `T`, or `default`.
    pub(super) fn number<T: TryFrom<i64>>(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        match self.integer(ctx, key)? {
            None => Ok(default),
            Some(i) => T::try_from(i).map_err(|_| {
                let why = if i < 0 {
                    "must not be negative"
                } else {
                    "is too large"
                };
                ConfigError::new(self.key(key), format!("{why}: {i}"))
            }),
        }
    }

    pub(super) fn boolean(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
        default: bool,
    ) -> Result<bool, ConfigError> {
        match self.raw(ctx, key) {
            None => Ok(default),
            Some(Raw::File(Value::Boolean(b))) => Ok(b),
            Some(Raw::Env(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ConfigError::new(
                    self.key(key),
                    format!("expected true or false, got {s:?}"),
                )),
            },
            Some(Raw::File(other)) => Err(self.wrong_type(key, "true or false", &other)),
        }
    }

    /// An array of numbers (integers allowed); from the environment, a
    /// comma-separated list.
    pub(super) fn floats(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<Vec<f64>>, ConfigError> {
        let not_numbers = |this: &Self| {
            ConfigError::new(
                this.key(key),
                "expected an array of numbers, e.g. [0.1, 1, 10]",
            )
        };
        match self.raw(ctx, key) {
            None => Ok(None),
            Some(Raw::File(Value::Array(items))) => items
                .iter()
                .map(|v| match v {
                    Value::Float(f) => Some(*f),
                    Value::Integer(i) => Some(*i as f64),
                    _ => None,
                })
                .collect::<Option<Vec<f64>>>()
                .map(Some)
                .ok_or_else(|| not_numbers(self)),
            Some(Raw::Env(s)) => s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.trim().parse::<f64>().ok())
                .collect::<Option<Vec<f64>>>()
                .map(Some)
                .ok_or_else(|| not_numbers(self)),
            Some(Raw::File(other)) => Err(self.wrong_type(key, "an array of numbers", &other)),
        }
    }

    /// A humantime string (`"30s"`, `"1m 30s"`), or `default`. A bare
    /// integer counts nanoseconds, as Praefect's Go decoder reads one
    /// (`scheduling_interval = 0`).
    pub(super) fn duration(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let s = match self.raw(ctx, key) {
            None => return Ok(default),
            Some(Raw::File(Value::Integer(0))) => return Ok(Duration::ZERO),
            Some(Raw::File(Value::Integer(n))) => {
                return Err(ConfigError::new(
                    self.key(key),
                    format!("a bare number ({n}) has no unit; write e.g. \"{n}s\" or \"{n}ms\""),
                ));
            }
            Some(Raw::Env(s) | Raw::File(Value::String(s))) => s,
            Some(Raw::File(other)) => {
                return Err(self.wrong_type(key, "a duration such as \"30s\"", &other));
            }
        };
        humantime::parse_duration(s.trim()).map_err(|e| {
            ConfigError::new(
                self.key(key),
                format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"2m\" or \"720h\""),
            )
        })
    }

    /// The sub-table `key`, empty when absent so that environment overrides still apply.
    pub(super) fn table(&mut self, key: &'static str) -> Result<Section, ConfigError> {
        self.known.push(key);
        let table = match self.table.remove(key) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(other) => return Err(self.wrong_type(key, "a table", &other)),
        };
        Ok(Section {
            path: self.key(key),
            table,
            env: self.env,
            known: Vec::new(),
        })
    }

    /// The array of tables `key` (`[[key]]`), empty when absent. Every item is
    /// checked to be a table before any is read.
    pub(super) fn tables(&mut self, key: &'static str) -> Result<Vec<Section>, ConfigError> {
        self.known.push(key);
        let items = match self.table.remove(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(self.wrong_type(key, "an array of tables", &other)),
        };
        let path = self.key(key);
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Table(table) => Ok(Section {
                    path: format!("{path}[{i}]"),
                    table,
                    env: false,
                    known: Vec::new(),
                }),
                other => Err(ConfigError::new(
                    format!("{path}[{i}]"),
                    format!("expected a table, got a {}", other.type_str()),
                )),
            })
            .collect()
    }

    /// Sorts out the keys nobody read: ignored Praefect keys, or the first unknown one.
    pub(super) fn finish(self, ctx: &mut Ctx) -> Result<(), ConfigError> {
        let mut rest: Vec<(String, Value)> = self.table.into_iter().collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in rest {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if praefect::is_ignored(&path) {
                praefect::leaves(&path, &value, &mut ctx.ignored);
                continue;
            }
            let hint = suggest(&key, self.known.iter().copied())
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                path,
                format!("unknown key (neither gitaly-replicator nor Praefect has it){hint}"),
            ));
        }
        Ok(())
    }
}
