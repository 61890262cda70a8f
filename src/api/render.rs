//! Turning job records into HTTP answers.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use super::{HDR_ACCEL_BUFFERING, HDR_FALLBACKS, HDR_PROVIDER, insert_job_id};
use crate::queue::{Attempt, Job, JobStatus};

/// The headers that name a job: the `x-orch-*` ones and `x-request-id`.
pub fn job_headers(job: &Job) -> HeaderMap {
    let mut h = HeaderMap::new();
    insert_job_id(&mut h, &job.id);
    if let Ok(v) = HeaderValue::from_str(&job.provider) {
        h.insert(HDR_PROVIDER, v);
    }
    h.insert(HDR_FALLBACKS, HeaderValue::from(job.hops.max(0) as u64));
    h
}

/// The headers of a streamed answer about `job`: its `job_headers`, and
/// `x-accel-buffering: no`, so that a proxy in front does not hold chunks back.
pub fn stream_headers(job: &Job) -> HeaderMap {
    let mut h = job_headers(job);
    h.insert(HDR_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    h
}

/// The answer to a synchronous request whose job finished: the stored completion as
/// it is (no re-serialising), or the job's error.
pub fn finished(job: &Job) -> Response {
    let headers = job_headers(job);
    match (job.status, &job.result, &job.error) {
        (JobStatus::Succeeded, Some(result), _) => {
            let mut resp = (StatusCode::OK, headers, result.clone()).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        (_, _, Some(err)) => (headers, ApiError::from(err).with_job(&job.id)).into_response(),
        _ => (
            headers,
            ApiError::internal(format!(
                "job {} ended as {} without a result",
                job.id,
                job.status.as_str()
            )),
        )
            .into_response(),
    }
}

fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// `GET /v1/jobs/{id}`: the job with its attempts.
pub fn job_object(job: &Job, attempts: &[Attempt]) -> Value {
    let attempts: Vec<Value> = attempts
        .iter()
        .map(|a| {
            json!({
                "n": a.n,
                "provider": a.provider,
                "model": a.model,
                "status_code": a.status_code,
                "outcome": a.outcome,
                "error": a.error,
                "instance": a.instance,
                "started_at": secs(a.started_at),
                "latency_ms": a.finished_at.map(|f| f - a.started_at),
            })
        })
        .collect();
    let mut v = json!({
        "id": job.id,
        "object": "orch.job",
        "status": job.status.as_str(),
        "task": job.task,
        "created_at": secs(job.created_at),
        "finished_at": job.finished_at.map(secs),
        "provider": job.provider,
        "fallback_attempts": job.hops,
        "batch_id": job.batch_id,
        "attempts": attempts,
    });
    match job.status {
        JobStatus::Succeeded => {
            v["result"] = job
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or(Value::Null);
        }
        JobStatus::Failed | JobStatus::Cancelled => {
            if let Some(e) = &job.error {
                v["error"] = ApiError::from(e).body()["error"].clone();
            }
            if let Some(partial) = job
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str::<Value>(r).ok())
            {
                v["partial_result"] = partial;
            }
        }
        _ => {}
    }
    v
}

/// The SSE event of a chunk; usage is shown only to a client that asked for it. As
/// OpenAI streams, that client sees `"usage": null` on every chunk before the usage one.
pub fn chunk_event(mut chunk: Value, include_usage: bool) -> Option<Event> {
    if include_usage {
        if let Some(o) = chunk.as_object_mut() {
            o.entry("usage").or_insert(Value::Null);
        }
    } else {
        let usage_only = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        if usage_only && chunk.get("usage").is_some_and(|u| !u.is_null()) {
            return None;
        }
        if let Some(o) = chunk.as_object_mut() {
            o.remove("usage");
        }
    }
    Some(Event::default().data(chunk.to_string()))
}
