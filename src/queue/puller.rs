//! JetStream's pull protocol for one durable consumer, on one long-lived
//! inbox subscription: a pull request waits on the server until jobs arrive
//! or it expires (long-poll), idle heartbeats prove it is alive, and a request
//! that goes quiet for two heartbeats is renewed.
//!
//! Written on core NATS rather than async-nats' `fetch`/`batch` because those
//! subscribe anew for every request and do not watch heartbeats.

use async_nats::jetstream;
use async_nats::{StatusCode, Subscriber};
use futures::{FutureExt, StreamExt};
use std::time::Duration;
use tokio::time::Instant;

/// Why pulling stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("subscribing to the pull inbox failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("sending the pull request failed: {0}")]
    Request(#[from] async_nats::PublishError),
    #[error("the NATS connection closed")]
    Closed,
}

/// What one step of pulling produced.
#[derive(Debug)]
pub enum Pulled {
    /// Jobs that arrived together (at most the request's batch).
    Messages(Vec<jetstream::Message>),
    /// The request ended (filled, expired, or refused by the server with the
    /// given reason); the caller decides when to ask again.
    RequestDone(Option<String>),
    /// Nothing arrived and no heartbeat came for too long: the request was
    /// abandoned and must be renewed.
    Stalled,
}

/// Pulls from one durable consumer.
pub struct Puller {
    client: async_nats::Client,
    context: jetstream::Context,
    subject: String,
    inbox: String,
    subscriber: Subscriber,
    expires: Duration,
    heartbeat: Duration,
    request_id: u64,
    outstanding: usize,
    last_activity: Instant,
    active: bool,
}

impl Puller {
    pub async fn new(
        client: async_nats::Client,
        context: jetstream::Context,
        stream: &str,
        consumer: &str,
        expires: Duration,
    ) -> Result<Puller, PullError> {
        let inbox = client.new_inbox();
        let subscriber = client.subscribe(format!("{inbox}.*")).await?;
        let expires = expires.max(Duration::from_millis(200));
        Ok(Puller {
            client,
            context,
            subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            inbox,
            subscriber,
            expires,
            heartbeat: (expires / 2).min(Duration::from_secs(5)),
            request_id: 0,
            outstanding: 0,
            last_activity: Instant::now(),
            active: false,
        })
    }

    /// Whether a request is open on the server.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Opens a long-poll request for up to `batch` messages.
    pub async fn request(&mut self, batch: usize) -> Result<(), PullError> {
        self.request_id += 1;
        let body = serde_json::json!({
            "batch": batch,
            "expires": self.expires.as_nanos() as u64,
            "idle_heartbeat": self.heartbeat.as_nanos() as u64,
        });
        self.client
            .publish_with_reply(
                self.subject.clone(),
                format!("{}.{}", self.inbox, self.request_id),
                body.to_string().into(),
            )
            .await?;
        self.outstanding = batch;
        self.active = true;
        self.last_activity = Instant::now();
        Ok(())
    }

    fn current_reply(&self) -> String {
        format!("{}.{}", self.inbox, self.request_id)
    }

    /// Waits for the next step. Cancel-safe: dropping the future loses nothing
    /// that was not yet returned.
    pub async fn next(&mut self) -> Result<Pulled, PullError> {
        // A request with no sign of life for two heartbeats (plus the expiry
        // margin the server is allowed) is treated as lost.
        let stall_after = self.heartbeat * 2 + Duration::from_secs(1);
        loop {
            let deadline = self.last_activity + stall_after;
            let msg = tokio::select! {
                m = self.subscriber.next() => m.ok_or(PullError::Closed)?,
                _ = tokio::time::sleep_until(deadline), if self.active => {
                    self.active = false;
                    return Ok(Pulled::Stalled);
                }
            };
            let current = msg.subject.as_str() == self.current_reply();
            match msg.status {
                None | Some(StatusCode::OK) => {
                    let mut batch = vec![jetstream::Message {
                        message: msg,
                        context: self.context.clone(),
                    }];
                    // Take what else already arrived, so jobs that came together
                    // are handled together (collapse of identical updates).
                    while batch.len() < self.outstanding.max(1) {
                        match self.subscriber.next().now_or_never() {
                            Some(Some(m)) if m.status.is_none() => batch.push(jetstream::Message {
                                message: m,
                                context: self.context.clone(),
                            }),
                            // A status in the middle: leave it for the next call.
                            Some(Some(m)) => {
                                self.handle_status(&m);
                                break;
                            }
                            _ => break,
                        }
                    }
                    self.last_activity = Instant::now();
                    self.outstanding = self.outstanding.saturating_sub(batch.len());
                    if self.outstanding == 0 {
                        self.active = false;
                    }
                    return Ok(Pulled::Messages(batch));
                }
                Some(_) if !current => continue, // a late status for an old request
                Some(_) => {
                    if let Some(done) = self.handle_status(&msg) {
                        return Ok(done);
                    }
                }
            }
        }
    }

    /// Returns `Some` when the status ends the current request.
    fn handle_status(&mut self, msg: &async_nats::Message) -> Option<Pulled> {
        if msg.subject.as_str() != self.current_reply() {
            return None;
        }
        match msg.status {
            Some(StatusCode::IDLE_HEARTBEAT) => {
                self.last_activity = Instant::now();
                None
            }
            Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                self.active = false;
                Some(Pulled::RequestDone(None))
            }
            Some(other) => {
                self.active = false;
                Some(Pulled::RequestDone(Some(format!(
                    "{other}: {}",
                    msg.description.as_deref().unwrap_or("")
                ))))
            }
            None => None,
        }
    }

    /// Stops pulling and returns messages that already arrived but were not
    /// handed out, so the caller can release them at once.
    pub async fn close(mut self) -> Vec<jetstream::Message> {
        let _ = self.subscriber.unsubscribe().await;
        let mut left = Vec::new();
        while let Some(Some(m)) = self.subscriber.next().now_or_never() {
            if m.status.is_none() {
                left.push(jetstream::Message {
                    message: m,
                    context: self.context.clone(),
                });
            }
        }
        left
    }
}
