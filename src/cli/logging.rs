//! How each command logs: the service writes JSON lines for a log collector,
//! the other commands are read by a person at a terminal and write readable
//! warnings, so the NATS client's INFO lines do not bury their output.

use gitaly_replicator::{LogFormat, LoggingConfig, trim_directives};
use std::io::IsTerminal;
use std::sync::OnceLock;

/// The format [`init`] chose, for the one line that reports a command's
/// failure.
static CHOSEN: OnceLock<LogFormat> = OnceLock::new();

/// The format the log lines are in: JSON, or readable text.
pub fn chosen() -> LogFormat {
    CHOSEN.get().copied().unwrap_or(LogFormat::Text)
}

/// Who reads a command's log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// `run`: a log collector.
    Service,
    /// Every other command: a person, or a script reading stdout.
    Operator,
}

/// The format: the command line's, else the config's when the file or the
/// environment set it, else the audience's own.
pub fn format(flag: Option<LogFormat>, config: &LoggingConfig, audience: Audience) -> LogFormat {
    flag.or(config.format_if_set()).unwrap_or(match audience {
        Audience::Service => LogFormat::Json,
        Audience::Operator => LogFormat::Text,
    })
}

/// The filter when `RUST_LOG` is not set. `[logging] level` is the service's
/// (Praefect's key, set for the server); an operator's command is quiet
/// whatever the server's level, and `RUST_LOG` makes it talk.
pub fn directive(config: &LoggingConfig, audience: Audience) -> String {
    match audience {
        // Postgres's notices ("relation … already exists, skipping" on every
        // start) are the server's chatter, not the service's news.
        Audience::Service => format!("{},sqlx::postgres::notice=warn", config.filter_directive()),
        Audience::Operator => "warn".into(),
    }
}

/// Installs the subscriber: lines on stderr, filtered by `RUST_LOG` when set.
pub fn init(flag: Option<LogFormat>, config: &LoggingConfig, audience: Audience) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(trim_directives(&v)).ok());
    let filter =
        from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(directive(config, audience)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in a file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let chosen = format(flag, config, audience);
    let _ = CHOSEN.set(chosen);
    // Fails only when a subscriber is already installed, which then logs.
    let _ = match chosen {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use Audience::{Operator, Service};
    use LogFormat::{Json, Text};

    fn config(format: Option<LogFormat>) -> LoggingConfig {
        LoggingConfig {
            format: format.unwrap_or_default(),
            format_set: format.is_some(),
            ..LoggingConfig::default()
        }
    }

    #[test]
    fn the_flag_wins_over_the_config_and_the_config_over_the_command() {
        for (flag, file, audience, expected) in [
            (None, None, Service, Json),
            (None, None, Operator, Text),
            (None, Some(Json), Operator, Json),
            (None, Some(Text), Service, Text),
            (Some(Json), None, Operator, Json),
            (Some(Text), None, Service, Text),
            (Some(Text), Some(Json), Operator, Text),
            (Some(Json), Some(Text), Service, Json),
        ] {
            assert_eq!(
                format(flag, &config(file), audience),
                expected,
                "flag {flag:?}, config {file:?}, {audience:?}"
            );
        }
    }

    #[test]
    fn only_the_service_logs_at_the_configured_level() {
        let debug = LoggingConfig {
            level: "debug".into(),
            ..LoggingConfig::default()
        };
        assert_eq!(
            directive(&debug, Service),
            "debug,sqlx::postgres::notice=warn"
        );
        assert_eq!(directive(&debug, Operator), "warn");
    }
}
