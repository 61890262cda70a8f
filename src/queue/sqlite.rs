//! The embedded SQLite store.
//!
//! One process owns the database file (an exclusive lock on `PATH.lock` enforces it:
//! several instances need Postgres). All writes go through one connection owned by one
//! thread (`writer`), so writers never fight over SQLite's lock and a lease is simply a
//! transaction on that connection; reads use a small pool and see committed data through
//! WAL.
//!
//! Durability: WAL with `synchronous=NORMAL` (default) keeps every committed transaction
//! across a process crash (kill -9); `ORCH_SQLITE_SYNCHRONOUS=FULL` also survives power loss.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection as WriteConn, params};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};

use super::row::{
    AttemptRow, InstanceRow, JobRow, ProviderStateRow, cancelled_error, chain_json, error_json,
    interrupted_attempt_error, mark_leased, orphaned_stream_error, providers_json,
};
use super::*;
use crate::config::SqliteSync;
use crate::{attempt_columns, job_columns};

mod checkpointer;
mod writer;
use writer::Writer;

pub struct SqliteStore {
    /// Every write runs on the writer's thread (see `writer`); reads use the pool.
    pub(super) writer: Writer,
    pub(super) readers: SqlitePool,
    /// Held for the life of the store: the file lock that keeps a second process out
    /// (`None` for a reader opened beside a running gateway).
    _lock: Option<File>,
    /// Set by the first heartbeat: the one that records the instance's (re)start.
    started: std::sync::atomic::AtomicBool,
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
        // sqlx runs the migrations; the writer thread opens its own connection after.
        let mut migrator = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| {
                StoreError::Open(format!(
                    "cannot open SQLite database {}: {e}",
                    path.display()
                ))
            })?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut migrator)
            .await?;
        migrator.close().await?;
        let writer = Writer::open(path, sync, false)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer,
            readers,
            _lock: Some(lock),
            started: Default::default(),
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
        let writer = Writer::open(path, sync, true)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        Ok(Self {
            writer,
            readers,
            _lock: None,
            started: Default::default(),
        })
    }
}

/// Puts the running jobs of `owner` (any when `None`; only expired leases when
/// `expired_only`) back in the queue, closing their attempts with `outcome`; a stream is
/// failed instead (its client is gone). Returns the providers that got jobs back.
fn requeue_running(
    conn: &WriteConn,
    owner: Option<&str>,
    expired_only: bool,
    outcome: AttemptOutcome,
) -> StoreResult<Vec<String>> {
    let now = now_ms();
    let rows = conn
        .prepare_cached(
            "SELECT id, provider, pinned_instance FROM jobs WHERE status = 'running' \
             AND (?1 IS NULL OR lease_owner = ?1) AND (?2 = 0 OR lease_expires_at < ?3)",
        )?
        .query_map(params![owner, expired_only, now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut providers = Vec::new();
    for (id, provider, pinned) in rows {
        conn.prepare_cached(
            "UPDATE attempts SET outcome = ?1, finished_at = ?2, error = ?3 WHERE job_id = ?4 AND outcome = 'running'",
        )?
        .execute(params![
            outcome.as_str(),
            now,
            interrupted_attempt_error(outcome),
            id
        ])?;
        if pinned.is_some() {
            conn.prepare_cached(
                "UPDATE jobs SET status = 'failed', finished_at = ?1, status_code = 502, error = ?2, \
                 lease_owner = NULL, lease_expires_at = NULL WHERE id = ?3",
            )?
            .execute(params![now, error_json(&orphaned_stream_error()), id])?;
            continue;
        }
        // A released attempt never reached an answer through no fault of the job:
        // it does not count against max_retries.
        let give_back = outcome == AttemptOutcome::Released;
        conn.prepare_cached(
            "UPDATE jobs SET status = 'queued', run_at = ?1, lease_owner = NULL, lease_expires_at = NULL, \
             hop_tries = MAX(hop_tries - ?2, 0) WHERE id = ?3",
        )?
        .execute(params![now, give_back, id])?;
        if !providers.contains(&provider) {
            providers.push(provider);
        }
    }
    Ok(providers)
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
        let job = job.clone();
        self.writer
            .write(move |conn| insert_or_find(conn, &job))
            .await
    }

    async fn insert_and_lease(
        &self,
        job: &NewJob,
        req: &LeaseRequest,
    ) -> StoreResult<(Inserted, Lease)> {
        let (job, req) = (job.clone(), req.clone());
        self.writer
            .write(move |conn| {
                let inserted = insert_or_find(conn, &job)?;
                let leased = match inserted {
                    Inserted::New => lease(conn, &req)?,
                    Inserted::Existing(_) => Lease::default(),
                };
                Ok((inserted, leased))
            })
            .await
    }

    async fn insert_jobs(
        &self,
        jobs: &[NewJob],
        refused: &[(String, JobError)],
    ) -> StoreResult<()> {
        let jobs = jobs.to_vec();
        let refused: Vec<(String, i64, String)> = refused
            .iter()
            .map(|(id, e)| (id.clone(), i64::from(e.status), error_json(e)))
            .collect();
        self.writer
            .write(move |conn| {
                for job in &jobs {
                    insert(conn, job)?;
                }
                for (id, status, error) in &refused {
                    let failed = conn
                        .prepare_cached(
                            "UPDATE jobs SET status = 'failed', finished_at = created_at, \
                             status_code = ?1, error = ?2 WHERE id = ?3 AND status = 'queued'",
                        )?
                        .execute(params![status, error, id])?;
                    if failed != 1 {
                        return Err(StoreError::Corrupt(format!(
                            "refused job {id} is not among the jobs inserted"
                        )));
                    }
                }
                Ok(())
            })
            .await
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
        let req = req.clone();
        self.writer.write(move |conn| lease(conn, &req)).await
    }

    async fn renew_lease(
        &self,
        job_id: &str,
        instance: &str,
        attempt_n: i64,
        lease_ms: i64,
    ) -> StoreResult<bool> {
        let (job_id, instance) = (job_id.to_owned(), instance.to_owned());
        self.writer
            .write(move |conn| {
                let done = conn
                    .prepare_cached(
                        "UPDATE jobs SET lease_expires_at = ?1 WHERE id = ?2 AND status = 'running' \
                         AND lease_owner = ?3 AND attempt_count = ?4",
                    )?
                    .execute(params![now_ms() + lease_ms, job_id, instance, attempt_n])?;
                Ok(done == 1)
            })
            .await
    }

    async fn finish_attempt(&self, fin: &AttemptFinish) -> StoreResult<bool> {
        let fin = fin.clone();
        self.writer.write(move |conn| finish(conn, &fin)).await
    }

    async fn cancel_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let job_id = id.to_owned();
        self.writer
            .write(move |conn| {
                let now = now_ms();
                let done = conn
                    .prepare_cached(
                        "UPDATE jobs SET status = 'cancelled', finished_at = ?1, status_code = 499, error = ?2, \
                         lease_owner = NULL, lease_expires_at = NULL WHERE id = ?3 AND status IN ('queued', 'running')",
                    )?
                    .execute(params![now, error_json(&cancelled_error()), job_id])?;
                if done == 1 {
                    conn.prepare_cached(
                        "UPDATE attempts SET outcome = 'cancelled', finished_at = ?1 WHERE job_id = ?2 AND outcome = 'running'",
                    )?
                    .execute(params![now, job_id])?;
                }
                Ok(())
            })
            .await?;
        self.get_job(id).await
    }

    async fn rescue(&self, scope: RescueScope<'_>) -> StoreResult<Vec<String>> {
        let (owner, expired_only) = scope.filters();
        let owner = owner.map(str::to_owned);
        self.writer
            .write(move |conn| {
                // Budget buckets older than the window are no longer read.
                conn.prepare_cached("DELETE FROM provider_usage WHERE second < ?1")?
                    .execute(params![budget::window_start_second(now_ms()) - 1])?;
                requeue_running(conn, owner.as_deref(), expired_only, AttemptOutcome::Lost)
            })
            .await
    }

    async fn release_leases(&self, instance: &str) -> StoreResult<Vec<String>> {
        let instance = instance.to_owned();
        self.writer
            .write(move |conn| {
                requeue_running(conn, Some(&instance), false, AttemptOutcome::Released)
            })
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
        let moves = moves.to_vec();
        self.writer
            .write(move |conn| {
                let mut moved = 0;
                for m in &moves {
                    moved += conn
                        .prepare_cached(
                            "UPDATE jobs SET hop = ?1, provider = ?2, hops = hops + 1, hop_tries = 0 \
                             WHERE id = ?3 AND status = 'queued' AND provider = ?4",
                        )?
                        .execute(params![m.hop as i64, m.to, m.job_id, m.from])?
                        as u64;
                }
                Ok(moved)
            })
            .await
    }

    async fn fail_queued(
        &self,
        job_id: &str,
        from: &str,
        error: &JobError,
        at: i64,
    ) -> StoreResult<bool> {
        let status = i64::from(error.status);
        let (job_id, from, error) = (job_id.to_owned(), from.to_owned(), error_json(error));
        self.writer
            .write(move |conn| {
                let done = conn
                    .prepare_cached(
                        "UPDATE jobs SET status = 'failed', finished_at = ?1, status_code = ?2, error = ?3 \
                         WHERE id = ?4 AND status = 'queued' AND provider = ?5",
                    )?
                    .execute(params![at, status, error, job_id, from])?;
                Ok(done == 1)
            })
            .await
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

    async fn reset_provider_state(&self, provider: &str) -> StoreResult<()> {
        let provider = provider.to_owned();
        self.writer
            .write(move |conn| {
                // One write, so one transaction (see `writer`).
                conn.prepare_cached(
                    "UPDATE provider_state SET cooldown_until = 0, consecutive_failures = 0, \
                     breaker_open_until = 0 WHERE provider = ?1",
                )?
                .execute(params![provider])?;
                conn.prepare_cached(
                    "UPDATE jobs SET run_at = ?2 WHERE provider = ?1 AND status = 'queued' AND run_at > ?2",
                )?
                .execute(params![provider, now_ms()])?;
                Ok(())
            })
            .await
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

    async fn heartbeat(&self, instance: &str, providers: &[String]) -> StoreResult<()> {
        let instance = instance.to_owned();
        let providers = providers_json(providers);
        // The first beat of this process records the instance's (re)start.
        let starting = !self.started.load(std::sync::atomic::Ordering::Acquire);
        self.writer
            .write(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO instances (id, started_at, heartbeat_at, providers) VALUES (?1, ?2, ?2, ?4) \
                     ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, \
                     providers = excluded.providers, \
                     started_at = CASE WHEN ?3 THEN excluded.started_at ELSE instances.started_at END",
                )?
                .execute(params![instance, now_ms(), starting, providers])?;
                Ok(())
            })
            .await?;
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn instances(&self, since_ms: i64) -> StoreResult<Vec<InstanceInfo>> {
        let rows: Vec<InstanceRow> =
            sqlx::query_as("SELECT id, started_at, heartbeat_at, providers FROM instances WHERE heartbeat_at > ?1 ORDER BY id")
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
        // One statement for the whole batch (hundreds of ids under load, each looked up by the
        // primary key): a statement per id kept the single writer busy with overhead that
        // the request path waits behind (docs/BENCHMARKS.md, fifteenth round).
        let ids = json_each_arg(ids)?;
        self.writer
            .write(move |conn| {
                conn.prepare_cached(
                    "UPDATE jobs SET metrics_written = 1 WHERE id IN (SELECT value FROM json_each(?1))",
                )?
                .execute(params![ids])?;
                Ok(())
            })
            .await
    }

    async fn purge_finished(&self, before_ms: i64, limit: i64) -> StoreResult<u64> {
        self.writer
            .write(move |conn| {
                let ids = conn
                    .prepare_cached(
                        "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                         ORDER BY finished_at LIMIT ?2",
                    )?
                    .query_map(params![before_ms, limit], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                for id in &ids {
                    conn.prepare_cached("DELETE FROM attempts WHERE job_id = ?1")?
                        .execute(params![id])?;
                    conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                        .execute(params![id])?;
                }
                Ok(ids.len() as u64)
            })
            .await
    }
}

/// A list as the JSON text a `json_each(?)` in the SQL expands: one statement over many
/// values instead of a statement per value.
pub(super) fn json_each_arg<T: serde::Serialize>(items: &[T]) -> StoreResult<String> {
    serde_json::to_string(items).map_err(|e| StoreError::Write(e.to_string()))
}

/// Inserts the job, or finds the one its idempotency key already names.
fn insert_or_find(conn: &WriteConn, job: &NewJob) -> StoreResult<Inserted> {
    if insert(conn, job)? {
        return Ok(Inserted::New);
    }
    let row = conn
        .prepare_cached(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE caller = ?1 AND idempotency_key = ?2"
        ))?
        .query_row(
            params![job.caller.as_deref().unwrap_or(""), job.idempotency_key],
            JobRow::from_sqlite,
        )?;
    Ok(Inserted::Existing(Box::new(row.try_into()?)))
}

fn insert(conn: &WriteConn, job: &NewJob) -> StoreResult<bool> {
    let provider = job.provider();
    let done = conn
        .prepare_cached(
            "INSERT INTO jobs (id, task, status, priority, chain, hop, provider, request, stream, caller, \
             idempotency_key, pinned_instance, run_at, deadline_at, created_at, batch_id, custom_id) \
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?12, ?14, ?15) \
             ON CONFLICT (caller, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        )?
        .execute(params![
            job.id,
            job.task,
            job.priority,
            chain_json(&job.chain),
            job.hop as i64,
            provider,
            job.request,
            job.stream,
            job.caller.as_deref().unwrap_or(""),
            job.idempotency_key,
            job.pinned_instance,
            job.created_at,
            job.deadline_at,
            job.batch_id,
            job.custom_id,
        ])?;
    Ok(done == 1)
}

/// One lease transaction: budget read, decision, pick, mark, attempt rows, usage bucket.
fn lease(conn: &WriteConn, req: &LeaseRequest) -> StoreResult<Lease> {
    // The clock is read once the writer runs this: a wait in the queue must not age it.
    let now = now_ms();
    // Every budget input in one statement.
    let usage = conn
        .prepare_cached(
            "SELECT COALESCE((SELECT cooldown_until FROM provider_state WHERE provider = ?1), 0), \
             COALESCE((SELECT breaker_open_until FROM provider_state WHERE provider = ?1), 0), \
             (SELECT COUNT(*) FROM jobs WHERE provider = ?1 AND status = 'running'), \
             (SELECT COALESCE(SUM(calls), 0) FROM provider_usage WHERE provider = ?1 AND second >= ?2), \
             (SELECT COALESCE(SUM(tokens), 0) FROM provider_usage WHERE provider = ?1 AND second >= ?2), \
             (SELECT MIN(second) FROM provider_usage WHERE provider = ?1 AND second >= ?2)",
        )?
        .query_row(
            params![req.provider, budget::window_start_second(now)],
            |r| {
                Ok(budget::Usage {
                    cooldown_until: r.get(0)?,
                    breaker_open_until: r.get(1)?,
                    running: r.get(2)?,
                    calls: r.get(3)?,
                    tokens: r.get(4)?,
                    oldest_second: r.get(5)?,
                })
            },
        )?;
    let limit = match budget::admit(&usage, &req.budget, now, req.max_jobs) {
        Ok(n) => n,
        Err(blocked) => return Ok(Lease::blocked(blocked)),
    };
    let lease_until = now + req.lease_ms;
    // Pick, then mark each job. The LIMIT is a constant in the SQL text: SQLite plans
    // with a bound LIMIT's value and re-prepares the statement whenever it changes.
    // The pick reads the whole rows and the marks are plain updates, whose outcome is set
    // on the rows read (`mark_leased`, as on Postgres): an `UPDATE … RETURNING` per job
    // (or one over `id IN (SELECT …)`) builds a temporary table and a statement journal
    // on every run.
    macro_rules! pick {
        ($limit:literal) => {
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE provider = ?1 AND status = 'queued' AND run_at <= ?2 \
                 AND (pinned_instance IS NULL OR pinned_instance = ?3) ORDER BY priority, run_at LIMIT ",
                $limit
            )
        };
    }
    // The jobs wanted: what the budget allows, up to the pick's LIMIT.
    let (sql, most) = if limit == 1 {
        (pick!("1"), 1)
    } else {
        (pick!("64"), 64)
    };
    let wanted = usize::try_from(limit.min(most)).unwrap_or(1);
    let rows = conn
        .prepare_cached(sql)?
        .query_map(
            params![req.provider, now, req.instance],
            JobRow::from_sqlite,
        )?
        .take(wanted)
        .collect::<Result<Vec<_>, _>>()?;
    let drained = rows.len() < wanted;
    if rows.is_empty() {
        let next = conn
            .prepare_cached(
                "SELECT MIN(run_at) FROM jobs WHERE provider = ?1 AND status = 'queued' \
                 AND (pinned_instance IS NULL OR pinned_instance = ?2)",
            )?
            .query_row(params![req.provider, req.instance], |r| r.get(0))?;
        return Ok(Lease {
            next_due_at: next,
            ..Lease::default()
        });
    }
    let mut jobs = Vec::with_capacity(rows.len());
    let mut estimated = 0;
    for (leased, estimate) in mark_leased(rows, req, now)? {
        let job = &leased.job;
        let marked = conn
            .prepare_cached(
                "UPDATE jobs SET status = 'running', lease_owner = ?1, lease_expires_at = ?2, \
                 started_at = COALESCE(started_at, ?3), attempt_count = attempt_count + 1, hop_tries = hop_tries + 1 \
                 WHERE id = ?4 AND status = 'queued'",
            )?
            .execute(params![req.instance, lease_until, now, job.id])?;
        // Picked as queued in this transaction, on the only writing connection.
        if marked != 1 {
            return Err(StoreError::Corrupt(format!(
                "job {} was picked for a lease but could not be marked running",
                job.id
            )));
        }
        estimated += estimate;
        conn.prepare_cached(
            "INSERT INTO attempts (job_id, n, provider, model, instance, started_at, outcome, tokens) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)",
        )?
        .execute(params![
            job.id,
            leased.attempt_n,
            req.provider,
            req.model,
            req.instance,
            now,
            estimate
        ])?;
        jobs.push(leased);
    }
    conn.prepare_cached(
        "INSERT INTO provider_usage (provider, second, calls, tokens) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (provider, second) DO UPDATE SET calls = calls + excluded.calls, tokens = tokens + excluded.tokens",
    )?
    .execute(params![
        req.provider,
        budget::second_of(now),
        jobs.len() as i64,
        estimated
    ])?;
    Ok(Lease {
        jobs,
        drained,
        ..Lease::default()
    })
}

/// Records how an attempt ended and moves its job on, if this instance still holds it.
fn finish(conn: &WriteConn, fin: &AttemptFinish) -> StoreResult<bool> {
    if fin.count_tokens
        && let Some(actual) = fin.tokens
    {
        // Replace the lease-time estimate by what the call really used, in the bucket
        // of the second the call started.
        conn.prepare_cached(
            "UPDATE provider_usage SET tokens = tokens + ?1 - (SELECT tokens FROM attempts WHERE job_id = ?2 AND n = ?3) \
             WHERE provider = ?4 AND second = (SELECT started_at / 1000 FROM attempts WHERE job_id = ?2 AND n = ?3)",
        )?
        .execute(params![actual, fin.job_id, fin.attempt_n, fin.provider])?;
    }
    conn.prepare_cached(
        "UPDATE attempts SET finished_at = ?1, status_code = ?2, outcome = ?3, error = ?4, \
         tokens = COALESCE(?5, tokens) WHERE job_id = ?6 AND n = ?7",
    )?
    .execute(params![
        fin.finished_at,
        fin.status_code,
        fin.outcome.as_str(),
        fin.error,
        fin.tokens,
        fin.job_id,
        fin.attempt_n
    ])?;
    // Only the lease holder may move the job on, and only for the attempt it holds:
    // after a lost lease the same instance may hold a newer attempt of the same job.
    macro_rules! owned {
        ($attempt:literal) => {
            concat!(
                " WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 AND attempt_count = ",
                $attempt
            )
        };
    }
    let done = match &fin.transition {
        Transition::Succeed {
            result,
            usage_prompt,
            usage_completion,
        } => conn
            .prepare_cached(concat!(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?3, status_code = 200, result = ?4, \
                 usage_prompt = ?5, usage_completion = ?6, lease_owner = NULL, lease_expires_at = NULL, \
                 finished_by = ?2 ",
                owned!("?7")
            ))?
            .execute(params![
                fin.job_id,
                fin.instance,
                fin.finished_at,
                result,
                usage_prompt,
                usage_completion,
                fin.attempt_n
            ])?,
        Transition::Fail { error, partial } => conn
            .prepare_cached(concat!(
                "UPDATE jobs SET status = 'failed', finished_at = ?3, status_code = ?4, error = ?5, result = ?6, \
                 lease_owner = NULL, lease_expires_at = NULL, finished_by = ?2 ",
                owned!("?7")
            ))?
            .execute(params![
                fin.job_id,
                fin.instance,
                fin.finished_at,
                i64::from(error.status),
                error_json(error),
                partial,
                fin.attempt_n
            ])?,
        Transition::Requeue {
            hop,
            provider,
            run_at,
        } => conn
            .prepare_cached(concat!(
                "UPDATE jobs SET status = 'queued', run_at = ?3, \
                 hop_tries = CASE WHEN hop = ?4 THEN hop_tries ELSE 0 END, hop = ?4, provider = ?5, \
                 hops = hops + CASE WHEN provider <> ?5 THEN 1 ELSE 0 END, \
                 lease_owner = NULL, lease_expires_at = NULL ",
                owned!("?6")
            ))?
            .execute(params![
                fin.job_id,
                fin.instance,
                run_at,
                *hop as i64,
                provider,
                fin.attempt_n
            ])?,
    };
    apply_effect(conn, &fin.provider, fin.finished_at, &fin.effect)?;
    Ok(done == 1)
}

/// What an attempt taught us about its provider: cool-down, breaker count.
fn apply_effect(
    conn: &WriteConn,
    provider: &str,
    now: i64,
    effect: &ProviderEffect,
) -> StoreResult<()> {
    // The common case, a success with no breaker history, writes nothing.
    if effect.success == Some(true) && effect.cooldown_until.is_none() {
        conn.prepare_cached(
            "UPDATE provider_state SET consecutive_failures = 0 WHERE provider = ?1 AND consecutive_failures <> 0",
        )?
        .execute(params![provider])?;
        return Ok(());
    }
    if effect.cooldown_until.is_none() && effect.success.is_none() {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO provider_state (provider) VALUES (?1) ON CONFLICT (provider) DO NOTHING",
    )?
    .execute(params![provider])?;
    if let Some(until) = effect.cooldown_until {
        conn.prepare_cached(
            "UPDATE provider_state SET cooldown_until = MAX(cooldown_until, ?1) WHERE provider = ?2",
        )?
        .execute(params![until, provider])?;
    }
    match effect.success {
        Some(true) => {
            conn.prepare_cached(
                "UPDATE provider_state SET consecutive_failures = 0 WHERE provider = ?1",
            )?
            .execute(params![provider])?;
        }
        Some(false) => {
            let (threshold, open_ms) = effect
                .breaker
                .map_or((i64::MAX, 0), |(t, ms)| (i64::from(t), ms));
            conn.prepare_cached(
                "UPDATE provider_state SET consecutive_failures = consecutive_failures + 1, \
                 breaker_open_until = CASE WHEN consecutive_failures + 1 >= ?1 THEN ?2 ELSE breaker_open_until END \
                 WHERE provider = ?3",
            )?
            .execute(params![threshold, now + open_ms, provider])?;
        }
        None => {}
    }
    Ok(())
}
