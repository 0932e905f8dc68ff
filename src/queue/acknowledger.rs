//! Carries out what `ack::decide` answered for one delivered message, and
//! says so when it could not: every failed acknowledgement is logged once with
//! the job's fields and counted in `gitaly_replicator_ack_errors_total{kind}`.
//!
//! A plain ack is a publish the client buffers: while the connection is down
//! it returns at once and the ack waits in the client, to be sent after the
//! reconnect or lost with the connection (the server then delivers the job
//! again). So an acknowledgement made while disconnected counts as failed as
//! well: a broker that takes no acks must not look healthy.

use crate::metrics::{self, TargetMetrics};
use crate::queue::ack::{AckAction, Deliveries, Role, Stage, decide};
use crate::queue::dead_letter::{DeadJob, DeadReason, publish_dead};
use crate::queue::incarnation::{Incarnation, StreamIdentity};
use crate::queue::layout::Layout;
use crate::queue::requeue::{Carried, FreshCopy, Placement, lineage, publish_copy, requeue};
use crate::retry_delay::RetryPolicy;
use crate::store::RepositoryStore;
use async_nats::connection::State;
use async_nats::jetstream::{self, AckKind};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// The fields a job's log lines carry, as Praefect names them.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobFields<'a> {
    pub virtual_storage: &'a str,
    pub target: &'a str,
    pub source: &'a str,
    pub correlation_id: &'a str,
    pub change_type: &'a str,
    pub relative_path: &'a str,
    pub stream_sequence: u64,
    /// The attempt this run would be: its failed calls so far, plus one.
    pub attempt: u64,
    /// The server's delivery count of this message.
    pub delivery: u64,
}

impl<'a> JobFields<'a> {
    /// The fields of a message not decoded (or not decodable): where it was
    /// delivered and its counts.
    pub fn undecoded(
        virtual_storage: &'a str,
        target: &'a str,
        stream_sequence: u64,
        deliveries: &Deliveries,
    ) -> JobFields<'a> {
        JobFields {
            virtual_storage,
            target,
            stream_sequence,
            attempt: deliveries.failures + 1,
            delivery: deliveries.delivered,
            ..JobFields::default()
        }
    }
}

/// Logs an event of one job with Praefect's field names at the top level of
/// the line, where log queries written for Praefect look for them.
macro_rules! job_log {
    ($level:ident, $f:expr, $($rest:tt)*) => {{
        let f: &$crate::queue::acknowledger::JobFields = &$f;
        tracing::$level!(
            virtual_storage = %f.virtual_storage,
            replication_job_target = %f.target,
            replication_job_source = %f.source,
            correlation_id = %f.correlation_id,
            change_type = %f.change_type,
            relative_path = %f.relative_path,
            stream_sequence = f.stream_sequence,
            attempt = f.attempt,
            delivery = f.delivery,
            $($rest)*
        )
    }};
}
pub(crate) use job_log;

/// One delivered message, as the acknowledger needs it.
pub struct Delivery<'a> {
    pub message: &'a jetstream::Message,
    /// The incarnation of the work stream it came from.
    pub incarnation: &'a Incarnation,
    /// The message's own stream sequence.
    pub sequence: u64,
    pub deliveries: Deliveries,
    pub placement: Placement,
    /// What the message carries from the job's earlier copies.
    pub carried: Carried,
    pub fields: JobFields<'a>,
}

/// Carries out the acknowledgements of one target's jobs; cheap to clone.
#[derive(Clone)]
pub struct Acknowledger {
    js: jetstream::Context,
    layout: Layout,
    identity: Arc<StreamIdentity>,
    /// Settles the rows of Praefect's captured events.
    store: RepositoryStore,
    retry: RetryPolicy,
    metrics: TargetMetrics,
}

impl Acknowledger {
    pub fn new(
        js: jetstream::Context,
        layout: Layout,
        identity: Arc<StreamIdentity>,
        store: RepositoryStore,
        retry: RetryPolicy,
        metrics: TargetMetrics,
    ) -> Self {
        Acknowledger {
            js,
            layout,
            identity,
            store,
            retry,
            metrics,
        }
    }

    /// Decides for `stage` and carries the decision out; a dead letter or a
    /// requeue whose publish fails is decided again as such. `error` is what
    /// a dead letter records as the reason.
    pub async fn settle(&self, d: &Delivery<'_>, stage: Stage<'_>, role: Role, error: &str) {
        // The stream it came from is gone: its ack subject could name a job
        // of the new one with the same sequence, and its copy or dead letter
        // would carry a place that means nothing there.
        if !self.identity.is_current(d.incarnation) {
            if matches!(stage, Stage::Finished(_) | Stage::Undecodable) {
                job_log!(
                    info,
                    d.fields,
                    "job of a work stream that was created again since it was delivered: not acknowledged (it went with the old stream)"
                );
            }
            return;
        }
        let action = decide(stage, role, &d.deliveries, &self.retry);
        // A job of Praefect's captured event: Praefect's row follows before
        // the job's message goes, so a crash between the two only runs the
        // job again.
        let event = d.carried.praefect_event;
        if let Some(event) = event {
            let settled = match (&action, stage) {
                (AckAction::Ack, Stage::Finished(_)) => {
                    Some(self.store.settle_captured_done(event).await)
                }
                _ => None,
            };
            if let Some(Err(e)) = settled {
                self.failed(d, "settle", &crate::error_chain::display_error_chain(&e));
                return self
                    .send(d, AckKind::Nak(Some(Duration::from_secs(1))), "nak")
                    .await;
            }
        }
        let fallback = match &action {
            AckAction::DeadLetter(reason) => match self.dead_letter(d, *reason, error).await {
                Ok(()) => {
                    if let Some(event) = event
                        && let Err(e) = self.store.settle_captured_dead(event).await
                    {
                        // The dead letter is written; Praefect's row stays
                        // pending until a release hands it back.
                        self.failed(d, "settle", &crate::error_chain::display_error_chain(&e));
                    }
                    return self.send(d, AckKind::Term, "term").await;
                }
                Err(e) => {
                    self.failed(d, "dead_letter", &e);
                    Stage::DeadLetterFailed
                }
            },
            AckAction::Requeue => match self.requeue(d).await {
                Ok(()) => return self.send(d, AckKind::Term, "term").await,
                Err(e) => {
                    self.failed(d, "requeue", &e);
                    Stage::RequeueFailed
                }
            },
            AckAction::Retry(delay) => match self.retry(d, *delay).await {
                Ok(()) => return self.send(d, AckKind::Term, "term").await,
                Err(e) => {
                    self.failed(d, "requeue", &e);
                    Stage::RetryFailed(*delay)
                }
            },
            _ => return self.carry_out(d, action).await,
        };
        let action = decide(fallback, role, &d.deliveries, &self.retry);
        self.carry_out(d, action).await;
    }

    /// Sends a plain acknowledgement.
    async fn carry_out(&self, d: &Delivery<'_>, action: AckAction) {
        let (kind, name) = match action {
            AckAction::Ack => (AckKind::Ack, "ack"),
            AckAction::Progress => (AckKind::Progress, "progress"),
            AckAction::Nak(delay) => (AckKind::Nak(delay), "nak"),
            AckAction::Leave => return,
            // Decided again above; never carried out as plain acks.
            AckAction::DeadLetter(_) | AckAction::Requeue | AckAction::Retry(_) => {
                (AckKind::Nak(None), "nak")
            }
        };
        self.send(d, kind, name).await;
    }

    async fn send(&self, d: &Delivery<'_>, kind: AckKind, name: &'static str) {
        match d.message.ack_with(kind).await {
            Err(e) => self.failed(d, name, &e.to_string()),
            Ok(()) if self.js.client().connection_state() != State::Connected => self.failed(
                d,
                name,
                "sent while disconnected from NATS: it goes out after the reconnect, or the job is delivered again",
            ),
            Ok(()) => {}
        }
    }

    async fn dead_letter(
        &self,
        d: &Delivery<'_>,
        reason: DeadReason,
        error: &str,
    ) -> Result<(), String> {
        let dead = DeadJob {
            work_subject: d.message.message.subject.as_str(),
            incarnation: d.incarnation,
            work_sequence: d.sequence,
            placement: d.placement,
            payload: d.message.message.payload.clone(),
            replayed_at: d.carried.replayed_at,
            reason,
            error,
            attempts: d.deliveries.attempts_used(reason),
            deliveries: self.deliveries(d),
        };
        let written = publish_dead(&self.js, &self.layout, dead)
            .await
            .map_err(|e| e.to_string())?;
        // A duplicate the stream dropped was counted when it was written.
        if written {
            self.metrics.dead_letter(reason.as_str());
        }
        Ok(())
    }

    /// Every delivery of the job, its earlier copies' included.
    fn deliveries(&self, d: &Delivery<'_>) -> u64 {
        d.carried.deliveries.saturating_add(d.deliveries.delivered)
    }

    async fn requeue(&self, d: &Delivery<'_>) -> Result<(), String> {
        requeue(
            &self.js,
            d.incarnation,
            d.message.message.subject.to_string(),
            d.message.message.payload.clone(),
            d.placement,
            d.carried,
            d.sequence,
            d.deliveries.delivered,
        )
        .await
    }

    /// Records a failed call in a fresh copy that runs after `delay`. The
    /// copy is named by the job and its failures, so a second line of copies
    /// of the job (see `requeue`) ends here: its copy is a duplicate.
    async fn retry(&self, d: &Delivery<'_>, delay: Duration) -> Result<(), String> {
        let failures = d.deliveries.failures.saturating_add(1);
        let copy = FreshCopy {
            subject: d.message.message.subject.to_string(),
            payload: d.message.message.payload.clone(),
            placement: d.placement,
            carried: Carried {
                failures,
                deliveries: self.deliveries(d),
                retry_at: Some(OffsetDateTime::now_utc() + delay),
                // A wait it was in goes on; it is logged once.
                waiting_since: d.carried.waiting_since,
                praefect_event: d.carried.praefect_event,
                replayed_at: d.carried.replayed_at,
            },
            message_id: format!(
                "retry-{}-{failures}",
                lineage(d.incarnation, d.placement, d.carried.replayed_at)
            ),
        };
        if !publish_copy(&self.js, copy).await? {
            job_log!(
                info,
                d.fields,
                failures,
                "another copy of this job already records as many failed attempts (a lost acknowledgement or a requeued left-over job made a second copy); this one ends here"
            );
        }
        Ok(())
    }

    fn failed(&self, d: &Delivery<'_>, kind: &'static str, error: &str) {
        metrics::ack_error(kind);
        job_log!(warn, d.fields, ack = kind, %error, "acknowledgement failed");
    }
}
