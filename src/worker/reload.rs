//! Watches the config files and puts a valid change in force (see `planner`): looks once a
//! second, and at once on SIGHUP.

use std::sync::Arc;
use std::time::Duration;

use super::{Shared, start_pools};
use crate::planner::Reload;

const LOOK_EVERY: Duration = Duration::from_secs(1);

pub async fn run(shared: Arc<Shared>) {
    let mut hangup = Hangup::listen();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = hangup.next() => tracing::info!("SIGHUP: reading the config files"),
            _ = shared.stop_leasing.cancelled() => return,
        }
        apply(&shared, shared.planner.reload_if_changed(&shared.settings)).await;
    }
}

async fn apply(shared: &Arc<Shared>, outcome: Reload) {
    match outcome {
        Reload::Unchanged => {}
        Reload::Rejected(e) => tracing::error!(
            "config files changed but are not valid; the previous config stays in force:\n{e}"
        ),
        Reload::Loaded {
            added,
            removed,
            changed,
            new_upstream,
        } => {
            let plan = shared.planner.current();
            for w in plan.config.warnings(&shared.settings.providers_file()) {
                tracing::warn!("{w}");
            }
            shared.telemetry.set_providers(plan.provider_names());
            // A cool-down or open breaker of the old upstream must not hold back the new.
            for name in &new_upstream {
                match shared.store.reset_provider_state(name).await {
                    Ok(()) => {
                        shared.availability.forget(name);
                        shared.telemetry.cooldown(name, 0);
                    }
                    Err(e) => {
                        tracing::warn!(provider = %name, error = %e, "cannot reset the provider's cool-down")
                    }
                }
            }
            start_pools(shared);
            // Pools read their provider at every lease: wake them all, even from a
            // cool-down's nap, so a changed limit, upstream or removal is seen now.
            shared.planner.reload_done();
            tracing::info!(?added, ?removed, ?changed, ?new_upstream, "config reloaded");
            // Other instances learn now which providers this one has.
            super::rescuer::heartbeat(shared).await;
        }
    }
}

/// SIGHUP, the usual "read your config again". Never fires where it cannot be had.
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn listen() -> Self {
        Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.signal
            && s.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}
