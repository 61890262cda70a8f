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

    /// The answer, its usage for all `n` choices (each choice is the same answer; OpenAI
    /// counts completion tokens over every choice), and `n`.
    fn answer(&self, body: &ChatBody) -> (String, Usage, usize) {
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
        let n = choices_asked(body);
        let completion = text.split_whitespace().count().max(1) * n;
        let usage = Usage {
            prompt: Some(prompt_words.max(1) as i64),
            completion: Some(completion as i64),
        };
        (text, usage, n)
    }
}

/// How many choices the request asks for: `n`, which the API has checked to be 1–128.
fn choices_asked(body: &ChatBody) -> usize {
    body.get("n")
        .and_then(Value::as_u64)
        .map_or(1, |n| usize::try_from(n.clamp(1, 128)).unwrap_or(1))
}

/// `chunk` (one choice's) as the same chunk of choice `index`.
fn of_choice(mut chunk: Value, index: usize) -> Value {
    if let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) {
        for c in choices {
            c["index"] = Value::from(index);
        }
    }
    chunk
}

#[async_trait]
impl Provider for Dummy {
    fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError> {
        let (text, usage, n) = self.answer(body);
        let id = wire::completion_id();
        let one = wire::completion(&id, &self.cfg.model, text, vec![], "stop", usage);
        Ok(match n {
            1 => one,
            n => wire::repeat_choice(one, n),
        })
    }

    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError> {
        let (text, usage, n) = self.answer(body);
        let mut chunks = wire::Chunks::new(wire::completion_id(), self.cfg.model.clone());
        let mut out = Vec::new();
        // Word by word, so a stream looks like one.
        for w in text.split_inclusive(' ') {
            chunks.text(&mut out, w);
        }
        chunks.finish(&mut out, "stop", usage);
        // With `n` > 1, each choice's chunks in turn, then the one usage chunk.
        if n > 1 {
            let usage_chunk = out.pop();
            let one = std::mem::take(&mut out);
            out = (0..n)
                .flat_map(|i| one.iter().map(move |c| of_choice(c.clone(), i)))
                .chain(usage_chunk)
                .collect();
        }
        Ok(futures::stream::iter(out.into_iter().map(Ok)).boxed())
    }
}
