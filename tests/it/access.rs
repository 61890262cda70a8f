//! Inbound keys (through a real OpenAI client library), job isolation between keys, CORS,
//! and request limits.

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use serde_json::{Value, json};

use crate::support::*;

async fn keyed_app(extra: &[(&str, &str)]) -> (FakeOpenAi, TestApp) {
    let fake = FakeOpenAi::start().await;
    let mut opts = Options::new(
        openai_provider("up", &fake.base_url(), "rpm = 1000\nconcurrency = 8"),
        router_yaml(&["up"], ""),
    )
    .env("ORCH_INBOUND_API_KEYS", "key-one, key-two");
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    (fake, spawn_app(opts).await)
}

fn client(app: &TestApp, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_key(key)
            .with_api_base(format!("{}/v1", app.url)),
    )
}

async fn ask(c: &Client<OpenAIConfig>, text: &str) -> Result<String, OpenAIError> {
    let req = CreateChatCompletionRequestArgs::default()
        .model("gpt-test")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let resp = c.chat().create(req).await?;
    Ok(resp.choices[0].message.content.clone().unwrap_or_default())
}

#[tokio::test]
async fn openai_client_sees_401_for_a_wrong_key_and_works_with_a_right_one() {
    let (fake, app) = keyed_app(&[]).await;
    match ask(&client(&app, "not-a-key"), "hi").await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 401);
            assert_eq!(e.api_error.r#type.as_deref(), Some("authentication_error"));
            assert_eq!(e.api_error.code.as_deref(), Some("invalid_api_key"));
            assert!(!e.api_error.message.is_empty());
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
    // No key at all: the same.
    let r = app.chat(user("hi")).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"message": body["error"]["message"], "type": "authentication_error", "code": "invalid_api_key", "param": null}})
    );
    assert_eq!(fake.call_count(), 0, "nothing reached the upstream");

    assert_eq!(
        ask(&client(&app, "key-one"), "hi").await.unwrap(),
        "fake:hi"
    );
    assert_eq!(
        ask(&client(&app, "key-two"), "yo").await.unwrap(),
        "fake:yo"
    );
    // The upstream never sees the inbound key.
    for call in fake.calls() {
        let auth = call
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            !auth.unwrap_or_default().contains("key-"),
            "inbound key forwarded"
        );
    }
}

#[tokio::test]
async fn custom_key_header_metrics_protected_healthz_open() {
    let (_fake, app) = keyed_app(&[("ORCH_API_KEY_HEADER", "X-Custom-Key")]).await;
    let r = app
        .chat_with(user("hi"), &[("x-custom-key", "key-two")])
        .await;
    assert_eq!(r.status(), 200);
    // The default header name is not the configured one any more.
    let r = app.chat_with(user("hi"), &[("x-api-key", "key-two")]).await;
    assert_eq!(r.status(), 401);
    // Bearer always works.
    let r = app
        .chat_with(user("hi"), &[("authorization", "Bearer key-one")])
        .await;
    assert_eq!(r.status(), 200);

    assert_eq!(app.get("/metrics").await.status(), 401);
    let r = app
        .http
        .get(format!("{}/metrics", app.url))
        .bearer_auth("key-one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("orch_requests_total"));
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.get("/v1/models").await.status(), 401);
}

#[tokio::test]
async fn jobs_are_invisible_to_another_key() {
    let (fake, app) = keyed_app(&[]).await;
    fake.set_latency(Duration::from_millis(300));
    let r = app
        .chat_with(
            user("mine"),
            &[
                ("authorization", "Bearer key-one"),
                ("x-orch-async", "true"),
            ],
        )
        .await;
    assert_eq!(r.status(), 202);
    let id = req_id(&r);
    let as_key = |method: reqwest::Method, path: String, key: &'static str| {
        app.http
            .request(method, format!("{}{path}", app.url))
            .bearer_auth(key)
            .send()
    };
    let r = as_key(reqwest::Method::GET, format!("/v1/jobs/{id}"), "key-two")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    let r = as_key(
        reqwest::Method::POST,
        format!("/v1/jobs/{id}/cancel"),
        "key-two",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    // The owner still sees it, not cancelled, and it completes.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = as_key(reqwest::Method::GET, format!("/v1/jobs/{id}"), "key-one")
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let job: Value = r.json().await.unwrap();
        assert_ne!(job["status"], "cancelled");
        if job["status"] == "succeeded" {
            break;
        }
        assert!(std::time::Instant::now() < end);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stored caller is a hash, never the key.
    let job = app.shared.store.get_job(&id).await.unwrap().unwrap();
    let caller = job.caller.unwrap();
    assert_eq!(caller.len(), 64);
    assert!(!caller.contains("key-one"));
}

fn preflight(app: &TestApp, origin: &str) -> reqwest::RequestBuilder {
    app.http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", app.url))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-api-key, x-orch-task-kind, x-orch-sticky-key, x-orch-async, idempotency-key, x-stainless-os, x-stainless-package-version",
        )
}

#[tokio::test]
async fn cors_preflight_both_ways() {
    let (_fake, app) = keyed_app(&[(
        "ORCH_CORS_ALLOW_ORIGINS",
        "https://app.example, http://localhost:5173",
    )])
    .await;
    // Allowed origin: answered without a key, with what clients send.
    let r = preflight(&app, "https://app.example").send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    for m in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_string();
    for name in [
        "authorization",
        "content-type",
        "x-api-key",
        "x-orch-task-kind",
        "x-orch-sticky-key",
        "x-orch-async",
        "idempotency-key",
        "x-stainless-os",
        "x-stainless-package-version",
    ] {
        assert!(
            allowed.split(", ").any(|h| h == name),
            "{name} not in {allowed}"
        );
    }
    // The actual request from that origin exposes the x-orch-* headers.
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .header("origin", "http://localhost:5173")
        .bearer_auth("key-one")
        .json(&user("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    for name in [
        "x-orch-request-id",
        "x-request-id",
        "x-orch-provider",
        "x-orch-fallback-attempts",
    ] {
        assert!(exposed.contains(name), "{exposed}");
    }
    // A 401 to an allowed origin still carries CORS headers, so the browser shows it.
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .header("origin", "https://app.example")
        .json(&user("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );

    // Another origin: no CORS header at all, preflight or not.
    let no_cors = |h: &reqwest::header::HeaderMap| {
        h.keys().all(|k| !k.as_str().starts_with("access-control-"))
    };
    let r = preflight(&app, "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success());
    assert!(no_cors(r.headers()), "{:?}", r.headers());
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .header("origin", "https://evil.example")
        .bearer_auth("key-one")
        .json(&user("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "CORS is the browser's check, not auth");
    assert!(no_cors(r.headers()), "{:?}", r.headers());
    // The answer still depends on the origin: a shared cache must not reuse it for another.
    assert!(
        r.headers()
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().contains("origin")),
        "{:?}",
        r.headers()
    );
}

#[tokio::test]
async fn body_json_and_header_limits() {
    let (fake, app) = keyed_app(&[("ORCH_MAX_BODY_BYTES", "4096")]).await;
    let key = ("authorization", "Bearer key-one");
    let big = "x".repeat(5000);
    // With a content-length.
    let r = app.chat_with(user(&big), &[key]).await;
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // Chunked, without a content-length.
    let text = serde_json::to_vec(&user(&big)).unwrap();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        text.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .header(key.0, key.1)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // Just under the limit is fine.
    let r = app.chat_with(user(&"y".repeat(3000)), &[key]).await;
    assert_eq!(r.status(), 200);

    // Deeply nested JSON: a 400, not a crash.
    let deep = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}],\"extra\":{}{}}}",
        "[".repeat(1500),
        "]".repeat(1500)
    );
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.url))
        .header(key.0, key.1)
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Oversized headers are refused before any handler runs; the server goes on serving.
    let r = app
        .http
        .get(format!("{}/healthz", app.url))
        .header("x-huge", "h".repeat(600 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 431);
    }
    let mut many = app.http.get(format!("{}/healthz", app.url));
    for i in 0..200 {
        many = many.header(format!("x-h{i}"), "v");
    }
    if let Ok(r) = many.send().await {
        assert_eq!(r.status(), 431);
    }
    let r = app.chat_with(user("still here"), &[key]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(fake.call_count(), 2);
}
