-- Replicas whose checksum was found equal to their source's, and when: the
-- background verification checks again those not verified within its
-- interval. Ours, beside Praefect's tables; gone with the repository.
CREATE TABLE IF NOT EXISTS replica_verifications (
    repository_id BIGINT NOT NULL REFERENCES repositories (repository_id) ON DELETE CASCADE,
    storage TEXT NOT NULL,
    generation BIGINT NOT NULL,
    checksum TEXT NOT NULL,
    verified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (repository_id, storage)
);
