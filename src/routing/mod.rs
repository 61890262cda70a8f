//! Route resolution: which route a request takes (task header, then `model`, then
//! DEFAULT) and the order in which that route's providers are tried.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::router::DEFAULT_ROUTE;
use crate::config::{Config, Route, RouterConfig, Strategy};

/// Resolves routes of the configuration in force (it is passed in, as it may be reloaded)
/// and remembers which provider served each sticky key.
#[derive(Default)]
pub struct Router {
    /// (route, sticky key) → the provider that last served it, and until when.
    sticky: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Route and provider order for a request. A `model` that names no route but names a
    /// provider sends the request to that provider alone (the DEFAULT route's name is kept
    /// as the task).
    pub fn plan<'a>(
        &self,
        config: &'a Config,
        task_header: Option<&str>,
        model: Option<&str>,
        sticky_key: Option<&str>,
    ) -> (&'a Route, Vec<String>) {
        let routes = &config.router.routes;
        let by_route = task_header.is_some_and(|t| routes.contains_key(t.trim()))
            || model.is_some_and(|m| routes.contains_key(m));
        let route = Self::resolve(&config.router, task_header, model);
        if !by_route && let Some(p) = model.filter(|m| config.providers.contains_key(*m)) {
            return (route, vec![p.to_string()]);
        }
        (route, self.chain(route, sticky_key))
    }

    /// The route for a request: the task header's value if it names a route, else the
    /// request's `model` if it names one, else DEFAULT. An unknown task is not an error.
    pub fn resolve<'a>(
        config: &'a RouterConfig,
        task_header: Option<&str>,
        model: Option<&str>,
    ) -> &'a Route {
        let routes = &config.routes;
        task_header
            .and_then(|t| routes.get(t.trim()))
            .or_else(|| model.and_then(|m| routes.get(m)))
            .or_else(|| routes.get(DEFAULT_ROUTE))
            .or_else(|| routes.values().next())
            .expect("validated config has a DEFAULT route")
    }

    /// Providers of a route in the order to try them.
    pub fn chain(&self, route: &Route, sticky_key: Option<&str>) -> Vec<String> {
        let mut order: Vec<String> = route.targets.iter().map(|t| t.provider.clone()).collect();
        match route.strategy {
            Strategy::Priority => {}
            Strategy::Weighted => {
                let total: u64 = route.targets.iter().map(|t| u64::from(t.weight)).sum();
                if total > 0 {
                    let mut pick = rand::rng().random_range(0..total);
                    let idx = route
                        .targets
                        .iter()
                        .position(|t| {
                            let w = u64::from(t.weight);
                            if pick < w {
                                true
                            } else {
                                pick -= w;
                                false
                            }
                        })
                        .unwrap_or(0);
                    let chosen = order.remove(idx);
                    order.insert(0, chosen);
                }
            }
            Strategy::Sticky => {
                if let Some(key) = sticky_key {
                    let map = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((p, until)) = map.get(&(route.name.clone(), key.to_string()))
                        && *until > Instant::now()
                        && let Some(idx) = order.iter().position(|x| x == p)
                    {
                        let chosen = order.remove(idx);
                        order.insert(0, chosen);
                    }
                }
            }
        }
        order
    }

    /// Remembers which provider served a sticky key.
    pub fn served(&self, route: &Route, sticky_key: Option<&str>, provider: &str) {
        if route.strategy != Strategy::Sticky {
            return;
        }
        let Some(key) = sticky_key else { return };
        let until = Instant::now() + Duration::from_secs(route.sticky_ttl_s);
        let mut map = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            let now = Instant::now();
            map.retain(|_, (_, u)| *u > now);
        }
        map.insert(
            (route.name.clone(), key.to_string()),
            (provider.to_string(), until),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    fn config() -> Config {
        let text = r#"
routes:
  PLAN: {primary: a, fallback: [b, c]}
  W:
    strategy: weighted
    targets: [{provider: a, weight: 3}, {provider: b, weight: 1}]
  S:
    strategy: sticky
    sticky_ttl: 30
    targets: [{provider: a}, {provider: b}]
  DEFAULT: {primary: c}
"#;
        let names: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let toml: String = names
            .iter()
            .map(|n| format!("[{n}]\ntype = \"dummy\"\nmodel = \"m\"\n"))
            .collect();
        Config {
            providers: crate::config::providers::parse(Path::new("p"), &toml).unwrap(),
            router: crate::config::router::parse(Path::new("r"), text, &names).unwrap(),
        }
    }

    #[test]
    fn header_then_model_then_default() {
        let c = config();
        let resolve = |t, m| Router::resolve(&c.router, t, m).name.clone();
        assert_eq!(resolve(Some("PLAN"), Some("W")), "PLAN");
        assert_eq!(resolve(Some("NOPE"), Some("W")), "W");
        assert_eq!(resolve(None, Some("gpt-4o")), "DEFAULT");
        assert_eq!(resolve(Some("NOPE"), None), "DEFAULT");
    }

    #[test]
    fn a_model_naming_a_provider_goes_there_alone() {
        let (r, c) = (Router::new(), config());
        let (route, chain) = r.plan(&c, None, Some("b"), None);
        assert_eq!(
            (route.name.as_str(), chain),
            ("DEFAULT", vec!["b".to_string()])
        );
        let (route, chain) = r.plan(&c, Some("PLAN"), Some("b"), None);
        assert_eq!((route.name.as_str(), chain.len()), ("PLAN", 3));
    }

    #[test]
    fn priority_keeps_order() {
        let (r, c) = (Router::new(), config());
        let route = Router::resolve(&c.router, Some("PLAN"), None);
        assert_eq!(r.chain(route, None), ["a", "b", "c"]);
    }

    #[test]
    fn weighted_follows_weights_and_keeps_the_rest_as_fallback() {
        let (r, c) = (Router::new(), config());
        let route = Router::resolve(&c.router, Some("W"), None);
        let firsts = (0..4000).filter(|_| r.chain(route, None)[0] == "a").count();
        assert!((2700..3300).contains(&firsts), "{firsts}");
        let c = r.chain(route, None);
        assert_eq!(c.len(), 2);
        assert_ne!(c[0], c[1]);
    }

    #[test]
    fn sticky_keeps_the_provider_that_served() {
        let (r, c) = (Router::new(), config());
        let route = Router::resolve(&c.router, Some("S"), None);
        assert_eq!(r.chain(route, Some("k"))[0], "a");
        r.served(route, Some("k"), "b");
        assert_eq!(r.chain(route, Some("k")), ["b", "a"]);
        assert_eq!(r.chain(route, Some("other"))[0], "a");
    }
}
