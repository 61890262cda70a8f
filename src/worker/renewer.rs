//! Keeps the leases of this instance's running calls alive. One task renews them all,
//! every third of the lease, rather than a task and a timer for each call (spawned, then
//! aborted, for every request). A job that is no longer ours (cancelled by a user, or
//! rescued elsewhere after our lease expired) has its call cancelled.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Shared;

/// Renews every third of the lease, and at least every half second.
fn every(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(500))
}

/// Runs until the instance is gone (it holds only a weak handle on it, so that a stopped
/// instance releases its store).
pub async fn run(shared: Weak<Shared>) {
    let Some(every) = shared.upgrade().map(|s| every(s.settings.lease)) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        renew_all(&shared).await;
    }
}

/// One round: renews each running call's lease, all at once (writes that meet share
/// commits), and cancels the calls whose job is no longer ours.
async fn renew_all(shared: &Arc<Shared>) {
    let calls: Vec<_> = {
        let running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .iter()
            .map(|(id, call)| (id.clone(), call.clone()))
            .collect()
    };
    let lease_ms = i64::try_from(shared.settings.lease.as_millis()).unwrap_or(30_000);
    let instance = &shared.settings.instance_id;
    futures::future::join_all(calls.into_iter().map(|(job_id, call)| async move {
        match shared
            .store
            .renew_lease(&job_id, instance, call.attempt_n, lease_ms)
            .await
        {
            Ok(true) => {}
            // The attempt may have ended a moment ago (its entry goes once its end is
            // written); only a call still running is stopped, and told.
            Ok(false) if !call.token.is_cancelled() && still_running(shared, &job_id, &call) => {
                tracing::info!(job_id = %job_id, "job is no longer ours (cancelled or rescued): stopping the call");
                call.token.cancel();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(job_id = %job_id, error = %e, "lease renewal failed; will retry")
            }
        }
    }))
    .await;
}

fn still_running(shared: &Shared, job_id: &str, call: &RunningCall) -> bool {
    let running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
    running
        .get(job_id)
        .is_some_and(|c| c.attempt_n == call.attempt_n)
}

/// A call in flight on this instance: which attempt of its job, and how to stop it.
#[derive(Clone)]
pub struct RunningCall {
    pub attempt_n: i64,
    pub token: tokio_util::sync::CancellationToken,
}
