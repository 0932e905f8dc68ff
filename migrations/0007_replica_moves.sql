-- Renames whose Gitaly call may have moved the directory before their
-- record was written. A rename records its move here before it calls
-- RenameRepository and clears it in the statement that writes the rename.
-- While a move is listed, a replica that answers "no such repository" as a
-- replication source is not dropped as invalid: the repository is at the new
-- path, and dropping the row would lose the replica's generation when the
-- rename is recorded.
CREATE TABLE IF NOT EXISTS replica_moves (
    virtual_storage TEXT NOT NULL,
    relative_path TEXT NOT NULL,
    storage TEXT NOT NULL,
    new_relative_path TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (virtual_storage, relative_path, storage)
);
