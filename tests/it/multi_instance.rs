//! Several real `llm-orch` processes on one Postgres database and one fake upstream:
//! budgets hold across instances, news crosses instances, a killed instance's jobs
//! complete elsewhere, and a Postgres restart loses nothing.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::pg::{self, TestDb};
use crate::support::*;

/// Instances sharing one test database, each with its own folder and log.
struct Cluster {
    dir: tempfile::TempDir,
    db_url: String,
    nodes: Vec<Binary>,
    http: reqwest::Client,
}

impl Cluster {
    fn new(db: &TestDb) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            db_url: db.url.clone(),
            nodes: vec![],
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    /// Starts instance `node-N` whose provider `up` (on `fake`) has these limits. Odd
    /// nodes wait for every commit (`ORCH_POSTGRES_SYNCHRONOUS=FULL`), even ones only for
    /// accepts (the default): instances of both kinds share one database and its budgets.
    async fn start(&mut self, fake: &FakeOpenAi, limits: &str, lease_secs: u32) -> usize {
        let n = self.nodes.len();
        let dir = self.dir.path().join(format!("node-{n}"));
        let opts = Options::new(
            openai_provider("up", &fake.base_url(), &format!("{limits}\ntimeout_s = 60")),
            router_yaml(&["up"], ""),
        )
        .env("ORCH_DATABASE_URL", &self.db_url)
        .env("ORCH_INSTANCE_ID", &format!("node-{n}"))
        .env("ORCH_LEASE_SECONDS", &lease_secs.to_string())
        .env(
            "ORCH_POSTGRES_SYNCHRONOUS",
            if n % 2 == 1 { "FULL" } else { "NORMAL" },
        )
        .env("RUST_LOG", "info");
        let env: HashMap<String, String> = prepare(&dir, &opts);
        let node = spawn_binary(self.dir.path(), &env, &format!("log-{n}.txt"));
        node.wait_ready(Duration::from_secs(30)).await;
        self.nodes.push(node);
        n
    }

    /// Submits an async job through node `n`; returns its id.
    async fn submit(&self, n: usize, text: &str) -> String {
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.nodes[n].url))
            .header("x-orch-async", "true")
            .json(&user(text))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            202,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        let job: Value = resp.json().await.unwrap();
        job["id"].as_str().unwrap().to_string()
    }

    async fn job(&self, n: usize, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/jobs/{id}", self.nodes[n].url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls through node `n` until every job finished; returns them.
    async fn wait_all(&self, n: usize, ids: &[String], within: Duration) -> Vec<Value> {
        let end = Instant::now() + within;
        let mut done = Vec::new();
        for id in ids {
            loop {
                let job = self.job(n, id).await;
                if ["succeeded", "failed", "cancelled"]
                    .contains(&job["status"].as_str().unwrap_or(""))
                {
                    done.push(job);
                    break;
                }
                assert!(Instant::now() < end, "job {id} did not finish: {job}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        done
    }

    async fn health(&self, n: usize) -> u16 {
        match self
            .http
            .get(format!("{}/healthz", self.nodes[n].url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }
}

async fn wait_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_holds_across_instances_and_is_used() {
    let db = TestDb::create().await;
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(300));
    let mut c = Cluster::new(&db);
    for _ in 0..3 {
        c.start(&fake, "rpm = 10000\nconcurrency = 3", 10).await;
    }
    let mut ids = vec![];
    for i in 0..24 {
        ids.push(c.submit(i % 3, &format!("job {i}")).await);
    }
    let jobs = c.wait_all(0, &ids, Duration::from_secs(60)).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"));
    assert_eq!(fake.call_count(), 24);
    assert_eq!(
        fake.max_in_flight(),
        3,
        "in flight at the upstream must reach concurrency and never pass it"
    );
    // The work was shared, not done by one instance.
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    for j in &jobs {
        *by_instance
            .entry(
                j["attempts"][0]["instance"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
            .or_default() += 1;
    }
    assert!(by_instance.len() >= 2, "{by_instance:?}");
}

impl Cluster {
    /// Rewrites node `n`'s config files (it reloads them by itself).
    fn write_config(&self, n: usize, providers: &str, router: &str) {
        let config = self.dir.path().join(format!("node-{n}/config"));
        std::fs::write(config.join("providers.toml"), providers).unwrap();
        std::fs::write(config.join("router.yaml"), router).unwrap();
    }

    /// The providers node `of` has, as node `via` sees them in `/healthz`.
    async fn providers_of(&self, via: usize, of: usize) -> Value {
        let health: Value = self
            .http
            .get(format!("{}/healthz", self.nodes[via].url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = format!("node-{of}");
        let instances = health["instances"].as_array().cloned().unwrap_or_default();
        instances
            .into_iter()
            .find(|i| i["id"] == id.as_str())
            .map_or(Value::Null, |i| i["providers"].clone())
    }

    /// Waits until node `via` sees node `of` with exactly `providers`.
    async fn wait_providers(&self, via: usize, of: usize, providers: &[&str]) {
        let want = serde_json::json!(providers);
        wait_until(
            &format!("node-{of} shows {want}"),
            Duration::from_secs(10),
            async || self.providers_of(via, of).await == want,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_one_instance_dropped_from_its_config_is_still_served_by_the_other() {
    let (_db, fake, spare, c) = two_nodes_on_up(700, 3).await;
    let mut ids = vec![];
    for i in 0..4 {
        ids.push(c.submit(0, &format!("job {i}")).await);
    }
    // node-1's config loses `up` (a rolling change, or an edit on one host only).
    let spare_only = openai_provider("spare", &spare.base_url(), "");
    c.write_config(1, &spare_only, &router_yaml(&["spare"], ""));
    c.wait_providers(0, 1, &["spare"]).await;
    assert_eq!(c.providers_of(0, 0).await, serde_json::json!(["up"]));

    all_served_by_up(&c.wait_all(0, &ids, Duration::from_secs(30)).await);
    assert_eq!((fake.call_count(), spare.call_count()), (4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_handed_from_one_instance_to_another_loses_no_queued_job() {
    // A long lease: the instances' upkeep (and its copy of who has what) runs every 5 s.
    let (_db, fake, spare, c) = two_nodes_on_up(500, 30).await;
    let spare_only = openai_provider("spare", &spare.base_url(), "");
    let both =
        openai_provider("up", &fake.base_url(), "rpm = 10000\nconcurrency = 1") + &spare_only;
    c.write_config(1, &spare_only, &router_yaml(&["spare"], ""));
    c.wait_providers(0, 1, &["spare"]).await;
    let mut ids = vec![];
    for i in 0..4 {
        ids.push(c.submit(0, &format!("job {i}")).await);
    }
    // node-1 takes `up` up, then node-0 lets it go: node-1 serves what waits.
    c.write_config(1, &both, &router_yaml(&["up"], ""));
    c.wait_providers(0, 1, &["spare", "up"]).await;
    c.write_config(0, &spare_only, &router_yaml(&["spare"], ""));
    c.wait_providers(1, 0, &["spare"]).await;

    all_served_by_up(&c.wait_all(1, &ids, Duration::from_secs(30)).await);
    assert_eq!(spare.call_count(), 0);
}

/// Two instances whose provider `up` (slow by `latency_ms`, one call at a time) is on the
/// first fake; the second fake is `spare`, for configs without `up`.
async fn two_nodes_on_up(
    latency_ms: u64,
    lease_secs: u32,
) -> (TestDb, FakeOpenAi, FakeOpenAi, Cluster) {
    let db = TestDb::create().await;
    let (fake, spare) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    fake.set_latency(Duration::from_millis(latency_ms));
    let mut c = Cluster::new(&db);
    for _ in 0..2 {
        c.start(&fake, "rpm = 10000\nconcurrency = 1", lease_secs)
            .await;
    }
    (db, fake, spare, c)
}

fn all_served_by_up(jobs: &[Value]) {
    for j in jobs {
        assert_eq!(
            (j["status"].as_str(), j["provider"].as_str()),
            (Some("succeeded"), Some("up")),
            "{j}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_holds_across_instances_and_is_used() {
    let db = TestDb::create().await;
    let fake = FakeOpenAi::start().await;
    let mut c = Cluster::new(&db);
    for _ in 0..3 {
        c.start(&fake, "rpm = 5\nconcurrency = 10", 10).await;
    }
    let mut ids = vec![];
    for i in 0..12 {
        ids.push(c.submit(i % 3, &format!("job {i}")).await);
    }
    // Five starts are allowed in any 60 s: they happen at once, then nothing more
    // (the sixth may start only 60 s after the first).
    wait_until("five calls started", Duration::from_secs(20), async || {
        fake.call_count() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.call_count(), 5, "rpm = 5 across three instances");
    let calls = fake.calls();
    let span = calls.last().unwrap().at - calls[0].at;
    assert!(span < Duration::from_secs(60));
    let mut queued = 0;
    for id in &ids {
        if c.job(1, id).await["status"] == "queued" {
            queued += 1;
        }
    }
    assert_eq!(queued, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn news_crosses_instances() {
    let db = TestDb::create().await;
    let fake = FakeOpenAi::start().await;
    // The first call hangs and holds the one slot node-0 allows itself, so node-0 can
    // lease nothing more: every later job has to run on node-1.
    fake.script([crate::support::Reply::Hang]);
    let mut c = Cluster::new(&db);
    c.start(&fake, "rpm = 10000\nconcurrency = 1", 10).await;
    c.start(&fake, "rpm = 10000\nconcurrency = 5", 10).await;
    c.submit(0, "hang").await;
    wait_until(
        "the hanging call started",
        Duration::from_secs(10),
        async || fake.in_flight() == 1,
    )
    .await;

    // An async job inserted on node-0 is picked up by node-1 through NOTIFY, not its
    // one-second poll (through the poll, each pick-up takes about a second). Five, one
    // after another, and their median: one slow pick-up (a disk stall holding node-1's
    // lease commit, seen once at over 900 ms) does not fail the test.
    let mut ids = Vec::new();
    let mut pick_ups = Vec::new();
    for n in 0..5 {
        let sent = Instant::now();
        ids.push(c.submit(0, &format!("async {n}")).await);
        wait_until(
            "node-1 called upstream",
            Duration::from_secs(10),
            async || fake.call_count() == 2 + n,
        )
        .await;
        pick_ups.push(fake.calls()[1 + n].at.duration_since(sent));
    }
    let jobs = c.wait_all(0, &ids, Duration::from_secs(10)).await;
    for job in &jobs {
        assert_eq!(job["attempts"][0]["instance"], "node-1");
    }
    eprintln!("cross-instance pick-ups: {pick_ups:?}");
    pick_ups.sort();
    assert!(pick_ups[2] < Duration::from_millis(150), "{pick_ups:?}");

    // A synchronous request waiting on node-0 whose job node-1 runs returns as soon as
    // node-1 finished, through NOTIFY, not node-0's two-second safety poll.
    let latency = Duration::from_millis(400);
    fake.set_latency(latency);
    let resp = c
        .http
        .post(format!("{}/v1/chat/completions", c.nodes[0].url))
        .json(&user("sync"))
        .send()
        .await
        .unwrap();
    let answered = Instant::now();
    assert_eq!(resp.status(), 200);
    let job_id = req_id(&resp);
    let job = c.job(0, &job_id).await;
    assert_eq!(job["attempts"][0]["instance"], "node-1");
    let upstream_done = fake.calls()[6].at + latency;
    let after_finish = answered.duration_since(upstream_done);
    eprintln!("sync answer after upstream finished: {after_finish:?}");
    assert!(
        after_finish < Duration::from_millis(1000),
        "{after_finish:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_jobs_complete_elsewhere() {
    let db = TestDb::create().await;
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_secs(3));
    let mut c = Cluster::new(&db);
    c.start(&fake, "rpm = 10000\nconcurrency = 4", 2).await;
    let mut ids = vec![];
    for i in 0..4 {
        ids.push(c.submit(0, &format!("job {i}")).await);
    }
    wait_until(
        "node-0 runs all four",
        Duration::from_secs(10),
        async || fake.in_flight() == 4,
    )
    .await;
    c.start(&fake, "rpm = 10000\nconcurrency = 4", 2).await;
    c.nodes[0].kill9();

    let jobs = c.wait_all(1, &ids, Duration::from_secs(60)).await;
    for j in &jobs {
        assert_eq!(j["status"], "succeeded", "{j}");
        let attempts = j["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{j}");
        assert_eq!(attempts[0]["outcome"], "lost");
        assert_eq!(attempts[0]["instance"], "node-0");
        assert_eq!(attempts[1]["outcome"], "ok");
        assert_eq!(attempts[1]["instance"], "node-1");
    }
    assert_eq!(fake.call_count(), 8);
}

/// The machine's PostgreSQL cluster, stopped and started by `pg_ctlcluster`.
struct Cluster15 {
    version: String,
}

impl Cluster15 {
    fn find() -> Self {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .unwrap_or_else(|| "15".into());
        Self { version }
    }

    fn ctl(&self, action: &str) {
        let status = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, "main", action])
            .status()
            .expect("pg_ctlcluster runs");
        assert!(status.success(), "pg_ctlcluster {action} failed");
    }
}

/// Starts the cluster again whatever happens to the test.
struct StartOnDrop<'a>(&'a Cluster15);

impl Drop for StartOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &self.0.version,
                "main",
                "start",
            ])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing() {
    // Alone on the server: the other Postgres tests wait, and none starts meanwhile.
    let _alone = pg::exclusive().await;
    let db = TestDb::create_unshared().await;
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(200));
    let mut c = Cluster::new(&db);
    for _ in 0..2 {
        c.start(&fake, "rpm = 10000\nconcurrency = 4", 3).await;
    }
    let mut ids = vec![];
    for i in 0..16 {
        ids.push(c.submit(i % 2, &format!("before {i}")).await);
    }
    wait_until("calls under way", Duration::from_secs(10), async || {
        fake.call_count() >= 2
    })
    .await;

    let server = Cluster15::find();
    {
        let _restart = StartOnDrop(&server);
        server.ctl("stop");
        for n in 0..2 {
            wait_until("healthz says 503", Duration::from_secs(15), async || {
                c.health(n).await == 503
            })
            .await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for n in 0..2 {
        wait_until(
            "healthz says 200 again",
            Duration::from_secs(30),
            async || c.health(n).await == 200,
        )
        .await;
    }
    for i in 0..4 {
        ids.push(c.submit(i % 2, &format!("after {i}")).await);
    }
    let jobs = c.wait_all(0, &ids, Duration::from_secs(90)).await;
    for j in &jobs {
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    for n in 0..2 {
        // Both instances still serve, and listen again for each other's news.
        assert_eq!(c.health(n).await, 200);
        let log = std::fs::read_to_string(c.dir.path().join(format!("log-{n}.txt"))).unwrap();
        assert!(
            log.contains("listening again for other instances' news")
                || log.contains("listener connection was lost and re-established"),
            "node-{n} did not re-establish its listener:\n{log}"
        );
    }
}
