//! The synchronous and asynchronous chat path through the queue.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

async fn one_fake() -> (FakeOpenAi, TestApp) {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 1000\nconcurrency = 8"),
        router_yaml(&["up"], ""),
    ))
    .await;
    (fake, app)
}

#[tokio::test]
async fn answers_like_openai_with_job_headers() {
    let (fake, app) = one_fake().await;
    let resp = app.chat(json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50256": -100}, "x_custom": 1})).await;
    assert_eq!(resp.status(), 200);
    let id = req_id(&resp);
    // The same id where the OpenAI SDKs look for a request id.
    assert_eq!(resp.headers()["x-request-id"].to_str().unwrap(), id);
    assert_eq!(resp.headers()["x-orch-provider"], "up");
    assert_eq!(resp.headers()["x-orch-fallback-attempts"], "0");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "fake:hi");
    assert_eq!(body["usage"]["total_tokens"], 10);
    // The upstream got the provider's model, the defaults, and unknown fields untouched.
    let call = &fake.calls()[0];
    assert_eq!(call.body["model"], "m-up");
    assert_eq!(call.body["temperature"], 0.2);
    assert_eq!(call.body["max_tokens"], 256);
    assert_eq!(call.body["logit_bias"]["50256"], -100);
    assert_eq!(call.body["x_custom"], 1);
    // The job record holds the attempt.
    let job = app.job(&id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["object"], "orch.job");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(job["attempts"][0]["outcome"], "ok");
    assert_eq!(job["attempts"][0]["status_code"], 200);
    assert_eq!(job["result"]["choices"][0]["message"]["content"], "fake:hi");
}

#[tokio::test]
async fn async_jobs_answer_202_and_can_be_polled() {
    let (fake, app) = one_fake().await;
    fake.set_latency(Duration::from_millis(200));
    let resp = app
        .chat_with(user("later"), &[("x-orch-async", "true")])
        .await;
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    assert_eq!(loc, format!("/v1/jobs/{}", body["id"].as_str().unwrap()));
    let job = app
        .wait_job(body["id"].as_str().unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(
        job["result"]["choices"][0]["message"]["content"],
        "fake:later"
    );
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_without_a_second_call() {
    let (fake, app) = one_fake().await;
    let h = [("idempotency-key", "abc-1")];
    let a = app.chat_with(user("once"), &h).await;
    let id_a = req_id(&a);
    let a: Value = a.json().await.unwrap();
    let b = app.chat_with(user("once"), &h).await;
    assert_eq!(b.status(), 200);
    assert_eq!(b.headers()["x-orch-request-id"].to_str().unwrap(), id_a);
    let b: Value = b.json().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(fake.call_count(), 1);
    // Concurrent repeats while the first is running also share it.
    fake.set_latency(Duration::from_millis(300));
    let h2 = [("idempotency-key", "abc-2")];
    let (x, y) = tokio::join!(
        app.chat_with(user("twice"), &h2),
        app.chat_with(user("twice"), &h2)
    );
    assert_eq!(
        x.headers()["x-orch-request-id"],
        y.headers()["x-orch-request-id"]
    );
    assert_eq!(fake.call_count(), 2);
}

/// An async repeat of a finished request gets the job as `GET /v1/jobs/{id}` shows it.
#[tokio::test]
async fn an_async_repeat_shows_the_job_with_its_attempts() {
    let (fake, app) = one_fake().await;
    let key = ("idempotency-key", "async-1");
    let first = app.chat_with(user("once"), &[key]).await;
    assert_eq!(first.status(), 200);
    let id = req_id(&first);
    let again = app
        .chat_with(user("once"), &[key, ("x-orch-async", "true")])
        .await;
    assert_eq!(again.status(), 202);
    assert_eq!(
        again.headers()["location"].to_str().unwrap(),
        format!("/v1/jobs/{id}")
    );
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, app.job(&id).await);
    assert_eq!(again["status"], "succeeded");
    assert_eq!(again["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn cancel_a_queued_job() {
    let fake = FakeOpenAi::start().await;
    // rpm 1: the second job must wait a minute, so it is still queued when cancelled.
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 1\nconcurrency = 1"),
        router_yaml(&["up"], ""),
    ))
    .await;
    assert_eq!(app.chat(user("first")).await.status(), 200);
    let resp = app
        .chat_with(user("second"), &[("x-orch-async", "true")])
        .await;
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cancelled: Value = app
        .post(&format!("/v1/jobs/{id}/cancel"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let job = app.job(&id).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(fake.call_count(), 1);
    assert_eq!(app.get("/v1/jobs/job_nope").await.status(), 404);
}

/// `n` asks for that many choices: the dummy answers each, plain and streamed, and counts
/// the completion tokens of all of them, as OpenAI does.
#[tokio::test]
async fn the_dummy_answers_n_choices() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["dummy_a"], ""))).await;
    let ask = |stream: bool| {
        json!({"model": "gpt-test", "n": 3, "stream": stream,
            "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
            "messages": [{"role": "user", "content": "two words"}]})
    };
    let resp = app.chat(ask(false)).await;
    assert_eq!(resp.status(), 200);
    let id = req_id(&resp);
    let body: Value = resp.json().await.unwrap();
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{body}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], "dummy:two words");
        assert_eq!(c["finish_reason"], "stop");
    }
    assert_eq!(body["usage"]["completion_tokens"], 6);
    // The job keeps the answer as the client got it.
    let job = app.job(&id).await;
    assert_eq!(job["result"]["choices"].as_array().unwrap().len(), 3);

    let resp = app.chat(ask(true)).await;
    assert_eq!(resp.status(), 200);
    let sse = Sse::read(resp).await;
    assert!(sse.ends_with_done());
    let chunks = sse.json();
    for i in 0..3 {
        let text: String = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == i)
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "dummy:two words", "choice {i}");
        let finishes = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == i && c["finish_reason"] == "stop")
            .count();
        assert_eq!(finishes, 1, "choice {i}");
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn models_and_healthz() {
    let (_fake, app) = one_fake().await;
    let models: Value = app.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"DEFAULT") && ids.contains(&"up"), "{ids:?}");
    assert_eq!(models["data"][0]["object"], "model");
    // One model, as the SDKs' models.retrieve asks for it.
    for id in ["DEFAULT", "up"] {
        let one = app.get(&format!("/v1/models/{id}")).await;
        assert_eq!(one.status(), 200);
        let one: Value = one.json().await.unwrap();
        let listed = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id);
        assert_eq!(Some(&one), listed);
    }
    let missing = app.get("/v1/models/nope").await;
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.unwrap();
    assert_eq!(missing["error"]["type"], "not_found_error");
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["db"], "ok");
    assert_eq!(health["providers"], json!(["up"]));
}

#[tokio::test]
async fn a_go_and_look_wake_up_does_not_end_a_waiting_stream() {
    // One call at a time, the first slow: the stream waits in the queue while every waiter
    // is told "go and look" (as after a Postgres listener reconnect). It must keep waiting
    // and then stream its answer, not end with an error.
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(3500));
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "concurrency = 1"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let first = app
        .chat_with(user("slow"), &[("x-orch-async", "true")])
        .await;
    assert_eq!(first.status(), 202);
    let shared = app.shared.clone();
    let nudges = tokio::spawn(async move {
        for wait in [300, 2500] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            shared.signals.wake_all();
        }
    });
    let mut body = user("streamed");
    body["stream"] = json!(true);
    let resp = app.chat(body).await;
    assert_eq!(resp.status(), 200);
    let sse = Sse::read(resp).await;
    nudges.await.unwrap();
    assert!(sse.ends_with_done(), "{}", sse.text());
    assert!(sse.text().contains("streamed"), "{}", sse.text());
}

/// A request that goes away while its accept-and-lease is being written (its client
/// disconnected, so its future was dropped): the accept still completes and the job runs
/// at once. Before, the write went down with the request: abandoned half-way (no job), or
/// committed with its answer dropped, which left the job leased with no call until its
/// lease expired (60 s here). On Postgres, where that write is a statement in flight
/// (SQLite writes a lone accept before its first await).
#[tokio::test]
async fn a_request_dropped_mid_accept_still_runs_its_job() {
    use futures::FutureExt;
    use llm_orch::queue::JobStatus;

    let db = crate::support::pg::TestDb::create().await;
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(
        Options::new(
            openai_provider("up", &fake.base_url(), ""),
            router_yaml(&["up"], ""),
        )
        .env("ORCH_DATABASE_URL", &db.url)
        .env("ORCH_LEASE_SECONDS", "60"),
    )
    .await;
    let job =
        crate::support::jobs::new_job("dropped", &["up"], chrono::Utc::now().timestamp_millis());
    // One poll sends the statement on its way, then the future is dropped, as when the
    // client disconnects.
    let _ = llm_orch::worker::insert_and_start(&app.shared, &job).now_or_never();
    let started = std::time::Instant::now();
    loop {
        let status = app
            .shared
            .store
            .get_job("dropped")
            .await
            .unwrap()
            .map(|j| j.status);
        if status == Some(JobStatus::Succeeded) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the job is {status:?} after 10 s: its accept did not complete and start it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.call_count(), 1);
}
