-- Postgres twin of migrations/sqlite/0002_batches.sql (same columns, same meaning).
-- No foreign key to `jobs`: that table comes from the queue migration (0001).
-- OpenAI Files and Batches. Times are milliseconds since the Unix epoch (UTC).
-- A batch's lines are rows of `jobs` (batch_id, custom_id); these tables hold only the
-- batch itself and the uploaded/produced files.
CREATE TABLE files (
    id         TEXT PRIMARY KEY NOT NULL,  -- file-…
    caller     TEXT NOT NULL DEFAULT '',   -- hash of the owner's key, '' without auth
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,              -- batch | batch_output
    bytes      BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    content    BYTEA NOT NULL
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
    total             BIGINT NOT NULL DEFAULT 0,
    completed         BIGINT NOT NULL DEFAULT 0, -- final counts, written when the batch ends
    failed            BIGINT NOT NULL DEFAULT 0,
    output_file_id    TEXT,
    error_file_id     TEXT,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    in_progress_at    BIGINT,
    finalizing_at     BIGINT,
    completed_at      BIGINT,
    failed_at         BIGINT,
    expired_at        BIGINT,
    cancelling_at     BIGINT,
    cancelled_at      BIGINT
);
CREATE INDEX batches_caller ON batches (caller, id);
-- The finalizer's scan: batches that are not finished yet.
CREATE INDEX batches_active ON batches (status) WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
