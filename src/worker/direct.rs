//! Accept and lease in one go: a request whose provider has a free call slot on this
//! instance inserts its job and leases in the same store call (one SQLite transaction),
//! and starts the call itself, instead of waking the pool to lease in a transaction of
//! its own. The lease is the pool's ordinary one, so budgets, priorities and order hold:
//! it may hand back an older job than the request's, or none (the pool then takes over).
//!
//! Only a request that is accepted alone does this. Under load the pool leases many jobs
//! per transaction, which costs less than one lease per request, and on Postgres a lease
//! per request would queue every request behind the provider's lease lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::OwnedSemaphorePermit;

use super::{Shared, pool};
use crate::providers::Provider;
use crate::queue::{Inserted, LeaseRequest, NewJob, StoreError, StoreResult};

/// Inserts `job` and, when a call slot of its provider is free here, leases and starts
/// what the queue gives at once. Either way the job is committed when this returns.
pub async fn insert_and_start(shared: &Arc<Shared>, job: &NewJob) -> StoreResult<Inserted> {
    let name = job.provider();
    let alone = shared.accepting.fetch_add(1, Ordering::AcqRel) == 0;
    let _accepting = Accepting(&shared.accepting);
    let slot = (alone && !shared.stop_leasing.is_cancelled())
        .then(|| shared.planner.provider(name))
        .flatten()
        .and_then(|provider| {
            let cfg = provider.config();
            let permit = shared
                .slots
                .of(name, cfg.concurrency)
                .try_acquire_owned()
                .ok()?;
            let req = pool::lease_request(shared, name, cfg, 1);
            Some((provider, permit, req))
        });
    let Some((provider, permit, req)) = slot else {
        let inserted = shared.store.insert_job(job).await?;
        if matches!(inserted, Inserted::New) {
            shared.signals.wake_pool(name);
        }
        return Ok(inserted);
    };
    // A job leased here must reach its call even when the request goes away meanwhile
    // (its future dropped while the write runs): otherwise it would sit leased and idle
    // until its lease expired. So the write and the start run on a task of their own.
    let (shared, job) = (shared.clone(), job.clone());
    let tracker = shared.tracker.clone();
    tracker
        .spawn(async move { accept_and_start(&shared, &job, provider, permit, req).await })
        .await
        .map_err(|e| StoreError::Write(format!("the accept stopped: {e}")))?
}

/// Inserts `job` with a lease of `req` and starts the call of what was leased.
async fn accept_and_start(
    shared: &Arc<Shared>,
    job: &NewJob,
    provider: Arc<dyn Provider>,
    permit: OwnedSemaphorePermit,
    req: LeaseRequest,
) -> StoreResult<Inserted> {
    let name = job.provider();
    let (inserted, lease) = shared.store.insert_and_lease(job, &req).await?;
    if !matches!(inserted, Inserted::New) {
        return Ok(inserted);
    }
    shared.telemetry.left_queue(lease.jobs.len());
    match lease.jobs.into_iter().next() {
        Some(leased) => {
            // Something older went first: this job waits for the pool like any other.
            if leased.job.id != job.id {
                shared.signals.wake_pool(name);
            }
            pool::start_call(shared, &provider, leased, permit);
        }
        // Blocked by a budget, or nothing due: the pool decides what happens next.
        None => shared.signals.wake_pool(name),
    }
    Ok(inserted)
}

/// Counts a request as being accepted until its insert is committed (or it gave up).
struct Accepting<'a>(&'a AtomicUsize);

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
