//! Anthropic Messages API: `POST {base_url}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01`. The OpenAI request is rewritten into Anthropic's
//! shape (top-level `system`, alternating turns of content blocks, tools, `max_tokens`
//! always present) and the answer and its stream events are rewritten back.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::wire::{self, Image, Part, ToolCalls};
use super::*;

const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; the router's default is normally applied already.
const DEFAULT_MAX_TOKENS: u64 = 4096;

pub struct Anthropic {
    up: wire::Upstream,
}

impl Anthropic {
    pub fn new(cfg: ProviderConfig) -> Self {
        Self {
            up: wire::Upstream::new(
                cfg,
                "/v1/messages",
                wire::Auth::Header("x-api-key"),
                &[("anthropic-version", API_VERSION)],
            ),
        }
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn config(&self) -> &ProviderConfig {
        &self.up.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let request = to_request(body, &self.up.cfg.model, false)?;
        self.up.complete(&request, |v| from_message(&v)).await
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let request = to_request(body, &self.up.cfg.model, true)?;
        let events = Events::new(&self.up.cfg.model);
        self.up.stream(&request, wire::Framing::Sse, events).await
    }
}

// ---------------------------------------------------------------------------------------
// Request

fn to_request(body: &ChatBody, model: &str, stream: bool) -> Result<Value, ProviderError> {
    wire::one_choice(body, "anthropic")?;
    let (system, messages) = conversation(wire::messages(body)?)?;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert(
        "max_tokens".into(),
        json!(wire::max_tokens(body).unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    out.insert("messages".into(), messages);
    if let Some(stop) = wire::stop_list(body) {
        out.insert("stop_sequences".into(), Value::Array(stop));
    }
    wire::copy_keys(
        body,
        &mut out,
        &[("temperature", "temperature"), ("top_p", "top_p")],
    );
    if let Some(user) = body.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = tools(body)? {
        out.insert("tools".into(), tools);
        if let Some(choice) = tool_choice(body)? {
            out.insert("tool_choice".into(), choice);
        }
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// Alternating user/assistant turns of content blocks; consecutive messages of one role
/// (e.g. several tool results, or a tool result then the user's text) become one turn,
/// as the API requires.
#[derive(Default)]
struct Turns(Vec<(&'static str, Vec<Value>)>);

impl Turns {
    fn push(&mut self, role: &'static str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some((r, list)) if *r == role => list.extend(blocks),
            _ => self.0.push((role, blocks)),
        }
    }

    /// A turn that is one text block is sent as a plain string, the API's simple form.
    fn into_json(self) -> Value {
        let turns = self.0.into_iter().map(|(role, mut blocks)| {
            let single_text = blocks.len() == 1 && blocks[0]["type"] == "text";
            let content = if single_text {
                blocks.swap_remove(0)["text"].take()
            } else {
                Value::Array(blocks)
            };
            json!({"role": role, "content": content})
        });
        Value::Array(turns.collect())
    }
}

/// The system prompt pieces and the turns.
fn conversation(messages: &[Value]) -> Result<(Vec<String>, Value), ProviderError> {
    let mut system = Vec::new();
    let mut turns = Turns::default();
    let mut calls = ToolCalls::default();
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        match wire::role(m) {
            "system" | "developer" => system.push(wire::text_only(m.get("content"), &at)?),
            "user" => turns.push("user", user_blocks(m, &at)?),
            "assistant" => turns.push("assistant", assistant_blocks(m, &at, &mut calls)?),
            "tool" => {
                let (id, _) = calls.result_of(m, &at)?;
                let text = wire::text_only(m.get("content"), &at)?;
                let block = json!({"type": "tool_result", "tool_use_id": id, "content": text});
                turns.push("user", vec![block]);
            }
            other => {
                return Err(ProviderError::Invalid(format!(
                    "{at}: role `{other}` cannot be sent to an anthropic provider"
                )));
            }
        }
    }
    Ok((system, turns.into_json()))
}

fn text_block(text: &str) -> Option<Value> {
    // The API refuses empty text blocks.
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

fn user_blocks(m: &Value, at: &str) -> Result<Vec<Value>, ProviderError> {
    let blocks = wire::parts(m.get("content"), at)?
        .into_iter()
        .filter_map(|p| match p {
            Part::Text(t) => text_block(t),
            Part::Image(Image::Inline { media_type, data }) => Some(json!({
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data},
            })),
            Part::Image(Image::Url(url)) => Some(json!({
                "type": "image",
                "source": {"type": "url", "url": url},
            })),
        });
    Ok(blocks.collect())
}

fn assistant_blocks(
    m: &Value,
    at: &str,
    calls: &mut ToolCalls,
) -> Result<Vec<Value>, ProviderError> {
    let text = wire::text_only(m.get("content"), at)?;
    let mut blocks: Vec<Value> = text_block(&text).into_iter().collect();
    for c in calls.read(m, at)? {
        blocks.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}));
    }
    Ok(blocks)
}

fn tools(body: &ChatBody) -> Result<Option<Value>, ProviderError> {
    let Some(list) = body.get("tools").and_then(Value::as_array) else {
        return Ok(None);
    };
    let tools = list.iter().enumerate().map(|(i, t)| {
        let f = t
            .get("function")
            .filter(|_| t.get("type").and_then(Value::as_str) == Some("function"))
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "tools[{i}]: only function tools can be sent to an anthropic provider"
                ))
            })?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
            ProviderError::Invalid(format!("tools[{i}]: function.name is missing"))
        })?;
        let mut tool = json!({
            "name": name,
            "input_schema": f.get("parameters").cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        });
        if let Some(d) = f.get("description") {
            tool["description"] = d.clone();
        }
        Ok(tool)
    });
    let tools = tools.collect::<Result<Vec<_>, ProviderError>>()?;
    Ok((!tools.is_empty()).then_some(Value::Array(tools)))
}

/// OpenAI's `tool_choice` (and `parallel_tool_calls: false`) in Anthropic's terms.
fn tool_choice(body: &ChatBody) -> Result<Option<Value>, ProviderError> {
    let mut choice = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            other => {
                return Err(ProviderError::Invalid(format!(
                    "tool_choice `{other}` is not one of auto, none, required"
                )));
            }
        }),
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| ProviderError::Invalid("tool_choice must name a function".into()))?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if body.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = json!(true);
        }
    }
    Ok(choice)
}

// ---------------------------------------------------------------------------------------
// Response

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and whatever comes next.
        _ => "stop",
    }
}

/// Anthropic's `usage` → prompt/completion. Cached prompt tokens are prompt tokens too
/// (OpenAI counts them in `prompt_tokens`).
fn usage_of(u: Option<&Value>) -> Usage {
    let get = |k: &str| u.and_then(|u| u.get(k)).and_then(Value::as_i64);
    let prompt = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .filter_map(|k| get(k))
    .reduce(|a, b| a + b);
    Usage {
        prompt,
        completion: get("output_tokens"),
    }
}

fn from_message(v: &Value) -> Result<Completion, ProviderError> {
    let blocks = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::BadResponse("no `content` in the answer".into()))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("");
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                tool_calls.push(wire::tool_call(s("id"), s("name"), input.to_string()));
            }
            // thinking and other block types have no OpenAI counterpart.
            _ => {}
        }
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    Ok(wire::completion(
        s("id").unwrap_or_default(),
        s("model").unwrap_or_default(),
        text,
        tool_calls,
        finish_reason(s("stop_reason")),
        usage_of(v.get("usage")),
    ))
}

/// An `error` event in the stream, with a status that lets the worker's policy treat it
/// like the same error answered as HTTP (overloaded → 529, retryable).
fn stream_error(v: &Value) -> ProviderError {
    let e = v.get("error").unwrap_or(v);
    let kind = e.get("type").and_then(Value::as_str).unwrap_or("");
    let status = match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        _ => 500,
    };
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("error event in the stream");
    ProviderError::Status {
        status,
        message: message.to_string(),
        retry_after: None,
        code: None,
        param: None,
    }
}

/// Anthropic stream events → OpenAI chunks.
struct Events {
    chunks: wire::Chunks,
    usage: Usage,
    /// Content block index → OpenAI tool call index.
    tools: HashMap<u64, usize>,
    finish: Option<&'static str>,
    done: bool,
}

impl Events {
    fn new(model: &str) -> Self {
        Self {
            chunks: wire::Chunks::new(wire::completion_id(), model.to_string()),
            usage: Usage::default(),
            tools: HashMap::new(),
            finish: None,
            done: false,
        }
    }

    fn message_start(&mut self, v: &Value) {
        let m = &v["message"];
        if let Some(id) = m["id"].as_str() {
            self.chunks.id = id.to_string();
        }
        if let Some(model) = m["model"].as_str() {
            self.chunks.model = model.to_string();
        }
        self.usage = usage_of(m.get("usage"));
    }

    fn block_start(&mut self, v: &Value, out: &mut Vec<Value>) {
        let b = &v["content_block"];
        match b["type"].as_str() {
            Some("text") => self.chunks.text(out, b["text"].as_str().unwrap_or("")),
            Some("tool_use") => {
                let index = self.tools.len();
                self.tools.insert(v["index"].as_u64().unwrap_or(0), index);
                let call = json!({
                    "index": index, "id": b["id"], "type": "function",
                    "function": {"name": b["name"], "arguments": ""},
                });
                self.chunks.delta(out, json!({"tool_calls": [call]}));
            }
            _ => {}
        }
    }

    fn block_delta(&mut self, v: &Value, out: &mut Vec<Value>) -> Result<(), ProviderError> {
        let d = &v["delta"];
        match d["type"].as_str() {
            Some("text_delta") => self.chunks.text(out, d["text"].as_str().unwrap_or("")),
            Some("input_json_delta") => {
                let block = v["index"].as_u64().unwrap_or(0);
                let index = *self.tools.get(&block).ok_or_else(|| {
                    ProviderError::BadResponse(format!(
                        "input_json_delta for content block {block}, which is not a tool_use block"
                    ))
                })?;
                let args = d["partial_json"].as_str().unwrap_or("");
                let call = json!({"index": index, "function": {"arguments": args}});
                self.chunks.delta(out, json!({"tool_calls": [call]}));
            }
            // thinking_delta, signature_delta, citations: no OpenAI counterpart.
            _ => {}
        }
        Ok(())
    }

    fn message_delta(&mut self, v: &Value) {
        if let Some(r) = v["delta"]["stop_reason"].as_str() {
            self.finish = Some(finish_reason(Some(r)));
        }
        // `output_tokens` here is the running total; input counts may be restated.
        let u = usage_of(v.get("usage"));
        self.usage.completion = u.completion.or(self.usage.completion);
        self.usage.prompt = u.prompt.or(self.usage.prompt);
    }
}

impl wire::Translate for Events {
    fn event(&mut self, name: &str, data: &str) -> Result<Vec<Value>, ProviderError> {
        let v = wire::event_json(data)?;
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(name);
        let mut out = Vec::new();
        match kind {
            "message_start" => self.message_start(&v),
            "content_block_start" => self.block_start(&v, &mut out),
            "content_block_delta" => self.block_delta(&v, &mut out)?,
            "message_delta" => self.message_delta(&v),
            "message_stop" => {
                let reason = self.finish.unwrap_or("stop");
                self.chunks.finish(&mut out, reason, self.usage);
                self.done = true;
            }
            "error" => return Err(stream_error(&v)),
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(out)
    }

    fn finished(&self) -> bool {
        self.done
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
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": "Hello, Claude"},
                {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_01", "content": "15 degrees"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            ],
            "max_tokens": 1024,
            "stop": "END",
            "temperature": 0.5,
            "top_p": 0.9,
            "user": "u-1",
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "frequency_penalty": 0.1,
        }));
        let got = to_request(&req, "claude-sonnet-4-5", false).unwrap();
        let want = json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are terse.\n\nAnswer in English.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello, Claude"},
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"location": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": "15 degrees"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                ]},
            ],
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "metadata": {"user_id": "u-1"},
            "tools": [{"name": "get_weather", "description": "Get the weather",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        });
        assert_eq!(got, want);
    }

    #[test]
    fn simple_request_defaults_max_tokens_and_streams() {
        let req = body(json!({"messages": [{"role": "user", "content": "Hello, world"}]}));
        assert_eq!(
            to_request(&req, "claude-x", true).unwrap(),
            json!({"model": "claude-x", "max_tokens": 4096, "stream": true,
                   "messages": [{"role": "user", "content": "Hello, world"}]})
        );
        let req = body(
            json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7,
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "f"}}}),
        );
        let got = to_request(&req, "c", false).unwrap();
        assert_eq!(got["max_tokens"], 7);
        assert_eq!(
            got["tools"][0]["input_schema"],
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(got["tool_choice"], json!({"type": "tool", "name": "f"}));
    }

    #[test]
    fn requests_it_cannot_express_are_invalid() {
        let stray = body(json!({"messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "tool_call_id": "toolu_404", "content": "r"}]}));
        let err = to_request(&stray, "c", false).unwrap_err();
        assert!(
            matches!(&err, ProviderError::Invalid(m) if m.contains("toolu_404")),
            "{err}"
        );
        let n = body(json!({"messages": [{"role": "user", "content": "x"}], "n": 2}));
        assert!(matches!(
            to_request(&n, "c", false),
            Err(ProviderError::Invalid(_))
        ));
        let builtin = body(
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]}),
        );
        assert!(matches!(
            to_request(&builtin, "c", false),
            Err(ProviderError::Invalid(_))
        ));
    }

    #[test]
    fn answer_with_text_and_tool_use() {
        let answer = json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [
                {"type": "text", "text": "I'll check the weather."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 472, "output_tokens": 89, "cache_read_input_tokens": 8},
        });
        let c = from_message(&answer).unwrap();
        let mut b = c.body();
        b.as_object_mut().unwrap().remove("created");
        assert_eq!(
            b,
            json!({
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "object": "chat.completion", "model": "claude-sonnet-4-5",
                "choices": [{"index": 0, "logprobs": null, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": "I'll check the weather.", "refusal": null,
                    "tool_calls": [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\"}"}}]}}],
                "usage": {"prompt_tokens": 480, "completion_tokens": 89, "total_tokens": 569},
            })
        );
        assert_eq!(
            c.usage,
            Usage {
                prompt: Some(480),
                completion: Some(89)
            }
        );
        for (r, want) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
        ] {
            assert_eq!(finish_reason(Some(r)), want);
        }
        assert!(matches!(
            from_message(&json!({"type": "message"})),
            Err(ProviderError::BadResponse(_))
        ));
    }

    /// The documented text stream, as Anthropic sends it.
    const TEXT_STREAM: &[(&str, &str)] = &[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ("ping", r#"{"type": "ping"}"#),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];

    #[tokio::test]
    async fn text_stream_becomes_openai_chunks() {
        let got = testing::run_ok(TEXT_STREAM, Events::new("cfg-model")).await;
        let want = testing::text_chunks(
            "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "claude-sonnet-4-5",
            &["Hello", "!"],
            "stop",
            json!({"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40}),
        );
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn tool_stream_becomes_tool_call_deltas() {
        let events: &[(&str, &str)] = &[
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_t","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ncisco, CA\"}"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":1}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ];
        let got = testing::run_ok(events, Events::new("m")).await;
        let deltas: Vec<&Value> = got.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas[0],
            &json!({"role": "assistant", "content": "", "refusal": null})
        );
        assert_eq!(deltas[1], &json!({"content": "Okay"}));
        assert_eq!(
            deltas[2],
            &json!({"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            deltas[4],
            &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\": \"San Fra"}}]})
        );
        assert_eq!(got[6]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            got[7]["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 89, "total_tokens": 99})
        );
        assert_eq!(got.len(), 8);
        let mut asm = super::super::assemble::Assembler::default();
        got.iter().for_each(|c| asm.push(c));
        assert_eq!(
            asm.finish()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"location\": \"San Francisco, CA\"}"
        );
    }

    #[tokio::test]
    async fn error_events_and_cut_streams_are_errors() {
        let overloaded: &[(&str, &str)] = &[
            TEXT_STREAM[0],
            (
                "error",
                r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
            ),
        ];
        let got = testing::run(overloaded, Events::new("m")).await;
        assert_eq!(
            got,
            vec![Err(ProviderError::Status {
                status: 529,
                message: "Overloaded".into(),
                retry_after: None,
                code: None,
                param: None,
            })],
            "nothing reached the client before the error, so it can still be retried"
        );
        let got = testing::run(&TEXT_STREAM[..4], Events::new("m")).await;
        assert_eq!(got.len(), 3);
        assert!(matches!(got[2], Err(ProviderError::BadResponse(_))));
        let garbage: &[(&str, &str)] = &[
            TEXT_STREAM[0],
            TEXT_STREAM[3],
            ("content_block_delta", "{not json"),
        ];
        let got = testing::run(garbage, Events::new("m")).await;
        assert!(matches!(
            got.last(),
            Some(Err(ProviderError::BadResponse(_)))
        ));
    }
}
