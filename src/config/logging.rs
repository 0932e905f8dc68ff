//! `[logging]`: the log format and level, in Praefect's spelling.

use serde::{Serialize, Serializer};

/// Level names accepted as they are (Praefect's `warning`, `fatal` and `panic`
/// are mapped by [`LoggingConfig::filter_directive`]).
pub(super) const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic",
];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }

    /// The format spelled `name` in the file.
    pub(super) fn named(name: &str) -> Option<LogFormat> {
        [LogFormat::Json, LogFormat::Text]
            .into_iter()
            .find(|format| format.as_str() == name)
    }
}

impl Serialize for LogFormat {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// `[logging]`: Praefect's `format` and `level`; its other logging keys are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggingConfig {
    /// `"json"` (default) or `"text"`.
    pub format: LogFormat,
    /// A level (`trace` … `error`, plus Praefect's `warning`, `fatal`, `panic`) or a
    /// `tracing` filter directive such as `info,gitaly_replicator=debug`.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl LoggingConfig {
    /// The level as a `tracing` filter directive (Praefect's level names mapped).
    pub fn filter_directive(&self) -> String {
        match self.level.to_ascii_lowercase().as_str() {
            "warning" => "warn".into(),
            "fatal" | "panic" => "error".into(),
            level if LOG_LEVELS.contains(&level) => level.into(),
            _ => self.level.clone(),
        }
    }
}
