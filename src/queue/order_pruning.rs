//! Pruning `replication_order`. A record makes a job older than the last
//! one applied on its replica lose; once no job can still be older than it,
//! it decides nothing and goes. Such jobs are queued ones (in the work
//! stream, a requeued copy keeping an older place included) and dead ones (a
//! replay keeps its place). So each pass finds the lowest place any of them
//! holds (the floor) and deletes every record of the current incarnation
//! below it, and every record of another incarnation of the work stream
//! (their jobs went with it).
//!
//! The floor is read from the messages themselves: the dead letters, then
//! the work stream to its last message, then the dead letters that came
//! meanwhile. A job moves between messages (a copy, a dead letter, a replay)
//! by publishing the new message before it removes the old one, so a read in
//! that order meets every job at least once. A stream too long to read in a
//! pass (a backlog) skips the pass: the records wait for the next one.

use crate::error_chain::display_error_chain;
use crate::queue::incarnation::Incarnation;
use crate::queue::layout::Layout;
use crate::queue::requeue::{ORDER_SEQUENCE, ORDER_TIME, Placement};
use crate::store::RepositoryStore;
use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// At most this many messages are read per pass.
pub const READ_LIMIT: u64 = 20_000;

/// The lowest place in the current incarnation's order that a queued or
/// dead job holds; `None` when the streams hold more than [`READ_LIMIT`]
/// messages.
pub async fn floor(js: &Context, layout: &Layout) -> Result<Option<(Incarnation, u64)>, String> {
    let mut dead = stream(js, &layout.dead_letter_stream).await?;
    let mut work = stream(js, &layout.stream).await?;
    let work_info = work.info().await.map_err(|e| e.to_string())?.clone();
    let incarnation = Incarnation::of(&work_info);
    let dead_info = dead.info().await.map_err(|e| e.to_string())?.clone();
    if work_info.state.messages + dead_info.state.messages > READ_LIMIT {
        return Ok(None);
    }
    let mut read = Reading {
        incarnation: &incarnation,
        lowest: u64::MAX,
        budget: READ_LIMIT,
    };
    let dead_next = read
        .walk(&dead, dead_info.state.first_sequence, true)
        .await?;
    let Some(work_next) = read
        .walk(&work, work_info.state.first_sequence, false)
        .await?
    else {
        return Ok(None);
    };
    let Some(dead_next) = dead_next else {
        return Ok(None);
    };
    if read.walk(&dead, dead_next, true).await?.is_none() {
        return Ok(None);
    }
    // Jobs published after the read get later sequences than any read.
    let lowest = read.lowest.min(work_next);
    Ok(Some((incarnation, lowest)))
}

async fn stream(js: &Context, name: &str) -> Result<Stream, String> {
    js.get_stream(name)
        .await
        .map_err(|e| format!("stream {name}: {e}"))
}

struct Reading<'a> {
    incarnation: &'a Incarnation,
    lowest: u64,
    budget: u64,
}

impl Reading<'_> {
    /// Reads `stream` from `from` to its last message, lowering `lowest` to
    /// each job's place; answers the sequence after the last one read, or
    /// `None` when the budget ran out.
    async fn walk(
        &mut self,
        stream: &Stream,
        from: u64,
        dead: bool,
    ) -> Result<Option<u64>, String> {
        let mut next = from.max(1);
        loop {
            let m = match stream.get_first_raw_message_by_subject(">", next).await {
                Ok(m) => m,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(Some(next)),
                Err(e) => return Err(e.to_string()),
            };
            if self.budget == 0 {
                return Ok(None);
            }
            self.budget -= 1;
            next = m.sequence + 1;
            let place = if dead {
                dead_place(&m.headers, self.incarnation)
            } else {
                Some(Placement::of(Some(&m.headers), m.sequence, m.time, self.incarnation).sequence)
            };
            if let Some(p) = place {
                self.lowest = self.lowest.min(p);
            }
        }
    }
}

/// The place a dead letter's replay takes in the current incarnation's
/// order: none when it records none (it is replayed as a new job) or is of
/// an earlier incarnation (it goes before every job of this one).
fn dead_place(headers: &async_nats::HeaderMap, incarnation: &Incarnation) -> Option<u64> {
    let sequence = headers.get(ORDER_SEQUENCE)?.as_str().parse::<u64>().ok()?;
    let nanos = headers.get(ORDER_TIME)?.as_str().parse::<i128>().ok()?;
    let time = OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    (!incarnation.predates(time)).then_some(sequence)
}

/// Prunes every `interval` until `stop`; a failed or skipped pass is
/// logged, and the next one tries again.
pub async fn run(
    js: Context,
    layout: Layout,
    store: RepositoryStore,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match pass(&js, &layout, &store).await {
            Ok(Some(0)) => {}
            Ok(Some(pruned)) => tracing::info!(pruned, "pruned replica order records"),
            Ok(None) => tracing::debug!(
                "replica order records not pruned: the work and dead-letter streams hold more messages than a pass reads"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "pruning replica order records failed; trying again at the next pass")
            }
        }
    }
}

/// One pass: how many records went (`None`: skipped).
pub async fn pass(
    js: &Context,
    layout: &Layout,
    store: &RepositoryStore,
) -> Result<Option<u64>, String> {
    let Some((incarnation, floor)) = floor(js, layout).await? else {
        return Ok(None);
    };
    let floor = i64::try_from(floor).unwrap_or(i64::MAX);
    store
        .prune_order(&incarnation.stream, &incarnation.label(), floor)
        .await
        .map(Some)
        .map_err(|e| display_error_chain(&e))
}
