//! Inbound API keys. The key comes in the configured header or as
//! `Authorization: Bearer KEY` (what the OpenAI SDKs send). Keys are compared in constant
//! time, and only a hash of the caller's key is ever stored (to scope jobs to it).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// Who is calling: the hash of their key, `None` when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Option<String>);

pub async fn require_key(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let settings = &app.shared.settings;
    if settings.inbound_api_keys.is_empty() {
        req.extensions_mut().insert(Caller(None));
        return next.run(req).await;
    }
    let headers = req.headers();
    let presented = headers
        .get(settings.api_key_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
        })
        .map(str::to_string);
    let Some(key) = presented else {
        return ApiError::unauthorized().into_response();
    };
    // Check every key, without stopping early, so timing does not tell which one matched.
    let matched = settings.inbound_api_keys.iter().fold(false, |acc, k| {
        acc | constant_time_eq(k.as_bytes(), key.as_bytes())
    });
    if !matched {
        return ApiError::unauthorized().into_response();
    }
    req.extensions_mut().insert(Caller(Some(key_hash(&key))));
    next.run(req).await
}

/// The stored identity of a key: its SHA-256, hex.
pub fn key_hash(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal-length inputs are compared without an early exit; lengths are not secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_and_hash() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert_eq!(key_hash("k").len(), 64);
        assert_ne!(key_hash("k"), key_hash("l"));
    }
}
