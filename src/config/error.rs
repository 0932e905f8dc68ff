//! [`ConfigError`]: what is wrong with a configuration, and where.

use std::path::PathBuf;

/// A configuration problem, naming the key (`replication.batch_size`), the
/// environment variable, or, for syntax errors, the file position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ConfigError {
    /// The file the configuration was loaded from, when the error is about it.
    pub file: Option<PathBuf>,
    /// Line and column (1-based) of a TOML syntax error.
    pub line_col: Option<(usize, usize)>,
    /// Full key path (`virtual_storage[0].node[1].storage`) or variable name;
    /// empty for errors about the whole file.
    pub key: String,
    /// What is wrong and, where it helps, what is accepted.
    pub message: String,
    /// Whether the environment, not the file, is to blame: such errors do not
    /// name the file.
    pub(super) from_env: bool,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line_col: None,
            key: key.into(),
            message: message.into(),
            from_env: false,
        }
    }

    /// An error about the environment variable `var`.
    pub(super) fn env(var: &str, message: impl Into<String>) -> Self {
        ConfigError {
            from_env: true,
            ..ConfigError::new(var, message)
        }
    }

    pub(super) fn syntax(text: &str, err: &toml::de::Error) -> Self {
        let line_col = err.span().map(|span| line_col(text, span.start));
        ConfigError {
            line_col,
            ..ConfigError::new("", format!("invalid TOML: {}", err.message().trim_end()))
        }
    }

    fn describe(&self) -> String {
        let mut out = match (&self.file, self.line_col) {
            (Some(file), Some((line, col))) => format!("{}:{line}:{col}: ", file.display()),
            (Some(file), None) => format!("{}: ", file.display()),
            (None, Some((line, col))) => format!("line {line}, column {col}: "),
            (None, None) => String::new(),
        };
        if !self.key.is_empty() {
            out.push_str(&self.key);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
