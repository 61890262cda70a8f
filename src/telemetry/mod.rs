//! What operators see: Prometheus metrics, JSONL request lines built from job records,
//! and logs.

pub mod jsonl;
pub mod logs;
pub mod metrics;

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::queue::{Job, ProviderState};

/// The instance's telemetry sinks.
pub struct Telemetry {
    pub metrics: metrics::Metrics,
    jsonl: jsonl::JsonlWriter,
    /// Queued jobs in all, as last read from the database plus jobs accepted since.
    queued: AtomicI64,
}

impl Telemetry {
    pub fn new(metrics_dir: std::path::PathBuf, instance: String) -> Self {
        Self {
            metrics: metrics::Metrics::new(),
            jsonl: jsonl::JsonlWriter::start(metrics_dir, instance),
            queued: AtomicI64::new(0),
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

    pub fn upstream_latency(&self, provider: &str, d: Duration) {
        self.metrics
            .upstream_latency
            .with_label_values(&[provider])
            .observe(d.as_secs_f64());
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
        for s in states {
            let left = (s.cooldown_until - now).max(0) as f64 / 1000.0;
            self.metrics
                .provider_cooldown
                .with_label_values(&[&s.provider])
                .set(left);
        }
    }

    pub fn queue_depths(&self, depths: &[(String, i64)]) {
        self.metrics.queue_depth.reset();
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
        for (p, n) in running {
            self.metrics
                .jobs_running
                .with_label_values(&[p])
                .set(*n as f64);
        }
    }

    /// Queued jobs in all (approximate between refreshes), for the queue-depth limit.
    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn accepted(&self, n: i64) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    /// Waits until every JSONL line handed over so far is on disk.
    pub async fn flush(&self) {
        self.jsonl.flush().await;
    }
}
