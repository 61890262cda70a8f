//! The `llm-orch` command: serve, migrate, check-config, metrics export.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llm_orch::config::{Config, Settings};
use llm_orch::{App, open_store, open_store_for_reading, shutdown_signal, telemetry};

#[derive(Parser)]
#[command(
    name = "llm-orch",
    version,
    about = "A durable, queue-backed, OpenAI-compatible LLM gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: HTTP server, worker pools, lease rescuer (migrations first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Load and validate the configuration, print the resolved routes.
    CheckConfig,
    /// Metrics tools.
    Metrics {
        #[command(subcommand)]
        command: MetricsCommand,
    },
}

#[derive(Subcommand)]
enum MetricsCommand {
    /// Rewrite the JSONL request lines from job records.
    Export {
        /// First UTC day (YYYY-MM-DD), inclusive; default: today.
        #[arg(long)]
        since: Option<chrono::NaiveDate>,
        /// Last UTC day (YYYY-MM-DD), inclusive; default: today.
        #[arg(long)]
        until: Option<chrono::NaiveDate>,
        /// Output folder; default: ORCH_METRICS_DIR.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// See Cargo.toml: the request path is allocation-heavy, and glibc malloc was a sixth of
/// the gateway's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks the kernel for transparent huge pages on its arena, so a few live bytes
/// in a 2 MiB stretch keep all 2 MiB resident: at 256 concurrent requests on Postgres
/// that was a third of the gateway's RSS (87–97 MB against 57–63 MB without), for 2–4%
/// of its throughput there (fewer TLB misses; none measurable on SQLite at 64). Memory is
/// the budget operators set limits on, so the process opts out: that covers kernels set
/// to `always` as well as `madvise` (docs/BENCHMARKS.md, ninth round).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-orch: configuration problems:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::logs::init(settings.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("llm-orch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(settings).await,
            Command::Migrate => migrate(settings).await,
            Command::CheckConfig => check_config(&settings),
            Command::Metrics {
                command: MetricsCommand::Export { since, until, out },
            } => export(settings, since, until, out).await,
        }
    })
}

async fn serve(settings: Settings) -> ExitCode {
    let app = match App::build(settings).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("llm-orch: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    match app.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-orch: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(settings: Settings) -> ExitCode {
    match open_store(&settings).await {
        Ok(store) => {
            println!("migrations applied ({})", store.backend());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("llm-orch: migrate failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(settings: &Settings) -> ExitCode {
    match Config::load(settings) {
        Ok(cfg) => {
            println!(
                "config OK ({} and {})",
                settings.providers_file().display(),
                settings.router_file().display()
            );
            print!("{}", cfg.describe());
            // Not errors: the serving environment may set what this shell does not.
            for w in cfg.warnings(&settings.providers_file()) {
                eprintln!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("config has {} problem(s):", e.problems.len());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn export(
    settings: Settings,
    since: Option<chrono::NaiveDate>,
    until: Option<chrono::NaiveDate>,
    out: Option<PathBuf>,
) -> ExitCode {
    let today = chrono::Utc::now().date_naive();
    let since = since.unwrap_or(today);
    let until = until.unwrap_or(today);
    if until < since {
        eprintln!("llm-orch: --until ({until}) is before --since ({since})");
        return ExitCode::FAILURE;
    }
    let out = out.unwrap_or_else(|| settings.metrics_dir.clone());
    let store = match open_store_for_reading(&settings).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-orch: {e}");
            return ExitCode::FAILURE;
        }
    };
    match llm_orch::export::export(store.as_ref(), since, until, &out).await {
        Ok((files, lines)) => {
            println!(
                "wrote {lines} line(s) in {files} file(s) to {}",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("llm-orch: export failed: {e}");
            ExitCode::FAILURE
        }
    }
}
