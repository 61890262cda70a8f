//! Checks a Chat Completions request before it becomes a job: every error names the field.
//! Fields the gateway does not know pass through untouched.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::config::Defaults;

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Parses a body that must be a JSON object.
pub fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}"), None))?;
    let Value::Object(body) = value else {
        return Err(ApiError::invalid(
            "request body must be a JSON object",
            None,
        ));
    };
    Ok(body)
}

/// Parses and checks the body; returns the request object.
pub fn chat_request(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let body = json_object(bytes)?;
    check_messages(body.get("messages"))?;
    let expect = |field: &str, ok: fn(&Value) -> bool, what: &str| -> Result<(), ApiError> {
        match body.get(field) {
            Some(v) if !v.is_null() && !ok(v) => Err(ApiError::invalid(
                format!("`{field}` must be {what}, got {}", kind_of(v)),
                Some(field),
            )),
            _ => Ok(()),
        }
    };
    expect("model", Value::is_string, "a string")?;
    expect(
        "temperature",
        |v| v.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t)),
        "a number between 0 and 2",
    )?;
    expect(
        "top_p",
        |v| v.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)),
        "a number between 0 and 1",
    )?;
    expect(
        "max_tokens",
        |v| v.as_u64().is_some_and(|n| n >= 1),
        "a positive integer",
    )?;
    expect(
        "max_completion_tokens",
        |v| v.as_u64().is_some_and(|n| n >= 1),
        "a positive integer",
    )?;
    expect(
        "n",
        |v| v.as_u64().is_some_and(|n| (1..=128).contains(&n)),
        "an integer from 1 to 128",
    )?;
    expect("stream", Value::is_boolean, "a boolean")?;
    expect("stream_options", Value::is_object, "an object")?;
    let streamed = body.get("stream").and_then(Value::as_bool) == Some(true);
    if !streamed && body.get("stream_options").is_some_and(|o| !o.is_null()) {
        // OpenAI's own refusal, in its words.
        return Err(ApiError::invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
        ));
    }
    if let Some(v) = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .filter(|v| !v.is_null() && !v.is_boolean())
    {
        let field = "stream_options.include_usage";
        return Err(ApiError::invalid(
            format!("`{field}` must be a boolean, got {}", kind_of(v)),
            Some(field),
        ));
    }
    expect(
        "stop",
        |v| v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        "a string or an array of strings",
    )?;
    expect("tools", Value::is_array, "an array")?;
    expect(
        "tool_choice",
        |v| v.is_string() || v.is_object(),
        "a string or an object",
    )?;
    expect("response_format", Value::is_object, "an object")?;
    // OpenAI's bounds: a client that sends more gets the 400 it would get there, not an
    // upstream's error (or silence) later.
    for field in ["presence_penalty", "frequency_penalty"] {
        expect(
            field,
            |v| v.as_f64().is_some_and(|p| (-2.0..=2.0).contains(&p)),
            "a number between -2 and 2",
        )?;
    }
    expect("logprobs", Value::is_boolean, "a boolean")?;
    expect(
        "top_logprobs",
        |v| v.as_u64().is_some_and(|n| n <= 20),
        "an integer from 0 to 20",
    )?;
    expect("logit_bias", Value::is_object, "an object")?;
    expect("parallel_tool_calls", Value::is_boolean, "a boolean")?;
    expect("seed", Value::is_i64, "an integer")?;
    expect("user", Value::is_string, "a string")?;
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        for (i, t) in tools.iter().enumerate() {
            let name = t
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            if !t.is_object() || name.is_none_or(str::is_empty) {
                return Err(ApiError::invalid(
                    format!("`tools[{i}]` must be an object with `function.name`"),
                    Some(&format!("tools[{i}]")),
                ));
            }
        }
    }
    Ok(body)
}

fn check_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let Some(messages) = messages else {
        return Err(ApiError::invalid(
            "`messages` is required",
            Some("messages"),
        ));
    };
    let Some(list) = messages.as_array() else {
        return Err(ApiError::invalid(
            format!("`messages` must be an array, got {}", kind_of(messages)),
            Some("messages"),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
            Some("messages"),
        ));
    }
    for (i, m) in list.iter().enumerate() {
        let field = |k: &str| format!("messages[{i}].{k}");
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                format!("`messages[{i}]` must be an object, got {}", kind_of(m)),
                Some(&format!("messages[{i}]")),
            ));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(ApiError::invalid(
                    format!(
                        "`{}` must be one of {}, got `{r}`",
                        field("role"),
                        ROLES.join(", ")
                    ),
                    Some(&field("role")),
                ));
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    format!("`{}` must be a string, got {}", field("role"), kind_of(v)),
                    Some(&field("role")),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    format!("`{}` is required", field("role")),
                    Some(&field("role")),
                ));
            }
        };
        match obj.get("content") {
            // As OpenAI: only an assistant's turn (or a legacy function result) may come
            // without content, e.g. when it holds only tool calls.
            None | Some(Value::Null) if !matches!(role, "assistant" | "function") => {
                return Err(ApiError::invalid(
                    format!("`{}` is required for a `{role}` message", field("content")),
                    Some(&field("content")),
                ));
            }
            None | Some(Value::Null | Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    if !p.get("type").is_some_and(Value::is_string) {
                        let f = format!("messages[{i}].content[{j}]");
                        return Err(ApiError::invalid(
                            format!("`{f}` must be an object with a `type`"),
                            Some(&f),
                        ));
                    }
                }
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    format!(
                        "`{}` must be a string or an array of parts, got {}",
                        field("content"),
                        kind_of(v)
                    ),
                    Some(&field("content")),
                ));
            }
        }
    }
    Ok(())
}

/// Fills what the request omits from the router's defaults.
pub fn apply_defaults(body: &mut Map<String, Value>, d: &Defaults) {
    if let Some(t) = d.temperature
        && body.get("temperature").is_none_or(Value::is_null)
    {
        body.insert("temperature".into(), Value::from(t));
    }
    if let Some(m) = d.max_tokens {
        let has_limit = ["max_tokens", "max_completion_tokens"]
            .iter()
            .any(|k| body.get(*k).is_some_and(|v| !v.is_null()));
        if !has_limit {
            body.insert("max_tokens".into(), Value::from(m));
        }
    }
}

/// What a wrong value is, for the error: a number or boolean itself (a value out of its
/// range is a number of the right kind), else its kind.
fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        chat_request(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn accepts_a_normal_request_and_keeps_unknown_fields() {
        let b = chat_request(
            br#"{"model":"x","messages":[{"role":"user","content":"hi"}],"custom_thing":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(b["custom_thing"]["a"], 1);
        // An assistant turn that only calls tools has no content.
        chat_request(
            br#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn every_bad_field_is_named() {
        assert!(err("{not json").message.contains("not valid JSON"));
        assert_eq!(err("[]").status, 400);
        assert_eq!(err(r#"{"model":"x"}"#).param.as_deref(), Some("messages"));
        assert_eq!(err(r#"{"messages":[]}"#).param.as_deref(), Some("messages"));
        assert_eq!(
            err(r#"{"messages":"hi"}"#).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(r#"{"messages":[{"content":"hi"}]}"#).param.as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(r#"{"messages":[{"role":"wizard","content":"hi"}]}"#)
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(r#"{"messages":[{"role":"user"}]}"#).param.as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            err(r#"{"messages":[{"role":"system","content":null}]}"#)
                .param
                .as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            err(r#"{"messages":[{"role":"user","content":5}]}"#)
                .param
                .as_deref(),
            Some("messages[0].content")
        );
        let m = r#"[{"role":"user","content":"hi"}]"#;
        assert_eq!(
            err(&format!(r#"{{"messages":{m},"temperature":"hot"}}"#))
                .param
                .as_deref(),
            Some("temperature")
        );
        assert_eq!(
            err(&format!(r#"{{"messages":{m},"max_tokens":-1}}"#))
                .param
                .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            err(&format!(r#"{{"messages":{m},"stream":"yes"}}"#))
                .param
                .as_deref(),
            Some("stream")
        );
        assert_eq!(
            err(&format!(r#"{{"messages":{m},"model":7}}"#))
                .param
                .as_deref(),
            Some("model")
        );
        assert_eq!(
            err(&format!(r#"{{"messages":{m},"tools":[{{}}]}}"#))
                .param
                .as_deref(),
            Some("tools[0]")
        );
    }

    #[test]
    fn a_value_out_of_range_is_shown() {
        let m = r#"[{"role":"user","content":"hi"}]"#;
        let e = err(&format!(r#"{{"messages":{m},"temperature":3}}"#));
        assert_eq!(
            e.message,
            "`temperature` must be a number between 0 and 2, got 3"
        );
        let e = err(&format!(r#"{{"messages":{m},"max_tokens":0}}"#));
        assert_eq!(e.message, "`max_tokens` must be a positive integer, got 0");
        let e = err(&format!(r#"{{"messages":{m},"stream":"yes"}}"#));
        assert_eq!(e.message, "`stream` must be a boolean, got a string");
        // OpenAI's own bound on `n`.
        let e = err(&format!(r#"{{"messages":{m},"n":129}}"#));
        assert_eq!(
            (e.message.as_str(), e.param.as_deref()),
            ("`n` must be an integer from 1 to 128, got 129", Some("n"))
        );
        assert!(chat_request(format!(r#"{{"messages":{m},"n":128}}"#).as_bytes()).is_ok());
        for (field, value, what) in [
            ("presence_penalty", "5", "a number between -2 and 2, got 5"),
            (
                "frequency_penalty",
                "-2.5",
                "a number between -2 and 2, got -2.5",
            ),
            ("logprobs", r#""x""#, "a boolean, got a string"),
            ("top_logprobs", "21", "an integer from 0 to 20, got 21"),
            ("logit_bias", "[]", "an object, got an array"),
            ("parallel_tool_calls", "1", "a boolean, got 1"),
        ] {
            let e = err(&format!(r#"{{"messages":{m},"{field}":{value}}}"#));
            assert_eq!(e.message, format!("`{field}` must be {what}"));
            assert_eq!(e.param.as_deref(), Some(field));
        }
        let fine = format!(
            r#"{{"messages":{m},"presence_penalty":-2,"frequency_penalty":1.5,"logprobs":true,"top_logprobs":0,"logit_bias":{{"50256":-100}},"parallel_tool_calls":false}}"#
        );
        assert!(chat_request(fine.as_bytes()).is_ok());
    }

    #[test]
    fn stream_options_need_a_stream() {
        let m = r#"[{"role":"user","content":"hi"}]"#;
        for body in [
            format!(r#"{{"messages":{m},"stream_options":{{"include_usage":true}}}}"#),
            format!(r#"{{"messages":{m},"stream":false,"stream_options":{{}}}}"#),
        ] {
            let e = err(&body);
            assert_eq!(e.param.as_deref(), Some("stream_options"), "{body}");
            assert!(
                e.message.contains("only allowed when 'stream'"),
                "{}",
                e.message
            );
        }
        // `null` is no option at all.
        let none = format!(r#"{{"messages":{m},"stream_options":null}}"#);
        assert!(chat_request(none.as_bytes()).is_ok());
    }

    #[test]
    fn include_usage_must_be_a_boolean() {
        let m = r#"[{"role":"user","content":"hi"}]"#;
        let e = err(&format!(
            r#"{{"messages":{m},"stream":true,"stream_options":{{"include_usage":"x"}}}}"#
        ));
        assert_eq!(e.param.as_deref(), Some("stream_options.include_usage"));
        assert!(e.message.contains("must be a boolean"), "{}", e.message);
        chat_request(
            format!(
                r#"{{"messages":{m},"stream":true,"stream_options":{{"include_usage":true}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
    }

    #[test]
    fn defaults_fill_only_what_is_missing() {
        let d = Defaults {
            temperature: Some(0.2),
            max_tokens: Some(100),
            task_header: "x".into(),
        };
        let mut b =
            chat_request(br#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.9}"#)
                .unwrap();
        apply_defaults(&mut b, &d);
        assert_eq!(b["temperature"], 0.9);
        assert_eq!(b["max_tokens"], 100);
        let mut b = chat_request(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5}"#,
        )
        .unwrap();
        apply_defaults(&mut b, &d);
        assert!(b.get("max_tokens").is_none());
    }
}
