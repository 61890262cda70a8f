//! Answers in-process with `dummy:<last user message>`, no network: lets anyone run the
//! gateway with no key and no server (`ORCH_USE_DUMMY=1`).

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{Value, json};

use super::*;

pub struct Dummy {
    cfg: ProviderConfig,
}

impl Dummy {
    pub fn new(cfg: ProviderConfig) -> Self {
        Self { cfg }
    }

    fn answer(&self, body: &ChatBody) -> (String, Usage) {
        let text = format!("dummy:{}", last_user_text(body));
        let prompt_words: usize = body
            .get("messages")
            .and_then(Value::as_array)
            .map(|ms| {
                ms.iter()
                    .map(|m| content_text(m.get("content")).split_whitespace().count())
                    .sum()
            })
            .unwrap_or(0);
        let usage = Usage {
            prompt: Some(prompt_words.max(1) as i64),
            completion: Some(text.split_whitespace().count().max(1) as i64),
        };
        (text, usage)
    }
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt.unwrap_or(0),
        "completion_tokens": u.completion.unwrap_or(0),
        "total_tokens": u.total().unwrap_or(0),
    })
}

#[async_trait]
impl Provider for Dummy {
    fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let (text, usage) = self.answer(body);
        let body = json!({
            "id": completion_id(),
            "object": "chat.completion",
            "created": chrono::Utc::now().timestamp(),
            "model": self.cfg.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage_json(usage),
        });
        Ok(Completion { body, usage })
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let (text, usage) = self.answer(body);
        let id = completion_id();
        let created = chrono::Utc::now().timestamp();
        let model = self.cfg.model.clone();
        let chunk = |delta: Value, finish: Value, usage: Option<Value>| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            if let Some(u) = usage {
                c["choices"] = json!([]);
                c["usage"] = u;
            }
            Ok(c)
        };
        let mut chunks = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        )];
        // Word by word, so a stream looks like one.
        for w in text.split_inclusive(' ') {
            chunks.push(chunk(json!({"content": w}), Value::Null, None));
        }
        chunks.push(chunk(json!({}), json!("stop"), None));
        chunks.push(chunk(json!({}), Value::Null, Some(usage_json(usage))));
        Ok(futures::stream::iter(chunks).boxed())
    }
}
