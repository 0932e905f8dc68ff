//! `[logging]`: the log format and level, in Praefect's spelling.

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

/// Level names accepted as they are (Praefect's `warning`, `fatal` and `panic`
/// are mapped by [`LoggingConfig::filter_directive`]).
pub(super) const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic",
];

/// `directives` with the space around each comma-separated directive
/// removed. tracing-subscriber 0.3 panics on a directive with leading space
/// before a multi-byte character (it slices the untrimmed text at the
/// trimmed text's offsets), so nothing reaches it untrimmed.
pub fn trim_directives(directives: &str) -> String {
    directives
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",")
}

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
    /// Every format, in the order the docs list them.
    pub const ALL: [LogFormat; 2] = [LogFormat::Json, LogFormat::Text];

    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }

    /// The format spelled `name` in the file (and on the command line).
    pub fn parse(name: &str) -> Option<LogFormat> {
        LogFormat::ALL
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    /// `"json"` or `"text"`; `json` when not set, but see `format_set`.
    pub format: LogFormat,
    /// Whether the file or the environment named `format`. The command line
    /// needs to know: an unset format lets each command pick its own (JSON for
    /// the service, text for a person at a terminal), a set one is honoured.
    pub format_set: bool,
    /// A level (`trace` … `error`, plus Praefect's `warning`, `fatal`, `panic`) or a
    /// `tracing` filter directive such as `info,gitaly_replicator=debug`.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Json,
            format_set: false,
            level: "info".into(),
        }
    }
}

impl Serialize for LoggingConfig {
    /// Leaves `format` out when it was not set: printed, it would read back as
    /// set and override every command's own default.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Destructured, so a new key does not compile until it is printed here.
        let LoggingConfig {
            format,
            format_set,
            level,
        } = self;
        let mut s = serializer.serialize_struct("LoggingConfig", 2)?;
        if *format_set {
            s.serialize_field("format", format)?;
        } else {
            s.skip_field("format")?;
        }
        s.serialize_field("level", level)?;
        s.end()
    }
}

impl LoggingConfig {
    /// The format the file or the environment set, if either did.
    pub fn format_if_set(&self) -> Option<LogFormat> {
        self.format_set.then_some(self.format)
    }

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
