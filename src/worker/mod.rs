//! Worker pools: one per provider. A pool leases jobs of its provider within the shared
//! budgets, runs each call with its lease kept alive, and hands the outcome to the policy.
//! This is the only place that calls upstreams and the only place that decides retry,
//! hop, cool-down and completion.

pub mod batches;
mod call;
mod direct;
pub mod policy;
mod pool;
mod reload;
mod renewer;
mod reroute;
mod rescuer;
mod slots;
pub mod streams;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::planner::Planner;
use crate::queue::{ProviderState, QueueStore, Signals};
use crate::telemetry::Telemetry;
pub use direct::insert_and_start;
pub use renewer::RunningCall;
pub use rescuer::refresh;
pub use slots::CallSlots;
pub use streams::{StreamEvent, StreamHub};

/// Everything a pool needs, shared by all pools of one instance.
pub struct Shared {
    pub store: Arc<dyn QueueStore>,
    pub signals: Arc<Signals>,
    /// Providers and routes in force; reloaded when the config files change.
    pub planner: Planner,
    pub settings: Arc<Settings>,
    pub telemetry: Arc<Telemetry>,
    pub streams: Arc<StreamHub>,
    pub availability: Arc<Availability>,
    /// In-flight calls of this instance, so a cancel can stop one at once and their
    /// leases are renewed.
    pub running: Mutex<HashMap<String, RunningCall>>,
    /// Stops leasing; running calls get the grace period.
    pub stop_leasing: CancellationToken,
    /// Aborts running calls (after the grace period).
    pub abort_calls: CancellationToken,
    pub tracker: TaskTracker,
    /// Wakes the batch finalizer (a batch line finished or was cancelled).
    pub batch_nudge: tokio::sync::Notify,
    /// Per provider: this instance's call slots, shared by its pool and by requests that
    /// start their call directly (`direct`).
    pub slots: CallSlots,
    /// Providers whose pool runs on this instance.
    pub pools: Mutex<BTreeSet<String>>,
    /// Providers the other live instances have in their config (as of their heartbeats):
    /// one this instance's config lacks is still served while another has it.
    pub peer_providers: RwLock<BTreeSet<String>>,
    /// Requests between "insert" and "committed" now (see `direct`).
    pub accepting: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// Stops the in-flight call of a job on this instance, if there is one.
    pub fn abort_call(&self, job_id: &str) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(call) = running.get(job_id) {
            call.token.cancel();
        }
    }

    /// Provider availability as the database has it now, kept for the next requests; for
    /// decisions that must not act on a stale copy (where a job goes next). `None` when
    /// the database could not tell.
    pub async fn fresh_availability(&self) -> Option<HashMap<String, i64>> {
        let states = self.store.provider_states().await.ok()?;
        self.availability.replace(&states);
        Some(self.availability.snapshot())
    }

    /// Whether no instance serves `provider` any more: it is not in this instance's config,
    /// nor in that of any other live instance (a reload removed it, or it was gone at
    /// start). Jobs queued on it would wait forever.
    pub fn is_removed(&self, provider: &str) -> bool {
        self.planner.provider(provider).is_none()
            && !self
                .peer_providers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(provider)
    }

    /// `until` (when providers can take calls again) with every one of `providers` that is
    /// removed (`is_removed`) marked as never: jobs must not move onto them.
    pub fn without_removed<'a>(
        &self,
        mut until: HashMap<String, i64>,
        providers: impl IntoIterator<Item = &'a String>,
    ) -> HashMap<String, i64> {
        for p in providers {
            if self.is_removed(p) {
                until.insert(p.clone(), i64::MAX);
            }
        }
        until
    }

    /// A job ended: if it is a batch line, its batch may be done.
    pub fn job_ended(&self, job: &crate::queue::Job) {
        if job.batch_id.is_some() {
            self.batch_nudge.notify_one();
        }
    }
}

/// When providers can take calls again (cool-down or open breaker), as last seen. Used to
/// route new jobs around unavailable providers; the lease re-checks it in the database.
#[derive(Default)]
pub struct Availability {
    until: RwLock<HashMap<String, i64>>,
}

impl Availability {
    pub fn snapshot(&self) -> HashMap<String, i64> {
        self.until.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes in what the database says. Cool-downs and breaker openings only ever extend,
    /// so a snapshot read a moment ago must not shorten one this instance has just set.
    pub fn replace(&self, states: &[ProviderState]) {
        let now = chrono::Utc::now().timestamp_millis();
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, until| *until > now);
        for s in states {
            let until = s.cooldown_until.max(s.breaker_open_until);
            let e = map.entry(s.provider.clone()).or_insert(until);
            *e = (*e).max(until);
        }
    }

    /// The provider's upstream changed: nothing known of the old one holds.
    pub fn forget(&self, provider: &str) {
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        map.remove(provider);
    }

    pub fn extend(&self, provider: &str, until: i64) {
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(provider.to_string()).or_insert(until);
        *e = (*e).max(until);
    }
}

/// Starts a pool for each provider of the plan in force that has none running here.
pub(crate) fn start_pools(shared: &Arc<Shared>) {
    let plan = shared.planner.current();
    // Under the lock a pool also takes to see its provider gone and leave the set, so a
    // provider removed and added back never ends up with no pool (or with two).
    let mut pools = shared.pools.lock().unwrap_or_else(|e| e.into_inner());
    for name in plan.providers.keys() {
        if pools.insert(name.clone()) {
            let shared2 = shared.clone();
            let name = name.clone();
            shared
                .tracker
                .spawn(async move { pool::run(shared2, name).await });
        }
    }
}

/// Handle on the running pools.
pub struct Workers {
    shared: Arc<Shared>,
}

impl Workers {
    /// Starts one pool per provider, the rescuer, the state refresher and the renewer of
    /// leases.
    pub fn start(shared: Arc<Shared>) -> Self {
        // Not tracked: it renews the leases of calls still running while the tracker
        // drains, and ends when the instance is gone.
        tokio::spawn(renewer::run(Arc::downgrade(&shared)));
        start_pools(&shared);
        let s = shared.clone();
        shared.tracker.spawn(async move { reload::run(s).await });
        let s = shared.clone();
        shared.tracker.spawn(async move { rescuer::run(s).await });
        let s = shared.clone();
        shared.tracker.spawn(async move { batches::run(s).await });
        Self { shared }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops leasing and lets running calls finish within `grace`, then aborts the rest.
    pub async fn finish_calls(&self, grace: Duration) {
        let s = &self.shared;
        s.stop_leasing.cancel();
        s.tracker.close();
        if tokio::time::timeout(grace, s.tracker.wait()).await.is_err() {
            tracing::warn!("grace period over: aborting calls still running");
            s.abort_calls.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.tracker.wait()).await;
        }
    }

    /// Gives the jobs of calls that did not finish back to the queue.
    pub async fn release(&self) {
        let s = &self.shared;
        match s.store.release_leases(&s.settings.instance_id).await {
            Ok(p) if !p.is_empty() => {
                tracing::info!(providers = ?p, "gave unfinished jobs back to the queue")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not release leases; they will expire and be rescued")
            }
        }
    }
}
