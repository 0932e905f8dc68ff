//! Publishing jobs: validated against the configured storages, each with one
//! `Nats-Msg-Id` per logical publish (reused when a timed-out publish is
//! retried, so the stream drops the repeat), and acknowledged by the stream
//! before it counts as sent. A full stream is an error, never a silent drop.

use crate::event::Job;
use crate::queue::layout::Layout;
use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use futures::stream::{FuturesOrdered, StreamExt};
use time::OffsetDateTime;

/// Why a job was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the work stream is full ({0}); nothing was dropped, retry when it drains or raise nats.max_bytes"
    )]
    StreamFull(String),
    #[error("no stream acknowledged the publish to {subject}: {message}")]
    NoStream { subject: String, message: String },
    #[error("publish not acknowledged after {attempts} attempts: {message}")]
    Timeout { attempts: u32, message: String },
    #[error("publish failed: {0}")]
    Other(String),
}

/// Where a published job landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    pub duplicate: bool,
    pub message_id: String,
    pub subject: String,
}

/// Publishes jobs for the targets of one layout.
#[derive(Clone)]
pub struct Publisher {
    js: Context,
    layout: Layout,
    /// Times a publish is retried (same message id) after a timeout.
    retries: u32,
}

fn classify(subject: &str, e: async_nats::jetstream::context::PublishError) -> PublishError {
    let text = e.to_string();
    match e.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => PublishError::Timeout {
            attempts: 1,
            message: text,
        },
        PublishErrorKind::StreamNotFound => PublishError::NoStream {
            subject: subject.to_owned(),
            message: text,
        },
        // The server reports a discard-new limit as "maximum bytes/messages exceeded".
        _ if text.contains("maximum") && text.contains("exceeded") => {
            PublishError::StreamFull(text)
        }
        _ => PublishError::Other(text),
    }
}

impl Publisher {
    pub fn new(js: Context, layout: Layout) -> Publisher {
        Publisher {
            js,
            layout,
            retries: 3,
        }
    }

    /// Checks that the job's storages are configured, so no job is published
    /// where no consumer will ever read it.
    pub fn check(&self, job: &Job) -> Result<String, PublishError> {
        let consumer = self
            .layout
            .consumer(&job.virtual_storage, &job.target_node_storage)
            .ok_or_else(|| {
                PublishError::Invalid(format!(
                    "target_node_storage {:?} is not a configured storage of virtual storage {:?}",
                    job.target_node_storage, job.virtual_storage
                ))
            })?;
        if let Some(source) = &job.source_node_storage
            && self.layout.consumer(&job.virtual_storage, source).is_none()
        {
            return Err(PublishError::Invalid(format!(
                "source_node_storage {source:?} is not a configured storage of virtual storage {:?}",
                job.virtual_storage
            )));
        }
        Ok(consumer.filter_subject.clone())
    }

    fn message(job: &Job, message_id: &str) -> (HeaderMap, bytes::Bytes) {
        let mut job = job.clone();
        // Completion dedup compares creation times; give every job one.
        if job.created_at.is_none() {
            job.created_at = Some(OffsetDateTime::now_utc());
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id);
        (headers, job.to_json().into())
    }

    async fn send(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<PublishAckFuture, PublishError> {
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|e| classify(subject, e))
    }

    /// Publishes one job and waits for the stream's ack. `message_id` is the
    /// caller's idempotency key; a fresh UUID when `None`.
    pub async fn publish(
        &self,
        job: &Job,
        message_id: Option<&str>,
    ) -> Result<Published, PublishError> {
        let subject = self.check(job)?;
        let message_id = message_id
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let (headers, payload) = Self::message(job, &message_id);
        let mut last = String::new();
        for _ in 0..=self.retries {
            let ack = self
                .send(&subject, headers.clone(), payload.clone())
                .await?
                .await;
            match ack {
                Ok(a) => {
                    return Ok(Published {
                        sequence: a.sequence,
                        duplicate: a.duplicate,
                        message_id,
                        subject,
                    });
                }
                Err(e) => match classify(&subject, e) {
                    PublishError::Timeout { message, .. } => last = message,
                    other => return Err(other),
                },
            }
        }
        Err(PublishError::Timeout {
            attempts: self.retries + 1,
            message: last,
        })
    }

    /// Publishes many jobs with up to `window` acks outstanding; results come
    /// back in input order. Timed-out ones are retried with their message id.
    pub async fn publish_many(
        &self,
        jobs: &[Job],
        window: usize,
    ) -> Vec<Result<Published, PublishError>> {
        let mut results: Vec<Option<Result<Published, PublishError>>> =
            (0..jobs.len()).map(|_| None).collect();
        let mut pending = FuturesOrdered::new();
        let mut retry = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let subject = match self.check(job) {
                Ok(s) => s,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let id = uuid::Uuid::new_v4().to_string();
            let (headers, payload) = Self::message(job, &id);
            match self.send(&subject, headers, payload).await {
                Ok(f) => pending.push_back(async move { (i, id, subject, f.await) }),
                Err(e) => results[i] = Some(Err(e)),
            }
            while pending.len() >= window.max(1) {
                if let Some((i, id, subject, r)) = pending.next().await {
                    settle(&mut results, &mut retry, i, id, subject, r);
                }
            }
        }
        while let Some((i, id, subject, r)) = pending.next().await {
            settle(&mut results, &mut retry, i, id, subject, r);
        }
        for (i, id) in retry {
            results[i] = Some(self.publish(&jobs[i], Some(&id)).await);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PublishError::Other("not attempted".into()))))
            .collect()
    }
}

fn settle(
    results: &mut [Option<Result<Published, PublishError>>],
    retry: &mut Vec<(usize, String)>,
    i: usize,
    id: String,
    subject: String,
    r: Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >,
) {
    match r {
        Ok(a) => {
            results[i] = Some(Ok(Published {
                sequence: a.sequence,
                duplicate: a.duplicate,
                message_id: id,
                subject,
            }))
        }
        Err(e) => match classify(&subject, e) {
            PublishError::Timeout { .. } => retry.push((i, id)),
            other => results[i] = Some(Err(other)),
        },
    }
}
