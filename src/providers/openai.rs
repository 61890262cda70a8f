//! OpenAI Chat Completions and every compatible API (Groq, vLLM, LM Studio, OpenRouter):
//! `POST {base_url}/chat/completions` with `Authorization: Bearer`. The request passes
//! through untouched except `model`, which becomes the provider's model.

use async_trait::async_trait;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

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
    fn request<'a>(&'a self, body: &'a ChatBody, stream: bool) -> Outgoing<'a> {
        Outgoing {
            body,
            model: &self.up.cfg.model,
            stream,
        }
    }
}

/// A request as the upstream gets it, written straight from the client's fields rather
/// than from a copy of them: every field as it came but `model` (the provider's) and the
/// stream fields. A stream asks for usage, so that it can be recorded even when the
/// client did not ask for it (a client's `stream_options: null` is replaced, not kept);
/// a plain call sends no stream fields at all.
struct Outgoing<'a> {
    body: &'a ChatBody,
    model: &'a str,
    stream: bool,
}

impl Serialize for Outgoing<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.body {
            if !matches!(k.as_str(), "model" | "stream" | "stream_options") {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry("model", self.model)?;
        if self.stream {
            map.serialize_entry("stream", &true)?;
            let mut opts = match self.body.get("stream_options") {
                Some(Value::Object(o)) => o.clone(),
                _ => Map::new(),
            };
            opts.insert("include_usage".into(), Value::Bool(true));
            map.serialize_entry("stream_options", &opts)?;
        }
        map.end()
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
    use serde_json::json;

    fn parse(text: &str) -> Result<Completion, ProviderError> {
        parse_completion(bytes::Bytes::copy_from_slice(text.as_bytes()))
    }

    fn outgoing(body: Value, stream: bool) -> Value {
        let body = body.as_object().unwrap();
        let out = Outgoing {
            body,
            model: "gpt-up",
            stream,
        };
        serde_json::to_value(&out).unwrap()
    }

    #[test]
    fn the_upstream_gets_the_request_with_the_providers_model_and_stream_fields() {
        let body = json!({"model": "alias", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5, "stream": true, "stream_options": {"include_usage": false, "x": 1}});
        // A plain call: every field as it came, the provider's model, no stream fields.
        assert_eq!(
            outgoing(body.clone(), false),
            json!({"model": "gpt-up", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5})
        );
        // A stream asks for usage and keeps the client's other stream options.
        assert_eq!(
            outgoing(body, true),
            json!({"model": "gpt-up", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5,
                "stream": true, "stream_options": {"include_usage": true, "x": 1}})
        );
        // `stream_options: null` (or none) becomes an object asking for usage.
        assert_eq!(
            outgoing(json!({"messages": [], "stream_options": null}), true),
            json!({"model": "gpt-up", "messages": [], "stream": true, "stream_options": {"include_usage": true}})
        );
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
