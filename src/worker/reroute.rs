//! Jobs queued on a provider that cannot take calls (cooling down after a 429, breaker
//! open) move on to the next provider of their chain that can, instead of waiting for it;
//! a job whose every provider stays unavailable past its deadline fails with 429 at once.
//! The job that met the 429 is handled by the policy; this serves the ones queued behind it.
//! Jobs queued on a provider that a config reload removed move on the same way, to the
//! next provider of their chain still configured, or fail when none is.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use super::Shared;
use super::policy::{earliest, next_available, rate_limited_error};
use crate::queue::{JobError, JobStatus, QueuedMove};

/// How many queued jobs one pass looks at; the pool passes again while the provider stays
/// unavailable.
const BATCH: i64 = 500;

/// One pass over the jobs queued on `provider`, which cannot take calls now. Returns how
/// many jobs it moved or failed.
pub async fn reroute(shared: &Shared, provider: &str) -> usize {
    let Some(unavailable) = shared.fresh_availability().await else {
        return 0;
    };
    let jobs = match shared.store.queued_on(provider, BATCH).await {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::warn!(provider, error = %e, "cannot read the jobs to move on");
            return 0;
        }
    };
    let removed = shared.is_removed(provider);
    let unavailable = shared.without_removed(unavailable, jobs.iter().flat_map(|j| &j.chain));
    let now = chrono::Utc::now().timestamp_millis();
    let mut moves = Vec::new();
    let mut failed = 0;
    let no_history = HashSet::new();
    for job in jobs {
        // Off a removed provider, a job takes the next configured one even while it cools
        // down: that provider's pool waits out the cool-down, as for any job queued there.
        // Moves go forward only; which providers failed a queued job (its attempts) is
        // not read here, one query per job per pass: the policy reads it when the job's
        // own call fails.
        let next = next_available(&job, &unavailable, &no_history, now).or_else(|| {
            removed
                .then(|| {
                    (job.hop + 1..job.chain.len()).find(|&i| !shared.is_removed(&job.chain[i]))
                })
                .flatten()
        });
        if let Some(hop) = next {
            moves.push(QueuedMove {
                job_id: job.id.clone(),
                from: provider.to_string(),
                hop,
                to: job.chain[hop].clone(),
            });
            continue;
        }
        let (_, at) = earliest(&job, &unavailable, &no_history, now).unwrap_or((job.hop, i64::MAX));
        if at > job.deadline_at || removed {
            failed += fail_stranded(shared, provider, removed, job, at, now).await;
        }
    }
    if moves.is_empty() {
        return failed;
    }
    match shared.store.move_queued(&moves).await {
        Ok(0) => failed,
        Ok(n) => {
            let targets: BTreeSet<&str> = moves.iter().map(|m| m.to.as_str()).collect();
            tracing::info!(provider, moved = n, to = ?targets, "moved queued jobs off an unavailable provider");
            for t in targets {
                shared.signals.wake_pool(t);
            }
            failed + usize::try_from(n).unwrap_or(usize::MAX)
        }
        Err(e) => {
            tracing::warn!(provider, error = %e, "cannot move queued jobs on");
            failed
        }
    }
}

/// No instance serves `provider` any more (`Shared::is_removed`): moves every job queued
/// on it on, or fails it.
pub async fn drain_removed(shared: &Shared, provider: &str) {
    // Judged on the other instances' latest heartbeats, not on the last upkeep's copy: one
    // may have taken the provider up since.
    if !super::rescuer::refresh_peers(shared).await {
        return;
    }
    while shared.is_removed(provider) && reroute(shared, provider).await > 0 {}
}

/// Every provider of the job's chain stays unavailable past its deadline: answer 429 now.
/// Or its provider was removed from the config and no later one of its chain is left:
/// answer 502 now, as when every provider of the chain failed. Returns 1 when the job was failed here.
async fn fail_stranded(
    shared: &Shared,
    provider: &str,
    removed: bool,
    mut job: crate::queue::Job,
    at: i64,
    now: i64,
) -> usize {
    let error = if removed {
        JobError {
            status: 502,
            kind: "provider_server_error".into(),
            message: format!(
                "provider {provider} was removed from the configuration and no later \
                 provider of route {} is configured",
                job.task
            ),
            code: Some("provider_removed".into()),
            param: None,
            retry_after: None,
        }
    } else {
        rate_limited_error(&job.task, "the provider is cooling down", at - now)
    };
    match shared
        .store
        .fail_queued(&job.id, provider, &error, now)
        .await
    {
        Ok(true) => {
            tracing::info!(job_id = %job.id, provider, status = error.status, "no provider of the job's chain can take it: failed");
            job.status = JobStatus::Failed;
            job.finished_at = Some(now);
            job.status_code = Some(i64::from(error.status));
            job.error = Some(error);
            shared.telemetry.job_finished(&job, None);
            shared.job_ended(&job);
            let id = job.id.clone();
            shared.signals.job_finished(&id, Some(Arc::new(job)));
            1
        }
        Ok(false) => 0,
        Err(e) => {
            tracing::warn!(job_id = %job.id, error = %e, "cannot fail the job");
            0
        }
    }
}
