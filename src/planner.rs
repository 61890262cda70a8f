//! The configuration in force, and its reload. `providers.toml` (or `providers.dummy.toml`)
//! and `router.yaml` are watched while the gateway runs: when either changes and the pair
//! is valid, the new providers and routes take over whole for new requests and the next
//! leases; when it is not, the old ones stay and the problems are logged and shown in
//! `/healthz`. Calls already running keep the adapter they started with.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

use crate::config::{Config, ConfigError, Settings};
use crate::providers::{self, Provider, Providers};

/// One loaded configuration with its adapters.
pub struct Plan {
    pub config: Config,
    pub providers: Providers,
    pub loaded_at: DateTime<Utc>,
}

impl Plan {
    fn new(config: Config, previous: Option<&Plan>) -> Self {
        let mut providers = providers::build(&config.providers);
        // An adapter whose settings did not change is kept, with its pooled connections.
        if let Some(old) = previous {
            for (name, adapter) in providers.iter_mut() {
                if let Some(kept) = old.providers.get(name)
                    && kept.config() == adapter.config()
                {
                    *adapter = kept.clone();
                }
            }
        }
        Self {
            config,
            providers,
            loaded_at: Utc::now(),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    pub fn provider_names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }
}

/// What a look at the watched files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// Neither file changed since the last look.
    Unchanged,
    /// The new configuration is in force.
    Loaded {
        added: Vec<String>,
        removed: Vec<String>,
        /// Providers whose settings changed.
        changed: Vec<String>,
        /// Those of `changed` that now call another upstream (type, base_url, model or
        /// auth_env changed).
        new_upstream: Vec<String>,
    },
    /// The files changed but are not valid together; the old configuration stays.
    Rejected(ConfigError),
}

/// Holds the plan in force and watches the files it came from.
pub struct Planner {
    current: RwLock<Arc<Plan>>,
    /// The files' contents at the last look, valid or not, so a bad edit is reported once.
    seen: Mutex<Vec<Option<Vec<u8>>>>,
    last_error: Mutex<Option<String>>,
    watch: Vec<PathBuf>,
    /// Counts the reloads taken, for those who must look again after one.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Planner {
    /// Loads the configuration named by `settings`.
    pub fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let watch = vec![settings.providers_file(), settings.router_file()];
        let seen = read_all(&watch);
        let config = Config::load(settings)?;
        Ok(Self {
            current: RwLock::new(Arc::new(Plan::new(config, None))),
            seen: Mutex::new(seen),
            last_error: Mutex::new(None),
            watch,
            generation: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The plan in force. Cheap: a read lock and a reference count.
    pub fn current(&self) -> Arc<Plan> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The adapter of `name` in the plan in force.
    pub fn provider(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.current().provider(name).cloned()
    }

    /// Changes with every reload taken, once `reload_done` says so.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Tells the subscribers a reload was taken, once what goes with it is done (e.g.
    /// the reset of a provider with a new upstream), so that what they see again is new.
    pub fn reload_done(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn watched(&self) -> &[PathBuf] {
        &self.watch
    }

    /// Why the last change of the files was not taken, until a valid one is.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads when a watched file changed since the last look.
    pub fn reload_if_changed(&self, settings: &Settings) -> Reload {
        // Held throughout: one reload at a time.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = read_all(&self.watch);
        if *seen == now {
            return Reload::Unchanged;
        }
        *seen = now;
        let config = match Config::load(settings) {
            Ok(c) => c,
            Err(e) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                return Reload::Rejected(e);
            }
        };
        // Built outside the plan's lock (adapters make HTTP clients), so requests go on
        // reading it meanwhile; no other reload can replace it in between.
        let plan = Plan::new(config, Some(&self.current()));
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let old: BTreeSet<&String> = current.providers.keys().collect();
        let new: BTreeSet<&String> = plan.providers.keys().collect();
        let added = new.difference(&old).map(|s| s.to_string()).collect();
        let removed = old.difference(&new).map(|s| s.to_string()).collect();
        let (mut changed, mut new_upstream) = (Vec::new(), Vec::new());
        for name in new.intersection(&old) {
            let was = current.providers[*name].config();
            let is = plan.providers[*name].config();
            if was != is {
                changed.push(name.to_string());
            }
            if !was.same_upstream(is) {
                new_upstream.push(name.to_string());
            }
        }
        *current = Arc::new(plan);
        drop(current);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Reload::Loaded {
            added,
            removed,
            changed,
            new_upstream,
        }
    }
}

/// The contents of each file; `None` for one that cannot be read (Config::load names it).
fn read_all(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path) -> Settings {
        let d = dir.display().to_string();
        Settings::from_lookup(|k| (k == "ORCH_CONFIG_DIR").then(|| d.clone())).unwrap()
    }

    fn write(dir: &std::path::Path, providers: &str, router: &str) {
        std::fs::write(dir.join("providers.toml"), providers).unwrap();
        std::fs::write(dir.join("router.yaml"), router).unwrap();
    }

    const A: &str = "[a]\ntype = \"dummy\"\nmodel = \"m\"\nrpm = 10\n";
    const AB: &str =
        "[a]\ntype = \"dummy\"\nmodel = \"m\"\nrpm = 10\n[b]\ntype = \"dummy\"\nmodel = \"m\"\n";
    const TO_A: &str = "routes:\n  DEFAULT: {primary: a}\n";
    const TO_B: &str = "routes:\n  DEFAULT: {primary: b, fallback: [a]}\n";

    #[test]
    fn a_valid_change_takes_over_and_keeps_unchanged_adapters() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), A, TO_A);
        let s = settings(dir.path());
        let planner = Planner::load(&s).unwrap();
        let first = planner.current();
        assert_eq!(planner.reload_if_changed(&s), Reload::Unchanged);

        write(dir.path(), AB, TO_B);
        assert_eq!(
            planner.reload_if_changed(&s),
            Reload::Loaded {
                added: vec!["b".into()],
                removed: vec![],
                changed: vec![],
                new_upstream: vec![],
            }
        );
        let second = planner.current();
        assert_eq!(
            second.config.router.routes["DEFAULT"].targets[0].provider,
            "b"
        );
        assert!(Arc::ptr_eq(&first.providers["a"], &second.providers["a"]));
        assert!(second.loaded_at >= first.loaded_at);

        write(dir.path(), &AB.replace("rpm = 10", "rpm = 20"), TO_B);
        let Reload::Loaded {
            changed,
            new_upstream,
            ..
        } = planner.reload_if_changed(&s)
        else {
            panic!("not reloaded");
        };
        assert_eq!((changed, new_upstream), (vec!["a".to_string()], vec![]));
        assert_eq!(planner.provider("a").unwrap().config().rpm, 20);

        write(
            dir.path(),
            &AB.replace("model = \"m\"\nrpm", "model = \"m2\"\nrpm"),
            TO_B,
        );
        let Reload::Loaded { new_upstream, .. } = planner.reload_if_changed(&s) else {
            panic!("not reloaded");
        };
        assert_eq!(new_upstream, ["a"]);
    }

    #[test]
    fn an_invalid_change_keeps_the_old_plan_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), A, TO_A);
        let s = settings(dir.path());
        let planner = Planner::load(&s).unwrap();

        // The route names a provider the providers file does not have.
        write(dir.path(), A, TO_B);
        let Reload::Rejected(e) = planner.reload_if_changed(&s) else {
            panic!("taken");
        };
        let text = e.to_string();
        assert!(text.contains("router.yaml") && text.contains('b'), "{text}");
        assert_eq!(planner.last_error(), Some(text));
        assert_eq!(planner.reload_if_changed(&s), Reload::Unchanged);
        assert_eq!(
            planner.current().config.router.routes["DEFAULT"].targets[0].provider,
            "a"
        );

        write(dir.path(), AB, TO_B);
        assert!(matches!(
            planner.reload_if_changed(&s),
            Reload::Loaded { .. }
        ));
        assert_eq!(planner.last_error(), None);
    }
}
