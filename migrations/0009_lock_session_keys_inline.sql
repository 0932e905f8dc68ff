-- A lock session's key list is rewritten by every lock statement it sends.
-- Past about 2 kB (some 250 keys) Postgres would compress it and move it to
-- the TOAST table on each rewrite; kept inline up to a page, it is written
-- as it is.
ALTER TABLE replication_lock_sessions SET (toast_tuple_target = 8160);
