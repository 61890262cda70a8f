//! The shared Postgres store: several instances, one database.
//!
//! Same semantics as the SQLite store (the conformance suite runs against both); what
//! differs is how instances that do not share memory stay within one budget:
//! - a lease takes a transaction-scoped advisory lock on its provider, so two instances
//!   never both see "one slot free" and both take it; jobs are picked with
//!   `FOR UPDATE SKIP LOCKED` so nothing else waits on them;
//! - times the database decides (lease expiry, rpm/tpm windows, heartbeats, rescues) come
//!   from the database clock, so instances whose clocks drift still agree;
//! - every write that makes work or news for other instances sends a `NOTIFY` from inside
//!   its transaction (delivered at commit), which `listener` turns into local signals.

mod listener;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Executor, PgConnection, Postgres};
use tokio_util::sync::CancellationToken;

use super::row::{
    AttemptRow, InstanceRow, JobRow, ProviderStateRow, cancelled_error, chain_json, error_json,
    interrupted_attempt_error, mark_leased, orphaned_stream_error,
};
use super::*;
use crate::{attempt_columns, job_columns};

/// The database clock in milliseconds since the epoch (`clock_timestamp`, not `now()`:
/// the moment of the statement, not of the transaction's start, which may have waited
/// on a lock).
macro_rules! db_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// "Look at provider P again": work was queued for it or a slot of its budget freed.
/// Payload: the provider name. (Spelled out in the SQL below, which must be static.)
const CHANNEL_PROVIDER: &str = "orch_provider";
/// "Job J finished": waiters re-read the row. Payload: the job id.
const CHANNEL_FINISHED: &str = "orch_job_finished";

/// Connections per instance: pools, request handlers and the listener share them.
const POOL_SIZE: u32 = 16;

pub struct PostgresStore {
    pool: PgPool,
    batches: super::postgres_batches::PgBatchStore,
}

impl PostgresStore {
    /// Connects and applies the migrations (concurrent starts are safe: sqlx migrates
    /// under an advisory lock).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        // The URL may hold a password: errors never repeat it.
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Open(format!("bad Postgres URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(1)
            // Fail fast while the database is down, so callers log and retry (and
            // `/healthz` answers) instead of queueing behind a dead pool.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open(format!("cannot connect to Postgres: {e}")))?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self {
            batches: super::postgres_batches::PgBatchStore::new(pool.clone()),
            pool,
        })
    }

    /// Re-queues (or, for streams, fails) the running jobs in scope. Rows another rescuer
    /// holds are skipped: two instances rescuing at once never both handle one job.
    async fn requeue_running(
        &self,
        owner: Option<&str>,
        expired_only: bool,
        outcome: AttemptOutcome,
    ) -> StoreResult<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let now = db_now(&mut tx).await?;
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT id, provider, pinned_instance FROM jobs WHERE status = 'running' \
             AND ($1::text IS NULL OR lease_owner = $1) AND (NOT $2 OR lease_expires_at < $3) \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(owner)
        .bind(expired_only)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let all: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let (pinned, free): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.2.is_some());
        let pinned: Vec<&str> = pinned.iter().map(|r| r.0.as_str()).collect();
        let requeued: Vec<&str> = free.iter().map(|r| r.0.as_str()).collect();
        let mut providers: Vec<String> = Vec::new();
        for (_, provider, _) in &free {
            if !providers.contains(provider) {
                providers.push(provider.clone());
            }
        }
        sqlx::query(
            "UPDATE attempts SET outcome = $1, finished_at = $2, error = $3 \
             WHERE job_id = ANY($4) AND outcome = 'running'",
        )
        .bind(outcome.as_str())
        .bind(now)
        .bind(interrupted_attempt_error(outcome))
        .bind(&all)
        .execute(&mut *tx)
        .await?;
        if !pinned.is_empty() {
            sqlx::query(
                "WITH u AS (UPDATE jobs SET status = 'failed', finished_at = $1, status_code = 502, \
                 error = $2, lease_owner = NULL, lease_expires_at = NULL WHERE id = ANY($3) RETURNING id) \
                 SELECT count(*) FROM (SELECT pg_notify('orch_job_finished', id) FROM u) n",
            )
            .bind(now)
            .bind(error_json(&orphaned_stream_error()))
            .bind(&pinned)
            .execute(&mut *tx)
            .await?;
        }
        if !requeued.is_empty() {
            // A released attempt never reached an answer through no fault of the job:
            // it does not count against max_retries.
            let give_back = i64::from(outcome == AttemptOutcome::Released);
            sqlx::query(
                "UPDATE jobs SET status = 'queued', run_at = $1, lease_owner = NULL, \
                 lease_expires_at = NULL, hop_tries = GREATEST(hop_tries - $2, 0) WHERE id = ANY($3)",
            )
            .bind(now)
            .bind(give_back)
            .bind(&requeued)
            .execute(&mut *tx)
            .await?;
            notify_providers(&mut tx, &providers).await?;
        }
        tx.commit().await?;
        Ok(providers)
    }
}

async fn db_now(conn: &mut PgConnection) -> StoreResult<i64> {
    let (now,): (i64,) = sqlx::query_as(concat!("SELECT ", db_now!()))
        .fetch_one(conn)
        .await?;
    Ok(now)
}

async fn notify_providers(conn: &mut PgConnection, providers: &[String]) -> StoreResult<()> {
    sqlx::query(
        "SELECT count(*) FROM (SELECT pg_notify('orch_provider', p) FROM unnest($1::text[]) p) n",
    )
    .bind(providers)
    .execute(conn)
    .await?;
    Ok(())
}

/// Runs a `… SELECT count(*) FROM (SELECT pg_notify(…) FROM u) n` statement and says
/// whether its data-modifying part touched a row.
async fn changed<'e, E>(
    q: sqlx::query::Query<'e, Postgres, sqlx::postgres::PgArguments>,
    conn: E,
) -> StoreResult<bool>
where
    E: Executor<'e, Database = Postgres>,
{
    use sqlx::Row;
    let row = q.fetch_one(conn).await?;
    Ok(row.try_get::<i64, _>(0)? > 0)
}

#[async_trait]
impl QueueStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn batches(&self) -> Option<&dyn super::batches::BatchStore> {
        Some(&self.batches)
    }

    async fn now_ms(&self) -> StoreResult<i64> {
        let mut conn = self.pool.acquire().await?;
        db_now(&mut conn).await
    }

    async fn insert_job(&self, job: &NewJob) -> StoreResult<Inserted> {
        let provider = job.chain.get(job.hop).cloned().unwrap_or_default();
        let q = sqlx::query(
            "WITH ins AS (INSERT INTO jobs (id, task, status, priority, chain, hop, provider, request, \
             stream, caller, idempotency_key, pinned_instance, run_at, deadline_at, created_at, batch_id, \
             custom_id) VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $12, $14, $15) \
             ON CONFLICT (caller, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING provider) \
             SELECT count(*) FROM (SELECT pg_notify('orch_provider', provider) FROM ins) n",
        )
        .bind(&job.id)
        .bind(&job.task)
        .bind(job.priority)
        .bind(chain_json(&job.chain))
        .bind(job.hop as i64)
        .bind(provider)
        .bind(&job.request)
        .bind(i64::from(job.stream))
        .bind(job.caller.as_deref().unwrap_or(""))
        .bind(&job.idempotency_key)
        .bind(&job.pinned_instance)
        .bind(job.created_at)
        .bind(job.deadline_at)
        .bind(&job.batch_id)
        .bind(&job.custom_id);
        if changed(q, &self.pool).await? {
            return Ok(Inserted::New);
        }
        let row: JobRow = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE caller = $1 AND idempotency_key = $2"
        ))
        .bind(job.caller.as_deref().unwrap_or(""))
        .bind(&job.idempotency_key)
        .fetch_one(&self.pool)
        .await?;
        Ok(Inserted::Existing(Box::new(row.try_into()?)))
    }

    async fn insert_jobs(&self, jobs: &[NewJob]) -> StoreResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut providers: Vec<String> = Vec::new();
        // One statement per chunk of lines: a batch of thousands is a few round trips.
        for chunk in jobs.chunks(1000) {
            let col = |f: &dyn Fn(&NewJob) -> String| chunk.iter().map(f).collect::<Vec<_>>();
            let opt =
                |f: &dyn Fn(&NewJob) -> Option<String>| chunk.iter().map(f).collect::<Vec<_>>();
            let int = |f: &dyn Fn(&NewJob) -> i64| chunk.iter().map(f).collect::<Vec<_>>();
            let provider_of = |j: &NewJob| j.chain.get(j.hop).cloned().unwrap_or_default();
            for j in chunk {
                let p = provider_of(j);
                if !providers.contains(&p) {
                    providers.push(p);
                }
            }
            sqlx::query(
                "INSERT INTO jobs (id, task, status, priority, chain, hop, provider, request, stream, \
                 caller, idempotency_key, pinned_instance, run_at, deadline_at, created_at, batch_id, custom_id) \
                 SELECT id, task, 'queued', priority, chain, hop, provider, request, stream, caller, ikey, \
                 pinned, created_at, deadline_at, created_at, batch_id, custom_id \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], \
                 $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bigint[], \
                 $14::text[], $15::text[]) AS t(id, task, priority, chain, hop, provider, request, stream, \
                 caller, ikey, pinned, created_at, deadline_at, batch_id, custom_id) \
                 ON CONFLICT (caller, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            )
            .bind(col(&|j| j.id.clone()))
            .bind(col(&|j| j.task.clone()))
            .bind(int(&|j| j.priority))
            .bind(col(&|j| chain_json(&j.chain)))
            .bind(int(&|j| j.hop as i64))
            .bind(col(&provider_of))
            .bind(col(&|j| j.request.clone()))
            .bind(int(&|j| i64::from(j.stream)))
            .bind(col(&|j| j.caller.clone().unwrap_or_default()))
            .bind(opt(&|j| j.idempotency_key.clone()))
            .bind(opt(&|j| j.pinned_instance.clone()))
            .bind(int(&|j| j.created_at))
            .bind(int(&|j| j.deadline_at))
            .bind(opt(&|j| j.batch_id.clone()))
            .bind(opt(&|j| j.custom_id.clone()))
            .execute(&mut *tx)
            .await?;
        }
        notify_providers(&mut tx, &providers).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let row: Option<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Job::try_from).transpose()
    }

    async fn get_attempts(&self, id: &str) -> StoreResult<Vec<Attempt>> {
        let rows: Vec<AttemptRow> = sqlx::query_as(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM attempts WHERE job_id = $1 ORDER BY n"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Attempt::from).collect())
    }

    async fn lease(&self, req: &LeaseRequest) -> StoreResult<Lease> {
        let mut tx = self.pool.begin().await?;
        // Serialise the leases of this provider across every instance until commit: the
        // counts read below stay true until our own leases are written.
        sqlx::query("SELECT pg_advisory_xact_lock(1869767528, hashtext($1))")
            .bind(&req.provider)
            .execute(&mut *tx)
            .await?;
        let (now, cooldown_until, breaker_open_until, running, calls, tokens, oldest_second): (
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            Option<i64>,
        ) = sqlx::query_as(concat!(
            "SELECT n.now, COALESCE(s.cooldown_until, 0), COALESCE(s.breaker_open_until, 0), \
             r.running, w.calls, w.tokens, w.oldest \
             FROM (SELECT ",
            db_now!(),
            " AS now) n \
             LEFT JOIN provider_state s ON s.provider = $1 \
             CROSS JOIN LATERAL (SELECT count(*) AS running FROM jobs \
                 WHERE provider = $1 AND status = 'running') r \
             CROSS JOIN LATERAL (SELECT COALESCE(sum(calls), 0)::bigint AS calls, \
                 COALESCE(sum(tokens), 0)::bigint AS tokens, min(second) AS oldest FROM provider_usage \
                 WHERE provider = $1 AND second >= floor((n.now - $2) / 1000.0)::bigint) w"
        ))
        .bind(&req.provider)
        .bind(RATE_WINDOW_MS)
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
            Ok(limit) => limit,
            Err(why) => return Ok(Lease::blocked(why)),
        };
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE provider = $1 AND status = 'queued' AND run_at <= $2 \
             AND (pinned_instance IS NULL OR pinned_instance = $3) ORDER BY priority, run_at LIMIT $4 \
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(&req.provider)
        .bind(now)
        .bind(&req.instance)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            let (next,): (Option<i64>,) = sqlx::query_as(
                "SELECT min(run_at) FROM jobs WHERE provider = $1 AND status = 'queued' \
                 AND (pinned_instance IS NULL OR pinned_instance = $2)",
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
        let taken = mark_leased(rows, req, now)?;
        let ids: Vec<&str> = taken.iter().map(|(l, _)| l.job.id.as_str()).collect();
        let estimates: Vec<i64> = taken.iter().map(|(_, e)| *e).collect();
        // Mark running and open their attempts in one statement, whatever the count.
        sqlx::query(
            "WITH t AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS t(id, tokens)), \
             u AS (UPDATE jobs j SET status = 'running', lease_owner = $3, lease_expires_at = $4, \
                 started_at = COALESCE(j.started_at, $5), attempt_count = j.attempt_count + 1, \
                 hop_tries = j.hop_tries + 1 FROM t WHERE j.id = t.id \
                 RETURNING j.id, j.attempt_count, t.tokens) \
             INSERT INTO attempts (job_id, n, provider, model, instance, started_at, outcome, tokens) \
             SELECT u.id, u.attempt_count, $6, $7, $3, $5, 'running', u.tokens FROM u",
        )
        .bind(&ids)
        .bind(&estimates)
        .bind(&req.instance)
        .bind(now + req.lease_ms)
        .bind(now)
        .bind(&req.provider)
        .bind(&req.model)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO provider_usage (provider, second, calls, tokens) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (provider, second) DO UPDATE SET calls = provider_usage.calls + EXCLUDED.calls, \
             tokens = provider_usage.tokens + EXCLUDED.tokens",
        )
        .bind(&req.provider)
        .bind(budget::second_of(now))
        .bind(ids.len() as i64)
        .bind(estimates.iter().sum::<i64>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Lease {
            jobs: taken.into_iter().map(|(l, _)| l).collect(),
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
        let done = sqlx::query(concat!(
            "UPDATE jobs SET lease_expires_at = ",
            db_now!(),
            " + $1 WHERE id = $2 AND status = 'running' AND lease_owner = $3 AND attempt_count = $4"
        ))
        .bind(lease_ms)
        .bind(job_id)
        .bind(instance)
        .bind(attempt_n)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_attempt(&self, fin: &AttemptFinish) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        if fin.count_tokens
            && let Some(actual) = fin.tokens
        {
            // Replace the lease-time estimate by what the call really used, in the bucket
            // of the second the call started.
            sqlx::query(
                "UPDATE provider_usage u SET tokens = u.tokens + $1 - a.tokens FROM attempts a \
                 WHERE a.job_id = $2 AND a.n = $3 AND u.provider = $4 AND u.second = a.started_at / 1000",
            )
            .bind(actual)
            .bind(&fin.job_id)
            .bind(fin.attempt_n)
            .bind(&fin.provider)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE attempts SET finished_at = $1, status_code = $2, outcome = $3, error = $4, \
             tokens = COALESCE($5, tokens) WHERE job_id = $6 AND n = $7",
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
        // Only the lease holder may move the job on. Other instances hear of it: waiters
        // of a finished job re-read it, pools of the provider whose slot freed look again.
        macro_rules! owned {
            // Also only for the attempt it holds: after a lost lease the same instance may
            // hold a newer attempt of the same job.
            ($set:literal, $notify:literal, $attempt:literal) => {
                concat!(
                    "WITH u AS (UPDATE jobs SET ",
                    $set,
                    " WHERE id = $1 AND status = 'running' AND lease_owner = $2 AND attempt_count = ",
                    $attempt,
                    " RETURNING id, provider) \
                     SELECT count(*) FROM (SELECT ",
                    $notify,
                    ", pg_notify('orch_provider', 'slot:' || $3) FROM u) n"
                )
            };
        }
        let q = match &fin.transition {
            Transition::Succeed {
                result,
                usage_prompt,
                usage_completion,
            } => sqlx::query(owned!(
                "status = 'succeeded', finished_at = $4, status_code = 200, result = $5, \
                 usage_prompt = $6, usage_completion = $7, lease_owner = NULL, lease_expires_at = NULL, \
                 finished_by = $2",
                "pg_notify('orch_job_finished', id)",
                "$8"
            ))
            .bind(&fin.job_id)
            .bind(&fin.instance)
            .bind(&fin.provider)
            .bind(fin.finished_at)
            .bind(result)
            .bind(usage_prompt)
            .bind(usage_completion),
            Transition::Fail { error, partial } => sqlx::query(owned!(
                "status = 'failed', finished_at = $4, status_code = $5, error = $6, result = $7, \
                 lease_owner = NULL, lease_expires_at = NULL, finished_by = $2",
                "pg_notify('orch_job_finished', id)",
                "$8"
            ))
            .bind(&fin.job_id)
            .bind(&fin.instance)
            .bind(&fin.provider)
            .bind(fin.finished_at)
            .bind(i64::from(error.status))
            .bind(error_json(error))
            .bind(partial),
            Transition::Requeue {
                hop,
                provider,
                run_at,
            } => sqlx::query(owned!(
                "status = 'queued', run_at = $4, \
                 hop_tries = CASE WHEN hop = $5 THEN hop_tries ELSE 0 END, hop = $5, provider = $6, \
                 hops = hops + CASE WHEN provider <> $6 THEN 1 ELSE 0 END, \
                 lease_owner = NULL, lease_expires_at = NULL",
                "pg_notify('orch_provider', provider)",
                "$7"
            ))
            .bind(&fin.job_id)
            .bind(&fin.instance)
            .bind(&fin.provider)
            .bind(run_at)
            .bind(*hop as i64)
            .bind(provider),
        }
        .bind(fin.attempt_n);
        let done = changed(q, &mut *tx).await?;
        apply_effect(&mut tx, &fin.provider, &fin.effect).await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn cancel_job(&self, id: &str) -> StoreResult<Option<Job>> {
        // One statement: the job, its running attempt and the news, atomically.
        sqlx::query(concat!(
            "WITH u AS (UPDATE jobs SET status = 'cancelled', finished_at = ",
            db_now!(),
            ", status_code = 499, error = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND status IN ('queued', 'running') RETURNING id, provider, finished_at), \
             a AS (UPDATE attempts SET outcome = 'cancelled', finished_at = (SELECT finished_at FROM u) \
             WHERE job_id IN (SELECT id FROM u) AND outcome = 'running') \
             SELECT count(*) FROM (SELECT pg_notify('orch_job_finished', id), \
             pg_notify('orch_provider', 'slot:' || provider) FROM u) n"
        ))
        .bind(error_json(&cancelled_error()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.get_job(id).await
    }

    async fn rescue(&self, scope: RescueScope<'_>) -> StoreResult<Vec<String>> {
        // Budget buckets older than the window are no longer read.
        sqlx::query(concat!(
            "DELETE FROM provider_usage WHERE second < floor((",
            db_now!(),
            " - $1) / 1000.0)::bigint - 1"
        ))
        .bind(RATE_WINDOW_MS)
        .execute(&self.pool)
        .await?;
        let (owner, expired_only) = scope.filters();
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
            " FROM jobs WHERE provider = $1 AND status = 'queued' ORDER BY priority, run_at LIMIT $2"
        ))
        .bind(provider)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn move_queued(&self, moves: &[QueuedMove]) -> StoreResult<u64> {
        if moves.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = moves.iter().map(|m| m.job_id.as_str()).collect();
        let from: Vec<&str> = moves.iter().map(|m| m.from.as_str()).collect();
        let hops: Vec<i64> = moves.iter().map(|m| m.hop as i64).collect();
        let to: Vec<&str> = moves.iter().map(|m| m.to.as_str()).collect();
        // One statement; the providers that received work hear of it on every instance.
        let (moved,): (i64,) = sqlx::query_as(
            "WITH m AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) \
                 AS m(id, from_provider, hop, to_provider)), \
             u AS (UPDATE jobs j SET hop = m.hop, provider = m.to_provider, hops = j.hops + 1, hop_tries = 0 \
                 FROM m WHERE j.id = m.id AND j.status = 'queued' AND j.provider = m.from_provider \
                 RETURNING j.provider) \
             SELECT count(*) FROM (SELECT pg_notify('orch_provider', provider) FROM u) n",
        )
        .bind(&ids)
        .bind(&from)
        .bind(&hops)
        .bind(&to)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(moved).unwrap_or(0))
    }

    async fn fail_queued(
        &self,
        job_id: &str,
        from: &str,
        error: &JobError,
        at: i64,
    ) -> StoreResult<bool> {
        let (n,): (i64,) = sqlx::query_as(
            "WITH u AS (UPDATE jobs SET status = 'failed', finished_at = $1, status_code = $2, error = $3 \
                 WHERE id = $4 AND status = 'queued' AND provider = $5 RETURNING id) \
             SELECT count(*) FROM (SELECT pg_notify('orch_job_finished', id) FROM u) n",
        )
        .bind(at)
        .bind(i64::from(error.status))
        .bind(error_json(error))
        .bind(job_id)
        .bind(from)
        .fetch_one(&self.pool)
        .await?;
        Ok(n == 1)
    }

    async fn queue_depths(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT provider, count(*) FROM jobs WHERE status = 'queued' GROUP BY provider",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn running_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT provider, count(*) FROM jobs WHERE status = 'running' GROUP BY provider",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn provider_states(&self) -> StoreResult<Vec<ProviderState>> {
        let rows: Vec<ProviderStateRow> = sqlx::query_as(
            "SELECT provider, cooldown_until, consecutive_failures, breaker_open_until \
             FROM provider_state ORDER BY provider",
        )
        .fetch_all(&self.pool)
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
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE finished_at IS NOT NULL AND finished_at >= $1 AND finished_at < $2 \
             AND (finished_at > $3 OR (finished_at = $3 AND id > $4)) ORDER BY finished_at, id LIMIT $5"
        ))
        .bind(from_ms)
        .bind(until_ms)
        .bind(after_ts)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn heartbeat(&self, instance: &str) -> StoreResult<()> {
        sqlx::query(concat!(
            "INSERT INTO instances (id, started_at, heartbeat_at) VALUES ($1, ",
            db_now!(),
            ", ",
            db_now!(),
            ") ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at"
        ))
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn instances(&self, since_ms: i64) -> StoreResult<Vec<InstanceInfo>> {
        let rows: Vec<InstanceRow> = sqlx::query_as(
            "SELECT id, started_at, heartbeat_at FROM instances WHERE heartbeat_at > $1 ORDER BY id",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(InstanceInfo::from).collect())
    }

    async fn unwritten_metrics(&self, before_ms: i64, limit: i64) -> StoreResult<Vec<Job>> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE metrics_written = 0 AND finished_at IS NOT NULL AND finished_at < $1 \
             ORDER BY finished_at LIMIT $2"
        ))
        .bind(before_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn mark_metrics_written(&self, ids: &[String]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE jobs SET metrics_written = 1 WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge_finished(&self, before_ms: i64, limit: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "WITH d AS (SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < $1 \
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
             a AS (DELETE FROM attempts WHERE job_id IN (SELECT id FROM d)) \
             DELETE FROM jobs WHERE id IN (SELECT id FROM d)",
        )
        .bind(before_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    fn start_listener(&self, signals: Arc<Signals>, stop: CancellationToken) {
        tokio::spawn(listener::run(self.pool.clone(), signals, stop));
    }
}

/// Applies an attempt's effect on its provider's shared state in one upsert. The breaker
/// opens by the database clock, like every other time the lease compares against.
async fn apply_effect(
    conn: &mut PgConnection,
    provider: &str,
    effect: &ProviderEffect,
) -> StoreResult<()> {
    if effect.cooldown_until.is_none() && effect.success.is_none() {
        return Ok(());
    }
    let (threshold, open_ms) = effect
        .breaker
        .map_or((i64::MAX, 0), |(t, ms)| (i64::from(t), ms));
    sqlx::query(concat!(
        "INSERT INTO provider_state AS s (provider, cooldown_until, consecutive_failures, breaker_open_until) \
         VALUES ($1, COALESCE($2, 0), CASE WHEN $3 IS FALSE THEN 1 ELSE 0 END, \
         CASE WHEN $3 IS FALSE AND 1 >= $4 THEN ",
        db_now!(),
        " + $5 ELSE 0 END) \
         ON CONFLICT (provider) DO UPDATE SET \
         cooldown_until = GREATEST(s.cooldown_until, EXCLUDED.cooldown_until), \
         consecutive_failures = CASE WHEN $3 IS TRUE THEN 0 WHEN $3 IS FALSE \
             THEN s.consecutive_failures + 1 ELSE s.consecutive_failures END, \
         breaker_open_until = CASE WHEN $3 IS FALSE AND s.consecutive_failures + 1 >= $4 THEN ",
        db_now!(),
        " + $5 ELSE s.breaker_open_until END"
    ))
    .bind(provider)
    .bind(effect.cooldown_until)
    .bind(effect.success)
    .bind(threshold)
    .bind(open_ms)
    .execute(conn)
    .await?;
    Ok(())
}
