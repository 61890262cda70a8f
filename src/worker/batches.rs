//! The batch finalizer: moves batches on once their jobs are done, cancels what a cancel
//! or an expiry leaves queued, and writes the output and error files from the job rows.
//!
//! Every move is a conditional update in the database (`… WHERE status = 'in_progress'`),
//! and the files are written in the same transaction as the final status, so several
//! instances may run this at once and a crash at any point is finished by the next pass
//! (the output is rebuilt from the jobs, identically).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::Shared;
use crate::api::batch_lines::request_line_id;
use crate::api::error::ApiError;
use crate::queue::batches::{
    Batch, BatchEnd, BatchStatus, BatchStore, JobCounts, LineError, NewFile, StoredFile,
    batch_job_error,
};
use crate::queue::{Job, JobStatus, StoreResult};

/// A batch left `validating` this long was being created by a process that stopped.
const STALE_VALIDATING_MS: i64 = 5 * 60 * 1000;
/// A batch left `finalizing` this long was being finalized by a process that stopped.
const STALE_FINALIZING_MS: i64 = 60 * 1000;
/// Past this, a cancelling batch stops waiting for its running lines (OpenAI: 10 min).
const CANCEL_GRACE_MS: i64 = 10 * 60 * 1000;
/// Batches looked at per pass.
const PASS_LIMIT: i64 = 500;
/// A burst of finished lines wakes the finalizer once.
const DEBOUNCE: Duration = Duration::from_millis(100);

pub const CODE_CANCELLED: &str = "batch_cancelled";
pub const CODE_EXPIRED: &str = "batch_expired";

pub async fn run(shared: Arc<Shared>) {
    if shared.store.batches().is_none() {
        return;
    }
    let every =
        (shared.settings.lease / 3).clamp(Duration::from_millis(250), Duration::from_secs(5));
    // The first pass also takes over batches a previous process left finalizing.
    let mut first = true;
    loop {
        if let Err(e) = pass(&shared, first).await {
            tracing::warn!(error = %e, "batch finalizer could not reach the database");
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.batch_nudge.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = shared.stop_leasing.cancelled() => return,
        }
    }
}

async fn pass(shared: &Shared, takeover: bool) -> StoreResult<()> {
    let Some(store) = shared.store.batches() else {
        return Ok(());
    };
    let active = [
        BatchStatus::Validating,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Cancelling,
    ];
    for batch in store.batches_in(&active, PASS_LIMIT).await? {
        step(shared, store, &batch, takeover).await?;
    }
    Ok(())
}

/// Moves one batch on as far as it can go now.
pub async fn step(
    shared: &Shared,
    store: &dyn BatchStore,
    batch: &Batch,
    takeover: bool,
) -> StoreResult<()> {
    let now = chrono::Utc::now().timestamp_millis();
    let id = batch.id.as_str();
    match batch.status {
        BatchStatus::Validating if now - batch.created_at > STALE_VALIDATING_MS => {
            // Jobs are inserted in one transaction: all of them exist, or none.
            let counts = store.job_counts(id).await?;
            if total(&counts) > 0 {
                store
                    .transition(id, &[BatchStatus::Validating], BatchStatus::InProgress, now)
                    .await?;
            } else {
                let e = LineError {
                    code: "validation_interrupted".into(),
                    message: "the gateway stopped while creating this batch; create it again"
                        .into(),
                    param: None,
                    line: None,
                };
                store.fail_validation(id, &[e], now).await?;
            }
        }
        BatchStatus::InProgress if now >= batch.expires_at => {
            cancel_jobs(shared, store, id, CODE_EXPIRED, true).await?;
            finish(store, batch, BatchStatus::InProgress, BatchStatus::Expired).await?;
        }
        BatchStatus::InProgress => complete_if_done(store, batch, now).await?,
        BatchStatus::Finalizing
            if takeover
                || batch
                    .finalizing_at
                    .is_none_or(|t| now - t > STALE_FINALIZING_MS) =>
        {
            finish(
                store,
                batch,
                BatchStatus::Finalizing,
                BatchStatus::Completed,
            )
            .await?;
        }
        BatchStatus::Cancelling => {
            // Retries put running lines back in the queue: cancel those too, each pass.
            let overdue = batch
                .cancelling_at
                .is_some_and(|t| now - t > CANCEL_GRACE_MS);
            cancel_jobs(shared, store, id, CODE_CANCELLED, overdue).await?;
            if store.job_counts(id).await?.unfinished() == 0 {
                finish(
                    store,
                    batch,
                    BatchStatus::Cancelling,
                    BatchStatus::Cancelled,
                )
                .await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `in_progress → finalizing → completed` once no line is queued or running.
async fn complete_if_done(store: &dyn BatchStore, batch: &Batch, now: i64) -> StoreResult<()> {
    let id = batch.id.as_str();
    if store.job_counts(id).await?.unfinished() > 0 {
        return Ok(());
    }
    // Only the instance that wins this move writes the files.
    if store
        .transition(id, &[BatchStatus::InProgress], BatchStatus::Finalizing, now)
        .await?
    {
        finish(
            store,
            batch,
            BatchStatus::Finalizing,
            BatchStatus::Completed,
        )
        .await?;
    }
    Ok(())
}

fn total(c: &JobCounts) -> i64 {
    c.unfinished() + c.succeeded + c.failed + c.cancelled
}

/// Cancels a batch's queued lines (and running ones with `running`), telling waiters,
/// telemetry and this instance's running calls.
pub async fn cancel_jobs(
    shared: &Shared,
    store: &dyn BatchStore,
    batch_id: &str,
    code: &str,
    running: bool,
) -> StoreResult<usize> {
    let message = match code {
        CODE_EXPIRED => "the batch expired before this request ran",
        _ => "the batch was cancelled before this request ran",
    };
    let error = batch_job_error(code, message);
    let now = chrono::Utc::now().timestamp_millis();
    let jobs = store
        .cancel_batch_jobs(batch_id, &error, running, now)
        .await?;
    for mut job in jobs.iter().cloned() {
        if job.status == JobStatus::Running {
            shared.abort_call(&job.id);
        }
        job.status = JobStatus::Cancelled;
        job.finished_at = Some(now);
        job.status_code = Some(i64::from(error.status));
        job.error = Some(error.clone());
        job.lease_owner = None;
        shared.telemetry.job_finished(&job, None);
        let id = job.id.clone();
        shared.signals.job_finished(&id, Some(Arc::new(job)));
    }
    if !jobs.is_empty() {
        tracing::info!(
            batch_id,
            cancelled = jobs.len(),
            code,
            "batch lines cancelled"
        );
    }
    Ok(jobs.len())
}

/// Was this job cancelled by its batch (cancel or expiry), rather than failing?
fn cancelled_by_batch(job: &Job) -> bool {
    job.status == JobStatus::Cancelled
        && job
            .error
            .as_ref()
            .and_then(|e| e.code.as_deref())
            .is_some_and(|c| c == CODE_CANCELLED || c == CODE_EXPIRED)
}

/// `request_counts` as the jobs stand: `failed` counts lines that failed or were cancelled
/// one by one, not the lines a batch cancel or expiry stopped before they ran.
pub fn live_counts(batch: &Batch, counts: &JobCounts) -> (i64, i64) {
    let stopped_by_batch = matches!(
        batch.status,
        BatchStatus::Cancelling | BatchStatus::Cancelled | BatchStatus::Expired
    );
    let failed = counts.failed
        + if stopped_by_batch {
            0
        } else {
            counts.cancelled
        };
    (counts.succeeded, failed)
}

/// Builds the output and error files from the jobs and ends the batch (`from → to`).
async fn finish(
    store: &dyn BatchStore,
    batch: &Batch,
    from: BatchStatus,
    to: BatchStatus,
) -> StoreResult<()> {
    let jobs = store.batch_jobs(&batch.id).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut output = Vec::new();
    let mut errors = Vec::new();
    let (mut completed, mut failed) = (0, 0);
    for job in &jobs {
        let line = output_line(job);
        let mut text = line.to_string();
        text.push('\n');
        if job.status == JobStatus::Succeeded {
            completed += 1;
            output.extend_from_slice(text.as_bytes());
        } else {
            if !cancelled_by_batch(job) {
                failed += 1;
            }
            errors.extend_from_slice(text.as_bytes());
        }
    }
    let file = |kind: &str, content: Vec<u8>| {
        (!content.is_empty()).then(|| NewFile {
            meta: StoredFile {
                id: format!("file-{}", uuid::Uuid::now_v7().simple()),
                caller: batch.caller.clone(),
                filename: format!("{}_{kind}.jsonl", batch.id),
                purpose: "batch_output".into(),
                bytes: i64::try_from(content.len()).unwrap_or(i64::MAX),
                created_at: now,
            },
            content,
        })
    };
    let end = BatchEnd {
        from,
        to,
        completed,
        failed,
        output: file("output", output),
        error: file("error", errors),
        at: now,
    };
    if store.end_batch(&batch.id, &end).await? {
        tracing::info!(batch_id = %batch.id, status = to.as_str(), completed, failed, "batch ended");
    }
    Ok(())
}

/// One line of an output or error file, in OpenAI's shape.
fn output_line(job: &Job) -> Value {
    let custom_id = job.custom_id.clone().unwrap_or_default();
    let id = request_line_id(&job.id);
    if job.status == JobStatus::Succeeded {
        let body = job
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str::<Value>(r).ok())
            .unwrap_or(Value::Null);
        return json!({
            "id": id,
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": job.id, "body": body},
            "error": null,
        });
    }
    let error = job.error.clone().unwrap_or_else(|| {
        batch_job_error(
            "unknown",
            &format!("the request ended as {}", job.status.as_str()),
        )
    });
    let code = error.code.clone().unwrap_or_else(|| error.kind.clone());
    // A request that got an answer (an upstream error passed through, or the gateway's
    // 502 after every provider failed) shows it as OpenAI does; one that never ran has none.
    let response = if job.status == JobStatus::Failed {
        json!({
            "status_code": job.status_code.unwrap_or(i64::from(error.status)),
            "request_id": job.id,
            "body": ApiError::from(&error).body(),
        })
    } else {
        Value::Null
    };
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": error.message},
    })
}
