//! `GET /v1/jobs/{id}` and `POST /v1/jobs/{id}/cancel`. A caller sees only the jobs made
//! with its own key; any other job is "not found".

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, Caller, render};
use crate::queue::{Job, JobStatus};

async fn owned_job(app: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    match app.shared.store.get_job(id).await? {
        Some(job) if job.caller == caller.0 => Ok(job),
        _ => Err(ApiError::not_found(format!("no job with id {id}"))),
    }
}

pub async fn get_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = owned_job(&app, &caller, &id).await?;
    let attempts = app.shared.store.get_attempts(&id).await?;
    Ok((
        render::job_headers(&job),
        Json(render::job_object(&job, &attempts)),
    )
        .into_response())
}

pub async fn cancel_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let before = owned_job(&app, &caller, &id).await?;
    let shared = &app.shared;
    let job = if before.status.is_terminal() {
        before
    } else {
        let job = shared
            .store
            .cancel_job(&id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no job with id {id}")))?;
        if job.status == JobStatus::Cancelled {
            if before.status == JobStatus::Queued {
                shared.telemetry.left_queue(1);
            }
            // Stop the call at once if it runs here; elsewhere the lease renewal notices.
            shared.abort_call(&id);
            shared.telemetry.job_finished(&job, None);
            shared.job_ended(&job);
            shared
                .signals
                .job_finished(&id, Some(Arc::new(job.clone())));
            tracing::info!(job_id = %id, "job cancelled");
        }
        job
    };
    let attempts = shared.store.get_attempts(&id).await?;
    Ok((
        render::job_headers(&job),
        Json(render::job_object(&job, &attempts)),
    )
        .into_response())
}
