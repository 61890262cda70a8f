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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use super::{CHANNEL_FINISHED, CHANNEL_PROVIDER};
use crate::queue::Signals;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The payload prefix by which a starting instance announces itself.
pub const ANNOUNCE: &str = "instance:";

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

/// Whether other instances may be listening. Hints are sent only then: an instance
/// alone on its database would otherwise pay a transaction (and a WAL flush) per
/// request for news nobody reads.
///
/// Starts as "yes". Each heartbeat says whether another instance beat recently; any
/// notification from another instance (a new one announces itself when it starts) says
/// "yes" at once, so a newcomer is not missed until the next heartbeat.
#[derive(Clone)]
pub struct Peers {
    maybe: Arc<AtomicBool>,
    /// Notifications heard from other instances, so far.
    heard: Arc<AtomicU64>,
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            maybe: Arc::new(AtomicBool::new(true)),
            heard: Arc::default(),
        }
    }
}

impl Peers {
    pub fn present(&self) -> bool {
        self.maybe.load(Ordering::Acquire)
    }

    fn heard_one(&self) {
        self.heard.fetch_add(1, Ordering::AcqRel);
        self.maybe.store(true, Ordering::Release);
    }

    /// Call before asking the database, and pass to `seen_by_heartbeat`.
    pub fn heard_so_far(&self) -> u64 {
        self.heard.load(Ordering::Acquire)
    }

    /// What a heartbeat found. "None" does not override news heard while it was asked.
    pub fn seen_by_heartbeat(&self, others: bool, heard_before: u64) {
        if others {
            self.maybe.store(true, Ordering::Release);
        } else if self.heard_so_far() == heard_before {
            self.maybe.store(false, Ordering::Release);
        }
    }
}

pub async fn run(
    pool: PgPool,
    own: OwnBackends,
    peers: Peers,
    signals: Arc<Signals>,
    stop: CancellationToken,
) {
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
                    let ours = own.contains(n.process_id());
                    if !ours {
                        peers.heard_one();
                    }
                    if n.channel() == CHANNEL_PROVIDER && ours {
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

/// `orch_provider` carries `P` (work queued for provider P: wake its pool), `slot:P` (a
/// call of P ended: wake its pool only if it waits for a slot, as for local calls) or
/// `instance:I` (instance I started: nothing to do but know it is there).
fn dispatch(signals: &Signals, channel: &str, payload: &str) {
    match channel {
        CHANNEL_PROVIDER if payload.starts_with(ANNOUNCE) => {}
        CHANNEL_PROVIDER => match payload.strip_prefix("slot:") {
            Some(provider) => signals.slot_freed(provider),
            None => signals.wake_pool(payload),
        },
        CHANNEL_FINISHED => signals.job_finished(payload, None),
        _ => {}
    }
}
