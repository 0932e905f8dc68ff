-- Whether the publisher of captured events waits for a notification. The
-- capture's trigger notifies only while it does: Postgres serializes the
-- commits of every transaction that sent a notification (each holds a
-- database-wide lock through its WAL flush), which cut Praefect's Enqueue
-- rate about fivefold when every insert notified. While events keep coming
-- the publisher polls instead and clears the flag.
CREATE TABLE IF NOT EXISTS replication_capture_wakeup (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    waiting  BOOLEAN NOT NULL DEFAULT TRUE
);
INSERT INTO replication_capture_wakeup DEFAULT VALUES ON CONFLICT DO NOTHING;
