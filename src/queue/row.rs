//! Row shapes shared by both backends: both store times and counters as 64-bit integers
//! and JSON as text, so one decoding serves SQLite and Postgres.

use super::{Attempt, Job, JobError, JobStatus, StoreError};

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
