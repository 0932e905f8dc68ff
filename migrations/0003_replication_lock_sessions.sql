-- The Postgres sessions that hold processes' repository locks. When one ends
-- (its connection dropped, its backend terminated), Postgres frees its locks
-- at once, but the process may still be running jobs under them until it
-- notices. While such a session is listed and not yet cleared, no session
-- grants a new repository lock: its owner clears it once its jobs have
-- stopped, or anyone after a grace period (the owner may have died too).
CREATE TABLE IF NOT EXISTS replication_lock_sessions (
    pid           INT NOT NULL,
    backend_start TIMESTAMPTZ NOT NULL,
    -- When a session first saw it gone; the grace period runs from here.
    orphaned_at   TIMESTAMPTZ,
    PRIMARY KEY (pid, backend_start)
);
