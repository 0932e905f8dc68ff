//! Live progress on stderr while the jobs run: an `indicatif` bar redrawn in
//! place on a terminal, a plain line every second otherwise (logs, CI),
//! nothing in quiet mode.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The bar's line: a 30-column bar, then [`Snapshot::text`].
const BAR_TEMPLATE: &str = "  replicating [{bar:30}] {msg}";

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
}

/// A bar drawn to `target`, filled with `#` over `-`.
fn styled_bar(target: ProgressDrawTarget) -> ProgressBar {
    let style = indicatif::ProgressStyle::with_template(BAR_TEMPLATE)
        .map(|style| style.progress_chars("#-"))
        // The template is a constant; its test would fail before this is used.
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    // Abandoned, not finished, when dropped: finishing fills the bar to its
    // length, which would show unfinished jobs as done.
    ProgressBar::with_draw_target(None, target)
        .with_style(style)
        .with_finish(ProgressFinish::Abandon)
}

/// Puts `s` on `bar`.
fn show(bar: &ProgressBar, s: &Snapshot) {
    bar.set_length(s.total);
    bar.set_position(s.done);
    bar.set_message(s.text());
}

/// Draws snapshots in the chosen style.
pub struct Progress {
    style: ProgressStyle,
    /// The bar, from the first update on (a bar draws itself when dropped,
    /// so one that only narrates has none).
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn new(style: ProgressStyle) -> Progress {
        Progress {
            style,
            bar: None,
            last_line: None,
        }
    }

    /// Shows `s` (a line at most once a second in `Lines` style).
    pub fn update(&mut self, s: &Snapshot) {
        match self.style {
            ProgressStyle::Bar => {
                let bar = self
                    .bar
                    .get_or_insert_with(|| styled_bar(ProgressDrawTarget::stderr()));
                show(bar, s);
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

    /// Shows the final state and leaves the bar where it stands.
    pub fn finish(&mut self, s: &Snapshot) {
        match self.style {
            ProgressStyle::Bar => {
                self.update(s);
                if let Some(bar) = &self.bar {
                    bar.abandon();
                }
            }
            ProgressStyle::Lines => eprintln!("  progress: {} (finished)", s.text()),
            ProgressStyle::Quiet => {}
        }
    }

    /// Prints a line of narrative (nothing in quiet mode), above a live bar.
    pub fn say(&self, line: &str) {
        match (&self.bar, self.style) {
            (_, ProgressStyle::Quiet) => {}
            (Some(bar), _) => bar.suspend(|| eprintln!("{line}")),
            (None, _) => eprintln!("{line}"),
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
        assert_eq!(s.rate(), 5.0);
        assert!(s.text().starts_with("15/60 jobs  5.0 jobs/s"));

        let term = indicatif::InMemoryTerm::new(2, 120);
        let bar = styled_bar(ProgressDrawTarget::term_like(Box::new(term.clone())));
        show(&bar, &s);
        bar.abandon();
        assert_eq!(
            term.contents(),
            format!(
                "  replicating [{}{}] {}",
                "#".repeat(7),
                "-".repeat(23),
                s.text()
            )
        );
    }
}
