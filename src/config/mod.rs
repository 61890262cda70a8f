//! Configuration: environment settings, `providers.toml`, `router.yaml`.
//!
//! Loading never stops at the first problem: every problem is collected and reported
//! with its file, key and reason, so an operator fixes a config in one pass.

pub mod providers;
pub mod router;
pub mod settings;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use providers::{ProviderConfig, ProviderKind};
pub use router::{Defaults, Route, RouterConfig, Strategy, Target};
pub use settings::{DatabaseUrl, PostgresSync, Settings, SqliteSync};

/// One or more configuration problems, each naming file (or variable), key and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    pub fn new(problems: Vec<String>) -> Self {
        Self { problems }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

/// Providers and routes, validated against each other.
#[derive(Debug, Clone)]
pub struct Config {
    pub providers: BTreeMap<String, ProviderConfig>,
    pub router: RouterConfig,
}

impl Config {
    /// Loads the files named by `settings`.
    pub fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let providers_path = settings.providers_file();
        let router_path = settings.router_file();
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
        };
        let mut problems = Vec::new();
        let providers_text = read(&providers_path).map_err(|e| problems.push(e)).ok();
        let router_text = read(&router_path).map_err(|e| problems.push(e)).ok();
        // The table names, even when a table is invalid, so routes are judged against them.
        let table_names: Option<BTreeSet<String>> = providers_text
            .as_deref()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .map(|t| t.keys().cloned().collect());
        let providers = providers_text.and_then(|t| {
            providers::parse(&providers_path, &t)
                .map_err(|p| problems.extend(p))
                .ok()
        });
        let router = router_text.and_then(|t| {
            // If the providers file cannot even be read as TOML, do not call every route unknown.
            let known = table_names.clone().unwrap_or_else(|| all_names(&t));
            router::parse(&router_path, &t, &known)
                .map_err(|p| problems.extend(p))
                .ok()
        });
        match (providers, router) {
            (Some(providers), Some(router)) if problems.is_empty() => {
                Ok(Self { providers, router })
            }
            _ => Err(ConfigError::new(problems)),
        }
    }

    /// What is valid but will likely not work: a provider whose `auth_env` names a
    /// variable that is not set here (its calls go without a key and get 401s).
    pub fn warnings(&self, providers_file: &std::path::Path) -> Vec<String> {
        self.providers
            .values()
            .filter_map(|p| {
                let var = p.auth_env.as_deref()?;
                std::env::var(var).is_err().then(|| {
                    format!(
                        "{}: {}.auth_env: the variable {var} is not set in this environment \
                         (calls would go without a key)",
                        providers_file.display(),
                        p.name
                    )
                })
            })
            .collect()
    }

    /// A human-readable summary for `check-config`.
    pub fn describe(&self) -> String {
        let mut out = String::from("providers:\n");
        for p in self.providers.values() {
            out.push_str(&format!(
                "  {:<20} type={:<9} model={} rpm={} concurrency={} tpm={} max_retries={} timeout_s={}\n",
                p.name,
                p.kind.as_str(),
                p.model,
                p.rpm,
                p.concurrency,
                p.tpm.map_or_else(|| "-".to_string(), |t| t.to_string()),
                p.max_retries,
                p.timeout_s
            ));
        }
        out.push_str("routes:\n");
        for r in self.router.routes.values() {
            let chain: Vec<String> = r
                .targets
                .iter()
                .map(|t| match r.strategy {
                    Strategy::Weighted => format!("{}(w={})", t.provider, t.weight),
                    _ => t.provider.clone(),
                })
                .collect();
            let strategy = match r.strategy {
                Strategy::Priority => "priority".to_string(),
                Strategy::Weighted => "weighted".to_string(),
                Strategy::Sticky => format!("sticky(ttl={}s)", r.sticky_ttl_s),
            };
            out.push_str(&format!(
                "  {:<12} {:<16} {}\n",
                r.name,
                strategy,
                chain.join(" -> ")
            ));
        }
        let d = &self.router.defaults;
        out.push_str(&format!(
            "defaults: temperature={} max_tokens={} task_header={}\n",
            d.temperature.map_or_else(|| "-".into(), |t| t.to_string()),
            d.max_tokens.map_or_else(|| "-".into(), |t| t.to_string()),
            d.task_header
        ));
        out
    }
}

/// Every provider name the router file mentions, used when the providers file itself failed.
fn all_names(router_text: &str) -> BTreeSet<String> {
    let v: serde_yaml::Value = serde_yaml::from_str(router_text).unwrap_or_default();
    let mut names = BTreeSet::new();
    if let Some(routes) = v.get("routes").and_then(|r| r.as_mapping()) {
        for r in routes.values() {
            if let Some(p) = r.get("primary").and_then(|p| p.as_str()) {
                names.insert(p.to_string());
            }
            for key in ["fallback", "targets"] {
                for t in r
                    .get(key)
                    .and_then(|t| t.as_sequence())
                    .into_iter()
                    .flatten()
                {
                    if let Some(p) = t
                        .as_str()
                        .or_else(|| t.get("provider").and_then(|p| p.as_str()))
                    {
                        names.insert(p.to_string());
                    }
                }
            }
        }
    }
    names
}
