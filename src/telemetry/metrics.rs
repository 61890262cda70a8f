//! Prometheus metrics (CONTRACT §7). Labels are bounded: task, provider, status, outcome,
//! kind — never a job id or a key.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::queue::Job;

pub struct Metrics {
    registry: Registry,
    /// Every family's name, help and type, to announce those without a series yet.
    families: Vec<Family>,
    pub requests: IntCounterVec,
    pub request_latency: HistogramVec,
    pub upstream_attempts: IntCounterVec,
    pub upstream_latency: HistogramVec,
    pub queue_depth: GaugeVec,
    pub jobs_running: GaugeVec,
    pub tokens: IntCounterVec,
    pub provider_cooldown: GaugeVec,
    pub time_to_first_token: HistogramVec,
    pub overhead: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// What the exposition's `# HELP` and `# TYPE` lines say of one family.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
}

/// Registers families and remembers what each is, for `render`.
struct Builder {
    registry: Registry,
    families: Vec<Family>,
}

impl Builder {
    fn register<M: prometheus::core::Collector + Clone + 'static>(
        &mut self,
        metric: M,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
    ) -> M {
        self.registry
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        self.families.push(Family { name, help, kind });
        metric
    }

    fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[&str],
    ) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.register(c, name, help, "counter")
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.register(g, name, help, "gauge")
    }

    fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let h = HistogramVec::new(opts, labels).expect("valid metric");
        self.register(h, name, help, "histogram")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut b = Builder {
            registry: Registry::new(),
            families: Vec::new(),
        };
        Self {
            requests: b.counter(
                "orch_requests_total",
                "Finished jobs by route, provider and HTTP status.",
                &["task", "provider", "status"],
            ),
            request_latency: b.histogram(
                "orch_request_latency_seconds",
                "From acceptance to the end of the job.",
                &["task", "provider"],
                LATENCY_BUCKETS,
            ),
            upstream_attempts: b.counter(
                "orch_upstream_attempts_total",
                "Upstream calls by provider and outcome (ok, retry, hop, cooldown, failed, cancelled).",
                &["provider", "outcome"],
            ),
            upstream_latency: b.histogram(
                "orch_upstream_latency_seconds",
                "Duration of one upstream call.",
                &["provider"],
                LATENCY_BUCKETS,
            ),
            queue_depth: b.gauge(
                "orch_queue_depth",
                "Queued jobs per provider, across all instances.",
                &["provider"],
            ),
            jobs_running: b.gauge(
                "orch_jobs_running",
                "Running jobs per provider, across all instances.",
                &["provider"],
            ),
            tokens: b.counter(
                "orch_tokens_total",
                "Tokens reported by upstreams.",
                &["provider", "kind"],
            ),
            provider_cooldown: b.gauge(
                "orch_provider_cooldown",
                "Seconds left of the provider's cool-down after a 429 (0 when none).",
                &["provider"],
            ),
            time_to_first_token: b.histogram(
                "orch_time_to_first_token_seconds",
                "From the start of a streaming call to its first chunk.",
                &["provider"],
                LATENCY_BUCKETS,
            ),
            overhead: b.histogram(
                "orch_overhead_seconds",
                "Time a request spent in the gateway minus time waiting on upstreams.",
                &["task"],
                OVERHEAD_BUCKETS,
            ),
            registry: b.registry,
            families: b.families,
        }
    }

    pub fn job_finished(&self, job: &Job) {
        let status = job.status_code.unwrap_or(0).to_string();
        self.requests
            .with_label_values(&[&job.task, &job.provider, &status])
            .inc();
        if let Some(f) = job.finished_at {
            let secs = (f - job.created_at).max(0) as f64 / 1000.0;
            self.request_latency
                .with_label_values(&[&job.task, &job.provider])
                .observe(secs);
        }
        if let Some(p) = job.usage_prompt {
            self.tokens
                .with_label_values(&[&job.provider, "prompt"])
                .inc_by(p.max(0) as u64);
        }
        if let Some(c) = job.usage_completion {
            self.tokens
                .with_label_values(&[&job.provider, "completion"])
                .inc_by(c.max(0) as u64);
        }
    }

    /// The Prometheus text exposition. A family with labels has no series until its
    /// first observation, and the encoder leaves such a family out altogether; it is
    /// announced anyway (`# HELP` and `# TYPE` alone are valid exposition), so that a
    /// fresh instance lists every name of CONTRACT §7, as Python's client does.
    pub fn render(&self) -> String {
        let gathered = self.registry.gather();
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&gathered, &mut buf);
        let mut text = String::from_utf8(buf).unwrap_or_default();
        for f in &self.families {
            if !gathered.iter().any(|g| g.name() == f.name) {
                text.push_str(&format!(
                    "# HELP {} {}\n# TYPE {} {}\n",
                    f.name, f.help, f.name, f.kind
                ));
            }
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
