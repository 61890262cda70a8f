//! The one conversion of every failure into the OpenAI error body:
//! `{"error": {"message", "type", "code", "param"}}`, plus `retry_after` and `job_id`
//! where they apply.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::queue::JobError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: String,
    pub message: String,
    pub code: Option<String>,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    pub job_id: Option<String>,
    /// The job named by `job_id` is still queued or running and will finish by itself.
    pub job_goes_on: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: kind.into(),
            message: message.into(),
            code: None,
            param: None,
            retry_after: None,
            job_id: None,
            job_goes_on: false,
        }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = param.map(str::to_string);
        e
    }

    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Invalid or missing API key. Send it as `Authorization: Bearer KEY` or in the configured key header.",
        );
        e.code = Some("invalid_api_key".into());
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit", message);
        e.retry_after = Some(retry_after);
        e.code = Some("rate_limited".into());
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// The backend lacks the feature (e.g. batches on a store without them).
    pub fn not_implemented(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", message);
        e.code = Some("not_implemented".into());
        e
    }

    /// Names the request field the error is about.
    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_job(mut self, id: &str) -> Self {
        self.job_id = Some(id.to_string());
        self
    }

    /// Names a job that was accepted and goes on without this answer (the wait ran out,
    /// the gateway is stopping): its result is to be polled, not asked for again.
    pub fn with_job_going_on(mut self, id: &str) -> Self {
        self.job_goes_on = true;
        self.with_job(id)
    }

    /// The error body alone, for SSE error events and job records.
    pub fn body(&self) -> serde_json::Value {
        let mut err = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "param": self.param,
        });
        if let Some(r) = self.retry_after {
            err["retry_after"] = json!(r);
        }
        if let Some(j) = &self.job_id {
            err["job_id"] = json!(j);
        }
        json!({ "error": err })
    }
}

impl From<&JobError> for ApiError {
    fn from(e: &JobError) -> Self {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
        Self {
            status,
            kind: e.kind.clone(),
            message: e.message.clone(),
            code: e.code.clone(),
            param: e.param.clone(),
            retry_after: e.retry_after,
            job_id: None,
            job_goes_on: false,
        }
    }
}

/// An answer's error kept as a job's (a batch line refused as its request would be).
impl From<ApiError> for JobError {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status.as_u16(),
            kind: e.kind,
            message: e.message,
            code: e.code,
            param: e.param,
            retry_after: e.retry_after,
        }
    }
}

impl From<crate::queue::StoreError> for ApiError {
    fn from(e: crate::queue::StoreError) -> Self {
        tracing::error!(error = %e, "database error on the request path");
        Self::unavailable("the job store is unavailable; retry shortly")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(r) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&r.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        // An error about a job (a wait that ran out, a shutdown) names it in the header
        // too, as every answer about a job does, so a client can poll it.
        if let Some(j) = &self.job_id {
            super::insert_job_id(resp.headers_mut(), j);
        }
        // The OpenAI SDKs retry a 5xx by sending the request again (3 tries by default),
        // and each retry would become a new job calling upstream while the first one
        // still runs. They honour `x-should-retry: false`.
        if self.job_goes_on {
            resp.headers_mut()
                .insert(super::HDR_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        resp
    }
}

/// Answers that axum builds itself come as plain text or with no body at all: a query
/// string or path segment that does not parse (400), a method a route does not take (405).
/// Clients on the OpenAI SDKs read every error as `{"error": {...}}`, so those answers are
/// rewritten into that shape here, keeping their status and headers (e.g. `Allow`).
pub async fn openai_shaped(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    // Cheap copies (an enum, a shared buffer): most answers need neither.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {}", uri.path()),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let mut shaped = ApiError::new(status, kind, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            shaped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    shaped
}
