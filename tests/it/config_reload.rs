//! Config reload: `providers.toml` and `router.yaml` edited while the gateway serves.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

async fn healthz(app: &TestApp) -> Value {
    app.get("/healthz").await.json().await.unwrap()
}

/// Writes both files and waits until `/healthz` shows the planner acted on them: a new
/// `last_reload_at` (a valid change) or a new `last_error` (an invalid one).
async fn edit_config(app: &TestApp, providers: &str, router: &str) -> Value {
    let before = healthz(app).await["planner"].clone();
    let dir = app.dir.path().join("config");
    std::fs::write(dir.join("providers.toml"), providers).unwrap();
    std::fs::write(dir.join("router.yaml"), router).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let planner = healthz(app).await["planner"].clone();
        if planner["last_reload_at"] != before["last_reload_at"]
            || planner["last_error"] != before["last_error"]
        {
            return planner;
        }
        assert!(
            Instant::now() < end,
            "the edit was not picked up: {planner}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn provider_of(resp: &reqwest::Response) -> String {
    resp.headers()["x-orch-provider"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn an_edited_router_takes_over_without_a_restart() {
    let (fa, fb) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    let providers =
        openai_provider("a", &fa.base_url(), "") + &openai_provider("b", &fb.base_url(), "");
    let app = spawn_app(Options::new(providers.clone(), router_yaml(&["a"], ""))).await;
    let first = healthz(&app).await["planner"].clone();
    assert!(first["last_error"].is_null(), "{first}");
    let resp = app.chat(user("before")).await;
    assert_eq!(
        (resp.status().as_u16(), provider_of(&resp)),
        (200, "a".into())
    );

    let extra = "  SUMMARY:\n    primary: a\n";
    let planner = edit_config(&app, &providers, &router_yaml(&["b"], extra)).await;
    assert!(planner["last_error"].is_null(), "{planner}");
    assert!(
        planner["last_reload_at"].as_str() > first["last_reload_at"].as_str(),
        "{planner} after {first}"
    );

    let resp = app.chat(user("after")).await;
    assert_eq!(
        (resp.status().as_u16(), provider_of(&resp)),
        (200, "b".into())
    );
    let resp = app
        .chat_with(user("summary"), &[("x-orch-task-kind", "SUMMARY")])
        .await;
    assert_eq!(provider_of(&resp), "a");
    let models: Value = app.get("/v1/models").await.json().await.unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "SUMMARY"),
        "{models}"
    );
    assert_eq!((fa.call_count(), fb.call_count()), (2, 1));
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_config_in_force_and_says_why() {
    let fa = FakeOpenAi::start().await;
    let providers = openai_provider("a", &fa.base_url(), "");
    let app = spawn_app(Options::new(providers.clone(), router_yaml(&["a"], ""))).await;
    let loaded_at = healthz(&app).await["planner"]["last_reload_at"].clone();

    let planner = edit_config(&app, &providers, &router_yaml(&["ghost"], "")).await;
    let error = planner["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("router.yaml") && error.contains("ghost"),
        "the error names the file and the unknown provider: {planner}"
    );
    assert_eq!(planner["last_reload_at"], loaded_at);
    let resp = app.chat(user("still served")).await;
    assert_eq!(
        (resp.status().as_u16(), provider_of(&resp)),
        (200, "a".into())
    );

    // Fixed: taken, and the error is gone.
    let fixed = providers.replace("[a]", "[a]\nrpm = 100");
    let planner = edit_config(&app, &fixed, &router_yaml(&["a"], "")).await;
    assert!(planner["last_error"].is_null(), "{planner}");
    assert_ne!(planner["last_reload_at"], loaded_at);
}

#[tokio::test]
async fn an_added_provider_gets_a_pool_and_a_removed_one_hands_its_queue_on() {
    let (fa, fb, fc) = (
        FakeOpenAi::start().await,
        FakeOpenAi::start().await,
        FakeOpenAi::start().await,
    );
    fa.set_latency(Duration::from_millis(1500));
    let a = openai_provider("a", &fa.base_url(), "concurrency = 1");
    let b = openai_provider("b", &fb.base_url(), "");
    let app = spawn_app(Options::new(a.clone() + &b, router_yaml(&["a", "b"], ""))).await;

    // One call runs on a, three wait in its queue.
    let mut ids = vec![];
    for i in 0..4 {
        let resp = app
            .chat_with(user(&format!("q{i}")), &[("x-orch-async", "true")])
            .await;
        assert_eq!(resp.status(), 202);
        ids.push(req_id(&resp));
    }
    let end = Instant::now() + Duration::from_secs(5);
    while fa.in_flight() == 0 {
        assert!(Instant::now() < end, "no call started on a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // a goes away, c comes in with a route of its own.
    let c = openai_provider("c", &fc.base_url(), "");
    let planner = edit_config(
        &app,
        &(b.clone() + &c),
        &router_yaml(&["b"], "  CHEAP:\n    primary: c\n"),
    )
    .await;
    assert!(planner["last_error"].is_null(), "{planner}");

    let mut served_by = vec![];
    for id in &ids {
        let job = app.wait_job(id, Duration::from_secs(15)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        served_by.push(job["provider"].as_str().unwrap().to_string());
    }
    served_by.sort();
    assert_eq!(
        served_by,
        ["a", "b", "b", "b"],
        "the call under way ends on a; the queued jobs move to b"
    );
    assert_eq!((fa.call_count(), fb.call_count()), (1, 3));

    let resp = app
        .chat_with(user("cheap"), &[("x-orch-task-kind", "CHEAP")])
        .await;
    assert_eq!(
        (resp.status().as_u16(), provider_of(&resp)),
        (200, "c".into())
    );
    let health = healthz(&app).await;
    assert_eq!(health["providers"], serde_json::json!(["b", "c"]));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    // Gauges follow the providers; counters keep what a did.
    assert!(
        metrics.contains("orch_provider_cooldown{provider=\"c\"} 0"),
        "{metrics}"
    );
    for gauge in [
        "orch_provider_cooldown",
        "orch_queue_depth",
        "orch_jobs_running",
    ] {
        let of_a = format!("{gauge}{{provider=\"a\"}}");
        assert!(!metrics.contains(&of_a), "{of_a} in {metrics}");
    }
    assert!(metrics.contains("orch_upstream_attempts_total{outcome=\"ok\",provider=\"a\"} 1"));
}

#[tokio::test]
async fn jobs_of_a_removed_provider_with_no_later_hop_fail_with_a_clear_error() {
    let (fa, fb) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    fa.set_latency(Duration::from_millis(1500));
    let a = openai_provider("a", &fa.base_url(), "concurrency = 1");
    let b = openai_provider("b", &fb.base_url(), "");
    let app = spawn_app(Options::new(a.clone() + &b, router_yaml(&["a"], ""))).await;
    let mut ids = vec![];
    for i in 0..2 {
        let resp = app
            .chat_with(user(&format!("q{i}")), &[("x-orch-async", "true")])
            .await;
        ids.push(req_id(&resp));
    }
    let end = Instant::now() + Duration::from_secs(5);
    while fa.in_flight() == 0 {
        assert!(Instant::now() < end, "no call started on a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    edit_config(&app, &b, &router_yaml(&["b"], "")).await;
    let mut jobs = vec![];
    for id in &ids {
        jobs.push(app.wait_job(id, Duration::from_secs(15)).await);
    }
    jobs.sort_by_key(|j| j["status"].as_str().unwrap().to_string());
    assert_eq!(jobs[0]["status"], "failed", "{jobs:?}");
    let error = &jobs[0]["error"];
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("provider_server_error"), Some("provider_removed")),
        "{error}"
    );
    assert_eq!(
        jobs[1]["status"], "succeeded",
        "the call under way ends: {jobs:?}"
    );
    assert_eq!(fb.call_count(), 0);
}

#[tokio::test]
async fn an_edited_limit_holds_from_the_next_lease() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(300));
    let with = |n: u32| openai_provider("up", &fake.base_url(), &format!("concurrency = {n}"));
    let app = spawn_app(Options::new(with(1), router_yaml(&["up"], ""))).await;
    let burst = |tag: &'static str| {
        let app = &app;
        futures::future::join_all((0..6).map(move |i| app.chat(user(&format!("{tag} {i}")))))
    };
    assert!(burst("one").await.iter().all(|r| r.status() == 200));
    assert_eq!(fake.max_in_flight(), 1);

    edit_config(&app, &with(3), &router_yaml(&["up"], "")).await;
    assert!(burst("three").await.iter().all(|r| r.status() == 200));
    assert_eq!(fake.max_in_flight(), 3, "reached and never passed");
}

#[tokio::test]
async fn sighup_reads_the_config_at_once_and_does_not_stop_the_binary() {
    let (fa, fb) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    let providers =
        openai_provider("a", &fa.base_url(), "") + &openai_provider("b", &fb.base_url(), "");
    let dir = tempfile::tempdir().unwrap();
    let env = prepare(
        dir.path(),
        &Options::new(providers.clone(), router_yaml(&["a"], "")),
    );
    let mut bin = spawn_binary(dir.path(), &env, "serve.log");
    bin.wait_ready(Duration::from_secs(20)).await;
    let http = reqwest::Client::new();
    let health = || async {
        let r = http
            .get(format!("{}/healthz", bin.url))
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()
    };
    let before = health().await["planner"]["last_reload_at"].clone();

    std::fs::write(
        dir.path().join("config/router.yaml"),
        router_yaml(&["b"], ""),
    )
    .unwrap();
    bin.signal("HUP");
    let end = Instant::now() + Duration::from_secs(10);
    while health().await["planner"]["last_reload_at"] == before {
        assert!(Instant::now() < end, "not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        bin.child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the gateway"
    );
    let resp = bin.chat(&user("after the hang-up")).await;
    assert_eq!(
        (resp.status().as_u16(), provider_of(&resp)),
        (200, "b".into())
    );
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("SIGHUP"), "{log}");
}

#[tokio::test]
async fn jobs_found_queued_on_a_provider_not_configured_move_on() {
    // Jobs a previous configuration left queued on `gone` (removed while the gateway was
    // down): one can go on to b, one has nowhere to go.
    let fb = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("b", &fb.base_url(), ""),
        router_yaml(&["b"], ""),
    ))
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let store = &app.shared.store;
    let on = |id, chain| crate::support::jobs::new_job(id, chain, now);
    store.insert_job(&on("to-b", &["gone", "b"])).await.unwrap();
    store.insert_job(&on("stranded", &["gone"])).await.unwrap();

    let moved = app.wait_job("to-b", Duration::from_secs(10)).await;
    assert_eq!(
        (moved["status"].as_str(), moved["provider"].as_str()),
        (Some("succeeded"), Some("b")),
        "{moved}"
    );
    let stranded = app.wait_job("stranded", Duration::from_secs(10)).await;
    assert_eq!(stranded["status"], "failed", "{stranded}");
    assert_eq!(stranded["error"]["code"], "provider_removed", "{stranded}");
    assert_eq!(fb.call_count(), 1);
}

#[tokio::test]
async fn a_provider_pointed_at_a_new_upstream_starts_without_the_old_cool_down() {
    let (broken, healthy) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    broken.set_fallback(Reply::rate_limited("60"));
    let at = |url: &str| openai_provider("up", url, "");
    let app = spawn_app(Options::new(
        at(&broken.base_url()),
        router_yaml(&["up"], ""),
    ))
    .await;
    // The 429 puts `up` in a 60 s cool-down; the job waits it out in the queue.
    let resp = app
        .chat_with(user("waits"), &[("x-orch-async", "true")])
        .await;
    let waiting = req_id(&resp);
    let end = Instant::now() + Duration::from_secs(5);
    while broken.call_count() == 0 {
        assert!(Instant::now() < end, "no call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The operator points `up` at a working upstream: no waiting for the old one's 60 s.
    // The pool naps up to 5 s in a cool-down; a reload wakes it at once.
    edit_config(&app, &at(&healthy.base_url()), &router_yaml(&["up"], "")).await;
    let job = app.wait_job(&waiting, Duration::from_secs(3)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let resp = app.chat(user("new")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!((broken.call_count(), healthy.call_count()), (1, 2));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("orch_provider_cooldown{provider=\"up\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_stream_committed_before_its_first_chunk_names_the_provider_its_job_is_on() {
    let (fa, fc) = (FakeOpenAi::start().await, FakeOpenAi::start().await);
    fa.set_latency(Duration::from_millis(3000));
    fc.set_latency(Duration::from_millis(3000));
    let a = openai_provider("a", &fa.base_url(), "concurrency = 1");
    let c = openai_provider("c", &fc.base_url(), "concurrency = 1");
    let app = spawn_app(Options::new(a.clone() + &c, router_yaml(&["c", "a"], ""))).await;
    // Both providers busy: c with one job, a with one sent to it by name.
    app.chat_with(user("on c"), &[("x-orch-async", "true")])
        .await;
    let mut on_a = user("on a");
    on_a["model"] = "a".into();
    app.chat_with(on_a, &[("x-orch-async", "true")]).await;
    let end = Instant::now() + Duration::from_secs(5);
    while fa.in_flight() + fc.in_flight() < 2 {
        assert!(Instant::now() < end, "both should be busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut streamed = user("stream");
    streamed["stream"] = true.into();
    let stream = app.chat(streamed);
    let remove_c = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        edit_config(&app, &a, &router_yaml(&["a"], "")).await;
    };
    // c goes within the hold: the stream's job moves to a and waits there past the hold.
    let (resp, _) = tokio::join!(stream, remove_c);
    assert_eq!(resp.status(), 200);
    assert_eq!(provider_of(&resp), "a");
    let sse = Sse::read(resp).await;
    assert!(sse.ends_with_done(), "{:?}", sse.json());
    assert_eq!(fa.call_count(), 2);
}
