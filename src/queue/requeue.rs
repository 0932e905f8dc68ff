//! The one way a job goes back to the work stream as a fresh message (out of
//! server deliveries but not of attempts, or released on the last delivery at
//! shutdown), and how a job's place in its replica's order survives that.
//!
//! A requeued copy gets a new stream sequence and timestamp. Order and dedup
//! judge a job by when it was first published, so the copy carries its
//! original sequence and time in headers. A header is honoured only when it
//! makes the job older than its own message, never newer: a publisher cannot
//! use it to jump ahead of jobs published after it.

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use bytes::Bytes;
use time::OffsetDateTime;

/// The original stream sequence of a requeued job.
pub const ORDER_SEQUENCE: &str = "Gitaly-Replicator-Order-Sequence";
/// The original stream time of a requeued job (Unix nanoseconds).
pub const ORDER_TIME: &str = "Gitaly-Replicator-Order-Time";

/// Where a job stands among the jobs of its replica: its first publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub sequence: u64,
    pub published: OffsetDateTime,
}

impl Placement {
    /// The placement of a delivered message: its own sequence and time, or
    /// the earlier ones its headers carry from the copy it was requeued from.
    pub fn of(headers: Option<&HeaderMap>, sequence: u64, published: OffsetDateTime) -> Self {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let original_sequence = header(ORDER_SEQUENCE)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0 && *s <= sequence);
        let original_time = header(ORDER_TIME)
            .and_then(|v| v.parse::<i128>().ok())
            .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
            .filter(|t| *t <= published);
        Placement {
            sequence: original_sequence.unwrap_or(sequence),
            published: original_time.unwrap_or(published),
        }
    }
}

/// Publishes a fresh copy of a job that keeps its placement. The message id
/// makes a repeat of the same requeue (after a lost publish ack) a duplicate
/// JetStream drops.
pub async fn requeue(
    js: &Context,
    stream: &str,
    subject: String,
    payload: Bytes,
    placement: Placement,
    message_sequence: u64,
    deliveries: u64,
) -> Result<(), String> {
    let mut h = HeaderMap::new();
    h.insert(
        "Nats-Msg-Id",
        format!("requeue-{stream}-{message_sequence}-{deliveries}").as_str(),
    );
    h.insert(ORDER_SEQUENCE, placement.sequence.to_string().as_str());
    h.insert(
        ORDER_TIME,
        placement
            .published
            .unix_timestamp_nanos()
            .to_string()
            .as_str(),
    );
    js.publish_with_headers(subject, h, payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Requeues a message read from the work stream (by sequence), keeping the
/// placement it or its headers carry.
pub async fn requeue_stored(
    js: &Context,
    stream: &str,
    stored: &async_nats::jetstream::message::StreamMessage,
    deliveries: u64,
) -> Result<(), String> {
    let placement = Placement::of(Some(&stored.headers), stored.sequence, stored.time);
    requeue(
        js,
        stream,
        stored.subject.to_string(),
        stored.payload.clone(),
        placement,
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
        assert_eq!(
            Placement::of(None, 42, now),
            Placement {
                sequence: 42,
                published: now
            }
        );
        assert_eq!(
            Placement::of(Some(&headers("7", &earlier_ns)), 42, now),
            Placement {
                sequence: 7,
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
                Placement::of(Some(&h), 42, now),
                Placement {
                    sequence: 42,
                    published: now
                },
                "{h:?}"
            );
        }
    }
}
