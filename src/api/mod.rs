//! The HTTP edge: axum routes, auth, CORS, and the OpenAI error shape. Handlers are
//! clients of the queue: they insert jobs, wait for them and render them.

mod auth;
pub mod batch_lines;
mod batches;
mod chat;
mod cors;
pub mod error;
mod files;
mod health;
mod jobs;
mod render;
mod replay;
pub mod validate;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::routing;
use crate::worker::Shared;

pub use auth::Caller;

/// State shared by every handler.
pub struct AppInner {
    pub shared: Arc<Shared>,
    pub router: routing::Router,
    /// Set once a shutdown's grace period is over (calls running here have finished or
    /// were stopped): handlers still waiting for a job answer at once that it is kept.
    pub shutting_down: CancellationToken,
}

pub type AppState = Arc<AppInner>;

/// Response headers of a job (CONTRACT §4).
pub const HDR_REQUEST_ID: &str = "x-orch-request-id";
/// The job id again, under the name OpenAI gives its request ids: the SDKs show it as the
/// response's request id (`_request_id` in Python), which users already log.
pub const HDR_OPENAI_REQUEST_ID: &str = "x-request-id";
pub const HDR_PROVIDER: &str = "x-orch-provider";
pub const HDR_FALLBACKS: &str = "x-orch-fallback-attempts";
/// Read by the OpenAI SDKs before they retry an error answer.
pub const HDR_SHOULD_RETRY: &str = "x-should-retry";
/// `no` on a streamed answer: a reverse proxy in front of the gateway (nginx, and those that
/// follow its convention) passes chunks on as they come instead of filling its buffer.
pub const HDR_ACCEL_BUFFERING: &str = "x-accel-buffering";

/// Names a job in an answer's headers: under ours and under OpenAI's request-id name.
pub fn insert_job_id(headers: &mut axum::http::HeaderMap, job_id: &str) {
    if let Ok(v) = axum::http::HeaderValue::from_str(job_id) {
        headers.insert(HDR_OPENAI_REQUEST_ID, v.clone());
        headers.insert(HDR_REQUEST_ID, v);
    }
}

pub fn router(state: AppState) -> Router {
    let settings = state.shared.settings.clone();
    let task_header = state
        .shared
        .planner
        .current()
        .config
        .router
        .defaults
        .task_header
        .clone();
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/chat/completions", post(chat::chat_completions))
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel_job))
        .route(
            "/v1/files",
            // Uploads have their own limit (multipart reads honour it, with a 413).
            post(files::upload)
                .layer(DefaultBodyLimit::max(files::MAX_FILE_BYTES))
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/models", get(health::models))
        .route("/v1/models/{id}", get(health::model))
        .route("/metrics", get(health::metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let mut app = Router::new()
        .route("/healthz", get(health::healthz))
        .merge(api)
        .fallback(health::not_found)
        // Bodies are read by the handlers with the configured limit and an OpenAI-shaped 413.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(error::openai_shaped))
        .with_state(state);
    if !settings.cors_allow_origins.is_empty() {
        // Outermost, so that preflights are answered before the key check.
        let policy = cors::CorsPolicy::new(
            &settings.cors_allow_origins,
            &[settings.api_key_header.as_str(), task_header.as_str()],
        );
        app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(policy),
            cors::handle,
        ));
    }
    app
}
