//! The Anthropic Messages wire format for `Fake`, as the API documents it: a `message`
//! with content blocks, or SSE events (`message_start`, `content_block_*`, `ping`,
//! `message_delta`, `message_stop`; `error` in-band).

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::fake::{Answer, Dialect, Fake, words};

pub struct AnthropicWire;

impl Fake {
    pub async fn anthropic() -> Self {
        Fake::with(AnthropicWire).await
    }
}

/// An Anthropic error body, e.g. `overloaded_error` with 529.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

impl Dialect for AnthropicWire {
    fn path(&self) -> String {
        "/v1/messages".into()
    }

    fn base_url(&self, addr: SocketAddr) -> String {
        format!("http://{addr}")
    }

    fn streams(&self, body: &Value) -> bool {
        body["stream"] == true
    }

    fn complete(&self, model: &str, answer: &Answer<'_>) -> Value {
        let (content, stop) = match answer {
            Answer::Text(t) => (json!([{"type": "text", "text": t}]), "end_turn"),
            Answer::Tool(name, args) => (
                json!([{"type": "tool_use", "id": "toolu_fake_1", "name": name, "input": args}]),
                "tool_use",
            ),
        };
        json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": 7, "output_tokens": 3},
        })
    }

    fn frames(&self, model: &str, answer: &Answer<'_>) -> Vec<String> {
        let mut f = vec![event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                "content": [], "model": model, "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 7, "output_tokens": 1}}}),
        )];
        let stop = match answer {
            Answer::Text(t) => {
                f.push(event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
                f.push(event("ping", json!({"type": "ping"})));
                for w in words(t) {
                    f.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})));
                }
                "end_turn"
            }
            Answer::Tool(name, args) => {
                f.push(event("content_block_start", json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "tool_use", "id": "toolu_fake_1", "name": name, "input": {}}})));
                // The input arrives as partial JSON in two pieces.
                let text = args.to_string();
                let (a, b) = text.split_at(text.len() / 2);
                for piece in [a, b] {
                    f.push(event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}),
                    ));
                }
                "tool_use"
            }
        };
        f.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        f.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 3}})));
        f.push(event("message_stop", json!({"type": "message_stop"})));
        f
    }

    fn error_frame(&self) -> String {
        event("error", error_body("overloaded_error", "Overloaded"))
    }

    fn stream_type(&self) -> &'static str {
        "text/event-stream"
    }
}
