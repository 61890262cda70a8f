//! Every provider type through the gateway, plain (non-streaming): the exact upstream
//! requests, one OpenAI shape for every answer, upstream errors and bad input.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::fake_anthropic::error_body;
use crate::support::*;

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

#[tokio::test]
async fn anthropic_gets_the_documented_request_and_headers() {
    let f = Fleet::start().await;
    let resp = f
        .chat(
            "AN",
            json!({
                "model": "gpt-test",
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "15C, sunny"},
                    {"role": "user", "content": [{"type": "text", "text": "And this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
                ],
                "tools": [weather_tool()],
                "tool_choice": "auto",
                "stop": ["###"],
                "max_tokens": 100,
            }),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-orch-provider"], "an");
    let body: Value = resp.json().await.unwrap();
    let call = &f.anthropic.calls()[0];
    assert_eq!(
        call.body,
        json!({
            "model": "m-an",
            "max_tokens": 100,
            "system": "You are terse.",
            "messages": [
                {"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "15C, sunny"},
                    {"type": "text", "text": "And this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]},
            ],
            "stop_sequences": ["###"],
            "temperature": 0.2,
            "tools": [{"name": "get_weather", "description": "Weather of a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
            "tool_choice": {"type": "auto"},
        })
    );
    assert_eq!(call.headers["x-api-key"].to_str().unwrap(), upstream_key());
    assert_eq!(call.headers["anthropic-version"], "2023-06-01");
    assert_eq!(call.headers["content-type"], "application/json");
    assert!(call.headers.get("authorization").is_none());
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m-an");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "fake:And this?", "refusal": null})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
}

#[tokio::test]
async fn ollama_gets_the_documented_request() {
    let f = Fleet::start().await;
    let resp = f
        .chat(
            "OL",
            json!({
                "model": "gpt-test",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Describe"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
                ],
                "temperature": 0.7,
                "top_p": 0.5,
                "seed": 7,
                "max_completion_tokens": 50,
                "stop": "END",
                "response_format": {"type": "json_object"},
            }),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let job = f.job(&resp).await;
    let body: Value = resp.json().await.unwrap();
    let call = &f.ollama.calls()[0];
    assert_eq!(
        call.body,
        json!({
            "model": "m-ol",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Describe", "images": ["iVBORw0KGgo="]},
            ],
            "stream": false,
            "options": {"temperature": 0.7, "top_p": 0.5, "seed": 7, "num_predict": 50, "stop": ["END"]},
            "format": "json",
        })
    );
    assert!(
        call.headers.get("authorization").is_none(),
        "no auth_env, no key"
    );
    assert_eq!(body["choices"][0]["message"]["content"], "fake:Describe");
    assert_eq!(body["usage"]["total_tokens"], 10);
    assert_eq!(job["attempts"][0]["model"], "m-ol");
    assert_eq!(job["result"]["usage"]["total_tokens"], 10);
}

#[tokio::test]
async fn plain_answers_have_one_shape_for_every_provider() {
    let f = Fleet::start().await;
    let mut shapes = Vec::new();
    for (route, _) in FLEET_ROUTES {
        let resp = f.chat(route, user("hi there")).await;
        assert_eq!(resp.status(), 200, "{route}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .split(':')
                .nth(1),
            Some("hi there")
        );
        shapes.push((route, shape(&body)));
    }
    for (route, s) in &shapes[1..] {
        assert_eq!(s, &shapes[0].1, "{route} differs from OA");
    }
}

#[tokio::test]
async fn tool_calls_have_one_shape_for_every_provider() {
    let f = Fleet::start().await;
    let req = json!({"model": "x", "messages": [{"role": "user", "content": "weather?"}], "tools": [weather_tool()]});
    let mut plain = Vec::new();
    let mut streamed = Vec::new();
    for route in ["OA", "AN", "OL"] {
        let fake = f.fake(route).unwrap();
        fake.script([
            Reply::Tool("get_weather".into(), json!({"city": "Paris"})),
            Reply::Tool("get_weather".into(), json!({"city": "Paris"})),
        ]);
        let body: Value = f.chat(route, req.clone()).await.json().await.unwrap();
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather", "{route}: {body}");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}), "{route}");
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{route}");
        plain.push((route, shape(&body)));

        let mut s = req.clone();
        s["stream"] = json!(true);
        let sse = Sse::read(f.chat(route, s).await).await;
        assert!(sse.ends_with_done(), "{route}");
        // What a client assembles from the deltas is the same everywhere.
        let mut asm = llm_orch::providers::assemble::Assembler::default();
        sse.json().iter().for_each(|c| asm.push(c));
        let mut done = asm.finish();
        done["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = json!(
            serde_json::from_str::<Value>(
                done["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap()
            )
            .unwrap()
        );
        streamed.push((route, shape(&done)));
    }
    for list in [&plain, &streamed] {
        for (route, s) in &list[1..] {
            assert_eq!(s, &list[0].1, "{route} differs from OA");
        }
    }
    assert_eq!(
        streamed[0].1["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        json!({"city": "Paris"})
    );
}

#[tokio::test]
async fn upstream_errors_keep_status_and_message_without_the_key() {
    let f = Fleet::start().await;
    // 529 overloaded is retryable (≥ 500): with max_retries = 0 the one provider fails with 502...
    f.anthropic.script([Reply::status_body(
        529,
        error_body("overloaded_error", "Overloaded"),
    )]);
    let resp = f.chat("AN", user("x")).await;
    assert_eq!(resp.status(), 502);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "provider_server_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("529: Overloaded"),
        "{err}"
    );
    // ...a 4xx is returned with its status and the upstream's words, the key redacted.
    let key = upstream_key();
    f.anthropic.script([Reply::status_body(
        401,
        error_body("authentication_error", &format!("invalid x-api-key {key}")),
    )]);
    let resp = f.chat("AN", user("x")).await;
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "provider_error");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("invalid x-api-key [redacted]") && !msg.contains(&key),
        "{msg}"
    );
    let job = f
        .app
        .wait_job(
            err["error"]["job_id"].as_str().unwrap(),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        !job.to_string().contains(&key),
        "the job record holds no key: {job}"
    );
    // Ollama's `{"error": "..."}` keeps its message too.
    f.ollama.script([Reply::status_body(
        404,
        json!({"error": "model \"m-ol\" not found, try pulling it first"}),
    )]);
    let resp = f.chat("OL", user("x")).await;
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("try pulling it first"),
        "{err}"
    );
}

#[tokio::test]
async fn anthropic_overloaded_is_retried() {
    let fake = Fake::anthropic().await;
    let app = spawn_app(Options::new(
        provider(
            "an",
            "anthropic",
            &fake.base_url(),
            "max_retries = 2\nrpm = 1000",
        ),
        router_yaml(&["an"], ""),
    ))
    .await;
    fake.script([Reply::status_body(
        529,
        error_body("overloaded_error", "Overloaded"),
    )]);
    let resp = app.chat(user("again")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.call_count(), 2);
    let id = req_id(&resp);
    let job = app.wait_job(&id, Duration::from_secs(5)).await;
    assert_eq!(job["attempts"][0]["status_code"], 529);
    assert_eq!(job["attempts"][0]["outcome"], "retry");
    assert_eq!(job["attempts"][1]["outcome"], "ok");
}

#[tokio::test]
async fn requests_a_provider_cannot_express_are_400s_naming_the_problem() {
    let f = Fleet::start().await;
    let https_image = json!({"model": "x", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]});
    let stray_result = json!({"model": "x", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_404", "content": "42"}]});
    for (route, body, needle) in [
        ("OL", &https_image, "messages[0].content[1]"),
        ("AN", &stray_result, "call_404"),
        ("OL", &stray_result, "call_404"),
    ] {
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let resp = f.chat(route, b).await;
            assert_eq!(resp.status(), 400, "{route} stream={stream}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["type"], "invalid_request_error");
            let msg = err["error"]["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{route}: {msg}");
        }
    }
    assert_eq!(
        f.ollama.call_count() + f.anthropic.call_count(),
        0,
        "nothing was sent upstream"
    );
}

#[tokio::test]
async fn openai_compatible_servers_work_by_base_url_alone() {
    // Groq serves under /openai/v1, vLLM and OpenRouter under /v1 and /api/v1.
    let groq = Fake::openai_at("/openai/v1").await;
    let router = Fake::openai_at("/api/v1").await;
    let app = spawn_app(Options::new(
        [
            provider(
                "groq",
                "openai",
                &groq.base_url(),
                &format!("auth_env = \"{KEY_ENV}\""),
            ),
            provider("openrouter", "openai", &router.base_url(), ""),
        ]
        .concat(),
        router_yaml(&["groq"], "  OR:\n    primary: openrouter\n"),
    ))
    .await;
    let body = json!({"model": "x", "messages": [{"role": "user", "content": "hi"}],
        "reasoning_effort": "low", "provider": {"order": ["a"]}, "stream_options": null});
    let resp = app.chat(body.clone()).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["usage"]["total_tokens"], 10);
    assert_eq!(
        answer["system_fingerprint"], "fp_fake",
        "upstream fields pass back untouched"
    );
    let call = &groq.calls()[0];
    assert_eq!(
        call.headers["authorization"].to_str().unwrap(),
        format!("Bearer {}", upstream_key())
    );
    assert_eq!(call.body["reasoning_effort"], "low");
    assert_eq!(call.body["provider"], json!({"order": ["a"]}));
    assert_eq!(call.body["model"], "m-groq");
    let mut s = body.clone();
    s["stream"] = json!(true);
    let sse = Sse::read(app.chat_with(s, &[("x-orch-task-kind", "OR")]).await).await;
    assert_eq!(sse.text(), "fake:hi");
    assert!(sse.ends_with_done());
    assert_eq!(
        router.calls()[0].body["stream_options"],
        json!({"include_usage": true})
    );
}
