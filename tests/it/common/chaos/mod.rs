//! The parts of the fault suite (`tests/it/chaos.rs`): its settings, the
//! broker, the consumer processes, the writer and its model of what every
//! replica must end as, the faults, the evidence in the consumers' logs, the
//! final check and the summary.

pub mod broker;
pub mod check;
pub mod evidence;
pub mod faults;
pub mod fleet;
pub mod model;
pub mod settings;
pub mod summary;
pub mod writer;
