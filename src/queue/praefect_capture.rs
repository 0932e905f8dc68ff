//! Praefect's captured events, published: one `run` process at a time (a
//! leadership, like the reconciler's) publishes every captured event to its
//! work subject as Praefect stored it (`ID`, `Job`, `Meta`, `CreatedAt`,
//! Praefect's `ReplicationEvent`), in event order, with a message id derived
//! from the event id. A crash between the broker's acknowledgement and the
//! bookkeeping publishes the same id again, which the broker drops within
//! its duplicate window. While idle it waits for the trigger's
//! notification, with a poll every second as a backstop; while events keep
//! coming it polls every few milliseconds and tells the trigger not to
//! notify, because Postgres commits notifying transactions one at a time and
//! a notification per insert held Praefect's Enqueue to a fifth of its rate.
//!
//! Publishes go out several at a time, but never two of one replica at
//! once: if one fails, the ones after it in flight are of other replicas, so
//! a replica's events still enter the stream in event order.

use crate::error_chain::display_error_chain;
use crate::queue::layout::Layout;
use crate::store::praefect_capture::{CAPTURE_CHANNEL, CapturedEvent};
use crate::store::{PgEndpoint, RepositoryStore};
use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The header naming the Praefect event a job came from, so the consumer
/// settles Praefect's row.
pub const PRAEFECT_EVENT: &str = "Gitaly-Replicator-Praefect-Event";

/// The advisory lock whose holder publishes captured events.
pub const CAPTURE_LOCK_KEY: i64 = 0x6769_7461_6c79_0002;

/// How often the publisher looks without a notification.
pub const POLL: Duration = Duration::from_secs(1);

/// How often it looks while events keep coming: the trigger sends no
/// notification then (each notifying insert commits alone).
const ACTIVE_POLL: Duration = Duration::from_millis(5);

/// How long after the last event found it keeps polling at ACTIVE_POLL
/// before it waits for a notification again.
const LINGER: Duration = Duration::from_secs(1);

/// Events read per round.
const BATCH: i64 = 500;

/// Publishes at most this many at once.
const WINDOW: usize = 64;

/// The message id of a captured event's job.
pub fn event_message_id(event_id: i64) -> String {
    format!("praefect-event-{event_id}")
}

/// Publishes captured events until `stop`, while this process leads.
pub async fn run(
    js: Context,
    layout: Layout,
    store: RepositoryStore,
    session: PgEndpoint,
    stop: CancellationToken,
) {
    let mut leadership = crate::store::leadership::Leadership::new(
        session.clone(),
        CAPTURE_LOCK_KEY,
        "the publisher of Praefect's captured events",
    );
    let mut listener = None;
    // When a round last found events: while that is under LINGER ago the
    // publisher polls every ACTIVE_POLL and the trigger sends no
    // notification (`None`: waiting for one).
    let mut active_since: Option<Instant> = None;
    // What this process last told the trigger (`None`: not yet, or it
    // lost the leadership since).
    let mut told_waiting: Option<bool> = None;
    loop {
        // Without the capture (and nothing left of one), nobody leads.
        let wanted = match store.capture_status().await {
            Ok(s) => s.installed || s.unpublished > 0,
            Err(e) => {
                tracing::debug!(
                    error = display_error_chain(&e),
                    "reading the capture's state failed"
                );
                false
            }
        };
        if wanted && leadership.hold().await {
            if listener.is_none() {
                listener = listen(&session).await;
            }
            // Polls while events keep coming, checking the capture and the
            // leadership again every POLL.
            let checked = Instant::now();
            loop {
                if publish_all(&js, &layout, &store).await > 0 {
                    active_since = Some(Instant::now());
                    tell_waiting(&store, &mut told_waiting, false).await;
                }
                let active = active_since.is_some_and(|t| t.elapsed() < LINGER);
                if !active || checked.elapsed() >= POLL {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(ACTIVE_POLL) => {}
                    () = stop.cancelled() => return,
                }
            }
            if active_since.is_some_and(|t| t.elapsed() < LINGER) {
                continue;
            }
            active_since = None;
            if told_waiting != Some(true) {
                // Ask for a notification, then look once more: an event
                // stored before the flag was set sent none.
                tell_waiting(&store, &mut told_waiting, true).await;
                if publish_all(&js, &layout, &store).await > 0 {
                    active_since = Some(Instant::now());
                    tell_waiting(&store, &mut told_waiting, false).await;
                    continue;
                }
            }
        } else {
            listener = None;
            active_since = None;
            told_waiting = None;
        }
        let woken = async {
            match listener.as_mut() {
                Some(l) => {
                    let _ = l.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(POLL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Publishes rounds until one reads less than a batch; answers how many
/// events were read in all (a failed round is logged and ends it).
async fn publish_all(js: &Context, layout: &Layout, store: &RepositoryStore) -> usize {
    let mut read = 0;
    loop {
        match publish_round(js, layout, store).await {
            Ok(n) => {
                read += n;
                if n as i64 != BATCH {
                    return read;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing Praefect's captured events failed; will retry");
                return read;
            }
        }
    }
}

/// Tells the trigger whether to notify, if that changed; a failure leaves
/// the flag unknown, to be written again (the poll finds events meanwhile).
async fn tell_waiting(store: &RepositoryStore, told: &mut Option<bool>, waiting: bool) {
    if *told == Some(waiting) {
        return;
    }
    match store.set_capture_waiting(waiting).await {
        Ok(()) => *told = Some(waiting),
        Err(e) => {
            *told = None;
            tracing::debug!(
                error = display_error_chain(&e),
                "telling the capture's trigger whether to notify failed"
            );
        }
    }
}

async fn listen(session: &PgEndpoint) -> Option<sqlx::postgres::PgListener> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(session.options().clone());
    let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(
                error = display_error_chain(&e),
                "listening for captured events failed; polling"
            );
            return None;
        }
    };
    match listener.listen(CAPTURE_CHANNEL).await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::debug!(
                error = display_error_chain(&e),
                "listening for captured events failed; polling"
            );
            None
        }
    }
}

/// Publishes one batch of unpublished events; answers how many were read.
async fn publish_round(
    js: &Context,
    layout: &Layout,
    store: &RepositoryStore,
) -> Result<usize, String> {
    let events = store
        .unpublished_events(BATCH)
        .await
        .map_err(|e| display_error_chain(&e))?;
    let read = events.len();
    let mut published = Vec::with_capacity(read);
    let mut in_flight = Vec::new();
    let mut replicas = HashSet::new();
    let mut failure = None;
    for event in &events {
        if in_flight.len() >= WINDOW || replicas.contains(&event.replica) {
            if let Err(e) = settle_window(&mut in_flight, &mut published).await {
                failure = Some(e);
                break;
            }
            replicas.clear();
        }
        replicas.insert(event.replica.clone());
        match publish(js, layout, event).await {
            Ok(ack) => in_flight.push((event.event_id, ack)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none()
        && let Err(e) = settle_window(&mut in_flight, &mut published).await
    {
        failure = Some(e);
    }
    if !published.is_empty() {
        store
            .mark_published(&published)
            .await
            .map_err(|e| display_error_chain(&e))?;
        tracing::debug!(
            events = published.len(),
            "published Praefect's captured events"
        );
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(read),
    }
}

type PendingAck = async_nats::jetstream::context::PublishAckFuture;

/// Waits for the acks in flight, in order; every event acknowledged before
/// a failure is published.
async fn settle_window(
    in_flight: &mut Vec<(i64, PendingAck)>,
    published: &mut Vec<i64>,
) -> Result<(), String> {
    let mut failure = None;
    for (event_id, ack) in in_flight.drain(..) {
        match ack.await {
            Ok(_) => published.push(event_id),
            Err(e) => {
                failure.get_or_insert(e.to_string());
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

async fn publish(
    js: &Context,
    layout: &Layout,
    event: &CapturedEvent,
) -> Result<PendingAck, String> {
    let subject = crate::subject::job_subject(
        &layout.subject_prefix,
        &event.virtual_storage,
        &event.target_storage,
    );
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", event_message_id(event.event_id).as_str());
    h.insert(PRAEFECT_EVENT, event.event_id.to_string().as_str());
    js.publish_with_headers(subject, h, event.payload.clone().into())
        .await
        .map_err(|e| format!("event {}: {e}", event.event_id))
}
