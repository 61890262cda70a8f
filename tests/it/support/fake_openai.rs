//! The OpenAI Chat Completions wire format for `Fake`: a `chat.completion`, or SSE
//! `data: {chunk}` frames ending with `data: [DONE]`.

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::fake::{Answer, Dialect, Fake, words};

/// An OpenAI-compatible fake (`FakeOpenAi::start()`).
pub type FakeOpenAi = Fake;

/// Serves `{prefix}/chat/completions`; OpenAI's own prefix is `/v1`, Groq's `/openai/v1`.
pub struct OpenAiWire {
    pub prefix: String,
}

impl Fake {
    pub async fn start() -> Self {
        Fake::openai_at("/v1").await
    }

    /// An OpenAI-compatible server under another path, e.g. Groq's `/openai/v1`.
    pub async fn openai_at(prefix: &str) -> Self {
        Fake::with(OpenAiWire {
            prefix: prefix.into(),
        })
        .await
    }
}

const USAGE: fn() -> Value =
    || json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10});

fn tool_call(name: &str, args: &Value) -> Value {
    json!({"id": "call_fake_1", "type": "function", "function": {"name": name, "arguments": args.to_string()}})
}

impl Dialect for OpenAiWire {
    fn path(&self) -> String {
        format!("{}/chat/completions", self.prefix)
    }

    fn base_url(&self, addr: SocketAddr) -> String {
        format!("http://{addr}{}", self.prefix)
    }

    fn streams(&self, body: &Value) -> bool {
        body["stream"] == true
    }

    fn complete(&self, model: &str, answer: &Answer<'_>) -> Value {
        let (message, finish) = match answer {
            Answer::Text(t) => (
                json!({"role": "assistant", "content": t, "refusal": null}),
                "stop",
            ),
            Answer::Tool(name, args) => (
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [tool_call(name, args)]}),
                "tool_calls",
            ),
        };
        json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": USAGE(),
            "system_fingerprint": "fp_fake",
        })
    }

    fn frames(&self, model: &str, answer: &Answer<'_>) -> Vec<String> {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        )];
        let finish = match answer {
            Answer::Text(t) => {
                for w in words(t) {
                    events.push(chunk(json!({"content": w}), Value::Null));
                }
                "stop"
            }
            Answer::Tool(name, args) => {
                let mut call = tool_call(name, args);
                call["index"] = json!(0);
                events.push(chunk(json!({"tool_calls": [call]}), Value::Null));
                "tool_calls"
            }
        };
        events.push(chunk(json!({}), json!(finish)));
        events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
                           "model": model, "choices": [], "usage": USAGE()}));
        let mut frames: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        frames.push("data: [DONE]\n\n".into());
        frames
    }

    fn error_frame(&self) -> String {
        let e = json!({"error": {"message": "fake upstream failed mid-stream", "type": "server_error"}});
        format!("data: {e}\n\n")
    }

    fn stream_type(&self) -> &'static str {
        "text/event-stream"
    }
}
