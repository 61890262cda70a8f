//! OpenAI Chat Completions and every compatible API (Groq, vLLM, LM Studio, OpenRouter):
//! `POST {base_url}/chat/completions` with `Authorization: Bearer`. The request passes
//! through untouched except `model`, which becomes the provider's model.

use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

use super::*;

pub struct OpenAi {
    cfg: ProviderConfig,
    http: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl OpenAi {
    pub fn new(cfg: ProviderConfig) -> Self {
        Self {
            http: http_client(&cfg),
            url: format!("{}/chat/completions", cfg.base_url),
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            cfg,
        }
    }

    fn request(&self, body: &ChatBody, stream: bool, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut body = body.clone();
        body.insert("model".into(), Value::String(self.cfg.model.clone()));
        if stream {
            body.insert("stream".into(), Value::Bool(true));
            // Ask for usage so it can be recorded even when the client did not ask for it.
            let opts = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        } else {
            body.remove("stream");
            body.remove("stream_options");
        }
        let mut req = self.http.post(&self.url).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req
    }
}

#[async_trait]
impl Provider for OpenAi {
    fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let key = self.cfg.api_key();
        let key = key.as_deref();
        let call = async {
            let resp = self
                .request(body, false, key)
                .send()
                .await
                .map_err(|e| transport_error(e, self.timeout, key))?;
            if !resp.status().is_success() {
                return Err(status_error(resp, key).await);
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| transport_error(e, self.timeout, key))?;
            parse_completion(&bytes)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout))?
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let key = self.cfg.api_key();
        let send = self.request(body, true, key.as_deref()).send();
        let resp = tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout))?
            .map_err(|e| transport_error(e, self.timeout, key.as_deref()))?;
        if !resp.status().is_success() {
            return Err(status_error(resp, key.as_deref()).await);
        }
        let timeout = self.timeout;
        let events = resp.bytes_stream().eventsource();
        let chunks = events
            .take_while(|ev| {
                futures::future::ready(!matches!(ev, Ok(e) if e.data.trim() == "[DONE]"))
            })
            .filter_map(move |ev| {
                let key = key.clone();
                async move {
                    match ev {
                        Ok(e) if e.data.trim().is_empty() => None,
                        Ok(e) => Some(parse_chunk(&e.data, key.as_deref())),
                        Err(e) => Some(Err(ProviderError::Network(redact(
                            &format!("stream interrupted: {e} (after {timeout:?} budget)"),
                            key.as_deref(),
                        )))),
                    }
                }
            });
        Ok(chunks.boxed())
    }
}

/// Reads a `chat.completion` body; anything without `choices` is not an answer.
pub fn parse_completion(bytes: &[u8]) -> Result<Completion, ProviderError> {
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| ProviderError::BadResponse(format!("not JSON ({e})")))?;
    if !body.get("choices").is_some_and(Value::is_array) {
        return Err(ProviderError::BadResponse(
            "no `choices` in the answer".into(),
        ));
    }
    let usage = Usage::from_openai(body.get("usage"));
    Ok(Completion { body, usage })
}

fn parse_chunk(data: &str, secret: Option<&str>) -> Result<Value, ProviderError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| ProviderError::BadResponse(format!("stream event is not JSON ({e})")))?;
    if let Some(err) = v.get("error") {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("upstream error in stream");
        return Err(ProviderError::Status {
            status: 502,
            message: redact(message, secret),
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
        let c = parse_completion(
            br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        )
        .unwrap();
        assert_eq!(
            c.usage,
            Usage {
                prompt: Some(3),
                completion: Some(1)
            }
        );
        assert!(matches!(
            parse_completion(b"<html>"),
            Err(ProviderError::BadResponse(_))
        ));
        assert!(matches!(
            parse_completion(b"{\"ok\":true}"),
            Err(ProviderError::BadResponse(_))
        ));
    }
}
