//! Per-provider budgets: concurrency and the rpm window, measured at the fake upstream.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn concurrency_is_never_exceeded_and_is_reached_under_load() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(300));
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 10000\nconcurrency = 3"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let requests = (0..15).map(|i| app.chat(user(&format!("load {i}"))));
    let responses = futures::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(fake.call_count(), 15);
    assert_eq!(
        fake.max_in_flight(),
        3,
        "in-flight must reach the limit and never pass it"
    );
}

#[tokio::test]
async fn rpm_limits_call_starts_in_the_window() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 3\nconcurrency = 10"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let mut ids = vec![];
    for i in 0..5 {
        let resp = app
            .chat_with(user(&format!("r{i}")), &[("x-orch-async", "true")])
            .await;
        assert_eq!(resp.status(), 202);
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fake.call_count(),
        3,
        "only rpm calls may start within the window"
    );
    let mut statuses = vec![];
    for id in &ids {
        let j = app.job(id).await;
        statuses.push(j["status"].as_str().unwrap().to_string());
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "queued").count(),
        2,
        "{statuses:?}"
    );
}

/// The slow one: the fourth call starts only when the first leaves the 60-second window.
#[tokio::test]
async fn rpm_window_slides_after_sixty_seconds() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 2\nconcurrency = 10"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let start = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", app.url);
    let requests = (0..3).map(|i| http.post(&url).json(&user(&format!("w{i}"))).send());
    let responses = futures::future::join_all(requests).await;
    assert!(
        responses
            .iter()
            .all(|r| r.as_ref().unwrap().status() == 200)
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 3);
    let gap = calls[2].at - calls[0].at;
    assert!(
        gap >= Duration::from_secs(60),
        "third call {gap:?} after the first"
    );
    assert!(
        start.elapsed() < Duration::from_secs(70),
        "the job was not started soon after the window freed"
    );
}

/// A pool that found nothing to lease gives its reserved call slots back before it
/// sleeps: requests that come while it sleeps start their own calls (`direct`).
#[tokio::test]
async fn an_idle_pool_holds_no_call_slots() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "concurrency = 3"),
        router_yaml(&["up"], ""),
    ))
    .await;
    for i in 0..3 {
        assert_eq!(app.chat(user(&format!("hello {i}"))).await.status(), 200);
        // The pool looks at the queue after each call, finds it empty and sleeps (for up
        // to 1 s) without holding a slot. With the bug it holds them all that while and
        // lets go only for an instant between two looks.
        let slots = app.shared.slots.of("up", 3);
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while slots.available_permits() < 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(slots.available_permits(), 3);
    }
}

/// Requests that start their own call and the pool share the call slots: while the pool
/// works through a backlog, a request accepted alone takes a slot itself. No leased job
/// may find its slot taken (it would sit `running` without a call until its lease
/// expired and run again as a `lost` attempt). `synchronous=FULL` sends every write to
/// the writer thread, so the pool's lease yields and a request can come in between.
#[tokio::test]
async fn requests_and_the_pool_share_call_slots_without_losing_a_lease() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(2));
    let app = spawn_app(
        Options::new(
            openai_provider("up", &fake.base_url(), "rpm = 100000\nconcurrency = 4"),
            router_yaml(&["up"], ""),
        )
        .env("ORCH_SQLITE_SYNCHRONOUS", "FULL"),
    )
    .await;
    // A backlog that keeps the pool leasing, sent by several clients at a steady pace.
    let backlog = (0..8).map(|c| {
        let app = &app;
        async move {
            let mut ids = vec![];
            for i in 0..25 {
                tokio::time::sleep(Duration::from_millis(3)).await;
                let resp = app
                    .chat_with(user(&format!("async {c}/{i}")), &[("x-orch-async", "true")])
                    .await;
                assert_eq!(resp.status(), 202);
                ids.push(req_id(&resp));
            }
            ids
        }
    });
    // Meanwhile one client alone: its requests start their calls themselves.
    let alone = async {
        let mut ids = vec![];
        for i in 0..100 {
            let resp = app.chat(user(&format!("alone {i}"))).await;
            assert_eq!(resp.status(), 200);
            ids.push(req_id(&resp));
        }
        ids
    };
    let (backlog, alone) = tokio::join!(futures::future::join_all(backlog), alone);
    let ids: Vec<String> = backlog.into_iter().flatten().chain(alone).collect();
    for id in &ids {
        let job = app.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    }
    assert_eq!(fake.call_count(), ids.len());
    assert!(fake.max_in_flight() <= 4);
}
