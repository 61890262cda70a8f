//! The lease loop of one provider's pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::{Shared, call, reroute};
use crate::config::ProviderConfig;
use crate::providers::Provider;
use crate::queue::{Blocked, Budget, LeaseRequest, LeasedJob};

/// The safety net: a pool looks at the queue at least this often even with no signal.
const POLL: Duration = Duration::from_secs(1);
/// After a lease that drained the queue of due jobs: the longest wait for new work before
/// looking again.
const AFTER_DRAIN: Duration = Duration::from_millis(10);

pub async fn run(shared: Arc<Shared>, name: String) {
    let notify = shared.signals.pool(&name);
    let mut wake = Wake {
        notify: &notify,
        stop: &shared.stop_leasing,
        reloaded: shared.planner.subscribe(),
    };
    tracing::debug!(provider = %name, "pool started");

    let wants_capacity = shared.signals.capacity_flag(&name);
    while !shared.stop_leasing.is_cancelled() {
        // The adapter and limits in force now: a config reload may have changed them.
        let Some(provider) = provider_or_stop(&shared, &name) else {
            reroute::drain_removed(&shared, &name).await;
            return;
        };
        let cfg = provider.config();
        // Local cap: never hold more leases than the global concurrency allows.
        let slots = shared.slots.of(&name, cfg.concurrency);
        // Until this lease shows the queue drained, a call that ends should wake us.
        wants_capacity.store(true, Ordering::Release);
        let free = slots.available_permits();
        if free == 0 {
            wake.nap(POLL, true).await;
            continue;
        }
        // Hold the slots while leasing: requests that start their own call (`direct`)
        // take slots too, and a leased job must never find none left.
        let Ok(mut reserved) = slots
            .clone()
            .try_acquire_many_owned(u32::try_from(free).unwrap_or(u32::MAX))
        else {
            continue; // taken in between: look again
        };
        let req = lease_request(&shared, &name, cfg, free);
        let lease = match shared.store.lease(&req).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(provider = %name, error = %e, "lease failed; retrying");
                drop(reserved);
                wake.nap(POLL, false).await;
                continue;
            }
        };
        shared.telemetry.left_queue(lease.jobs.len());
        if !lease.jobs.is_empty() {
            for leased in lease.jobs {
                // The lease took at most `free` jobs: a reserved slot is there for each,
                // and the slots left over are freed when `reserved` drops.
                let Some(permit) = reserved.split(1) else {
                    // Cannot happen; the lease expires and the job is rescued.
                    tracing::error!(job_id = %leased.job.id, "no free slot for a leased job");
                    continue;
                };
                start_call(&shared, &provider, leased, permit);
            }
            if lease.drained {
                // It took every due job there was: a lease right away would most likely
                // find none and cost a transaction (a third of all leases under steady
                // load, measured). New work wakes us; ended calls need not. The short
                // nap bounds how late a retry that came due meanwhile is seen, as this
                // lease does not say when the next one is due.
                wants_capacity.store(false, Ordering::Release);
                wake.nap(AFTER_DRAIN, true).await;
            }
            continue;
        }
        // Nothing leased: the slots go back before the pool sleeps, or requests that
        // would start their own call (`direct`) find none free all the while.
        drop(reserved);
        let now = chrono::Utc::now().timestamp_millis();
        let until = |t: i64| Duration::from_millis(u64::try_from(t - now).unwrap_or(0).max(1));
        match lease.blocked {
            // Time-based blocks: new work cannot change them, so don't wake for it.
            Some(
                Blocked::Cooldown(t) | Blocked::Breaker(t) | Blocked::Rpm(t) | Blocked::Tpm(t),
            ) => {
                wants_capacity.store(false, Ordering::Release);
                if matches!(
                    lease.blocked,
                    Some(Blocked::Cooldown(_) | Blocked::Breaker(_))
                ) {
                    // Nothing can run here for a while: send what waits on to the next hop.
                    reroute::reroute(&shared, &name).await;
                }
                wake.nap(until(t).min(POLL * 5), false).await
            }
            Some(Blocked::Concurrency) => wake.nap(POLL, true).await,
            None => {
                // Nothing due: new work (or a retry coming due) wakes us, ended calls need not.
                wants_capacity.store(false, Ordering::Release);
                let wait = lease.next_due_at.map_or(POLL, |t| until(t).min(POLL));
                wake.nap(wait, true).await
            }
        }
    }
    tracing::debug!(provider = %name, "pool stopped leasing");
}

/// The provider's adapter in force, or `None` when a reload removed it: then this pool
/// leaves the set of running pools (under its lock, see `start_pools`) and stops.
fn provider_or_stop(shared: &Shared, name: &str) -> Option<Arc<dyn Provider>> {
    let mut pools = shared.pools.lock().unwrap_or_else(|e| e.into_inner());
    let provider = shared.planner.provider(name);
    if provider.is_none() {
        pools.remove(name);
        tracing::info!(provider = %name, "provider removed from the config: its pool stops");
    }
    provider
}

/// What a lease of `provider` asks for, with room for `free` jobs.
pub(super) fn lease_request(
    shared: &Shared,
    name: &str,
    cfg: &ProviderConfig,
    free: usize,
) -> LeaseRequest {
    LeaseRequest {
        provider: name.to_string(),
        model: cfg.model.clone(),
        instance: shared.settings.instance_id.clone(),
        lease_ms: i64::try_from(shared.settings.lease.as_millis()).unwrap_or(30_000),
        max_jobs: u32::try_from(free).unwrap_or(u32::MAX),
        budget: Budget {
            rpm: cfg.rpm,
            concurrency: cfg.concurrency,
            tpm: cfg.tpm,
        },
    }
}

/// Runs a leased job's call in the background; the slot is freed when it ends.
pub(super) fn start_call(
    shared: &Arc<Shared>,
    provider: &Arc<dyn Provider>,
    leased: LeasedJob,
    slot: OwnedSemaphorePermit,
) {
    let shared2 = shared.clone();
    let provider = provider.clone();
    shared.tracker.spawn(async move {
        call::run(shared2, provider, leased).await;
        drop(slot);
    });
}

/// What ends a pool's nap early.
struct Wake<'a> {
    /// New work, freed budget (when the nap asks for it).
    notify: &'a Notify,
    stop: &'a CancellationToken,
    /// A config reload: limits, the upstream or the provider itself may have changed,
    /// which even a time-based block (cool-down, rpm window) must look at again.
    reloaded: tokio::sync::watch::Receiver<u64>,
}

impl Wake<'_> {
    async fn nap(&mut self, dur: Duration, wake_on_signal: bool) {
        tokio::select! {
            _ = tokio::time::sleep(dur) => {}
            _ = self.notify.notified(), if wake_on_signal => {}
            _ = self.reloaded.changed() => {}
            _ = self.stop.cancelled() => {}
        }
    }
}
