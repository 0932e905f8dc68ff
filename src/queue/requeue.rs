//! The one way a job goes back to the work stream as a fresh message, and
//! what travels with it: its place in its replica's order, the attempts it
//! used and the deliveries it had.
//!
//! A fresh copy is published when a call failed (it records the failure
//! and the time the job runs again), when a job is out of server deliveries
//! but not of attempts, and when it is released on the last delivery at
//! shutdown. A requeued copy gets a new stream sequence and timestamp. Order
//! and dedup judge a job by when it was first published, so the copy carries
//! its original sequence and time in headers. A header is honoured only when
//! it makes the job older than its own message, never newer: a publisher
//! cannot use it to jump ahead of jobs published after it.
//!
//! Failures are written when a failure is decided, never when a delivery
//! starts: a process killed in its call writes nothing, so an interrupted
//! call uses no attempt.
//!
//! A job can come to have two live copies: a retry copy published, then the
//! acknowledgement of the copy it replaced lost (a broker killed before it
//! saved the removal, so the leftover sweep requeues it, or a process killed
//! before it acknowledged). Each would go on failing and retrying on its own
//! and end in a dead letter of its own. Retry copies and dead letters are
//! therefore named by the job ([`lineage`]), not by the message: the second
//! copy's next retry or dead letter is a duplicate the stream drops, and that
//! copy ends there.

use crate::queue::incarnation::Incarnation;
use crate::queue::praefect_capture::PRAEFECT_EVENT;
use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use bytes::Bytes;
use std::time::Duration;
use time::OffsetDateTime;

/// The original stream sequence of a requeued job.
pub const ORDER_SEQUENCE: &str = "Gitaly-Replicator-Order-Sequence";
/// The original stream time of a requeued job (Unix nanoseconds).
pub const ORDER_TIME: &str = "Gitaly-Replicator-Order-Time";
/// Attempts used: calls of the job that failed, before this copy.
pub const FAILED_ATTEMPTS: &str = "Gitaly-Replicator-Failed-Attempts";
/// Server deliveries of the job's earlier copies.
pub const EARLIER_DELIVERIES: &str = "Gitaly-Replicator-Earlier-Deliveries";
/// Not to run before this time (Unix nanoseconds): the delay after a
/// failure.
pub const RETRY_AT: &str = "Gitaly-Replicator-Retry-At";
/// When the job started waiting (Unix nanoseconds), on a copy sent back
/// to the stream while it waits: its wait is logged once, not per copy.
pub const WAITING_SINCE: &str = "Gitaly-Replicator-Waiting-Since";
/// When an operator replayed the job from the dead letters (Unix
/// nanoseconds): a replay starts a new line of copies of the job, whose
/// retries and dead letter are its own.
pub const REPLAYED_AT: &str = "Gitaly-Replicator-Replayed-At";

/// Where a job stands among the jobs of its replica: its first publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub sequence: u64,
    pub published: OffsetDateTime,
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// A time as the headers carry it: Unix nanoseconds.
pub(crate) fn nanos(t: OffsetDateTime) -> String {
    t.unix_timestamp_nanos().to_string()
}

impl Placement {
    /// The placement of a message of `incarnation`: its own sequence and
    /// time, or the earlier ones its headers carry from the copy it was
    /// requeued (or replayed) from. A copy of a job first published in an
    /// earlier incarnation of the stream goes before every job of this one
    /// (sequence 0): its old sequence means nothing here, and every job of
    /// this incarnation was published after it.
    pub fn of(
        headers: Option<&HeaderMap>,
        sequence: u64,
        published: OffsetDateTime,
        incarnation: &Incarnation,
    ) -> Self {
        let original_time = header(headers, ORDER_TIME)
            .and_then(|v| v.parse::<i128>().ok())
            .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
            .filter(|t| *t <= published);
        if let Some(t) = original_time.filter(|t| incarnation.predates(*t)) {
            return Placement {
                sequence: 0,
                published: t,
            };
        }
        let original_sequence = header(headers, ORDER_SEQUENCE)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0 && *s <= sequence);
        Placement {
            sequence: original_sequence.unwrap_or(sequence),
            published: original_time.unwrap_or(published),
        }
    }

    /// The headers that carry it on a copy (or a dead letter, for its
    /// replay).
    pub fn write(&self, h: &mut HeaderMap) {
        h.insert(ORDER_SEQUENCE, self.sequence.to_string().as_str());
        h.insert(ORDER_TIME, nanos(self.published).as_str());
    }
}

/// The counts a job carries from its earlier copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Carried {
    /// Calls that failed.
    pub failures: u64,
    /// Server deliveries of earlier copies.
    pub deliveries: u64,
    /// Not to run before.
    pub retry_at: Option<OffsetDateTime>,
    /// Waiting since (for its source) when it went back to the stream.
    pub waiting_since: Option<OffsetDateTime>,
    /// The Praefect event the job was captured from: every copy settles
    /// Praefect's row when the job is done or dead.
    pub praefect_event: Option<i64>,
    /// When it was last replayed from the dead letters.
    pub replayed_at: Option<OffsetDateTime>,
}

impl Carried {
    /// What a message's headers carry; an unreadable value counts as none.
    pub fn of(headers: Option<&HeaderMap>) -> Self {
        let count = |name| {
            header(headers, name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let time = |name| {
            header(headers, name)
                .and_then(|v| v.parse::<i128>().ok())
                .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        };
        Carried {
            failures: count(FAILED_ATTEMPTS),
            deliveries: count(EARLIER_DELIVERIES),
            retry_at: time(RETRY_AT),
            waiting_since: time(WAITING_SINCE),
            praefect_event: header(headers, PRAEFECT_EVENT).and_then(|v| v.parse().ok()),
            replayed_at: time(REPLAYED_AT),
        }
    }

    /// How long a copy delivered at `now` must still wait, at most `cap`
    /// (a header from a publisher cannot park a job for longer).
    pub fn wait_left(&self, now: OffsetDateTime, cap: Duration) -> Option<Duration> {
        let left: Duration = (self.retry_at? - now).try_into().ok()?;
        (!left.is_zero()).then(|| left.min(cap))
    }
}

/// Names one job across all its copies: the stream incarnation it is of,
/// its first publication, and its last replay. Two copies of one job that
/// were both left running (see the module's docs) share it; a replayed job
/// starts another, so its retries and dead letter are never taken for
/// duplicates of the ones before the replay.
pub fn lineage(
    incarnation: &Incarnation,
    placement: Placement,
    replayed_at: Option<OffsetDateTime>,
) -> String {
    let mut name = format!(
        "{}-{}-{}",
        incarnation.label(),
        placement.sequence,
        placement.published.unix_timestamp_nanos()
    );
    if let Some(at) = replayed_at {
        name.push_str(&format!("-replayed-{}", at.unix_timestamp_nanos()));
    }
    name
}

/// A fresh copy of a job: its payload, where it goes, and what it carries.
pub struct FreshCopy {
    pub subject: String,
    pub payload: Bytes,
    pub placement: Placement,
    pub carried: Carried,
    /// Names the copy for the duplicate window: the same from every process
    /// that makes it, so a repeat (after a lost publish ack) is dropped.
    pub message_id: String,
}

/// Publishes a fresh copy of a job that keeps its placement and carries its
/// counts. Returns false when the stream dropped it as a duplicate: a copy
/// of that name was published within the duplicate window.
pub async fn publish_copy(js: &Context, copy: FreshCopy) -> Result<bool, String> {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", copy.message_id.as_str());
    copy.placement.write(&mut h);
    let c = copy.carried;
    h.insert(FAILED_ATTEMPTS, c.failures.to_string().as_str());
    h.insert(EARLIER_DELIVERIES, c.deliveries.to_string().as_str());
    if let Some(at) = c.retry_at {
        h.insert(RETRY_AT, nanos(at).as_str());
    }
    if let Some(since) = c.waiting_since {
        h.insert(WAITING_SINCE, nanos(since).as_str());
    }
    if let Some(event) = c.praefect_event {
        h.insert(PRAEFECT_EVENT, event.to_string().as_str());
    }
    if let Some(at) = c.replayed_at {
        h.insert(REPLAYED_AT, nanos(at).as_str());
    }
    let acked = js
        .publish_with_headers(copy.subject, h, copy.payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(!acked.duplicate)
}

/// Publishes a fresh copy of a job out of server deliveries, or released
/// on its last one: same counts, the deliveries of this copy added.
#[allow(clippy::too_many_arguments)]
pub async fn requeue(
    js: &Context,
    incarnation: &Incarnation,
    subject: String,
    payload: Bytes,
    placement: Placement,
    carried: Carried,
    message_sequence: u64,
    deliveries: u64,
) -> Result<(), String> {
    publish_copy(
        js,
        FreshCopy {
            subject,
            payload,
            placement,
            carried: Carried {
                deliveries: carried.deliveries.saturating_add(deliveries),
                ..carried
            },
            message_id: format!(
                "requeue-{}-{message_sequence}-{deliveries}",
                incarnation.label()
            ),
        },
    )
    .await
    .map(|_| ())
}

/// Requeues a message read from the work stream (by sequence), keeping the
/// placement and counts it or its headers carry.
pub async fn requeue_stored(
    js: &Context,
    incarnation: &Incarnation,
    stored: &async_nats::jetstream::message::StreamMessage,
    deliveries: u64,
) -> Result<(), String> {
    let placement = Placement::of(
        Some(&stored.headers),
        stored.sequence,
        stored.time,
        incarnation,
    );
    requeue(
        js,
        incarnation,
        stored.subject.to_string(),
        stored.payload.clone(),
        placement,
        Carried::of(Some(&stored.headers)),
        stored.sequence,
        deliveries,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(sequence: &str, time: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ORDER_SEQUENCE, sequence);
        h.insert(ORDER_TIME, time);
        h
    }

    #[test]
    fn a_requeued_copy_keeps_its_original_place_but_can_never_move_ahead() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let earlier = now - time::Duration::minutes(5);
        let earlier_ns = earlier.unix_timestamp_nanos().to_string();
        let stream = Incarnation {
            stream: "W".into(),
            created: earlier - time::Duration::DAY,
        };
        assert_eq!(
            Placement::of(None, 42, now, &stream),
            Placement {
                sequence: 42,
                published: now
            }
        );
        assert_eq!(
            Placement::of(Some(&headers("7", &earlier_ns)), 42, now, &stream),
            Placement {
                sequence: 7,
                published: earlier
            }
        );
        // A copy from an earlier incarnation of the stream goes first.
        let rebuilt = Incarnation {
            stream: "W".into(),
            created: now - time::Duration::minutes(1),
        };
        assert_eq!(
            Placement::of(Some(&headers("7", &earlier_ns)), 42, now, &rebuilt),
            Placement {
                sequence: 0,
                published: earlier
            }
        );
        let later_ns = (now + time::Duration::minutes(5))
            .unix_timestamp_nanos()
            .to_string();
        for h in [
            headers("43", &later_ns),
            headers("999999999", "x"),
            headers("0", ""),
            headers("-1", "-99999999999999999999999999999"),
        ] {
            assert_eq!(
                Placement::of(Some(&h), 42, now, &stream),
                Placement {
                    sequence: 42,
                    published: now
                },
                "{h:?}"
            );
        }
    }

    #[test]
    fn a_copy_carries_its_failures_and_deliveries_and_waits_at_most_the_cap() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(Carried::of(None), Carried::default());
        let mut h = HeaderMap::new();
        h.insert(FAILED_ATTEMPTS, "2");
        h.insert(EARLIER_DELIVERIES, "5");
        let at = now + time::Duration::seconds(3);
        h.insert(RETRY_AT, nanos(at).as_str());
        let c = Carried::of(Some(&h));
        assert_eq!((c.failures, c.deliveries, c.retry_at), (2, 5, Some(at)));
        let cap = Duration::from_secs(60);
        assert_eq!(c.wait_left(now, cap), Some(Duration::from_secs(3)));
        assert_eq!(c.wait_left(at, cap), None);
        assert_eq!(
            c.wait_left(now, Duration::from_secs(1)),
            Some(Duration::from_secs(1))
        );
        let mut junk = HeaderMap::new();
        junk.insert(FAILED_ATTEMPTS, "-1");
        junk.insert(RETRY_AT, "soon");
        assert_eq!(Carried::of(Some(&junk)), Carried::default());
    }
}
