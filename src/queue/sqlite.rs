//! The embedded SQLite store.
//!
//! One process owns the database file (an exclusive lock on `PATH.lock` enforces it:
//! several instances need Postgres). All writes go through one connection behind an async
//! mutex, so writers never fight over SQLite's lock and a lease is simply a transaction
//! on that connection; reads use a small pool and see committed data through WAL.
//!
//! Durability: WAL with `synchronous=NORMAL` (default) keeps every committed transaction
//! across a process crash (kill -9); `ORCH_SQLITE_SYNCHRONOUS=FULL` also survives power loss.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::Mutex;

use super::row::{
    AttemptRow, InstanceRow, JobRow, ProviderStateRow, cancelled_error, chain_json, error_json,
    interrupted_attempt_error, lease_estimate, orphaned_stream_error,
};
use super::*;
use crate::config::SqliteSync;
use crate::{attempt_columns, job_columns};

pub struct SqliteStore {
    pub(super) writer: Mutex<SqliteConnection>,
    pub(super) readers: SqlitePool,
    /// Held for the life of the store: the file lock that keeps a second process out
    /// (`None` for a reader opened beside a running gateway).
    _lock: Option<File>,
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl SqliteStore {
    /// Opens (creating the folder and file if needed), locks and migrates the database.
    pub async fn open(path: &Path, sync: SqliteSync) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Open(format!(
                    "cannot create database folder {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                StoreError::Open(format!(
                    "cannot open lock file {}: {e}",
                    lock_path.display()
                ))
            })?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Open(format!(
                "another llm-orch process already uses the SQLite database {} (SQLite serves one \
                 instance; to run several instances, point them all at Postgres with ORCH_DATABASE_URL)",
                path.display()
            )));
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| StoreError::Open(format!("bad SQLite path {}: {e}", path.display())))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                SqliteSync::Normal => SqliteSynchronous::Normal,
                SqliteSync::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(false);
        let mut writer = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| {
                StoreError::Open(format!(
                    "cannot open SQLite database {}: {e}",
                    path.display()
                ))
            })?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer: Mutex::new(writer),
            readers,
            _lock: Some(lock),
        })
    }

    /// Opens the database only to read it, for tools such as `metrics export`: when a
    /// gateway holds the file, this opens it read-only beside it (WAL lets readers in
    /// while it writes); when none does, it is an ordinary open.
    pub async fn open_for_reading(path: &Path, sync: SqliteSync) -> StoreResult<Self> {
        match Self::open(path, sync).await {
            Err(StoreError::Open(msg)) if msg.starts_with("another llm-orch process") => {}
            other => return other,
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| StoreError::Open(format!("bad SQLite path {}: {e}", path.display())))?
            .read_only(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| {
                StoreError::Open(format!(
                    "cannot open SQLite database {} to read: {e}",
                    path.display()
                ))
            })?;
        let readers = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        Ok(Self {
            writer: Mutex::new(writer),
            readers,
            _lock: None,
        })
    }

    async fn requeue_running(
        &self,
        owner: Option<&str>,
        expired_only: bool,
        outcome: AttemptOutcome,
    ) -> StoreResult<Vec<String>> {
        // The clock is read once the writer is ours: a wait for the lock must not age it.
        let mut conn = self.writer.lock().await;
        let now = now_ms();
        let mut tx = conn.begin().await?;
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT id, provider, pinned_instance FROM jobs WHERE status = 'running' \
             AND (?1 IS NULL OR lease_owner = ?1) AND (?2 = 0 OR lease_expires_at < ?3)",
        )
        .bind(owner)
        .bind(expired_only as i64)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut providers = Vec::new();
        for (id, provider, pinned) in rows {
            sqlx::query(
                "UPDATE attempts SET outcome = ?1, finished_at = ?2, error = ?3 WHERE job_id = ?4 AND outcome = 'running'",
            )
            .bind(outcome.as_str())
            .bind(now)
            .bind(interrupted_attempt_error(outcome))
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if pinned.is_some() {
                let err = orphaned_stream_error();
                sqlx::query(
                    "UPDATE jobs SET status = 'failed', finished_at = ?1, status_code = 502, error = ?2, \
                     lease_owner = NULL, lease_expires_at = NULL WHERE id = ?3",
                )
                .bind(now)
                .bind(error_json(&err))
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                continue;
            }
            // A released attempt never reached an answer through no fault of the job:
            // it does not count against max_retries.
            let give_back = (outcome == AttemptOutcome::Released) as i64;
            sqlx::query(
                "UPDATE jobs SET status = 'queued', run_at = ?1, lease_owner = NULL, lease_expires_at = NULL, \
                 hop_tries = MAX(hop_tries - ?2, 0) WHERE id = ?3",
            )
            .bind(now)
            .bind(give_back)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if !providers.contains(&provider) {
                providers.push(provider);
            }
        }
        tx.commit().await?;
        Ok(providers)
    }
}

#[async_trait]
impl QueueStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn now_ms(&self) -> StoreResult<i64> {
        Ok(now_ms())
    }

    fn batches(&self) -> Option<&dyn BatchStore> {
        Some(self)
    }

    async fn insert_job(&self, job: &NewJob) -> StoreResult<Inserted> {
        let mut conn = self.writer.lock().await;
        let inserted = insert(&mut conn, job).await?;
        if inserted {
            return Ok(Inserted::New);
        }
        let row: JobRow = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE caller = ?1 AND idempotency_key = ?2"
        ))
        .bind(job.caller.as_deref().unwrap_or(""))
        .bind(&job.idempotency_key)
        .fetch_one(&mut *conn)
        .await?;
        Ok(Inserted::Existing(Box::new(row.try_into()?)))
    }

    async fn insert_jobs(&self, jobs: &[NewJob]) -> StoreResult<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        for job in jobs {
            insert(&mut tx, job).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let row: Option<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.readers)
        .await?;
        row.map(Job::try_from).transpose()
    }

    async fn get_attempts(&self, id: &str) -> StoreResult<Vec<Attempt>> {
        let rows: Vec<AttemptRow> = sqlx::query_as(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM attempts WHERE job_id = ?1 ORDER BY n"
        ))
        .bind(id)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows.into_iter().map(Attempt::from).collect())
    }

    async fn lease(&self, req: &LeaseRequest) -> StoreResult<Lease> {
        // The clock is read once the writer is ours: a wait for the lock must not age it.
        let mut conn = self.writer.lock().await;
        let now = now_ms();
        let mut tx = conn.begin().await?;
        // Every budget input in one statement: one round trip to the SQLite thread.
        let (cooldown_until, breaker_open_until, running, calls, tokens, oldest_second): (i64, i64, i64, i64, i64, Option<i64>) =
            sqlx::query_as(
                "SELECT COALESCE((SELECT cooldown_until FROM provider_state WHERE provider = ?1), 0), \
                 COALESCE((SELECT breaker_open_until FROM provider_state WHERE provider = ?1), 0), \
                 (SELECT COUNT(*) FROM jobs WHERE provider = ?1 AND status = 'running'), \
                 (SELECT COALESCE(SUM(calls), 0) FROM provider_usage WHERE provider = ?1 AND second >= ?2), \
                 (SELECT COALESCE(SUM(tokens), 0) FROM provider_usage WHERE provider = ?1 AND second >= ?2), \
                 (SELECT MIN(second) FROM provider_usage WHERE provider = ?1 AND second >= ?2)",
            )
            .bind(&req.provider)
            .bind(budget::window_start_second(now))
            .fetch_one(&mut *tx)
            .await?;
        let usage = budget::Usage {
            cooldown_until,
            breaker_open_until,
            running,
            calls,
            tokens,
            oldest_second,
        };
        let limit = match budget::admit(&usage, &req.budget, now, req.max_jobs) {
            Ok(n) => n,
            Err(blocked) => {
                return Ok(Lease {
                    blocked: Some(blocked),
                    ..Lease::default()
                });
            }
        };
        let lease_until = now + req.lease_ms;
        // Pick, then mark each job. The LIMIT is a constant in the SQL text: SQLite plans
        // with a bound LIMIT's value and re-prepares the statement whenever it changes.
        // (One `UPDATE … WHERE id IN (SELECT …)` would save a statement, but is re-prepared
        // on every run for the same reason.)
        macro_rules! pick {
            ($limit:literal) => {
                concat!(
                    "SELECT id FROM jobs WHERE provider = ?1 AND status = 'queued' AND run_at <= ?2 \
                     AND (pinned_instance IS NULL OR pinned_instance = ?3) ORDER BY priority, run_at LIMIT ",
                    $limit
                )
            };
        }
        let sql = if limit == 1 { pick!("1") } else { pick!("64") };
        let mut ids: Vec<(String,)> = sqlx::query_as(sql)
            .bind(&req.provider)
            .bind(now)
            .bind(&req.instance)
            .fetch_all(&mut *tx)
            .await?;
        ids.truncate(usize::try_from(limit).unwrap_or(1));
        let mut rows: Vec<JobRow> = Vec::with_capacity(ids.len());
        for (id,) in &ids {
            let row: JobRow = sqlx::query_as(concat!(
                "UPDATE jobs SET status = 'running', lease_owner = ?1, lease_expires_at = ?2, \
                 started_at = COALESCE(started_at, ?3), attempt_count = attempt_count + 1, hop_tries = hop_tries + 1 \
                 WHERE id = ?4 RETURNING ",
                job_columns!()
            ))
            .bind(&req.instance)
            .bind(lease_until)
            .bind(now)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            rows.push(row);
        }
        if rows.is_empty() {
            let (next,): (Option<i64>,) = sqlx::query_as(
                "SELECT MIN(run_at) FROM jobs WHERE provider = ?1 AND status = 'queued' \
                 AND (pinned_instance IS NULL OR pinned_instance = ?2)",
            )
            .bind(&req.provider)
            .bind(&req.instance)
            .fetch_one(&mut *tx)
            .await?;
            return Ok(Lease {
                next_due_at: next,
                ..Lease::default()
            });
        }
        let mut jobs = Vec::with_capacity(rows.len());
        let mut estimated = 0;
        for row in rows {
            let job = Job::try_from(row)?;
            let estimate = lease_estimate(req, &job);
            estimated += estimate;
            sqlx::query(
                "INSERT INTO attempts (job_id, n, provider, model, instance, started_at, outcome, tokens) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)",
            )
            .bind(&job.id)
            .bind(job.attempt_count)
            .bind(&req.provider)
            .bind(&req.model)
            .bind(&req.instance)
            .bind(now)
            .bind(estimate)
            .execute(&mut *tx)
            .await?;
            let attempt_n = job.attempt_count;
            jobs.push(LeasedJob { job, attempt_n });
        }
        sqlx::query(
            "INSERT INTO provider_usage (provider, second, calls, tokens) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (provider, second) DO UPDATE SET calls = calls + excluded.calls, tokens = tokens + excluded.tokens",
        )
        .bind(&req.provider)
        .bind(budget::second_of(now))
        .bind(jobs.len() as i64)
        .bind(estimated)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Lease {
            jobs,
            ..Lease::default()
        })
    }

    async fn renew_lease(
        &self,
        job_id: &str,
        instance: &str,
        attempt_n: i64,
        lease_ms: i64,
    ) -> StoreResult<bool> {
        let mut conn = self.writer.lock().await;
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = ?1 WHERE id = ?2 AND status = 'running' AND lease_owner = ?3 \
             AND attempt_count = ?4",
        )
        .bind(now_ms() + lease_ms)
        .bind(job_id)
        .bind(instance)
        .bind(attempt_n)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_attempt(&self, fin: &AttemptFinish) -> StoreResult<bool> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        if fin.count_tokens
            && let Some(actual) = fin.tokens
        {
            // Replace the lease-time estimate by what the call really used, in the bucket
            // of the second the call started.
            sqlx::query(
                    "UPDATE provider_usage SET tokens = tokens + ?1 - (SELECT tokens FROM attempts WHERE job_id = ?2 AND n = ?3) \
                     WHERE provider = ?4 AND second = (SELECT started_at / 1000 FROM attempts WHERE job_id = ?2 AND n = ?3)",
                )
                .bind(actual)
                .bind(&fin.job_id)
                .bind(fin.attempt_n)
                .bind(&fin.provider)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE attempts SET finished_at = ?1, status_code = ?2, outcome = ?3, error = ?4, \
             tokens = COALESCE(?5, tokens) WHERE job_id = ?6 AND n = ?7",
        )
        .bind(fin.finished_at)
        .bind(fin.status_code)
        .bind(fin.outcome.as_str())
        .bind(&fin.error)
        .bind(fin.tokens)
        .bind(&fin.job_id)
        .bind(fin.attempt_n)
        .execute(&mut *tx)
        .await?;
        // Only the lease holder may move the job on.
        // Only the lease holder may move the job on, and only for the attempt it holds:
        // after a lost lease the same instance may hold a newer attempt of the same job.
        macro_rules! owned {
            ($attempt:literal) => {
                concat!(" WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 AND attempt_count = ", $attempt)
            };
        }
        let done = match &fin.transition {
            Transition::Succeed { result, usage_prompt, usage_completion } => {
                sqlx::query(concat!("UPDATE jobs SET status = 'succeeded', finished_at = ?3, status_code = 200, result = ?4, \
                     usage_prompt = ?5, usage_completion = ?6, lease_owner = NULL, lease_expires_at = NULL, \
                     finished_by = ?2 ", owned!("?7")))
                .bind(&fin.job_id)
                .bind(&fin.instance)
                .bind(fin.finished_at)
                .bind(result)
                .bind(usage_prompt)
                .bind(usage_completion)
                .bind(fin.attempt_n)
                .execute(&mut *tx)
                .await?
            }
            Transition::Fail { error, partial } => {
                sqlx::query(concat!("UPDATE jobs SET status = 'failed', finished_at = ?3, status_code = ?4, error = ?5, result = ?6, \
                     lease_owner = NULL, lease_expires_at = NULL, finished_by = ?2 ", owned!("?7")))
                .bind(&fin.job_id)
                .bind(&fin.instance)
                .bind(fin.finished_at)
                .bind(i64::from(error.status))
                .bind(error_json(error))
                .bind(partial)
                .bind(fin.attempt_n)
                .execute(&mut *tx)
                .await?
            }
            Transition::Requeue { hop, provider, run_at } => {
                sqlx::query(concat!("UPDATE jobs SET status = 'queued', run_at = ?3, \
                     hop_tries = CASE WHEN hop = ?4 THEN hop_tries ELSE 0 END, hop = ?4, provider = ?5, \
                     hops = hops + CASE WHEN provider <> ?5 THEN 1 ELSE 0 END, \
                     lease_owner = NULL, lease_expires_at = NULL ", owned!("?6")))
                .bind(&fin.job_id)
                .bind(&fin.instance)
                .bind(run_at)
                .bind(*hop as i64)
                .bind(provider)
                .bind(fin.attempt_n)
                .execute(&mut *tx)
                .await?
            }
        };
        apply_effect(&mut tx, &fin.provider, fin.finished_at, &fin.effect).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn cancel_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let now = now_ms();
        {
            let mut conn = self.writer.lock().await;
            let mut tx = conn.begin().await?;
            let err = cancelled_error();
            let done = sqlx::query(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?1, status_code = 499, error = ?2, \
                 lease_owner = NULL, lease_expires_at = NULL WHERE id = ?3 AND status IN ('queued', 'running')",
            )
            .bind(now)
            .bind(error_json(&err))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                sqlx::query(
                    "UPDATE attempts SET outcome = 'cancelled', finished_at = ?1 WHERE job_id = ?2 AND outcome = 'running'",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
        self.get_job(id).await
    }

    async fn rescue(&self, scope: RescueScope<'_>) -> StoreResult<Vec<String>> {
        {
            // Budget buckets older than the window are no longer read.
            let mut conn = self.writer.lock().await;
            sqlx::query("DELETE FROM provider_usage WHERE second < ?1")
                .bind(budget::window_start_second(now_ms()) - 1)
                .execute(&mut *conn)
                .await?;
        }
        let (owner, expired_only) = match scope {
            RescueScope::Expired => (None, true),
            RescueScope::Owner(o) => (Some(o), false),
            RescueScope::All => (None, false),
        };
        self.requeue_running(owner, expired_only, AttemptOutcome::Lost)
            .await
    }

    async fn release_leases(&self, instance: &str) -> StoreResult<Vec<String>> {
        self.requeue_running(Some(instance), false, AttemptOutcome::Released)
            .await
    }

    async fn queued_on(&self, provider: &str, limit: i64) -> StoreResult<Vec<Job>> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE provider = ?1 AND status = 'queued' ORDER BY priority, run_at LIMIT ?2"
        ))
        .bind(provider)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn move_queued(&self, moves: &[QueuedMove]) -> StoreResult<u64> {
        if moves.is_empty() {
            return Ok(0);
        }
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let mut moved = 0;
        for m in moves {
            let done = sqlx::query(
                "UPDATE jobs SET hop = ?1, provider = ?2, hops = hops + 1, hop_tries = 0 \
                 WHERE id = ?3 AND status = 'queued' AND provider = ?4",
            )
            .bind(m.hop as i64)
            .bind(&m.to)
            .bind(&m.job_id)
            .bind(&m.from)
            .execute(&mut *tx)
            .await?;
            moved += done.rows_affected();
        }
        tx.commit().await?;
        Ok(moved)
    }

    async fn fail_queued(
        &self,
        job_id: &str,
        from: &str,
        error: &JobError,
        at: i64,
    ) -> StoreResult<bool> {
        let mut conn = self.writer.lock().await;
        let done = sqlx::query(
            "UPDATE jobs SET status = 'failed', finished_at = ?1, status_code = ?2, error = ?3 \
             WHERE id = ?4 AND status = 'queued' AND provider = ?5",
        )
        .bind(at)
        .bind(i64::from(error.status))
        .bind(error_json(error))
        .bind(job_id)
        .bind(from)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn queue_depths(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT provider, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY provider",
        )
        .fetch_all(&self.readers)
        .await?)
    }

    async fn running_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT provider, COUNT(*) FROM jobs WHERE status = 'running' GROUP BY provider",
        )
        .fetch_all(&self.readers)
        .await?)
    }

    async fn provider_states(&self) -> StoreResult<Vec<ProviderState>> {
        let rows: Vec<ProviderStateRow> = sqlx::query_as(
            "SELECT provider, cooldown_until, consecutive_failures, breaker_open_until FROM provider_state ORDER BY provider",
        )
        .fetch_all(&self.readers)
        .await?;
        Ok(rows.into_iter().map(ProviderState::from).collect())
    }

    async fn finished_jobs(
        &self,
        from_ms: i64,
        until_ms: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<Job>> {
        let (after_ts, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let rows: Vec<JobRow> = sqlx::query_as(concat!("SELECT ", job_columns!(), " FROM jobs WHERE finished_at IS NOT NULL AND finished_at >= ?1 AND finished_at < ?2 \
             AND (finished_at > ?3 OR (finished_at = ?3 AND id > ?4)) ORDER BY finished_at, id LIMIT ?5"))
        .bind(from_ms)
        .bind(until_ms)
        .bind(after_ts)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn heartbeat(&self, instance: &str) -> StoreResult<()> {
        // The clock is read once the writer is ours: a wait for the lock must not age it.
        let mut conn = self.writer.lock().await;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO instances (id, started_at, heartbeat_at) VALUES (?1, ?2, ?2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(instance)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn instances(&self, since_ms: i64) -> StoreResult<Vec<InstanceInfo>> {
        let rows: Vec<InstanceRow> =
            sqlx::query_as("SELECT id, started_at, heartbeat_at FROM instances WHERE heartbeat_at > ?1 ORDER BY id")
                .bind(since_ms)
                .fetch_all(&self.readers)
                .await?;
        Ok(rows.into_iter().map(InstanceInfo::from).collect())
    }

    async fn unwritten_metrics(&self, before_ms: i64, limit: i64) -> StoreResult<Vec<Job>> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE metrics_written = 0 AND finished_at IS NOT NULL AND finished_at < ?1 \
             ORDER BY finished_at LIMIT ?2"
        ))
        .bind(before_ms)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn mark_metrics_written(&self, ids: &[String]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        for id in ids {
            sqlx::query("UPDATE jobs SET metrics_written = 1 WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn purge_finished(&self, before_ms: i64, limit: i64) -> StoreResult<u64> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let ids: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1 ORDER BY finished_at LIMIT ?2",
        )
        .bind(before_ms)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (id,) in &ids {
            sqlx::query("DELETE FROM attempts WHERE job_id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM jobs WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}

async fn insert(conn: &mut SqliteConnection, job: &NewJob) -> StoreResult<bool> {
    let provider = job.chain.get(job.hop).cloned().unwrap_or_default();
    let done = sqlx::query(
        "INSERT INTO jobs (id, task, status, priority, chain, hop, provider, request, stream, caller, \
         idempotency_key, pinned_instance, run_at, deadline_at, created_at, batch_id, custom_id) \
         VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?12, ?14, ?15) \
         ON CONFLICT (caller, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
    )
    .bind(&job.id)
    .bind(&job.task)
    .bind(job.priority)
    .bind(chain_json(&job.chain))
    .bind(job.hop as i64)
    .bind(provider)
    .bind(&job.request)
    .bind(job.stream as i64)
    .bind(job.caller.as_deref().unwrap_or(""))
    .bind(&job.idempotency_key)
    .bind(&job.pinned_instance)
    .bind(job.created_at)
    .bind(job.deadline_at)
    .bind(&job.batch_id)
    .bind(&job.custom_id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

async fn apply_effect(
    conn: &mut SqliteConnection,
    provider: &str,
    now: i64,
    effect: &ProviderEffect,
) -> StoreResult<()> {
    // The common case, a success with no breaker history, writes nothing.
    if effect.success == Some(true) && effect.cooldown_until.is_none() {
        sqlx::query("UPDATE provider_state SET consecutive_failures = 0 WHERE provider = ?1 AND consecutive_failures <> 0")
            .bind(provider)
            .execute(&mut *conn)
            .await?;
        return Ok(());
    }
    if effect.cooldown_until.is_none() && effect.success.is_none() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO provider_state (provider) VALUES (?1) ON CONFLICT (provider) DO NOTHING",
    )
    .bind(provider)
    .execute(&mut *conn)
    .await?;
    if let Some(until) = effect.cooldown_until {
        sqlx::query("UPDATE provider_state SET cooldown_until = MAX(cooldown_until, ?1) WHERE provider = ?2")
            .bind(until)
            .bind(provider)
            .execute(&mut *conn)
            .await?;
    }
    match effect.success {
        Some(true) => {
            sqlx::query("UPDATE provider_state SET consecutive_failures = 0 WHERE provider = ?1")
                .bind(provider)
                .execute(&mut *conn)
                .await?;
        }
        Some(false) => {
            let (threshold, open_ms) = effect
                .breaker
                .map_or((i64::MAX, 0), |(t, ms)| (i64::from(t), ms));
            sqlx::query(
                "UPDATE provider_state SET consecutive_failures = consecutive_failures + 1, \
                 breaker_open_until = CASE WHEN consecutive_failures + 1 >= ?1 THEN ?2 ELSE breaker_open_until END \
                 WHERE provider = ?3",
            )
            .bind(threshold)
            .bind(now + open_ms)
            .bind(provider)
            .execute(&mut *conn)
            .await?;
        }
        None => {}
    }
    Ok(())
}
