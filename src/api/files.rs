//! OpenAI Files for the Batch API: `POST /v1/files` (multipart), `GET /v1/files`,
//! `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
//! A caller sees only its own files; any other is "not found".

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::chat::check_declared_length;
use super::error::ApiError;
use super::{AppState, Caller};
use crate::queue::BatchStore;
use crate::queue::batches::{ListOrder, NewFile, StoredFile};

/// Upload limit for files (CONTRACT §2), instead of the normal body limit.
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;

/// The batch store, or the 501 a backend without batches answers.
pub fn store(app: &AppState) -> Result<&dyn BatchStore, ApiError> {
    app.shared.store.batches().ok_or_else(|| {
        ApiError::not_implemented(format!(
            "files and batches are not available with the {} backend",
            app.shared.store.backend()
        ))
    })
}

pub fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::now_v7().simple())
}

pub fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// The OpenAI file object.
pub fn file_object(f: &StoredFile) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": secs(f.created_at),
        "expires_at": null,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// The caller's file, or 404 (also for another caller's file: its existence is not told).
pub async fn owned_file(
    store: &dyn BatchStore,
    caller: &Caller,
    id: &str,
) -> Result<StoredFile, ApiError> {
    match store.get_file(id).await? {
        Some(f) if f.caller == caller.0 => Ok(f),
        _ => Err(ApiError::not_found(format!("No such File object: {id}")).param("file_id")),
    }
}

/// An OpenAI list page of rendered objects (each with an `id`).
pub fn list_page(data: Vec<Value>, has_more: bool) -> Value {
    json!({
        "object": "list",
        "first_id": data.first().map(|v| v["id"].clone()),
        "last_id": data.last().map(|v| v["id"].clone()),
        "data": data,
        "has_more": has_more,
    })
}

/// `limit` of a list request: OpenAI's 1..=100, default 20 (files: up to 10 000).
pub fn page_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            format!("`limit` must be between 1 and {max}, got {n}"),
            Some("limit"),
        )),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
    pub purpose: Option<String>,
    /// Files only (OpenAI's batch list has no order): `asc` or `desc`.
    pub order: Option<String>,
}

/// `order` of a list request: OpenAI's `asc` (oldest first) or `desc` (the default).
fn list_order(order: Option<&str>) -> Result<ListOrder, ApiError> {
    match order {
        None | Some("desc") => Ok(ListOrder::Desc),
        Some("asc") => Ok(ListOrder::Asc),
        Some(other) => Err(ApiError::invalid(
            format!("`order` must be `asc` or `desc`, got `{other}`"),
            Some("order"),
        )),
    }
}

pub async fn upload(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let store = store(&app)?;
    check_declared_length(&headers, MAX_FILE_BYTES)?;
    let multipart = multipart.map_err(|e| {
        ApiError::invalid(
            format!("expected a multipart/form-data body with `file` and `purpose`: {e}"),
            None,
        )
    })?;
    let (purpose, filename, content) = read_form(multipart).await?;
    check_jsonl(&content)?;
    let file = NewFile {
        meta: StoredFile {
            id: new_file_id(),
            caller: caller.0.clone(),
            filename,
            purpose,
            bytes: i64::try_from(content.len()).unwrap_or(i64::MAX),
            created_at: chrono::Utc::now().timestamp_millis(),
        },
        content: content.to_vec(),
    };
    store.insert_file(&file).await?;
    tracing::info!(file_id = %file.meta.id, bytes = file.meta.bytes, "file uploaded");
    Ok(Json(file_object(&file.meta)).into_response())
}

/// The `purpose`, file name and content of the form; every missing piece is named.
async fn read_form(mut form: Multipart) -> Result<(String, String, Bytes), ApiError> {
    let mut purpose = None;
    let mut file = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(form_error(e)),
        };
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(form_error)?),
            Some("file") => {
                let name = field
                    .file_name()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("upload.jsonl")
                    .to_string();
                file = Some((name, field.bytes().await.map_err(form_error)?));
            }
            // Other fields (expires_after[…]) are accepted and ignored.
            _ => {}
        }
    }
    let purpose = purpose
        .map(|p| p.trim().to_string())
        .ok_or_else(|| ApiError::invalid("missing required field `purpose`", Some("purpose")))?;
    if purpose != "batch" {
        return Err(ApiError::invalid(
            format!(
                "`purpose` must be `batch` (the only purpose this gateway serves), got `{purpose}`"
            ),
            Some("purpose"),
        ));
    }
    let (name, content) =
        file.ok_or_else(|| ApiError::invalid("missing required field `file`", Some("file")))?;
    Ok((purpose, name, content))
}

fn form_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::too_large(MAX_FILE_BYTES);
    }
    ApiError::invalid(format!("malformed multipart body: {}", e.body_text()), None)
}

/// A batch input file must be JSONL: UTF-8, one JSON object per non-blank line. The lines'
/// contents are checked when a batch is created from the file (as OpenAI does).
fn check_jsonl(content: &[u8]) -> Result<(), ApiError> {
    let bad = |msg: String| ApiError::invalid(msg, Some("file"));
    let text = super::batch_lines::jsonl_text(content)
        .map_err(|e| bad(format!("the file is not JSONL: it is not UTF-8 text ({e})")))?;
    let mut lines = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(_)) => {}
            Ok(_) => {
                return Err(bad(format!(
                    "the file is not JSONL: line {} is not a JSON object",
                    i + 1
                )));
            }
            Err(e) => {
                return Err(bad(format!(
                    "the file is not JSONL: line {} is not valid JSON ({e})",
                    i + 1
                )));
            }
        }
    }
    if lines == 0 {
        return Err(bad(
            "the file is empty: a batch input needs at least one request line".into(),
        ));
    }
    Ok(())
}

pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let store = store(&app)?;
    let limit = page_limit(q.limit, 10_000, 10_000)?;
    let order = list_order(q.order.as_deref())?;
    // One row more than asked tells whether another page follows.
    let mut rows = store
        .list_files(
            caller.0.as_deref(),
            q.purpose.as_deref(),
            q.after.as_deref(),
            order,
            limit + 1,
        )
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let page = list_page(rows.iter().map(file_object).collect(), has_more);
    Ok(Json(page).into_response())
}

pub async fn get(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let file = owned_file(store(&app)?, &caller, &id).await?;
    Ok(Json(file_object(&file)).into_response())
}

pub async fn content(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let store = store(&app)?;
    let file = owned_file(store, &caller, &id).await?;
    let bytes = store
        .file_content(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No such File object: {id}")))?;
    let mut resp = (StatusCode::OK, bytes).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        file.filename.replace('"', "")
    )) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

pub async fn delete(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let store = store(&app)?;
    owned_file(store, &caller, &id).await?;
    // A batch keeps its lines as jobs once created, so its input file may go.
    let deleted = store.delete_file(&id).await?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": deleted})).into_response())
}
