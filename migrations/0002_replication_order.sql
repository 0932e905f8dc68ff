-- Per-replica order of state-changing jobs (update, create, delete,
-- delete_replica, rename): the stream sequence of the newest one that took
-- effect on each (virtual storage, relative path, target storage). A job
-- older than that is superseded instead of applied, so a retried or late job
-- never undoes a newer one. `stream` names the work stream's incarnation
-- (name and creation time): sequences restart when a stream is recreated,
-- and a record of an earlier stream must not make new jobs look old.
CREATE TABLE IF NOT EXISTS replication_order (
    virtual_storage TEXT NOT NULL,
    relative_path   TEXT NOT NULL,
    target_storage  TEXT NOT NULL,
    stream          TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    PRIMARY KEY (virtual_storage, relative_path, target_storage)
);
