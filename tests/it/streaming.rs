//! `stream: true` through the queue for every provider type: chunk order, `[DONE]`,
//! usage, failover before the first chunk, the error event after it, cancel on
//! disconnect, keep-alives while queued, and a real OpenAI client library.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::*;

fn streamed(text: &str, include_usage: bool) -> Value {
    let mut b = user(text);
    b["stream"] = json!(true);
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// Polls until `cond` holds, failing after `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn streams_have_one_shape_for_every_provider() {
    let f = Fleet::start().await;
    let mut shapes = Vec::new();
    for (route, provider) in FLEET_ROUTES {
        let resp = f.chat(route, streamed("hi there", true)).await;
        assert_eq!(resp.status(), 200, "{route}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-cache");
        assert_eq!(resp.headers()["x-accel-buffering"], "no");
        assert_eq!(resp.headers()["x-orch-provider"], provider);
        let sse = Sse::read(resp).await;
        assert!(sse.ends_with_done(), "{route}: {:?}", sse.data);
        let chunks = sse.json();
        let n = chunks.len();
        // Role first, then the text, then finish_reason, then the usage-only chunk.
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["role"], "assistant",
            "{route}"
        );
        assert_eq!(
            sse.text().split_once(':').map(|x| x.1),
            Some("hi there"),
            "{route}"
        );
        assert_eq!(
            chunks[n - 2]["choices"][0]["finish_reason"],
            "stop",
            "{route}"
        );
        assert_eq!(chunks[n - 1]["choices"], json!([]), "{route}");
        assert!(
            chunks[n - 1]["usage"]["total_tokens"].as_i64().unwrap() > 0,
            "{route}"
        );
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
        assert!(
            ids.iter().all(|i| *i == ids[0]),
            "{route}: one id for every chunk"
        );
        assert!(
            chunks[..n - 1]
                .iter()
                .all(|c| c.get("usage") == Some(&Value::Null)),
            "{route}: `\"usage\": null` before the usage chunk, as OpenAI sends: {:?}",
            sse.data
        );
        shapes.push((route, chunks.iter().map(shape).collect::<Vec<_>>()));
    }
    for (route, s) in &shapes[1..] {
        assert_eq!(s, &shapes[0].1, "{route} differs from OA");
    }
    // Every upstream was asked to stream, and to report usage where that must be asked.
    assert_eq!(
        f.openai.calls()[0].body["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(f.anthropic.calls()[0].body["stream"], true);
    assert_eq!(f.ollama.calls()[0].body["stream"], true);
}

/// A repeat of a streaming request with the same `Idempotency-Key` gets the first answer
/// as a stream too: an SDK reading a stream finds nothing in a JSON body.
#[tokio::test]
async fn a_repeated_stream_gets_the_first_answer_as_a_stream() {
    let f = Fleet::start().await;
    let h = [("x-orch-task-kind", "OA"), ("idempotency-key", "stream-1")];
    let first = f.app.chat_with(streamed("say it twice", true), &h).await;
    let id = req_id(&first);
    let first = Sse::read(first).await;
    assert!(first.ends_with_done());
    for include_usage in [true, false] {
        let again = f
            .app
            .chat_with(streamed("say it twice", include_usage), &h)
            .await;
        assert_eq!(again.status(), 200);
        assert_eq!(again.headers()["content-type"], "text/event-stream");
        assert_eq!(again.headers()["x-accel-buffering"], "no");
        assert_eq!(req_id(&again), id);
        assert_eq!(again.headers()["x-orch-provider"], "oa");
        let sse = Sse::read(again).await;
        assert!(sse.ends_with_done(), "{:?}", sse.data);
        assert_eq!(sse.text(), first.text());
        let chunks = sse.json();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(|_| c))
            .collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
        let usage = chunks
            .iter()
            .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
            .count();
        assert_eq!(usage, usize::from(include_usage), "{:?}", sse.data);
        // As OpenAI streams: with include_usage every other chunk has `"usage": null`;
        // without it, no chunk has the key.
        let keyed = chunks.iter().filter(|c| c.get("usage").is_some()).count();
        let want = if include_usage { chunks.len() } else { 0 };
        assert_eq!(keyed, want, "{:?}", sse.data);
    }
    assert_eq!(f.openai.call_count(), 1);
}

#[tokio::test]
async fn usage_is_recorded_even_when_the_client_did_not_ask_for_it() {
    let f = Fleet::start().await;
    for route in ["OA", "AN", "OL"] {
        let resp = f.chat(route, streamed("count me", false)).await;
        let job_id = req_id(&resp);
        let sse = Sse::read(resp).await;
        assert!(sse.ends_with_done());
        assert!(
            sse.json().iter().all(|c| c.get("usage").is_none()),
            "{route}: no usage for a client that did not ask: {:?}",
            sse.data
        );
        let job = f.app.wait_job(&job_id, Duration::from_secs(10)).await;
        assert_eq!(job["status"], "succeeded");
        assert_eq!(job["result"]["object"], "chat.completion");
        assert_eq!(
            job["result"]["choices"][0]["message"]["content"],
            "fake:count me"
        );
        assert_eq!(job["result"]["usage"]["total_tokens"], 10, "{route}: {job}");
    }
    assert_eq!(
        f.openai.calls()[0].body["stream_options"],
        json!({"include_usage": true})
    );
}

#[tokio::test]
async fn failover_happens_before_the_first_chunk() {
    let f = Fleet::start_with(
        "",
        "  AN_THEN_OL:\n    primary: an\n    fallback: [ol]\n  OA_THEN_DU:\n    primary: oa\n    fallback: [du]\n",
        &[],
    )
    .await;
    // A 500 (no retries configured) and an overloaded error event before any content.
    for reply in [Reply::status(500), Reply::ErrorEventAfter(1)] {
        f.anthropic.script([reply]);
        let resp = f.chat("AN_THEN_OL", streamed("hop", true)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-orch-provider"], "ol");
        assert_eq!(resp.headers()["x-orch-fallback-attempts"], "1");
        let job = f.job(&resp).await;
        let sse = Sse::read(resp).await;
        assert_eq!(sse.text(), "fake:hop");
        assert!(sse.ends_with_done());
        assert_eq!(job["status"], "succeeded");
        assert_eq!(job["provider"], "ol");
        let outcomes: Vec<&Value> = job["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| &a["outcome"])
            .collect();
        assert_eq!(outcomes, [&json!("hop"), &json!("ok")], "{job}");
    }
    // A 429 hops at once too.
    f.openai.script([Reply::rate_limited("30")]);
    let resp = f.chat("OA_THEN_DU", streamed("limited", true)).await;
    assert_eq!(resp.headers()["x-orch-provider"], "du");
    let sse = Sse::read(resp).await;
    assert_eq!(sse.text(), "dummy:limited");
    assert!(sse.ends_with_done());
}

#[tokio::test]
async fn a_failure_after_the_first_chunk_ends_with_an_error_event() {
    let f = Fleet::start_with(
        "",
        "  AN_THEN_OL:\n    primary: an\n    fallback: [ol]\n",
        &[],
    )
    .await;
    let text = "one two three four five six";
    // (route, reply, what the client saw before it broke)
    let cases = [
        // role, "fake:one ", "two " then the connection breaks.
        ("OA", Reply::BreakStreamAfter(3), "fake:one two "),
        // message_start, block start, ping, "fake:one " then an overloaded error event;
        // no hop to `ol` although it is there: a chunk already reached the client.
        ("AN_THEN_OL", Reply::ErrorEventAfter(4), "fake:one "),
        // Two NDJSON lines, then a line that is not JSON.
        ("OL", Reply::GarbageEventAfter(2), "fake:one two "),
    ];
    for (route, reply, seen) in cases {
        let fake = match route {
            "OA" => &f.openai,
            "OL" => &f.ollama,
            _ => &f.anthropic,
        };
        let before = fake.call_count();
        fake.script([reply]);
        let resp = f.chat(route, streamed(text, true)).await;
        assert_eq!(resp.status(), 200);
        let job_id = req_id(&resp);
        let sse = Sse::read(resp).await;
        assert!(
            !sse.ends_with_done(),
            "{route}: never a clean end: {:?}",
            sse.data
        );
        let events = sse.json();
        let last = events.last().unwrap();
        assert_eq!(
            last["error"]["type"], "provider_server_error",
            "{route}: {last}"
        );
        assert_eq!(last["error"]["code"], "stream_interrupted");
        assert_eq!(last["error"]["job_id"], job_id.as_str());
        assert_eq!(sse.text(), seen, "{route}");
        let job = f.app.wait_job(&job_id, Duration::from_secs(10)).await;
        assert_eq!(job["status"], "failed", "{route}");
        assert_eq!(
            job["partial_result"]["choices"][0]["message"]["content"], seen,
            "{route}: {job}"
        );
        assert_eq!(
            job["attempts"].as_array().unwrap().len(),
            1,
            "{route}: no retry after the first chunk"
        );
        assert_eq!(fake.call_count(), before + 1);
    }
    assert_eq!(
        f.ollama.call_count(),
        1,
        "the anthropic failure did not hop to ollama"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_job_and_the_upstream_call() {
    let f = Fleet::start().await;
    for route in ["AN", "OL", "OA"] {
        let fake = f.fake(route).unwrap();
        fake.set_frame_delay(Duration::from_millis(100));
        let long = vec!["word"; 100].join(" ");
        let mut resp = f.chat(route, streamed(&long, false)).await;
        let job_id = req_id(&resp);
        // Read until some text has arrived, then hang up.
        let mut got = String::new();
        while !got.contains("word") {
            let bytes = resp.chunk().await.unwrap().expect("stream open");
            got.push_str(&String::from_utf8_lossy(&bytes));
        }
        drop(resp);
        let job = f.app.wait_job(&job_id, Duration::from_secs(10)).await;
        assert_eq!(job["status"], "cancelled", "{route}: {job}");
        eventually(
            Duration::from_secs(10),
            "the upstream stream is dropped",
            || fake.streams_cut() == 1 && fake.in_flight() == 0,
        )
        .await;
    }
}

#[tokio::test]
async fn queued_streams_send_keep_alives() {
    let (fake, app) = one_call_a_minute("600", "1").await;
    // The second waits in the queue: the client sees headers, then comments.
    let mut resp = app.chat(streamed("second", false)).await;
    assert_eq!(resp.status(), 200);
    let job_id = req_id(&resp);
    let mut got = String::new();
    while !got.contains(": keep-alive") {
        let bytes = resp.chunk().await.unwrap().expect("stream open");
        got.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(
        !got.contains("data:"),
        "nothing but comments while queued: {got}"
    );
    let job = app.job(&job_id).await;
    assert_eq!(job["status"], "queued");
    // Hanging up while queued cancels the job; it never reaches the upstream.
    drop(resp);
    let job = app.wait_job(&job_id, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(fake.call_count(), 1);
}

/// An app on one Anthropic fake that allows one call a minute, with `timeout_s` as the
/// request timeout, whose minute is already used by a stream: the next one waits.
async fn one_call_a_minute(timeout_s: &str, keepalive_s: &str) -> (Fake, TestApp) {
    let fake = Fake::anthropic().await;
    let app = spawn_app(
        Options::new(
            provider("an", "anthropic", &fake.base_url(), "rpm = 1"),
            router_yaml(&["an"], ""),
        )
        .env("ORCH_SSE_KEEPALIVE_SECONDS", keepalive_s)
        .env("ORCH_REQUEST_TIMEOUT_SECONDS", timeout_s),
    )
    .await;
    let first = Sse::read(app.chat(streamed("first", false)).await).await;
    assert!(first.ends_with_done());
    (fake, app)
}

#[tokio::test]
async fn a_stream_that_never_starts_ends_with_a_timeout_at_the_request_timeout() {
    let (fake, app) = one_call_a_minute("3", "1").await;
    let started = Instant::now();
    let mut resp = app.chat(streamed("second", false)).await;
    // Committed after the hold (1 s: the keep-alive interval), with keep-alives...
    assert_eq!(resp.status(), 200);
    let job_id = req_id(&resp);
    let mut got = String::new();
    while let Some(bytes) = resp.chunk().await.unwrap() {
        got.push_str(&String::from_utf8_lossy(&bytes));
    }
    // ...then ended by itself at the deadline, with an error the SDKs raise.
    assert!(started.elapsed() >= Duration::from_millis(2900), "{got}");
    let data: Vec<&str> = got
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 1, "{got}");
    let err: Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(err["error"]["type"], "timeout", "{err}");
    assert_eq!(err["error"]["job_id"], job_id.as_str());
    let job = app.wait_job(&job_id, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn a_stream_whose_timeout_ends_before_the_hold_gets_a_504() {
    // A 2 s timeout ends with the 2 s hold (keep-alives every 10 s).
    let (fake, app) = one_call_a_minute("2", "10").await;
    let resp = app.chat(streamed("second", false)).await;
    assert_eq!(resp.status(), 504);
    let job_id = req_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "timeout", "{body}");
    let job = app.wait_job(&job_id, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn a_call_running_at_the_request_timeout_goes_on_and_streams() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(2500));
    let app = spawn_app(
        Options::new(
            openai_provider("oa", &fake.base_url(), ""),
            router_yaml(&["oa"], ""),
        )
        .env("ORCH_REQUEST_TIMEOUT_SECONDS", "1"),
    )
    .await;
    // The upstream takes 2.5 s to its first chunk: the timeout passes while it runs.
    let sse = Sse::read(app.chat(streamed("slow start", false)).await).await;
    assert!(sse.ends_with_done(), "{sse:?}");
    assert_eq!(sse.text(), "fake:slow start");
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn async_openai_streams_from_every_provider() {
    use async_openai::Client;
    use async_openai::config::OpenAIConfig;
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
        CreateChatCompletionRequestArgs,
    };
    let f = Fleet::start().await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_key("unused")
            .with_api_base(format!("{}/v1", f.app.url)),
    );
    // The route is picked by `model`, as an SDK user would do it.
    for (route, _) in FLEET_ROUTES {
        let req = CreateChatCompletionRequestArgs::default()
            .model(route)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content("hello sdk")
                .build()
                .unwrap()
                .into()])
            .stream(true)
            .stream_options(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            })
            .build()
            .unwrap();
        let mut stream = client.chat().create_stream(req).await.unwrap();
        let mut text = String::new();
        let mut usage = None;
        let mut finish = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("{route}: {e}"));
            for c in &chunk.choices {
                text.push_str(c.delta.content.as_deref().unwrap_or(""));
                finish = c.finish_reason.or(finish);
            }
            usage = chunk.usage.or(usage);
        }
        assert_eq!(
            text.split_once(':').map(|x| x.1),
            Some("hello sdk"),
            "{route}"
        );
        assert!(finish.is_some(), "{route}");
        assert!(usage.expect("usage chunk").total_tokens > 0, "{route}");
    }
}

#[tokio::test]
async fn sticky_routes_remember_the_provider_of_a_stream() {
    let f = Fleet::start_with(
        "",
        "  CODE:\n    strategy: sticky\n    sticky_ttl: 60\n    targets: [{provider: oa}, {provider: du}]\n",
        &[],
    )
    .await;
    let sticky = [
        ("x-orch-task-kind", "CODE"),
        ("x-orch-sticky-key", "session-1"),
    ];
    f.openai.script([Reply::status(500)]);
    let first = f.app.chat_with(streamed("one", false), &sticky).await;
    assert_eq!(first.headers()["x-orch-provider"], "du");
    assert!(Sse::read(first).await.ends_with_done());
    // The same key stays on the provider that served it, although `oa` is healthy again.
    let second = f.app.chat_with(streamed("two", false), &sticky).await;
    assert_eq!(second.headers()["x-orch-provider"], "du");
    assert_eq!(Sse::read(second).await.text(), "dummy:two");
    assert_eq!(f.openai.call_count(), 1);
}
