//! The shared Postgres store: several instances, one database.
//!
//! Same semantics as the SQLite store (the conformance suite runs against both); what
//! differs is how instances that do not share memory stay within one budget:
//! - a lease takes a transaction-scoped advisory lock on its provider, so two instances
//!   never both see "one slot free" and both take it; jobs are picked with
//!   `FOR UPDATE SKIP LOCKED` so nothing else waits on them;
//! - times the database decides (lease expiry, rpm/tpm windows, heartbeats, rescues) come
//!   from the database clock, so instances whose clocks drift still agree;
//! - every write that makes work or news for other instances sends a `NOTIFY`, which
//!   `listener` turns into local signals: from inside its transaction (delivered at
//!   commit), or, on the hot paths (a job queued, an attempt ended), right after it
//!   commits (see `News`).

/// Appended to the `FROM` of a statement that runs in a transaction of its own (or
/// starts one), it sets that transaction's `synchronous_commit` to the text parameter
/// `$n` (see `commit_wait`); a `NULL` there keeps the server's setting.
macro_rules! commit_wait {
    ($n:literal) => {
        concat!(
            " CROSS JOIN (SELECT set_config('synchronous_commit', \
             COALESCE($",
            $n,
            "::text, current_setting('synchronous_commit')), true)) AS sc"
        )
    };
}

#[macro_use]
mod conns;
mod grouped;
mod listener;
mod nodelay;
mod writes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres};
use tokio_util::sync::CancellationToken;

use super::row::{
    AttemptRow, InstanceRow, JobRow, ProviderStateRow, cancelled_error, chain_json, error_json,
    interrupted_attempt_error, mark_leased, orphaned_stream_error, providers_json,
};
use super::*;
use crate::config::PostgresSync;
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

/// Connections per instance for the statements each request makes (`conns`) and for
/// everything else (sqlx's pool, which the `LISTEN` connection is taken from).
const HOT_CONNECTIONS: usize = 16;
const POOL_SIZE: u32 = 8;

/// Another instance that heartbeated this recently counts as listening for our news.
/// Instances beat every few seconds (at most 5 s apart, see `worker::rescuer`).
const PEER_WINDOW_MS: i64 = 15_000;

/// Groups of inserts (and of attempt ends) under way at once: while they are, new ones
/// wait and then go out together (see `grouped`).
const GROUPS_IN_FLIGHT: usize = 2;

/// How long a statement may wait for a connection before it fails: while the database is
/// down, callers log and retry (and `/healthz` answers) instead of queueing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Writes of one kind in groups (see `grouped`): each group is one statement of
/// `$write(&mut PgConnection, &[item], $args…)` on a connection of `$conns`.
macro_rules! grouped_writes {
    ($conns:expr, $write:path $(, $arg:expr)*) => {{
        let conns = $conns.clone();
        grouped::Grouped::new(GROUPS_IN_FLIGHT, move |items: Vec<_>| {
            let conns = conns.clone();
            async move {
                grouped::all_or_each(items, |group| {
                    let conns = conns.clone();
                    async move { Ok(on_conn!(conns, |c| $write(c, &group $(, $arg)*))?) }
                })
                .await
            }
        })
    }};
}

/// The `synchronous_commit` of leases and attempt ends: `off` unless every commit is to
/// wait for the flush. Accepting a job always waits: that commit is what makes it durable
/// before the request waits for it. A lease or an end lost with a database crash (only
/// the last fraction of a second, and never one a later durable commit followed, since
/// the log is replayed in order) leaves its job running under an expired lease: the
/// rescuer queues it again and it runs once more.
fn commit_wait(sync: PostgresSync) -> Option<&'static str> {
    match sync {
        PostgresSync::Normal => Some("off"),
        PostgresSync::Full => None,
    }
}

/// A pooled connection idle this long is pinged before use.
const IDLE_CHECK: Duration = Duration::from_secs(1);

pub struct PostgresStore {
    pool: PgPool,
    conns: Arc<conns::Conns>,
    /// Jobs accepted by requests, inserted in groups: provider if new, `None` if the
    /// idempotency key repeated.
    inserts: grouped::Grouped<NewJob, Option<String>>,
    /// Attempts' ends, written in groups: whether the lease was still held.
    finishes: grouped::Grouped<AttemptFinish, bool>,
    /// The server processes of our pool's connections.
    own: listener::OwnBackends,
    /// `synchronous_commit` for leases (see `commit_wait`).
    lease_commit: Option<&'static str>,
    /// Whether other instances may hear our news (sent only then).
    peers: listener::Peers,
    /// This instance announced itself (at its first heartbeat).
    announced: std::sync::atomic::AtomicBool,
    news: News,
    batches: super::postgres_batches::PgBatchStore,
}

impl PostgresStore {
    /// The job an insert's repeated idempotency key names.
    async fn existing(&self, job: &NewJob) -> StoreResult<Inserted> {
        let row = sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE caller = $1 AND idempotency_key = $2"
        ))
        .bind(job.caller.as_deref().unwrap_or(""))
        .bind(&job.idempotency_key);
        let row = on_conn!(self.conns, |c| row.fetch_one(c))?;
        Ok(Inserted::Existing(Box::new(row.try_into()?)))
    }

    /// Connects with the default durability (`PostgresSync::Normal`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with(url, PostgresSync::Normal).await
    }

    /// Connects and applies the migrations (concurrent starts are safe: sqlx migrates
    /// under an advisory lock).
    pub async fn connect_with(url: &str, sync: PostgresSync) -> StoreResult<Self> {
        // The URL may hold a password: errors never repeat it.
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Open(format!("bad Postgres URL: {e}")))?;
        let own = listener::OwnBackends::default();
        let own_for_pool = own.clone();
        let server_port = options.get_port();
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // sqlx pings every connection it hands out: a round trip more per statement.
            // Only connections idle for a while are checked (after a database restart
            // they are all dead); a busy pool's connections were just used, and sqlx
            // drops any connection whose use failed.
            // Our own news need not come back through the listener (see `listener`).
            .after_connect(move |conn, _| {
                let own = own_for_pool.clone();
                Box::pin(async move {
                    own.add(nodelay::backend_pid_and_nodelay(conn, server_port).await?);
                    Ok(())
                })
            })
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_CHECK {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Open(format!("cannot connect to Postgres: {e}")))?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let peers = listener::Peers::default();
        let conns = Arc::new(conns::Conns::new(
            options,
            HOT_CONNECTIONS,
            own.clone(),
            ACQUIRE_TIMEOUT,
        ));
        let inserts = grouped_writes!(conns, writes::insert_jobs);
        let finishes = grouped_writes!(conns, writes::finish_attempts, commit_wait(sync));
        Ok(Self {
            batches: super::postgres_batches::PgBatchStore::new(pool.clone()),
            news: News::start(conns.clone(), peers.clone()),
            peers,
            announced: Default::default(),
            inserts,
            finishes,
            conns,
            pool,
            own,
            lease_commit: commit_wait(sync),
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

/// Notifications sent after the change they announce has committed, by a task of their
/// own, in order, many per statement.
///
/// A `NOTIFY` inside a transaction makes its commit take a server-wide lock that is held
/// through the WAL flush, so every notifying commit of every instance waits for the one
/// before it to reach the disk: the busiest paths (a job queued, an attempt ended) were
/// limited to one flush each in turn. Sent on their own, notifications write nothing that
/// needs flushing and hold the lock only briefly; the changes themselves commit as before.
/// They are hints either way (see `listener`): one lost to a crash between the commit and
/// the notification costs other instances a slow poll, as one missed while their
/// listener reconnects does.
///
/// Nothing is sent while no other instance is there to hear it (see `listener::Peers`):
/// everything this instance does it also signals in-process.
struct News {
    tx: tokio::sync::mpsc::UnboundedSender<(&'static str, String)>,
    peers: listener::Peers,
}

impl News {
    fn start(conns: Arc<conns::Conns>, peers: listener::Peers) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, String)>();
        // Ends when the store (the only sender) is dropped and the queue is sent.
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 512).await > 0 {
                let (channels, payloads): (Vec<&str>, Vec<String>) = batch.drain(..).unzip();
                let sent = async {
                    let notify = sqlx::query(
                        "SELECT count(*) FROM (SELECT pg_notify(c, p) \
                         FROM unnest($1::text[], $2::text[]) AS n(c, p)) s",
                    )
                    .bind(&channels)
                    .bind(&payloads);
                    Ok::<_, StoreError>(on_conn!(conns, |c| notify.execute(c))?)
                }
                .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, news = channels.len(),
                        "cannot notify other instances; they will notice by polling");
                }
            }
        });
        Self { tx, peers }
    }

    fn send(&self, channel: &'static str, payload: String) {
        if self.peers.present() {
            self.send_anyway(channel, payload);
        }
    }

    fn send_anyway(&self, channel: &'static str, payload: String) {
        let _ = self.tx.send((channel, payload));
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

/// A call of `orch_lease` (see migrations/postgres/0003_round_trips.sql): every row
/// carries what the lease read; the job columns are NULL when it took none.
/// The rows of a lease function (`orch_lease` or `orch_insert_and_lease`), called as
/// `$call`: what it read, then the job's columns by name (not `(l.job).*`): a column added
/// to `jobs` later must not change the result type of this statement, prepared on running
/// instances.
macro_rules! lease_select {
    ($call:literal) => {
        concat!(
            "SELECT l.u_now, l.u_cooldown_until, l.u_breaker_open_until, l.u_running, l.u_calls, \
             l.u_tokens, l.u_oldest, l.u_limit, l.u_next_due, j.* FROM ",
            $call,
            " l CROSS JOIN LATERAL (SELECT ",
            job_columns!(),
            " FROM (SELECT (l.job).*) x) j"
        )
    };
}

/// A lease in a transaction of its own (`write`), or the pick of one that writes next;
/// either way the transaction commits as `commit` says (see `commit_wait`).
fn lease_query<'q>(
    req: &'q LeaseRequest,
    write: bool,
    commit: Option<&'static str>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    bind_lease(
        sqlx::query(concat!(
            lease_select!("orch_lease($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
            commit_wait!(11)
        )),
        req,
    )
    .bind(write)
    .bind(commit)
}

/// Binds the lease parameters of `orch_lease` (all but `p_write`).
fn bind_lease<'q>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    req: &'q LeaseRequest,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    q.bind(&req.provider)
        .bind(&req.instance)
        .bind(&req.model)
        .bind(req.lease_ms)
        .bind(i64::from(req.max_jobs))
        .bind(i64::from(req.budget.rpm))
        .bind(i64::from(req.budget.concurrency))
        .bind(req.budget.tpm.map(i64::from))
        .bind(RATE_WINDOW_MS)
}

/// `orch_insert_and_lease` inserted but did not wait for a busy lease lock (`u_limit = -1`).
fn lease_skipped(rows: &[sqlx::postgres::PgRow]) -> StoreResult<bool> {
    use sqlx::Row;
    Ok(match rows {
        [only] => only.try_get::<i64, _>(7)? == -1,
        _ => false,
    })
}

/// The lease that rows of a writing lease function stand for.
fn written_lease(rows: Vec<sqlx::postgres::PgRow>, req: &LeaseRequest) -> StoreResult<Lease> {
    let (head, jobs) = lease_rows(rows)?;
    let jobs = jobs
        .into_iter()
        .map(|row| {
            let job = Job::try_from(row)?;
            Ok(LeasedJob {
                attempt_n: job.attempt_count,
                job,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(head.lease(req, jobs))
}

/// What a lease read about its provider, and what the database decided from it.
struct LeaseHead {
    now: i64,
    usage: budget::Usage,
    /// How many jobs `orch_admit` allowed (0: blocked).
    limit: i64,
    next_due: Option<i64>,
}

/// Splits the rows of `orch_lease` into what it read and the jobs it took.
fn lease_rows(rows: Vec<sqlx::postgres::PgRow>) -> StoreResult<(LeaseHead, Vec<JobRow>)> {
    use sqlx::{FromRow, Row};
    let first = rows
        .first()
        .ok_or_else(|| StoreError::Corrupt("orch_lease returned no row".into()))?;
    let head = LeaseHead {
        now: first.try_get(0)?,
        usage: budget::Usage {
            cooldown_until: first.try_get(1)?,
            breaker_open_until: first.try_get(2)?,
            running: first.try_get(3)?,
            calls: first.try_get(4)?,
            tokens: first.try_get(5)?,
            oldest_second: first.try_get(6)?,
        },
        limit: first.try_get(7)?,
        next_due: first.try_get(8)?,
    };
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<&str>, _>("id")?.is_some() {
            jobs.push(JobRow::from_row(row)?);
        }
    }
    Ok((head, jobs))
}

impl LeaseHead {
    /// The lease to hand out. `budget::admit` stays the rule: it runs again here on what
    /// the database read, and a database that decided otherwise is reported (and fails
    /// debug builds, so every lease of the test suites checks the SQL port).
    fn lease(self, req: &LeaseRequest, jobs: Vec<LeasedJob>) -> Lease {
        let decided = budget::admit(&self.usage, &req.budget, self.now, req.max_jobs);
        let agrees = match decided {
            Ok(limit) => limit == self.limit && jobs.len() as i64 <= limit,
            Err(_) => self.limit == 0 && jobs.is_empty(),
        };
        if !agrees {
            tracing::error!(
                provider = %req.provider, usage = ?self.usage, sql_limit = self.limit,
                rust = ?decided, taken = jobs.len(),
                "orch_admit (Postgres) and budget::admit disagree"
            );
            debug_assert!(agrees, "orch_admit and budget::admit disagree");
        }
        if !jobs.is_empty() {
            // Leased and committed: they run whatever the check above said.
            return Lease {
                drained: (jobs.len() as i64) < self.limit,
                jobs,
                ..Lease::default()
            };
        }
        match decided {
            Err(why) => Lease::blocked(why),
            Ok(_) => Lease {
                next_due_at: self.next_due,
                ..Lease::default()
            },
        }
    }
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
        match self.inserts.submit(job.clone()).await? {
            Some(provider) => {
                self.news.send(CHANNEL_PROVIDER, provider);
                Ok(Inserted::New)
            }
            None => self.existing(job).await,
        }
    }

    async fn insert_and_lease(
        &self,
        job: &NewJob,
        req: &LeaseRequest,
    ) -> StoreResult<(Inserted, Lease)> {
        if req.budget.tpm.is_some() {
            // The tpm lease needs Rust between pick and write: two transactions.
            return super::insert_then_lease(self, job, req).await;
        }
        // One round trip, one commit: insert, then the ordinary lease.
        let provider = job.provider();
        let q = sqlx::query(lease_select!(
            "orch_insert_and_lease($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
             $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"
        ))
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
        let q = bind_lease(q, req);
        let rows = on_conn!(self.conns, |c| q.fetch_all(c))?;
        if rows.is_empty() {
            // The idempotency key repeated: nothing was written.
            return Ok((self.existing(job).await?, Lease::default()));
        }
        let lease = if lease_skipped(&rows)? {
            // Another lease held the provider's lock: the job is queued for the pool.
            Lease::default()
        } else {
            written_lease(rows, req)?
        };
        if !lease.jobs.iter().any(|l| l.job.id == job.id) {
            // The job waits: other instances may lease it.
            self.news.send(CHANNEL_PROVIDER, provider.to_string());
        }
        Ok((Inserted::New, lease))
    }

    async fn insert_jobs(
        &self,
        jobs: &[NewJob],
        refused: &[(String, JobError)],
    ) -> StoreResult<()> {
        if jobs.is_empty() && refused.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut providers: Vec<String> = Vec::new();
        // One statement per chunk of lines: a batch of thousands is a few round trips.
        for chunk in jobs.chunks(1000) {
            for j in chunk {
                let p = j.provider().to_string();
                if !p.is_empty() && !providers.contains(&p) {
                    providers.push(p);
                }
            }
            writes::insert_jobs(&mut tx, chunk).await?;
        }
        if !refused.is_empty() {
            let failed = sqlx::query(
                "UPDATE jobs j SET status = 'failed', finished_at = j.created_at, \
                 status_code = t.code, error = t.error \
                 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS t(id, code, error) \
                 WHERE j.id = t.id AND j.status = 'queued'",
            )
            .bind(
                refused
                    .iter()
                    .map(|(id, _)| id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                refused
                    .iter()
                    .map(|(_, e)| i64::from(e.status))
                    .collect::<Vec<_>>(),
            )
            .bind(
                refused
                    .iter()
                    .map(|(_, e)| error_json(e))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if failed != refused.len() as u64 {
                return Err(StoreError::Corrupt(format!(
                    "{} of {} refused jobs are not among the jobs inserted",
                    refused.len() as u64 - failed,
                    refused.len()
                )));
            }
        }
        notify_providers(&mut tx, &providers).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let get = sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id);
        let row = on_conn!(self.conns, |c| get.fetch_optional(c))?;
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
        // Without tpm nothing depends on the picked rows: lock, read, decide, pick and
        // write are one call of `orch_lease`, one round trip in its own transaction.
        if req.budget.tpm.is_none() {
            let q = lease_query(req, true, self.lease_commit);
            let rows = on_conn!(self.conns, |c| q.fetch_all(c))?;
            return written_lease(rows, req);
        }
        // With tpm each job books its token estimate, which Rust computes from the picked
        // row: pick under the lock, then write, in one transaction.
        let mut tx = self.pool.begin().await?;
        let rows = lease_query(req, false, self.lease_commit)
            .fetch_all(&mut *tx)
            .await?;
        let (head, rows) = lease_rows(rows)?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(head.lease(req, vec![]));
        }
        let now = head.now;
        let taken = mark_leased(rows, req, now)?;
        let ids: Vec<&str> = taken.iter().map(|(l, _)| l.job.id.as_str()).collect();
        let estimates: Vec<i64> = taken.iter().map(|(_, e)| *e).collect();
        // Mark running, open their attempts and book the bucket in one statement.
        sqlx::query(
            "WITH t AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS t(id, tokens)), \
             u AS (UPDATE jobs j SET status = 'running', lease_owner = $3, lease_expires_at = $4, \
                 started_at = COALESCE(j.started_at, $5), attempt_count = j.attempt_count + 1, \
                 hop_tries = j.hop_tries + 1 FROM t WHERE j.id = t.id \
                 RETURNING j.id, j.attempt_count, t.tokens), \
             a AS (INSERT INTO attempts (job_id, n, provider, model, instance, started_at, outcome, tokens) \
                 SELECT u.id, u.attempt_count, $6, $7, $3, $5, 'running', u.tokens FROM u) \
             INSERT INTO provider_usage (provider, second, calls, tokens) VALUES ($6, $8, $9, $10) \
             ON CONFLICT (provider, second) DO UPDATE SET calls = provider_usage.calls + EXCLUDED.calls, \
             tokens = provider_usage.tokens + EXCLUDED.tokens",
        )
        .bind(&ids)
        .bind(&estimates)
        .bind(&req.instance)
        .bind(now + req.lease_ms)
        .bind(now)
        .bind(&req.provider)
        .bind(&req.model)
        .bind(budget::second_of(now))
        .bind(ids.len() as i64)
        .bind(estimates.iter().sum::<i64>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(head.lease(req, taken.into_iter().map(|(l, _)| l).collect()))
    }

    async fn renew_lease(
        &self,
        job_id: &str,
        instance: &str,
        attempt_n: i64,
        lease_ms: i64,
    ) -> StoreResult<bool> {
        let renew = sqlx::query(concat!(
            "UPDATE jobs SET lease_expires_at = ",
            db_now!(),
            " + $1 WHERE id = $2 AND status = 'running' AND lease_owner = $3 AND attempt_count = $4"
        ))
        .bind(lease_ms)
        .bind(job_id)
        .bind(instance)
        .bind(attempt_n);
        let done = on_conn!(self.conns, |c| renew.execute(c))?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_attempt(&self, fin: &AttemptFinish) -> StoreResult<bool> {
        // One call of `orch_finish` (attempt, job and provider state), in a group with
        // the other attempts that end meanwhile; the news follow it.
        let done = self.finishes.submit(fin.clone()).await?;
        let requeue = match &fin.transition {
            Transition::Requeue { provider, .. } => Some(provider),
            _ => None,
        };
        if done {
            // Other instances hear of it: waiters of a finished job re-read it, pools of
            // the provider whose slot freed look again (and of the one a requeue sent it to).
            match requeue {
                Some(to) => self.news.send(CHANNEL_PROVIDER, to.clone()),
                None => self.news.send(CHANNEL_FINISHED, fin.job_id.clone()),
            }
            self.news
                .send(CHANNEL_PROVIDER, format!("slot:{}", fin.provider));
        }
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

    async fn reset_provider_state(&self, provider: &str) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE provider_state SET cooldown_until = 0, consecutive_failures = 0, \
             breaker_open_until = 0 WHERE provider = $1",
        )
        .bind(provider)
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE jobs SET run_at = ",
            db_now!(),
            " WHERE provider = $1 AND status = 'queued' AND run_at > ",
            db_now!()
        ))
        .bind(provider)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
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

    async fn heartbeat(&self, instance: &str, providers: &[String]) -> StoreResult<()> {
        let heard_before = self.peers.heard_so_far();
        // The first beat of this process records the instance's (re)start.
        let starting = !self.announced.load(std::sync::atomic::Ordering::Acquire);
        let (others,): (bool,) = sqlx::query_as(concat!(
            "WITH beat AS (INSERT INTO instances (id, started_at, heartbeat_at, providers) VALUES ($1, ",
            db_now!(),
            ", ",
            db_now!(),
            ", $4) ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, \
             providers = EXCLUDED.providers, started_at = CASE WHEN $3 THEN EXCLUDED.started_at ELSE instances.started_at END \
             RETURNING id) \
             SELECT EXISTS (SELECT 1 FROM instances WHERE id <> $1 AND heartbeat_at > ",
            db_now!(),
            " - $2) FROM beat"
        ))
        .bind(instance)
        .bind(PEER_WINDOW_MS)
        .bind(starting)
        .bind(providers_json(providers))
        .fetch_one(&self.pool)
        .await?;
        self.peers.seen_by_heartbeat(others, heard_before);
        if !self
            .announced
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            // Instances already running learn of us now rather than at their next beat.
            self.news.send_anyway(
                CHANNEL_PROVIDER,
                format!("{}{instance}", listener::ANNOUNCE),
            );
        }
        Ok(())
    }

    async fn instances(&self, since_ms: i64) -> StoreResult<Vec<InstanceInfo>> {
        let rows: Vec<InstanceRow> = sqlx::query_as(
            "SELECT id, started_at, heartbeat_at, providers FROM instances WHERE heartbeat_at > $1 ORDER BY id",
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
        let mark = sqlx::query("UPDATE jobs SET metrics_written = 1 WHERE id = ANY($1)").bind(ids);
        on_conn!(self.conns, |c| mark.execute(c))?;
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
        tokio::spawn(listener::run(
            self.pool.clone(),
            self.own.clone(),
            self.peers.clone(),
            signals,
            stop,
        ));
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use sqlx::{Connection, Executor};

    use super::*;

    /// The server the integration tests use (`ORCH_TEST_POSTGRES_URL`); unreachable fails.
    fn server_url() -> String {
        std::env::var("ORCH_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// A database of its own for one test, on the server of `server_url`.
    struct FreshDatabase {
        admin: PgConnection,
        name: String,
        url: String,
    }

    impl FreshDatabase {
        async fn create() -> Self {
            let admin_url = server_url();
            let mut admin = PgConnection::connect(&admin_url)
                .await
                .unwrap_or_else(|e| panic!("Postgres at {admin_url} is unreachable: {e}"));
            let name = format!("orch_unit_{}", uuid::Uuid::new_v4().simple());
            admin
                .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .await
                .unwrap();
            let (base, _) = admin_url
                .split('?')
                .next()
                .unwrap()
                .rsplit_once('/')
                .unwrap();
            let url = format!("{base}/{name}");
            Self { admin, name, url }
        }

        async fn drop(mut self) {
            let _ = self
                .admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                )))
                .await;
        }
    }

    /// A lease's and an attempt end's statements set their transaction's
    /// `synchronous_commit` as `commit_wait` says (`off` by default), and keep the
    /// server's setting under `ORCH_POSTGRES_SYNCHRONOUS=FULL`.
    #[tokio::test]
    async fn leases_and_ends_commit_as_told() {
        let db = FreshDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await;
        let req = LeaseRequest {
            provider: "p".into(),
            model: "m".into(),
            instance: "i".into(),
            lease_ms: 30_000,
            max_jobs: 1,
            budget: Budget {
                rpm: 10,
                concurrency: 10,
                tpm: None,
            },
        };
        let fin = AttemptFinish {
            job_id: "nope".into(),
            attempt_n: 1,
            instance: "i".into(),
            provider: "p".into(),
            finished_at: 1,
            outcome: AttemptOutcome::Ok,
            status_code: Some(200),
            error: None,
            tokens: None,
            count_tokens: false,
            transition: Transition::Succeed {
                result: "{}".into(),
                usage_prompt: None,
                usage_completion: None,
            },
            effect: ProviderEffect::default(),
        };
        let setting = "SELECT current_setting('synchronous_commit')";
        let result = async {
            let store = store?;
            let server: String = sqlx::query_scalar(setting).fetch_one(&store.pool).await?;
            let mut seen = Vec::new();
            for sync in [PostgresSync::Normal, PostgresSync::Full] {
                let mut tx = store.pool.begin().await?;
                lease_query(&req, true, commit_wait(sync))
                    .fetch_all(&mut *tx)
                    .await?;
                let lease: String = sqlx::query_scalar(setting).fetch_one(&mut *tx).await?;
                tx.rollback().await?;
                let mut tx = store.pool.begin().await?;
                writes::finish_attempts(&mut tx, std::slice::from_ref(&fin), commit_wait(sync))
                    .await?;
                let end: String = sqlx::query_scalar(setting).fetch_one(&mut *tx).await?;
                tx.rollback().await?;
                seen.push((sync, lease, end));
            }
            store.pool.close().await;
            StoreResult::Ok((server, seen))
        }
        .await;
        db.drop().await;
        let (server, seen) = result.unwrap();
        assert_eq!(
            seen,
            [
                (PostgresSync::Normal, "off".to_string(), "off".to_string()),
                (PostgresSync::Full, server.clone(), server)
            ]
        );
    }

    /// `orch_admit` (the lease's budget rule in SQL) decides as `budget::admit` does, on
    /// every combination of a grid around each limit.
    #[tokio::test]
    async fn orch_admit_matches_budget_admit() {
        let db = FreshDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await;

        type Case = (budget::Usage, Budget, u32);
        let now = 1_000_000i64;
        let mut cases: Vec<Case> = Vec::new();
        for cooldown_until in [0, now - 1, now, now + 1] {
            for breaker_open_until in [0, now, now + 1] {
                for running in 0..4 {
                    for calls in 0..5 {
                        for tokens in [0, 99, 100, 101] {
                            for (rpm, concurrency) in [(1, 1), (3, 2), (2, 3), (10, 10)] {
                                for tpm in [None, Some(100)] {
                                    for max_jobs in [0u32, 1, 2, 5] {
                                        let usage = budget::Usage {
                                            cooldown_until,
                                            breaker_open_until,
                                            running,
                                            calls,
                                            tokens,
                                            oldest_second: Some(now / 1000 - 30),
                                        };
                                        let b = Budget {
                                            rpm,
                                            concurrency,
                                            tpm,
                                        };
                                        cases.push((usage, b, max_jobs));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let col = |f: &dyn Fn(&Case) -> Option<i64>| cases.iter().map(f).collect::<Vec<_>>();
        let result = async {
            let store = store?;
            let got: Vec<(i64,)> = sqlx::query_as(
                "SELECT orch_admit(c, b, r, k, t, $9, rpm, conc, tpm, mj) \
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
                 $6::bigint[], $7::bigint[], $8::bigint[], $10::bigint[]) WITH ORDINALITY \
                 AS g(c, b, r, k, t, rpm, conc, tpm, mj, i) ORDER BY i",
            )
            .bind(col(&|c| Some(c.0.cooldown_until)))
            .bind(col(&|c| Some(c.0.breaker_open_until)))
            .bind(col(&|c| Some(c.0.running)))
            .bind(col(&|c| Some(c.0.calls)))
            .bind(col(&|c| Some(c.0.tokens)))
            .bind(col(&|c| Some(i64::from(c.1.rpm))))
            .bind(col(&|c| Some(i64::from(c.1.concurrency))))
            .bind(col(&|c| c.1.tpm.map(i64::from)))
            .bind(now)
            .bind(col(&|c| Some(i64::from(c.2))))
            .fetch_all(&store.pool)
            .await?;
            store.pool.close().await;
            StoreResult::Ok(got)
        }
        .await;
        db.drop().await;
        let got = result.unwrap();
        assert_eq!(got.len(), cases.len());
        let mut admitted = 0;
        for ((usage, b, max_jobs), (sql,)) in cases.iter().zip(got) {
            let rust = budget::admit(usage, b, now, *max_jobs).unwrap_or(0);
            assert_eq!(sql, rust, "{usage:?} {b:?} max_jobs {max_jobs}");
            admitted += usize::from(rust > 0);
        }
        // The grid exercises both outcomes, and limits above one.
        assert!(admitted > 0 && admitted < cases.len());
    }

    /// A group of attempt ends (one statement, `orch_finish` per attempt in order) leaves
    /// what the same ends one by one would: every transition kind, an attempt no longer
    /// ours, token corrections, and provider effects in order (a success between two
    /// failures resets the count; the breaker opens at its threshold).
    #[tokio::test]
    async fn a_group_of_ends_writes_what_ends_one_by_one_would() {
        let db = FreshDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await;
        let job = |id: &str, provider: &str| NewJob {
            id: id.into(),
            task: "t".into(),
            chain: vec![provider.into(), "q".into()],
            hop: 0,
            request: "{}".into(),
            stream: false,
            priority: 0,
            caller: None,
            idempotency_key: None,
            pinned_instance: None,
            created_at: 1,
            deadline_at: i64::MAX,
            batch_id: None,
            custom_id: None,
        };
        let lease = |provider: &str, tpm: Option<u32>| LeaseRequest {
            provider: provider.into(),
            model: "m".into(),
            instance: "i".into(),
            lease_ms: 30_000,
            max_jobs: 10,
            budget: Budget {
                rpm: 100,
                concurrency: 100,
                tpm,
            },
        };
        let fin = |id: &str, provider: &str, transition: Transition, success: Option<bool>| {
            AttemptFinish {
                job_id: id.into(),
                attempt_n: 1,
                instance: "i".into(),
                provider: provider.into(),
                finished_at: 5,
                outcome: AttemptOutcome::Ok,
                status_code: Some(200),
                error: None,
                tokens: None,
                count_tokens: false,
                transition,
                effect: ProviderEffect {
                    cooldown_until: None,
                    success,
                    breaker: Some((2, 60_000)),
                },
            }
        };
        let ok = || Transition::Succeed {
            result: "{\"ok\":1}".into(),
            usage_prompt: Some(3),
            usage_completion: Some(4),
        };
        let failed = || Transition::Fail {
            error: JobError {
                status: 502,
                kind: "provider_error".into(),
                message: "bad".into(),
                code: None,
                param: None,
                retry_after: None,
            },
            partial: None,
        };
        let with_tokens = |id: &str, n: i64| {
            let mut f = fin(id, "t", ok(), None);
            f.tokens = Some(n);
            f.count_tokens = true;
            f
        };
        // A failed assertion must not leave the database behind: caught, dropped, resumed.
        let result = std::panic::AssertUnwindSafe(async {
            let store = store?;
            for id in ["a", "b", "c", "d", "e", "f"] {
                store.insert_job(&job(id, "p")).await?;
            }
            for id in ["t1", "t2"] {
                store.insert_job(&job(id, "t")).await?;
            }
            assert_eq!(store.lease(&lease("p", None)).await?.jobs.len(), 6);
            for _ in 0..2 {
                // Under tpm a lease takes one job, with a token estimate.
                assert_eq!(
                    store.lease(&lease("t", Some(1_000_000))).await?.jobs.len(),
                    1
                );
            }
            let first = vec![
                fin("a", "p", failed(), Some(false)),
                fin("b", "p", ok(), Some(true)),
                fin("zz", "p", ok(), Some(true)),
                fin("c", "p", failed(), Some(false)),
                fin(
                    "d",
                    "p",
                    Transition::Requeue {
                        hop: 1,
                        provider: "q".into(),
                        run_at: 9,
                    },
                    None,
                ),
                with_tokens("t1", 7),
                with_tokens("t2", 5),
            ];
            let mut conn = store.pool.acquire().await?;
            let moved = writes::finish_attempts(&mut conn, &first, None).await?;
            assert_eq!(moved, [true, true, false, true, true, true, true]);
            let states = store.provider_states().await?;
            let p = states.iter().find(|s| s.provider == "p").unwrap();
            assert_eq!((p.consecutive_failures, p.breaker_open_until), (1, 0));
            let tokens: i64 = sqlx::query_scalar(
                "SELECT sum(tokens)::bigint FROM provider_usage WHERE provider = 't'",
            )
            .fetch_one(&mut *conn)
            .await?;
            assert_eq!(tokens, 12, "the estimates replaced by what the calls used");

            let second = vec![
                fin("e", "p", failed(), Some(false)),
                fin("f", "p", failed(), Some(false)),
            ];
            let moved = writes::finish_attempts(&mut conn, &second, None).await?;
            assert_eq!(moved, [true, true]);
            let states = store.provider_states().await?;
            let p = states.iter().find(|s| s.provider == "p").unwrap();
            assert_eq!(p.consecutive_failures, 3);
            assert!(p.breaker_open_until > 0, "{p:?}");

            let a = store.get_job("a").await?.unwrap();
            assert_eq!((a.status, a.status_code), (JobStatus::Failed, Some(502)));
            let b = store.get_job("b").await?.unwrap();
            assert_eq!(
                (b.status, b.result.as_deref(), b.usage_prompt, b.finished_at),
                (JobStatus::Succeeded, Some("{\"ok\":1}"), Some(3), Some(5))
            );
            let d = store.get_job("d").await?.unwrap();
            assert_eq!(
                (d.status, d.provider.as_str(), d.hop, d.hops, d.run_at),
                (JobStatus::Queued, "q", 1, 1, 9)
            );
            assert_eq!(d.finished_at, None);
            assert_eq!(store.get_attempts("b").await?[0].finished_at, Some(5));
            drop(conn);
            store.pool.close().await;
            StoreResult::Ok(())
        })
        .catch_unwind()
        .await;
        db.drop().await;
        match result {
            Ok(outcome) => outcome.unwrap(),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
