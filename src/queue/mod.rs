//! The durable queue: the job/attempt model and the one trait every database backend
//! implements. The queue knows nothing of HTTP or of provider wire formats.
//!
//! A job moves `queued → running → succeeded | failed | cancelled`. A retry puts it back
//! to `queued` with a later `run_at`; a hop moves it to another provider of its chain.
//! Budgets (rpm, tpm, concurrency, cool-down, breaker) are checked in the same transaction
//! that leases, so every instance sharing the database sees the same numbers.

pub mod batches;
pub mod budget;
pub mod model;
pub mod postgres;
mod postgres_batches;
pub mod row;
pub mod signals;
pub mod sqlite;
mod sqlite_batches;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub use batches::BatchStore;
pub use model::*;
pub use postgres_batches::PgBatchStore;
pub use signals::Signals;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A write that could not be committed (the reason is SQLite's).
    #[error("database error: {0}")]
    Write(String),
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("{0}")]
    Open(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which running jobs the rescuer takes back.
#[derive(Debug, Clone, Copy)]
pub enum RescueScope<'a> {
    /// Jobs whose lease expired: their instance stopped renewing.
    Expired,
    /// Every running job of this instance (a previous life of it), expired or not.
    Owner(&'a str),
    /// Every running job: a SQLite process starting owns the file alone, so any running
    /// job was left by a process that died.
    All,
}

/// `QueueStore::insert_and_lease` in two transactions: the insert, then (for a new job)
/// the lease.
pub async fn insert_then_lease<S: QueueStore + ?Sized>(
    store: &S,
    job: &NewJob,
    lease: &LeaseRequest,
) -> StoreResult<(Inserted, Lease)> {
    let inserted = store.insert_job(job).await?;
    let leased = match inserted {
        Inserted::New => store.lease(lease).await?,
        Inserted::Existing(_) => Lease::default(),
    };
    Ok((inserted, leased))
}

/// Everything the gateway asks of its database. One implementation per backend
/// (SQLite, Postgres), one conformance suite run against both.
#[async_trait]
pub trait QueueStore: Send + Sync + 'static {
    /// Which backend this is, for `/healthz` and logs.
    fn backend(&self) -> &'static str;

    /// Files and batches (OpenAI Batch API), where this backend has them.
    fn batches(&self) -> Option<&dyn BatchStore> {
        None
    }

    /// Milliseconds since the epoch by this store's clock (the database's, where shared).
    async fn now_ms(&self) -> StoreResult<i64>;

    /// Inserts a job, or returns the existing one when `(caller, idempotency_key)` repeats.
    async fn insert_job(&self, job: &NewJob) -> StoreResult<Inserted>;

    /// Inserts a job and, when it is new, runs `lease` right after, for a caller that has a
    /// free call slot at hand (accept and lease in one go). The lease is the ordinary one:
    /// it may pick an older job than this one, or none. Backends that can do both in one
    /// transaction do (one commit instead of two); the default does one after the other.
    async fn insert_and_lease(
        &self,
        job: &NewJob,
        lease: &LeaseRequest,
    ) -> StoreResult<(Inserted, Lease)> {
        insert_then_lease(self, job, lease).await
    }

    /// Inserts many jobs in one transaction (batch lines). Idempotency keys are not used.
    /// The jobs named in `refused` (a batch line whose request is invalid) are inserted
    /// failed with their error, finished at their creation: no pool, upkeep or crash
    /// ever sees them queued.
    async fn insert_jobs(&self, jobs: &[NewJob], refused: &[(String, JobError)])
    -> StoreResult<()>;

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>>;

    async fn get_attempts(&self, id: &str) -> StoreResult<Vec<Attempt>>;

    /// Leases up to `req.max_jobs` eligible jobs of one provider within its budgets.
    async fn lease(&self, req: &LeaseRequest) -> StoreResult<Lease>;

    /// Extends the lease of a running job; `false` when the job is no longer ours
    /// (cancelled, or rescued after our lease expired): the call must stop.
    /// `attempt_n`: the attempt the caller holds; a newer attempt of the same job (leased
    /// again after this one's lease was lost) is not the caller's.
    async fn renew_lease(
        &self,
        job_id: &str,
        instance: &str,
        attempt_n: i64,
        lease_ms: i64,
    ) -> StoreResult<bool>;

    /// Records the end of an attempt and moves the job on, in one transaction.
    /// `false` when the job was no longer ours; nothing is written then but the attempt.
    async fn finish_attempt(&self, fin: &AttemptFinish) -> StoreResult<bool>;

    /// Cancels a job that is not finished yet; returns the job as it is afterwards.
    async fn cancel_job(&self, id: &str) -> StoreResult<Option<Job>>;

    /// Re-queues running jobs in `scope`, recording their attempt as `lost`. A pinned
    /// (streaming) job fails instead: its client was on the instance that stopped.
    /// Also drops budget bookkeeping that has left the rate window.
    /// Returns the providers that received work.
    async fn rescue(&self, scope: RescueScope<'_>) -> StoreResult<Vec<String>>;

    /// Puts this instance's running jobs back to `queued` at shutdown (attempt `released`).
    async fn release_leases(&self, instance: &str) -> StoreResult<Vec<String>>;

    /// Up to `limit` jobs queued on `provider` (any `run_at`), lease order.
    async fn queued_on(&self, provider: &str, limit: i64) -> StoreResult<Vec<Job>>;

    /// Moves queued jobs to another hop of their chain without an attempt (their provider
    /// cannot take calls now: cooling down, breaker open). A job that was leased or moved
    /// meanwhile is left alone. Returns how many moved.
    async fn move_queued(&self, moves: &[QueuedMove]) -> StoreResult<u64>;

    /// Fails a job still queued on `from` (every provider of its chain is unavailable past
    /// its deadline). `false` when it was leased or moved meanwhile.
    async fn fail_queued(
        &self,
        job_id: &str,
        from: &str,
        error: &JobError,
        at: i64,
    ) -> StoreResult<bool>;

    /// Queued jobs per provider.
    async fn queue_depths(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Running jobs per provider.
    async fn running_counts(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Cool-down and breaker state of every provider that has any.
    async fn provider_states(&self) -> StoreResult<Vec<ProviderState>>;

    /// Forgets a provider's cool-down, failure count and open breaker, and makes the jobs
    /// queued on it due now (they waited out a cool-down or back-off): its endpoint or key
    /// changed, so what the old one did says nothing of the new.
    async fn reset_provider_state(&self, provider: &str) -> StoreResult<()>;

    /// Jobs finished in `[from_ms, until_ms)`, oldest first, at most `limit` after `after_id`.
    async fn finished_jobs(
        &self,
        from_ms: i64,
        until_ms: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<Job>>;

    /// Cheap round trip for `/healthz`.
    async fn ping(&self) -> StoreResult<()>;

    /// Records that `instance` is alive with `providers` in its config (inserting it on
    /// first call; the first call of a process also records its start).
    async fn heartbeat(&self, instance: &str, providers: &[String]) -> StoreResult<()>;

    /// Instances whose last heartbeat is newer than `since_ms`.
    async fn instances(&self, since_ms: i64) -> StoreResult<Vec<InstanceInfo>>;

    /// Finished jobs finished before `before_ms` whose JSONL line is not confirmed written.
    async fn unwritten_metrics(&self, before_ms: i64, limit: i64) -> StoreResult<Vec<Job>>;

    /// Confirms that these jobs' JSONL lines are on disk.
    async fn mark_metrics_written(&self, ids: &[String]) -> StoreResult<()>;

    /// Deletes up to `limit` jobs finished before `before_ms`, with their attempts.
    /// Returns how many jobs were deleted.
    async fn purge_finished(&self, before_ms: i64, limit: i64) -> StoreResult<u64>;

    /// Starts delivering other instances' wake-ups ("job queued for P", "job J finished")
    /// into `signals` until `stop`. Backends without other instances do nothing.
    fn start_listener(&self, _signals: Arc<Signals>, _stop: CancellationToken) {}
}
