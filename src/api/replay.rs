//! A finished completion sent again as a stream: the answer to a repeat of a streaming
//! request (same `Idempotency-Key`) whose first answer streamed to another connection.
//! The client asked for `text/event-stream` and an SDK reading a stream finds nothing in
//! a JSON body, so the stored completion is cut back into the chunks a stream of it
//! would have carried.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::render;
use crate::queue::Job;

/// The stream of a succeeded job's completion, ending with `data: [DONE]`.
pub fn stream(job: &Job, completion: &Value, include_usage: bool) -> Response {
    let events: Vec<Result<Event, Infallible>> = chunks(completion)
        .into_iter()
        .filter_map(|c| render::chunk_event(c, include_usage))
        .chain(std::iter::once(Event::default().data("[DONE]")))
        .map(Ok)
        .collect();
    let mut resp = Sse::new(futures::stream::iter(events)).into_response();
    resp.headers_mut().extend(render::stream_headers(job));
    resp
}

/// The `chat.completion.chunk`s of `completion`: for each choice, its whole message as
/// one delta and then its `finish_reason`; the usage last (shown, as in a live stream,
/// only to a client that asked: `render::chunk_event`).
pub fn chunks(completion: &Value) -> Vec<Value> {
    let mut head = Map::new();
    head.insert(
        "id".into(),
        completion.get("id").cloned().unwrap_or(Value::Null),
    );
    head.insert("object".into(), json!("chat.completion.chunk"));
    for key in ["created", "model", "system_fingerprint", "service_tier"] {
        if let Some(v) = completion.get(key) {
            head.insert(key.into(), v.clone());
        }
    }
    let chunk = |choices: Value| {
        let mut c = head.clone();
        c.insert("choices".into(), choices);
        Value::Object(c)
    };
    let choices = completion
        .get("choices")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::with_capacity(choices.len() * 2 + 1);
    for (i, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        let message = choice.get("message").cloned().unwrap_or(json!({}));
        out.push(chunk(json!([{
            "index": index,
            "delta": delta(message),
            "logprobs": choice.get("logprobs").cloned().unwrap_or(Value::Null),
            "finish_reason": null,
        }])));
        out.push(chunk(json!([{
            "index": index,
            "delta": {},
            "logprobs": null,
            "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null),
        }])));
    }
    if let Some(usage) = completion.get("usage").filter(|u| !u.is_null()) {
        let mut last = chunk(json!([]));
        last["usage"] = usage.clone();
        out.push(last);
    }
    out
}

/// A message as a delta: the same fields, each tool call numbered by its place.
fn delta(message: Value) -> Value {
    let Value::Object(mut m) = message else {
        return json!({"role": "assistant"});
    };
    m.entry("role").or_insert(json!("assistant"));
    if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
        for (i, call) in calls.iter_mut().enumerate() {
            if let Some(c) = call.as_object_mut() {
                c.insert("index".into(), json!(i));
            }
        }
    }
    // Fields a delta never carries.
    m.remove("annotations");
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_becomes_its_chunks() {
        let completion = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "logprobs": null, "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": null,
                  "tool_calls": [{"id": "c1", "type": "function",
                                  "function": {"name": "f", "arguments": "{}"}}]},
                 "finish_reason": "tool_calls"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        });
        let chunks = chunks(&completion);
        assert_eq!(chunks.len(), 5);
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(
                (c["id"].as_str(), c["model"].as_str()),
                (Some("chatcmpl-1"), Some("m"))
            );
            assert_eq!(c["created"], 7);
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "hi"})
        );
        assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({}));
        let call = &chunks[2]["choices"][0];
        assert_eq!(call["index"], 1);
        assert_eq!(call["delta"]["tool_calls"][0]["index"], 0);
        assert_eq!(call["delta"]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(chunks[4]["usage"]["total_tokens"], 4);
        // Without include_usage there is no usage chunk.
        let shown = super::chunks(&completion)
            .into_iter()
            .filter_map(|c| render::chunk_event(c, false))
            .count();
        assert_eq!(shown, 4);
    }
}
