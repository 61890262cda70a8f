-- The durable queue, shared by every instance. Times are milliseconds since the Unix
-- epoch (UTC) by the database's clock where the database decides (leases, windows).
-- Same tables and columns as migrations/sqlite: one row decoding serves both backends.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL,
    task             TEXT NOT NULL,
    status           TEXT NOT NULL,             -- queued | running | succeeded | failed | cancelled
    priority         BIGINT NOT NULL DEFAULT 0, -- lower is leased first (interactive 0, batch 10)
    chain            TEXT NOT NULL,             -- JSON array of provider names
    hop              BIGINT NOT NULL DEFAULT 0, -- index into chain
    hops             BIGINT NOT NULL DEFAULT 0, -- moves to another provider so far
    provider         TEXT NOT NULL,             -- chain[hop]
    request          TEXT NOT NULL,             -- OpenAI request body, defaults applied
    stream           BIGINT NOT NULL DEFAULT 0,
    caller           TEXT NOT NULL DEFAULT '',  -- hash of the caller's key, '' without auth
    idempotency_key  TEXT,
    pinned_instance  TEXT,                      -- only this instance may lease (streams)
    run_at           BIGINT NOT NULL,
    deadline_at      BIGINT NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    hop_tries        BIGINT NOT NULL DEFAULT 0,
    attempt_count    BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    status_code      BIGINT,
    result           TEXT,
    error            TEXT,
    usage_prompt     BIGINT,
    usage_completion BIGINT,
    batch_id         TEXT,
    custom_id        TEXT,
    finished_by      TEXT,
    metrics_written  BIGINT NOT NULL DEFAULT 0 -- 1 once its JSONL line is on disk
);

-- The lease query: oldest due job of one provider, interactive first.
CREATE INDEX jobs_lease ON jobs (provider, priority, run_at) WHERE status = 'queued';
-- Concurrency counts (per provider) and the rescuer (expired leases of any provider).
CREATE INDEX jobs_running ON jobs (provider, lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_running_expiry ON jobs (lease_expires_at) WHERE status = 'running';
CREATE UNIQUE INDEX jobs_idempotency ON jobs (caller, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;
-- Finished jobs whose metrics line is not confirmed on disk (written after a crash).
CREATE INDEX jobs_metrics_pending ON jobs (finished_at) WHERE metrics_written = 0 AND finished_at IS NOT NULL;

CREATE TABLE attempts (
    job_id      TEXT NOT NULL,
    n           BIGINT NOT NULL,
    provider    TEXT NOT NULL,
    model       TEXT NOT NULL,
    instance    TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    status_code BIGINT,
    outcome     TEXT NOT NULL,  -- running | ok | retry | hop | cooldown | failed | cancelled | lost | released
    error       TEXT,
    tokens      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, n)
);
-- rpm/tpm windows: call starts of one provider in the last 60 s.
-- rpm/tpm windows: call starts and tokens per provider and second (see src/queue/budget.rs).
CREATE TABLE provider_usage (
    provider TEXT NOT NULL,
    second   BIGINT NOT NULL,
    calls    BIGINT NOT NULL DEFAULT 0,
    tokens   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, second)
);

-- Shared provider state: cool-down after 429, circuit breaker. (Leases of one provider
-- are serialised across instances by a transaction-scoped advisory lock, not by this row,
-- so a provider gets a row only once something happened to it, as in SQLite.)
CREATE TABLE provider_state (
    provider             TEXT PRIMARY KEY NOT NULL,
    cooldown_until       BIGINT NOT NULL DEFAULT 0,
    consecutive_failures BIGINT NOT NULL DEFAULT 0,
    breaker_open_until   BIGINT NOT NULL DEFAULT 0
);

-- Instances that share the database, with their last heartbeat.
CREATE TABLE instances (
    id           TEXT PRIMARY KEY NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
