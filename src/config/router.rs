//! `router.yaml`: request defaults and routes keyed by task kind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use super::providers::one_line;

pub const DEFAULT_ROUTE: &str = "DEFAULT";
pub const DEFAULT_TASK_HEADER: &str = "x-orch-task-kind";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    routes: BTreeMap<String, RawRoute>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    temperature: Option<f64>,
    max_tokens: Option<i64>,
    task_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    strategy: Option<String>,
    primary: Option<String>,
    #[serde(default)]
    fallback: Vec<String>,
    #[serde(default)]
    targets: Vec<RawTarget>,
    sticky_ttl: Option<i64>,
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
    let f = file.display();
    let raw: RawRouter = serde_yaml::from_str(text)
        .map_err(|e| vec![format!("{f}: {}", one_line(&e.to_string()))])?;
    let mut problems = Vec::new();

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
            targets.extend(r.fallback.into_iter().map(|p| Target {
                provider: p,
                weight: 1,
                circuit_breaker: None,
            }));
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
                    if b.failure_threshold < 1 {
                        problems.push(format!(
                            "{k}.failure_threshold: must be at least 1, got {}",
                            b.failure_threshold
                        ));
                        return None;
                    }
                    if !(b.recovery_time_s > 0.0 && b.recovery_time_s.is_finite()) {
                        problems.push(format!(
                            "{k}.recovery_time_s: must be positive, got {}",
                            b.recovery_time_s
                        ));
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
            }
        }
        if targets.is_empty() {
            problems.push(format!(
                "{}: route has no targets (set primary or targets)",
                key("targets")
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, t) in targets.iter().enumerate() {
            if !providers.contains(&t.provider) {
                problems.push(format!(
                    "{}: unknown provider `{}` (known: {})",
                    key(&format!("targets[{i}]")),
                    t.provider,
                    providers.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            if !seen.insert(t.provider.clone()) {
                problems.push(format!(
                    "{}: provider `{}` listed twice",
                    key(&format!("targets[{i}]")),
                    t.provider
                ));
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
        let text = "routes:\n  PLAN:\n    primary: nope\n  EMPTY: {}\n  DEFAULT:\n    primary: a\n";
        let err = parse(Path::new("router.yaml"), text, &names(&["a"]))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("router.yaml: routes.PLAN.targets[0]: unknown provider `nope`"),
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
}
