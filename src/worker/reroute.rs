//! Jobs queued on a provider that cannot take calls (cooling down after a 429, breaker
//! open) move on to the next provider of their chain that can, instead of waiting for it;
//! a job whose every provider stays unavailable past its deadline fails with 429 at once.
//! The job that met the 429 is handled by the policy; this serves the ones queued behind it.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::Shared;
use super::policy::{earliest, next_available, rate_limited_error};
use crate::queue::{JobStatus, QueuedMove};

/// How many queued jobs one pass looks at; the pool passes again while the provider stays
/// unavailable.
const BATCH: i64 = 500;

pub async fn reroute(shared: &Shared, provider: &str) {
    let unavailable = match shared.store.provider_states().await {
        Ok(states) => {
            shared.availability.replace(&states);
            shared.availability.snapshot()
        }
        Err(_) => return,
    };
    let jobs = match shared.store.queued_on(provider, BATCH).await {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::warn!(provider, error = %e, "cannot read the jobs to move on");
            return;
        }
    };
    let now = chrono::Utc::now().timestamp_millis();
    let mut moves = Vec::new();
    for job in jobs {
        if let Some(hop) = next_available(&job, &unavailable, now) {
            moves.push(QueuedMove {
                job_id: job.id.clone(),
                from: provider.to_string(),
                hop,
                to: job.chain[hop].clone(),
            });
            continue;
        }
        let (_, at) = earliest(&job, &unavailable, now);
        if at > job.deadline_at {
            fail_past_deadline(shared, provider, job, at, now).await;
        }
    }
    if moves.is_empty() {
        return;
    }
    match shared.store.move_queued(&moves).await {
        Ok(0) => {}
        Ok(n) => {
            let targets: BTreeSet<&str> = moves.iter().map(|m| m.to.as_str()).collect();
            tracing::info!(provider, moved = n, to = ?targets, "moved queued jobs off an unavailable provider");
            for t in targets {
                shared.signals.wake_pool(t);
            }
        }
        Err(e) => tracing::warn!(provider, error = %e, "cannot move queued jobs on"),
    }
}

/// Every provider of the job's chain stays unavailable past its deadline: answer 429 now.
async fn fail_past_deadline(
    shared: &Shared,
    provider: &str,
    mut job: crate::queue::Job,
    at: i64,
    now: i64,
) {
    let error = rate_limited_error(&job.task, "the provider is cooling down", at - now);
    match shared
        .store
        .fail_queued(&job.id, provider, &error, now)
        .await
    {
        Ok(true) => {
            tracing::info!(job_id = %job.id, provider, "every provider is unavailable past the deadline: 429");
            job.status = JobStatus::Failed;
            job.finished_at = Some(now);
            job.status_code = Some(i64::from(error.status));
            job.error = Some(error);
            shared.telemetry.job_finished(&job, None);
            shared.job_ended(&job);
            let id = job.id.clone();
            shared.signals.job_finished(&id, Some(Arc::new(job)));
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(job_id = %job.id, error = %e, "cannot fail the job"),
    }
}
