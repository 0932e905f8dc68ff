-- Praefect's replication_queue, captured (opt-in: `gitaly-replicator
-- praefect-queue capture` installs the triggers; this only makes the table).
--
-- Each event Praefect inserts while the capture is installed is copied here
-- in the same transaction, so nothing Praefect later does to its own table
-- loses it. `published_at` is set once the work stream took the event; the
-- row goes when the consumer settles the event (or at release).
CREATE TABLE IF NOT EXISTS replication_captured_events (
    event_id     BIGINT PRIMARY KEY,
    job          JSONB NOT NULL,
    meta         JSONB,
    created_at   TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    captured_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS replication_captured_events_unpublished
    ON replication_captured_events (event_id) WHERE published_at IS NULL;
