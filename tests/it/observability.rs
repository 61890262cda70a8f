//! JSONL lines built from job records (live, swept after a crash, exported), Prometheus
//! metrics after traffic, and retention.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::TimeZone;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::support::Reply;
use crate::support::*;

/// Every line of every `requests-*.jsonl` file in `dir`, as text.
pub fn jsonl_lines(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn by_id(lines: &[String]) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap();
        let id = v["req_id"].as_str().unwrap().to_string();
        assert!(
            map.insert(id.clone(), v).is_none(),
            "line written twice: {id}"
        );
    }
    map
}

/// Two fakes: `a` (one retry allowed) then `b` (none).
async fn two_providers(extra_env: &[(&str, &str)]) -> (FakeOpenAi, FakeOpenAi, TestApp) {
    let fa = FakeOpenAi::start().await;
    let fb = FakeOpenAi::start().await;
    let providers = format!(
        "{}{}{}",
        openai_provider(
            "a",
            &fa.base_url(),
            "rpm = 1000\nconcurrency = 8\nmax_retries = 1"
        ),
        openai_provider(
            "b",
            &fb.base_url(),
            "rpm = 1000\nconcurrency = 8\nmax_retries = 0"
        ),
        openai_provider("slow", &fb.base_url(), "rpm = 1000\nconcurrency = 1"),
    );
    let router = router_yaml(
        &["a", "b"],
        "  SLOW:\n    strategy: priority\n    targets:\n      - provider: slow\n",
    );
    let mut opts = Options::new(providers, router);
    for (k, v) in extra_env {
        opts = opts.env(k, v);
    }
    (fa, fb, spawn_app(opts).await)
}

/// Success, retry, hop, failure on every provider, an upstream 4xx, and a cancel.
/// Returns the job ids by name.
async fn traffic_mix(
    fa: &FakeOpenAi,
    fb: &FakeOpenAi,
    app: &TestApp,
) -> BTreeMap<&'static str, String> {
    let mut ids = BTreeMap::new();
    let r = app.chat(user("ok")).await;
    assert_eq!(r.status(), 200);
    ids.insert("ok", req_id(&r));

    fa.script([Reply::status(500)]);
    let r = app.chat(user("retry")).await;
    assert_eq!(r.status(), 200);
    ids.insert("retry", req_id(&r));

    fa.script([Reply::status(500), Reply::status(500)]);
    let r = app.chat(user("hop")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-orch-provider"], "b");
    ids.insert("hop", req_id(&r));

    fa.script([Reply::status(500), Reply::status(503)]);
    fb.script([Reply::status(502)]);
    let r = app.chat(user("fail")).await;
    assert_eq!(r.status(), 502);
    ids.insert("fail", req_id(&r));

    fa.script([Reply::Status {
        status: 400,
        body: json!({"error": {"message": "bad parameter foo", "type": "invalid_request_error"}})
            .to_string(),
        headers: vec![],
    }]);
    let r = app.chat(user("4xx")).await;
    assert_eq!(r.status(), 400);
    ids.insert("4xx", req_id(&r));

    // Cancelled while its call hangs: its line takes the model from the attempt row.
    fa.script([Reply::Hang]);
    let r = app
        .chat_with(user("cancel"), &[("x-orch-async", "true")])
        .await;
    assert_eq!(r.status(), 202);
    let id = req_id(&r);
    let end = Instant::now() + Duration::from_secs(10);
    while app.shared.store.get_attempts(&id).await.unwrap().is_empty() {
        assert!(Instant::now() < end, "the call never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(r.status(), 200);
    ids.insert("cancel", id);
    ids
}

fn iso_ms(ms: i64) -> String {
    chrono::Utc
        .timestamp_millis_opt(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

#[tokio::test]
async fn jsonl_lines_follow_job_records_and_export_reproduces_them() {
    let (fa, fb, app) = two_providers(&[("ORCH_INSTANCE_ID", "inst-t1")]).await;
    let ids = traffic_mix(&fa, &fb, &app).await;
    app.shared.telemetry.flush().await;
    let live = jsonl_lines(&app.dir.path().join("metrics"));
    let lines = by_id(&live);
    assert_eq!(lines.len(), ids.len(), "{live:#?}");

    // Field by field against the job rows.
    let store = &app.shared.store;
    for (name, id) in &ids {
        let l = &lines[id];
        let job = store.get_job(id).await.unwrap().unwrap();
        let attempts = store.get_attempts(id).await.unwrap();
        let fin = job.finished_at.unwrap();
        assert_eq!(l["ts"], iso_ms(fin), "{name}");
        assert_eq!(l["task"], "DEFAULT", "{name}");
        assert_eq!(l["latency_ms"], fin - job.created_at, "{name}");
        assert_eq!(
            l["queue_ms"],
            attempts[0].started_at - job.created_at,
            "{name}: first lease start − creation"
        );
        assert_eq!(l["retries"], attempts.len() as i64 - 1, "{name}");
        assert_eq!(l["model"], attempts.last().unwrap().model, "{name}");
        assert_eq!(l["batch_id"], Value::Null, "{name}");
        let keys: Vec<&String> = l.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 16, "{name}: {keys:?}");
    }
    let expect = |name: &str,
                  provider: &str,
                  model: &str,
                  ok: bool,
                  status: i64,
                  retries: i64,
                  hops: i64| {
        let l = &lines[&ids[name]];
        assert_eq!(l["provider"], provider, "{name}: {l}");
        assert_eq!(l["model"], model, "{name}: {l}");
        assert_eq!(l["ok"], ok, "{name}: {l}");
        assert_eq!(l["status"], status, "{name}: {l}");
        assert_eq!(l["retries"], retries, "{name}: {l}");
        assert_eq!(l["hops"], hops, "{name}: {l}");
    };
    expect("ok", "a", "m-a", true, 200, 0, 0);
    expect("retry", "a", "m-a", true, 200, 1, 0);
    expect("hop", "b", "m-b", true, 200, 2, 1);
    expect("fail", "b", "m-b", false, 502, 2, 1);
    expect("4xx", "a", "m-a", false, 400, 0, 0);
    expect("cancel", "a", "m-a", false, 499, 0, 0);
    for name in ["ok", "retry", "hop"] {
        let l = &lines[&ids[name]];
        assert_eq!(l["usage_prompt"], 7);
        assert_eq!(l["usage_completion"], 3);
        assert_eq!(l["error"], Value::Null);
        assert_eq!(l["instance"], "inst-t1");
    }
    assert!(
        lines[&ids["fail"]]["error"]
            .as_str()
            .unwrap()
            .contains("fake upstream error 502"),
        "the failure's line holds the last error"
    );
    assert!(
        lines[&ids["4xx"]]["error"]
            .as_str()
            .unwrap()
            .contains("bad parameter foo")
    );
    assert_eq!(lines[&ids["fail"]]["usage_prompt"], Value::Null);

    // Everything is marked written: a sweep of everything finished finds nothing.
    assert_eq!(app.shared.telemetry.sweep_lines(Duration::ZERO).await, 0);
    assert_eq!(jsonl_lines(&app.dir.path().join("metrics")), live);

    // `metrics export` writes the same bytes.
    let out = app.dir.path().join("export");
    let today = chrono::Utc::now().date_naive();
    let (_, n) =
        llm_orch::export::export(store.as_ref(), today - chrono::Days::new(1), today, &out)
            .await
            .unwrap();
    assert_eq!(n, ids.len());
    let mut exported = jsonl_lines(&out);
    let mut live_sorted = live.clone();
    exported.sort();
    live_sorted.sort();
    assert_eq!(exported, live_sorted);
}

/// A process that dies between a job's finish and its line: the next start writes it.
#[tokio::test]
async fn lines_missed_by_a_crash_are_written_once_by_the_sweep() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("a", &fake.base_url(), "rpm = 1000\nconcurrency = 8"),
        router_yaml(&["a"], ""),
    ))
    .await;
    let r = app.chat(user("lost line")).await;
    assert_eq!(r.status(), 200);
    let id = req_id(&r);
    let db = app.db_path();
    let (dir, env) = app.stop().await;
    // As if the process died before the line reached the disk: unmarked, no file. The
    // finish is moved a minute back so the sweep does not wait out its grace period.
    std::fs::remove_dir_all(dir.path().join("metrics")).unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE jobs SET metrics_written = 0, created_at = created_at - 60000, \
         started_at = started_at - 60000, finished_at = finished_at - 60000 WHERE id = ?1",
    )
    .bind(&id)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let app = start_in(dir, env).await;
    let metrics = app.dir.path().join("metrics");
    let end = Instant::now() + Duration::from_secs(20);
    while jsonl_lines(&metrics).is_empty() {
        assert!(
            Instant::now() < end,
            "the sweep did not write the missed line"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.shared.telemetry.flush().await;
    // Sweeping again (even with no grace) writes nothing more.
    assert_eq!(app.shared.telemetry.sweep_lines(Duration::ZERO).await, 0);
    let lines = jsonl_lines(&metrics);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["req_id"], id.as_str());
    assert_eq!(line["model"], "m-a");
    let out = app.dir.path().join("export");
    let today = chrono::Utc::now().date_naive();
    llm_orch::export::export(
        app.shared.store.as_ref(),
        today - chrono::Days::new(1),
        today,
        &out,
    )
    .await
    .unwrap();
    assert_eq!(jsonl_lines(&out), lines);
}

/// The value of one sample line of the Prometheus text, e.g.
/// `orch_requests_total{provider="a",status="200",task="DEFAULT"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_fresh_instance_announces_every_metric_family() {
    let (_fa, _fb, app) = two_providers(&[]).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for (name, kind) in [
        ("orch_requests_total", "counter"),
        ("orch_request_latency_seconds", "histogram"),
        ("orch_upstream_attempts_total", "counter"),
        ("orch_queue_depth", "gauge"),
        ("orch_jobs_running", "gauge"),
        ("orch_tokens_total", "counter"),
        ("orch_provider_cooldown", "gauge"),
    ] {
        let line = format!("# TYPE {name} {kind}");
        assert_eq!(
            text.lines().filter(|l| *l == line).count(),
            1,
            "want one `{line}` before any traffic in\n{text}"
        );
    }
    // After traffic a family is listed once, with its series.
    assert_eq!(app.chat(user("x")).await.status(), 200);
    let text = app.get("/metrics").await.text().await.unwrap();
    let types = text
        .lines()
        .filter(|l| *l == "# TYPE orch_requests_total counter")
        .count();
    assert_eq!(types, 1, "{text}");
    assert!(text.contains("orch_requests_total{"), "{text}");
}

#[tokio::test]
async fn prometheus_metrics_after_traffic() {
    let (fa, fb, app) = two_providers(&[]).await;
    for _ in 0..2 {
        assert_eq!(app.chat(user("x")).await.status(), 200);
    }
    fa.script([Reply::status(500)]);
    assert_eq!(app.chat(user("retry")).await.status(), 200);
    fa.script([Reply::Status {
        status: 400,
        body: "{}".into(),
        headers: vec![],
    }]);
    assert_eq!(app.chat(user("bad")).await.status(), 400);
    fa.script([Reply::rate_limited("120")]);
    assert_eq!(app.chat(user("limited")).await.status(), 200);
    let r = app
        .chat(json!({"model": "SLOW", "stream": true, "messages": [{"role": "user", "content": "s"}]}))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    // `slow` (concurrency 1) hangs: one job running, two queued.
    fb.script([Reply::Hang, Reply::Hang, Reply::Hang]);
    for _ in 0..3 {
        let r = app
            .chat_with(
                user("wait"),
                &[("x-orch-task-kind", "SLOW"), ("x-orch-async", "true")],
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    let end = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = app.get("/metrics").await.text().await.unwrap();
        if sample(&text, "orch_jobs_running{provider=\"slow\"}") == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < end, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    for (series, want) in [
        (
            r#"orch_requests_total{provider="a",status="200",task="DEFAULT"}"#,
            3.0,
        ),
        (
            r#"orch_requests_total{provider="a",status="400",task="DEFAULT"}"#,
            1.0,
        ),
        (
            r#"orch_requests_total{provider="b",status="200",task="DEFAULT"}"#,
            1.0,
        ),
        (
            r#"orch_requests_total{provider="slow",status="200",task="SLOW"}"#,
            1.0,
        ),
        (
            r#"orch_request_latency_seconds_count{provider="a",task="DEFAULT"}"#,
            4.0,
        ),
        (
            r#"orch_upstream_attempts_total{outcome="ok",provider="a"}"#,
            3.0,
        ),
        (
            r#"orch_upstream_attempts_total{outcome="retry",provider="a"}"#,
            1.0,
        ),
        (
            r#"orch_upstream_attempts_total{outcome="failed",provider="a"}"#,
            1.0,
        ),
        (
            r#"orch_upstream_attempts_total{outcome="hop",provider="a"}"#,
            1.0,
        ),
        (
            r#"orch_upstream_attempts_total{outcome="ok",provider="b"}"#,
            1.0,
        ),
        (r#"orch_tokens_total{kind="prompt",provider="a"}"#, 21.0),
        (r#"orch_tokens_total{kind="completion",provider="a"}"#, 9.0),
        (r#"orch_queue_depth{provider="slow"}"#, 2.0),
        (r#"orch_queue_depth{provider="a"}"#, 0.0),
        (r#"orch_jobs_running{provider="a"}"#, 0.0),
    ] {
        assert_eq!(v(series), want, "{series}");
    }
    let cooldown = v(r#"orch_provider_cooldown{provider="a"}"#);
    assert!(cooldown > 60.0 && cooldown <= 120.0, "{cooldown}");
    assert_eq!(v(r#"orch_provider_cooldown{provider="b"}"#), 0.0);
    assert_eq!(
        v(r#"orch_time_to_first_token_seconds_count{provider="slow"}"#),
        1.0
    );
    // Overhead of the synchronous requests: each well under its total latency.
    assert_eq!(v(r#"orch_overhead_seconds_count{task="DEFAULT"}"#), 5.0);
    let overhead = v(r#"orch_overhead_seconds_sum{task="DEFAULT"}"#);
    let latency = v(r#"orch_request_latency_seconds_sum{provider="a",task="DEFAULT"}"#)
        + v(r#"orch_request_latency_seconds_sum{provider="b",task="DEFAULT"}"#);
    assert!(
        overhead >= 0.0 && overhead < latency,
        "{overhead} vs {latency}"
    );
    // Bounded labels: no job id, no key.
    assert!(!text.contains("job_"), "{text}");
}

#[tokio::test]
async fn retention_purges_old_finished_jobs_and_their_attempts() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("a", &fake.base_url(), "rpm = 1000\nconcurrency = 8"),
            router_yaml(&["a"], ""),
        )
        .env("ORCH_RETENTION_DAYS", "2"),
    )
    .await;
    let mut ids = vec![];
    for i in 0..5 {
        if i == 4 {
            fake.script([Reply::status(500)]);
        }
        let r = app.chat(user(&format!("r{i}"))).await;
        assert_eq!(r.status(), 200);
        ids.push(req_id(&r));
    }
    // Age four jobs: three past retention, one just inside it.
    let day = 24 * 3600 * 1000_i64;
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", app.db_path().display()))
            .await
            .unwrap();
    for (id, age) in [
        (&ids[0], 3 * day),
        (&ids[1], 10 * day),
        (&ids[4], 2 * day + 60_000),
        (&ids[2], day),
    ] {
        sqlx::query(
            "UPDATE jobs SET created_at = created_at - ?1, started_at = started_at - ?1, \
             finished_at = finished_at - ?1 WHERE id = ?2",
        )
        .bind(age)
        .bind(id)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let mut gone = 0;
        for id in [&ids[0], &ids[1], &ids[4]] {
            if app.get(&format!("/v1/jobs/{id}")).await.status() == 404 {
                gone += 1;
            }
        }
        if gone == 3 {
            break;
        }
        assert!(Instant::now() < end, "old jobs were not purged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in [&ids[2], &ids[3]] {
        assert_eq!(app.get(&format!("/v1/jobs/{id}")).await.status(), 200);
    }
    let (attempts,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM attempts WHERE job_id IN (?1, ?2, ?3)")
            .bind(&ids[0])
            .bind(&ids[1])
            .bind(&ids[4])
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "attempts go with their jobs");
    let (kept,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM attempts WHERE job_id = ?1")
        .bind(&ids[2])
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 1);
}
