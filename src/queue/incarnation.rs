//! The work stream's identity. A stream deleted and created again (a
//! rebuild after a disaster, a `nats stream rm` by mistake) numbers its jobs
//! from 1 again, and `setup` brings back consumers of the same names, so
//! pulls go on as if nothing happened. Order records, the message ids of
//! copies and dead letters, advisories and the leftover sweep therefore name
//! the incarnation (the stream's name and creation time): nothing of one
//! incarnation is compared with, removed or dead-lettered for a job of
//! another.
//!
//! A delivered message belongs to the incarnation whose creation it was
//! stored after, on the broker's clock. Each look at the stream proves that
//! every message stored up to its last message's time is of the incarnation
//! seen; a message stored later asks for another look (one request, shared
//! by every job that needs it).

use crate::queue::layout::Layout;
use async_nats::jetstream::{self, Context};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// One incarnation of the work stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnation {
    pub stream: String,
    pub created: OffsetDateTime,
}

impl Incarnation {
    /// `<stream>@<creation, Unix nanoseconds>`: what order records and
    /// message ids name it by.
    pub fn label(&self) -> String {
        format!("{}@{}", self.stream, self.created.unix_timestamp_nanos())
    }

    /// The incarnation a stream's info describes.
    pub fn of(info: &jetstream::stream::Info) -> Incarnation {
        Incarnation {
            stream: info.config.name.clone(),
            created: info.created,
        }
    }

    /// Whether a message stored at `stored` predates this incarnation (a
    /// copy's or a replay's original time, too).
    pub fn predates(&self, stored: OffsetDateTime) -> bool {
        stored < self.created
    }
}

/// Which incarnation a delivered message is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Belonging {
    Current(Arc<Incarnation>),
    /// Of a stream that is gone: it cannot be acknowledged, and its ack
    /// subject could name a job of the new one.
    Earlier,
}

struct Known {
    current: Arc<Incarnation>,
    /// Changes of incarnation seen so far.
    changes: u64,
    /// Messages stored up to this time are proven to be of `current`.
    covered_until: OffsetDateTime,
}

/// What this process knows of the work stream's identity.
pub struct StreamIdentity {
    js: Context,
    stream: String,
    known: Mutex<Known>,
    /// One look at a time; those who wait for it use its answer.
    looking: tokio::sync::Mutex<()>,
}

impl StreamIdentity {
    /// Looks at the stream for the first time.
    pub async fn new(js: Context, stream: &str) -> Result<Arc<StreamIdentity>, String> {
        let info = stream_info(&js, stream).await?;
        Ok(Arc::new(StreamIdentity {
            js,
            stream: stream.to_owned(),
            known: Mutex::new(Known {
                current: Arc::new(Incarnation::of(&info)),
                changes: 0,
                covered_until: info.state.last_timestamp,
            }),
            looking: tokio::sync::Mutex::new(()),
        }))
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        // A panic elsewhere while holding it leaves valid data.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The incarnation this process works on.
    pub fn current(&self) -> Arc<Incarnation> {
        self.known().current.clone()
    }

    /// Whether `incarnation` is still the one this process works on.
    pub fn is_current(&self, incarnation: &Incarnation) -> bool {
        *self.known().current == *incarnation
    }

    /// Looks at the stream now; a new incarnation is logged, counted and
    /// followed from then on.
    pub async fn look(&self) -> Result<(), String> {
        let _one = self.looking.lock().await;
        self.look_locked().await
    }

    async fn look_locked(&self) -> Result<(), String> {
        let info = stream_info(&self.js, &self.stream).await?;
        let seen = Incarnation::of(&info);
        let mut known = self.known();
        if *known.current == seen {
            known.covered_until = known.covered_until.max(info.state.last_timestamp);
            return Ok(());
        }
        let before = known.current.clone();
        known.current = Arc::new(seen);
        known.covered_until = info.state.last_timestamp;
        known.changes += 1;
        tracing::warn!(
            stream = %known.current.stream,
            was_created = %before.created,
            created = %known.current.created,
            "the work stream was created again (deleted and made anew): its jobs are numbered afresh, and this process follows it; jobs of the old stream that were not acknowledged are gone with it"
        );
        crate::metrics::stream_recreated();
        Ok(())
    }

    /// Changes of incarnation seen so far (by any look).
    fn changes(&self) -> u64 {
        self.known().changes
    }

    /// Which incarnation the message of `sequence`, stored at `stored`, is
    /// of. When the stream cannot be asked, it counts as current: its ack is
    /// then as good as any other made while the broker does not answer.
    pub async fn belonging(&self, sequence: u64, stored: OffsetDateTime) -> Belonging {
        if let Some(b) = self.known_belonging(stored) {
            return b;
        }
        {
            let _one = self.looking.lock().await;
            // Another look may have settled it meanwhile.
            if self.known_belonging(stored).is_none()
                && let Err(e) = self.look_locked().await
            {
                tracing::debug!(error = %e, "looking at the work stream failed");
                return Belonging::Current(self.current());
            }
        }
        if let Some(b) = self.known_belonging(stored) {
            return b;
        }
        // Stored before the current incarnation was created: the message of
        // a stream that is gone, unless the current one holds it as stored
        // (a stream restored from a backup keeps its messages' times).
        let current = self.current();
        if !current.predates(stored) {
            // Stored after the last look's last message: it is the newest
            // message, and in the current incarnation.
            return Belonging::Current(current);
        }
        match self.js.get_stream(&self.stream).await {
            Ok(s) => match s.get_raw_message(sequence).await {
                Ok(m) if m.time == stored => Belonging::Current(current),
                Ok(_) => Belonging::Earlier,
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                    Belonging::Earlier
                }
                // Unsure: not acknowledged, so it comes again if it is ours.
                Err(_) => Belonging::Earlier,
            },
            Err(_) => Belonging::Earlier,
        }
    }

    /// What is known without asking: `None` when a look is needed.
    fn known_belonging(&self, stored: OffsetDateTime) -> Option<Belonging> {
        let known = self.known();
        if known.current.predates(stored) {
            return None;
        }
        (stored <= known.covered_until).then(|| Belonging::Current(known.current.clone()))
    }
}

async fn stream_info(js: &Context, stream: &str) -> Result<jetstream::stream::Info, String> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    s.info()
        .await
        .cloned()
        .map_err(|e| format!("stream {stream}: {e}"))
}

/// How often a running process looks for a re-created work stream.
pub const LOOK_INTERVAL: Duration = Duration::from_secs(2);

/// Looks at the work stream every `interval` until `stop`. When it was
/// created again, the process follows it: every target's consumer is
/// created again where it is missing (or bound anew where `setup` made it),
/// so pulls go on against the new incarnation.
pub async fn follow(
    identity: Arc<StreamIdentity>,
    js: Context,
    layout: Layout,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The incarnation the consumers were last made for (a look by a job may
    // have seen a new one first).
    let mut bound = identity.changes();
    let mut missing_reported = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        match identity.look().await {
            Ok(_) => missing_reported = false,
            Err(e) => {
                if !missing_reported {
                    tracing::warn!(error = %e, "the work stream cannot be read (deleted, or the broker does not answer); run `gitaly-replicator setup` if it was deleted; this process goes on once it is back");
                    missing_reported = true;
                }
                continue;
            }
        }
        let seen = identity.changes();
        if seen != bound && bind_consumers(&js, &layout).await {
            bound = seen;
        }
    }
}

/// Makes every target's consumer on the current stream; whether all were.
async fn bind_consumers(js: &Context, layout: &Layout) -> bool {
    for spec in &layout.consumers {
        match layout.ensure_target(js, spec).await {
            Ok(changes) => crate::service::log_changes(&changes),
            Err(e) => {
                tracing::warn!(consumer = %spec.durable_name, error = %e, "making the consumer on the re-created work stream failed; will retry");
                return false;
            }
        }
    }
    true
}
