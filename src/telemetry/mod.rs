//! What operators see: Prometheus metrics, JSONL request lines built from job records,
//! and logs.

pub mod jsonl;
pub mod logs;
pub mod metrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::queue::{Job, ProviderState, QueueStore};

/// The instance's telemetry sinks.
pub struct Telemetry {
    pub metrics: metrics::Metrics,
    jsonl: jsonl::JsonlWriter,
    /// Queued jobs in all, as last read from the database plus jobs accepted since.
    queued: AtomicI64,
    /// Configured providers: their gauges are always exported (0 when idle), so a
    /// provider's series does not vanish when its queue empties.
    providers: std::sync::RwLock<Vec<String>>,
    /// Time spent on upstreams by jobs whose caller waits on this instance, for
    /// `orch_overhead_seconds`. Entries exist only while a handler waits (see `WaitTally`).
    waits: Mutex<HashMap<String, Waited>>,
}

/// What a job spent outside the gateway's own work.
#[derive(Debug, Default, Clone, Copy)]
struct Waited {
    /// Inside upstream calls.
    upstream: Duration,
    /// Held back on purpose: retry back-off and cool-downs the policy scheduled.
    held: Duration,
    /// Upstream calls measured, to tell whether every attempt ran here.
    calls: i64,
}

impl Telemetry {
    pub fn new(
        metrics_dir: std::path::PathBuf,
        instance: String,
        store: Arc<dyn QueueStore>,
        providers: Vec<String>,
    ) -> Self {
        let t = Self {
            metrics: metrics::Metrics::new(),
            jsonl: jsonl::JsonlWriter::start(metrics_dir, instance, store),
            queued: AtomicI64::new(0),
            providers: std::sync::RwLock::new(providers),
            waits: Mutex::new(HashMap::new()),
        };
        t.queue_depths(&[]);
        t.running_counts(&[]);
        t.zero_cooldowns();
        t
    }

    /// A config reload changed the providers: gauges list the new set.
    pub fn set_providers(&self, providers: Vec<String>) {
        let gone: Vec<String> = self
            .providers()
            .into_iter()
            .filter(|p| !providers.contains(p))
            .collect();
        for p in &gone {
            // Not an error when it never had a value.
            let _ = self.metrics.provider_cooldown.remove_label_values(&[p]);
        }
        *self.providers.write().unwrap_or_else(|e| e.into_inner()) = providers;
        self.zero_cooldowns();
    }

    fn providers(&self) -> Vec<String> {
        self.providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every configured provider shows a cool-down gauge, 0 until one is set (looking a
    /// label up creates it at 0 and leaves an existing one as it is).
    fn zero_cooldowns(&self) {
        for p in self.providers() {
            self.metrics.provider_cooldown.with_label_values(&[&p]);
        }
    }

    /// A job reached a terminal state on this instance.
    pub fn job_finished(&self, job: &Job, model: Option<&str>) {
        self.metrics.job_finished(job);
        self.jsonl.write(job, model);
    }

    pub fn attempt(&self, provider: &str, outcome: &str) {
        self.metrics
            .upstream_attempts
            .with_label_values(&[provider, outcome])
            .inc();
    }

    /// One upstream call of `job_id` took `d`.
    pub fn upstream_call(&self, job_id: &str, provider: &str, d: Duration) {
        self.metrics
            .upstream_latency
            .with_label_values(&[provider])
            .observe(d.as_secs_f64());
        if let Some(w) = self.lock_waits().get_mut(job_id) {
            w.upstream += d;
            w.calls += 1;
        }
    }

    /// The policy held `job_id` back for `d` (back-off before a retry, a cool-down).
    pub fn held(&self, job_id: &str, d: Duration) {
        if let Some(w) = self.lock_waits().get_mut(job_id) {
            w.held += d;
        }
    }

    /// Starts counting the upstream time of a job whose caller waits here; the count
    /// ends when the returned tally is dropped.
    pub fn track_wait(self: &Arc<Self>, job_id: &str) -> WaitTally {
        self.lock_waits()
            .insert(job_id.to_string(), Waited::default());
        WaitTally {
            telemetry: self.clone(),
            job_id: job_id.to_string(),
        }
    }

    fn lock_waits(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waited>> {
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn first_token(&self, provider: &str, d: Duration) {
        self.metrics
            .time_to_first_token
            .with_label_values(&[provider])
            .observe(d.as_secs_f64());
    }

    pub fn cooldown(&self, provider: &str, until_ms: i64) {
        let left = (until_ms - chrono::Utc::now().timestamp_millis()).max(0) as f64 / 1000.0;
        self.metrics
            .provider_cooldown
            .with_label_values(&[provider])
            .set(left);
    }

    pub fn provider_states(&self, states: &[ProviderState]) {
        let now = chrono::Utc::now().timestamp_millis();
        let configured = self.providers();
        // A provider no longer configured keeps its row but loses its gauge.
        for s in states.iter().filter(|s| configured.contains(&s.provider)) {
            let left = (s.cooldown_until - now).max(0) as f64 / 1000.0;
            self.metrics
                .provider_cooldown
                .with_label_values(&[&s.provider])
                .set(left);
        }
    }

    pub fn queue_depths(&self, depths: &[(String, i64)]) {
        self.metrics.queue_depth.reset();
        for p in &self.providers() {
            self.metrics.queue_depth.with_label_values(&[p]).set(0.0);
        }
        for (p, n) in depths {
            self.metrics
                .queue_depth
                .with_label_values(&[p])
                .set(*n as f64);
        }
        self.queued
            .store(depths.iter().map(|(_, n)| n).sum(), Ordering::Relaxed);
    }

    pub fn running_counts(&self, running: &[(String, i64)]) {
        self.metrics.jobs_running.reset();
        for p in &self.providers() {
            self.metrics.jobs_running.with_label_values(&[p]).set(0.0);
        }
        for (p, n) in running {
            self.metrics
                .jobs_running
                .with_label_values(&[p])
                .set(*n as f64);
        }
    }

    /// Queued jobs in all, for the queue-depth limit. Kept by this instance's own moves
    /// (accepted, leased, re-queued) between refreshes from the database, which also
    /// bring in the moves of other instances and of the rescuer.
    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::Relaxed).max(0)
    }

    /// `n` jobs joined the queue here (accepted, or re-queued after an attempt).
    pub fn joined_queue(&self, n: usize) {
        self.queued
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// `n` jobs left the queue here (leased, or cancelled while queued).
    pub fn left_queue(&self, n: usize) {
        self.queued
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Waits until every JSONL line handed over so far is on disk and marked written.
    pub async fn flush(&self) {
        self.jsonl.flush().await;
    }

    /// At shutdown: writes the pending lines and stops the writer.
    pub async fn close(&self) {
        self.jsonl.close().await;
    }

    /// Writes now the JSONL lines of finished jobs that have none and finished more than
    /// `older_than` ago (a periodic sweep does this on its own). Returns lines written.
    pub async fn sweep_lines(&self, older_than: Duration) -> usize {
        self.jsonl.sweep(older_than).await
    }
}

/// Counts the upstream time of one waiting request's job (see `Telemetry::track_wait`).
pub struct WaitTally {
    telemetry: Arc<Telemetry>,
    job_id: String,
}

impl WaitTally {
    /// Observes `orch_overhead_seconds` for a job that finished after `total` in the
    /// gateway: `total` minus time in upstream calls minus back-off and cool-downs the
    /// policy chose (tensorzero's definition: what the gateway adds to the provider's
    /// time). Skipped when an attempt ran on another instance: its time is unknown here.
    pub fn observe(&self, job: &Job, total: Duration) {
        let Some(w) = self.telemetry.lock_waits().get(&self.job_id).copied() else {
            return;
        };
        if w.calls != job.attempt_count {
            return;
        }
        let overhead = total.saturating_sub(w.upstream).saturating_sub(w.held);
        self.telemetry
            .metrics
            .overhead
            .with_label_values(&[&job.task])
            .observe(overhead.as_secs_f64());
    }
}

impl Drop for WaitTally {
    fn drop(&mut self) {
        self.telemetry.lock_waits().remove(&self.job_id);
    }
}
