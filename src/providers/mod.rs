//! Upstream adapters: one file per wire format behind one trait. An adapter translates an
//! OpenAI Chat Completions request into its provider's request and the answer back into
//! OpenAI shapes. It knows nothing of the queue, retries or budgets: it reports what
//! happened as a `ProviderError`, and the worker decides what to do about it.

pub mod anthropic;
pub mod assemble;
pub mod dummy;
pub mod ollama;
pub mod openai;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde_json::{Map, Value};

use crate::config::{ProviderConfig, ProviderKind};

/// An OpenAI Chat Completions request body.
pub type ChatBody = Map<String, Value>;

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: Option<i64>,
    pub completion: Option<i64>,
}

impl Usage {
    /// Reads an OpenAI `usage` object.
    pub fn from_openai(v: Option<&Value>) -> Self {
        let get = |k: &str| v.and_then(|u| u.get(k)).and_then(Value::as_i64);
        Self {
            prompt: get("prompt_tokens"),
            completion: get("completion_tokens"),
        }
    }

    pub fn total(&self) -> Option<i64> {
        match (self.prompt, self.completion) {
            (None, None) => None,
            (p, c) => Some(p.unwrap_or(0) + c.unwrap_or(0)),
        }
    }
}

/// A finished chat completion in OpenAI shape (`object: "chat.completion"`).
#[derive(Debug, Clone)]
pub struct Completion {
    /// Its JSON text, as stored and answered: an OpenAI-type upstream's own bytes, or the
    /// translation of another's answer.
    pub json: String,
    pub usage: Usage,
}

impl Completion {
    /// A translated answer, serialized once here.
    pub fn from_value(body: &Value, usage: Usage) -> Self {
        Self {
            json: body.to_string(),
            usage,
        }
    }

    /// The answer as a JSON tree (tests look into it).
    #[cfg(test)]
    pub fn body(&self) -> Value {
        serde_json::from_str(&self.json).expect("a completion is JSON")
    }
}

/// OpenAI `chat.completion.chunk` objects, in order.
pub type ChunkStream = BoxStream<'static, Result<Value, ProviderError>>;

/// What went wrong with one upstream call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The upstream answered with a non-success status.
    #[error("upstream returned {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
        /// The upstream's own `error.code` and `error.param` (OpenAI dialect), passed on
        /// with an error returned to the caller as it is.
        code: Option<String>,
        param: Option<String>,
    },
    #[error("upstream call timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot reach upstream: {0}")]
    Network(String),
    /// The upstream answered 2xx with something that is not a valid answer.
    #[error("upstream sent an unreadable answer: {0}")]
    BadResponse(String),
    /// The request cannot be expressed for this provider: the caller's fault, not retried.
    #[error("{0}")]
    Invalid(String),
}

impl ProviderError {
    /// The same error with a secret removed from any text it carries.
    pub fn redacted(self, secret: Option<&str>) -> Self {
        match self {
            Self::Status {
                status,
                message,
                retry_after,
                code,
                param,
            } => Self::Status {
                status,
                message: redact(&message, secret),
                retry_after,
                code: code.map(|c| redact(&c, secret)),
                param: param.map(|p| redact(&p, secret)),
            },
            Self::Network(m) => Self::Network(redact(&m, secret)),
            Self::BadResponse(m) => Self::BadResponse(redact(&m, secret)),
            other => other,
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn config(&self) -> &ProviderConfig;

    /// One non-streaming call.
    async fn complete(&self, body: &ChatBody) -> Result<Completion, ProviderError>;

    /// One streaming call. Errors before the first chunk come back as `Err` here.
    async fn stream(&self, body: &ChatBody) -> Result<ChunkStream, ProviderError>;
}

/// Every configured provider, by name.
pub type Providers = BTreeMap<String, Arc<dyn Provider>>;

/// Builds the adapters for a configuration.
pub fn build(configs: &BTreeMap<String, ProviderConfig>) -> Providers {
    configs
        .iter()
        .map(|(name, cfg)| {
            let p: Arc<dyn Provider> = match cfg.kind {
                ProviderKind::Openai => Arc::new(openai::OpenAi::new(cfg.clone())),
                ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(cfg.clone())),
                ProviderKind::Ollama => Arc::new(ollama::Ollama::new(cfg.clone())),
                ProviderKind::Dummy => Arc::new(dummy::Dummy::new(cfg.clone())),
            };
            (name.clone(), p)
        })
        .collect()
}

/// A pooled HTTP client for one provider.
pub fn http_client(cfg: &ProviderConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(usize::try_from(cfg.concurrency).unwrap_or(64).max(8))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Parses `Retry-After`: delay seconds or an HTTP date. A delay of zero (`0`, or a date
/// that is not in the future) is no cool-down at all: taken as it is, every retry would
/// meet the same 429 at once and the job would call the upstream in a tight loop until its
/// deadline. It counts as no usable value, so the configured cool-down applies.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - now;
    delta.to_std().ok().filter(|d| !d.is_zero())
}

/// Turns a failed HTTP answer into a `ProviderError`, keeping the upstream's message
/// (and its `code` and `param`), cleaned of the key.
pub async fn status_error(resp: reqwest::Response, secret: Option<&str>) -> ProviderError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
    let body = resp.text().await.unwrap_or_default();
    let UpstreamError {
        message,
        code,
        param,
    } = read_error(&body, status);
    ProviderError::Status {
        status,
        message,
        retry_after,
        code,
        param,
    }
    .redacted(secret)
}

/// What an upstream error body says, whatever its dialect.
#[derive(Debug, PartialEq)]
pub struct UpstreamError {
    /// The human message: `error.message`, a flat `error` string, else the body itself.
    pub message: String,
    /// `error.code` (a string, or a number as text), where the body has one.
    pub code: Option<String>,
    /// `error.param`, where the body has one.
    pub param: Option<String>,
}

/// Reads an upstream error body (parsed once).
pub fn read_error(body: &str, status: u16) -> UpstreamError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let e = parsed.as_ref().map(|v| v.get("error").unwrap_or(v));
    let msg = e.and_then(|e| {
        e.get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| e.as_str().map(str::to_string))
    });
    let message = match msg {
        Some(m) if !m.is_empty() => m,
        _ if body.trim().is_empty() => format!("HTTP {status} with an empty body"),
        _ => {
            let mut s: String = body.chars().take(500).collect();
            if body.len() > s.len() {
                s.push('…');
            }
            s
        }
    };
    // Only the OpenAI dialect's `error` object names a code and a param.
    let fields = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .filter(|e| e.is_object());
    let text = |key: &str| match fields?.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    UpstreamError {
        code: text("code"),
        param: text("param"),
        message,
    }
}

/// Removes a secret from text that may reach a client, a log or the database.
pub fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if s.len() >= 4 && text.contains(s) => text.replace(s, "[redacted]"),
        _ => text.to_string(),
    }
}

/// Maps a transport failure from reqwest.
pub fn transport_error(
    e: reqwest::Error,
    timeout: Duration,
    secret: Option<&str>,
) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout(timeout)
    } else if e.is_decode() || e.is_body() {
        ProviderError::BadResponse(redact(&e.to_string(), secret))
    } else {
        ProviderError::Network(redact(&without_url(&e), secret))
    }
}

/// reqwest errors carry the URL; a query string could hold a key, so keep only the cause chain.
fn without_url(e: &reqwest::Error) -> String {
    let mut msg = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if msg.is_empty() { e.to_string() } else { msg }
}

/// The text of the last user message (string content or text parts).
pub fn last_user_text(body: &ChatBody) -> String {
    let messages = body.get("messages").and_then(Value::as_array);
    let last = messages.and_then(|m| {
        m.iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    });
    content_text(last.and_then(|m| m.get("content")))
}

/// Text of a message `content`: a string, or the `text` of its parts.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_both_forms() {
        let now = chrono::Utc
            .with_ymd_and_hms(2015, 10, 21, 7, 28, 0)
            .unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("0.5", now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        // No cool-down at all is no usable value (the configured one applies).
        assert_eq!(parse_retry_after("0", now), None);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            None
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            None
        );
    }

    #[test]
    fn error_messages_of_every_dialect() {
        let error_message = |body: &str, status: u16| read_error(body, status).message;
        let error_code_and_param = |body: &str| {
            let e = read_error(body, 400);
            (e.code, e.param)
        };
        assert_eq!(
            error_message(r#"{"error":{"message":"bad key","type":"x"}}"#, 401),
            "bad key"
        );
        assert_eq!(
            error_message(
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                529
            ),
            "Overloaded"
        );
        assert_eq!(
            error_message(r#"{"error":"model not found"}"#, 404),
            "model not found"
        );
        assert_eq!(error_message("", 500), "HTTP 500 with an empty body");
        assert_eq!(
            error_code_and_param(
                r#"{"error":{"message":"too long","code":"context_length_exceeded","param":"messages"}}"#
            ),
            (
                Some("context_length_exceeded".into()),
                Some("messages".into())
            )
        );
        assert_eq!(
            error_code_and_param(r#"{"error":{"message":"x","code":42,"param":null}}"#),
            (Some("42".into()), None)
        );
        assert_eq!(error_code_and_param(r#"{"error":"flat"}"#), (None, None));
        assert_eq!(error_code_and_param("<html>"), (None, None));
        assert_eq!(error_message("<html>oops</html>", 502), "<html>oops</html>");
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact("invalid key sk-secret-123", Some("sk-secret-123")),
            "invalid key [redacted]"
        );
        assert_eq!(redact("fine", None), "fine");
        let e = ProviderError::Status {
            status: 500,
            message: "bad key sk-secret-123 in stream".into(),
            retry_after: None,
            code: None,
            param: None,
        };
        assert_eq!(
            e.redacted(Some("sk-secret-123")).to_string(),
            "upstream returned 500: bad key [redacted] in stream"
        );
    }
}
