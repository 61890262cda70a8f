//! orch-bench: is llm-orch the bottleneck?
//!
//! Starts an in-repo fake OpenAI upstream and the release `llm-orch` binary (SQLite, and
//! Postgres with `--postgres URL`), drives both directly and through the gateway with an
//! in-repo closed-loop load generator, and prints a table of throughput, latency, gateway
//! CPU per request and peak RSS, the lease latency with a million queued jobs, an async
//! burst, and each figure against its target. Run: `scripts/bench.sh [--postgres URL]`.

mod fake;
mod load;
mod process;
mod report;

use std::time::{Duration, Instant};

use clap::Parser;
use llm_orch::config::Settings;
use llm_orch::queue::{
    AttemptFinish, AttemptOutcome, Budget, LeaseRequest, NewJob, PRIORITY_INTERACTIVE,
    ProviderEffect, QueueStore, Transition,
};

use process::Gateway;
use report::{Burst, Figures, LeaseFigures, Row};

#[derive(Parser)]
struct Args {
    /// Also run against Postgres: an admin URL (a fresh database is created per run).
    #[arg(long)]
    postgres: Option<String>,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Jobs queued for the lease-latency measurement.
    #[arg(long, default_value_t = 1_000_000)]
    queued: usize,
    /// Async jobs in the burst.
    #[arg(long, default_value_t = 50_000)]
    burst: usize,
    /// Skip the slow parts (lease with a full queue, burst).
    #[arg(long)]
    quick: bool,
    /// Client concurrencies to measure (comma-separated), e.g. `--concurrency 64` to
    /// profile one cell.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64, 256])]
    concurrency: Vec<usize>,
    /// Measure Postgres only (with `--postgres`), e.g. to profile it.
    #[arg(long)]
    skip_sqlite: bool,
    /// Upstream latencies to measure, in ms (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 200])]
    latency: Vec<u64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let duration = Duration::from_secs(args.seconds);
    // Clients start together, as before the twelfth round (see `load::run`).
    let lockstep = std::env::var_os("BENCH_LOCKSTEP").is_some();
    let started = chrono::Utc::now();
    println!(
        "# llm-orch benchmark — {}",
        started.format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {} cores, {}", cores(), mem_total());
    println!();

    let mut backends: Vec<(&'static str, Option<String>)> = Vec::new();
    if !args.skip_sqlite {
        backends.push(("sqlite", None));
    }
    if let Some(pg) = &args.postgres {
        backends.push(("postgres", Some(pg.clone())));
    }
    let commit_ms = match &args.postgres {
        Some(pg) => Some(pg_commit_ms(pg).await),
        None => None,
    };

    let mut rows = Vec::new();
    for &latency_ms in &args.latency {
        let upstream = format!("http://{}", fake::start(Duration::from_millis(latency_ms)));
        for &concurrency in &args.concurrency {
            let http = load::client(concurrency);
            let direct_url = format!("{upstream}/v1/chat/completions");
            for (backend, pg) in &backends {
                let db = match pg {
                    Some(admin) => Some(fresh_pg_database(admin).await),
                    None => None,
                };
                let gw = Gateway::start(&upstream, db.as_deref(), 1024).await;
                let url = format!("{}/v1/chat/completions", gw.url);
                let cell = Cell {
                    http: &http,
                    direct_url: &direct_url,
                    through_url: &url,
                    concurrency,
                    stagger: if lockstep {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(latency_ms)
                    },
                };
                let (direct, through, cpu) = cell.measure(duration, &gw).await;
                let row = Row {
                    backend,
                    concurrency,
                    latency_ms,
                    direct,
                    through,
                    cpu_ms_per_req: cpu * 1000.0 / through.requests.max(1.0),
                    peak_rss_mb: gw.peak_rss_mb(),
                };
                print_progress(&row);
                rows.push(row);
            }
        }
    }

    println!();
    println!("## Throughput and latency (direct = load generator → fake upstream)");
    println!();
    println!(
        "| backend | conc | upstream | direct rps | through rps | ratio | direct p50/p99 ms | through p50/p99 ms | added p50/p99 ms | gw CPU ms/req | peak RSS MB | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} ms | {:.0} | {:.0} | {:.1}% | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.3} | {:.1} | {} |",
            r.backend,
            r.concurrency,
            r.latency_ms,
            r.direct.rps,
            r.through.rps,
            100.0 * r.ratio(),
            r.direct.p50_ms,
            r.direct.p99_ms,
            r.through.p50_ms,
            r.through.p99_ms,
            r.added_p50_ms(),
            r.through.p99_ms - r.direct.p99_ms,
            r.cpu_ms_per_req,
            r.peak_rss_mb,
            r.through.errors,
        );
    }
    if let Some(c) = commit_ms {
        println!();
        println!("Postgres durable commit on this machine: {c:.3} ms (mean of a 300-commit loop)");
    }

    let mut lease_rows = Vec::new();
    let mut burst_rows = Vec::new();
    if !args.quick {
        for (backend, pg) in &backends {
            let (small, large) = lease_latency(pg.as_deref(), args.queued).await;
            lease_rows.push(LeaseFigures {
                backend,
                small,
                large,
            });
            let upstream = format!("http://{}", fake::start(Duration::ZERO));
            let db = match pg {
                Some(admin) => Some(fresh_pg_database(admin).await),
                None => None,
            };
            burst_rows.push(burst(backend, &upstream, db.as_deref(), args.burst).await);
        }
        println!();
        println!("## Lease latency (lease one job + record its success), p50 / p99 ms");
        println!();
        println!(
            "| backend | 2,000 queued | {} queued | ratio |",
            args.queued
        );
        println!("|---|---|---|---|");
        for l in &lease_rows {
            println!(
                "| {} | {:.3} / {:.3} | {:.3} / {:.3} | {:.2}× |",
                l.backend,
                l.small.0,
                l.small.1,
                l.large.0,
                l.large.1,
                l.ratio()
            );
        }
        println!();
        println!(
            "## Burst of {} async jobs (x-orch-async, 256 clients, provider concurrency 64)",
            args.burst
        );
        println!();
        println!(
            "| backend | accept rate /s | completion rate /s | RSS idle MB | peak RSS MB | errors |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &burst_rows {
            println!(
                "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
                r.backend, r.accept_rps, r.complete_rps, r.idle_rss_mb, r.peak_rss_mb, r.errors
            );
        }
    }

    println!();
    println!("## Targets");
    println!();
    let measured: Vec<&'static str> = backends.iter().map(|(b, _)| *b).collect();
    let figures = Figures {
        backends: &measured,
        rows: &rows,
        commit_ms,
        leases: &lease_rows,
        queued: args.queued,
        bursts: &burst_rows,
        burst: args.burst,
    };
    let checks = report::checks(&figures);
    for check in &checks {
        println!("{check}");
    }
    println!();
    println!("{}", report::summary(&checks));
    if let Some(admin) = &args.postgres {
        drop_pg_databases(admin).await;
    }
}

/// How many times a cell switches between direct and through.
const SLICES: u32 = 4;
/// The warm-up of every slice after the first: clients connect again, the queue refills,
/// and what the gateway does once idle (a checkpoint) is over before the next window.
const SETTLE: Duration = Duration::from_millis(500);

/// One cell of the table: one load, directly and through the gateway.
struct Cell<'a> {
    http: &'a reqwest::Client,
    direct_url: &'a str,
    through_url: &'a str,
    concurrency: usize,
    /// Over how long the clients' first requests spread (see `load::run`).
    stagger: Duration,
}

impl Cell<'_> {
    /// Measures direct and through in turns, `SLICES` windows each, `duration` in all for
    /// each side. The machine's speed drifts by tens of percent within minutes (other
    /// tenants of the host), so two back-to-back measurements can see different machines;
    /// in turns, both see the same drift and their ratio holds. The gateway's CPU counts
    /// in the through windows and in the direct slices between them: what it does once
    /// idle (a checkpoint, metrics lines, the last requests of a window) counts too; the
    /// warm-ups of its own slices do not, like their requests, nor what follows its last
    /// window.
    async fn measure(&self, duration: Duration, gw: &Gateway) -> (load::Stats, load::Stats, f64) {
        let window = duration / SLICES;
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        let (mut cpu, mut last_closed) = (0.0, None);
        for slice in 0..SLICES {
            let first = slice == 0;
            let warmup = |first_warmup| if first { first_warmup } else { SETTLE };
            let (d, _) = load::run(
                self.http,
                self.direct_url,
                self.concurrency,
                self.stagger,
                warmup(Duration::from_secs(1)),
                window,
                || 0.0,
            )
            .await;
            direct.push(d);
            if let Some(closed) = last_closed {
                cpu += gw.cpu_seconds() - closed;
            }
            let (t, (opened, closed)) = load::run(
                self.http,
                self.through_url,
                self.concurrency,
                self.stagger,
                warmup(Duration::from_secs(2)),
                window,
                || gw.cpu_seconds(),
            )
            .await;
            through.push(t);
            cpu += closed - opened;
            last_closed = Some(closed);
        }
        (load::Stats::of(direct), load::Stats::of(through), cpu)
    }
}

fn print_progress(r: &Row) {
    eprintln!(
        "{} c={} upstream={}ms: direct {:.0} rps, through {:.0} rps, p50 {:.2}→{:.2} ms, cpu {:.3} ms/req, rss {:.1} MB",
        r.backend,
        r.concurrency,
        r.latency_ms,
        r.direct.rps,
        r.through.rps,
        r.direct.p50_ms,
        r.through.p50_ms,
        r.cpu_ms_per_req,
        r.peak_rss_mb
    );
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn mem_total() -> String {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    m.lines()
        .next()
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The databases this run created, dropped at its end.
static CREATED_DATABASES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// A new empty database on the Postgres server of `admin`; returns its URL.
async fn fresh_pg_database(admin: &str) -> String {
    use sqlx::Connection;
    let name = format!("orch_bench_{}", uuid::Uuid::now_v7().simple());
    CREATED_DATABASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(name.clone());
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .expect("postgres reachable");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    let base = admin.split('?').next().unwrap_or(admin);
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    format!("{prefix}/{name}")
}

/// Drops the databases of this run (the gateways that used them have stopped).
async fn drop_pg_databases(admin: &str) {
    use sqlx::Connection;
    let names = std::mem::take(&mut *CREATED_DATABASES.lock().unwrap_or_else(|e| e.into_inner()));
    let Ok(mut conn) = sqlx::PgConnection::connect(admin).await else {
        eprintln!(
            "cannot connect to drop the benchmark's databases: {}",
            names.join(", ")
        );
        return;
    };
    for name in names {
        let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
        if let Err(e) = dropped {
            eprintln!("cannot drop database {name}: {e}");
        }
    }
}

/// Mean time of one durable commit on this Postgres.
async fn pg_commit_ms(admin: &str) -> f64 {
    use sqlx::Connection;
    let url = fresh_pg_database(admin).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("postgres");
    sqlx::query("CREATE TABLE commit_probe (v BIGINT)")
        .execute(&mut conn)
        .await
        .expect("table");
    let start = Instant::now();
    for i in 0..300i64 {
        sqlx::query("INSERT INTO commit_probe VALUES ($1)")
            .bind(i)
            .execute(&mut conn)
            .await
            .expect("insert");
    }
    start.elapsed().as_secs_f64() * 1000.0 / 300.0
}

async fn store_for(
    pg_admin: Option<&str>,
    dir: &std::path::Path,
) -> std::sync::Arc<dyn QueueStore> {
    let url = match pg_admin {
        Some(admin) => fresh_pg_database(admin).await,
        None => format!("sqlite://{}/lease.db", dir.display()),
    };
    let settings = Settings::from_lookup(|k| (k == "ORCH_DATABASE_URL").then(|| url.clone()))
        .expect("settings");
    llm_orch::open_store(&settings).await.expect("store")
}

fn job(i: usize, now: i64) -> NewJob {
    NewJob {
        id: format!("job_{}", uuid::Uuid::now_v7().simple()),
        task: "DEFAULT".into(),
        chain: vec!["up".into()],
        hop: 0,
        request: format!(
            r#"{{"model":"bench","messages":[{{"role":"user","content":"job {i}"}}],"max_tokens":8}}"#
        ),
        stream: false,
        priority: PRIORITY_INTERACTIVE,
        caller: None,
        idempotency_key: None,
        pinned_instance: None,
        created_at: now,
        deadline_at: now + 600_000,
        batch_id: None,
        custom_id: None,
    }
}

/// Lease-and-finish latency with a small queue and with `queued` jobs waiting.
async fn lease_latency(pg: Option<&str>, queued: usize) -> ((f64, f64), (f64, f64)) {
    let mut out = Vec::new();
    for size in [2_000usize, queued] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_for(pg, dir.path()).await;
        let now = chrono::Utc::now().timestamp_millis();
        let fill = Instant::now();
        let mut i = 0;
        while i < size {
            let n = (size - i).min(10_000);
            let batch: Vec<NewJob> = (i..i + n).map(|k| job(k, now)).collect();
            store.insert_jobs(&batch, &[]).await.expect("insert");
            i += n;
        }
        eprintln!(
            "queued {size} jobs in {:.1} s",
            fill.elapsed().as_secs_f64()
        );
        let req = LeaseRequest {
            provider: "up".into(),
            model: "bench".into(),
            instance: "bench".into(),
            lease_ms: 30_000,
            max_jobs: 1,
            budget: Budget {
                rpm: u32::MAX,
                concurrency: u32::MAX,
                tpm: None,
            },
        };
        let mut times = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            let lease = store.lease(&req).await.expect("lease");
            let leased = lease.jobs.into_iter().next().expect("a job");
            times.push(t.elapsed());
            let fin = AttemptFinish {
                job_id: leased.job.id.clone(),
                attempt_n: leased.attempt_n,
                instance: "bench".into(),
                provider: "up".into(),
                finished_at: chrono::Utc::now().timestamp_millis(),
                outcome: AttemptOutcome::Ok,
                status_code: Some(200),
                error: None,
                tokens: Some(6),
                count_tokens: false,
                transition: Transition::Succeed {
                    result: "{}".into(),
                    usage_prompt: Some(5),
                    usage_completion: Some(1),
                },
                effect: ProviderEffect::default(),
            };
            store.finish_attempt(&fin).await.expect("finish");
        }
        times.sort();
        let ms = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
        out.push((ms(0.5), ms(0.99)));
    }
    (out[0], out[1])
}

/// `n` async jobs as fast as 256 clients can send them; then wait until all the gateway
/// accepted are done (at most 10 minutes). A request not accepted (not a 202, or no answer)
/// counts as an error, not as a job to wait for.
async fn burst(backend: &'static str, upstream: &str, db: Option<&str>, n: usize) -> Burst {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let gw = Gateway::start(upstream, db, 64).await;
    let idle = gw.rss_mb();
    let http = load::client(256);
    let url = format!("{}/v1/chat/completions", gw.url);
    let start = Instant::now();
    let next = std::sync::Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..256)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                let mut accepted = 0;
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let status = http
                        .post(&url)
                        .header("x-orch-async", "true")
                        .header("content-type", "application/json")
                        .body(r#"{"messages":[{"role":"user","content":"burst"}]}"#)
                        .send()
                        .await
                        .map(|r| r.status());
                    if matches!(status, Ok(s) if s == reqwest::StatusCode::ACCEPTED) {
                        accepted += 1;
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap_or(0);
    }
    let accept = start.elapsed().as_secs_f64();
    let mut done = 0;
    loop {
        let metrics = http.get(format!("{}/metrics", gw.url)).send().await.ok();
        let text = match metrics {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        };
        done = done.max(finished_jobs(&text));
        if done >= accepted || start.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = start.elapsed().as_secs_f64();
    Burst {
        backend,
        accept_rps: accepted as f64 / accept,
        complete_rps: done as f64 / total,
        idle_rss_mb: idle,
        peak_rss_mb: gw.peak_rss_mb(),
        errors: n - accepted,
    }
}

/// Jobs finished, by the gateway's `/metrics` text: the sum of `orch_requests_total`.
fn finished_jobs(metrics: &str) -> usize {
    let sum: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("orch_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    sum as usize
}
