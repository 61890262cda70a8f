//! Row shapes shared by both backends: both store times and counters as 64-bit integers
//! and JSON as text, so one decoding serves SQLite and Postgres.

use super::{
    Attempt, AttemptOutcome, Blocked, InstanceInfo, Job, JobError, JobStatus, Lease, LeaseRequest,
    LeasedJob, ProviderState, RescueScope, StoreError, StoreResult,
};

/// The columns of `jobs`, in the order `JobRow` reads them (a macro so that queries stay
/// `&'static str`, which sqlx requires of SQL text).
#[macro_export]
macro_rules! job_columns {
    () => {
        "id, task, status, priority, chain, hop, hops, provider, request, stream, caller, \
         idempotency_key, pinned_instance, run_at, deadline_at, lease_owner, lease_expires_at, hop_tries, \
         attempt_count, created_at, started_at, finished_at, status_code, result, error, usage_prompt, \
         usage_completion, batch_id, custom_id, finished_by"
    };
}

/// The columns of `attempts`, in the order `AttemptRow` reads them.
#[macro_export]
macro_rules! attempt_columns {
    () => {
        "job_id, n, provider, model, instance, started_at, finished_at, status_code, outcome, error, tokens"
    };
}

#[derive(sqlx::FromRow)]
pub struct JobRow {
    id: String,
    task: String,
    status: String,
    priority: i64,
    chain: String,
    hop: i64,
    hops: i64,
    provider: String,
    request: String,
    stream: i64,
    caller: String,
    idempotency_key: Option<String>,
    pinned_instance: Option<String>,
    run_at: i64,
    deadline_at: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<i64>,
    hop_tries: i64,
    attempt_count: i64,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    status_code: Option<i64>,
    result: Option<String>,
    error: Option<String>,
    usage_prompt: Option<i64>,
    usage_completion: Option<i64>,
    batch_id: Option<String>,
    custom_id: Option<String>,
    finished_by: Option<String>,
}

impl JobRow {
    /// Reads a row selected with `job_columns!()` on the SQLite writer's connection.
    pub fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(JobRow {
            id: r.get(0)?,
            task: r.get(1)?,
            status: r.get(2)?,
            priority: r.get(3)?,
            chain: r.get(4)?,
            hop: r.get(5)?,
            hops: r.get(6)?,
            provider: r.get(7)?,
            request: r.get(8)?,
            stream: r.get(9)?,
            caller: r.get(10)?,
            idempotency_key: r.get(11)?,
            pinned_instance: r.get(12)?,
            run_at: r.get(13)?,
            deadline_at: r.get(14)?,
            lease_owner: r.get(15)?,
            lease_expires_at: r.get(16)?,
            hop_tries: r.get(17)?,
            attempt_count: r.get(18)?,
            created_at: r.get(19)?,
            started_at: r.get(20)?,
            finished_at: r.get(21)?,
            status_code: r.get(22)?,
            result: r.get(23)?,
            error: r.get(24)?,
            usage_prompt: r.get(25)?,
            usage_completion: r.get(26)?,
            batch_id: r.get(27)?,
            custom_id: r.get(28)?,
            finished_by: r.get(29)?,
        })
    }
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(r: JobRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("job {}: {what}", r.id));
        let status = JobStatus::parse(&r.status).ok_or_else(|| corrupt("status"))?;
        let chain: Vec<String> = serde_json::from_str(&r.chain).map_err(|_| corrupt("chain"))?;
        let error = match r.error.as_deref() {
            None => None,
            Some(e) => Some(serde_json::from_str::<JobError>(e).map_err(|_| corrupt("error"))?),
        };
        Ok(Job {
            task: r.task,
            status,
            priority: r.priority,
            chain,
            hop: usize::try_from(r.hop).map_err(|_| corrupt("hop"))?,
            hops: r.hops,
            provider: r.provider,
            request: r.request,
            stream: r.stream != 0,
            caller: Some(r.caller).filter(|c| !c.is_empty()),
            idempotency_key: r.idempotency_key,
            pinned_instance: r.pinned_instance,
            run_at: r.run_at,
            deadline_at: r.deadline_at,
            lease_owner: r.lease_owner,
            lease_expires_at: r.lease_expires_at,
            hop_tries: r.hop_tries,
            attempt_count: r.attempt_count,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            status_code: r.status_code,
            result: r.result,
            error,
            usage_prompt: r.usage_prompt,
            usage_completion: r.usage_completion,
            batch_id: r.batch_id,
            custom_id: r.custom_id,
            finished_by: r.finished_by,
            id: r.id,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct AttemptRow {
    job_id: String,
    n: i64,
    provider: String,
    model: String,
    instance: String,
    started_at: i64,
    finished_at: Option<i64>,
    status_code: Option<i64>,
    outcome: String,
    error: Option<String>,
    tokens: i64,
}

impl From<AttemptRow> for Attempt {
    fn from(r: AttemptRow) -> Self {
        Attempt {
            job_id: r.job_id,
            n: r.n,
            provider: r.provider,
            model: r.model,
            instance: r.instance,
            started_at: r.started_at,
            finished_at: r.finished_at,
            status_code: r.status_code,
            outcome: r.outcome,
            error: r.error,
            tokens: r.tokens,
        }
    }
}

/// A rough token estimate for tpm before the real usage is known: ~4 bytes per token of
/// the request plus the completion budget it asks for.
pub fn estimate_tokens(request: &str) -> i64 {
    let max_tokens = serde_json::from_str::<serde_json::Value>(request)
        .ok()
        .and_then(|v| {
            v.get("max_tokens")
                .or_else(|| v.get("max_completion_tokens"))
                .and_then(|m| m.as_i64())
        })
        .unwrap_or(0);
    (request.len() as i64) / 4 + max_tokens
}

/// The error stored on a job, as JSON text.
pub fn error_json(e: &JobError) -> String {
    serde_json::to_string(e).unwrap_or_else(|_| "{}".into())
}

/// The chain as stored.
pub fn chain_json(chain: &[String]) -> String {
    serde_json::to_string(chain).unwrap_or_else(|_| "[]".into())
}

/// The error a cancelled job answers with.
pub fn cancelled_error() -> JobError {
    JobError {
        status: 499,
        kind: "cancelled".into(),
        message: "the job was cancelled".into(),
        code: Some("cancelled".into()),
        param: None,
        retry_after: None,
    }
}

/// The error of a stream whose instance stopped: its client was connected there, so
/// nobody can receive the answer any more and the job ends instead of running again.
pub fn orphaned_stream_error() -> JobError {
    JobError {
        status: 502,
        kind: "provider_server_error".into(),
        message: "the instance serving this stream stopped before it finished".into(),
        code: None,
        param: None,
        retry_after: None,
    }
}

/// The error recorded on an attempt that a rescue or a release ended.
pub fn interrupted_attempt_error(outcome: AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Released => "instance shut down before the call finished",
        _ => "lease expired: the instance running this attempt stopped",
    }
}

impl Lease {
    /// A lease that the budget stopped.
    pub fn blocked(why: Blocked) -> Self {
        Lease {
            blocked: Some(why),
            ..Lease::default()
        }
    }
}

/// The tokens a lease books for a job before its real usage is known: only providers
/// with a tpm budget count them.
pub fn lease_estimate(req: &LeaseRequest, job: &Job) -> i64 {
    if req.budget.tpm.is_some() {
        estimate_tokens(&job.request)
    } else {
        0
    }
}

/// The picked rows as the lease is about to write them (running, owned, one attempt more),
/// each with its token estimate. How many may be taken (tpm included) was decided by
/// `budget::admit` before the pick.
pub fn mark_leased(
    rows: Vec<JobRow>,
    req: &LeaseRequest,
    now: i64,
) -> StoreResult<Vec<(LeasedJob, i64)>> {
    let lease_until = now + req.lease_ms;
    rows.into_iter()
        .map(|row| {
            let mut job = Job::try_from(row)?;
            let estimate = lease_estimate(req, &job);
            job.status = JobStatus::Running;
            job.lease_owner = Some(req.instance.clone());
            job.lease_expires_at = Some(lease_until);
            job.started_at = job.started_at.or(Some(now));
            job.attempt_count += 1;
            job.hop_tries += 1;
            let attempt_n = job.attempt_count;
            Ok((LeasedJob { job, attempt_n }, estimate))
        })
        .collect()
}

impl RescueScope<'_> {
    /// The scope as the rescue query's filters: the lease owner (any when `None`), and
    /// whether only expired leases count.
    pub fn filters(&self) -> (Option<&str>, bool) {
        match *self {
            RescueScope::Expired => (None, true),
            RescueScope::Owner(o) => (Some(o), false),
            RescueScope::All => (None, false),
        }
    }
}

/// `provider, cooldown_until, consecutive_failures, breaker_open_until`, as selected.
pub type ProviderStateRow = (String, i64, i64, i64);

impl From<ProviderStateRow> for ProviderState {
    fn from(
        (provider, cooldown_until, consecutive_failures, breaker_open_until): ProviderStateRow,
    ) -> Self {
        ProviderState {
            provider,
            cooldown_until,
            consecutive_failures,
            breaker_open_until,
        }
    }
}

/// `id, started_at, heartbeat_at, providers`, as selected.
pub type InstanceRow = (String, i64, i64, String);

impl From<InstanceRow> for InstanceInfo {
    fn from((id, started_at, heartbeat_at, providers): InstanceRow) -> Self {
        InstanceInfo {
            id,
            started_at,
            heartbeat_at,
            // Written by `providers_json`; anything else reads as no providers.
            providers: serde_json::from_str(&providers).unwrap_or_default(),
        }
    }
}

/// How an instance's providers are stored.
pub fn providers_json(providers: &[String]) -> String {
    serde_json::to_string(providers).unwrap_or_else(|_| "[]".into())
}
