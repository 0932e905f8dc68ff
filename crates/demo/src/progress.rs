//! Live progress on stderr while the jobs run: a bar redrawn in place on a
//! terminal, a plain line every second otherwise (logs, CI), nothing in
//! quiet mode.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A line per second.
    Lines,
    Quiet,
}

impl ProgressStyle {
    /// A bar when stderr is a terminal, lines otherwise.
    pub fn for_stderr() -> ProgressStyle {
        if std::io::stderr().is_terminal() {
            ProgressStyle::Bar
        } else {
            ProgressStyle::Lines
        }
    }
}

/// Where the jobs stand.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    /// Jobs acknowledged (gone from the work stream).
    pub done: u64,
    pub total: u64,
    /// Attempts that failed (each retried or dead-lettered).
    pub failed: u64,
    /// Jobs in the dead-letter stream.
    pub dead: u64,
    /// Since the consumer started.
    pub elapsed: Duration,
}

impl Snapshot {
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    fn text(&self) -> String {
        format!(
            "{}/{} jobs  {:.1} jobs/s  {} failed attempts  {} dead  {:.1}s",
            self.done,
            self.total,
            self.rate(),
            self.failed,
            self.dead,
            self.elapsed.as_secs_f64()
        )
    }

    fn bar(&self, width: usize) -> String {
        let filled = if self.total == 0 {
            width
        } else {
            (self.done.min(self.total) as usize * width) / self.total as usize
        };
        let mut bar = "#".repeat(filled);
        bar.push_str(&"-".repeat(width - filled));
        bar
    }
}

/// Draws snapshots in the chosen style.
pub struct Progress {
    style: ProgressStyle,
    last_line: Option<Instant>,
    drawn: bool,
}

impl Progress {
    pub fn new(style: ProgressStyle) -> Progress {
        Progress {
            style,
            last_line: None,
            drawn: false,
        }
    }

    /// Shows `s` (a line at most once a second in `Lines` style).
    pub fn update(&mut self, s: &Snapshot) {
        match self.style {
            ProgressStyle::Bar => {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K  replicating [{}] {}", s.bar(30), s.text());
                let _ = err.flush();
                self.drawn = true;
            }
            ProgressStyle::Lines => {
                if self
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    eprintln!("  progress: {}", s.text());
                    self.last_line = Some(Instant::now());
                }
            }
            ProgressStyle::Quiet => {}
        }
    }

    /// Shows the final state and ends the bar's line.
    pub fn finish(&mut self, s: &Snapshot) {
        match self.style {
            ProgressStyle::Bar => {
                self.update(s);
                if self.drawn {
                    eprintln!();
                }
            }
            ProgressStyle::Lines => eprintln!("  progress: {} (finished)", s.text()),
            ProgressStyle::Quiet => {}
        }
    }

    /// Prints a line of narrative (nothing in quiet mode).
    pub fn say(&self, line: &str) {
        if self.style != ProgressStyle::Quiet {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_in_proportion_and_the_rate_counts_done_jobs() {
        let s = Snapshot {
            done: 15,
            total: 60,
            elapsed: Duration::from_secs(3),
            ..Default::default()
        };
        assert_eq!(s.bar(8), "##------");
        assert_eq!(s.rate(), 5.0);
        assert!(s.text().starts_with("15/60 jobs  5.0 jobs/s"));
    }
}
