//! `router.yaml`: request defaults and routes keyed by task kind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use super::providers::one_line;

pub const DEFAULT_ROUTE: &str = "DEFAULT";
pub const DEFAULT_TASK_HEADER: &str = "x-orch-task-kind";

#[derive(Debug, Default)]
struct RawRouter {
    defaults: RawDefaults,
    routes: BTreeMap<String, RawRoute>,
}

#[derive(Debug, Default)]
struct RawDefaults {
    temperature: Option<f64>,
    max_tokens: Option<i64>,
    task_header: Option<String>,
}

#[derive(Debug, Default)]
struct RawRoute {
    strategy: Option<String>,
    primary: Option<String>,
    fallback: Vec<String>,
    targets: Vec<RawTarget>,
    sticky_ttl: Option<i64>,
    /// A `primary` or a target could not be read (reported already: a route left empty
    /// by it is not reported again).
    bad_targets: bool,
}

/// Reads the file key by key, so that every bad key is named at once: serde would stop
/// at the first one. Each field's value is still read by serde, which names its reason.
fn read_raw(f: &str, text: &str) -> Result<(RawRouter, Vec<String>), Vec<String>> {
    use serde_yaml::Value;
    let root: Value = serde_yaml::from_str(text)
        .map_err(|e| vec![format!("{f}: {}", one_line(&e.to_string()))])?;
    let mut problems = Vec::new();
    let mut raw = RawRouter::default();
    let top = match root {
        Value::Null => return Ok((raw, problems)),
        Value::Mapping(m) => m,
        other => {
            return Err(vec![format!(
                "{f}: expected a mapping with `defaults` and `routes`, got {}",
                yaml_kind(&other)
            )]);
        }
    };
    for (k, v) in &top {
        match k.as_str() {
            Some("defaults") => {
                for (k, v) in mapping(f, "defaults", v, &mut problems) {
                    let key = format!("{f}: defaults.{k}");
                    match k.as_str() {
                        "temperature" => raw.defaults.temperature = field(&key, v, &mut problems),
                        "max_tokens" => raw.defaults.max_tokens = field(&key, v, &mut problems),
                        "task_header" => raw.defaults.task_header = field(&key, v, &mut problems),
                        _ => problems.push(format!(
                            "{key}: unknown key (expected temperature, max_tokens or task_header)"
                        )),
                    }
                }
            }
            Some("routes") => {
                for (name, v) in mapping(f, "routes", v, &mut problems) {
                    let route = read_route(f, &name, v, &mut problems);
                    raw.routes.insert(name, route);
                }
            }
            _ => problems.push(format!(
                "{f}: {}: unknown key (expected defaults or routes)",
                key_text(k)
            )),
        }
    }
    Ok((raw, problems))
}

fn read_route(f: &str, name: &str, v: &serde_yaml::Value, problems: &mut Vec<String>) -> RawRoute {
    let mut route = RawRoute::default();
    for (k, v) in mapping(f, &format!("routes.{name}"), v, problems) {
        let key = format!("{f}: routes.{name}.{k}");
        match k.as_str() {
            "strategy" => route.strategy = field(&key, v, problems),
            "primary" => {
                route.primary = field(&key, v, problems);
                route.bad_targets |= route.primary.is_none();
            }
            "fallback" => route.fallback = field(&key, v, problems).unwrap_or_default(),
            "sticky_ttl" => route.sticky_ttl = field(&key, v, problems),
            "targets" => {
                let items: Option<Vec<serde_yaml::Value>> = field(&key, v, problems);
                let items = items.unwrap_or_else(|| {
                    route.bad_targets = true;
                    Vec::new()
                });
                route.targets = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, t)| field(&format!("{key}[{i}]"), t, problems))
                    .collect();
                route.bad_targets |= route.targets.len() < items.len();
            }
            _ => problems.push(format!(
                "{key}: unknown key (expected strategy, primary, fallback, targets or sticky_ttl)"
            )),
        }
    }
    route
}

/// The entries of a mapping, keys as text; anything else is reported.
fn mapping<'v>(
    f: &str,
    key: &str,
    v: &'v serde_yaml::Value,
    problems: &mut Vec<String>,
) -> Vec<(String, &'v serde_yaml::Value)> {
    match v {
        serde_yaml::Value::Mapping(m) => m.iter().map(|(k, v)| (key_text(k), v)).collect(),
        serde_yaml::Value::Null => Vec::new(),
        other => {
            problems.push(format!(
                "{f}: {key}: expected a mapping, got {}",
                yaml_kind(other)
            ));
            Vec::new()
        }
    }
}

/// One field's value read by serde; a bad one is reported under `key`.
fn field<T: serde::de::DeserializeOwned>(
    key: &str,
    v: &serde_yaml::Value,
    problems: &mut Vec<String>,
) -> Option<T> {
    match serde_yaml::from_value(v.clone()) {
        Ok(x) => Some(x),
        Err(e) => {
            problems.push(format!("{key}: {}", one_line(&e.to_string())));
            None
        }
    }
}

fn key_text(k: &serde_yaml::Value) -> String {
    match k {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "nothing",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    provider: String,
    weight: Option<i64>,
    circuit_breaker: Option<RawBreaker>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failure_threshold: i64,
    recovery_time_s: f64,
}

/// Values applied to a request that omits them.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// Lower-cased header name that carries the task kind.
    pub task_header: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Targets in order; the first available one answers, the rest are fallbacks.
    Priority,
    /// One target picked by weight, the rest follow as fallbacks.
    Weighted,
    /// The same sticky key keeps the provider that last served it.
    Sticky,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    pub failure_threshold: u32,
    pub recovery_time_s: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub provider: String,
    pub weight: u32,
    pub circuit_breaker: Option<CircuitBreaker>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub strategy: Strategy,
    pub targets: Vec<Target>,
    pub sticky_ttl_s: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub defaults: Defaults,
    pub routes: BTreeMap<String, Route>,
}

impl RouterConfig {
    /// The breaker settings of a provider: the first route target that defines one wins.
    pub fn breaker_for(&self, provider: &str) -> Option<&CircuitBreaker> {
        self.routes
            .values()
            .flat_map(|r| r.targets.iter())
            .filter(|t| t.provider == provider)
            .find_map(|t| t.circuit_breaker.as_ref())
    }
}

/// Parses and validates the file against the known provider names; every problem is
/// reported as `file: key: reason`.
pub fn parse(
    file: &Path,
    text: &str,
    providers: &BTreeSet<String>,
) -> Result<RouterConfig, Vec<String>> {
    let f = file.display().to_string();
    let (raw, mut problems) = read_raw(&f, text)?;

    let max_tokens = match raw.defaults.max_tokens {
        Some(n) if n < 1 => {
            problems.push(format!(
                "{f}: defaults.max_tokens: must be at least 1, got {n}"
            ));
            None
        }
        other => other.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
    };
    if let Some(t) = raw.defaults.temperature
        && !(0.0..=2.0).contains(&t)
    {
        problems.push(format!(
            "{f}: defaults.temperature: must be between 0 and 2, got {t}"
        ));
    }
    let task_header = raw
        .defaults
        .task_header
        .unwrap_or_else(|| DEFAULT_TASK_HEADER.into())
        .trim()
        .to_ascii_lowercase();
    if task_header.is_empty() || axum::http::HeaderName::from_bytes(task_header.as_bytes()).is_err()
    {
        problems.push(format!(
            "{f}: defaults.task_header: not a valid header name `{task_header}`"
        ));
    }

    let mut routes = BTreeMap::new();
    for (name, r) in raw.routes {
        let bad_targets = r.bad_targets;
        let key = |k: &str| format!("{f}: routes.{name}.{k}");
        let strategy = match r.strategy.as_deref() {
            None | Some("priority") => Strategy::Priority,
            Some("weighted") => Strategy::Weighted,
            Some("sticky") => Strategy::Sticky,
            Some(other) => {
                problems.push(format!(
                    "{}: unknown strategy `{other}` (expected priority, weighted or sticky)",
                    key("strategy")
                ));
                Strategy::Priority
            }
        };
        let mut targets = Vec::new();
        // Where each target was written, for problems that name it.
        let mut written_at = Vec::new();
        if let Some(primary) = r.primary {
            if !r.targets.is_empty() {
                problems.push(format!(
                    "{}: use either primary/fallback or targets, not both",
                    key("targets")
                ));
            }
            targets.push(Target {
                provider: primary,
                weight: 1,
                circuit_breaker: None,
            });
            written_at.push(key("primary"));
            for (i, p) in r.fallback.into_iter().enumerate() {
                targets.push(Target {
                    provider: p,
                    weight: 1,
                    circuit_breaker: None,
                });
                written_at.push(key(&format!("fallback[{i}]")));
            }
        } else {
            if !r.fallback.is_empty() {
                problems.push(format!("{}: fallback needs a primary", key("fallback")));
            }
            for (i, t) in r.targets.into_iter().enumerate() {
                let weight = match t.weight {
                    None => 1,
                    Some(w) if w < 1 => {
                        problems.push(format!(
                            "{}: must be at least 1, got {w}",
                            key(&format!("targets[{i}].weight"))
                        ));
                        1
                    }
                    Some(w) => u32::try_from(w).unwrap_or(u32::MAX),
                };
                let circuit_breaker = t.circuit_breaker.and_then(|b| {
                    let k = key(&format!("targets[{i}].circuit_breaker"));
                    let mut ok = true;
                    if b.failure_threshold < 1 {
                        problems.push(format!(
                            "{k}.failure_threshold: must be at least 1, got {}",
                            b.failure_threshold
                        ));
                        ok = false;
                    }
                    if !(b.recovery_time_s > 0.0 && b.recovery_time_s.is_finite()) {
                        problems.push(format!(
                            "{k}.recovery_time_s: must be positive, got {}",
                            b.recovery_time_s
                        ));
                        ok = false;
                    }
                    if !ok {
                        return None;
                    }
                    Some(CircuitBreaker {
                        failure_threshold: u32::try_from(b.failure_threshold).unwrap_or(u32::MAX),
                        recovery_time_s: b.recovery_time_s,
                    })
                });
                targets.push(Target {
                    provider: t.provider,
                    weight,
                    circuit_breaker,
                });
                written_at.push(key(&format!("targets[{i}]")));
            }
        }
        if targets.is_empty() && !bad_targets {
            problems.push(format!(
                "{}: route has no targets (set primary or targets)",
                key("targets")
            ));
        }
        let mut seen = BTreeSet::new();
        for (t, at) in targets.iter().zip(&written_at) {
            if !providers.contains(&t.provider) {
                problems.push(format!(
                    "{at}: unknown provider `{}` (known: {})",
                    t.provider,
                    providers.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            if !seen.insert(t.provider.clone()) {
                problems.push(format!("{at}: provider `{}` listed twice", t.provider));
            }
        }
        let sticky_ttl_s = match r.sticky_ttl {
            None => 300,
            Some(n) if n < 1 => {
                problems.push(format!(
                    "{}: must be at least 1, got {n}",
                    key("sticky_ttl")
                ));
                300
            }
            Some(n) => n as u64,
        };
        routes.insert(
            name.clone(),
            Route {
                name,
                strategy,
                targets,
                sticky_ttl_s,
            },
        );
    }
    if !routes.contains_key(DEFAULT_ROUTE) {
        problems.push(format!(
            "{f}: routes.DEFAULT: missing (requests that name no route go there)"
        ));
    }
    if problems.is_empty() {
        Ok(RouterConfig {
            defaults: Defaults {
                temperature: raw.defaults.temperature,
                max_tokens,
                task_header,
            },
            routes,
        })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    const SAMPLE: &str = r#"
defaults:
  temperature: 0.2
  max_tokens: 2048
  task_header: X-Orch-Task-Kind
routes:
  PLAN:
    primary: a
    fallback: [b, c]
  CRITIQUE:
    strategy: weighted
    targets: [{provider: a, weight: 3}, {provider: b, weight: 1}]
  CODE:
    strategy: sticky
    sticky_ttl: 30
    targets: [{provider: b}, {provider: c}]
  DEFAULT:
    strategy: priority
    targets:
      - provider: b
        circuit_breaker: {failure_threshold: 3, recovery_time_s: 60}
      - provider: c
"#;

    #[test]
    fn parses_every_route_shape() {
        let r = parse(Path::new("router.yaml"), SAMPLE, &names(&["a", "b", "c"])).unwrap();
        assert_eq!(r.defaults.task_header, "x-orch-task-kind");
        assert_eq!(r.defaults.max_tokens, Some(2048));
        let plan: Vec<_> = r.routes["PLAN"]
            .targets
            .iter()
            .map(|t| t.provider.as_str())
            .collect();
        assert_eq!(plan, ["a", "b", "c"]);
        assert_eq!(r.routes["CRITIQUE"].strategy, Strategy::Weighted);
        assert_eq!(r.routes["CRITIQUE"].targets[0].weight, 3);
        assert_eq!(r.routes["CODE"].sticky_ttl_s, 30);
        assert_eq!(r.breaker_for("b").unwrap().failure_threshold, 3);
        assert!(r.breaker_for("a").is_none());
    }

    #[test]
    fn unknown_provider_and_empty_route_are_named() {
        let text = "routes:\n  PLAN:\n    primary: nope\n    fallback: [a, gone]\n  EMPTY: {}\n  DEFAULT:\n    primary: a\n";
        let err = parse(Path::new("router.yaml"), text, &names(&["a"]))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("router.yaml: routes.PLAN.primary: unknown provider `nope`"),
            "{err}"
        );
        assert!(
            err.contains("router.yaml: routes.PLAN.fallback[1]: unknown provider `gone`"),
            "{err}"
        );
        assert!(
            err.contains("routes.EMPTY.targets: route has no targets"),
            "{err}"
        );
    }

    #[test]
    fn typo_and_missing_default_are_named() {
        let err = parse(
            Path::new("router.yaml"),
            "routes:\n  PLAN:\n    primray: a\n",
            &names(&["a"]),
        )
        .unwrap_err()
        .join("\n");
        assert!(err.contains("router.yaml"), "{err}");
        assert!(err.contains("primray"), "{err}");
        let err = parse(
            Path::new("router.yaml"),
            "routes:\n  PLAN:\n    primary: a\n",
            &names(&["a"]),
        )
        .unwrap_err()
        .join("\n");
        assert!(err.contains("routes.DEFAULT: missing"), "{err}");
    }

    #[test]
    fn bad_strategy_and_negative_weight_are_named() {
        let text =
            "routes:\n  DEFAULT:\n    strategy: random\n    targets: [{provider: a, weight: -2}]\n";
        let err = parse(Path::new("router.yaml"), text, &names(&["a"]))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("routes.DEFAULT.strategy: unknown strategy `random`"),
            "{err}"
        );
        assert!(
            err.contains("routes.DEFAULT.targets[0].weight: must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn every_bad_key_is_named_at_once() {
        let text = "defaults:\n  max_tokens: -5\n  temprature: 1\nroutes:\n  DEFAULT:\n    primary: a\n    fallbak: [b]\n    sticky_ttl: -1\n  PLAN:\n    targets:\n      - {provider: a, circuit_breaker: {failure_threshold: -1, recovery_time_s: -2}}\n      - {provider: b, wieght: 2}\n  CODE:\n    primary: 7\n    sticky_ttl: soon\nextra: 1\n";
        let err = parse(Path::new("router.yaml"), text, &names(&["a", "b"]))
            .unwrap_err()
            .join("\n");
        for expected in [
            "router.yaml: defaults.max_tokens: must be at least 1, got -5",
            "router.yaml: defaults.temprature: unknown key",
            "router.yaml: routes.DEFAULT.fallbak: unknown key",
            "router.yaml: routes.DEFAULT.sticky_ttl: must be at least 1, got -1",
            "routes.PLAN.targets[0].circuit_breaker.failure_threshold: must be at least 1",
            "routes.PLAN.targets[0].circuit_breaker.recovery_time_s: must be positive",
            "router.yaml: routes.PLAN.targets[1]: unknown field `wieght`",
            "router.yaml: routes.CODE.sticky_ttl: invalid type",
            "router.yaml: extra: unknown key",
        ] {
            assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
        }
        // CODE's primary is reported as ill-typed, not again as a route without targets.
        assert!(
            !err.contains("routes.CODE.targets: route has no targets"),
            "{err}"
        );
    }
}
