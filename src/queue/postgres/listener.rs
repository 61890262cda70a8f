//! `LISTEN` for other instances' news and turn it into local signals.
//!
//! Notifications are transient: those sent while our connection was down are gone. So
//! after every (re)connection but the first, every pool and every waiter is woken to look
//! at the database itself; the slow polls stay as the last safety net.
//!
//! Postgres delivers our own notifications to our listener too. "Look at provider P"
//! from our own connections is dropped: whatever this instance queues, requeues or ends
//! already wakes its pools in-process, and the echo only cost an empty lease per call.
//! "Job J finished" is always dispatched (a rescue here may end a job a local waiter
//! watches, which nothing else here signals).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use super::{CHANNEL_FINISHED, CHANNEL_PROVIDER};
use crate::queue::Signals;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The server process ids of this instance's connections, recorded as each opens. A
/// closed connection's id stays: should the server reuse it for another instance's
/// connection, that instance's provider news would reach us by the slow poll only.
#[derive(Clone, Default)]
pub struct OwnBackends(Arc<Mutex<HashSet<u32>>>);

impl OwnBackends {
    pub fn add(&self, pid: i32) {
        if let Ok(pid) = u32::try_from(pid) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
        }
    }

    fn contains(&self, pid: u32) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pid)
    }
}

pub async fn run(pool: PgPool, own: OwnBackends, signals: Arc<Signals>, stop: CancellationToken) {
    let mut connected_before = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = tokio::select! {
            l = connect(&pool) => l,
            _ = stop.cancelled() => return,
        };
        let mut listener = match attempt {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other instances' news; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if connected_before {
            tracing::info!("listening again for other instances' news");
            signals.wake_all();
        }
        connected_before = true;
        loop {
            let got = tokio::select! {
                r = listener.try_recv() => r,
                _ = stop.cancelled() => return,
            };
            match got {
                Ok(Some(n)) => {
                    if n.channel() == CHANNEL_PROVIDER && own.contains(n.process_id()) {
                        continue;
                    }
                    dispatch(&signals, n.channel(), n.payload())
                }
                // The connection dropped and sqlx re-established it (re-listening):
                // whatever was sent in between is lost, so everyone looks again.
                Ok(None) => {
                    tracing::warn!("listener connection was lost and re-established");
                    signals.wake_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listener connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([CHANNEL_PROVIDER, CHANNEL_FINISHED])
        .await?;
    Ok(listener)
}

/// `orch_provider` carries `P` (work queued for provider P: wake its pool) or `slot:P` (a
/// call of P ended: wake its pool only if it waits for a slot, as for local calls).
fn dispatch(signals: &Signals, channel: &str, payload: &str) {
    match channel {
        CHANNEL_PROVIDER => match payload.strip_prefix("slot:") {
            Some(provider) => signals.slot_freed(provider),
            None => signals.wake_pool(payload),
        },
        CHANNEL_FINISHED => signals.job_finished(payload, None),
        _ => {}
    }
}
