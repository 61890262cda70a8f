//! Turns a batch input file into jobs: one line `{custom_id, method, url, body}` per job,
//! each body checked and defaulted exactly as a `POST /v1/chat/completions` would be.
//!
//! Like OpenAI, a malformed input file fails the whole batch at validation: every bad line
//! is reported in `errors` (with its line number) and no line runs. Running the good lines
//! and dropping the bad ones would hand back output files with silent holes.

use std::collections::HashSet;

use serde_json::Value;

use super::AppState;
use super::validate;
use crate::queue::batches::LineError;
use crate::queue::{NewJob, PRIORITY_BATCH};
use crate::worker::policy::first_available;

/// OpenAI's limit on requests per batch.
pub const MAX_LINES: usize = 50_000;
/// Errors reported per batch; past this the file is clearly not what was meant.
const MAX_ERRORS: usize = 1_000;
/// The metadata key naming a route for every line (besides the configured task header).
pub const TASK_METADATA_KEY: &str = "x-orch-task-kind";

/// What the lines share.
pub struct BatchContext<'a> {
    pub batch_id: &'a str,
    pub endpoint: &'a str,
    pub caller: Option<String>,
    /// Route named by the batch's metadata, if any.
    pub task: Option<&'a str>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// Job id of a batch line: job ids of one batch sort in input order, so the output file
/// can be built from the jobs table alone, in order, after any restart.
pub fn line_job_id(batch_id: &str, line: usize) -> String {
    let key = batch_id.strip_prefix("batch_").unwrap_or(batch_id);
    format!("job_{key}_{line:06}")
}

/// The `batch_req_…` id of a line's output, stable across re-finalizing.
pub fn request_line_id(job_id: &str) -> String {
    format!(
        "batch_req_{}",
        job_id.strip_prefix("job_").unwrap_or(job_id)
    )
}

/// A JSONL file's text. A leading UTF-8 byte-order mark, which some Windows tools write,
/// is not part of the first line.
pub fn jsonl_text(content: &[u8]) -> Result<&str, std::str::Utf8Error> {
    let text = std::str::from_utf8(content)?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

fn err(line: usize, code: &str, message: String, param: Option<&str>) -> LineError {
    LineError {
        code: code.into(),
        message,
        param: param.map(str::to_string),
        line: Some(line as u64),
    }
}

/// The jobs of a valid file, or every problem of an invalid one.
pub fn parse(
    app: &AppState,
    ctx: &BatchContext,
    content: &[u8],
) -> Result<Vec<NewJob>, Vec<LineError>> {
    let Ok(text) = jsonl_text(content) else {
        return Err(vec![LineError {
            code: "invalid_file".into(),
            message: "the input file is not UTF-8 text".into(),
            param: Some("input_file_id".into()),
            line: None,
        }]);
    };
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let availability = app.shared.availability.snapshot();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        if jobs.len() + errors.len() >= MAX_LINES {
            errors.push(err(
                line,
                "too_many_tasks",
                format!("a batch holds at most {MAX_LINES} requests"),
                None,
            ));
            break;
        }
        match parse_line(app, ctx, raw, line, &availability) {
            Ok(job) => {
                let custom_id = job.custom_id.clone().unwrap_or_default();
                if !seen.insert(custom_id.clone()) {
                    errors.push(err(
                        line,
                        "duplicate_custom_id",
                        format!("custom_id `{custom_id}` appears on an earlier line; each line needs its own"),
                        Some("custom_id"),
                    ));
                } else {
                    jobs.push(job);
                }
            }
            Err(e) => errors.push(e),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if jobs.is_empty() && errors.is_empty() {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "the input file has no request lines".into(),
            param: Some("input_file_id".into()),
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(errors)
    }
}

fn parse_line(
    app: &AppState,
    ctx: &BatchContext,
    raw: &str,
    line: usize,
    availability: &std::collections::HashMap<String, i64>,
) -> Result<NewJob, LineError> {
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        err(
            line,
            "invalid_json_line",
            format!("line {line} is not valid JSON: {e}"),
            None,
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(err(
            line,
            "invalid_json_line",
            format!("line {line} is not a JSON object"),
            None,
        ));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(err(
                line,
                "invalid_custom_id",
                "`custom_id` is required and must be a non-empty string".into(),
                Some("custom_id"),
            ));
        }
    };
    if !obj
        .get("method")
        .and_then(Value::as_str)
        .is_some_and(|m| m.eq_ignore_ascii_case("POST"))
    {
        return Err(err(
            line,
            "invalid_method",
            "`method` must be `POST`".into(),
            Some("method"),
        ));
    }
    if obj.get("url").and_then(Value::as_str) != Some(ctx.endpoint) {
        return Err(err(
            line,
            "invalid_url",
            format!("`url` must be the batch's endpoint `{}`", ctx.endpoint),
            Some("url"),
        ));
    }
    let body = obj.get("body").filter(|b| b.is_object()).ok_or_else(|| {
        err(
            line,
            "invalid_request",
            "`body` must be a JSON object".into(),
            Some("body"),
        )
    })?;
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut req = validate::chat_request(&bytes).map_err(|e| {
        let param = e.param.as_deref().map(|p| format!("body.{p}"));
        err(
            line,
            "invalid_request",
            e.message.clone(),
            param.as_deref().or(Some("body")),
        )
    })?;
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(err(
            line,
            "invalid_request",
            "`stream: true` is not available in a batch".into(),
            Some("body.stream"),
        ));
    }
    let plan = app.shared.planner.current();
    validate::apply_defaults(&mut req, &plan.config.router.defaults);
    let model = req.get("model").and_then(Value::as_str);
    let (route, chain) = app.router.plan(&plan.config, ctx.task, model, None);
    let (hop, _) = first_available(&chain, availability, ctx.created_at);
    Ok(NewJob {
        id: line_job_id(ctx.batch_id, line),
        task: route.name.clone(),
        hop,
        request: serde_json::to_string(&req).unwrap_or_default(),
        stream: false,
        priority: PRIORITY_BATCH,
        caller: ctx.caller.clone(),
        idempotency_key: None,
        pinned_instance: None,
        created_at: ctx.created_at,
        deadline_at: ctx.expires_at,
        batch_id: Some(ctx.batch_id.to_string()),
        custom_id: Some(custom_id),
        chain,
    })
}
