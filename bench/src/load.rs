//! A closed-loop load generator: `concurrency` clients, each sending its next request when
//! the previous one answered, for a fixed time.

use std::sync::Arc;
use std::time::{Duration, Instant};

const BODY: &str =
    r#"{"model":"bench","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}"#;

#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub requests: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(1))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// Runs the load against `url` without a break: `warmup`, then the measured `window`.
/// Only requests that complete inside the window count, and their rate is per second of
/// window: a steady state, with neither a start-up wave (every client sending at the
/// same instant) nor a drain (whose length would be the slowest last request's).
/// `probe` is read when the window opens and when it closes; the difference is returned.
pub async fn run(
    http: &reqwest::Client,
    url: &str,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    probe: impl Fn() -> f64,
) -> (Stats, f64) {
    let url: Arc<str> = Arc::from(url);
    let from = Instant::now() + warmup;
    let end = from + window;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut errors = 0;
                while Instant::now() < end {
                    let t = Instant::now();
                    let ok = match http
                        .post(&*url)
                        .header("content-type", "application/json")
                        .body(BODY)
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let ok = r.status().is_success();
                            let _ = r.bytes().await;
                            ok
                        }
                        Err(_) => false,
                    };
                    let done = Instant::now();
                    if done < from || done > end {
                        continue;
                    }
                    if ok {
                        lat.push(done - t);
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let probed = probe();
    tokio::time::sleep_until(end.into()).await;
    let probed = probe() - probed;
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    all.sort();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i].as_secs_f64() * 1000.0
    };
    let stats = Stats {
        requests: all.len(),
        errors,
        rps: all.len() as f64 / window.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    };
    (stats, probed)
}
