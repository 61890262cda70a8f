//! `/healthz`, `/metrics`, `/v1/models` (and one model) and the fallback 404.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

pub async fn healthz(State(app): State<AppState>) -> Response {
    let shared = &app.shared;
    let db_ok = matches!(
        tokio::time::timeout(Duration::from_secs(2), shared.store.ping()).await,
        Ok(Ok(()))
    );
    let settings = &shared.settings;
    let live_since = settings.live_instances_since(chrono::Utc::now().timestamp_millis());
    let instances = if db_ok {
        shared.store.instances(live_since).await.unwrap_or_default()
    } else {
        vec![]
    };
    let plan = shared.planner.current();
    let body = json!({
        "status": if db_ok { "ok" } else { "degraded" },
        "db": if db_ok { "ok" } else { "unreachable" },
        "backend": shared.store.backend(),
        "instance": settings.instance_id,
        "providers": plan.providers.keys().collect::<Vec<_>>(),
        "instances": instances,
        "planner": {
            "last_reload_at": plan.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "watch": shared.planner.watched().iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "last_error": shared.planner.last_error(),
        },
    });
    let status = if db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    // Queue depth, running jobs and cool-downs are read from the database at each scrape,
    // so every instance reports the global figures, not its own view of them.
    crate::worker::refresh(&app.shared).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.shared.telemetry.metrics.render(),
    )
        .into_response()
}

pub async fn models(State(app): State<AppState>) -> Response {
    Json(json!({"object": "list", "data": model_objects(&app)})).into_response()
}

/// `GET /v1/models/{id}` (the SDKs' `models.retrieve`): one route or provider.
pub async fn model(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match model_objects(&app)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
    {
        Some(m) => Json(m).into_response(),
        None => {
            ApiError::not_found(format!("no model (route or provider) named {id}")).into_response()
        }
    }
}

/// Every route name and every provider name as an OpenAI model object.
fn model_objects(app: &AppState) -> Vec<Value> {
    let plan = app.shared.planner.current();
    let created = plan.loaded_at.timestamp();
    let routes = plan
        .config
        .router
        .routes
        .keys()
        .map(|r| (r, "llm-orch:route"));
    let providers = plan.providers.keys().map(|p| (p, "llm-orch:provider"));
    routes
        .chain(providers)
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": created, "owned_by": owner}))
        .collect()
}

pub async fn not_found() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}
