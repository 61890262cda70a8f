//! The benchmark runs end to end, briefly: its fake upstream, the gateway (the debug build
//! `cargo test --workspace` makes), its load generator, the lease and burst parts, and the
//! report with its targets. Figures are not judged here (a debug build on a busy machine);
//! that every part ran, answered without errors and printed its lines is.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway binary beside this test's `orch-bench` (same target directory and profile).
fn gateway() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_orch-bench"));
    let gw = bench.with_file_name("llm-orch");
    assert!(
        gw.exists(),
        "{} is missing: run `cargo test --workspace`, which builds the gateway too",
        gw.display()
    );
    gw
}

/// Runs `orch-bench` with `args` (killed after 5 minutes) and returns what it printed.
fn run_bench(args: &[&str]) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let (out, err) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_orch-bench"))
        .args(args)
        .env("ORCH_BIN", gateway())
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "orch-bench ran past 5 minutes; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let printed = std::fs::read_to_string(&out).unwrap();
    assert!(
        status.success(),
        "orch-bench failed ({status}); stdout:\n{printed}\nstderr:\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    printed
}

/// The cells of the first row for `backend` after the heading that starts with `heading`.
fn row<'a>(printed: &'a str, heading: &str, backend: &str) -> Vec<&'a str> {
    let line = printed
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .find(|l| l.starts_with(&format!("| {backend} |")))
        .unwrap_or_else(|| panic!("no {backend} row under {heading:?} in:\n{printed}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

/// One small run of every part against `backend`; checks what it printed and returns it.
fn every_part_runs(backend: &str, backend_args: &[&str]) -> String {
    let mut args = vec![
        "--seconds",
        "1",
        "--concurrency",
        "1",
        "--latency",
        "0",
        "--queued",
        "3000",
        "--burst",
        "300",
    ];
    args.extend_from_slice(backend_args);
    let printed = run_bench(&args);

    // Throughput: both sides served, the gateway without an error.
    let cells = row(&printed, "## Throughput and latency", backend);
    assert_eq!(&cells[1..3], ["1", "0 ms"], "{cells:?}");
    let rps = |i: usize| cells[i].parse::<f64>().unwrap();
    assert!(rps(3) > 0.0 && rps(4) > 0.0, "{cells:?}");
    assert_eq!(cells[11], "0", "errors through the gateway: {cells:?}");
    // Lease latency with the small and the large queue: two p50 / p99 pairs and a ratio.
    let lease = row(&printed, "## Lease latency", backend);
    assert_eq!(lease.len(), 4, "{lease:?}");
    assert!(lease[3].ends_with('×'), "{lease:?}");
    // The burst: every job accepted and done.
    let burst = row(&printed, "## Burst of 300 async jobs", backend);
    assert!(
        burst[2].parse::<f64>().unwrap() > 0.0,
        "completions: {burst:?}"
    );
    assert_eq!(burst[5], "0", "burst requests not accepted: {burst:?}");
    // A verdict for every target these parts measure.
    for target in [
        format!("{backend}: added p50 at concurrency 1, upstream 0 ms ≤ "),
        format!("{backend}: lease latency with 3000 queued within 2× "),
        format!("{backend}: RSS stays flat under 300 queued async jobs"),
    ] {
        let verdicts = printed
            .lines()
            .filter_map(|l| {
                l.strip_prefix("- [x] ")
                    .or_else(|| l.strip_prefix("- [ ] "))
            })
            .filter(|l| l.starts_with(&target))
            .count();
        assert_eq!(verdicts, 1, "target {target:?} in:\n{printed}");
    }
    // The last line sums them up.
    let last = printed.lines().rev().find(|l| !l.is_empty()).unwrap_or("");
    assert!(
        last.contains(" of 3 targets met"),
        "no summary at the end:\n{printed}"
    );
    printed
}

#[test]
fn the_benchmark_runs_every_part_against_sqlite() {
    let printed = every_part_runs("sqlite", &[]);
    assert!(
        !printed.contains("| postgres |"),
        "Postgres without --postgres:\n{printed}"
    );
}

fn postgres_url() -> String {
    std::env::var("ORCH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The databases the benchmark makes (`orch_bench_…`) that exist now.
fn bench_databases(url: &str) -> Vec<String> {
    use sqlx::Connection;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("Postgres at {url} unreachable: {e}"));
        sqlx::query_scalar(
            "SELECT datname::TEXT FROM pg_database WHERE datname LIKE 'orch_bench_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    })
}

#[test]
fn the_benchmark_runs_every_part_against_postgres_and_drops_its_databases() {
    let url = postgres_url();
    let before = bench_databases(&url);
    let printed = every_part_runs("postgres", &["--skip-sqlite", "--postgres", &url]);
    assert!(
        printed.contains("Postgres durable commit on this machine: "),
        "no commit time (the line of the concurrency-1 target) in:\n{printed}"
    );
    assert!(
        !printed.contains("| sqlite |"),
        "--skip-sqlite ran SQLite:\n{printed}"
    );
    let left: Vec<_> = bench_databases(&url)
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(left.is_empty(), "databases left behind: {left:?}");
}
