//! Stranded jobs: when the server gives up on a job at `max_deliver` (the
//! process died during its last attempt, or its final ack was lost), it
//! publishes a max-deliveries advisory, kept in the advisory stream. Each one
//! moves its job out of the work stream, where nats-server 2.9 would keep it
//! forever: to the dead letters, or back to work for `delete_replica`, whose
//! attempts are unlimited.

use crate::error_chain::display_error_chain;
use crate::event::{ChangeType, Job};
use crate::queue::dead_letter::{DeadJob, DeadReason, publish_dead};
use crate::queue::incarnation::Incarnation;
use crate::queue::layout::Layout;
use crate::queue::puller::{Pulled, Puller};
use crate::queue::requeue::{Carried, Placement, requeue_stored};
use crate::store::RepositoryStore;
use async_nats::jetstream::{self, Context};
use serde::Deserialize;
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Deserialize)]
struct MaxDeliveriesAdvisory {
    stream: String,
    stream_seq: u64,
    deliveries: u64,
    /// When the server gave up on the job (RFC 3339): it names the
    /// incarnation of the stream, which the sequence alone does not.
    #[serde(default, with = "time::serde::rfc3339::option")]
    timestamp: Option<OffsetDateTime>,
}

/// Handles advisories until `stop`.
pub async fn run(
    js: Context,
    layout: Layout,
    store: RepositoryStore,
    mut puller: Puller,
    stop: CancellationToken,
) {
    loop {
        if !puller.is_active() && puller.request(16).await.is_err() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = stop.cancelled() => break,
            }
        }
        let step = tokio::select! {
            s = puller.next() => s,
            _ = stop.cancelled() => break,
        };
        match step {
            Ok(Pulled::Messages(ms)) => {
                for m in ms {
                    handle(&js, &layout, &store, &m).await;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    for m in puller.close().await {
        acknowledge(&m, jetstream::AckKind::Nak(None), "nak").await;
    }
}

/// Acknowledges an advisory; a failure is logged and counted like a job's.
async fn acknowledge(m: &jetstream::Message, kind: jetstream::AckKind, name: &'static str) {
    if let Err(e) = m.ack_with(kind).await {
        crate::metrics::ack_error(name);
        tracing::warn!(
            ack = name,
            error = display_error_chain(&*e),
            "acknowledging a max-deliveries advisory failed; it comes again"
        );
    }
}

/// Moves the advisory's job; acks the advisory only when that worked (or
/// there was nothing left to move).
pub async fn handle(
    js: &Context,
    layout: &Layout,
    store: &RepositoryStore,
    m: &jetstream::Message,
) {
    let advisory: MaxDeliveriesAdvisory = match serde_json::from_slice(&m.message.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(
                error = display_error_chain(&e),
                "unreadable max-deliveries advisory dropped"
            );
            acknowledge(m, jetstream::AckKind::Term, "term").await;
            return;
        }
    };
    match move_stranded(js, layout, store, &advisory).await {
        Ok(()) => acknowledge(m, jetstream::AckKind::Ack, "ack").await,
        Err(e) => {
            tracing::error!(error = %e, stream_sequence = advisory.stream_seq, "could not move a stranded job; will retry");
            let retry = jetstream::AckKind::Nak(Some(Duration::from_secs(5)));
            acknowledge(m, retry, "nak").await;
        }
    }
}

async fn move_stranded(
    js: &Context,
    layout: &Layout,
    store: &RepositoryStore,
    a: &MaxDeliveriesAdvisory,
) -> Result<(), String> {
    if a.stream != layout.stream {
        return Ok(());
    }
    let mut stream = js
        .get_stream(&layout.stream)
        .await
        .map_err(|e| e.to_string())?;
    let incarnation = Incarnation::of(stream.info().await.map_err(|e| e.to_string())?);
    let raw = match stream.get_raw_message(a.stream_seq).await {
        Ok(raw) => raw,
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            return Ok(()); // acked or moved already
        }
        Err(e) => return Err(e.to_string()),
    };
    // The job the server gave up on was stored before it gave up, in the
    // stream as it was then: an advisory from before the stream was created
    // again names a job that went with the old one, and the job now at its
    // sequence is another.
    if let Some(at) = a.timestamp
        && (incarnation.predates(at) || raw.time > at)
    {
        tracing::info!(
            stream_sequence = a.stream_seq,
            "max-deliveries advisory of a work stream that was created again since: its job went with the old stream"
        );
        return Ok(());
    }
    let unlimited = Job::from_json(&raw.payload)
        .map(|j| j.change_type() == ChangeType::DeleteReplica)
        .unwrap_or(false);
    if unlimited {
        requeue_stored(js, &incarnation, &raw, a.deliveries).await?;
        tracing::info!(
            stream_sequence = a.stream_seq,
            "stranded delete_replica job requeued (its attempts are unlimited)"
        );
    } else {
        let carried = Carried::of(Some(&raw.headers));
        let placement = Placement::of(Some(&raw.headers), raw.sequence, raw.time, &incarnation);
        let written = publish_dead(
            js,
            layout,
            DeadJob {
                work_subject: raw.subject.as_str(),
                incarnation: &incarnation,
                work_sequence: a.stream_seq,
                placement,
                replayed_at: carried.replayed_at,
                payload: raw.payload.clone(),
                reason: DeadReason::Stranded,
                error: "max deliveries reached without an acknowledgement: its process stopped during the call on every delivery (the backstop for a job that kills its process), or the last acknowledgement was lost",
                attempts: carried.failures,
                deliveries: carried.deliveries.saturating_add(a.deliveries),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        // A captured job: Praefect's row becomes `dead`, as on any other
        // way to the dead letters.
        if let Some(event) = carried.praefect_event
            && let Err(e) = store.settle_captured_dead(event).await
        {
            // The dead letter is written; Praefect's row stays pending until
            // a release hands it back.
            tracing::warn!(
                praefect_event = event,
                error = display_error_chain(&e),
                "settling Praefect's row of a stranded job failed"
            );
        }
        let (vs, target) =
            crate::subject::parse_job_subject(&layout.subject_prefix, raw.subject.as_str())
                .unwrap_or_default();
        if written {
            crate::metrics::TargetMetrics::new(&vs, &target)
                .dead_letter(DeadReason::Stranded.as_str());
        }
    }
    stream
        .delete_message(a.stream_seq)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
