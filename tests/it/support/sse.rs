//! Reading an SSE answer the way a client sees it: `data:` payloads and `:` comments.

use serde_json::Value;

#[derive(Debug, Default)]
pub struct Sse {
    /// The `data` of each event, in order (`[DONE]` included).
    pub data: Vec<String>,
    /// Comment lines (keep-alives).
    pub comments: Vec<String>,
}

impl Sse {
    pub fn parse(text: &str) -> Self {
        let mut out = Sse::default();
        for block in text.split("\n\n") {
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(c) = line.strip_prefix(':') {
                    out.comments.push(c.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
                }
            }
            if !data.is_empty() {
                out.data.push(data.join("\n"));
            }
        }
        out
    }

    pub async fn read(resp: reqwest::Response) -> Self {
        Self::parse(&resp.text().await.unwrap())
    }

    /// Every event but `[DONE]`, as JSON.
    pub fn json(&self) -> Vec<Value> {
        self.data
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
            .collect()
    }

    pub fn ends_with_done(&self) -> bool {
        self.data.last().is_some_and(|d| d == "[DONE]")
    }

    /// The streamed text of the first choice.
    pub fn text(&self) -> String {
        self.json()
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }
}
