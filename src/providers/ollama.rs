//! Ollama's native chat API: `POST {base_url}/api/chat`. Sampling settings go into
//! `options`, JSON mode into `format`, images inline as base64; a streamed answer is
//! NDJSON (one JSON object a line, the last with `done: true` and the token counts).

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::wire::{self, Image, Part, ToolCalls};
use super::*;

pub struct Ollama {
    up: wire::Upstream,
}

impl Ollama {
    /// Ollama needs no key; one is sent as a bearer token for servers behind a proxy.
    pub fn new(cfg: ProviderConfig) -> Self {
        Self {
            up: wire::Upstream::new(cfg, "/api/chat", wire::Auth::Bearer, &[]),
        }
    }
}

#[async_trait]
impl Provider for Ollama {
    fn config(&self) -> &ProviderConfig {
        &self.up.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let request = to_request(body, &self.up.cfg.model, false)?;
        let id = wire::completion_id();
        self.up.complete(&request, |v| from_answer(&v, &id)).await
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let request = to_request(body, &self.up.cfg.model, true)?;
        let chunks = wire::Chunks::new(wire::completion_id(), self.up.cfg.model.clone());
        let lines = Lines::new(chunks);
        self.up.stream(&request, wire::Framing::Ndjson, lines).await
    }
}

// ---------------------------------------------------------------------------------------
// Request

fn to_request(body: &ChatBody, model: &str, stream: bool) -> Result<Value, ProviderError> {
    wire::one_choice(body, "ollama")?;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), messages(wire::messages(body)?)?);
    // Ollama streams unless told otherwise, so the flag is always sent.
    out.insert("stream".into(), json!(stream));
    let options = options(body);
    if !options.is_empty() {
        out.insert("options".into(), Value::Object(options));
    }
    if let Some(f) = format(body) {
        out.insert("format".into(), f);
    }
    // Ollama has no tool_choice; `none` is honoured by not offering the tools.
    let no_tools = body.get("tool_choice").and_then(Value::as_str) == Some("none");
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null() && !no_tools) {
        out.insert("tools".into(), tools.clone());
    }
    Ok(Value::Object(out))
}

fn options(body: &ChatBody) -> Map<String, Value> {
    let mut o = Map::new();
    wire::copy_keys(
        body,
        &mut o,
        &[
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
        ],
    );
    if let Some(n) = wire::max_tokens(body) {
        o.insert("num_predict".into(), json!(n));
    }
    if let Some(stop) = wire::stop_list(body) {
        o.insert("stop".into(), Value::Array(stop));
    }
    o
}

/// `response_format` → `format`: `"json"` for JSON mode, the schema itself for a schema.
fn format(body: &ChatBody) -> Option<Value> {
    let rf = body.get("response_format")?;
    match rf.get("type").and_then(Value::as_str)? {
        "json_object" => Some(json!("json")),
        "json_schema" => rf.get("json_schema")?.get("schema").cloned(),
        _ => None,
    }
}

fn messages(list: &[Value]) -> Result<Value, ProviderError> {
    let mut calls = ToolCalls::default();
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let msg = match wire::role(m) {
            "system" | "developer" => {
                json!({"role": "system", "content": wire::text_only(m.get("content"), &at)?})
            }
            "user" => user_message(m, &at)?,
            "assistant" => assistant_message(m, &at, &mut calls)?,
            "tool" => {
                let (_, name) = calls.result_of(m, &at)?;
                let text = wire::text_only(m.get("content"), &at)?;
                json!({"role": "tool", "content": text, "tool_name": name})
            }
            other => {
                return Err(ProviderError::Invalid(format!(
                    "{at}: role `{other}` cannot be sent to an ollama provider"
                )));
            }
        };
        out.push(msg);
    }
    Ok(Value::Array(out))
}

fn user_message(m: &Value, at: &str) -> Result<Value, ProviderError> {
    let mut text = String::new();
    let mut images = Vec::new();
    for (j, p) in wire::parts(m.get("content"), at)?.into_iter().enumerate() {
        match p {
            Part::Text(t) => text.push_str(t),
            Part::Image(Image::Inline { data, .. }) => images.push(json!(data)),
            Part::Image(Image::Url(_)) => {
                return Err(ProviderError::Invalid(format!(
                    "{at}.content[{j}]: an ollama provider takes images only inline as base64 \
                     `data:` URLs; it cannot fetch an image URL"
                )));
            }
        }
    }
    let mut msg = json!({"role": "user", "content": text});
    if !images.is_empty() {
        msg["images"] = Value::Array(images);
    }
    Ok(msg)
}

fn assistant_message(m: &Value, at: &str, calls: &mut ToolCalls) -> Result<Value, ProviderError> {
    let text = wire::text_only(m.get("content"), at)?;
    let mut msg = json!({"role": "assistant", "content": text});
    let tool_calls: Vec<Value> = calls
        .read(m, at)?
        .into_iter()
        .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
        .collect();
    if !tool_calls.is_empty() {
        msg["tool_calls"] = Value::Array(tool_calls);
    }
    Ok(msg)
}

// ---------------------------------------------------------------------------------------
// Response

/// Ollama says `stop` even when the model called tools; OpenAI says `tool_calls`.
fn finish_reason(done_reason: Option<&str>, called_tools: bool) -> &'static str {
    match done_reason {
        Some("length") => "length",
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

fn usage_of(v: &Value) -> Usage {
    Usage {
        prompt: v.get("prompt_eval_count").and_then(Value::as_i64),
        completion: v.get("eval_count").and_then(Value::as_i64),
    }
}

/// An `{"error": "..."}` object, answered with 200 or in the middle of a stream.
fn error_of(v: &Value) -> Option<ProviderError> {
    let e = v.get("error")?;
    let message = e
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| e.to_string());
    Some(ProviderError::Status {
        status: 500,
        message,
        retry_after: None,
        code: None,
        param: None,
    })
}

/// Ollama's tool calls carry no id (older versions) and arguments as an object.
fn tool_calls_of(message: &Value) -> Vec<(String, String, String)> {
    let list = message.get("tool_calls").and_then(Value::as_array);
    list.into_iter()
        .flatten()
        .map(|c| {
            let f = c.get("function").unwrap_or(c);
            let id = c
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(wire::call_id, str::to_string);
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let args = match f.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "{}".into(),
            };
            (id, name, args)
        })
        .collect()
}

fn from_answer(v: &Value, id: &str) -> Result<Completion, ProviderError> {
    if let Some(e) = error_of(v) {
        return Err(e);
    }
    let message = v
        .get("message")
        .ok_or_else(|| ProviderError::BadResponse("no `message` in the answer".into()))?;
    let text = message
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let calls: Vec<Value> = tool_calls_of(message)
        .into_iter()
        .map(|(id, name, args)| wire::tool_call(&id, &name, args))
        .collect();
    let finish = finish_reason(
        v.get("done_reason").and_then(Value::as_str),
        !calls.is_empty(),
    );
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
    Ok(wire::completion(
        id,
        model,
        text,
        calls,
        finish,
        usage_of(v),
    ))
}

/// NDJSON lines → OpenAI chunks.
struct Lines {
    chunks: wire::Chunks,
    tools: usize,
    done: bool,
}

impl Lines {
    fn new(chunks: wire::Chunks) -> Self {
        Self {
            chunks,
            tools: 0,
            done: false,
        }
    }
}

impl wire::Translate for Lines {
    fn event(&mut self, _: &str, line: &str) -> Result<Vec<Value>, ProviderError> {
        let v = wire::event_json(line)?;
        if let Some(e) = error_of(&v) {
            return Err(e);
        }
        let mut out = Vec::new();
        let message = v.get("message").unwrap_or(&Value::Null);
        self.chunks.text(
            &mut out,
            message.get("content").and_then(Value::as_str).unwrap_or(""),
        );
        for (id, name, args) in tool_calls_of(message) {
            let call = json!({"index": self.tools, "id": id, "type": "function",
                              "function": {"name": name, "arguments": args}});
            self.tools += 1;
            self.chunks.delta(&mut out, json!({"tool_calls": [call]}));
        }
        if v.get("done").and_then(Value::as_bool) == Some(true) {
            let reason =
                finish_reason(v.get("done_reason").and_then(Value::as_str), self.tools > 0);
            self.chunks.finish(&mut out, reason, usage_of(&v));
            self.done = true;
        }
        Ok(out)
    }

    fn finished(&self) -> bool {
        self.done
    }

    fn at_eof(&self) -> Option<ProviderError> {
        Some(ProviderError::BadResponse(
            "the stream ended before its final `done: true` line".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::wire::testing::{self, body};
    use super::*;

    #[test]
    fn request_matches_the_documented_shape() {
        let req = body(json!({
            "model": "ignored",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "what is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo"}}]},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_current_weather", "arguments": "{\"location\":\"Paris, FR\",\"format\":\"celsius\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"},
            ],
            "temperature": 0,
            "top_p": 0.9,
            "seed": 101,
            "max_tokens": 64,
            "stop": ["\n\n"],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"age": {"type": "integer"}}}}},
            "tools": [{"type": "function", "function": {"name": "get_current_weather", "parameters": {"type": "object"}}}],
            "logit_bias": {"1": 2},
        }));
        let got = to_request(&req, "llama3.2", false).unwrap();
        let want = json!({
            "model": "llama3.2",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is in this image?", "images": ["iVBORw0KGgo"]},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_current_weather",
                    "arguments": {"format": "celsius", "location": "Paris, FR"}}}]},
                {"role": "tool", "content": "22 degrees", "tool_name": "get_current_weather"},
            ],
            "stream": false,
            "options": {"temperature": 0, "top_p": 0.9, "seed": 101, "num_predict": 64, "stop": ["\n\n"]},
            "format": {"type": "object", "properties": {"age": {"type": "integer"}}},
            "tools": [{"type": "function", "function": {"name": "get_current_weather", "parameters": {"type": "object"}}}],
        });
        assert_eq!(got, want);
        let plain = body(
            json!({"messages": [{"role": "user", "content": "why is the sky blue?"}],
            "response_format": {"type": "json_object"}, "tools": [{"type": "function"}], "tool_choice": "none"}),
        );
        assert_eq!(
            to_request(&plain, "llama3.2", true).unwrap(),
            json!({"model": "llama3.2", "stream": true, "format": "json",
                   "messages": [{"role": "user", "content": "why is the sky blue?"}]})
        );
    }

    #[test]
    fn image_urls_and_stray_tool_results_are_invalid() {
        let url = body(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}));
        let err = to_request(&url, "llava", false).unwrap_err();
        assert!(
            matches!(&err, ProviderError::Invalid(m) if m.starts_with("messages[0].content[0]: ") && m.contains("base64")),
            "{err}"
        );
        let stray =
            body(json!({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "r"}]}));
        assert!(
            matches!(to_request(&stray, "m", false), Err(ProviderError::Invalid(m)) if m.contains("call_x"))
        );
        let two = body(json!({"messages": [{"role": "user", "content": "x"}], "n": 2}));
        assert!(
            matches!(to_request(&two, "m", false), Err(ProviderError::Invalid(m)) if m.contains("`n` = 2"))
        );
    }

    #[test]
    fn answers_become_completions() {
        let answer = json!({
            "model": "llama3.2", "created_at": "2023-12-12T14:13:43.416799Z",
            "message": {"role": "assistant", "content": "Hello! How are you today?"},
            "done": true, "done_reason": "stop", "total_duration": 5191566416u64, "load_duration": 2154458,
            "prompt_eval_count": 26, "prompt_eval_duration": 383809000, "eval_count": 298, "eval_duration": 4799921000u64,
        });
        let mut body = from_answer(&answer, "chatcmpl-1").unwrap().body();
        body.as_object_mut().unwrap().remove("created");
        assert_eq!(
            body,
            json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "llama3.2",
                "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Hello! How are you today?", "refusal": null}}],
                "usage": {"prompt_tokens": 26, "completion_tokens": 298, "total_tokens": 324}})
        );
        let tools = json!({
            "model": "llama3.2", "done": true, "done_reason": "stop", "prompt_eval_count": 122, "eval_count": 33,
            "message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_current_weather",
                "arguments": {"format": "celsius", "location": "Paris, FR"}}}]},
        });
        let body = from_answer(&tools, "chatcmpl-2").unwrap().body();
        let msg = &body["choices"][0]["message"];
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(msg["content"], Value::Null);
        assert_eq!(msg["tool_calls"][0]["type"], "function");
        assert!(
            msg["tool_calls"][0]["id"]
                .as_str()
                .unwrap()
                .starts_with("call_")
        );
        assert_eq!(
            msg["tool_calls"][0]["function"]["name"],
            "get_current_weather"
        );
        assert_eq!(
            msg["tool_calls"][0]["function"]["arguments"],
            "{\"format\":\"celsius\",\"location\":\"Paris, FR\"}"
        );
        let length = json!({"message": {"content": "abc"}, "done": true, "done_reason": "length"});
        assert_eq!(
            from_answer(&length, "x").unwrap().body()["choices"][0]["finish_reason"],
            "length"
        );
        assert!(matches!(
            from_answer(&json!({"error": "model 'x' not found"}), "x"),
            Err(ProviderError::Status { status: 500, .. })
        ));
    }

    fn lines() -> Lines {
        Lines::new(wire::Chunks::new("chatcmpl-s".into(), "llama3.2".into()))
    }

    #[tokio::test]
    async fn ndjson_stream_becomes_openai_chunks() {
        let events: &[(&str, &str)] = &[
            (
                "",
                r#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","message":{"role":"assistant","content":"The","images":null},"done":false}"#,
            ),
            (
                "",
                r#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","message":{"role":"assistant","content":" sky"},"done":false}"#,
            ),
            (
                "",
                r#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}"#,
            ),
        ];
        let got = testing::run_ok(events, lines()).await;
        let want = testing::text_chunks(
            "chatcmpl-s",
            "llama3.2",
            &["The", " sky"],
            "stop",
            json!({"prompt_tokens": 26, "completion_tokens": 282, "total_tokens": 308}),
        );
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn stream_tool_calls_errors_and_cuts() {
        let events: &[(&str, &str)] = &[
            (
                "",
                r#"{"model":"m","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":false}"#,
            ),
            (
                "",
                r#"{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":5,"eval_count":2}"#,
            ),
        ];
        let got = testing::run_ok(events, lines()).await;
        assert_eq!(
            got[1]["choices"][0]["delta"]["tool_calls"][0]["function"],
            json!({"name": "f", "arguments": "{\"a\":1}"})
        );
        assert_eq!(got[1]["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
        assert_eq!(got[2]["choices"][0]["finish_reason"], "tool_calls");
        let broken: &[(&str, &str)] = &[
            events[0],
            (
                "",
                r#"{"error":"an error was encountered while running the model"}"#,
            ),
        ];
        let got = testing::run(broken, lines()).await;
        assert!(
            matches!(got.last(), Some(Err(ProviderError::Status { status: 500, message, .. })) if message.contains("running the model"))
        );
        let cut = testing::run(&events[..1], lines()).await;
        assert!(matches!(
            cut.last(),
            Some(Err(ProviderError::BadResponse(_)))
        ));
    }
}
