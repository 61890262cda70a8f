//! OpenAI Batches: `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`,
//! `POST /v1/batches/{id}/cancel`. Each valid input line becomes a job at batch priority;
//! the finalizer (`worker::batches`) writes the output files when the jobs are done.
//! A caller sees only its own batches; any other is "not found".

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::batch_lines::{self, BatchContext, TASK_METADATA_KEY};
use super::chat::read_body;
use super::error::ApiError;
use super::files::{ListQuery, list_page, owned_file, page_limit, secs, store};
use super::{AppState, Caller, validate};
use crate::queue::batches::{Batch, BatchStatus, JobCounts};
use crate::queue::{BatchStore, JobError};
use crate::worker::Shared;
use crate::worker::batches::{CODE_CANCELLED, cancel_jobs, live_counts};

pub const ENDPOINT: &str = "/v1/chat/completions";
const WINDOW: &str = "24h";
const WINDOW_MS: i64 = 24 * 3600 * 1000;

fn new_batch_id() -> String {
    format!("batch_{}", uuid::Uuid::now_v7().simple())
}

/// The OpenAI batch object; `counts` are the live job counts of an unfinished batch.
fn batch_object(b: &Batch, counts: Option<&JobCounts>) -> Value {
    let (completed, failed) = match counts {
        Some(c) if !b.status.is_terminal() => live_counts(b, c),
        _ => (b.completed, b.failed),
    };
    let errors = (!b.errors.is_empty()).then(|| json!({"object": "list", "data": b.errors}));
    let metadata = b
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str::<Value>(m).ok());
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": secs(b.created_at),
        "in_progress_at": b.in_progress_at.map(secs),
        "expires_at": secs(b.expires_at),
        "finalizing_at": b.finalizing_at.map(secs),
        "completed_at": b.completed_at.map(secs),
        "failed_at": b.failed_at.map(secs),
        "expired_at": b.expired_at.map(secs),
        "cancelling_at": b.cancelling_at.map(secs),
        "cancelled_at": b.cancelled_at.map(secs),
        "request_counts": {"total": b.total, "completed": completed, "failed": failed},
        "metadata": metadata,
    })
}

/// Renders a batch, reading its live counts while it is not finished.
async fn render(store: &dyn BatchStore, b: &Batch) -> Result<Value, ApiError> {
    let counts = if b.status.is_terminal() {
        None
    } else {
        Some(store.job_counts(&b.id).await?)
    };
    Ok(batch_object(b, counts.as_ref()))
}

async fn owned_batch(store: &dyn BatchStore, caller: &Caller, id: &str) -> Result<Batch, ApiError> {
    match store.get_batch(id).await? {
        Some(b) if b.caller == caller.0 => Ok(b),
        _ => Err(ApiError::not_found(format!("No such Batch object: {id}")).param("batch_id")),
    }
}

/// The checked fields of a create request.
struct CreateRequest {
    input_file_id: String,
    metadata: Option<serde_json::Map<String, Value>>,
}

fn parse_create(bytes: &[u8]) -> Result<CreateRequest, ApiError> {
    let body = validate::json_object(bytes)?;
    let string = |field: &str| -> Result<String, ApiError> {
        match body.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(ApiError::invalid(
                format!("`{field}` must be a string"),
                Some(field),
            )),
            None => Err(ApiError::invalid(
                format!("`{field}` is required"),
                Some(field),
            )),
        }
    };
    let input_file_id = string("input_file_id")?;
    let endpoint = string("endpoint")?;
    if endpoint != ENDPOINT {
        return Err(ApiError::invalid(
            format!(
                "`endpoint` must be `{ENDPOINT}` (the only endpoint this gateway batches), got `{endpoint}`"
            ),
            Some("endpoint"),
        ));
    }
    let window = string("completion_window")?;
    if window != WINDOW {
        return Err(ApiError::invalid(
            format!("`completion_window` must be `{WINDOW}`, got `{window}`"),
            Some("completion_window"),
        ));
    }
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(check_metadata(m)?.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "`metadata` must be an object",
                Some("metadata"),
            ));
        }
    };
    Ok(CreateRequest {
        input_file_id,
        metadata,
    })
}

/// OpenAI's limits on `metadata`: at most 16 pairs, keys of at most 64 characters, values
/// strings of at most 512. A client that passes here passes there too.
fn check_metadata(
    m: &serde_json::Map<String, Value>,
) -> Result<&serde_json::Map<String, Value>, ApiError> {
    let bad = |msg: String| Err(ApiError::invalid(msg, Some("metadata")));
    if m.len() > 16 {
        return bad(format!(
            "`metadata` holds at most 16 pairs, got {}",
            m.len()
        ));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return bad(format!("`metadata` key `{k}` is longer than 64 characters"));
        }
        match v {
            Value::String(v) if v.chars().count() > 512 => {
                return bad(format!("`metadata.{k}` is longer than 512 characters"));
            }
            Value::String(_) => {}
            _ => return bad(format!("`metadata.{k}` must be a string")),
        }
    }
    Ok(m)
}

pub async fn create(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create_batch(&app, &caller, &headers, body).await
}

async fn create_batch(
    app: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let shared = &app.shared;
    let store = store(app)?;
    let bytes = read_body(body, headers, shared.settings.max_body_bytes).await?;
    let req = parse_create(&bytes)?;
    let file = owned_file(store, caller, &req.input_file_id)
        .await
        .map_err(|e| e.param("input_file_id"))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            format!(
                "file {} has purpose `{}`; a batch needs a file uploaded with purpose `batch`",
                file.id, file.purpose
            ),
            Some("input_file_id"),
        ));
    }
    let content = store
        .file_content(&file.id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No such File object: {}", file.id)))?;

    let now = chrono::Utc::now().timestamp_millis();
    let id = new_batch_id();
    let plan = app.shared.planner.current();
    let task_header = &plan.config.router.defaults.task_header;
    let task = req.metadata.as_ref().and_then(|m| {
        m.get(task_header.as_str())
            .or_else(|| m.get(TASK_METADATA_KEY))
            .and_then(Value::as_str)
    });
    let ctx = BatchContext {
        batch_id: &id,
        endpoint: ENDPOINT,
        caller: caller.0.clone(),
        task,
        created_at: now,
        expires_at: now + WINDOW_MS,
    };
    let parsed = batch_lines::parse(app, &ctx, &content);
    let mut batch = Batch {
        id: id.clone(),
        caller: caller.0.clone(),
        status: BatchStatus::Validating,
        endpoint: ENDPOINT.into(),
        input_file_id: file.id.clone(),
        completion_window: WINDOW.into(),
        metadata: req
            .metadata
            .as_ref()
            .map(|m| Value::Object(m.clone()).to_string()),
        errors: vec![],
        total: 0,
        completed: 0,
        failed: 0,
        output_file_id: None,
        error_file_id: None,
        created_at: now,
        expires_at: ctx.expires_at,
        in_progress_at: None,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
    };
    let lines = match parsed {
        Err(errors) => {
            // A malformed file fails the batch, as OpenAI does; the answer is still the batch.
            batch.status = BatchStatus::Failed;
            batch.failed_at = Some(now);
            batch.errors = errors;
            store.insert_batch(&batch).await?;
            tracing::info!(batch_id = %id, errors = batch.errors.len(), "batch failed validation");
            return Ok(Json(batch_object(&batch, None)).into_response());
        }
        Ok(lines) => lines,
    };
    let jobs = &lines.jobs;
    let rejected = lines.rejected.len();
    // Refused lines are inserted failed: only the others join the queue.
    let to_queue = jobs.len() - rejected;
    let queued = shared.telemetry.queued();
    if queued + to_queue as i64 > shared.settings.max_queue_depth as i64 {
        return Err(ApiError::rate_limited(
            format!(
                "the queue cannot take {to_queue} more jobs ({queued} waiting, limit {}); retry later",
                shared.settings.max_queue_depth
            ),
            30,
        ));
    }
    batch.total = jobs.len() as i64;
    // validating → jobs → in_progress: a crash in between leaves a `validating` batch,
    // which the finalizer later completes or fails (all jobs exist, or none).
    store.insert_batch(&batch).await?;
    shared.store.insert_jobs(jobs, &lines.rejected).await?;
    report_rejected(shared, &lines.rejected).await;
    store
        .transition(
            &id,
            &[BatchStatus::Validating],
            BatchStatus::InProgress,
            now,
        )
        .await?;
    shared.telemetry.joined_queue(to_queue);
    let mut providers: Vec<&str> = jobs
        .iter()
        .map(crate::queue::NewJob::provider)
        .filter(|p| !p.is_empty())
        .collect();
    providers.sort_unstable();
    providers.dedup();
    for p in providers {
        shared.signals.wake_pool(p);
    }
    tracing::info!(batch_id = %id, lines = jobs.len(), rejected, "batch accepted");
    batch.status = BatchStatus::InProgress;
    batch.in_progress_at = Some(now);
    let counts = JobCounts {
        queued: to_queue as i64,
        failed: rejected as i64,
        ..JobCounts::default()
    };
    Ok(Json(batch_object(&batch, Some(&counts))).into_response())
}

/// Reports the jobs of lines whose request was invalid, inserted already failed with their
/// 400, as any finished job is reported (Prometheus, the batch's finalizer). Their metrics
/// lines come from their rows, like every job's.
async fn report_rejected(shared: &Shared, rejected: &[(String, JobError)]) {
    for (job_id, _) in rejected {
        match shared.store.get_job(job_id).await {
            Ok(Some(job)) => {
                shared.telemetry.job_finished(&job, None);
                shared.job_ended(&job);
            }
            Ok(None) => {}
            // Only the report is missed: the job is failed for good, and the finalizer
            // finds every batch's ended jobs in its own pass.
            Err(e) => {
                tracing::warn!(job_id = %job_id, error = %e, "cannot report a refused batch line")
            }
        }
    }
}

pub async fn get(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let store = store(&app)?;
    let batch = owned_batch(store, &caller, &id).await?;
    Ok(Json(render(store, &batch).await?).into_response())
}

pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let store = store(&app)?;
    let limit = page_limit(q.limit, 20, 100)?;
    // One row more than asked tells whether another page follows.
    let rows = store
        .list_batches(caller.0.as_deref(), q.after.as_deref(), limit + 1)
        .await?;
    let has_more = rows.len() as i64 > limit;
    let mut data = Vec::with_capacity(rows.len());
    for b in rows.iter().take(limit as usize) {
        data.push(render(store, b).await?);
    }
    Ok(Json(list_page(data, has_more)).into_response())
}

pub async fn cancel(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let shared = &app.shared;
    let store = store(&app)?;
    let batch = owned_batch(store, &caller, &id).await?;
    match batch.status {
        BatchStatus::Cancelling | BatchStatus::Cancelled => {}
        BatchStatus::Validating | BatchStatus::InProgress => {
            let now = chrono::Utc::now().timestamp_millis();
            let from = [BatchStatus::Validating, BatchStatus::InProgress];
            if store
                .transition(&id, &from, BatchStatus::Cancelling, now)
                .await?
            {
                // Queued lines stop now; running ones finish and land in the output.
                cancel_jobs(shared, store, &id, CODE_CANCELLED, false).await?;
                shared.batch_nudge.notify_one();
                tracing::info!(batch_id = %id, "batch cancelling");
            }
        }
        other => {
            return Err(ApiError::invalid(
                format!("cannot cancel batch {id}: it is already {}", other.as_str()),
                Some("batch_id"),
            ));
        }
    }
    let batch = owned_batch(store, &caller, &id).await?;
    Ok(Json(render(store, &batch).await?).into_response())
}
