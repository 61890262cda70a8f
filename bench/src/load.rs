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

/// Runs the load against `url` (a chat completions endpoint).
pub async fn run(
    http: &reqwest::Client,
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> Stats {
    let url: Arc<str> = Arc::from(url);
    let start = Instant::now();
    let end = start + duration;
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
                    if ok {
                        lat.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i].as_secs_f64() * 1000.0
    };
    Stats {
        requests: all.len(),
        errors,
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}
