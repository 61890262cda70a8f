-- OpenAI Files and Batches. Times are milliseconds since the Unix epoch (UTC).
-- A batch's lines are rows of `jobs` (batch_id, custom_id); these tables hold only the
-- batch itself and the uploaded/produced files.
CREATE TABLE files (
    id         TEXT PRIMARY KEY NOT NULL,  -- file-…
    caller     TEXT NOT NULL DEFAULT '',   -- hash of the owner's key, '' without auth
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,              -- batch | batch_output
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content    BLOB NOT NULL
);
CREATE INDEX files_caller ON files (caller, id);

CREATE TABLE batches (
    id                TEXT PRIMARY KEY NOT NULL,  -- batch_… (time-ordered: lists sort by id)
    caller            TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL,              -- validating | in_progress | finalizing | completed | failed | cancelling | cancelled | expired
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata          TEXT,                       -- JSON object
    errors            TEXT,                       -- JSON array of validation errors
    total             INTEGER NOT NULL DEFAULT 0,
    completed         INTEGER NOT NULL DEFAULT 0, -- final counts, written when the batch ends
    failed            INTEGER NOT NULL DEFAULT 0,
    output_file_id    TEXT,
    error_file_id     TEXT,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    in_progress_at    INTEGER,
    finalizing_at     INTEGER,
    completed_at      INTEGER,
    failed_at         INTEGER,
    expired_at        INTEGER,
    cancelling_at     INTEGER,
    cancelled_at      INTEGER
);
CREATE INDEX batches_caller ON batches (caller, id);
-- The finalizer's scan: batches that are not finished yet.
CREATE INDEX batches_active ON batches (status) WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
