//! Crashes and restarts of the real binary: no accepted job is lost, no succeeded job is
//! sent upstream again, a second process cannot share the SQLite file, SIGTERM is graceful.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

async fn post_async(http: &reqwest::Client, url: &str, text: &str) -> String {
    let resp = http
        .post(format!("{url}/v1/chat/completions"))
        .header("x-orch-async", "true")
        .json(&user(text))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A folder and environment for the real binary with one provider `up` at `fake`.
fn solo_env(fake: &FakeOpenAi) -> (tempfile::TempDir, std::collections::HashMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(
            openai_provider("up", &fake.base_url(), ""),
            router_yaml(&["up"], ""),
        ),
    );
    (dir, env)
}

async fn job(http: &reqwest::Client, url: &str, id: &str) -> Value {
    http.get(format!("{url}/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The binary with one provider `up` at a fake whose calls take 1.5 s, one at a time, and
/// `grace_s` seconds of shutdown grace.
async fn slow_solo(
    grace_s: &str,
) -> (
    FakeOpenAi,
    tempfile::TempDir,
    std::collections::HashMap<String, String>,
    Binary,
) {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(
            openai_provider("up", &fake.base_url(), "concurrency = 1"),
            router_yaml(&["up"], ""),
        )
        .env("ORCH_SHUTDOWN_GRACE_SECONDS", grace_s),
    );
    let bin = spawn_binary(dir.path(), &env, "log.txt");
    bin.wait_ready(Duration::from_secs(20)).await;
    (fake, dir, env, bin)
}

/// Waits until the fake has a call in flight.
async fn a_call_in_flight(fake: &FakeOpenAi) {
    let end = Instant::now() + Duration::from_secs(10);
    while fake.in_flight() < 1 {
        assert!(Instant::now() < end);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to `bin` and waits for it to exit, which it must do cleanly.
async fn terminate(bin: &mut Binary) {
    bin.signal("TERM");
    let mut child = std::mem::replace(
        &mut bin.child,
        std::process::Command::new("true").spawn().unwrap(),
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
}

#[tokio::test]
async fn kill_9_loses_no_job_and_never_repeats_a_finished_one() {
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(
            openai_provider("up", &fake.base_url(), "rpm = 1000\nconcurrency = 2"),
            router_yaml(&["up"], ""),
        ),
    );
    let http = reqwest::Client::new();
    let mut first = spawn_binary(dir.path(), &env, "log-1.txt");
    first.wait_ready(Duration::from_secs(20)).await;

    // One job finishes before the crash.
    let done = first.chat(&user("done before")).await;
    assert_eq!(done.status(), 200);
    let done_id = req_id(&done);

    // Then: two running (slow upstream, concurrency 2) and four queued behind them.
    fake.set_latency(Duration::from_secs(3));
    let mut ids = vec![];
    for i in 0..6 {
        ids.push(post_async(&http, &first.url, &format!("crash {i}")).await);
    }
    let end = Instant::now() + Duration::from_secs(10);
    while fake.in_flight() < 2 {
        assert!(Instant::now() < end, "calls never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill9();
    fake.set_latency(Duration::from_millis(10));

    let second = spawn_binary(dir.path(), &env, "log-2.txt");
    second.wait_ready(Duration::from_secs(20)).await;
    for id in &ids {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let j = job(&http, &second.url, id).await;
            if j["status"] == "succeeded" {
                break;
            }
            assert!(
                Instant::now() < end,
                "job {id} not completed after restart: {j}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The two calls cut by the crash are recorded as lost attempts.
    let mut lost = 0;
    for id in &ids {
        let j = job(&http, &second.url, id).await;
        lost += j["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["outcome"] == "lost")
            .count();
    }
    assert_eq!(lost, 2);
    // The job that had succeeded was not sent again.
    let before = fake
        .calls()
        .iter()
        .filter(|c| c.body["messages"][0]["content"] == "done before")
        .count();
    assert_eq!(before, 1);
    let j = job(&http, &second.url, &done_id).await;
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_second_process_on_the_same_sqlite_file_refuses_to_start() {
    let fake = FakeOpenAi::start().await;
    let (dir, env) = solo_env(&fake);
    let first = spawn_binary(dir.path(), &env, "log-1.txt");
    first.wait_ready(Duration::from_secs(20)).await;
    let mut second = spawn_binary(dir.path(), &env, "log-2.txt");
    let status = tokio::task::spawn_blocking(move || second.child.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("log-2.txt")).unwrap();
    assert!(
        log.contains("another llm-orch process already uses the SQLite database"),
        "{log}"
    );
    assert!(log.contains("Postgres"), "{log}");
}

#[tokio::test]
async fn sigterm_lets_running_calls_finish_then_exits() {
    let (fake, dir, env, mut bin) = slow_solo("10").await;
    let http = reqwest::Client::new();
    let running = post_async(&http, &bin.url, "in flight").await;
    let queued = post_async(&http, &bin.url, "still queued").await;
    a_call_in_flight(&fake).await;
    terminate(&mut bin).await;
    assert_eq!(
        fake.call_count(),
        1,
        "no new call was started during shutdown"
    );

    // After a restart: the running call had finished, the queued job completes now.
    let again = spawn_binary(dir.path(), &env, "log-2.txt");
    again.wait_ready(Duration::from_secs(20)).await;
    let j = job(&http, &again.url, &running).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let j = job(&http, &again.url, &queued).await;
        if j["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < end, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// On SIGTERM a request whose call runs here gets its answer when the call finishes
/// within the grace period; one whose job never started is told, when the grace period
/// is over, that the job is kept.
#[tokio::test]
async fn sigterm_answers_requests_whose_calls_finish_within_the_grace_period() {
    let (fake, _dir, _env, mut bin) = slow_solo("4").await;
    let http = reqwest::Client::new();
    let ask = |text: &'static str| {
        let (http, url) = (http.clone(), bin.url.clone());
        tokio::spawn(async move {
            let resp = http
                .post(format!("{url}/v1/chat/completions"))
                .json(&user(text))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry = resp.headers().get("x-should-retry").cloned();
            (status, retry, resp.json::<Value>().await.unwrap())
        })
    };
    let running = ask("in flight");
    a_call_in_flight(&fake).await;
    let queued = ask("never started");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ((), running, queued) = tokio::join!(terminate(&mut bin), running, queued);
    let (status, _, body) = running.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "fake:in flight");
    let (status, retry, body) = queued.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["job_id"].is_string(), "{body}");
    assert_eq!(retry.as_ref().and_then(|v| v.to_str().ok()), Some("false"));
    assert_eq!(
        fake.call_count(),
        1,
        "no new call was started during shutdown"
    );
}

#[tokio::test]
async fn queued_jobs_and_the_rpm_window_survive_a_restart() {
    let fake = FakeOpenAi::start().await;
    // rpm 1: the second job waits for the window, which the restart does not reset.
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 1"),
        router_yaml(&["up"], ""),
    ))
    .await;
    assert_eq!(app.chat(user("one")).await.status(), 200);
    let resp = app
        .chat_with(user("two"), &[("x-orch-async", "true")])
        .await;
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (dir, env) = app.stop().await;
    let app = start_in(dir, env).await;
    let j = app.job(&id).await;
    assert_eq!(j["status"], "queued", "the job survived the restart");
}

#[tokio::test]
async fn a_call_longer_than_the_lease_keeps_its_lease_and_runs_once() {
    let fake = FakeOpenAi::start().await;
    // The harness sets ORCH_LEASE_SECONDS=3: this call lasts twice as long.
    fake.set_latency(Duration::from_secs(6));
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), ""),
        router_yaml(&["up"], ""),
    ))
    .await;
    let resp = app.chat(user("long call")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        fake.call_count(),
        1,
        "the job was not rescued while its call was alive"
    );
    let j = app.job_of(&resp).await;
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_call_whose_job_is_no_longer_ours_is_stopped_by_the_lease_renewal() {
    let fake = FakeOpenAi::start().await;
    fake.script([Reply::Hang]);
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), ""),
        router_yaml(&["up"], ""),
    ))
    .await;
    let resp = app
        .chat_with(user("hangs"), &[("x-orch-async", "true")])
        .await;
    assert_eq!(resp.status(), 202);
    let id = req_id(&resp);
    let started = Instant::now();
    while fake.in_flight() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Cancelled behind this instance's back (as another instance's cancel would be,
    // without news reaching this one): only the renewal of the lease can notice.
    let cancelled = app.shared.store.cancel_job(&id).await.unwrap();
    assert!(cancelled.is_some());
    // The harness's lease is 3 s, renewed every second.
    let asked = Instant::now();
    while fake.in_flight() > 0 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the call of a cancelled job kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.job(&id).await["status"], "cancelled");
}

#[tokio::test]
async fn metrics_export_reads_the_sqlite_file_while_the_gateway_serves() {
    let fake = FakeOpenAi::start().await;
    let (dir, env) = solo_env(&fake);
    let bin = spawn_binary(dir.path(), &env, "log.txt");
    bin.wait_ready(Duration::from_secs(20)).await;
    let resp = bin.chat(&user("exported")).await;
    assert_eq!(resp.status(), 200);
    let id = req_id(&resp);
    let out = dir.path().join("export");
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_llm-orch"))
        .args(["metrics", "export", "--out"])
        .arg(&out)
        .envs(&env)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let written: String = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    assert!(written.contains(&id), "{written}");
    // The gateway still serves after the export.
    let again = bin.chat(&user("after")).await;
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn a_restarted_instance_shows_its_new_start_time() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("up", &fake.base_url(), ""),
            router_yaml(&["up"], ""),
        )
        .env("ORCH_INSTANCE_ID", "steady"),
    )
    .await;
    let started = |health: Value| {
        assert_eq!(health["instances"][0]["id"], "steady", "{health}");
        health["instances"][0]["started_at"].clone()
    };
    let first = started(app.get("/healthz").await.json().await.unwrap());
    let (dir, env) = app.stop().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let app = start_in(dir, env).await;
    let again = started(app.get("/healthz").await.json().await.unwrap());
    assert_ne!(
        again, first,
        "same instance id, new process: a new start time"
    );
}
