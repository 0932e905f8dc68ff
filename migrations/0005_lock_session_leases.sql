-- Leases and per-repository fencing of lock sessions.
--
-- Each session renews `lease_until` while it lives; a peer ends a session
-- whose lease ran out (`replication_end_lock_session`), and state-changing
-- writes check the lease of the session that granted their locks. `keys`
-- lists the repository lock keys the session holds, written in the statement
-- that takes or releases them: a session that is gone bars only these keys,
-- until its owner clears it or its lease runs out. `lease` is the length the
-- owner renews by. Rows of older versions have no lease and bar every key
-- for the old grace period, as they did.
ALTER TABLE replication_lock_sessions
    ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS lease INTERVAL,
    ADD COLUMN IF NOT EXISTS keys BIGINT[] NOT NULL DEFAULT '{}';

-- Ends a session's backend (and so frees its advisory locks). A backend of a
-- role the caller may not signal is left alone rather than failing the
-- statement that asks: that session's keys wait for their lease or owner.
CREATE OR REPLACE FUNCTION replication_end_lock_session(backend INT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    RETURN pg_terminate_backend(backend);
EXCEPTION WHEN insufficient_privilege THEN
    RETURN false;
END
$$;
