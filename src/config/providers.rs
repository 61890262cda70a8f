//! `providers.toml`: one table per provider, the table name is the provider's name.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI and every compatible API (Groq, vLLM, LM Studio, OpenRouter).
    Openai,
    Anthropic,
    Ollama,
    /// Answers in-process, no network.
    Dummy,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Ollama => "ollama",
            Self::Dummy => "dummy",
        }
    }
}

/// One provider as written in the file. Numbers are signed so that a negative limit is
/// reported as such rather than as a type error. Absent or ill-typed fields are `None`
/// (an ill-typed one is reported where it is read).
#[derive(Debug, Clone, Default)]
struct RawProvider {
    kind: Option<String>,
    base_url: Option<String>,
    model: Option<String>,
    auth_env: Option<String>,
    rpm: Option<i64>,
    concurrency: Option<i64>,
    tpm: Option<i64>,
    timeout_s: Option<f64>,
    max_retries: Option<i64>,
}

const KEYS: &str =
    "type, base_url, model, auth_env, rpm, concurrency, tpm, timeout_s or max_retries";

/// Reads one provider table field by field, so that every bad field of every table is
/// named at once (serde would stop at the first). `None`: not a table.
fn read_raw(
    f: &str,
    name: &str,
    value: &toml::Value,
    problems: &mut Vec<String>,
) -> Option<RawProvider> {
    let Some(table) = value.as_table() else {
        problems.push(format!(
            "{f}: {name}: must be a table ([{name}] with {KEYS}), got {} `{value}`",
            value.type_str()
        ));
        return None;
    };
    let mut raw = RawProvider::default();
    let mut kind_seen = false;
    for (k, v) in table {
        let bad = |want: &str| {
            format!(
                "{f}: {name}.{k}: expected {want}, got {} `{v}`",
                v.type_str()
            )
        };
        let text = |problems: &mut Vec<String>| match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                problems.push(bad("a string"));
                None
            }
        };
        let int = |problems: &mut Vec<String>| match v.as_integer() {
            Some(n) => Some(n),
            None => {
                problems.push(bad("an integer"));
                None
            }
        };
        match k.as_str() {
            "type" => {
                kind_seen = true;
                raw.kind = text(problems);
            }
            "base_url" => raw.base_url = text(problems),
            "model" => raw.model = text(problems),
            "auth_env" => raw.auth_env = text(problems),
            "rpm" => raw.rpm = int(problems),
            "concurrency" => raw.concurrency = int(problems),
            "tpm" => raw.tpm = int(problems),
            "max_retries" => raw.max_retries = int(problems),
            "timeout_s" => {
                raw.timeout_s = match v {
                    toml::Value::Integer(n) => Some(*n as f64),
                    toml::Value::Float(x) => Some(*x),
                    _ => {
                        problems.push(bad("a number of seconds"));
                        None
                    }
                }
            }
            _ => problems.push(format!("{f}: {name}.{k}: unknown key (expected {KEYS})")),
        }
    }
    if !kind_seen {
        problems.push(format!(
            "{f}: {name}.type: missing (openai, anthropic, ollama or dummy)"
        ));
    }
    Some(raw)
}

/// A validated provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub model: String,
    pub auth_env: Option<String>,
    /// Call starts allowed in any 60-second window, across all instances.
    pub rpm: u32,
    /// Calls in flight at once, across all instances.
    pub concurrency: u32,
    /// Tokens per 60-second window, across all instances.
    pub tpm: Option<u32>,
    pub timeout_s: f64,
    /// Retries on this provider before the job hops to the next one.
    pub max_retries: u32,
}

impl ProviderConfig {
    /// Whether `other` calls the same upstream with the same key: what one learned of
    /// the upstream (cool-downs, failures) holds for the other.
    pub fn same_upstream(&self, other: &ProviderConfig) -> bool {
        (self.kind, &self.base_url, &self.model, &self.auth_env)
            == (other.kind, &other.base_url, &other.model, &other.auth_env)
    }

    /// The secret named by `auth_env`, read at call time so that it never sits in config dumps.
    pub fn api_key(&self) -> Option<String> {
        self.auth_env
            .as_deref()
            .and_then(|k| std::env::var(k).ok())
            .filter(|v| !v.is_empty())
    }
}

pub const DEFAULT_RPM: u32 = 60;
pub const DEFAULT_CONCURRENCY: u32 = 4;
pub const DEFAULT_TIMEOUT_S: f64 = 120.0;
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// Parses and validates the file's text; every problem is reported as `file: key: reason`.
pub fn parse(file: &Path, text: &str) -> Result<BTreeMap<String, ProviderConfig>, Vec<String>> {
    let f = file.display().to_string();
    let tables: toml::Table =
        toml::from_str(text).map_err(|e| vec![format!("{f}: {}", one_line(&e.to_string()))])?;
    if tables.is_empty() {
        return Err(vec![format!("{f}: no provider tables defined")]);
    }
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, value) in &tables {
        let Some(p) = read_raw(&f, name, value, &mut problems) else {
            continue;
        };
        let name = name.clone();
        let key = |k: &str| format!("{f}: {name}.{k}");
        let kind = match p.kind.as_deref() {
            // Missing or not a string: already reported.
            None => None,
            Some("openai") => Some(ProviderKind::Openai),
            Some("anthropic") => Some(ProviderKind::Anthropic),
            Some("ollama") => Some(ProviderKind::Ollama),
            Some("dummy") => Some(ProviderKind::Dummy),
            Some(other) => {
                problems.push(format!(
                    "{}: unknown type `{other}` (expected openai, anthropic, ollama or dummy)",
                    key("type")
                ));
                None
            }
        };
        let mut limit = |k: &str, v: Option<i64>, default: u32, min: i64| -> u32 {
            match v {
                None => default,
                Some(n) if n < min => {
                    let reason = if n < 0 {
                        "must not be negative"
                    } else {
                        "must be at least 1"
                    };
                    problems.push(format!("{}: {reason}, got {n}", key(k)));
                    default
                }
                Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
            }
        };
        let rpm = limit("rpm", p.rpm, DEFAULT_RPM, 1);
        let concurrency = limit("concurrency", p.concurrency, DEFAULT_CONCURRENCY, 1);
        let tpm = p.tpm.map(|_| limit("tpm", p.tpm, 0, 1));
        let max_retries = limit("max_retries", p.max_retries, DEFAULT_MAX_RETRIES, 0);
        let timeout_s = match p.timeout_s {
            None => DEFAULT_TIMEOUT_S,
            Some(t) if t > 0.0 && t.is_finite() => t,
            Some(t) => {
                problems.push(format!(
                    "{}: must be a positive number of seconds, got {t}",
                    key("timeout_s")
                ));
                DEFAULT_TIMEOUT_S
            }
        };
        let base_url = p
            .base_url
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        if let Some(kind) = kind {
            if kind != ProviderKind::Dummy {
                if base_url.is_empty() {
                    problems.push(format!(
                        "{}: required for type {}",
                        key("base_url"),
                        kind.as_str()
                    ));
                } else if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                    problems.push(format!(
                        "{}: must start with http:// or https://, got `{base_url}`",
                        key("base_url")
                    ));
                }
            }
            let model = p.model.clone().unwrap_or_default();
            if model.is_empty() && kind != ProviderKind::Dummy {
                problems.push(format!(
                    "{}: required for type {}",
                    key("model"),
                    kind.as_str()
                ));
            }
            out.insert(
                name.clone(),
                ProviderConfig {
                    name: name.clone(),
                    kind,
                    base_url,
                    model: if model.is_empty() {
                        name.clone()
                    } else {
                        model
                    },
                    auth_env: p.auth_env.filter(|s| !s.is_empty()),
                    rpm,
                    concurrency,
                    tpm,
                    timeout_s,
                    max_retries,
                },
            );
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// TOML errors span several lines with a source excerpt; keep them readable in one line.
pub(crate) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "|")
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<BTreeMap<String, ProviderConfig>, Vec<String>> {
        parse(Path::new("providers.toml"), text)
    }

    #[test]
    fn parses_a_full_table() {
        let cfg = p(r#"
[frontier_primary]
type = "openai"
base_url = "https://api.openai.com/v1/"
model = "gpt-4.1-mini"
auth_env = "OPENAI_API_KEY"
rpm = 120
concurrency = 8
tpm = 60000
timeout_s = 120
max_retries = 2
"#)
        .unwrap();
        let f = &cfg["frontier_primary"];
        assert_eq!(f.kind, ProviderKind::Openai);
        assert_eq!(f.base_url, "https://api.openai.com/v1");
        assert_eq!(
            (f.rpm, f.concurrency, f.tpm, f.max_retries),
            (120, 8, Some(60000), 2)
        );
    }

    #[test]
    fn a_typo_names_file_and_key() {
        let err = p("[a]\ntype = \"dummy\"\nrmp = 3\n")
            .unwrap_err()
            .join("\n");
        assert!(err.contains("providers.toml"), "{err}");
        assert!(err.contains("rmp"), "{err}");
    }

    #[test]
    fn every_bad_field_of_every_table_is_listed() {
        let err = p("[a]\nrpm = -5\nbase_url = 3\n[b]\ntype = \"openai\"\ntpm = \"lots\"\nconcurrency = -1\nrmp = 1\n[c]\ntype = \"dummy\"\ntimeout_s = \"soon\"\n[d]\nx = 1\n")
            .unwrap_err()
            .join("\n");
        for expected in [
            "providers.toml: a.type: missing",
            "providers.toml: a.rpm: must not be negative, got -5",
            "providers.toml: a.base_url: expected a string, got integer `3`",
            "providers.toml: b.tpm: expected an integer, got string `\"lots\"`",
            "providers.toml: b.concurrency: must not be negative, got -1",
            "providers.toml: b.rmp: unknown key",
            "providers.toml: b.model: required for type openai",
            "providers.toml: c.timeout_s: expected a number of seconds",
            "providers.toml: d.x: unknown key",
        ] {
            assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
        }
        let err = p("top = 1\n").unwrap_err().join("\n");
        assert!(
            err.contains("providers.toml: top: must be a table"),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_listed() {
        let err = p("[a]\ntype = \"nope\"\n[b]\ntype = \"openai\"\nrpm = -1\nmodel = \"m\"\n")
            .unwrap_err();
        let all = err.join("\n");
        assert!(all.contains("a.type: unknown type `nope`"), "{all}");
        assert!(all.contains("b.rpm: must not be negative"), "{all}");
        assert!(all.contains("b.base_url: required"), "{all}");
    }
}
