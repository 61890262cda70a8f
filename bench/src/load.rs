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

/// The share of a request's time (sent at `sent`, answered at `done`) that falls inside the
/// window `from..end`: 1 for a request wholly inside, 0 for one wholly outside.
fn share_inside(sent: Instant, done: Instant, from: Instant, end: Instant) -> f64 {
    let inside = done.min(end).saturating_duration_since(sent.max(from));
    if inside.is_zero() {
        return 0.0;
    }
    inside.as_secs_f64() / (done - sent).as_secs_f64()
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
                    if ok {
                        done_in_window += share_inside(t, done, from, end);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_request_counts_by_the_share_of_its_time_inside_the_window() {
        let t0 = Instant::now();
        let (from, end) = (t0 + ms(1_000), t0 + ms(3_000));
        let share = |sent: u64, done: u64| share_inside(t0 + ms(sent), t0 + ms(done), from, end);
        assert_eq!(share(1_500, 1_700), 1.0);
        assert_eq!(share(800, 900), 0.0);
        assert_eq!(share(3_000, 3_100), 0.0);
        assert!((share(900, 1_100) - 0.5).abs() < 1e-9);
        assert!((share(2_950, 3_150) - 0.25).abs() < 1e-9);
        // Longer than the window: the window's share of it.
        assert!((share(0, 4_000) - 0.5).abs() < 1e-9);
    }

    /// Why shares, not whole requests: a client whose requests all take 210 ms does
    /// 2 s / 210 ms = 9.52 of them in a 2 s window wherever the window falls, where
    /// counting those that complete inside gives 9 or 10 by its phase.
    #[test]
    fn the_rate_of_a_steady_client_does_not_depend_on_where_the_window_falls() {
        let t0 = Instant::now();
        let (from, end) = (t0 + ms(1_000), t0 + ms(3_000));
        let took = 210;
        let mut whole_counts = std::collections::BTreeSet::new();
        for phase in (0..took).step_by(7) {
            let (mut shares, mut whole) = (0.0, 0);
            let mut sent = phase;
            while sent < 3_500 {
                let done = sent + took;
                shares += share_inside(t0 + ms(sent), t0 + ms(done), from, end);
                if (1_000..=3_000).contains(&done) {
                    whole += 1;
                }
                sent = done;
            }
            assert!(
                (shares - 2_000.0 / took as f64).abs() < 1e-9,
                "phase {phase}: {shares}"
            );
            whole_counts.insert(whole);
        }
        assert_eq!(whole_counts.into_iter().collect::<Vec<_>>(), vec![9, 10]);
    }

    #[test]
    fn samples_pool_their_latencies_and_add_up_their_windows() {
        let sample = |lat_ms: &[u64], done: f64, window_ms: u64, errors| Sample {
            latencies: lat_ms.iter().map(|&m| ms(m)).collect(),
            errors,
            done,
            window: ms(window_ms),
        };
        let s = Stats::of(vec![
            sample(&[1, 2, 3, 4, 5], 500.0, 2_000, 1),
            sample(&[6, 7, 8, 9, 100], 700.0, 2_000, 2),
        ]);
        assert_eq!(s.requests, 1_200.0);
        assert_eq!(s.rps, 300.0);
        assert_eq!(s.errors, 3);
        // Ten latencies: the median is the 5th or 6th (rounded index 4.5 → 5), p99 the last.
        assert_eq!(s.p50_ms, 6.0);
        assert_eq!(s.p99_ms, 100.0);
        assert!(Stats::of(vec![sample(&[], 0.0, 1_000, 0)]).p50_ms.is_nan());
    }
}
