//! A closed-loop load generator: `concurrency` clients, each sending its next request when
//! the previous one answered, for a fixed time.

use std::sync::Arc;
use std::time::{Duration, Instant};

const BODY: &str =
    r#"{"model":"bench","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}"#;

#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Requests done in the windows: each counts by the share of its time inside one.
    pub requests: f64,
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

/// What one run of load saw in its window.
pub struct Sample {
    /// Of the requests that completed inside the window.
    latencies: Vec<Duration>,
    errors: usize,
    /// Requests done inside the window, each counted by the share of its time spent there.
    done: f64,
    window: Duration,
}

impl Stats {
    /// The figures of several runs of the same load taken together (their windows
    /// added up, their latencies pooled).
    pub fn of(samples: Vec<Sample>) -> Stats {
        let mut all = Vec::new();
        let (mut errors, mut done, mut window) = (0, 0.0, Duration::ZERO);
        for s in samples {
            all.extend(s.latencies);
            errors += s.errors;
            done += s.done;
            window += s.window;
        }
        all.sort();
        let pct = |p: f64| -> f64 {
            if all.is_empty() {
                return f64::NAN;
            }
            let i = ((all.len() as f64 - 1.0) * p).round() as usize;
            all[i].as_secs_f64() * 1000.0
        };
        Stats {
            requests: done,
            errors,
            rps: done / window.as_secs_f64().max(f64::MIN_POSITIVE),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
        }
    }
}

/// Runs the load against `url` without a break: `warmup`, then the measured `window`: a
/// steady state, with neither a start-up wave (every client sending at the same instant)
/// nor a drain (whose length would be the slowest last request's). Client `i` of `n`
/// sends its first request `stagger × i / n` after the start: with an upstream that
/// always takes the same time, clients that start together stay in step for good, and a
/// gateway then meets every request of the load at once, as a burst, once per upstream
/// latency, which no real set of independent clients does (see docs/BENCHMARKS.md,
/// twelfth round). The cells pass the upstream's latency, so the first requests spread
/// over one period of it; `BENCH_LOCKSTEP=1` sets it to zero, as before. The latencies are
/// those of the requests that complete inside the window. The rate is the requests done
/// per second of window, each request counted by the share of its time inside the
/// window: counting whole requests that complete there would make it a step function of
/// where the window falls, for clients in step, and even out of step each client counts
/// a whole number (with a 200 ms upstream, a client completes 9 or 10 in a 2 s window as
/// its requests take 203 or 210 ms: a 10% step).
/// `probe` is read when the window opens and when it closes; both readings are returned.
pub async fn run(
    http: &reqwest::Client,
    url: &str,
    concurrency: usize,
    stagger: Duration,
    warmup: Duration,
    window: Duration,
    probe: impl Fn() -> f64,
) -> (Sample, (f64, f64)) {
    let url: Arc<str> = Arc::from(url);
    // Every client has sent its first request before the window opens.
    let stagger = stagger.min(warmup);
    let from = Instant::now() + warmup;
    let end = from + window;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let http = http.clone();
            let url = url.clone();
            let start = stagger.mul_f64(i as f64 / concurrency as f64);
            tokio::spawn(async move {
                tokio::time::sleep(start).await;
                let mut lat = Vec::with_capacity(4096);
                let (mut errors, mut done_in_window) = (0, 0.0);
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
                    let inside = done.min(end).saturating_duration_since(t.max(from));
                    if ok && !inside.is_zero() {
                        done_in_window +=
                            inside.as_secs_f64() / (done - t).as_secs_f64().max(f64::MIN_POSITIVE);
                    }
                    if done < from || done > end {
                        continue;
                    }
                    if ok {
                        lat.push(done - t);
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors, done_in_window)
            })
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let opened = probe();
    tokio::time::sleep_until(end.into()).await;
    let closed = probe();
    let mut sample = Sample {
        latencies: Vec::new(),
        errors: 0,
        done: 0.0,
        window,
    };
    for t in tasks {
        if let Ok((l, e, d)) = t.await {
            sample.latencies.extend(l);
            sample.errors += e;
            sample.done += d;
        }
    }
    (sample, (opened, closed))
}
