//! Background upkeep of one instance: re-queues jobs whose lease expired (their instance
//! died), and refreshes what this instance knows of shared state (provider availability,
//! queue depths) so that the request path never has to ask the database for it.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::config::DatabaseUrl;
use crate::queue::RescueScope;

pub async fn run(shared: Arc<Shared>) {
    let every =
        (shared.settings.lease / 3).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop_leasing.cancelled() => return,
        }
        heartbeat(&shared).await;
        match shared.store.rescue(RescueScope::Expired).await {
            Ok(providers) => {
                for p in &providers {
                    tracing::warn!(provider = %p, "re-queued jobs whose lease expired");
                    shared.signals.wake_pool(p);
                }
            }
            Err(e) => tracing::warn!(error = %e, "rescuer could not reach the database"),
        }
        refresh_peers(&shared).await;
        let depths = refresh(&shared).await;
        drain_unconfigured(&shared, &depths).await;
        purge_expired(&shared).await;
    }
}

/// Tells the other instances this one is alive, and which providers it has.
pub async fn heartbeat(shared: &Shared) {
    let providers = shared.planner.current().provider_names();
    if let Err(e) = shared
        .store
        .heartbeat(&shared.settings.instance_id, &providers)
        .await
    {
        tracing::warn!(error = %e, "heartbeat failed");
    }
}

/// Jobs deleted per transaction by retention: small, so the single SQLite writer (or a
/// Postgres table lock) is never held for long and leases go on between batches.
const PURGE_BATCH: i64 = 200;
/// Batches per upkeep round; a backlog (retention just switched on) drains over rounds.
const PURGE_ROUNDS: usize = 5;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// `ORCH_RETENTION_DAYS`: deletes jobs (and their attempts) finished more than that many
/// days ago, a few small batches per round.
async fn purge_expired(shared: &Shared) {
    let Some(days) = shared.settings.retention_days else {
        return;
    };
    let Ok(now) = shared.store.now_ms().await else {
        return;
    };
    let before = now - i64::from(days) * DAY_MS;
    let mut purged = 0;
    for _ in 0..PURGE_ROUNDS {
        match shared.store.purge_finished(before, PURGE_BATCH).await {
            Ok(n) => {
                purged += n;
                if n < PURGE_BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention purge failed; will retry");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if purged > 0 {
        tracing::info!(jobs = purged, days, "purged finished jobs past retention");
    }
}

/// Jobs queued on a provider that is not in the config (a reload removed it, or it was
/// gone from the files at start) would wait forever: they move on along their chains.
async fn drain_unconfigured(shared: &Shared, depths: &[(String, i64)]) {
    for (provider, n) in depths {
        if *n > 0 && shared.is_removed(provider) {
            super::reroute::drain_removed(shared, provider).await;
        }
    }
}

/// Reads which providers the other live instances have (their last heartbeats) into
/// memory. `false` when the database could not tell.
pub async fn refresh_peers(shared: &Shared) -> bool {
    // Only one process can open a SQLite file: rows of other instances are of dead ones.
    if !matches!(shared.settings.database_url, DatabaseUrl::Postgres(_)) {
        return true;
    }
    let live_since = shared
        .settings
        .live_instances_since(chrono::Utc::now().timestamp_millis());
    let Ok(instances) = shared.store.instances(live_since).await else {
        return false;
    };
    let me = &shared.settings.instance_id;
    let theirs = instances
        .into_iter()
        .filter(|i| &i.id != me)
        .flat_map(|i| i.providers)
        .collect();
    *shared
        .peer_providers
        .write()
        .unwrap_or_else(|e| e.into_inner()) = theirs;
    true
}

/// Reads provider availability and queue depths into memory; returns the depths.
pub async fn refresh(shared: &Shared) -> Vec<(String, i64)> {
    if let Ok(states) = shared.store.provider_states().await {
        shared.availability.replace(&states);
        shared.telemetry.provider_states(&states);
    }
    let depths = shared.store.queue_depths().await;
    if let Ok(depths) = &depths {
        shared.telemetry.queue_depths(depths);
    }
    if let Ok(running) = shared.store.running_counts().await {
        shared.telemetry.running_counts(&running);
    }
    depths.unwrap_or_default()
}
