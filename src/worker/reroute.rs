//! Jobs queued on a provider that cannot take calls (cooling down after a 429, breaker
//! open) move on to the next provider of their chain that can, instead of waiting for it.
//! The job that met the 429 hops by the policy; this serves the ones queued behind it.

use std::collections::BTreeSet;

use super::Shared;
use super::policy::next_available;
use crate::queue::QueuedMove;

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
    let moves: Vec<QueuedMove> = jobs
        .iter()
        .filter_map(|job| {
            let hop = next_available(job, &unavailable, now)?;
            Some(QueuedMove {
                job_id: job.id.clone(),
                from: provider.to_string(),
                hop,
                to: job.chain[hop].clone(),
            })
        })
        .collect();
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
