//! Ollama's `/api/chat` wire format for `Fake`, as its API docs show it: one answer
//! object, or NDJSON lines (`done: false` pieces, then `done: true` with the counts).
//! Ollama streams unless the request says `stream: false`.

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::fake::{Answer, Dialect, Fake, words};

pub struct OllamaWire;

impl Fake {
    pub async fn ollama() -> Self {
        Fake::with(OllamaWire).await
    }
}

fn line(v: Value) -> String {
    format!("{v}\n")
}

fn message(answer: &Answer<'_>) -> Value {
    match answer {
        Answer::Text(t) => json!({"role": "assistant", "content": t}),
        Answer::Tool(name, args) => json!({"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": name, "arguments": args}}]}),
    }
}

fn last(model: &str, msg: Value) -> Value {
    json!({
        "model": model, "created_at": "2023-12-12T14:13:43.416799Z", "message": msg,
        "done_reason": "stop", "done": true, "total_duration": 5191566416u64, "load_duration": 2154458,
        "prompt_eval_count": 7, "prompt_eval_duration": 383809000, "eval_count": 3, "eval_duration": 4799921000u64,
    })
}

impl Dialect for OllamaWire {
    fn path(&self) -> String {
        "/api/chat".into()
    }

    fn base_url(&self, addr: SocketAddr) -> String {
        format!("http://{addr}")
    }

    fn streams(&self, body: &Value) -> bool {
        body["stream"] != false
    }

    fn complete(&self, model: &str, answer: &Answer<'_>) -> Value {
        last(model, message(answer))
    }

    fn frames(&self, model: &str, answer: &Answer<'_>) -> Vec<String> {
        let piece = |msg: Value| {
            line(
                json!({"model": model, "created_at": "2023-08-04T08:52:19.385406455-07:00", "message": msg, "done": false}),
            )
        };
        let mut f: Vec<String> = match answer {
            Answer::Text(t) => words(t)
                .into_iter()
                .map(|w| piece(json!({"role": "assistant", "content": w})))
                .collect(),
            Answer::Tool(..) => vec![piece(message(answer))],
        };
        f.push(line(last(
            model,
            json!({"role": "assistant", "content": ""}),
        )));
        f
    }

    fn error_frame(&self) -> String {
        line(json!({"error": "an error was encountered while running the model"}))
    }

    fn stream_type(&self) -> &'static str {
        "application/x-ndjson"
    }
}
