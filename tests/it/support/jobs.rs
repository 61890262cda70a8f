//! Jobs as requests make them, for tests that drive the store or the worker directly.

use llm_orch::queue::{NewJob, PRIORITY_INTERACTIVE};

/// A chat request body any fake upstream answers.
pub const REQUEST: &str = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;

/// An interactive job on `chain`, accepted at `created_at`, due within 10 minutes.
pub fn new_job(id: &str, chain: &[&str], created_at: i64) -> NewJob {
    NewJob {
        id: id.into(),
        task: "DEFAULT".into(),
        chain: chain.iter().map(|s| s.to_string()).collect(),
        hop: 0,
        request: REQUEST.into(),
        stream: false,
        priority: PRIORITY_INTERACTIVE,
        caller: None,
        idempotency_key: None,
        pinned_instance: None,
        created_at,
        deadline_at: created_at + 600_000,
        batch_id: None,
        custom_id: None,
    }
}
