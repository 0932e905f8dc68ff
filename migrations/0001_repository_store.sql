-- Praefect's repository store, and our completion record.
--
-- The two Praefect tables are created only when missing, so the replicator
-- also runs on a database that Praefect created (and may have extended with
-- columns of its own); their shape matches Praefect's.

-- One row per repository of a virtual storage; `generation` is the newest
-- generation any replica holds (NULL until one is known).
CREATE TABLE IF NOT EXISTS repositories (
    repository_id   BIGSERIAL PRIMARY KEY,
    virtual_storage TEXT NOT NULL,
    relative_path   TEXT NOT NULL,
    generation      BIGINT,
    "primary"       TEXT,
    replica_path    TEXT,
    UNIQUE (virtual_storage, relative_path)
);

-- One row per replica: the generation the storage holds.
CREATE TABLE IF NOT EXISTS storage_repositories (
    repository_id   BIGINT REFERENCES repositories ON DELETE CASCADE,
    virtual_storage TEXT NOT NULL,
    relative_path   TEXT NOT NULL,
    storage         TEXT NOT NULL,
    generation      BIGINT NOT NULL,
    PRIMARY KEY (virtual_storage, relative_path, storage),
    UNIQUE (repository_id, storage)
);

-- Completion dedup across processes: the latest start time of a completed
-- job per (repository, target, change type, source). A job created before
-- that time is superseded. `source_storage` is '' for jobs without a source,
-- so the primary key can include it.
CREATE TABLE IF NOT EXISTS replication_completions (
    virtual_storage TEXT NOT NULL,
    relative_path   TEXT NOT NULL,
    target_storage  TEXT NOT NULL,
    change_type     TEXT NOT NULL,
    source_storage  TEXT NOT NULL DEFAULT '',
    started_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (virtual_storage, relative_path, target_storage, change_type, source_storage)
);
