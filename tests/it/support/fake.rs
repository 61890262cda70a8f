//! A fake upstream on a random loopback port, speaking one provider's wire format (a
//! `Dialect`: OpenAI, Anthropic or Ollama). It records every call (time, body, headers),
//! tracks calls in flight and streams cut by the client, and answers from a script: by
//! default `fake:<last user message>` with 7 prompt and 3 completion tokens, plain or
//! streamed as the request asks.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with a normal answer (or a stream when the request streams).
    Ok,
    /// 200 with a call of this tool (name, arguments object).
    Tool(String, Value),
    /// Any status with a JSON error body and optional headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// 200 with a body that is not an answer.
    Garbage(String),
    /// Never answers (until the client gives up).
    Hang,
    /// Streams `n` frames of the answer, then breaks the connection.
    BreakStreamAfter(usize),
    /// Streams `n` frames, then the dialect's in-band error event, then ends.
    ErrorEventAfter(usize),
    /// Streams `n` frames, then a frame that is not JSON.
    GarbageEventAfter(usize),
    /// This status with an error message that repeats the `Authorization` header it got
    /// (as careless upstreams do), to check the gateway never passes the key on.
    EchoAuth(u16),
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply::Status {
            status,
            body: json!({"error": {"message": format!("fake upstream error {status}"), "type": "server_error"}}).to_string(),
            headers: vec![],
        }
    }
    pub fn rate_limited(retry_after: &str) -> Self {
        Reply::Status {
            status: 429,
            body: json!({"error": {"message": "Rate limit reached", "type": "requests"}})
                .to_string(),
            headers: vec![("retry-after".into(), retry_after.into())],
        }
    }
    /// A status with this exact body (e.g. a provider's own error shape).
    pub fn status_body(status: u16, body: Value) -> Self {
        Reply::Status {
            status,
            body: body.to_string(),
            headers: vec![],
        }
    }
}

/// What the fake answers with, before the dialect shapes it.
pub enum Answer<'a> {
    Text(&'a str),
    Tool(&'a str, &'a Value),
}

/// One provider's wire format.
pub trait Dialect: Send + Sync + 'static {
    /// The route it serves.
    fn path(&self) -> String;
    /// `base_url` for providers.toml.
    fn base_url(&self, addr: SocketAddr) -> String;
    /// Whether the request asks for a stream.
    fn streams(&self, body: &Value) -> bool;
    /// A complete non-streaming answer.
    fn complete(&self, model: &str, answer: &Answer<'_>) -> Value;
    /// A complete stream, frame by frame, as written on the wire.
    fn frames(&self, model: &str, answer: &Answer<'_>) -> Vec<String>;
    /// The in-band error frame of a stream.
    fn error_frame(&self) -> String;
    /// `content-type` of a stream.
    fn stream_type(&self) -> &'static str;
}

#[derive(Clone, Debug)]
pub struct Call {
    pub at: Instant,
    pub body: Value,
    pub headers: HeaderMap,
}

struct Inner {
    dialect: Box<dyn Dialect>,
    calls: Mutex<Vec<Call>>,
    script: Mutex<VecDeque<Reply>>,
    /// Answer once the script is used up (default `Reply::Ok`).
    fallback: Mutex<Option<Reply>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    latency_ms: AtomicUsize,
    frame_delay_ms: AtomicUsize,
    streams_cut: AtomicUsize,
}

#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Fake {
    pub async fn with(dialect: impl Dialect) -> Self {
        let path = dialect.path();
        let inner = Arc::new(Inner {
            dialect: Box::new(dialect),
            calls: Mutex::default(),
            script: Mutex::default(),
            fallback: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            latency_ms: AtomicUsize::new(0),
            frame_delay_ms: AtomicUsize::new(5),
            streams_cut: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route(&path, post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    /// `base_url` for providers.toml.
    pub fn base_url(&self) -> String {
        self.inner.dialect.base_url(self.addr)
    }

    /// Answers the next calls with these replies, in order; after them, `Reply::Ok`.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.script.lock().unwrap().extend(replies);
    }

    /// Answers with `reply` whenever the script is empty.
    pub fn set_fallback(&self, reply: Reply) {
        *self.inner.fallback.lock().unwrap() = Some(reply);
    }

    /// Every successful answer takes this long.
    pub fn set_latency(&self, d: Duration) {
        self.inner
            .latency_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    /// The pause before each stream frame (5 ms by default).
    pub fn set_frame_delay(&self, d: Duration) {
        self.inner
            .frame_delay_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().unwrap().clone()
    }

    pub fn call_count(&self) -> usize {
        self.inner.calls.lock().unwrap().len()
    }

    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Streams the client closed before their last frame.
    pub fn streams_cut(&self) -> usize {
        self.inner.streams_cut.load(Ordering::SeqCst)
    }
}

struct InFlight(Arc<Inner>);

impl InFlight {
    fn enter(inner: &Arc<Inner>) -> Self {
        let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(inner.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The text of the last user message, whether content is a string or parts/blocks.
pub fn last_user(body: &Value) -> String {
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"));
    match last.map(|m| &m["content"]) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The answer's text split as the fakes stream it: word by word.
pub fn words(text: &str) -> Vec<&str> {
    text.split_inclusive(' ').collect()
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let auth = headers
        .get("authorization")
        .or_else(|| headers.get("x-api-key"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    inner.calls.lock().unwrap().push(Call {
        at: Instant::now(),
        body: body.clone(),
        headers,
    });
    let guard = InFlight::enter(&inner);
    let reply = inner
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| inner.fallback.lock().unwrap().clone())
        .unwrap_or(Reply::Ok);
    let latency = Duration::from_millis(inner.latency_ms.load(Ordering::SeqCst) as u64);
    let d = &inner.dialect;
    let model = body["model"].as_str().unwrap_or("fake").to_string();
    let text = format!("fake:{}", last_user(&body));
    let streamed = |answer: Answer<'_>, tail: Tail| {
        let frames = d.frames(&model, &answer);
        stream_response(&inner, guard, frames, tail)
    };
    match reply {
        Reply::Ok if d.streams(&body) => {
            tokio::time::sleep(latency).await;
            streamed(Answer::Text(&text), Tail::None)
        }
        Reply::Tool(name, args) if d.streams(&body) => {
            streamed(Answer::Tool(&name, &args), Tail::None)
        }
        Reply::Ok => {
            tokio::time::sleep(latency).await;
            axum::Json(d.complete(&model, &Answer::Text(&text))).into_response()
        }
        Reply::Tool(name, args) => {
            axum::Json(d.complete(&model, &Answer::Tool(&name, &args))).into_response()
        }
        Reply::Status {
            status,
            body,
            headers,
        } => {
            let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            for (k, v) in headers {
                resp.headers_mut().insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            resp
        }
        Reply::EchoAuth(status) => {
            let body = json!({"error": {"message": format!("Incorrect API key provided: {auth}"), "type": "invalid_request_error"}});
            (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
        }
        Reply::Garbage(text) => (StatusCode::OK, text).into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Reply::BreakStreamAfter(n) => streamed(Answer::Text(&text), Tail::Break(n)),
        Reply::ErrorEventAfter(n) => streamed(Answer::Text(&text), Tail::Frame(n, d.error_frame())),
        Reply::GarbageEventAfter(n) => {
            let junk = format!("{}\n\n", d.error_frame().replace('{', "{oops"));
            streamed(Answer::Text(&text), Tail::Frame(n, junk))
        }
    }
}

/// How a stream ends after its first frames.
enum Tail {
    /// All frames, cleanly.
    None,
    /// `n` frames, then a broken connection.
    Break(usize),
    /// `n` frames, then this frame, then a clean end.
    Frame(usize, String),
}

/// Counts a stream as cut when it is dropped before its last frame.
struct StreamGuard {
    _in_flight: InFlight,
    inner: Arc<Inner>,
    complete: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.complete {
            self.inner.streams_cut.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn stream_response(
    inner: &Arc<Inner>,
    in_flight: InFlight,
    mut frames: Vec<String>,
    tail: Tail,
) -> Response {
    let mut break_after = None;
    match tail {
        Tail::None => {}
        Tail::Break(n) => break_after = Some(n),
        Tail::Frame(n, f) => {
            frames.truncate(n);
            frames.push(f);
        }
    }
    let delay = Duration::from_millis(inner.frame_delay_ms.load(Ordering::SeqCst) as u64);
    let guard = StreamGuard {
        _in_flight: in_flight,
        inner: inner.clone(),
        complete: false,
    };
    let stream = futures::stream::unfold(
        (frames.into_iter().enumerate().peekable(), guard, false),
        move |(mut it, mut guard, over)| async move {
            if over {
                return None;
            }
            tokio::time::sleep(delay).await;
            match it.next() {
                Some((i, _)) if break_after.is_some_and(|n| i >= n) => Some((
                    Err(std::io::Error::other("connection reset by fake")),
                    (it, guard, true),
                )),
                Some((_, frame)) => {
                    guard.complete = it.peek().is_none();
                    Some((Ok::<_, std::io::Error>(frame), (it, guard, false)))
                }
                None => None,
            }
        },
    );
    Response::builder()
        .header("content-type", inner.dialect.stream_type())
        .body(Body::from_stream(stream))
        .unwrap()
}
