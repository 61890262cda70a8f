//! OpenAI Files and Batches as the store keeps them. A batch's lines are ordinary jobs
//! (`jobs.batch_id`, `jobs.custom_id`), so they share the queue, budgets and retries;
//! this trait holds only the batch row, the files, and the few reads of a batch's jobs.
//!
//! Kept apart from `QueueStore` so that a backend can offer the queue without batches
//! (`QueueStore::batches` returns `None` and the endpoints answer 501).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Job, JobError, StoreError, StoreResult};

/// Where a batch stands (OpenAI's names). Stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    Expired,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Validating,
            Self::InProgress,
            Self::Finalizing,
            Self::Completed,
            Self::Failed,
            Self::Cancelling,
            Self::Cancelled,
            Self::Expired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Expired
        )
    }
}

/// One problem found while validating an input file (OpenAI's `errors.data[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line of the input file, when the problem is on one line.
    pub line: Option<u64>,
}

/// A file as listed (without its content).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    pub id: String,
    pub caller: Option<String>,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub created_at: i64,
}

/// A file to insert.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub meta: StoredFile,
    pub content: Vec<u8>,
}

/// A batch as stored. Times are milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub id: String,
    pub caller: Option<String>,
    pub status: BatchStatus,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// JSON object text.
    pub metadata: Option<String>,
    pub errors: Vec<LineError>,
    pub total: i64,
    /// Final counts (set when the batch ends; live counts come from the jobs).
    pub completed: i64,
    pub failed: i64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

/// A batch's jobs by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl JobCounts {
    pub fn unfinished(&self) -> i64 {
        self.queued + self.running
    }

    pub fn add(&mut self, status: &str, n: i64) {
        match status {
            "queued" => self.queued += n,
            "running" => self.running += n,
            "succeeded" => self.succeeded += n,
            "failed" => self.failed += n,
            "cancelled" => self.cancelled += n,
            _ => {}
        }
    }
}

/// How a batch ends: its status, final counts and produced files, written at once.
#[derive(Debug, Clone)]
pub struct BatchEnd {
    pub from: BatchStatus,
    pub to: BatchStatus,
    pub completed: i64,
    pub failed: i64,
    pub output: Option<NewFile>,
    pub error: Option<NewFile>,
    pub at: i64,
}

/// The error written on the jobs of a batch that was cancelled or expired before they ran.
pub fn batch_job_error(code: &str, message: &str) -> JobError {
    JobError {
        status: 499,
        kind: "cancelled".into(),
        message: message.into(),
        code: Some(code.into()),
        param: None,
        retry_after: None,
    }
}

/// The order of a list: OpenAI's `order` query parameter (`desc`, newest first, by default).
/// Ids are time-ordered, so creation order is id order.
#[derive(Debug, Clone, Copy)]
pub enum ListOrder {
    Asc,
    Desc,
}

/// Batch and file persistence. Every state change is conditional on the state it leaves,
/// so several instances (or a restarted one) can run the finalizer at once.
#[async_trait]
pub trait BatchStore: Send + Sync {
    async fn insert_file(&self, file: &NewFile) -> StoreResult<()>;

    async fn get_file(&self, id: &str) -> StoreResult<Option<StoredFile>>;

    async fn file_content(&self, id: &str) -> StoreResult<Option<Vec<u8>>>;

    /// In `order` of creation, after the cursor `after` (an id), at most `limit`.
    async fn list_files(
        &self,
        caller: Option<&str>,
        purpose: Option<&str>,
        after: Option<&str>,
        order: ListOrder,
        limit: i64,
    ) -> StoreResult<Vec<StoredFile>>;

    /// `false` when there was no such file.
    async fn delete_file(&self, id: &str) -> StoreResult<bool>;

    async fn insert_batch(&self, batch: &Batch) -> StoreResult<()>;

    async fn get_batch(&self, id: &str) -> StoreResult<Option<Batch>>;

    /// Newest first, after the cursor `after` (an id), at most `limit`.
    async fn list_batches(
        &self,
        caller: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<Batch>>;

    /// Batches in any of these statuses (the finalizer's work list), oldest first.
    async fn batches_in(&self, statuses: &[BatchStatus], limit: i64) -> StoreResult<Vec<Batch>>;

    /// Moves a batch from one of `from` to `to`, stamping `to`'s time column with `at`.
    /// `false` when the batch was not in `from` (someone else moved it).
    async fn transition(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
        at: i64,
    ) -> StoreResult<bool>;

    /// `validating → failed` with the validation errors.
    async fn fail_validation(&self, id: &str, errors: &[LineError], at: i64) -> StoreResult<bool>;

    /// Ends a batch: inserts its files and sets status, counts and file ids in one
    /// transaction, only if it is still in `end.from`.
    async fn end_batch(&self, id: &str, end: &BatchEnd) -> StoreResult<bool>;

    /// The batch's jobs by status.
    async fn job_counts(&self, batch_id: &str) -> StoreResult<JobCounts>;

    /// The batch's jobs in input order (job ids of a batch sort in line order).
    async fn batch_jobs(&self, batch_id: &str) -> StoreResult<Vec<Job>>;

    /// Cancels the batch's queued jobs (and running ones with `running`) with `error`.
    /// Returns the jobs as they were before (status `running` tells whose call to stop).
    async fn cancel_batch_jobs(
        &self,
        batch_id: &str,
        error: &JobError,
        running: bool,
        at: i64,
    ) -> StoreResult<Vec<Job>>;
}

/// The columns of `batches`, in the order `BatchRow` reads them.
#[macro_export]
macro_rules! batch_columns {
    () => {
        "id, caller, status, endpoint, input_file_id, completion_window, metadata, errors, total, \
         completed, failed, output_file_id, error_file_id, created_at, expires_at, in_progress_at, \
         finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at"
    };
}

/// The columns of `files` without the content.
#[macro_export]
macro_rules! file_columns {
    () => {
        "id, caller, filename, purpose, bytes, created_at"
    };
}

/// `list_files`' query for a `ListOrder`, in a backend's placeholders (caller, purpose
/// with the cast it needs to be compared with NULL, cursor, limit): the page after the
/// cursor, in the order asked for.
#[macro_export]
macro_rules! list_files_sql {
    ($order:expr, $caller:literal, $purpose:literal, $after:literal, $limit:literal) => {{
        macro_rules! page {
            ($cmp:literal, $dir:literal) => {
                concat!(
                    "SELECT ",
                    $crate::file_columns!(),
                    " FROM files WHERE caller = ",
                    $caller,
                    " AND (",
                    $purpose,
                    " IS NULL OR purpose = ",
                    $purpose,
                    ") AND (",
                    $after,
                    " IS NULL OR id ",
                    $cmp,
                    " ",
                    $after,
                    ") ORDER BY id ",
                    $dir,
                    " LIMIT ",
                    $limit
                )
            };
        }
        match $order {
            $crate::queue::batches::ListOrder::Desc => page!("<", "DESC"),
            $crate::queue::batches::ListOrder::Asc => page!(">", "ASC"),
        }
    }};
}

#[derive(sqlx::FromRow)]
pub struct BatchRow {
    id: String,
    caller: String,
    status: String,
    endpoint: String,
    input_file_id: String,
    completion_window: String,
    metadata: Option<String>,
    errors: Option<String>,
    total: i64,
    completed: i64,
    failed: i64,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: i64,
    expires_at: i64,
    in_progress_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
}

impl TryFrom<BatchRow> for Batch {
    type Error = StoreError;

    fn try_from(r: BatchRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("batch {}: {what}", r.id));
        let status = BatchStatus::parse(&r.status).ok_or_else(|| corrupt("status"))?;
        let errors = match r.errors.as_deref() {
            None => vec![],
            Some(e) => serde_json::from_str(e).map_err(|_| corrupt("errors"))?,
        };
        Ok(Batch {
            caller: Some(r.caller).filter(|c| !c.is_empty()),
            status,
            endpoint: r.endpoint,
            input_file_id: r.input_file_id,
            completion_window: r.completion_window,
            metadata: r.metadata,
            errors,
            total: r.total,
            completed: r.completed,
            failed: r.failed,
            output_file_id: r.output_file_id,
            error_file_id: r.error_file_id,
            created_at: r.created_at,
            expires_at: r.expires_at,
            in_progress_at: r.in_progress_at,
            finalizing_at: r.finalizing_at,
            completed_at: r.completed_at,
            failed_at: r.failed_at,
            expired_at: r.expired_at,
            cancelling_at: r.cancelling_at,
            cancelled_at: r.cancelled_at,
            id: r.id,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct FileRow {
    id: String,
    caller: String,
    filename: String,
    purpose: String,
    bytes: i64,
    created_at: i64,
}

impl From<FileRow> for StoredFile {
    fn from(r: FileRow) -> Self {
        StoredFile {
            id: r.id,
            caller: Some(r.caller).filter(|c| !c.is_empty()),
            filename: r.filename,
            purpose: r.purpose,
            bytes: r.bytes,
            created_at: r.created_at,
        }
    }
}

/// Validation errors as stored.
pub fn errors_json(errors: &[LineError]) -> Option<String> {
    if errors.is_empty() {
        return None;
    }
    serde_json::to_string(errors).ok()
}
