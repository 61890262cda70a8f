//! A fake OpenAI-compatible upstream on a random loopback port. It records every call
//! (time, body, headers), tracks how many calls are in flight, and answers from a script:
//! by default `fake:<last user message>` with usage, like a real chat completion.

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
    /// 200 with a normal completion (or SSE when the request streams).
    Ok,
    /// Any status with a JSON error body and optional headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// 200 with a body that is not a completion.
    Garbage(String),
    /// Never answers (until the client gives up).
    Hang,
    /// Streams `n` chunks, then breaks the connection.
    BreakStreamAfter(usize),
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
}

#[derive(Clone, Debug)]
pub struct Call {
    pub at: Instant,
    pub body: Value,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    script: Mutex<VecDeque<Reply>>,
    /// Answer once the script is used up (default `Reply::Ok`).
    fallback: Mutex<Option<Reply>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    latency_ms: AtomicUsize,
}

#[derive(Clone)]
pub struct FakeOpenAi {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/chat/completions", post(handle))
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
        format!("http://{}/v1", self.addr)
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

fn last_user(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    inner.calls.lock().unwrap().push(Call {
        at: Instant::now(),
        body: body.clone(),
        headers,
    });
    let guard = InFlight::enter(&inner);
    let scripted = inner.script.lock().unwrap().pop_front();
    let reply = scripted
        .or_else(|| inner.fallback.lock().unwrap().clone())
        .unwrap_or(Reply::Ok);
    let latency = Duration::from_millis(inner.latency_ms.load(Ordering::SeqCst) as u64);
    match reply {
        Reply::Ok => {
            tokio::time::sleep(latency).await;
            let text = format!("fake:{}", last_user(&body));
            let model = body["model"].as_str().unwrap_or("fake").to_string();
            if body["stream"] == true {
                return stream_response(guard, model, text, None);
            }
            drop(guard);
            axum::Json(json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                "system_fingerprint": "fp_fake",
            }))
            .into_response()
        }
        Reply::Status {
            status,
            body,
            headers,
        } => {
            drop(guard);
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
            drop(guard);
            let body = json!({"error": {"message": format!("Incorrect API key provided: {auth}. Check your key."), "type": "invalid_request_error", "param": auth}});
            let mut resp =
                (StatusCode::from_u16(status).unwrap(), body.to_string()).into_response();
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            resp
        }
        Reply::Garbage(text) => {
            drop(guard);
            (StatusCode::OK, text).into_response()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(guard);
            StatusCode::OK.into_response()
        }
        Reply::BreakStreamAfter(n) => {
            let model = body["model"].as_str().unwrap_or("fake").to_string();
            stream_response(guard, model, "one two three four five six".into(), Some(n))
        }
    }
}

/// SSE in OpenAI's format: role chunk, one chunk per word, finish chunk, usage chunk, [DONE].
fn stream_response(
    guard: InFlight,
    model: String,
    text: String,
    break_after: Option<usize>,
) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for w in text.split_inclusive(' ') {
        events.push(chunk(json!({"content": w}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                       "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}));
    let stream = async_stream(events, break_after, guard);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn async_stream(
    events: Vec<Value>,
    break_after: Option<usize>,
    guard: InFlight,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    let total = events.len();
    futures::stream::unfold(
        (events.into_iter().enumerate(), guard, false),
        move |(mut it, guard, done)| async move {
            if done {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            match it.next() {
                Some((i, _)) if break_after.is_some_and(|n| i >= n) => Some((
                    Err(std::io::Error::other("connection reset by fake")),
                    (it, guard, true),
                )),
                Some((i, ev)) => {
                    let mut s = format!("data: {ev}\n\n");
                    if i + 1 == total {
                        s.push_str("data: [DONE]\n\n");
                    }
                    Some((Ok(s), (it, guard, false)))
                }
                None => None,
            }
        },
    )
}
