//! The service's integration tests, one binary: each module is one concern,
//! run against the real NATS and Postgres (shared, with names of the test's
//! own) or private ones where a test stops them.

mod common;

mod broker_restart;
mod chaos;
mod cli;
mod config;
mod consumer;
mod dataloss;
mod dependencies;
mod deploy;
mod e2e;
mod event_contract;
mod fleet;
mod malformed;
mod mixed_load;
mod ops;
mod ordering;
mod pgbouncer;
mod postgres_tls;
mod praefect_capture;
mod praefect_capture_nodes;
mod praefect_config;
mod praefect_jobs;
mod praefect_schema;
mod process;
mod promises;
mod reconciler;
mod replica_ids;
mod retention;
mod secrets;
mod secure;
mod stream_identity;
mod waiting;
