//! Job, attempt and provider-state records as the store reads and writes them.

use serde::{Deserialize, Serialize};

/// Where a job stands. Stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// The rpm/tpm window. An upstream counts calls when they arrive, a little after we start
/// them (connection set-up, TLS): the window is held 500 ms longer than a minute so the
/// upstream never sees more than `rpm` calls in any 60 s of its own.
pub const RATE_WINDOW_MS: i64 = 60_500;

/// Interactive requests are leased before batch lines under the same budgets.
pub const PRIORITY_INTERACTIVE: i64 = 0;
pub const PRIORITY_BATCH: i64 = 10;

/// The error a failed job answers with, already in the terms of the HTTP contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// HTTP status returned to the caller.
    pub status: u16,
    /// OpenAI error `type` (`provider_error`, `provider_server_error`, `rate_limit`, …).
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The request field at fault, where the upstream named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// Seconds, where a retry time applies (429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    /// Route name.
    pub task: String,
    /// Providers in the order they are tried.
    pub chain: Vec<String>,
    /// Index into `chain` of the first provider to try (earlier ones may be cooling down).
    pub hop: usize,
    /// The OpenAI request body, defaults applied, as JSON text.
    pub request: String,
    pub stream: bool,
    pub priority: i64,
    /// Hash of the caller's API key (`None` without auth).
    pub caller: Option<String>,
    pub idempotency_key: Option<String>,
    /// Only this instance may lease the job (streams: the instance holding the connection).
    pub pinned_instance: Option<String>,
    pub created_at: i64,
    /// Past this moment a cool-down is no longer waited out.
    pub deadline_at: i64,
    pub batch_id: Option<String>,
    pub custom_id: Option<String>,
}

impl NewJob {
    /// `chain[hop]`: the provider whose queue the job goes to.
    pub fn provider(&self) -> &str {
        self.chain.get(self.hop).map_or("", String::as_str)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub task: String,
    pub status: JobStatus,
    pub priority: i64,
    pub chain: Vec<String>,
    pub hop: usize,
    /// Moves to another provider so far (retries on the same provider do not count).
    pub hops: i64,
    /// `chain[hop]`: the provider whose queue holds the job (or that answered it).
    pub provider: String,
    pub request: String,
    pub stream: bool,
    pub caller: Option<String>,
    pub idempotency_key: Option<String>,
    pub pinned_instance: Option<String>,
    pub run_at: i64,
    pub deadline_at: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    /// Attempts on the current hop (reset by a hop); drives `max_retries`.
    pub hop_tries: i64,
    /// Attempts in all.
    pub attempt_count: i64,
    pub created_at: i64,
    /// When the first attempt started (queue wait = started − created).
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// HTTP status of the outcome.
    pub status_code: Option<i64>,
    /// The chat completion (JSON text) of a succeeded job.
    pub result: Option<String>,
    pub error: Option<JobError>,
    pub usage_prompt: Option<i64>,
    pub usage_completion: Option<i64>,
    pub batch_id: Option<String>,
    pub custom_id: Option<String>,
    /// The instance that finished the job.
    pub finished_by: Option<String>,
}

#[cfg(test)]
impl Job {
    /// A job running at `hop` of `chain`, for unit tests (adjust it with `..`).
    pub fn running_for_test(chain: &[&str], hop: usize, hop_tries: i64) -> Self {
        Self {
            id: "j".into(),
            task: "PLAN".into(),
            status: JobStatus::Running,
            priority: 0,
            chain: chain.iter().map(|s| s.to_string()).collect(),
            hop,
            provider: chain[hop].to_string(),
            request: "{}".into(),
            stream: false,
            caller: None,
            idempotency_key: None,
            pinned_instance: None,
            run_at: 0,
            deadline_at: 100_000,
            lease_owner: Some("me".into()),
            lease_expires_at: Some(30_000),
            hop_tries,
            attempt_count: hop_tries,
            created_at: 0,
            started_at: Some(0),
            finished_at: None,
            status_code: None,
            result: None,
            error: None,
            usage_prompt: None,
            usage_completion: None,
            batch_id: None,
            custom_id: None,
            finished_by: None,
            hops: 0,
        }
    }
}

/// The answer to an insert.
#[derive(Debug, Clone)]
pub enum Inserted {
    New,
    /// The idempotency key was seen before: this is that job.
    Existing(Box<Job>),
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// In flight.
    Running,
    Ok,
    /// Failed, retried on the same provider.
    Retry,
    /// Failed, the job moved to another provider.
    Hop,
    /// Failed, the job waits for the provider's cool-down.
    Cooldown,
    /// Failed, the job failed.
    Failed,
    /// The job was cancelled while this attempt ran.
    Cancelled,
    /// The instance running it died; the lease expired and the job was re-queued.
    Lost,
    /// The instance shut down and gave the job back.
    Released,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Ok => "ok",
            Self::Retry => "retry",
            Self::Hop => "hop",
            Self::Cooldown => "cooldown",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Lost => "lost",
            Self::Released => "released",
        }
    }
}

/// One try of one job on one provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    pub job_id: String,
    pub n: i64,
    pub provider: String,
    pub model: String,
    pub instance: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub status_code: Option<i64>,
    pub outcome: String,
    pub error: Option<String>,
    pub tokens: i64,
}

/// Limits of one provider, enforced across every instance sharing the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub rpm: u32,
    pub concurrency: u32,
    pub tpm: Option<u32>,
}

/// What a worker asks for.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub provider: String,
    /// The upstream model, recorded in the attempt.
    pub model: String,
    pub instance: String,
    pub lease_ms: i64,
    pub max_jobs: u32,
    pub budget: Budget,
}

/// Why a provider cannot start another call right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Cooling down after a 429 until this moment (ms).
    Cooldown(i64),
    /// The circuit breaker is open until this moment (ms).
    Breaker(i64),
    /// `rpm` call starts already happened in the last 60 s; the oldest leaves the window then.
    Rpm(i64),
    /// `tpm` tokens already used in the last 60 s; the oldest leaves the window then.
    Tpm(i64),
    /// `concurrency` calls are in flight; wait for one to finish.
    Concurrency,
}

/// A job handed to a worker with the number of its new attempt.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    pub job: Job,
    pub attempt_n: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Lease {
    pub jobs: Vec<LeasedJob>,
    /// Set when the budget (not the queue) stopped the lease.
    pub blocked: Option<Blocked>,
    /// The earliest `run_at` of a job that is queued but not yet due.
    pub next_due_at: Option<i64>,
    /// A lease that took jobs took every due one it found, fewer than the budget and the
    /// request allowed: another lease right away would most likely find none. (A lease
    /// that took none says when the next job is due instead.)
    pub drained: bool,
}

/// What happens to the job after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Succeed {
        result: String,
        usage_prompt: Option<i64>,
        usage_completion: Option<i64>,
    },
    /// `partial`: what a broken stream had produced, kept as the job's result.
    Fail {
        error: JobError,
        partial: Option<String>,
    },
    /// Back to `queued` on `chain[hop]` at `run_at`; `hop_tries` resets when the hop changes.
    Requeue {
        hop: usize,
        provider: String,
        run_at: i64,
    },
}

/// Effect of an attempt on its provider's shared state.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProviderEffect {
    /// Extend the provider's cool-down to at least this moment.
    pub cooldown_until: Option<i64>,
    /// `Some(true)`: a success (resets the breaker); `Some(false)`: a failure counted by it.
    pub success: Option<bool>,
    /// Breaker settings: open after this many consecutive failures, for this long (ms).
    pub breaker: Option<(u32, i64)>,
}

/// The end of an attempt, written in one transaction.
#[derive(Debug, Clone)]
pub struct AttemptFinish {
    pub job_id: String,
    pub attempt_n: i64,
    pub instance: String,
    pub provider: String,
    pub finished_at: i64,
    pub outcome: AttemptOutcome,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    /// Tokens the attempt used (prompt + completion), for tpm.
    pub tokens: Option<i64>,
    /// The provider has a tpm budget: correct its token count with `tokens`.
    pub count_tokens: bool,
    pub transition: Transition,
    pub effect: ProviderEffect,
}

/// Shared state of a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderState {
    pub provider: String,
    pub cooldown_until: i64,
    pub consecutive_failures: i64,
    pub breaker_open_until: i64,
}

/// An instance sharing the database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    /// The providers in its config, as of its last heartbeat.
    pub providers: Vec<String>,
}

/// A queued job sent on to another provider of its chain.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMove {
    pub job_id: String,
    /// The provider it is queued on now; the move applies only if that is still so.
    pub from: String,
    pub hop: usize,
    pub to: String,
}
