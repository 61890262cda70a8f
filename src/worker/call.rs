//! One leased job: the upstream call with its lease kept alive, then the policy's verdict
//! written back in one transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::policy::{self, Decision};
use super::{RunningCall, Shared, StreamEvent};
use crate::providers::assemble::Assembler;
use crate::providers::{ChatBody, Provider, ProviderError};
use crate::queue::{
    AttemptFinish, AttemptOutcome, Job, JobError, JobStatus, LeasedJob, Transition,
};

pub async fn run(shared: Arc<Shared>, provider: Arc<dyn Provider>, leased: LeasedJob) {
    // Everything logged while this attempt runs (here, in the renewer, in the adapter)
    // carries the job id through this span, besides the explicit `job_id` fields.
    let span = tracing::info_span!("job", job_id = %leased.job.id, provider = %leased.job.provider, attempt = leased.attempt_n);
    attempt(shared, provider, leased).instrument(span).await
}

async fn attempt(shared: Arc<Shared>, provider: Arc<dyn Provider>, leased: LeasedJob) {
    let LeasedJob { job, attempt_n } = leased;
    let token = shared.abort_calls.child_token();
    // Registered for cancels and lease renewal; undone when the attempt ends, even by a
    // panic.
    let guard = CallGuard::start(&shared, &job.id, attempt_n, token.clone());
    tracing::debug!(job_id = %job.id, provider = %job.provider, attempt = attempt_n, "calling upstream");

    let started = Instant::now();
    let verdict = match serde_json::from_str::<ChatBody>(&job.request) {
        Err(e) => Some(Verdict::Failed(ProviderError::Invalid(format!(
            "stored request is not a JSON object: {e}"
        )))),
        Ok(body) if job.stream => {
            stream_call(&shared, provider.as_ref(), &job, &body, &token).await
        }
        Ok(body) => {
            tokio::select! {
                r = provider.complete(&body) => Some(match r {
                    Ok(c) => Verdict::Done {
                        result: c.json,
                        prompt: c.usage.prompt,
                        completion: c.usage.completion,
                    },
                    Err(e) => Verdict::Failed(e),
                }),
                _ = token.cancelled() => None,
            }
        }
    };
    let latency = started.elapsed();
    tracing::debug!(job_id = %job.id, ms = latency.as_secs_f64() * 1e3, "upstream answered");
    shared
        .telemetry
        .upstream_call(&job.id, &job.provider, latency);
    match verdict {
        // Cancelled (the row says so already) or aborted at shutdown (leases are released).
        None => {
            tracing::info!(job_id = %job.id, "call stopped before it finished");
            shared
                .telemetry
                .attempt(&job.provider, AttemptOutcome::Cancelled.as_str());
        }
        // The lease stays renewed while the outcome is written.
        Some(v) => settle(&shared, provider.as_ref(), job, attempt_n, v).await,
    }
    drop(guard);
    shared.signals.slot_freed(&provider.config().name);
}

/// The life of one attempt on this instance: its entry in `running`, so that a cancel can
/// stop the call and the renewer keeps its lease alive. Dropping the guard ends both, even
/// after a panic.
struct CallGuard {
    shared: Arc<Shared>,
    job_id: String,
}

impl CallGuard {
    fn start(shared: &Arc<Shared>, job_id: &str, attempt_n: i64, token: CancellationToken) -> Self {
        let mut running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(job_id.to_string(), RunningCall { attempt_n, token });
        Self {
            shared: shared.clone(),
            job_id: job_id.to_string(),
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        running.remove(&self.job_id);
    }
}

/// How the call ended, before the policy weighs it.
enum Verdict {
    Done {
        result: String,
        prompt: Option<i64>,
        completion: Option<i64>,
    },
    Failed(ProviderError),
    /// A stream failed after chunks reached the client: no retry is possible any more.
    BrokenStream {
        error: ProviderError,
        partial: String,
        prompt: Option<i64>,
        completion: Option<i64>,
    },
}

async fn stream_call(
    shared: &Shared,
    provider: &dyn Provider,
    job: &Job,
    body: &ChatBody,
    token: &CancellationToken,
) -> Option<Verdict> {
    let Some(tx) = shared.streams.sender(&job.id) else {
        cancel_for_disconnect(shared, &job.id).await;
        return None;
    };
    let idle = Duration::from_secs_f64(provider.config().timeout_s);
    // Time to first token counts from the start of the call, as a client would see it.
    let call_started = Instant::now();
    let mut upstream = tokio::select! {
        r = provider.stream(body) => match r {
            Ok(s) => s,
            Err(e) => return Some(Verdict::Failed(e)),
        },
        _ = token.cancelled() => return None,
        _ = tx.closed() => {
            cancel_for_disconnect(shared, &job.id).await;
            return None;
        }
    };
    let mut asm = Assembler::default();
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(idle, upstream.next()) => n.unwrap_or(Some(Err(ProviderError::Timeout(idle)))),
            _ = token.cancelled() => return None,
            _ = tx.closed() => {
                cancel_for_disconnect(shared, &job.id).await;
                return None;
            }
        };
        let next = match next {
            Some(Ok(chunk)) => Some(Assembler::check(&chunk).map(|()| chunk)),
            other => other,
        };
        match next {
            Some(Ok(chunk)) => {
                if asm.chunks == 0 {
                    shared
                        .telemetry
                        .first_token(&job.provider, call_started.elapsed());
                }
                asm.push(&chunk);
                if tx.send(StreamEvent::Chunk(chunk)).await.is_err() {
                    cancel_for_disconnect(shared, &job.id).await;
                    return None;
                }
            }
            // Nothing reached the client yet: the policy may still retry or hop.
            Some(Err(e)) if asm.chunks == 0 => return Some(Verdict::Failed(e)),
            Some(Err(error)) => {
                let u = asm.usage();
                let partial = serde_json::to_string(&asm.finish()).unwrap_or_default();
                return Some(Verdict::BrokenStream {
                    error,
                    partial,
                    prompt: u.prompt,
                    completion: u.completion,
                });
            }
            None if asm.chunks == 0 => {
                return Some(Verdict::Failed(ProviderError::BadResponse(
                    "the stream ended without a chunk".into(),
                )));
            }
            None => {
                let u = asm.usage();
                return Some(Verdict::Done {
                    result: serde_json::to_string(&asm.finish()).unwrap_or_default(),
                    prompt: u.prompt,
                    completion: u.completion,
                });
            }
        }
    }
}

/// The client of a stream went away: the job ends as cancelled.
async fn cancel_for_disconnect(shared: &Shared, job_id: &str) {
    tracing::info!(job_id = %job_id, "stream client disconnected: cancelling the job");
    shared.streams.close(job_id);
    match shared.store.cancel_job(job_id).await {
        Ok(Some(job)) if job.status == JobStatus::Cancelled => {
            shared.telemetry.job_finished(&job, None)
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(job_id = %job_id, error = %e, "could not mark the job cancelled"),
    }
}

/// The providers that have failed the job so far, from its attempts. Unread (a database
/// hiccup), none: the job may then go back to one of them, which costs a call, not the job.
async fn spent_on(shared: &Shared, job_id: &str) -> HashSet<String> {
    match shared.store.get_attempts(job_id).await {
        Ok(attempts) => policy::spent_providers(&attempts),
        Err(e) => {
            tracing::warn!(job_id = %job_id, error = %e, "could not read the job's attempts");
            HashSet::new()
        }
    }
}

async fn settle(
    shared: &Shared,
    provider: &dyn Provider,
    mut job: Job,
    attempt_n: i64,
    verdict: Verdict,
) {
    let cfg = provider.config();
    let now = chrono::Utc::now().timestamp_millis();
    let (decision, status_code, error_text, tokens) = match verdict {
        Verdict::Done {
            result,
            prompt,
            completion,
        } => {
            let tokens = prompt.unwrap_or(0) + completion.unwrap_or(0);
            (
                policy::on_success(result, prompt, completion),
                Some(200),
                None,
                Some(tokens),
            )
        }
        Verdict::Failed(err) => {
            let class = policy::classify(&err, shared.settings.retry_after_default);
            let unavailable = shared.without_removed(
                shared
                    .fresh_availability()
                    .await
                    .unwrap_or_else(|| shared.availability.snapshot()),
                &job.chain,
            );
            let breaker = shared
                .planner
                .current()
                .config
                .router
                .breaker_for(&cfg.name)
                .map(|b| (b.failure_threshold, (b.recovery_time_s * 1000.0) as i64));
            // No retry on a provider removed meanwhile: no pool would lease it.
            let removed = shared.is_removed(&cfg.name);
            let max_retries = if removed { 0 } else { cfg.max_retries };
            let spent = if policy::may_leave(&class, &job, max_retries) {
                spent_on(shared, &job.id).await
            } else {
                HashSet::new()
            };
            let ctx = policy::Context {
                job: &job,
                now,
                max_retries,
                unavailable_until: &unavailable,
                spent: &spent,
                breaker,
            };
            let code = match &err {
                ProviderError::Status { status, .. } => Some(i64::from(*status)),
                _ => None,
            };
            (
                policy::on_failure(&err, &class, &ctx),
                code,
                Some(err.to_string()),
                None,
            )
        }
        Verdict::BrokenStream {
            error,
            partial,
            prompt,
            completion,
        } => {
            let decision = Decision {
                outcome: AttemptOutcome::Failed,
                transition: Transition::Fail {
                    error: JobError {
                        status: 502,
                        kind: "provider_server_error".into(),
                        message: format!("the stream broke after it started: {error}"),
                        code: Some("stream_interrupted".into()),
                        param: None,
                        retry_after: None,
                    },
                    partial: Some(partial),
                },
                effect: crate::queue::ProviderEffect {
                    success: Some(false),
                    ..Default::default()
                },
            };
            let tokens = prompt.unwrap_or(0) + completion.unwrap_or(0);
            (decision, None, Some(error.to_string()), Some(tokens))
        }
    };
    let fin = AttemptFinish {
        job_id: job.id.clone(),
        attempt_n,
        instance: shared.settings.instance_id.clone(),
        provider: job.provider.clone(),
        finished_at: now,
        outcome: decision.outcome,
        status_code,
        error: error_text,
        tokens,
        count_tokens: cfg.tpm.is_some(),
        transition: decision.transition.clone(),
        effect: decision.effect,
    };
    if let Some(until) = decision.effect.cooldown_until {
        shared.availability.extend(&job.provider, until);
        shared.telemetry.cooldown(&job.provider, until);
        tracing::warn!(job_id = %job.id, provider = %job.provider, cooldown_ms = until - now, "provider cooling down after 429");
    }
    shared
        .telemetry
        .attempt(&job.provider, decision.outcome.as_str());
    // The lease is still renewed here, so a database that is briefly away (a Postgres
    // restart, a busy SQLite writer) costs a retry, not a second upstream call: keep trying
    // for about one lease length before letting the rescuer take the job back.
    let give_up = Instant::now() + shared.settings.lease;
    let mut delay = Duration::from_millis(100);
    loop {
        match shared.store.finish_attempt(&fin).await {
            Ok(true) => break,
            Ok(false) => {
                tracing::info!(job_id = %job.id, "job changed hands while the call ran; its outcome is dropped");
                return;
            }
            Err(e) if Instant::now() + delay < give_up => {
                tracing::error!(job_id = %job.id, error = %e, "could not record the attempt; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                // The lease will expire and the rescuer re-queues the job: nothing is lost.
                tracing::error!(job_id = %job.id, error = %e, "could not record the attempt; the job will be retried");
                return;
            }
        }
    }
    apply(&mut job, &fin, &shared.settings.instance_id);
    if fin.effect.success == Some(false) && fin.effect.breaker.is_some() {
        // The database counts the failures, so it alone knows whether this one opened the
        // breaker: learn it before anyone hears of this attempt, so that the next request
        // is routed past the provider rather than accepted for it and then moved on.
        shared.fresh_availability().await;
    }
    match &decision.transition {
        Transition::Requeue {
            provider, run_at, ..
        } => {
            let delay_ms = (run_at - now).max(0);
            tracing::info!(job_id = %job.id, outcome = decision.outcome.as_str(), next = %provider, delay_ms, error = fin.error.as_deref().unwrap_or(""), "job re-queued");
            shared
                .telemetry
                .held(&job.id, Duration::from_millis(delay_ms.unsigned_abs()));
            shared.telemetry.joined_queue(1);
            shared.signals.wake_pool(provider);
        }
        _ => {
            tracing::info!(job_id = %job.id, status = job.status.as_str(), "job finished");
            shared.telemetry.job_finished(&job, Some(&cfg.model));
            shared.job_ended(&job);
            let id = job.id.clone();
            shared.signals.job_finished(&id, Some(Arc::new(job)));
        }
    }
}

/// The job as the finish just wrote it, without reading it back.
fn apply(job: &mut Job, fin: &AttemptFinish, instance: &str) {
    job.lease_owner = None;
    job.lease_expires_at = None;
    match &fin.transition {
        Transition::Succeed {
            result,
            usage_prompt,
            usage_completion,
        } => {
            job.status = JobStatus::Succeeded;
            job.finished_at = Some(fin.finished_at);
            job.status_code = Some(200);
            job.result = Some(result.clone());
            job.usage_prompt = *usage_prompt;
            job.usage_completion = *usage_completion;
            job.finished_by = Some(instance.to_string());
        }
        Transition::Fail { error, partial } => {
            job.status = JobStatus::Failed;
            job.finished_at = Some(fin.finished_at);
            job.status_code = Some(i64::from(error.status));
            job.error = Some(error.clone());
            job.result = partial.clone();
            job.finished_by = Some(instance.to_string());
        }
        Transition::Requeue {
            hop,
            provider,
            run_at,
        } => {
            if *hop != job.hop {
                job.hop_tries = 0;
            }
            if *provider != job.provider {
                job.hops += 1;
            }
            job.status = JobStatus::Queued;
            job.hop = *hop;
            job.provider = provider.clone();
            job.run_at = *run_at;
        }
    }
}
