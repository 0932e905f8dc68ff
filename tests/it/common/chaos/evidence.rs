//! What the consumers' logs show: the service writes one JSON line when a
//! job's delivery reaches its Gitaly call ("replication job processing
//! started", just before the call) and one with its outcome, each with the
//! job's correlation id, which the writer makes unique per job.
//!
//! A job counts as executed twice when two of its deliveries reached the
//! call: its first run was killed, failed, or had its acknowledgement lost
//! in a broker restart. That is the at-least-once cost the suite measures;
//! the final state shows whether running twice did any harm.

use std::collections::HashMap;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const STARTED: &str = "replication job processing started";
const FINISHED: &str = "replication job processing finished";
const INVALID: &str = "replication job is invalid";
const LOCK_LOST: &str = "repository lock lost";

/// One log line of a job.
#[derive(Debug, Clone)]
pub struct JobLine {
    pub time: OffsetDateTime,
    pub correlation_id: String,
    pub target: String,
    /// `completed`, `failed`, `dead`, `interrupted`; empty for a start.
    pub state: String,
    pub skipped: bool,
    /// Which process logged it (its index in `Evidence::incarnations`).
    pub process: usize,
}

/// A line of the service's JSON log, if it is about a job.
fn job_line(line: &str) -> Option<(bool, JobLine)> {
    if !line.contains("replication job") && !line.contains(LOCK_LOST) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default();
    let message = text("message");
    let (start, state) = if message == STARTED {
        (true, String::new())
    } else if message == FINISHED {
        (false, text("new_state").to_owned())
    } else if message == INVALID {
        (false, "dead".to_owned())
    } else if message.starts_with(LOCK_LOST) {
        (false, "interrupted".to_owned())
    } else {
        return None;
    };
    let correlation_id = text("correlation_id");
    if correlation_id.is_empty() {
        return None;
    }
    let time = OffsetDateTime::parse(text("timestamp"), &Rfc3339).ok()?;
    Some((
        start,
        JobLine {
            time,
            correlation_id: correlation_id.to_owned(),
            target: text("replication_job_target").to_owned(),
            state,
            skipped: v.get("skipped").is_some(),
            process: 0,
        },
    ))
}

/// How many jobs of `target` a log shows started and not yet finished: the
/// calls in flight, as far as this log knows.
pub fn in_flight(log: &str, target: &str) -> usize {
    let mut open: HashMap<String, usize> = HashMap::new();
    for (start, line) in log.lines().filter_map(job_line) {
        if line.target != target {
            continue;
        }
        let n = open.entry(line.correlation_id).or_default();
        if start {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
    }
    open.values().filter(|n| **n > 0).count()
}

/// One consumer process, from start to death.
#[derive(Debug, Clone, Default)]
pub struct Incarnation {
    /// Started while the single nats-server was down.
    pub began_in_outage: bool,
    /// Kept alive until it had connected (one per outage).
    pub shielded: bool,
    /// Its log says it reached NATS.
    pub reached_nats: bool,
}

#[derive(Debug, Default)]
pub struct Evidence {
    starts: HashMap<String, Vec<JobLine>>,
    outcomes: HashMap<String, Vec<JobLine>>,
    pub incarnations: Vec<Incarnation>,
    /// Jobs left in the work stream that the leftover sweep settled, by
    /// its log lines: (requeued, removed as already dead letters).
    pub leftovers: (usize, usize),
}

impl Evidence {
    /// Takes in the whole log of one process that has exited.
    pub fn absorb(&mut self, log: &str, mut incarnation: Incarnation) {
        incarnation.reached_nats = log.contains("NATS answers");
        for line in log.lines() {
            if line.contains("a job left in the work stream that no consumer delivers") {
                self.leftovers.0 += 1;
            } else if line.contains("removed a dead-lettered job left in the work stream") {
                self.leftovers.1 += 1;
            }
        }
        let process = self.incarnations.len();
        for (start, mut line) in log.lines().filter_map(job_line) {
            line.process = process;
            let into = if start {
                &mut self.starts
            } else {
                &mut self.outcomes
            };
            into.entry(line.correlation_id.clone())
                .or_default()
                .push(line);
        }
        self.incarnations.push(incarnation);
    }

    /// Jobs whose Gitaly call was reached by two deliveries or more.
    pub fn executed_twice(&self) -> usize {
        self.starts.values().filter(|s| s.len() >= 2).count()
    }

    /// Jobs that completed (not skipped) more than once: their effect was
    /// applied twice.
    pub fn completed_twice(&self) -> usize {
        self.outcomes
            .values()
            .filter(|o| {
                o.iter()
                    .filter(|l| l.state == "completed" && !l.skipped)
                    .count()
                    >= 2
            })
            .count()
    }

    /// Outcome lines per state (`skipped` apart from `completed`).
    pub fn outcomes_by_state(&self) -> Vec<(String, usize)> {
        let mut by: HashMap<String, usize> = HashMap::new();
        for line in self.outcomes.values().flatten() {
            let state = if line.skipped {
                "skipped".to_owned()
            } else {
                line.state.clone()
            };
            *by.entry(state).or_default() += 1;
        }
        let mut by: Vec<_> = by.into_iter().collect();
        by.sort();
        by
    }

    /// Whether `target`, killed at `at`, was in the middle of a call: a job
    /// of it started before the kill and the same process's next outcome of
    /// it, after the kill, is a failure.
    pub fn failed_across(&self, target: &str, at: OffsetDateTime) -> bool {
        self.starts.iter().any(|(id, starts)| {
            starts.iter().any(|s| {
                if s.target != target || s.time >= at {
                    return false;
                }
                let next = self.outcomes.get(id).and_then(|o| {
                    o.iter()
                        .filter(|l| l.process == s.process && l.time >= s.time)
                        .min_by_key(|l| l.time)
                });
                next.is_some_and(|l| l.time >= at && l.state == "failed")
            })
        })
    }

    /// The log lines of one job, for a report.
    pub fn lines_of(&self, correlation_id: &str) -> Vec<String> {
        let mut lines: Vec<&JobLine> = self
            .starts
            .get(correlation_id)
            .into_iter()
            .chain(self.outcomes.get(correlation_id))
            .flatten()
            .collect();
        lines.sort_by_key(|l| l.time);
        lines
            .iter()
            .map(|l| {
                let what = if l.state.is_empty() {
                    "started"
                } else if l.skipped {
                    "skipped"
                } else {
                    l.state.as_str()
                };
                format!("{} {what}", l.time)
            })
            .collect()
    }
}
