//! Background verification: each replica the store has at its repository's
//! generation is compared, at most once per `verification_interval`, with
//! the repository's primary by `CalculateChecksum` on both nodes. Equal:
//! recorded as verified. Different (or the replica is gone from disk):
//! logged and counted, its record dropped (it is missing now, as `dataloss`
//! shows) and an update published from the primary.

use super::{ReconcileError, Reconciler};
use crate::error_chain::display_error_chain;
use crate::event::{Change, Job};
use crate::gitaly::health::Health;
use crate::gitaly::{CallContext, CallErrorKind};
use crate::metrics::ReconcilerMetrics;
use crate::store::DueReplica;
use std::time::Duration;
use tonic::Code;

/// How long one checksum call may take.
const CHECKSUM_TIMEOUT: Duration = Duration::from_secs(60);

/// What one verification round found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerificationReport {
    pub verified: u64,
    /// Replicas found different from their source, each with an update
    /// published.
    pub mismatches: u64,
    /// Replicas that could not be compared (a node failed to answer).
    pub errors: u64,
    /// A virtual storage's pass has not reached its end: more replicas may
    /// be due.
    pub more_due: bool,
}

impl VerificationReport {
    pub fn add(&mut self, other: &VerificationReport) {
        self.verified += other.verified;
        self.mismatches += other.mismatches;
        self.errors += other.errors;
        self.more_due |= other.more_due;
    }
}

impl Reconciler {
    /// Compares the next `[background_verification] batch_size` due
    /// replicas of each virtual storage's pass with their sources.
    pub async fn verify_round(&mut self) -> Result<VerificationReport, ReconcileError> {
        let mut report = VerificationReport::default();
        let settings = &self.verification;
        for (vs, storages) in &self.storages {
            let healthy: Vec<String> = storages
                .iter()
                .filter(|s| {
                    self.nodes
                        .get(vs, s)
                        .is_some_and(|n| n.health() == Health::Healthy)
                })
                .cloned()
                .collect();
            if healthy.len() < 2 {
                continue;
            }
            let cursor = self.verification_cursors.entry(vs.clone()).or_default();
            let due = self
                .store
                .replicas_due_for_verification(
                    vs,
                    &healthy,
                    settings.verification_interval,
                    settings.batch_size,
                    cursor,
                )
                .await?;
            report.more_due |= !cursor.at_start();
            for replica in &due {
                self.verify_one(vs, replica, &mut report).await?;
            }
        }
        Ok(report)
    }

    async fn verify_one(
        &self,
        vs: &str,
        replica: &DueReplica,
        report: &mut VerificationReport,
    ) -> Result<(), ReconcileError> {
        let (Some(source), Some(target)) = (
            self.nodes.get(vs, &replica.source),
            self.nodes.get(vs, &replica.target),
        ) else {
            return Ok(());
        };
        let ctx = CallContext::new(None, Some(CHECKSUM_TIMEOUT));
        let path = replica.disk_path();
        let expected = match source.checksum(path, &ctx).await {
            Ok(c) => c,
            Err(e) => {
                report.errors += 1;
                ReconcilerMetrics::verified(vs, &replica.target, "error", 1);
                tracing::warn!(virtual_storage = %vs, relative_path = %replica.relative_path, storage = %replica.source, error = display_error_chain(&e), "verification could not read the source's checksum; the replica is checked again next round");
                return Ok(());
            }
        };
        let found = match target.checksum(path, &ctx).await {
            Ok(c) => Some(c),
            // Nothing there, or not a repository: as different as can be.
            Err(e) if e.kind == CallErrorKind::NotFound || e.code == Code::DataLoss => None,
            Err(e) => {
                report.errors += 1;
                ReconcilerMetrics::verified(vs, &replica.target, "error", 1);
                tracing::warn!(virtual_storage = %vs, relative_path = %replica.relative_path, storage = %replica.target, error = display_error_chain(&e), "verification could not read the replica's checksum; it is checked again next round");
                return Ok(());
            }
        };
        if found.as_deref() == Some(expected.as_str()) {
            self.store.record_verification(replica, &expected).await?;
            report.verified += 1;
            ReconcilerMetrics::verified(vs, &replica.target, "verified", 1);
            tracing::debug!(virtual_storage = %vs, relative_path = %replica.relative_path, storage = %replica.target, checksum = %expected, "replica verified");
            return Ok(());
        }
        report.mismatches += 1;
        ReconcilerMetrics::verified(vs, &replica.target, "mismatch", 1);
        let found = found.unwrap_or_else(|| "none (no repository)".to_owned());
        tracing::warn!(
            virtual_storage = %vs,
            relative_path = %replica.relative_path,
            repository_id = replica.repository_id,
            source_storage = %replica.source,
            target_storage = %replica.target,
            generation = replica.generation,
            source_checksum = %expected,
            target_checksum = %found,
            "replica differs from its source: its record is dropped and an update scheduled"
        );
        if !self.store.drop_differing_replica(replica).await? {
            // Written since it was read: the next round looks again.
            return Ok(());
        }
        let correlation_id = format!("verify-{}", uuid::Uuid::new_v4());
        let job = Job {
            change: Change::Update,
            virtual_storage: vs.to_owned(),
            relative_path: replica.relative_path.clone(),
            target_node_storage: replica.target.clone(),
            source_node_storage: Some(replica.source.clone()),
            correlation_id: Some(correlation_id),
            created_at: None,
            repository_id: Some(replica.repository_id),
            replica_path: replica.replica_path.clone(),
        };
        let message_id = format!(
            "verify:update:{vs}:{}:{}:{}:{found}",
            replica.repository_id, replica.target, replica.generation
        );
        self.publisher
            .publish(&job, Some(&message_id))
            .await
            .map_err(|source| ReconcileError::Publish {
                relative_path: replica.relative_path.clone(),
                target: replica.target.clone(),
                source,
            })?;
        Ok(())
    }
}
