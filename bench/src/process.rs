//! The gateway under test as a separate process, and what /proc says about it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Gateway {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

/// Where the release binary is (built by `scripts/bench.sh` or `cargo build --release`).
pub fn binary() -> PathBuf {
    std::env::var_os("ORCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/llm-orch"))
}

impl Gateway {
    /// Starts llm-orch with one provider pointing at `upstream`, budgets out of the way.
    pub async fn start(upstream: &str, database_url: Option<&str>, concurrency: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config");
        std::fs::create_dir_all(&cfg).expect("config dir");
        std::fs::write(
            cfg.join("providers.toml"),
            format!(
                "[up]\ntype = \"openai\"\nbase_url = \"{upstream}/v1\"\nmodel = \"bench\"\nrpm = 100000000\nconcurrency = {concurrency}\nmax_retries = 0\ntimeout_s = 60\n"
            ),
        )
        .expect("providers");
        std::fs::write(
            cfg.join("router.yaml"),
            "routes:\n  DEFAULT:\n    primary: up\n",
        )
        .expect("router");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let db = database_url
            .map(str::to_string)
            .unwrap_or_else(|| format!("sqlite://{}/orch.db", dir.path().display()));
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log");
        let child = Command::new(binary())
            .arg("serve")
            .env("ORCH_CONFIG_DIR", &cfg)
            .env("ORCH_DATABASE_URL", db)
            .env("ORCH_BIND", format!("127.0.0.1:{port}"))
            .env("ORCH_METRICS_DIR", dir.path().join("metrics"))
            .env("ORCH_MAX_QUEUE_DEPTH", "10000000")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run `cargo build --release` first)",
                    binary().display()
                )
            });
        let gw = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(r) = http.get(format!("{}/healthz", gw.url)).send().await
                && r.status().is_success()
            {
                return gw;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not start; see its log");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds the gateway has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / clock_ticks()
    }

    /// Peak resident memory (VmHWM), MB.
    pub fn peak_rss_mb(&self) -> f64 {
        status_kb(self.pid(), "VmHWM:") / 1024.0
    }

    /// Current resident memory (VmRSS), MB.
    pub fn rss_mb(&self) -> f64 {
        status_kb(self.pid(), "VmRSS:") / 1024.0
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kb(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
