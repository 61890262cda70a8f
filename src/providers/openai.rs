//! OpenAI Chat Completions and every compatible API (Groq, vLLM, LM Studio, OpenRouter):
//! `POST {base_url}/chat/completions` with `Authorization: Bearer`. The request passes
//! through untouched except `model`, which becomes the provider's model.

use async_trait::async_trait;
use serde_json::Value;

use super::*;

pub struct OpenAi {
    up: wire::Upstream,
}

impl OpenAi {
    pub fn new(cfg: ProviderConfig) -> Self {
        Self {
            up: wire::Upstream::new(cfg, "/chat/completions", wire::Auth::Bearer, &[]),
        }
    }

    /// The request as it came, with the provider's model and the stream settings.
    fn request(&self, body: &ChatBody, stream: bool) -> Value {
        let mut body = body.clone();
        body.insert("model".into(), Value::String(self.up.cfg.model.clone()));
        if stream {
            body.insert("stream".into(), Value::Bool(true));
            // Ask for usage so it can be recorded even when the client did not ask for it.
            // (A client may send `stream_options: null`; it is replaced, not skipped.)
            let opts = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Default::default()));
            if !opts.is_object() {
                *opts = Value::Object(Default::default());
            }
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        } else {
            body.remove("stream");
            body.remove("stream_options");
        }
        Value::Object(body)
    }
}

#[async_trait]
impl Provider for OpenAi {
    fn config(&self) -> &ProviderConfig {
        &self.up.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let request = self.request(body, false);
        self.up.complete(&request, parse_completion).await
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let request = self.request(body, true);
        let chunks = Passthrough::default();
        self.up.stream(&request, wire::Framing::Sse, chunks).await
    }
}

/// OpenAI chunks pass as they are; `[DONE]` ends the answer.
#[derive(Default)]
struct Passthrough {
    done: bool,
    finish_seen: bool,
}

impl wire::Translate for Passthrough {
    fn event(&mut self, _: &str, data: &str) -> Result<Vec<Value>, ProviderError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(vec![]);
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(vec![]);
        }
        let chunk = parse_chunk(data)?;
        let finished = chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()));
        self.finish_seen |= finished;
        Ok(vec![chunk])
    }

    fn finished(&self) -> bool {
        self.done
    }

    /// Some compatible servers close without `[DONE]`; an answer that reached its
    /// `finish_reason` is complete, anything else was cut short.
    fn at_eof(&self) -> Option<ProviderError> {
        (!self.finish_seen)
            .then(|| ProviderError::BadResponse("the stream ended before a finish_reason".into()))
    }
}

/// Reads a `chat.completion` body; anything without `choices` is not an answer.
pub fn parse_completion(body: Value) -> Result<Completion, ProviderError> {
    if !body.get("choices").is_some_and(Value::is_array) {
        return Err(ProviderError::BadResponse(
            "no `choices` in the answer".into(),
        ));
    }
    let usage = Usage::from_openai(body.get("usage"));
    Ok(Completion { body, usage })
}

fn parse_chunk(data: &str) -> Result<Value, ProviderError> {
    let v = wire::event_json(data)?;
    if let Some(err) = v.get("error") {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("upstream error in stream");
        return Err(ProviderError::Status {
            status: 502,
            message: message.to_string(),
            retry_after: None,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_keeps_usage_and_rejects_garbage() {
        let c = parse_completion(serde_json::json!({"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}))
        .unwrap();
        assert_eq!(
            c.usage,
            Usage {
                prompt: Some(3),
                completion: Some(1)
            }
        );
        assert!(matches!(
            parse_completion(serde_json::json!({"ok": true})),
            Err(ProviderError::BadResponse(_))
        ));
    }
}
