-- Per-replica order of state-changing jobs that name their repository_id,
-- keyed by that id: a repository's relative path changes when Praefect
-- renames it in its store (15.x), so jobs published before and after the
-- rename name different paths, while the id stays. A re-created repository
-- gets a new id (its predecessor's jobs are stale). No foreign key: the
-- record must outlive a deleted repository, so that its older jobs stay
-- superseded. `stream` as in `replication_order`.
CREATE TABLE IF NOT EXISTS replication_order_by_repository (
    repository_id  BIGINT NOT NULL,
    target_storage TEXT NOT NULL,
    stream         TEXT NOT NULL,
    sequence       BIGINT NOT NULL,
    PRIMARY KEY (repository_id, target_storage)
);
