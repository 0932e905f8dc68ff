//! Jobs left in the work stream at or below their consumer's acknowledgement
//! floor (or below its last delivery, when nothing is waiting or
//! unacknowledged): jobs the server will never deliver again, yet keeps.
//!
//! A nats-server killed (`kill -9`) right after acknowledgements can come
//! back with the consumer's state saved (the floor past a job) but the job's
//! removal from the stream lost. A job stranded at `max_deliver` whose
//! advisory was lost with the broker sits there as well. Neither is
//! delivered again, so each stays in the stream, counted by `nats stream
//! info`, until removed.
//!
//! Which of the two a left-over job is cannot be told from the stream, so
//! none is dropped unseen: one whose job is already in the dead letters (by
//! the message id its dead letter carries, which names the job, so the dead
//! letter of any copy of it counts) is removed; any other goes back to work as a
//! fresh message that keeps its place (`requeue`). A job that had completed
//! is then skipped at once as already in effect (the order gate, or the twin
//! that completed after it was created); a stranded one runs again; one whose
//! retry copy lives on ends when it fails, its own retry copy a duplicate.
//!
//! A job is settled only when two sweeps in a row find it, so a stranded
//! job's advisory, handled in milliseconds, moves it first.
//!
//! The same kill can leave the opposite: the job's removal saved but not the
//! consumer's acknowledgement, so after the restart the consumer lists the
//! job as unacknowledged while the stream no longer has it. nats-server 2.9
//! never clears such an entry (a redelivery finds no message and gives up),
//! so it holds the acknowledgement floor for ever, and every job left above
//! it would never be found. When a consumer's floor has not moved between
//! two sweeps and the job just above it is gone, the sweep acknowledges that
//! sequence: the consumer drops the entry and its floor moves on. An
//! acknowledgement of a sequence the stream no longer has cannot remove or
//! skip any job.

use crate::error_chain::display_error_chain;
use crate::queue::dead_letter::{dead_message_id, dead_subject_for};
use crate::queue::incarnation::Incarnation;
use crate::queue::layout::Layout;
use crate::queue::requeue::{Carried, Placement, requeue_stored};
use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// At most this many left-over jobs are read per sweep, and this many dead
/// letters per target are searched for one (beyond that it is requeued).
const SWEEP_LIMIT: usize = 1000;

/// How often to sweep: often enough that the queue drains within a minute
/// or so, seldom enough to cost nothing (one request per target when
/// nothing is left).
pub fn sweep_interval(ack_wait: Duration) -> Duration {
    (ack_wait * 5).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// What became of one left-over job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Already in the dead letters: removed from the work stream.
    Removed,
    /// Sent back to work as a fresh message that keeps its place.
    Requeued,
    /// Gone by the time it was read (another process settled it).
    Gone,
}

/// Sweeps every `interval` until `stop`.
pub async fn run(js: Context, layout: Layout, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    let mut seen = BTreeSet::new();
    let mut last_floors = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let found = match js.get_stream(&layout.stream).await {
            Ok(mut work) => find(&mut work, &layout).await.map(|f| (work, f)),
            Err(e) => Err(e.to_string()),
        };
        match found {
            Ok((work, (incarnation, found, floors))) => {
                release_stalled_floors(&js, &work, &incarnation, &floors, &last_floors).await;
                last_floors = floors
                    .into_iter()
                    .map(|f| (f.consumer.clone(), (incarnation.label(), f)))
                    .collect();
                // A sequence found in two sweeps of different incarnations
                // (the stream was created again between them) is two jobs.
                let found: BTreeSet<(String, u64)> = found
                    .into_iter()
                    .map(|s| (incarnation.label(), s))
                    .collect();
                // Read once per sweep, for all the jobs it settles.
                let mut dead = DeadLetterIds::default();
                for (_, sequence) in found.intersection(&seen) {
                    let sequence = *sequence;
                    if let Err(e) =
                        settle(&js, &layout, &work, &incarnation, &mut dead, sequence).await
                    {
                        tracing::warn!(error = %e, stream_sequence = sequence, "could not settle a job left in the work stream; will retry");
                    }
                }
                seen = found;
            }
            Err(e) => {
                tracing::debug!(error = %e, "looking for jobs left in the work stream failed; will retry");
            }
        }
    }
}

/// Where a consumer's acknowledgement floor stood at a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckFloor {
    /// The consumer's name on the server, and the subject it takes.
    pub consumer: String,
    pub filter: String,
    /// The floor's stream and consumer sequences.
    pub stream_sequence: u64,
    pub consumer_sequence: u64,
    /// The last stream sequence it delivered.
    pub delivered: u64,
    /// Jobs it delivered and lists as unacknowledged.
    pub unacknowledged: usize,
}

/// The stream's incarnation, the sequences of the jobs at or below their
/// consumer's acknowledgement floor (in the stream's order per target), and
/// where each consumer's floor stands.
pub async fn find(
    work: &mut Stream,
    layout: &Layout,
) -> Result<(Incarnation, Vec<u64>, Vec<AckFloor>), String> {
    let info = work.info().await.map_err(|e| e.to_string())?;
    let (incarnation, state) = (Incarnation::of(info), info.state.clone());
    let mut floors = Vec::new();
    let mut ack_floors = Vec::new();
    let mut accounted = 0u64;
    for c in &layout.consumers {
        let info = work
            .consumer_info(&c.durable_name)
            .await
            .map_err(|e| format!("consumer {}: {e}", c.durable_name))?;
        accounted += info.num_pending + info.num_ack_pending as u64;
        ack_floors.push(AckFloor {
            consumer: info.name.clone(),
            filter: c.filter_subject.clone(),
            stream_sequence: info.ack_floor.stream_sequence,
            consumer_sequence: info.ack_floor.consumer_sequence,
            delivered: info.delivered.stream_sequence,
            unacknowledged: info.num_ack_pending,
        });
        // With nothing waiting or unacknowledged, every job it delivered is
        // done: nats-server 2.9 can leave the acknowledgement floor behind
        // after a restart (acks of jobs above it saved one by one), and a
        // job whose removal was lost then sits above the floor.
        let floor = if info.num_pending == 0 && info.num_ack_pending == 0 {
            info.delivered
                .stream_sequence
                .max(info.ack_floor.stream_sequence)
        } else {
            info.ack_floor.stream_sequence
        };
        floors.push((c.filter_subject.as_str(), floor));
    }
    let mut found = Vec::new();
    // Every message waiting or in flight: nothing is left over.
    if state.messages <= accounted {
        return Ok((incarnation, found, ack_floors));
    }
    for (filter, floor) in floors {
        let mut next = state.first_sequence;
        while next <= floor && found.len() < SWEEP_LIMIT {
            match work.get_first_raw_message_by_subject(filter, next).await {
                Ok(m) if m.sequence <= floor => {
                    found.push(m.sequence);
                    next = m.sequence + 1;
                }
                Ok(_) => break,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok((incarnation, found, ack_floors))
}

/// For each consumer whose floor stands where it stood at the last sweep
/// of this incarnation, with jobs still unacknowledged, acknowledges the
/// sequences above the floor that the stream no longer has, up to its next
/// job (see the module's docs). Sequences holding another target's job are
/// passed over, never acknowledged: an acknowledgement removes whatever
/// message it names from a work-queue stream. A job of its own that is there
/// (in flight, or waiting) ends the walk: the floor waits for it rightly.
async fn release_stalled_floors(
    js: &Context,
    work: &Stream,
    incarnation: &Incarnation,
    floors: &[AckFloor],
    last: &HashMap<String, (String, AckFloor)>,
) {
    for f in floors {
        let stalled = matches!(last.get(&f.consumer), Some((label, before))
            if *label == incarnation.label() && before.stream_sequence == f.stream_sequence);
        if !stalled || f.unacknowledged == 0 || f.stream_sequence >= f.delivered {
            continue;
        }
        let from = f.stream_sequence + 1;
        let next_own = match work.get_first_raw_message_by_subject(&f.filter, from).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => u64::MAX,
            Err(_) => continue,
        };
        let end = next_own.min(f.delivered + 1).min(from + SWEEP_LIMIT as u64);
        let mut acknowledged = 0;
        for sequence in from..end {
            match work.get_raw_message(sequence).await {
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                _ => continue,
            }
            if let Err(e) = acknowledge_gone(js, work, f, sequence).await {
                tracing::debug!(error = %e, "acknowledging a job gone from the work stream failed; will retry");
                break;
            }
            acknowledged += 1;
        }
        if acknowledged > 0 {
            tracing::info!(
                consumer = %f.consumer,
                from_stream_sequence = from,
                acknowledged,
                "acknowledged sequences the work stream no longer has, above an acknowledgement floor that stood still: a broker restart can lose a job's acknowledgement and keep its removal, and the consumer then lists it unacknowledged for ever"
            );
        }
    }
}

/// Acknowledges `sequence`, which the stream no longer has, on the
/// consumer of `floor`.
async fn acknowledge_gone(
    js: &Context,
    work: &Stream,
    floor: &AckFloor,
    sequence: u64,
) -> Result<(), async_nats::PublishError> {
    // The reply subject the server gives a delivery: stream, consumer,
    // delivery count, stream and consumer sequences, time, pending. The
    // server takes the consumer sequence from its own entry when it has one;
    // without one, the floor's next lets the floor move past a sequence that
    // is gone.
    let subject = format!(
        "$JS.ACK.{}.{}.1.{sequence}.{}.0.0",
        work.cached_info().config.name,
        floor.consumer,
        floor.consumer_sequence + 1
    );
    js.client().publish(subject, "+ACK".into()).await
}

/// Settles one left-over job of `work` (see the module's docs).
pub async fn settle(
    js: &Context,
    layout: &Layout,
    work: &Stream,
    incarnation: &Incarnation,
    dead: &mut DeadLetterIds,
    sequence: u64,
) -> Result<Settled, String> {
    let raw = match work.get_raw_message(sequence).await {
        Ok(raw) => raw,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(Settled::Gone),
        Err(e) => return Err(e.to_string()),
    };
    // The stream was created again since the sweep looked: the message at
    // this sequence is another job, of the new stream.
    let now = js
        .get_stream(&layout.stream)
        .await
        .map_err(|e| e.to_string())?;
    if Incarnation::of(now.cached_info()) != *incarnation {
        return Ok(Settled::Gone);
    }
    let placement = Placement::of(Some(&raw.headers), raw.sequence, raw.time, incarnation);
    let replayed_at = Carried::of(Some(&raw.headers)).replayed_at;
    let settled = if dead
        .holds(
            js,
            layout,
            raw.subject.as_str(),
            &dead_message_id(incarnation, placement, replayed_at),
        )
        .await?
    {
        Settled::Removed
    } else {
        // Deliveries 0: the same message id from every process that sweeps.
        requeue_stored(js, incarnation, &raw, 0).await?;
        Settled::Requeued
    };
    remove(work, sequence).await?;
    // A subject of another shape cannot be in a consumer's work; count it
    // all the same rather than hide it.
    let (vs, target) = crate::subject::parse_job_subject(&layout.subject_prefix, &raw.subject)
        .unwrap_or_else(|_| (String::new(), String::new()));
    let result = if settled == Settled::Removed {
        tracing::info!(
            stream_sequence = sequence,
            "removed a dead-lettered job left in the work stream"
        );
        "removed"
    } else {
        tracing::warn!(
            stream_sequence = sequence,
            "a job left in the work stream that no consumer delivers (a broker restart lost its removal, or its max-deliveries advisory) was requeued; it is skipped if it had completed"
        );
        "requeued"
    };
    crate::metrics::leftover_settled(&vs, &target, result);
    Ok(settled)
}

/// Deletes a message; one already gone (another process) is no error.
async fn remove(stream: &Stream, sequence: u64) -> Result<(), String> {
    let Err(e) = stream.delete_message(sequence).await else {
        return Ok(());
    };
    match stream.get_raw_message(sequence).await {
        Err(gone) if gone.kind() == RawMessageErrorKind::NoMessageFound => Ok(()),
        _ => Err(display_error_chain(&e)),
    }
}

/// The message ids of the dead letters, per dead subject (one per target),
/// each read at most once: a sweep that settles many jobs of one target
/// reads its dead letters once, not once per job.
#[derive(Debug, Default)]
pub struct DeadLetterIds(HashMap<String, HashSet<String>>);

impl DeadLetterIds {
    /// Whether the dead letters of the job's target hold the dead letter
    /// `id`: that of any copy of the job.
    async fn holds(
        &mut self,
        js: &Context,
        layout: &Layout,
        work_subject: &str,
        id: &str,
    ) -> Result<bool, String> {
        let subject = dead_subject_for(layout, work_subject);
        let ids = match self.0.entry(subject) {
            Entry::Occupied(ids) => ids.into_mut(),
            Entry::Vacant(slot) => {
                let ids = read_ids(js, layout, slot.key()).await?;
                slot.insert(ids)
            }
        };
        Ok(ids.contains(id))
    }
}

/// The message ids of the first [`SWEEP_LIMIT`] dead letters on `subject`.
async fn read_ids(js: &Context, layout: &Layout, subject: &str) -> Result<HashSet<String>, String> {
    let dead = js
        .get_stream(&layout.dead_letter_stream)
        .await
        .map_err(|e| e.to_string())?;
    let mut ids = HashSet::new();
    let mut next = 1;
    for _ in 0..SWEEP_LIMIT {
        match dead.get_first_raw_message_by_subject(subject, next).await {
            Ok(m) => {
                if let Some(id) = m.headers.get("Nats-Msg-Id") {
                    ids.insert(id.as_str().to_owned());
                }
                next = m.sequence + 1;
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(ids)
}
