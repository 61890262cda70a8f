//! Turns a batch input file into jobs: one line `{custom_id, method, url, body}` per job,
//! each body checked and defaulted exactly as a `POST /v1/chat/completions` would be.
//!
//! Like OpenAI, a malformed input file fails the whole batch at validation: a line that is
//! not a request line (not JSON, no `custom_id` or a repeated one, another `method` or
//! `url`, no `body` object) is reported in `errors` with its line number, and no line runs.
//! A well-formed line whose request is invalid (a missing `messages`, a `temperature` out
//! of range) is a request that fails, as it would on its own: it becomes a job failed at
//! once with the 400 that `POST /v1/chat/completions` gives, goes to the error file and
//! counts in `request_counts.failed`, and the other lines run.

use std::collections::HashSet;

use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use super::validate;
use crate::queue::batches::LineError;
use crate::queue::{JobError, NewJob, PRIORITY_BATCH};
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

/// The lines of a well-formed file.
#[derive(Default)]
pub struct Lines {
    /// One job per line, in input order, the rejected ones included.
    pub jobs: Vec<NewJob>,
    /// The jobs whose request is invalid, by id, with the 400 each fails with: they are
    /// inserted failed (`QueueStore::insert_jobs`), on no provider (an empty chain).
    pub rejected: Vec<(String, JobError)>,
}

/// What one well-formed line is.
enum Line {
    Job(NewJob),
    Rejected(NewJob, JobError),
}

/// The lines of a well-formed file, or every problem of a malformed one.
pub fn parse(app: &AppState, ctx: &BatchContext, content: &[u8]) -> Result<Lines, Vec<LineError>> {
    let Ok(text) = jsonl_text(content) else {
        return Err(vec![LineError {
            code: "invalid_file".into(),
            message: "the input file is not UTF-8 text".into(),
            param: Some("input_file_id".into()),
            line: None,
        }]);
    };
    let mut lines = Lines::default();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let availability = app.shared.availability.snapshot();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        if lines.jobs.len() + errors.len() >= MAX_LINES {
            errors.push(err(
                line,
                "too_many_tasks",
                format!("a batch holds at most {MAX_LINES} requests"),
                None,
            ));
            break;
        }
        match parse_line(app, ctx, raw, line, &availability) {
            Ok(parsed) => {
                let (job, rejected) = match parsed {
                    Line::Job(job) => (job, None),
                    Line::Rejected(job, error) => (job, Some(error)),
                };
                let custom_id = job.custom_id.clone().unwrap_or_default();
                if !seen.insert(custom_id.clone()) {
                    errors.push(err(
                        line,
                        "duplicate_custom_id",
                        format!("custom_id `{custom_id}` appears on an earlier line; each line needs its own"),
                        Some("custom_id"),
                    ));
                    continue;
                }
                if let Some(error) = rejected {
                    lines.rejected.push((job.id.clone(), error));
                }
                lines.jobs.push(job);
            }
            Err(e) => errors.push(e),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if lines.jobs.is_empty() && errors.is_empty() {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "the input file has no request lines".into(),
            param: Some("input_file_id".into()),
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(lines)
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
) -> Result<Line, LineError> {
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
    // The route the line takes (the checks below change no `model`); a rejected line
    // keeps its name, for its metrics line, but no provider.
    let plan = app.shared.planner.current();
    let model = body.get("model").and_then(Value::as_str);
    let (route, chain) = app.router.plan(&plan.config, ctx.task, model, None);
    let job = move |request: String, chain: Vec<String>, hop: usize| NewJob {
        id: line_job_id(ctx.batch_id, line),
        task: route.name.clone(),
        hop,
        request,
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
    };
    let checked = validate::chat_request(&bytes).and_then(|req| {
        if req.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err(ApiError::invalid(
                "`stream: true` is not available in a batch",
                Some("stream"),
            ));
        }
        Ok(req)
    });
    let mut req = match checked {
        Ok(req) => req,
        Err(e) => {
            let request = String::from_utf8(bytes).unwrap_or_default();
            return Ok(Line::Rejected(job(request, vec![], 0), e.into()));
        }
    };
    validate::apply_defaults(&mut req, &plan.config.router.defaults);
    let (hop, _) = first_available(&chain, availability, ctx.created_at);
    let request = serde_json::to_string(&req).unwrap_or_default();
    Ok(Line::Job(job(request, chain, hop)))
}
