//! JetStream: the layout and its names, publishing, pulling, the consumer
//! loop, and the dead-letter stream.

pub mod ack;
pub mod acknowledger;
pub mod advisories;
pub mod connect;
pub mod consumer;
pub mod dead_letter;
pub mod depth;
mod dispatch;
pub mod incarnation;
mod job;
pub mod layout;
pub mod leftovers;
pub mod names;
mod open_groups;
pub mod order_pruning;
pub mod pending;
pub mod praefect_capture;
pub mod publisher;
pub mod puller;
pub mod replay;
pub mod requeue;
pub mod waiting;
