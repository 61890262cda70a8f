//! Answers in-process with `dummy:<last user message>`, no network: lets anyone run the
//! gateway with no key and no server (`ORCH_USE_DUMMY=1`).

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::Value;

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

#[async_trait]
impl Provider for Dummy {
    fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let (text, usage) = self.answer(body);
        let id = wire::completion_id();
        Ok(wire::completion(
            &id,
            &self.cfg.model,
            text,
            vec![],
            "stop",
            usage,
        ))
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let (text, usage) = self.answer(body);
        let mut chunks = wire::Chunks::new(wire::completion_id(), self.cfg.model.clone());
        let mut out = Vec::new();
        // Word by word, so a stream looks like one.
        for w in text.split_inclusive(' ') {
            chunks.text(&mut out, w);
        }
        chunks.finish(&mut out, "stop", usage);
        Ok(futures::stream::iter(out.into_iter().map(Ok)).boxed())
    }
}
