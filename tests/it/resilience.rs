//! Retries, hops, cool-downs and failures, as users see them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// Two fakes `a` → `b` on DEFAULT.
async fn two(
    a_extra: &str,
    b_extra: &str,
    env: &[(&str, &str)],
) -> (FakeOpenAi, FakeOpenAi, TestApp) {
    let a = FakeOpenAi::start().await;
    let b = FakeOpenAi::start().await;
    let providers = openai_provider("a", &a.base_url(), a_extra)
        + &openai_provider("b", &b.base_url(), b_extra);
    let mut opts = Options::new(providers, router_yaml(&["a", "b"], ""));
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    (a, b, spawn_app(opts).await)
}

fn outcomes(job: &Value) -> Vec<String> {
    job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn server_errors_are_retried_on_the_same_provider() {
    let (a, b, app) = two("max_retries = 2", "", &[]).await;
    a.script([Reply::status(500), Reply::status(503)]);
    let resp = app.chat(user("retry me")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "a");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "0");
    let job = app.job_of(&resp).await;
    assert_eq!(outcomes(&job), ["retry", "retry", "ok"]);
    assert_eq!(job["attempts"][0]["status_code"], 500);
    assert_eq!((a.call_count(), b.call_count()), (3, 0));
    // Backoff: the retries did not fire back to back.
    let calls = a.calls();
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(90));
}

#[tokio::test]
async fn exhausted_retries_hop_to_the_next_provider() {
    let (a, b, app) = two("max_retries = 1", "", &[]).await;
    a.script([Reply::status(502), Reply::status(502)]);
    let resp = app.chat(user("hop")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "1");
    let job = app.job_of(&resp).await;
    assert_eq!(outcomes(&job), ["retry", "hop", "ok"]);
    assert_eq!(job["attempts"][2]["provider"], "b");
    assert_eq!(job["attempts"][2]["model"], "m-b");
    assert_eq!((a.call_count(), b.call_count()), (2, 1));
}

/// `b` is cooling down (a 429 of an earlier request) when `a`'s retries run out: the
/// job waits for `b`, within its deadline, instead of failing with 502 while a provider
/// that has not failed it is about to come back.
#[tokio::test]
async fn exhausted_retries_wait_for_a_later_provider_that_is_cooling_down() {
    let (a, b, app) = two("max_retries = 0", "", &[]).await;
    b.script([Reply::rate_limited("2")]);
    // An earlier request on `b` alone (a model that names a provider) meets its 429.
    let earlier = app
        .chat_with(
            json!({"model": "b", "messages": [{"role": "user", "content": "first"}]}),
            &[("x-orch-async", "true")],
        )
        .await;
    assert_eq!(earlier.status(), 202);
    let until = Instant::now() + Duration::from_secs(10);
    while b.call_count() == 0 {
        assert!(Instant::now() < until, "b was never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.script([Reply::status(500)]);
    let started = Instant::now();
    let resp = app.chat(user("wait for b")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "1");
    // Most of b's 2 s were left when a failed.
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "{:?}",
        started.elapsed()
    );
    let job = app.job_of(&resp).await;
    assert_eq!(outcomes(&job), ["hop", "ok"]);
    assert_eq!((a.call_count(), b.call_count()), (1, 3));
}

/// A 429 on the last provider sends the job to wait for that provider, not back to an
/// earlier one whose retries ran out on this job (which, not cooling down, would look
/// free).
#[tokio::test]
async fn a_429_does_not_send_the_job_back_to_a_provider_that_failed_it() {
    let (a, b, app) = two("max_retries = 0", "", &[]).await;
    a.script([Reply::status(500)]);
    b.script([Reply::rate_limited("1")]);
    let resp = app.chat(user("no way back")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    let job = app.job_of(&resp).await;
    assert_eq!(outcomes(&job), ["hop", "cooldown", "ok"]);
    assert_eq!((a.call_count(), b.call_count()), (1, 2));
}

#[tokio::test]
async fn every_provider_failing_gives_502_with_the_last_error() {
    let (a, b, app) = two("max_retries = 0", "max_retries = 1", &[]).await;
    a.script([Reply::status(500)]);
    b.script([
        Reply::status(500),
        Reply::Status {
            status: 503,
            body: r#"{"error":{"message":"b is melting"}}"#.into(),
            headers: vec![],
        },
    ]);
    let resp = app.chat(user("doomed")).await;
    assert_eq!(resp.status(), 502);
    // The job is over: a client's retry is a new try, which the SDKs may make.
    assert!(resp.headers().get("x-should-retry").is_none());
    let id = req_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "provider_server_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("b is melting"),
        "{body}"
    );
    let job = app.job(&id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(outcomes(&job), ["hop", "retry", "failed"]);
}

#[tokio::test]
async fn other_4xx_are_returned_at_once_with_one_upstream_call() {
    let (a, b, app) = two("max_retries = 3", "", &[]).await;
    a.script([Reply::status_body(
        400,
        json!({"error": {"message": "This model's maximum context length is 8 tokens",
            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
    )]);
    let resp = app.chat(user("bad for upstream")).await;
    assert_eq!(resp.status(), 400);
    let mut body: Value = resp.json().await.unwrap();
    assert!(body["error"]["job_id"].is_string());
    body["error"].as_object_mut().unwrap().remove("job_id");
    // The upstream's words, code and param, as an SDK user tests them.
    assert_eq!(
        body["error"],
        json!({"message": "This model's maximum context length is 8 tokens",
            "type": "provider_error", "param": "messages", "code": "context_length_exceeded"}),
    );
    assert_eq!((a.call_count(), b.call_count()), (1, 0));
}

#[tokio::test]
async fn retryable_4xx_408_and_409_are_retried() {
    let (a, _b, app) = two("max_retries = 2", "", &[]).await;
    a.script([Reply::status(408), Reply::status(409)]);
    let resp = app.chat(user("x")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(a.call_count(), 3);
}

#[tokio::test]
async fn rate_limit_hops_at_once_and_the_cool_down_is_remembered() {
    let (a, b, app) = two("max_retries = 2", "", &[]).await;
    a.script([Reply::rate_limited("30")]);
    let resp = app.chat(user("first")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "1");
    // `a` cools down for 30 s: the next request goes straight to `b`.
    let resp = app.chat(user("second")).await;
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    assert_eq!((a.call_count(), b.call_count()), (1, 2));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("orch_provider_cooldown{provider=\"a\"}"))
        .unwrap();
    let left: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(left > 20.0, "{line}");
}

#[tokio::test]
async fn rate_limit_with_retry_after_seconds_is_waited_out_on_the_last_provider() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("solo", &fake.base_url(), ""),
        router_yaml(&["solo"], ""),
    ))
    .await;
    fake.script([Reply::rate_limited("1")]);
    let started = Instant::now();
    let resp = app.chat(user("patience")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    let job = app.job_of(&resp).await;
    assert_eq!(outcomes(&job), ["cooldown", "ok"]);
    assert_eq!(job["attempts"][0]["status_code"], 429);
    let calls = fake.calls();
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(950));
}

#[tokio::test]
async fn rate_limit_with_retry_after_http_date_is_understood() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("solo", &fake.base_url(), ""),
        router_yaml(&["solo"], ""),
    ))
    .await;
    let when = chrono::Utc::now() + chrono::Duration::seconds(3);
    fake.script([Reply::rate_limited(
        &when.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
    )]);
    let resp = app.chat(user("date")).await;
    assert_eq!(resp.status(), 200);
    let calls = fake.calls();
    // HTTP dates have whole seconds: at least ~2 s were waited, not the 30 s default.
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_millis(1900) && gap < Duration::from_secs(10),
        "{gap:?}"
    );
}

#[tokio::test]
async fn rate_limit_past_the_deadline_is_a_429_with_retry_after() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("solo", &fake.base_url(), ""),
            router_yaml(&["solo"], ""),
        )
        // Far below the 120 s cool-down, with room for a loaded machine.
        .env("ORCH_REQUEST_TIMEOUT_SECONDS", "10"),
    )
    .await;
    fake.script([Reply::rate_limited("120")]);
    let resp = app.chat(user("too long")).await;
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((100..=120).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit");
    assert!(body["error"]["retry_after"].as_u64().unwrap() >= 100);
    // While it cools down, new requests are refused at once without calling upstream.
    let resp = app.chat(user("again")).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(fake.call_count(), 1);
}

/// One provider at a fake, with a configured cool-down of 1 s.
async fn solo_cooling_down_1s() -> (FakeOpenAi, TestApp) {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("solo", &fake.base_url(), ""),
            router_yaml(&["solo"], ""),
        )
        .env("ORCH_RETRY_AFTER_SECONDS", "1"),
    )
    .await;
    (fake, app)
}

#[tokio::test]
async fn a_429_without_retry_after_uses_the_configured_cool_down() {
    let (fake, app) = solo_cooling_down_1s().await;
    fake.script([Reply::Status {
        status: 429,
        body: "{}".into(),
        headers: vec![],
    }]);
    let resp = app.chat(user("default cool-down")).await;
    assert_eq!(resp.status(), 200);
    let calls = fake.calls();
    assert!(calls[1].at - calls[0].at >= Duration::from_millis(950));
}

/// A `Retry-After` of no time at all (`0`, a date already past) is no usable value: taken
/// as it is, the job called the upstream in a tight loop until its deadline.
#[tokio::test]
async fn a_429_whose_retry_after_is_zero_or_past_uses_the_configured_cool_down() {
    let past = (chrono::Utc::now() - chrono::Duration::seconds(100))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    for retry_after in ["0", past.as_str()] {
        let (fake, app) = solo_cooling_down_1s().await;
        fake.script([
            Reply::rate_limited(retry_after),
            Reply::rate_limited(retry_after),
        ]);
        let resp = app.chat(user("no time at all")).await;
        assert_eq!(resp.status(), 200, "Retry-After: {retry_after}");
        let calls = fake.calls();
        assert_eq!(calls.len(), 3, "Retry-After: {retry_after}");
        for pair in calls.windows(2) {
            let gap = pair[1].at - pair[0].at;
            assert!(gap >= Duration::from_millis(950), "{retry_after}: {gap:?}");
        }
    }
}

#[tokio::test]
async fn garbage_bodies_are_retried() {
    let (a, _b, app) = two("max_retries = 2", "", &[]).await;
    a.script([
        Reply::Garbage("<html>upstream proxy error</html>".into()),
        Reply::Garbage("{\"no\":\"choices\"}".into()),
    ]);
    let resp = app.chat(user("x")).await;
    assert_eq!(resp.status(), 200);
    let job = app.job_of(&resp).await;
    assert_eq!(outcomes(&job), ["retry", "retry", "ok"]);
    assert!(
        job["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("unreadable"),
        "{job}"
    );
}

#[tokio::test]
async fn a_hanging_upstream_times_out_and_is_retried() {
    let (a, b, app) = two("max_retries = 0\ntimeout_s = 0.5", "", &[]).await;
    a.script([Reply::Hang]);
    let resp = app.chat(user("hang")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    let job = app.job_of(&resp).await;
    assert!(
        job["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{job}"
    );
    assert_eq!((a.call_count(), b.call_count()), (1, 1));
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_connection_error_and_hops() {
    let b = FakeOpenAi::start().await;
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let providers =
        openai_provider("a", &dead, "max_retries = 0") + &openai_provider("b", &b.base_url(), "");
    let app = spawn_app(Options::new(providers, router_yaml(&["a", "b"], ""))).await;
    let resp = app.chat(user("x")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "b");
}

#[tokio::test]
async fn the_wait_running_out_is_a_504_with_the_job_id_and_the_job_goes_on() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(2500));
    let app = spawn_app(
        Options::new(
            openai_provider("solo", &fake.base_url(), ""),
            router_yaml(&["solo"], ""),
        )
        .env("ORCH_REQUEST_TIMEOUT_SECONDS", "1"),
    )
    .await;
    let resp = app.chat(user("slow")).await;
    assert_eq!(resp.status(), 504);
    let header_id = req_id(&resp);
    assert_eq!(resp.headers()["x-orch-provider"], "solo");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "0");
    // The SDKs' own retry would start a second job while this one runs.
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "timeout");
    let id = body["error"]["job_id"].as_str().unwrap();
    assert_eq!(header_id, id);
    let job = app.wait_job(id, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "succeeded");
}

#[tokio::test]
async fn jobs_queued_behind_a_429_move_to_the_next_provider_at_once() {
    // `a` runs one call at a time; the second call meets a 429 with a 30 s cool-down while
    // three more jobs wait in `a`'s queue. They must not wait out the cool-down.
    let (a, b, app) = two("concurrency = 1", "", &[]).await;
    a.set_latency(Duration::from_millis(500));
    a.script([Reply::Ok, Reply::rate_limited("30")]);
    let mut ids = vec![];
    for i in 0..5 {
        let resp = app
            .chat_with(user(&format!("q{i}")), &[("x-orch-async", "true")])
            .await;
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let started = Instant::now();
    for id in &ids {
        let job = app.wait_job(id, Duration::from_secs(10)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // `a`: the first job and the 429; `b`: the job that met the 429, and the three moved.
    assert_eq!((a.call_count(), b.call_count()), (2, 4));
    // A moved job never called `a`, and counts the move as a hop.
    let last = app.job(&ids[4]).await;
    assert_eq!(last["provider"], "b");
    assert_eq!(last["fallback_attempts"], 1);
    assert_eq!(outcomes(&last), ["ok"]);
}

#[tokio::test]
async fn jobs_queued_behind_a_429_with_nowhere_to_go_get_429_not_504() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(800));
    fake.script([Reply::Ok, Reply::rate_limited("120")]);
    let app = spawn_app(
        Options::new(
            openai_provider("solo", &fake.base_url(), "concurrency = 1"),
            router_yaml(&["solo"], ""),
        )
        .env("ORCH_REQUEST_TIMEOUT_SECONDS", "20"),
    )
    .await;
    let first = app
        .chat_with(user("first"), &[("x-orch-async", "true")])
        .await;
    assert_eq!(first.status(), 202);
    let started = Instant::now();
    // Both wait behind the first; the first of them meets the 429, the other was queued.
    let (a, b) = tokio::join!(
        app.chat(user("meets the 429")),
        app.chat(user("queued behind"))
    );
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (429, 429));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let body: Value = b.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit");
    assert!(body["error"]["retry_after"].as_u64().unwrap() > 100);
    assert_eq!(fake.call_count(), 2);
}

/// `a` (no retries) with a circuit breaker, then `b`, on DEFAULT.
async fn breaker_on_a(threshold: u32, recovery_s: u32) -> (FakeOpenAi, FakeOpenAi, TestApp) {
    let a = FakeOpenAi::start().await;
    let b = FakeOpenAi::start().await;
    let providers = openai_provider("a", &a.base_url(), "max_retries = 0")
        + &openai_provider("b", &b.base_url(), "");
    let router = format!(
        "routes:\n  DEFAULT:\n    strategy: priority\n    targets:\n      - provider: a\n        \
         circuit_breaker: {{failure_threshold: {threshold}, recovery_time_s: {recovery_s}}}\n      \
         - provider: b\n"
    );
    (a, b, spawn_app(Options::new(providers, router)).await)
}

#[tokio::test]
async fn an_open_breaker_is_skipped_from_the_next_request_on() {
    let (a, b, app) = breaker_on_a(2, 60).await;
    a.script([Reply::status(500), Reply::status(500), Reply::status(500)]);
    // Two failures in a row open `a`'s breaker; each of those requests hops to `b`.
    for i in 0..2 {
        let resp = app.chat(user(&format!("fails on a {i}"))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-orch-provider"], "b");
        assert_eq!(resp.headers()["x-orch-fallback-attempts"], "1");
    }
    // From the very next request on, `a` is skipped at once: no call, no hop.
    for i in 0..3 {
        let resp = app.chat(user(&format!("skips a {i}"))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-orch-provider"], "b");
        assert_eq!(
            resp.headers()["x-orch-fallback-attempts"],
            "0",
            "request {i}"
        );
        let job = app.job_of(&resp).await;
        assert_eq!(outcomes(&job), ["ok"]);
    }
    assert_eq!((a.call_count(), b.call_count()), (2, 5));
}

#[tokio::test]
async fn an_open_breaker_lets_the_provider_back_after_its_recovery_time() {
    let (a, b, app) = breaker_on_a(1, 1).await;
    a.script([Reply::status(500)]);
    let resp = app.chat(user("opens it")).await;
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    let resp = app.chat(user("while open")).await;
    assert_eq!(resp.headers()["x-orch-provider"], "b");
    assert_eq!(a.call_count(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let resp = app.chat(user("after recovery")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "a");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "0");
    assert_eq!((a.call_count(), b.call_count()), (2, 2));
}
