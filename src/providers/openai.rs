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
        self.up.complete_bytes(&request, parse_completion).await
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
pub fn parse_completion(body: bytes::Bytes) -> Result<Completion, ProviderError> {
    /// What is read of the answer: the rest is checked to be JSON and kept as it came,
    /// without a JSON tree built and written out again.
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        choices: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        usage: Option<&'a serde_json::value::RawValue>,
    }
    let no_choices = || ProviderError::BadResponse("no `choices` in the answer".into());
    let shape: Shape = serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => no_choices(),
        _ => wire::not_json(&e),
    })?;
    if !shape.choices.is_some_and(|c| c.get().starts_with('[')) {
        return Err(no_choices());
    }
    let usage = shape
        .usage
        .and_then(|u| serde_json::from_str::<Value>(u.get()).ok());
    let usage = Usage::from_openai(usage.as_ref());
    let json = String::from_utf8(body.into())
        .map_err(|e| ProviderError::BadResponse(format!("not UTF-8 ({e})")))?;
    Ok(Completion { json, usage })
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
            code: None,
            param: None,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Completion, ProviderError> {
        parse_completion(bytes::Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn completion_keeps_usage_and_rejects_garbage() {
        let c = parse(r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#)
        .unwrap();
        assert_eq!(
            c.usage,
            Usage {
                prompt: Some(3),
                completion: Some(1)
            }
        );
        let bad = |text: &str, why: &str| match parse(text) {
            Err(ProviderError::BadResponse(m)) => assert!(m.contains(why), "{text}: {m}"),
            other => panic!("{text}: {other:?}"),
        };
        bad(r#"{"ok": true}"#, "no `choices`");
        bad(r#"{"choices": {"index": 0}}"#, "no `choices`");
        bad(r#"[1, 2]"#, "no `choices`");
        bad(r#"{"choices": [], "id": "#, "not JSON");
        bad(r#"{"choices": []} trailing"#, "not JSON");
    }

    /// The answer is kept as the upstream wrote it: fields this gateway does not know,
    /// their order and numbers beyond 64 bits all reach the client unchanged.
    #[test]
    fn completion_keeps_the_answer_as_it_came() {
        let text = r#"{"id":"x", "choices":[{"index":0,"message":{"role":"assistant","content":"h\u00e9"}}],"zz_vendor":{"n":123456789012345678901234567890},"usage":{"prompt_tokens":"odd"}}"#;
        let c = parse(text).unwrap();
        assert_eq!(c.json, text);
        assert_eq!(c.usage, Usage::default());
    }
}
