//! Folds a stream of `chat.completion.chunk`s into the `chat.completion` it amounts to,
//! so a streamed job's row holds the same result (text, tool calls, usage) as a plain one.

use serde_json::{Map, Value, json};

use super::Usage;

/// Past this, a choice or tool-call index is not an answer but a broken (or hostile) upstream.
const MAX_INDEX: usize = 128;

#[derive(Debug, Default)]
pub struct Assembler {
    id: Option<String>,
    model: Option<String>,
    created: Option<i64>,
    choices: Vec<ChoiceAcc>,
    usage: Option<Value>,
    /// Chunks received so far.
    pub chunks: usize,
}

#[derive(Debug, Default, Clone)]
struct ChoiceAcc {
    role: Option<String>,
    content: String,
    has_content: bool,
    tool_calls: Vec<Map<String, Value>>,
    finish_reason: Option<Value>,
}

impl Assembler {
    /// Refuses a chunk whose choice or tool-call index no real answer has: the index
    /// comes from the upstream and sizes our buffers.
    pub fn check(chunk: &Value) -> Result<(), super::ProviderError> {
        let choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for c in choices {
            let tool_indices = c
                .get("delta")
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("index"));
            for i in c.get("index").into_iter().chain(tool_indices) {
                if i.as_u64().is_none_or(|i| i >= MAX_INDEX as u64) {
                    return Err(super::ProviderError::BadResponse(format!(
                        "stream chunk with index {i}"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn push(&mut self, chunk: &Value) {
        self.chunks += 1;
        if self.id.is_none() {
            self.id = chunk.get("id").and_then(Value::as_str).map(str::to_string);
        }
        if self.model.is_none() {
            self.model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if self.created.is_none() {
            self.created = chunk.get("created").and_then(Value::as_i64);
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        for c in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if idx >= MAX_INDEX {
                continue;
            }
            if self.choices.len() <= idx {
                self.choices.resize(idx + 1, ChoiceAcc::default());
            }
            let acc = &mut self.choices[idx];
            if let Some(fr) = c.get("finish_reason").filter(|f| !f.is_null()) {
                acc.finish_reason = Some(fr.clone());
            }
            let Some(delta) = c.get("delta") else {
                continue;
            };
            if let Some(r) = delta.get("role").and_then(Value::as_str) {
                acc.role = Some(r.to_string());
            }
            if let Some(t) = delta.get("content").and_then(Value::as_str) {
                acc.content.push_str(t);
                acc.has_content = true;
            }
            for tc in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = tc
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(acc.tool_calls.len() as u64) as usize;
                if i >= MAX_INDEX {
                    continue;
                }
                if acc.tool_calls.len() <= i {
                    acc.tool_calls.resize(i + 1, Map::new());
                }
                merge_tool_call(&mut acc.tool_calls[i], tc);
            }
        }
    }

    pub fn usage(&self) -> Usage {
        Usage::from_openai(self.usage.as_ref())
    }

    /// The `chat.completion` the chunks amount to.
    pub fn finish(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message = json!({
                    "role": c.role.clone().unwrap_or_else(|| "assistant".into()),
                    "content": if c.has_content || c.tool_calls.is_empty() { Value::String(c.content.clone()) } else { Value::Null },
                });
                if !c.tool_calls.is_empty() {
                    message["tool_calls"] = Value::Array(c.tool_calls.iter().cloned().map(Value::Object).collect());
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": c.finish_reason.clone().unwrap_or(Value::Null),
                })
            })
            .collect();
        let mut out = json!({
            "id": self.id.clone().unwrap_or_default(),
            "object": "chat.completion",
            "created": self.created.unwrap_or_else(|| chrono::Utc::now().timestamp()),
            "model": self.model.clone().unwrap_or_default(),
            "choices": choices,
        });
        if let Some(u) = &self.usage {
            out["usage"] = u.clone();
        }
        out
    }
}

fn merge_tool_call(acc: &mut Map<String, Value>, delta: &Value) {
    for key in ["id", "type"] {
        if let Some(v) = delta.get(key).filter(|v| !v.is_null()) {
            acc.insert(key.into(), v.clone());
        }
    }
    let Some(f) = delta.get("function") else {
        return;
    };
    let func = acc
        .entry("function")
        .or_insert_with(|| json!({"name": "", "arguments": ""}));
    if let Some(name) = f.get("name").and_then(Value::as_str) {
        func["name"] = Value::String(name.to_string());
    }
    if let Some(args) = f.get("arguments").and_then(Value::as_str) {
        let prev = func["arguments"].as_str().unwrap_or("").to_string();
        func["arguments"] = Value::String(prev + args);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_indices_are_refused_not_allocated() {
        assert!(
            Assembler::check(&json!({"choices":[{"index":0,"delta":{"content":"x"}}]})).is_ok()
        );
        assert!(Assembler::check(&json!({"choices":[{"index":u64::MAX,"delta":{}}]})).is_err());
        let tool =
            json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":10_000_000_000u64}]}}]});
        assert!(Assembler::check(&tool).is_err());
        let mut a = Assembler::default();
        a.push(&tool);
        assert_eq!(a.finish()["choices"][0]["message"].get("tool_calls"), None);
    }

    #[test]
    fn text_tool_calls_and_usage_are_assembled() {
        let mut a = Assembler::default();
        for c in [
            json!({"id":"c1","created":5,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"content":"lo"}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}),
            json!({"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}),
            json!({"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}),
        ] {
            a.push(&c);
        }
        let done = a.finish();
        assert_eq!(done["id"], "c1");
        assert_eq!(done["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            done["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(done["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            a.usage(),
            Usage {
                prompt: Some(3),
                completion: Some(2)
            }
        );
        assert_eq!(a.finish()["choices"][0]["message"]["content"], "Hello");
    }
}
