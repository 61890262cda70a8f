//! Bad input of every kind gets a clear, OpenAI-shaped answer and loses nothing.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::*;

async fn app() -> (FakeOpenAi, TestApp) {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("up", &fake.base_url(), ""),
            router_yaml(&["up"], "  PLAN:\n    primary: up\n"),
        )
        .env("ORCH_MAX_BODY_BYTES", "1048576"),
    )
    .await;
    (fake, app)
}

async fn raw(app: &TestApp, body: &'static str) -> (u16, Value) {
    let resp = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn assert_openai_error(body: &Value, kind: &str) {
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e.get("code").is_some() && e.get("param").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_and_ill_typed_requests_are_400_naming_the_field() {
    let (fake, app) = app().await;
    let cases: &[(&str, Option<&str>)] = &[
        ("{\"messages\": [", None),
        ("not json at all", None),
        ("[1,2]", None),
        (r#"{"model":"x"}"#, Some("messages")),
        (r#"{"messages":[]}"#, Some("messages")),
        (r#"{"messages":{"role":"user"}}"#, Some("messages")),
        (
            r#"{"messages":[{"role":"user","content":42}]}"#,
            Some("messages[0].content"),
        ),
        (
            r#"{"messages":[{"role":"bot","content":"hi"}]}"#,
            Some("messages[0].role"),
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":"warm"}"#,
            Some("temperature"),
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"many"}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}],"stop":[1]}"#,
            Some("stop"),
        ),
    ];
    for (body, param) in cases {
        let (status, json) = raw(&app, body).await;
        assert_eq!(status, 400, "{body} -> {json}");
        assert_openai_error(&json, "invalid_request_error");
        assert_eq!(json["error"]["param"].as_str(), *param, "{body} -> {json}");
        if let Some(p) = param {
            assert!(
                json["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(p.split('[').next().unwrap()),
                "{json}"
            );
        }
    }
    assert_eq!(fake.call_count(), 0, "nothing invalid reached the upstream");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let (fake, app) = app().await;
    let big = "x".repeat(20 * 1024 * 1024);
    let resp = app
        .chat(json!({"messages": [{"role": "user", "content": big}]}))
        .await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body, "invalid_request_error");
    // Without a content-length (chunked) too.
    let chunks =
        futures::stream::iter((0..30).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let resp = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(fake.call_count(), 0);
    // The gateway is fine afterwards.
    assert_eq!(app.chat(user("still here")).await.status(), 200);
}

#[tokio::test]
async fn deeply_nested_json_is_a_400_not_a_crash() {
    let (_fake, app) = app().await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let resp = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(app.chat(user("alive")).await.status(), 200);
}

#[tokio::test]
async fn an_unknown_task_kind_goes_to_default() {
    let (fake, app) = app().await;
    let resp = app
        .chat_with(user("where to"), &[("x-orch-task-kind", "NO_SUCH_ROUTE")])
        .await;
    assert_eq!(resp.status(), 200);
    let job = app.job_of(&resp).await;
    assert_eq!(job["task"], "DEFAULT");
    // A known one is honoured, by header or by model.
    let resp = app
        .chat_with(user("plan"), &[("x-orch-task-kind", "PLAN")])
        .await;
    let job = app.job_of(&resp).await;
    assert_eq!(job["task"], "PLAN");
    let resp = app
        .chat(json!({"model": "PLAN", "messages": [{"role": "user", "content": "m"}]}))
        .await;
    let job = app.job_of(&resp).await;
    assert_eq!(job["task"], "PLAN");
    assert_eq!(fake.call_count(), 3);
}

#[tokio::test]
async fn unknown_paths_and_jobs_are_404_in_openai_shape() {
    let (_fake, app) = app().await;
    let resp = app.get("/v1/nothing-here").await;
    assert_eq!(resp.status(), 404);
    assert_openai_error(&resp.json().await.unwrap(), "not_found_error");
    let resp = app.get("/v1/jobs/job_0000").await;
    assert_eq!(resp.status(), 404);
    assert_openai_error(&resp.json().await.unwrap(), "not_found_error");
    let resp = app.post("/v1/jobs/job_0000/cancel").await;
    assert_eq!(resp.status(), 404);
}

/// Errors the web framework itself produces (a query or path that does not parse, a
/// method a route does not take) come in the OpenAI shape too.
#[tokio::test]
async fn framework_errors_are_openai_shaped() {
    let (_fake, app) = app().await;
    for path in [
        "/v1/batches?limit=abc",
        "/v1/files?limit=abc",
        "/v1/jobs/%FF",
    ] {
        let resp = app.get(path).await;
        assert_eq!(resp.status(), 400, "{path}");
        assert_openai_error(&resp.json().await.unwrap(), "invalid_request_error");
    }
    let resp = app.get("/v1/chat/completions").await;
    assert_eq!(resp.status(), 405);
    assert!(resp.headers().contains_key("allow"));
    let body: Value = resp.json().await.unwrap();
    assert_openai_error(&body, "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GET is not allowed on /v1/chat/completions"),
        "{body}"
    );
    let resp = app
        .http
        .put(format!("{}/healthz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_openai_error(&resp.json().await.unwrap(), "invalid_request_error");
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llm-orch"))
}

/// A key variable that is not set is valid config (the serving environment may set it)
/// but is named, so an operator does not learn of it from 401s.
#[test]
fn check_config_warns_of_a_key_variable_that_is_not_set() {
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(
            openai_provider(
                "up",
                "http://127.0.0.1:9/v1",
                "auth_env = \"ORCH_TEST_KEY_NOBODY_SETS\"",
            ),
            router_yaml(&["up"], ""),
        ),
    );
    let out = bin().arg("check-config").envs(&env).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "providers.toml: up.auth_env: the variable ORCH_TEST_KEY_NOBODY_SETS is not set"
        ),
        "{stderr}"
    );
    let out = bin()
        .arg("check-config")
        .envs(&env)
        .env("ORCH_TEST_KEY_NOBODY_SETS", "sk-x")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("auth_env"));
}

/// The config the repository ships is the contract's example: a user who starts the
/// gateway as the README says finds the routes the contract names, on real providers and
/// on the dummies alike.
#[test]
fn the_shipped_config_holds_the_contracts_routes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for dummy in [false, true] {
        let mut cmd = bin();
        cmd.arg("check-config")
            .env("ORCH_CONFIG_DIR", &dir)
            .env_remove("ORCH_USE_DUMMY");
        if dummy {
            cmd.env("ORCH_USE_DUMMY", "1");
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dummy={dummy}: {stdout}");
        let lines: Vec<String> = stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        for route in [
            "PLAN priority frontier_primary -> frontier_backup -> local_7b",
            "CRITIQUE weighted frontier_primary(w=3) -> frontier_backup(w=1)",
            "CODE sticky(ttl=30s) hosted_fast -> local_7b",
            "DEFAULT priority hosted_fast -> local_7b",
            "defaults: temperature=0.2 max_tokens=2048 task_header=x-orch-task-kind",
        ] {
            assert!(
                lines.iter().any(|l| l == route),
                "dummy={dummy}: no `{route}` in\n{stdout}"
            );
        }
    }
}

#[test]
fn check_config_prints_routes_or_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(
            openai_provider("up", "http://127.0.0.1:9/v1", "rpm = 5"),
            router_yaml(&["up"], ""),
        ),
    );
    let out = bin().arg("check-config").envs(&env).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DEFAULT") && stdout.contains("up"),
        "{stdout}"
    );

    // A typo, a negative limit, a bad type and an unknown provider: all named at once.
    std::fs::write(
        dir.path().join("config/providers.toml"),
        "[up]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\nrpm = -5\n[other]\ntype = \"grpc\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config/router.yaml"),
        "routes:\n  DEFAULT:\n    primary: ghost\n  EMPTY: {}\n",
    )
    .unwrap();
    let out = bin().arg("check-config").envs(&env).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "providers.toml: up.rpm: must not be negative",
        "providers.toml: other.type: unknown type `grpc`",
        "router.yaml: routes.DEFAULT.primary: unknown provider `ghost`",
        "router.yaml: routes.EMPTY.targets: route has no targets",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    std::fs::write(
        dir.path().join("config/providers.toml"),
        "[up]\ntype = \"openai\"\nrmp = 5\n",
    )
    .unwrap();
    let out = bin().arg("check-config").envs(&env).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("providers.toml") && stderr.contains("rmp"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_a_bad_config_and_an_unwritable_database_path() {
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(
            "[up]\ntype = \"dummy\"\nconcurrency = 0\n",
            router_yaml(&["up"], ""),
        ),
    );
    let out = bin().arg("serve").envs(&env).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("providers.toml: up.concurrency: must be at least 1"),
        "{stderr}"
    );

    let env = prepare(
        dir.path(),
        &Options::new("[up]\ntype = \"dummy\"\n", router_yaml(&["up"], "")),
    );
    let out = bin()
        .arg("serve")
        .envs(&env)
        .env(
            "ORCH_DATABASE_URL",
            "sqlite:///proc/llm-orch-cannot/orch.db",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot create database folder /proc/llm-orch-cannot"),
        "{stderr}"
    );

    let out = bin()
        .arg("serve")
        .envs(&env)
        .env("ORCH_LEASE_SECONDS", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ORCH_LEASE_SECONDS"));
}

#[test]
fn migrate_creates_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new("[up]\ntype = \"dummy\"\n", router_yaml(&["up"], "")),
    );
    let out = bin().arg("migrate").envs(&env).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("data/orch.db").exists());
}

/// `ORCH_MAX_QUEUE_DEPTH` counts jobs waiting in the queue: requests answered one after
/// another never fill it, a backlog past it gets 429 (OpenAI-shaped, with Retry-After), and
/// the queue takes requests again once the backlog has run.
#[tokio::test]
async fn the_queue_depth_limit_counts_waiting_jobs_only() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("up", &fake.base_url(), "concurrency = 1"),
            router_yaml(&["up"], ""),
        )
        .env("ORCH_MAX_QUEUE_DEPTH", "2"),
    )
    .await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    // Answered one by one: at most one job is ever queued.
    for i in 0..6 {
        let resp = app.chat(body.clone()).await;
        assert_eq!(resp.status(), 200, "request {i}");
    }
    // A slow upstream with one call at a time: one job runs, two wait, the next is refused.
    fake.set_latency(std::time::Duration::from_millis(700));
    let async_req = || app.chat_with(body.clone(), &[("x-orch-async", "true")]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let resp = async_req().await;
        assert_eq!(resp.status(), 202, "request {i}");
        ids.push(req_id(&resp));
        if i == 0 {
            // The first runs once the previous call's slot is free, which on a busy
            // machine may be after the next requests arrive: only then are two waiting.
            app.wait_job_in(&ids[0], &["running"], std::time::Duration::from_secs(10))
                .await;
        }
    }
    let refused = async_req().await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let err: Value = refused.json().await.unwrap();
    assert_openai_error(&err, "rate_limit");
    // A cancelled queued job leaves room for one more.
    let cancelled = ids.pop().unwrap();
    let resp = app.post(&format!("/v1/jobs/{cancelled}/cancel")).await;
    assert_eq!(resp.status(), 200);
    let resp = async_req().await;
    assert_eq!(resp.status(), 202);
    ids.push(req_id(&resp));
    // Once the backlog has run, requests are taken again.
    for id in &ids {
        let job = app.wait_job(id, std::time::Duration::from_secs(20)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    fake.set_latency(std::time::Duration::ZERO);
    assert_eq!(app.chat(body).await.status(), 200);
}
