//! What the adapters share, so each provider file holds only its own dialect:
//! sending a call (with the timeout and the upstream's error kept), reading an OpenAI
//! request's messages and parts, building OpenAI completions and chunks, and turning an
//! upstream event stream into a chunk stream through a per-provider `Translate`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{
    ChatBody, ChunkStream, Completion, ProviderConfig, ProviderError, Usage, http_client, redact,
    status_error, transport_error,
};

// ---------------------------------------------------------------------------------------
// Calls

/// How a provider takes its key.
pub enum Auth {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// The key alone in this header.
    Header(&'static str),
}

/// One provider's endpoint: where calls go, how they authenticate, how long they may take.
pub struct Upstream {
    pub cfg: ProviderConfig,
    http: reqwest::Client,
    url: String,
    /// `url` parsed once: a call with the text would parse it (host name rules and all)
    /// every time. `None` if it does not parse: each call then fails with the reason.
    parsed_url: Option<reqwest::Url>,
    timeout: Duration,
    auth: Auth,
    headers: &'static [(&'static str, &'static str)],
}

impl Upstream {
    /// `path` is appended to the configured `base_url`; `headers` go with every call.
    pub fn new(
        cfg: ProviderConfig,
        path: &str,
        auth: Auth,
        headers: &'static [(&'static str, &'static str)],
    ) -> Self {
        let url = format!("{}{path}", cfg.base_url);
        Self {
            http: http_client(&cfg),
            parsed_url: reqwest::Url::parse(&url).ok(),
            url,
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            auth,
            headers,
            cfg,
        }
    }

    fn request<B: Serialize + ?Sized>(
        &self,
        body: &B,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut req = match &self.parsed_url {
            Some(url) => self.http.post(url.clone()),
            None => self.http.post(&self.url),
        }
        .json(body);
        for (k, v) in self.headers {
            req = req.header(*k, *v);
        }
        match (key, &self.auth) {
            (Some(k), Auth::Bearer) => req.bearer_auth(k),
            (Some(k), Auth::Header(name)) => req.header(*name, k),
            (None, _) => req,
        }
    }

    /// One non-streaming call whose JSON answer `parse` reads. Whatever the upstream
    /// wrote that reaches the caller is cleaned of the key first.
    pub async fn complete<B: Serialize + Sync + ?Sized>(
        &self,
        body: &B,
        parse: impl FnOnce(Value) -> Result<Completion, ProviderError>,
    ) -> Result<Completion, ProviderError> {
        self.complete_bytes(body, |bytes| parse(json_answer(&bytes)?))
            .await
    }

    /// One non-streaming call whose answer `parse` reads as the bytes the upstream sent
    /// (for an answer kept as it came, without a JSON tree in between).
    pub async fn complete_bytes<B: Serialize + Sync + ?Sized>(
        &self,
        body: &B,
        parse: impl FnOnce(bytes::Bytes) -> Result<Completion, ProviderError>,
    ) -> Result<Completion, ProviderError> {
        let key = self.cfg.api_key();
        let req = self.request(body, key.as_deref());
        let answer = call(req, self.timeout, key.as_deref()).await?;
        parse(answer).map_err(|e| e.redacted(key.as_deref()))
    }

    /// One streaming call, its events framed as `framing` says and read by `translator`.
    pub async fn stream<B: Serialize + Sync + ?Sized, T: Translate>(
        &self,
        body: &B,
        framing: Framing,
        translator: T,
    ) -> Result<ChunkStream, ProviderError> {
        let key = self.cfg.api_key();
        let req = self.request(body, key.as_deref());
        let resp = send(req, self.timeout, key.as_deref()).await?;
        let events = match framing {
            Framing::Sse => sse_events(resp, key.clone()),
            Framing::Ndjson => ndjson_lines(resp, key.clone()),
        };
        let chunks = translate(events, translator);
        Ok(chunks
            .map(move |c| c.map_err(|e| e.redacted(key.as_deref())))
            .boxed())
    }
}

/// Sends a request and returns the answer if it is a success; otherwise the upstream's
/// own error (status, message, `Retry-After`). The whole exchange, error body included,
/// is bounded by `timeout`, so a stalled upstream cannot hold a worker.
async fn send(
    req: reqwest::RequestBuilder,
    timeout: Duration,
    key: Option<&str>,
) -> Result<reqwest::Response, ProviderError> {
    let call = async {
        let resp = req
            .send()
            .await
            .map_err(|e| transport_error(e, timeout, key))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(status_error(resp, key).await)
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ProviderError::Timeout(timeout))?
}

/// A non-streaming call: the successful answer's body, read whole within `timeout`.
async fn call(
    req: reqwest::RequestBuilder,
    timeout: Duration,
    key: Option<&str>,
) -> Result<bytes::Bytes, ProviderError> {
    let call = async {
        let resp = send(req, timeout, key).await?;
        resp.bytes()
            .await
            .map_err(|e| transport_error(e, timeout, key))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ProviderError::Timeout(timeout))?
}

/// An answer's body as JSON.
fn json_answer(bytes: &[u8]) -> Result<Value, ProviderError> {
    serde_json::from_slice(bytes).map_err(|e| not_json(&e))
}

/// What an answer that does not parse as JSON is.
pub fn not_json(e: &serde_json::Error) -> ProviderError {
    ProviderError::BadResponse(format!("not JSON ({e})"))
}

/// How a streamed answer is cut into events.
pub enum Framing {
    /// Server-sent events (OpenAI, Anthropic).
    Sse,
    /// One JSON object a line (Ollama).
    Ndjson,
}

// ---------------------------------------------------------------------------------------
// Reading the OpenAI request

/// The request's `messages` (the API validated them; a stored job could still lack them).
pub fn messages(body: &ChatBody) -> Result<&[Value], ProviderError> {
    body.get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| ProviderError::Invalid("`messages` must be an array".into()))
}

pub fn role(message: &Value) -> &str {
    message.get("role").and_then(Value::as_str).unwrap_or("")
}

/// Refuses `n > 1` for a provider that answers with one choice: the client would
/// silently get fewer choices than it asked for.
pub fn one_choice(body: &ChatBody, provider: &str) -> Result<(), ProviderError> {
    match body.get("n").and_then(Value::as_u64) {
        Some(n) if n > 1 => Err(ProviderError::Invalid(format!(
            "`n` = {n} cannot be sent to an {provider} provider: it answers with one choice"
        ))),
        _ => Ok(()),
    }
}

/// `max_completion_tokens` (the current OpenAI name) or the older `max_tokens`.
pub fn max_tokens(body: &ChatBody) -> Option<u64> {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
}

/// `stop` as a list, whether it was sent as one string or several.
pub fn stop_list(body: &ChatBody) -> Option<Vec<Value>> {
    match body.get("stop")? {
        Value::String(s) => Some(vec![Value::String(s.clone())]),
        Value::Array(a) if !a.is_empty() => Some(a.clone()),
        _ => None,
    }
}

/// Copies the keys present in `from` into `to`, renamed (`(from_key, to_key)`).
pub fn copy_keys(from: &ChatBody, to: &mut Map<String, Value>, keys: &[(&str, &str)]) {
    for (src, dst) in keys {
        if let Some(v) = from.get(*src).filter(|v| !v.is_null()) {
            to.insert((*dst).to_string(), v.clone());
        }
    }
}

/// An image of a content part.
#[derive(Debug, PartialEq)]
pub enum Image<'a> {
    /// A `data:` URL: media type and base64 payload.
    Inline { media_type: &'a str, data: &'a str },
    /// An `http(s)` URL the provider would fetch.
    Url(&'a str),
}

/// One part of a message's content.
#[derive(Debug, PartialEq)]
pub enum Part<'a> {
    Text(&'a str),
    Image(Image<'a>),
}

/// The parts of a message's `content` (a string is one text part). `at` names the
/// message in errors, e.g. `messages[2]`; parts a provider cannot take are its caller's
/// to refuse, parts no provider here can take are refused now.
pub fn parts<'a>(content: Option<&'a Value>, at: &str) -> Result<Vec<Part<'a>>, ProviderError> {
    let list = match content {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::String(s)) => return Ok(vec![Part::Text(s)]),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(ProviderError::Invalid(format!(
                "{at}.content must be a string or an array of parts"
            )));
        }
    };
    list.iter()
        .enumerate()
        .map(|(j, p)| part(p, &format!("{at}.content[{j}]")))
        .collect()
}

fn part<'a>(p: &'a Value, at: &str) -> Result<Part<'a>, ProviderError> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Part::Text(
            p.get("text").and_then(Value::as_str).unwrap_or(""),
        )),
        Some("image_url") => {
            let url = p
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
                .ok_or_else(|| ProviderError::Invalid(format!("{at}: image_url has no url")))?;
            image(url, at).map(Part::Image)
        }
        other => Err(ProviderError::Invalid(format!(
            "{at}: content part type `{}` cannot be translated for this provider",
            other.unwrap_or("(none)")
        ))),
    }
}

fn image<'a>(url: &'a str, at: &str) -> Result<Image<'a>, ProviderError> {
    if let Some(rest) = url.strip_prefix("data:") {
        // data:[<media type>];base64,<data>
        let (meta, data) = rest.split_once(',').unwrap_or(("", ""));
        let media_type = meta.strip_suffix(";base64").unwrap_or("");
        if media_type.is_empty() || data.is_empty() {
            return Err(ProviderError::Invalid(format!(
                "{at}: an image data URL must look like `data:image/png;base64,…`"
            )));
        }
        return Ok(Image::Inline { media_type, data });
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(Image::Url(url));
    }
    Err(ProviderError::Invalid(format!(
        "{at}: an image URL must be an https URL or a base64 data URL"
    )))
}

/// The text of a message's content, refusing images where the provider takes only text.
pub fn text_only(content: Option<&Value>, at: &str) -> Result<String, ProviderError> {
    let mut text = String::new();
    for p in parts(content, at)? {
        match p {
            Part::Text(t) => text.push_str(t),
            Part::Image(_) => {
                return Err(ProviderError::Invalid(format!(
                    "{at}: images are only allowed in user messages"
                )));
            }
        }
    }
    Ok(text)
}

/// Assistant tool calls seen so far, so that a later `tool` message can be matched to
/// its call: providers that key results by call (Anthropic) or by name (Ollama) both
/// need it, and a result without a call is a 400, not an upstream 500.
#[derive(Default)]
pub struct ToolCalls {
    names: HashMap<String, String>,
}

/// One OpenAI `tool_calls` entry, read.
pub struct ToolCall<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// The arguments as a JSON object (OpenAI sends them as a string).
    pub arguments: Value,
}

impl ToolCalls {
    /// Reads and remembers the `tool_calls` of an assistant message.
    pub fn read<'a>(
        &mut self,
        message: &'a Value,
        at: &str,
    ) -> Result<Vec<ToolCall<'a>>, ProviderError> {
        let Some(calls) = message.get("tool_calls").and_then(Value::as_array) else {
            return Ok(vec![]);
        };
        calls
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let at = format!("{at}.tool_calls[{k}]");
                let id = c.get("id").and_then(Value::as_str).unwrap_or("");
                let f = c.get("function");
                let name = f
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ProviderError::Invalid(format!("{at}: function.name is missing"))
                    })?;
                let arguments = arguments(f.and_then(|f| f.get("arguments")), &at)?;
                self.names.insert(id.to_string(), name.to_string());
                Ok(ToolCall {
                    id,
                    name,
                    arguments,
                })
            })
            .collect()
    }

    /// The `tool_call_id` of a `tool` message and the name of the call it answers.
    pub fn result_of<'a>(
        &self,
        message: &'a Value,
        at: &str,
    ) -> Result<(&'a str, String), ProviderError> {
        let id = message
            .get("tool_call_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ProviderError::Invalid(format!("{at}: tool message without tool_call_id"))
            })?;
        match self.names.get(id) {
            Some(name) => Ok((id, name.clone())),
            None => Err(ProviderError::Invalid(format!(
                "{at}: tool result for tool_call_id `{id}` matches no tool call of an earlier assistant message"
            ))),
        }
    }
}

/// Tool-call arguments as an object: OpenAI sends a JSON string, which may be empty.
fn arguments(raw: Option<&Value>, at: &str) -> Result<Value, ProviderError> {
    let parsed = match raw {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(json!({})),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok(),
        Some(v) => Some(v.clone()),
    };
    parsed.filter(Value::is_object).ok_or_else(|| {
        ProviderError::Invalid(format!(
            "{at}: function.arguments must be a JSON object (as a string)"
        ))
    })
}

// ---------------------------------------------------------------------------------------
// Building OpenAI answers

pub fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

pub fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt.unwrap_or(0),
        "completion_tokens": u.completion.unwrap_or(0),
        "total_tokens": u.total().unwrap_or(0),
    })
}

/// An OpenAI `tool_calls` entry; `arguments` is the JSON text of the call's input.
pub fn tool_call(id: &str, name: &str, arguments: String) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// A one-choice `chat.completion`, as OpenAI shapes it: `content` is null only when the
/// answer is tool calls alone.
pub fn completion(
    id: &str,
    model: &str,
    text: String,
    tool_calls: Vec<Value>,
    finish_reason: &str,
    usage: Usage,
) -> Completion {
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    };
    // `refusal` as OpenAI sends it when the model did not refuse: a client may test it
    // against null.
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": usage_json(usage),
    });
    Completion::from_value(&body, usage)
}

/// A one-choice answer made `n` choices of the same answer (the dummy's `n`).
pub fn repeat_choice(one: Completion, n: usize) -> Completion {
    let Ok(mut body) = serde_json::from_str::<Value>(&one.json) else {
        return one;
    };
    let Some(first) = body["choices"].get(0).cloned() else {
        return one;
    };
    body["choices"] = (0..n.max(1))
        .map(|i| {
            let mut choice = first.clone();
            choice["index"] = Value::from(i);
            choice
        })
        .collect();
    Completion::from_value(&body, one.usage)
}

/// Makes the `chat.completion.chunk`s of one streamed answer. The first chunk carries
/// `delta.role`, as OpenAI's does; it is sent only with the first real content so that an
/// upstream that fails right after its preamble can still be retried (nothing reached
/// the client yet).
pub struct Chunks {
    pub id: String,
    pub model: String,
    created: i64,
    opened: bool,
}

impl Chunks {
    pub fn new(id: String, model: String) -> Self {
        Self {
            id,
            model,
            created: chrono::Utc::now().timestamp(),
            opened: false,
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        })
    }

    fn choice(&self, delta: Value, finish: Value) -> Value {
        self.chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
    }

    /// The role chunk, once, before anything else.
    fn open(&mut self, out: &mut Vec<Value>) {
        if !self.opened {
            self.opened = true;
            out.push(self.choice(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            ));
        }
    }

    pub fn delta(&mut self, out: &mut Vec<Value>, delta: Value) {
        self.open(out);
        out.push(self.choice(delta, Value::Null));
    }

    pub fn text(&mut self, out: &mut Vec<Value>, text: &str) {
        if !text.is_empty() {
            self.delta(out, json!({"content": text}));
        }
    }

    /// The chunk with `finish_reason`, then the usage-only chunk that closes the answer.
    pub fn finish(&mut self, out: &mut Vec<Value>, reason: &str, usage: Usage) {
        self.open(out);
        out.push(self.choice(json!({}), json!(reason)));
        let mut last = self.chunk(json!([]));
        last["usage"] = usage_json(usage);
        out.push(last);
    }
}

// ---------------------------------------------------------------------------------------
// Streams

/// One provider's stream dialect: upstream events in, OpenAI chunks out.
pub trait Translate: Send + 'static {
    /// One event: an SSE event (`name` is its `event:` field) or an NDJSON line (`name`
    /// empty). Returns the chunks it amounts to; an `Err` ends the stream.
    fn event(&mut self, name: &str, data: &str) -> Result<Vec<Value>, ProviderError>;

    /// True once the upstream said the answer is complete; later bytes are not read.
    fn finished(&self) -> bool;

    /// The upstream closed the stream before `finished`: by default the answer was cut
    /// short, an error. `None` accepts the end as complete.
    fn at_eof(&self) -> Option<ProviderError> {
        Some(ProviderError::BadResponse(
            "the stream ended before the answer was complete".into(),
        ))
    }
}

/// An upstream event: (`event` name, data).
pub type RawEvents = BoxStream<'static, Result<(String, String), ProviderError>>;

/// Drives a translator over upstream events. It stops at the first error and reports a
/// stream that ends without its final event as an error too, never as a clean end.
pub fn translate<T: Translate>(events: RawEvents, translator: T) -> ChunkStream {
    struct State<T> {
        events: RawEvents,
        t: T,
        queue: VecDeque<Value>,
        over: bool,
    }
    let state = State {
        events,
        t: translator,
        queue: VecDeque::new(),
        over: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(c) = s.queue.pop_front() {
                return Some((Ok(c), s));
            }
            if s.over || s.t.finished() {
                return None;
            }
            let failed = match s.events.next().await {
                Some(Ok((name, data))) => match s.t.event(&name, &data) {
                    Ok(chunks) => {
                        s.queue.extend(chunks);
                        continue;
                    }
                    Err(e) => e,
                },
                Some(Err(e)) => e,
                None => match s.t.at_eof() {
                    Some(e) => e,
                    None => return None,
                },
            };
            s.over = true;
            return Some((Err(failed), s));
        }
    })
    .boxed()
}

/// The SSE events of an answer.
fn sse_events(resp: reqwest::Response, key: Option<String>) -> RawEvents {
    resp.bytes_stream()
        .eventsource()
        .map(move |ev| match ev {
            Ok(e) => Ok((e.event, e.data)),
            Err(e) => Err(interrupted(&e.to_string(), key.as_deref())),
        })
        .boxed()
}

/// The lines of an NDJSON answer, blank lines skipped.
fn ndjson_lines(resp: reqwest::Response, key: Option<String>) -> RawEvents {
    let bytes = resp
        .bytes_stream()
        .map(move |b| b.map_err(|e| interrupted(&e.to_string(), key.as_deref())));
    lines(bytes).boxed()
}

fn interrupted(cause: &str, key: Option<&str>) -> ProviderError {
    ProviderError::Network(redact(&format!("stream interrupted: {cause}"), key))
}

/// Splits a byte stream into lines; a last line without its newline still counts.
fn lines<S>(bytes: S) -> impl Stream<Item = Result<(String, String), ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
{
    struct State<S> {
        bytes: std::pin::Pin<Box<S>>,
        buf: Vec<u8>,
        eof: bool,
    }
    let state = State {
        bytes: Box::pin(bytes),
        buf: Vec::new(),
        eof: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let cut = match s.buf.iter().position(|&b| b == b'\n') {
                Some(i) => Some(s.buf.drain(..=i).collect::<Vec<u8>>()),
                None if s.eof && !s.buf.is_empty() => Some(std::mem::take(&mut s.buf)),
                None if s.eof => return None,
                None => None,
            };
            if let Some(line) = cut {
                let text = match String::from_utf8(line) {
                    Ok(t) => t,
                    Err(_) => {
                        let e = ProviderError::BadResponse("stream line is not UTF-8".into());
                        s.eof = true;
                        s.buf.clear();
                        return Some((Err(e), s));
                    }
                };
                if text.trim().is_empty() {
                    continue;
                }
                return Some((Ok((String::new(), text.trim().to_string())), s));
            }
            match s.bytes.next().await {
                Some(Ok(b)) => s.buf.extend_from_slice(&b),
                Some(Err(e)) => {
                    s.eof = true;
                    s.buf.clear();
                    return Some((Err(e), s));
                }
                None => s.eof = true,
            }
        }
    })
}

/// Parses one event's JSON.
pub fn event_json(data: &str) -> Result<Value, ProviderError> {
    serde_json::from_str(data)
        .map_err(|e| ProviderError::BadResponse(format!("stream event is not JSON ({e})")))
}

#[cfg(test)]
pub mod testing {
    use super::*;

    /// A request body from a JSON literal.
    pub fn body(v: Value) -> ChatBody {
        v.as_object().cloned().unwrap_or_default()
    }

    /// A chunk stream from canned events, as the adapters' stream tests feed them.
    pub fn events(list: &[(&str, &str)]) -> RawEvents {
        let owned: Vec<_> = list
            .iter()
            .map(|(n, d)| Ok((n.to_string(), d.to_string())))
            .collect();
        futures::stream::iter(owned).boxed()
    }

    /// Runs a translator over canned events; `created` is removed so chunks compare exactly.
    pub async fn run<T: Translate>(
        list: &[(&str, &str)],
        t: T,
    ) -> Vec<Result<Value, ProviderError>> {
        collect(translate(events(list), t)).await
    }

    /// `run` for a stream that must succeed.
    pub async fn run_ok<T: Translate>(list: &[(&str, &str)], t: T) -> Vec<Value> {
        run(list, t)
            .await
            .into_iter()
            .map(|r| r.expect("chunk"))
            .collect()
    }

    /// Collects a chunk stream, with `created` removed so chunks compare exactly.
    pub async fn collect(s: ChunkStream) -> Vec<Result<Value, ProviderError>> {
        s.map(|r| {
            r.map(|mut c| {
                if let Some(o) = c.as_object_mut() {
                    o.remove("created");
                }
                c
            })
        })
        .collect()
        .await
    }

    /// The chunks a plain text answer should give: role, text pieces, finish, usage.
    pub fn text_chunks(
        id: &str,
        model: &str,
        pieces: &[&str],
        finish: &str,
        usage: Value,
    ) -> Vec<Value> {
        let base = |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "model": model, "choices": choices});
        let choice = |delta: Value, f: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": f}]);
        let mut out = vec![base(choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ))];
        for p in pieces {
            out.push(base(choice(json!({"content": p}), Value::Null)));
        }
        out.push(base(choice(json!({}), json!(finish))));
        let mut last = base(json!([]));
        last["usage"] = usage;
        out.push(last);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_read_text_images_and_refuse_the_rest() {
        let c = json!([
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]);
        assert_eq!(
            parts(Some(&c), "messages[0]").unwrap(),
            vec![
                Part::Text("look"),
                Part::Image(Image::Inline {
                    media_type: "image/png",
                    data: "iVBOR"
                }),
                Part::Image(Image::Url("https://example.com/cat.jpg")),
            ]
        );
        let audio = json!([{"type": "input_audio", "input_audio": {}}]);
        let err = parts(Some(&audio), "messages[1]").unwrap_err();
        assert_eq!(
            err.to_string(),
            "messages[1].content[0]: content part type `input_audio` cannot be translated for this provider"
        );
        let bad = json!([{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]);
        assert!(matches!(
            parts(Some(&bad), "m"),
            Err(ProviderError::Invalid(_))
        ));
    }

    #[test]
    fn tool_results_must_answer_an_earlier_call() {
        let mut calls = ToolCalls::default();
        let asst = json!({"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}},
        ]});
        let read = calls.read(&asst, "messages[1]").unwrap();
        assert_eq!(read[0].arguments, json!({"a": 1}));
        assert_eq!(read[1].arguments, json!({}));
        let ok = json!({"role": "tool", "tool_call_id": "call_2", "content": "x"});
        assert_eq!(
            calls.result_of(&ok, "messages[2]").unwrap(),
            ("call_2", "g".to_string())
        );
        let stray = json!({"role": "tool", "tool_call_id": "call_9", "content": "x"});
        assert_eq!(
            calls
                .result_of(&stray, "messages[3]")
                .unwrap_err()
                .to_string(),
            "messages[3]: tool result for tool_call_id `call_9` matches no tool call of an earlier assistant message"
        );
        let bad =
            json!({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]});
        assert!(calls.read(&bad, "m").is_err());
    }

    struct Echo {
        done: bool,
    }
    impl Translate for Echo {
        fn event(&mut self, _: &str, data: &str) -> Result<Vec<Value>, ProviderError> {
            if data == "end" {
                self.done = true;
                return Ok(vec![]);
            }
            event_json(data).map(|v| vec![v])
        }
        fn finished(&self) -> bool {
            self.done
        }
    }

    #[tokio::test]
    async fn translate_stops_at_the_end_event_and_reports_cut_streams() {
        let ok = translate(
            testing::events(&[("", "1"), ("", "end"), ("", "never read")]),
            Echo { done: false },
        );
        let got: Vec<_> = ok.collect().await;
        assert_eq!(got, vec![Ok(json!(1))]);
        let cut = translate(testing::events(&[("", "1")]), Echo { done: false });
        let got: Vec<_> = cut.collect().await;
        assert_eq!(got.len(), 2);
        assert!(matches!(got[1], Err(ProviderError::BadResponse(_))));
        let garbage = translate(
            testing::events(&[("", "{oops"), ("", "2")]),
            Echo { done: false },
        );
        let got: Vec<_> = garbage.collect().await;
        assert_eq!(got.len(), 1, "nothing after the first error");
        assert!(got[0].is_err());
    }

    #[tokio::test]
    async fn lines_are_split_across_reads() {
        let parts: Vec<Result<bytes::Bytes, ProviderError>> = vec![
            Ok(bytes::Bytes::from_static(b"{\"a\":1}\n{\"b\"")),
            Ok(bytes::Bytes::from_static(b":2}\n\n{\"c\":3}")),
        ];
        let got: Vec<_> = lines(futures::stream::iter(parts)).collect().await;
        let data: Vec<String> = got.into_iter().map(|r| r.unwrap().1).collect();
        assert_eq!(data, vec!["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
    }

    #[test]
    fn chunks_open_with_the_role_and_close_with_usage() {
        let mut c = Chunks::new("id1".into(), "m".into());
        let mut out = vec![];
        c.text(&mut out, "");
        assert!(out.is_empty(), "no empty content chunk");
        c.text(&mut out, "Hi");
        c.finish(
            &mut out,
            "stop",
            Usage {
                prompt: Some(2),
                completion: Some(1),
            },
        );
        for o in &mut out {
            o.as_object_mut().unwrap().remove("created");
        }
        assert_eq!(
            out,
            testing::text_chunks(
                "id1",
                "m",
                &["Hi"],
                "stop",
                json!({"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3})
            )
        );
    }
}
