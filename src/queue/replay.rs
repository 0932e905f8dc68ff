//! What a replay of dead jobs will meet: a replayed job keeps its place in
//! its replica's order, so one that a later job of its replica superseded
//! (an update after which the replica was deleted) is skipped as out of
//! order when it runs. `dead replay` counts those beforehand and says so.

use crate::event::{Change, Job};
use crate::queue::dead_letter::DeadMessage;
use crate::queue::incarnation::Incarnation;
use crate::store::{RepositoryStore, Standing, StoreError, WriteOrder};

/// Whether the consumer will skip the replay of `message` (a job of the
/// work stream's `incarnation`, or of an earlier one) because a later job of
/// its replica already took effect, or its repository was created again.
/// Jobs that keep no order (maintenance), and dead letters that do not
/// record their place, are never superseded.
pub async fn superseded(
    store: &RepositoryStore,
    incarnation: &Incarnation,
    message: &DeadMessage,
) -> Result<bool, StoreError> {
    let Ok(job) = Job::from_json(&message.payload) else {
        return Ok(false);
    };
    let Some(placement) = message.placement() else {
        return Ok(false);
    };
    if !job.change_type().changes_state() {
        return Ok(false);
    }
    // A job of an earlier stream goes before every job of this one.
    let sequence = if incarnation.predates(placement.published) {
        0
    } else {
        i64::try_from(placement.sequence).unwrap_or(i64::MAX)
    };
    let (vs, rel, target) = job.repository_key();
    let mut keys = vec![(vs, rel, target)];
    if let Change::Rename { new_relative_path } = &job.change {
        keys.push((vs, new_relative_path.as_str(), target));
    }
    let order = WriteOrder {
        stream: incarnation.label(),
        sequence,
        lock_session: None,
        repository_id: job.repository_id,
    };
    let standing = store.standing_in_order(&keys, &order).await?;
    Ok(standing.iter().any(|s| *s != Standing::Current))
}
