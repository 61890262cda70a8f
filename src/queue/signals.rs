//! In-process wake-ups: "a job for provider P is queued" and "job J finished".
//!
//! These are hints, never the source of truth: a waiter that is woken re-reads the row
//! when it was not handed the finished job, and every sleeper also polls slowly, so a
//! lost signal costs latency, not correctness. The Postgres backend feeds the same
//! signals from `LISTEN/NOTIFY` so work done on another instance wakes waiters here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use super::Job;

/// What a waiter receives: the finished job when this instance finished it, `None` when
/// the news came from elsewhere and the row must be read.
pub type Finished = Option<Arc<Job>>;

#[derive(Default)]
pub struct Signals {
    pools: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per pool: is it waiting for a call slot (rather than for work)?
    wants_capacity: Mutex<HashMap<String, Arc<AtomicBool>>>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Finished>>>>,
}

impl Signals {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The notifier a provider's pool sleeps on.
    pub fn pool(&self, provider: &str) -> Arc<Notify> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.entry(provider.to_string()).or_default().clone()
    }

    /// Wakes the pool of `provider` (work queued, budget freed).
    pub fn wake_pool(&self, provider: &str) {
        self.pool(provider).notify_one();
    }

    /// The flag a pool raises while more work may wait than it had slots for.
    pub fn capacity_flag(&self, provider: &str) -> Arc<AtomicBool> {
        let mut flags = self
            .wants_capacity
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        flags.entry(provider.to_string()).or_default().clone()
    }

    /// A call of `provider` ended: wake its pool only if it waits for a slot. When its
    /// last lease drained the queue, new work wakes it anyway, and an empty lease
    /// transaction after every call would be wasted.
    pub fn slot_freed(&self, provider: &str) {
        if self.capacity_flag(provider).load(Ordering::Acquire) {
            self.wake_pool(provider);
        }
    }

    /// Registers interest in a job's end. Register before inserting or re-reading the row,
    /// so that no finish can slip between the check and the wait.
    pub fn watch_job(self: &Arc<Self>, id: &str) -> JobWatch {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.entry(id.to_string()).or_default().push(tx);
        JobWatch {
            signals: self.clone(),
            id: id.to_string(),
            rx: Some(rx),
        }
    }

    /// Tells every waiter of the job that it finished.
    pub fn job_finished(&self, id: &str, job: Finished) {
        let senders = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters.remove(id)
        };
        for tx in senders.into_iter().flatten() {
            let _ = tx.send(job.clone());
        }
    }

    /// Wakes every pool and tells every waiter to re-read its job: news may have been
    /// missed (another instance's notifications while our listener was disconnected).
    pub fn wake_all(&self) {
        let pools: Vec<Arc<Notify>> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.values().cloned().collect()
        };
        for pool in pools {
            pool.notify_one();
        }
        let waiters = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *waiters)
        };
        for tx in waiters.into_values().flatten() {
            let _ = tx.send(None);
        }
    }

    fn forget_closed(&self, id: &str) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = waiters.get_mut(id) {
            v.retain(|tx| !tx.is_closed());
            if v.is_empty() {
                waiters.remove(id);
            }
        }
    }
}

/// A registered wait for one job; dropping it unregisters.
pub struct JobWatch {
    signals: Arc<Signals>,
    id: String,
    rx: Option<oneshot::Receiver<Finished>>,
}

impl JobWatch {
    /// Waits for the finish signal; `Err` after `timeout` (the watch stays registered).
    pub async fn wait(&mut self, timeout: std::time::Duration) -> Result<Finished, ()> {
        tokio::time::timeout(timeout, self.signalled())
            .await
            .map_err(|_| ())
    }

    /// Waits for the finish signal. After it returns, call `rearm` to wait again.
    pub async fn signalled(&mut self) -> Finished {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        let got = rx.await;
        self.rx = None;
        // A dropped sender means "go and look" just as a remote signal does.
        got.unwrap_or(None)
    }

    /// Re-arms after a signal was consumed without the job being finished.
    pub fn rearm(&mut self) {
        if self.rx.is_none() {
            let (tx, rx) = oneshot::channel();
            let mut waiters = self
                .signals
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            waiters.entry(self.id.clone()).or_default().push(tx);
            self.rx = Some(rx);
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        self.rx = None;
        self.signals.forget_closed(&self.id);
    }
}
