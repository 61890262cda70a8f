//! Test helpers: the real gateway (`App`) on a random port with its own SQLite file and
//! config folder, and the real binary for crash tests.

#![allow(dead_code)]

pub mod fake;
pub mod fake_anthropic;
pub mod fake_ollama;
pub mod fake_openai;
pub mod jobs;
pub mod pg;
pub mod sse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llm_orch::App;
use llm_orch::config::Settings;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use fake::{Fake, Reply};
pub use fake_openai::FakeOpenAi;
pub use sse::Sse;

/// A providers.toml table for an OpenAI-compatible fake.
pub fn openai_provider(name: &str, base_url: &str, extra: &str) -> String {
    format!(
        "[{name}]\ntype = \"openai\"\nbase_url = \"{base_url}\"\nmodel = \"m-{name}\"\n{extra}\n"
    )
}

/// A providers.toml table of any type for a fake (or `dummy`, with an empty base_url).
pub fn provider(name: &str, kind: &str, base_url: &str, extra: &str) -> String {
    let url = if base_url.is_empty() {
        String::new()
    } else {
        format!("base_url = \"{base_url}\"\n")
    };
    format!("[{name}]\ntype = \"{kind}\"\n{url}model = \"m-{name}\"\n{extra}\n")
}

/// A router.yaml with DEFAULT → `chain` (priority) and any extra routes.
pub fn router_yaml(chain: &[&str], extra_routes: &str) -> String {
    let targets: Vec<String> = chain
        .iter()
        .map(|p| format!("      - provider: {p}"))
        .collect();
    format!(
        "defaults:\n  temperature: 0.2\n  max_tokens: 256\n  task_header: x-orch-task-kind\nroutes:\n  DEFAULT:\n    strategy: priority\n    targets:\n{}\n{extra_routes}",
        targets.join("\n")
    )
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub env: HashMap<String, String>,
    pub shutdown: CancellationToken,
    pub handle: Option<tokio::task::JoinHandle<()>>,
    /// The running app's internals (store, telemetry), for checks behind the HTTP API.
    pub shared: std::sync::Arc<llm_orch::worker::Shared>,
    /// Stops the app when the test drops it.
    _guard: tokio_util::sync::DropGuard,
}

pub struct Options {
    pub providers: String,
    pub router: String,
    pub env: Vec<(String, String)>,
}

impl Options {
    pub fn new(providers: impl Into<String>, router: impl Into<String>) -> Self {
        Self {
            providers: providers.into(),
            router: router.into(),
            env: vec![],
        }
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Writes the config into a fresh folder and returns the environment for it.
pub fn prepare(dir: &Path, opts: &Options) -> HashMap<String, String> {
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/providers.toml"), &opts.providers).unwrap();
    std::fs::write(dir.join("config/router.yaml"), &opts.router).unwrap();
    let mut env: HashMap<String, String> = [
        ("ORCH_CONFIG_DIR", dir.join("config").display().to_string()),
        (
            "ORCH_DATABASE_URL",
            format!("sqlite://{}", dir.join("data/orch.db").display()),
        ),
        ("ORCH_BIND", "127.0.0.1:0".to_string()),
        (
            "ORCH_METRICS_DIR",
            dir.join("metrics").display().to_string(),
        ),
        ("ORCH_LEASE_SECONDS", "3".to_string()),
        ("ORCH_SHUTDOWN_GRACE_SECONDS", "2".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in &opts.env {
        env.insert(k.clone(), v.clone());
    }
    env
}

pub async fn spawn_app(opts: Options) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(dir.path(), &opts);
    start_in(dir, env).await
}

/// Starts an app over an existing folder and environment (e.g. after a restart).
pub async fn start_in(dir: tempfile::TempDir, env: HashMap<String, String>) -> TestApp {
    let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("test settings");
    let app = App::build(settings).await.expect("app builds");
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    let shared = app.shared();
    let handle = tokio::spawn(async move {
        app.run().await.unwrap();
    });
    TestApp {
        addr,
        url: format!("http://{addr}"),
        dir,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        env,
        shared,
        _guard: shutdown.clone().drop_guard(),
        shutdown,
        handle: Some(handle),
    }
}

impl TestApp {
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data/orch.db")
    }

    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.chat_with(body, &[]).await
    }

    pub async fn chat_with(&self, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// `GET /v1/jobs/{id}`, parsed.
    pub async fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// The job behind a chat answer (its `x-orch-request-id`).
    pub async fn job_of(&self, resp: &reqwest::Response) -> Value {
        self.job(&req_id(resp)).await
    }

    /// Polls a job until it is finished.
    pub async fn wait_job(&self, id: &str, within: Duration) -> Value {
        self.wait_job_in(id, &["succeeded", "failed", "cancelled"], within)
            .await
    }

    /// Polls a job until its status is one of `statuses`.
    pub async fn wait_job_in(&self, id: &str, statuses: &[&str], within: Duration) -> Value {
        let end = Instant::now() + within;
        loop {
            let job: Value = self
                .get(&format!("/v1/jobs/{id}"))
                .await
                .json()
                .await
                .unwrap();
            if statuses.contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                Instant::now() < end,
                "job {id} did not reach {statuses:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful stop; returns the folder so the app can be restarted over it.
    pub async fn stop(mut self) -> (tempfile::TempDir, HashMap<String, String>) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
        }
        (self.dir, self.env)
    }
}

/// The job id of an answer (`x-orch-request-id`), which `x-request-id` repeats.
pub fn req_id(resp: &reqwest::Response) -> String {
    let id = resp.headers()["x-orch-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    // Every answer that names its job names it where the OpenAI SDKs look, too.
    let openai = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap());
    assert_eq!(openai, Some(id.as_str()), "x-request-id");
    id
}

pub fn user(text: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": text}]})
}

/// The real binary, started with `env`, its output captured in `dir/log-N.txt`.
pub struct Binary {
    pub child: Child,
    pub url: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn spawn_binary(dir: &Path, env: &HashMap<String, String>, log_name: &str) -> Binary {
    let port = free_port();
    let log = std::fs::File::create(dir.join(log_name)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-orch"));
    cmd.arg("serve")
        .env_clear()
        .envs(env)
        .env("ORCH_BIND", format!("127.0.0.1:{port}"));
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    let child = cmd
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Binary {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

impl Binary {
    pub async fn wait_ready(&self, within: Duration) {
        let end = Instant::now() + within;
        let http = reqwest::Client::new();
        while Instant::now() < end {
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("binary at {} did not become ready", self.url);
    }

    /// `POST /v1/chat/completions` with `body`.
    pub async fn chat(&self, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Sends a signal (`TERM`, `HUP`, …) by name.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([format!("-{name}").as_str(), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} {pid}");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the fakes find their key: cargo sets it for every test process, so no test has
/// to change the environment (which is unsafe with other threads running).
pub const KEY_ENV: &str = "CARGO_PKG_NAME";

pub fn upstream_key() -> String {
    std::env::var(KEY_ENV).expect("cargo sets CARGO_PKG_NAME for tests")
}

/// One gateway with a fake of every wire format and the dummy, each behind its own route:
/// `OA` (openai), `AN` (anthropic), `OL` (ollama), `DU` (dummy); DEFAULT is `OA`.
pub struct Fleet {
    pub app: TestApp,
    pub openai: Fake,
    pub anthropic: Fake,
    pub ollama: Fake,
}

/// Routes of a `Fleet`, with the provider behind each.
pub const FLEET_ROUTES: [(&str, &str); 4] =
    [("OA", "oa"), ("AN", "an"), ("OL", "ol"), ("DU", "du")];

impl Fleet {
    /// `extra_providers`/`extra_routes` add to the fleet's config (e.g. failover chains).
    pub async fn start_with(
        extra_providers: &str,
        extra_routes: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let (openai, anthropic, ollama) = (
            Fake::start().await,
            Fake::anthropic().await,
            Fake::ollama().await,
        );
        let limits = "rpm = 1000\nconcurrency = 8\nmax_retries = 0";
        let keyed = format!("auth_env = \"{KEY_ENV}\"\n{limits}");
        let providers = [
            provider("oa", "openai", &openai.base_url(), &keyed),
            provider("an", "anthropic", &anthropic.base_url(), &keyed),
            provider("ol", "ollama", &ollama.base_url(), limits),
            provider("du", "dummy", "", limits),
            extra_providers.to_string(),
        ]
        .concat();
        let mut routes: String = FLEET_ROUTES
            .iter()
            .map(|(r, p)| format!("  {r}:\n    primary: {p}\n"))
            .collect();
        routes.push_str(extra_routes);
        let mut opts = Options::new(providers, router_yaml(&["oa"], &routes));
        for (k, v) in env {
            opts = opts.env(k, v);
        }
        let app = spawn_app(opts).await;
        Self {
            app,
            openai,
            anthropic,
            ollama,
        }
    }

    pub async fn start() -> Self {
        Self::start_with("", "", &[]).await
    }

    /// A chat request on a route.
    pub async fn chat(&self, route: &str, body: Value) -> reqwest::Response {
        self.app
            .chat_with(body, &[("x-orch-task-kind", route)])
            .await
    }

    /// The fake behind a route (None for the dummy).
    pub fn fake(&self, route: &str) -> Option<&Fake> {
        match route {
            "OA" => Some(&self.openai),
            "AN" => Some(&self.anthropic),
            "OL" => Some(&self.ollama),
            _ => None,
        }
    }

    pub async fn job(&self, resp: &reqwest::Response) -> Value {
        let id = resp.headers()["x-orch-request-id"].to_str().unwrap();
        self.app.wait_job(id, Duration::from_secs(20)).await
    }
}

/// What an OpenAI SDK reads of a completion or chunk, with ids, times, models and
/// counts reduced to their types and the dummy's text prefix made the fakes', so answers
/// from different providers can be compared whole.
pub fn shape(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "system_fingerprint")
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("id" | "created" | "model", Value::String(_)) => json!("<string>"),
                        (_, Value::Number(_)) if k != "index" => json!("<number>"),
                        _ => shape(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::String(s) => Value::String(s.replace("dummy:", "fake:")),
        other => other.clone(),
    }
}
