//! CORS for browser clients (`ORCH_CORS_ALLOW_ORIGINS`).
//!
//! Written here rather than with tower-http's layer because that layer adds
//! `access-control-allow-methods/headers/expose-headers` to every answer, allowed origin
//! or not, and lists request headers only exactly: the OpenAI SDKs send a family of
//! `x-stainless-*` headers that grows with their versions, and our own are `x-orch-*`.
//! Here an origin not on the list gets no CORS header at all, and a preflight from an
//! allowed one gets every header of those families it asks for.
//!
//! This runs outside the key check: a browser never sends credentials on a preflight.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{HDR_FALLBACKS, HDR_OPENAI_REQUEST_ID, HDR_PROVIDER, HDR_REQUEST_ID, HDR_SHOULD_RETRY};

/// Request headers browsers may send, beyond the CORS-safelisted ones.
const ALLOWED: &[&str] = &[
    "authorization",
    "content-type",
    "x-api-key",
    "idempotency-key",
    "openai-organization",
    "openai-project",
    "openai-beta",
];
/// Header families allowed whatever their suffix.
const ALLOWED_PREFIXES: &[&str] = &["x-orch-", "x-stainless-"];
const METHODS: &str = "GET, POST, DELETE, OPTIONS";
const MAX_AGE_SECS: &str = "600";

pub struct CorsPolicy {
    any: bool,
    origins: Vec<String>,
    /// Also allowed: the configured key header and task header (names may differ from
    /// the defaults).
    extra_headers: Vec<String>,
    expose: HeaderValue,
}

impl CorsPolicy {
    pub fn new(origins: &[String], extra_headers: &[&str]) -> Self {
        let expose = [
            HDR_REQUEST_ID,
            HDR_OPENAI_REQUEST_ID,
            HDR_PROVIDER,
            HDR_FALLBACKS,
            HDR_SHOULD_RETRY,
            "retry-after",
            "location",
        ]
        .join(", ");
        Self {
            any: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            extra_headers: extra_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            expose: HeaderValue::from_str(&expose)
                .unwrap_or_else(|_| HeaderValue::from_static("x-orch-request-id")),
        }
    }

    fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    fn header_allowed(&self, name: &str) -> bool {
        ALLOWED.contains(&name)
            || ALLOWED_PREFIXES.iter().any(|p| name.starts_with(p))
            || self.extra_headers.iter().any(|h| h == name)
    }

    /// The `access-control-allow-headers` of a preflight: the fixed list, the
    /// configured headers, and every requested header of an allowed family.
    fn allow_headers(&self, requested: Option<&str>) -> String {
        let mut names: Vec<String> = ALLOWED.iter().map(|s| s.to_string()).collect();
        let requested = requested
            .unwrap_or("")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty() && self.header_allowed(h));
        // The configured key header is often one of the fixed list (`x-api-key`).
        for h in self.extra_headers.iter().cloned().chain(requested) {
            if !names.contains(&h) {
                names.push(h);
            }
        }
        names.join(", ")
    }

    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }
}

pub async fn handle(State(policy): State<Arc<CorsPolicy>>, req: Request, next: Next) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        return next.run(req).await;
    };
    let allowed = origin.to_str().is_ok_and(|o| policy.allows(o));
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "this origin is not allowed (ORCH_CORS_ALLOW_ORIGINS)",
            )
            .into_response();
        }
        let requested = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .and_then(|v| v.to_str().ok());
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            policy.allow_origin(&origin),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(METHODS),
        );
        if let Ok(v) = HeaderValue::from_str(&policy.allow_headers(requested)) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECS),
        );
        h.insert(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        return (StatusCode::NO_CONTENT, h).into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if allowed {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            policy.allow_origin(&origin),
        );
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, policy.expose.clone());
    }
    // Allowed or not, the answer depends on the origin (a cache must not serve one
    // origin's answer to another).
    if !policy.any {
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_families_and_origins() {
        let p = CorsPolicy::new(&["https://app.example".into()], &["x-custom-key", "x-task"]);
        assert!(p.allows("https://app.example"));
        assert!(!p.allows("https://evil.example"));
        let h = p.allow_headers(Some("X-Orch-Task-Kind, x-stainless-os, x-evil, x-task"));
        assert!(h.contains("x-orch-task-kind"), "{h}");
        assert!(h.contains("x-stainless-os"), "{h}");
        assert!(h.contains("x-custom-key"), "{h}");
        assert!(h.contains("x-task"), "{h}");
        assert!(!h.contains("x-evil"), "{h}");
        // The key header named twice (fixed list and configured) is listed once.
        let p = CorsPolicy::new(&["https://app.example".into()], &["x-api-key"]);
        let h = p.allow_headers(Some("x-api-key, x-orch-async"));
        assert_eq!(h.matches("x-api-key").count(), 1, "{h}");
        assert_eq!(h.matches("x-orch-async").count(), 1, "{h}");
    }
}
