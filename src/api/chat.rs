//! `POST /v1/chat/completions`: validate, insert the job, then wait for it (sync), answer
//! 202 (async), or stream its chunks (SSE).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::Value;

use super::error::ApiError;
use super::{AppState, Caller, render, replay, validate};
use crate::queue::{Inserted, Job, JobStatus, NewJob, PRIORITY_INTERACTIVE};
use crate::telemetry::WaitTally;
use crate::worker::StreamEvent;
use crate::worker::policy::first_available;

/// How long a job accepted with `x-orch-async` may wait for a cool-down to end.
const ASYNC_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// How often a waiting handler re-reads its job in case a wake-up was missed.
const SAFETY_POLL: Duration = Duration::from_secs(2);

pub fn new_job_id() -> String {
    format!("job_{}", uuid::Uuid::now_v7().simple())
}

/// Reads a body up to `limit` bytes, with the OpenAI-shaped 413 past it.
pub async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    check_declared_length(headers, limit)?;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))
}

/// Refuses at once a body whose declared length is past `limit`, before reading it.
pub fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    Ok(())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

pub async fn chat_completions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    accept(&app, &caller, &headers, body).await
}

async fn accept(
    app: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let shared = &app.shared;
    let settings = &shared.settings;
    let bytes = read_body(body, headers, settings.max_body_bytes).await?;
    let mut req = validate::chat_request(&bytes)?;
    let plan = shared.planner.current();
    validate::apply_defaults(&mut req, &plan.config.router.defaults);

    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let run_async = header_str(headers, "x-orch-async")
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if stream && run_async {
        return Err(ApiError::invalid(
            "`stream: true` cannot be combined with `x-orch-async: true`",
            Some("stream"),
        ));
    }
    let task_header = header_str(headers, &plan.config.router.defaults.task_header);
    let model = req.get("model").and_then(Value::as_str);
    let sticky_key = header_str(headers, "x-orch-sticky-key");
    let (route, chain) = app
        .router
        .plan(&plan.config, task_header, model, sticky_key);

    if shared.telemetry.queued() >= settings.max_queue_depth as i64 {
        return Err(ApiError::rate_limited(
            format!(
                "the queue is full ({} jobs waiting); retry later",
                settings.max_queue_depth
            ),
            1,
        ));
    }
    let now = chrono::Utc::now().timestamp_millis();
    let wait = if run_async {
        ASYNC_DEADLINE
    } else {
        settings.request_timeout
    };
    let deadline = now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 4);
    let (hop, available_at) = first_available(&chain, &shared.availability.snapshot(), now);
    if available_at > deadline {
        let secs = u64::try_from((available_at - now + 999) / 1000).unwrap_or(0);
        return Err(ApiError::rate_limited(
            format!(
                "every provider of route {} is cooling down past this request's deadline",
                route.name
            ),
            secs,
        ));
    }

    let id = new_job_id();
    let new = NewJob {
        id: id.clone(),
        task: route.name.clone(),
        hop,
        request: serde_json::to_string(&req).map_err(|e| ApiError::internal(e.to_string()))?,
        stream,
        priority: PRIORITY_INTERACTIVE,
        caller: caller.0.clone(),
        idempotency_key: header_str(headers, "idempotency-key").map(str::to_string),
        pinned_instance: stream.then(|| settings.instance_id.clone()),
        created_at: now,
        deadline_at: deadline,
        batch_id: None,
        custom_id: None,
        chain,
    };

    // Register before inserting so that no finish can slip between insert and wait.
    let watch = shared.signals.watch_job(&id);
    // Count upstream time from the start, for the overhead of a request that waits.
    let tally = (!stream && !run_async).then(|| shared.telemetry.track_wait(&id));
    let stream_rx = stream.then(|| shared.streams.open(&id));
    let job_id = match crate::worker::insert_and_start(shared, &new).await {
        Ok(Inserted::New) => {
            shared.telemetry.joined_queue(1);
            tracing::debug!(job_id = %id, task = %new.task, provider = %new.provider(), stream, "job accepted");
            id
        }
        Ok(Inserted::Existing(existing)) => {
            shared.streams.close(&id);
            drop(watch);
            tracing::debug!(job_id = %existing.id, "idempotent repeat");
            if run_async {
                return accepted(app, &existing).await;
            }
            let job = if existing.status.is_terminal() {
                Arc::new(*existing)
            } else {
                let watch = shared.signals.watch_job(&existing.id);
                // It may have finished between the insert and the watch.
                match shared
                    .store
                    .get_job(&existing.id)
                    .await?
                    .filter(|j| j.status.is_terminal())
                {
                    Some(job) => Arc::new(job),
                    None => match wait_for(app, watch, &existing.id, received, None).await {
                        Ok(job) => job,
                        Err(answer) => return Ok(answer),
                    },
                }
            };
            // The first request's stream went to its own connection: a repeat that asked
            // for a stream gets the finished answer as one.
            return Ok(match (stream, job.status, job.result.as_deref()) {
                (true, JobStatus::Succeeded, Some(result)) => {
                    match serde_json::from_str::<Value>(result) {
                        Ok(completion) => replay::stream(&job, &completion, include_usage(&req)),
                        Err(_) => render::finished(&job),
                    }
                }
                _ => render::finished(&job),
            });
        }
        Err(e) => {
            shared.streams.close(&id);
            return Err(e.into());
        }
    };

    if run_async {
        return Ok(accepted_response(&accepted_view(&new), &[]));
    }
    if let Some(rx) = stream_rx {
        let sticky = sticky_key.map(|k| (route.name.clone(), k.to_string()));
        let usage = include_usage(&req);
        return Ok(open_stream(app, job_id, rx, watch, usage, sticky, &new).await);
    }
    let resp = match wait_for(app, watch, &job_id, received, tally.as_ref()).await {
        Ok(job) => render::finished(&job),
        Err(answer) => answer,
    };
    if let Some(p) = resp
        .headers()
        .get(super::HDR_PROVIDER)
        .and_then(|v| v.to_str().ok())
        && resp.status().is_success()
    {
        app.router.served(route, sticky_key, p);
    }
    Ok(resp)
}

/// Whether a streaming client asked for the usage chunk.
fn include_usage(req: &serde_json::Map<String, Value>) -> bool {
    req.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The `202` of an async request whose idempotency key names an earlier job: that job as
/// `GET /v1/jobs/{id}` shows it, attempts included.
async fn accepted(app: &AppState, job: &Job) -> Result<Response, ApiError> {
    let attempts = app.shared.store.get_attempts(&job.id).await?;
    Ok(accepted_response(job, &attempts))
}

/// `202 Accepted` with the job object and its `Location`.
fn accepted_response(job: &Job, attempts: &[crate::queue::Attempt]) -> Response {
    let mut resp = (
        StatusCode::ACCEPTED,
        render::job_headers(job),
        axum::Json(render::job_object(job, attempts)),
    )
        .into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

/// The job as it was inserted, for the 202 answer (no read back).
fn accepted_view(new: &NewJob) -> Job {
    Job {
        id: new.id.clone(),
        task: new.task.clone(),
        status: JobStatus::Queued,
        priority: new.priority,
        chain: new.chain.clone(),
        hop: new.hop,
        hops: 0,
        provider: new.provider().to_string(),
        request: String::new(),
        stream: new.stream,
        caller: new.caller.clone(),
        idempotency_key: new.idempotency_key.clone(),
        pinned_instance: new.pinned_instance.clone(),
        run_at: new.created_at,
        deadline_at: new.deadline_at,
        lease_owner: None,
        lease_expires_at: None,
        hop_tries: 0,
        attempt_count: 0,
        created_at: new.created_at,
        started_at: None,
        finished_at: None,
        status_code: None,
        result: None,
        error: None,
        usage_prompt: None,
        usage_completion: None,
        batch_id: None,
        custom_id: None,
        finished_by: None,
    }
}

/// Waits for a job to finish, up to the request timeout. When it does not, the error is
/// the answer; a 504 carries the job's headers (the job goes on: its provider, its hops).
async fn wait_for(
    app: &AppState,
    watch: crate::queue::signals::JobWatch,
    job_id: &str,
    received: Instant,
    tally: Option<&WaitTally>,
) -> Result<Arc<Job>, Response> {
    match wait_for_job(app, watch, job_id, received, tally).await {
        Ok(job) => Ok(job),
        Err(e) if e.status == StatusCode::GATEWAY_TIMEOUT => {
            let job = app.shared.store.get_job(job_id).await.ok().flatten();
            let headers = job.as_ref().map(render::job_headers).unwrap_or_default();
            Err((headers, e).into_response())
        }
        Err(e) => Err(e.into_response()),
    }
}

/// Waits for a job to finish, up to the request timeout.
async fn wait_for_job(
    app: &AppState,
    mut watch: crate::queue::signals::JobWatch,
    job_id: &str,
    received: Instant,
    tally: Option<&WaitTally>,
) -> Result<Arc<Job>, ApiError> {
    let shared = &app.shared;
    let timeout = shared.settings.request_timeout;
    loop {
        let left = timeout.saturating_sub(received.elapsed());
        if left.is_zero() {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the job did not finish within {}s; poll GET /v1/jobs/{job_id} for its result",
                    timeout.as_secs()
                ),
            )
            .with_job_going_on(job_id));
        }
        let signalled = tokio::select! {
            biased;
            r = watch.wait(left.min(SAFETY_POLL)) => r.ok(),
            _ = app.shutting_down.cancelled() => None,
        };
        let finished = match signalled {
            Some(Some(job)) => Some(job),
            // A signal from another instance, the safety poll, or the end of a shutdown's
            // grace period (the job may have ended just before it): read the row.
            _ => match shared.store.get_job(job_id).await {
                Ok(Some(job)) if job.status.is_terminal() => Some(Arc::new(job)),
                Ok(Some(_)) => None,
                Ok(None) => return Err(ApiError::not_found(format!("job {job_id} disappeared"))),
                // The job is durable and will complete once the database is back (a
                // Postgres restart): keep waiting within the deadline instead of failing.
                Err(e) => {
                    tracing::warn!(job_id = %job_id, error = %e, "cannot read the job yet; still waiting");
                    None
                }
            },
        };
        if let Some(job) = finished {
            if let Some(t) = tally {
                t.observe(&job, received.elapsed());
            }
            return Ok(job);
        }
        if app.shutting_down.is_cancelled() {
            return Err(ApiError::unavailable(format!(
                "the gateway is shutting down; job {job_id} is kept and will complete: poll GET /v1/jobs/{job_id}"
            ))
            .with_job_going_on(job_id));
        }
        watch.rearm();
    }
}

/// Cancels the job of a stream whose client went away before it finished.
struct StreamGuard {
    app: AppState,
    job_id: String,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.app.shared.streams.close(&self.job_id);
        if self.done {
            return;
        }
        let app = self.app.clone();
        let id = self.job_id.clone();
        tokio::spawn(async move {
            app.shared.abort_call(&id);
            match app.shared.store.cancel_job(&id).await {
                Ok(Some(job)) if job.status == JobStatus::Cancelled => {
                    tracing::info!(job_id = %id, "stream client disconnected: job cancelled");
                    app.shared.telemetry.job_finished(&job, None);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "could not cancel the job of a closed stream")
                }
            }
        });
    }
}

/// How long a stream's answer waits for its first chunk before it commits to
/// `200 text/event-stream`. A job that fails before any chunk within this time (a request
/// the provider cannot express, a refused key, every provider down) is answered with its
/// real status and JSON error, as OpenAI does, instead of a 200 stream holding an error
/// event. A job still queued after it gets the stream, with keep-alive comments.
const STREAM_HOLD: Duration = Duration::from_secs(2);

async fn open_stream(
    app: &AppState,
    job_id: String,
    mut rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    mut watch: crate::queue::signals::JobWatch,
    include_usage: bool,
    sticky: Option<(String, String)>,
    new: &NewJob,
) -> Response {
    // Made first so that a client leaving during the hold cancels the job too.
    let mut guard = StreamGuard {
        app: app.clone(),
        job_id: job_id.clone(),
        done: false,
    };
    // A stream's job may wait in the queue as long as a plain request waits for its answer.
    let left_ms = new.deadline_at - chrono::Utc::now().timestamp_millis();
    let mut deadline =
        tokio::time::Instant::now() + Duration::from_millis(u64::try_from(left_ms).unwrap_or(0));
    let hold = STREAM_HOLD
        .min(app.shared.settings.sse_keepalive)
        .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let mut first = None;
    let mut phase = Phase::Streaming;
    let mut held_out = false;
    tokio::select! {
        biased;
        ev = rx.recv() => first = ev,
        fin = watch.wait(hold) => {
            held_out = fin.is_err();
            if let Ok(signalled) = fin {
                let job = match signalled {
                    Some(j) => Some(j),
                    None => app.shared.store.get_job(&job_id).await.ok().flatten().map(Arc::new),
                };
                match job {
                    Some(j) if j.status.is_terminal() && j.status != JobStatus::Succeeded => {
                        guard.done = true;
                        return render::finished(&j);
                    }
                    // A "go and look" wake-up (another instance, a listener reconnect) for a
                    // job that still runs: keep waiting.
                    Some(j) if !j.status.is_terminal() => watch.rearm(),
                    // Finished (or gone) with its chunks still in the channel: send them.
                    j => phase = Phase::Draining(j),
                }
            }
        }
    }
    if held_out && tokio::time::Instant::now() >= deadline {
        if still_queued(app, &job_id).await {
            // The wait ran out before the stream was committed: a real 504. Nobody will
            // read this job's chunks, so the guard cancels it.
            return stream_timeout(app, &job_id).into_response();
        }
        deadline = tokio::time::Instant::now() + SAFETY_POLL;
    }
    // The headers name the provider the job is on now: the one that answered when the
    // first chunk came or the job finished, else (still queued after the hold) the best
    // known so far; it may have moved since its accept.
    let now_on = match &phase {
        Phase::Draining(job) => job.clone(),
        _ => app
            .shared
            .store
            .get_job(&job_id)
            .await
            .ok()
            .flatten()
            .map(Arc::new),
    };
    let headers = match now_on {
        Some(job) => render::stream_headers(&job),
        None => render::stream_headers(&accepted_view(new)),
    };
    let state = SseState {
        app: app.clone(),
        job_id,
        rx,
        first,
        watch,
        include_usage,
        sticky,
        guard,
        phase,
        sent: false,
        deadline,
    };
    let mut resp = Sse::new(sse_events(state))
        .keep_alive(
            KeepAlive::new()
                .interval(app.shared.settings.sse_keepalive)
                .text("keep-alive"),
        )
        .into_response();
    resp.headers_mut().extend(headers);
    resp
}

/// What woke a streaming answer up.
enum Next {
    Event(Option<StreamEvent>),
    Finished(Result<crate::queue::signals::Finished, ()>),
    Shutdown,
    /// The request timeout (or, past it, the next look) came before the first chunk.
    Deadline,
}

/// What the SSE stream still has to do.
enum Phase {
    Streaming,
    Draining(Option<Arc<Job>>),
    Ended,
}

struct SseState {
    app: AppState,
    job_id: String,
    rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    /// An event received before the stream was committed, sent first.
    first: Option<StreamEvent>,
    watch: crate::queue::signals::JobWatch,
    include_usage: bool,
    /// (route, sticky key): a sticky route learns which provider served the stream.
    sticky: Option<(String, String)>,
    guard: StreamGuard,
    phase: Phase,
    /// A chunk reached the client.
    sent: bool,
    /// When the wait for the first chunk runs out (`ORCH_REQUEST_TIMEOUT_SECONDS`), or,
    /// past it, when to look again whether the job is back in the queue.
    deadline: tokio::time::Instant,
}

/// Whether a stream's job still waits in the queue. Past the deadline only such a job is
/// given up: a call already running goes on (its provider's `timeout_s` bounds it), as
/// the upstream has started on it.
async fn still_queued(app: &AppState, job_id: &str) -> bool {
    matches!(
        app.shared.store.get_job(job_id).await,
        Ok(Some(job)) if job.status == JobStatus::Queued
    )
}

/// The answer to a stream whose job was still queued at the request timeout.
fn stream_timeout(app: &AppState, job_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!(
            "the stream's job was still queued after {}s; it is cancelled",
            app.shared.settings.request_timeout.as_secs()
        ),
    )
    .with_job(job_id)
}

fn sse_events(state: SseState) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(state, |mut s| async move {
        loop {
            match &mut s.phase {
                Phase::Ended => return None,
                Phase::Streaming => {
                    let next = match s.first.take() {
                        Some(ev) => Next::Event(Some(ev)),
                        None => tokio::select! {
                            biased;
                            ev = s.rx.recv() => Next::Event(ev),
                            fin = s.watch.wait(SAFETY_POLL) => Next::Finished(fin),
                            // A stream still waiting for its first chunk would hold the
                            // shutdown up to its deadline: end it (its job is cancelled).
                            _ = s.app.shutting_down.cancelled(), if !s.sent => Next::Shutdown,
                            // Keep-alives would keep an SDK's read timeout from ever firing:
                            // a stream whose job never leaves the queue must end by itself.
                            _ = tokio::time::sleep_until(s.deadline), if !s.sent => Next::Deadline,
                        },
                    };
                    match next {
                        Next::Event(Some(StreamEvent::Chunk(c))) => {
                            if let Some(ev) = render::chunk_event(c, s.include_usage) {
                                s.sent = true;
                                return Some((Ok(ev), s));
                            }
                        }
                        Next::Shutdown => {
                            s.phase = Phase::Ended;
                            let err = ApiError::unavailable(
                                "the gateway is shutting down before this stream started; retry",
                            );
                            let body = err.with_job(&s.job_id).body();
                            return Some((Ok(Event::default().data(body.to_string())), s));
                        }
                        Next::Deadline => {
                            if still_queued(&s.app, &s.job_id).await {
                                // The guard, not done, cancels the job when the stream ends.
                                s.phase = Phase::Ended;
                                let body = stream_timeout(&s.app, &s.job_id).body();
                                return Some((Ok(Event::default().data(body.to_string())), s));
                            }
                            // Running (or just ended: its signal is on the way): look again
                            // later, in case it goes back to the queue for a retry.
                            s.deadline = tokio::time::Instant::now() + SAFETY_POLL;
                        }
                        Next::Event(Some(StreamEvent::Error(e))) => {
                            s.guard.done = true;
                            s.phase = Phase::Ended;
                            let body = ApiError::from(&e).with_job(&s.job_id).body();
                            return Some((Ok(Event::default().data(body.to_string())), s));
                        }
                        // Done, or the worker dropped the channel: the job ended; learn how from the row.
                        Next::Event(Some(StreamEvent::Done) | None) => {
                            s.phase = Phase::Draining(None)
                        }
                        Next::Finished(Ok(Some(job))) => s.phase = Phase::Draining(Some(job)),
                        // "Go and look": only a terminal row ends the stream.
                        Next::Finished(Ok(None)) => {
                            match s.app.shared.store.get_job(&s.job_id).await {
                                Ok(Some(job)) if job.status.is_terminal() => {
                                    s.phase = Phase::Draining(Some(Arc::new(job)))
                                }
                                Ok(None) => s.phase = Phase::Draining(None),
                                _ => s.watch.rearm(),
                            }
                        }
                        Next::Finished(Err(())) => {
                            // Safety poll: the job may have ended without a local signal.
                            if let Ok(Some(job)) = s.app.shared.store.get_job(&s.job_id).await
                                && job.status.is_terminal()
                            {
                                s.phase = Phase::Draining(Some(Arc::new(job)));
                            }
                        }
                    }
                }
                Phase::Draining(job) => {
                    // Chunks sent before the finish signal are still in the channel: send them first.
                    if let Ok(StreamEvent::Chunk(c)) = s.rx.try_recv() {
                        if let Some(ev) = render::chunk_event(c, s.include_usage) {
                            return Some((Ok(ev), s));
                        }
                        continue;
                    }
                    let job = match job.take() {
                        Some(j) => Some(j),
                        None => s
                            .app
                            .shared
                            .store
                            .get_job(&s.job_id)
                            .await
                            .ok()
                            .flatten()
                            .map(Arc::new),
                    };
                    s.guard.done = true;
                    s.phase = Phase::Ended;
                    let ev = match job.as_deref() {
                        Some(j) if j.status == JobStatus::Succeeded => {
                            s.served(j);
                            Event::default().data("[DONE]")
                        }
                        Some(j) => {
                            let err = j.error.as_ref().map(ApiError::from).unwrap_or_else(|| {
                                ApiError::internal(format!("job ended as {}", j.status.as_str()))
                            });
                            Event::default().data(err.with_job(&s.job_id).body().to_string())
                        }
                        None => Event::default()
                            .data(ApiError::internal("the job disappeared").body().to_string()),
                    };
                    return Some((Ok(ev), s));
                }
            }
        }
    })
}

impl SseState {
    /// Tells a sticky route which provider served this stream, as a plain answer does.
    fn served(&self, job: &Job) {
        let plan = self.app.shared.planner.current();
        if let Some((route, key)) = &self.sticky
            && let Some(route) = plan.config.router.routes.get(route)
        {
            self.app.router.served(route, Some(key), &job.provider);
        }
    }
}
