//! Process settings read from the environment (CONTRACT §2).
//!
//! Every variable is parsed once at start; a bad value is reported with the variable's
//! name and the reason, never silently replaced by the default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;

/// Where the queue lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH`: one process owns the file.
    Sqlite(PathBuf),
    /// `postgres://…`: several instances may share it.
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(path) = raw
            .strip_prefix("sqlite://")
            .or_else(|| raw.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err("sqlite URL has no path (expected sqlite://PATH)".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(Self::Postgres(raw.to_string()));
        }
        Err(format!(
            "unsupported database URL `{raw}` (expected sqlite://PATH or postgres://…)"
        ))
    }
}

/// How strongly SQLite commits are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteSync {
    /// WAL + `synchronous=NORMAL`: a committed job survives a process crash (kill -9),
    /// the last transactions may be lost on power loss. The default.
    Normal,
    /// `synchronous=FULL`: also survives power loss, one fsync per commit.
    Full,
}

/// Which Postgres commits wait for the write-ahead log to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresSync {
    /// Accepting a job (and every write the API answers about: batches, files, cancels)
    /// waits for the flush; a lease or an attempt's end does not (`synchronous_commit =
    /// off` for that transaction). A gateway crash loses nothing; a database server crash
    /// may lose the last fraction of a second of leases and ends, and those jobs run
    /// again once their leases expire. Never a job. The default.
    Normal,
    /// Every commit waits for the flush, as the server is configured.
    Full,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub config_dir: PathBuf,
    pub use_dummy: bool,
    pub database_url: DatabaseUrl,
    pub sqlite_sync: SqliteSync,
    pub postgres_sync: PostgresSync,
    pub bind: SocketAddr,
    pub inbound_api_keys: Vec<String>,
    pub api_key_header: String,
    pub cors_allow_origins: Vec<String>,
    pub retry_after_default: Duration,
    pub request_timeout: Duration,
    pub metrics_dir: PathBuf,
    pub instance_id: String,
    pub lease: Duration,
    pub max_queue_depth: u64,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// Idle time after which a streaming answer sends an SSE comment, so proxies and
    /// clients keep a connection whose job is still queued (`ORCH_SSE_KEEPALIVE_SECONDS`).
    pub sse_keepalive: Duration,
    pub retention_days: Option<u32>,
    pub log_json: bool,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get`, so tests can supply their own environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let mut num = |k: &str, default: u64, min: u64| -> u64 {
            match var(k) {
                None => default,
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n >= min => n,
                    Ok(_) => {
                        problems.push(format!("{k}: must be at least {min}, got `{v}`"));
                        default
                    }
                    Err(_) => {
                        problems.push(format!("{k}: not a whole number: `{v}`"));
                        default
                    }
                },
            }
        };
        let retry_after = num("ORCH_RETRY_AFTER_SECONDS", 30, 0);
        let request_timeout = num("ORCH_REQUEST_TIMEOUT_SECONDS", 600, 1);
        let lease = num("ORCH_LEASE_SECONDS", 30, 2);
        let max_queue_depth = num("ORCH_MAX_QUEUE_DEPTH", 100_000, 1);
        let max_body_bytes = num("ORCH_MAX_BODY_BYTES", 10 * 1024 * 1024, 1024);
        let shutdown_grace = num("ORCH_SHUTDOWN_GRACE_SECONDS", 25, 0);
        let sse_keepalive = num("ORCH_SSE_KEEPALIVE_SECONDS", 10, 1);
        let retention_days =
            var("ORCH_RETENTION_DAYS").map(|_| num("ORCH_RETENTION_DAYS", 0, 1) as u32);

        let database_url = match DatabaseUrl::parse(
            &var("ORCH_DATABASE_URL").unwrap_or_else(|| "sqlite://./data/orch.db".into()),
        ) {
            Ok(u) => u,
            Err(e) => {
                problems.push(format!("ORCH_DATABASE_URL: {e}"));
                DatabaseUrl::Sqlite("./data/orch.db".into())
            }
        };
        // NORMAL (the default) or FULL, whichever the store.
        let mut normal_or_full = |k: &str| match var(k).as_deref().map(str::to_ascii_uppercase) {
            None => false,
            Some(v) if v == "NORMAL" => false,
            Some(v) if v == "FULL" => true,
            Some(v) => {
                problems.push(format!("{k}: expected NORMAL or FULL, got `{v}`"));
                false
            }
        };
        let sqlite_sync = if normal_or_full("ORCH_SQLITE_SYNCHRONOUS") {
            SqliteSync::Full
        } else {
            SqliteSync::Normal
        };
        let postgres_sync = if normal_or_full("ORCH_POSTGRES_SYNCHRONOUS") {
            PostgresSync::Full
        } else {
            PostgresSync::Normal
        };
        let bind_raw = var("ORCH_BIND").unwrap_or_else(|| "127.0.0.1:31001".into());
        let bind = bind_raw.parse().unwrap_or_else(|_| {
            problems.push(format!(
                "ORCH_BIND: not a socket address (HOST:PORT): `{bind_raw}`"
            ));
            SocketAddr::from(([127, 0, 0, 1], 31001))
        });
        let list = |k: &str| -> Vec<String> {
            var(k)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let log_json = match var("ORCH_LOG_FORMAT").as_deref() {
            None | Some("text") | Some("pretty") => false,
            Some("json") => true,
            Some(v) => {
                problems.push(format!("ORCH_LOG_FORMAT: expected text or json, got `{v}`"));
                false
            }
        };
        let settings = Settings {
            config_dir: var("ORCH_CONFIG_DIR")
                .unwrap_or_else(|| "./config".into())
                .into(),
            use_dummy: var("ORCH_USE_DUMMY")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
            database_url,
            sqlite_sync,
            postgres_sync,
            bind,
            inbound_api_keys: list("ORCH_INBOUND_API_KEYS"),
            api_key_header: var("ORCH_API_KEY_HEADER")
                .unwrap_or_else(|| "x-api-key".into())
                .to_ascii_lowercase(),
            cors_allow_origins: list("ORCH_CORS_ALLOW_ORIGINS"),
            retry_after_default: Duration::from_secs(retry_after),
            request_timeout: Duration::from_secs(request_timeout),
            metrics_dir: var("ORCH_METRICS_DIR")
                .unwrap_or_else(|| "./metrics".into())
                .into(),
            instance_id: var("ORCH_INSTANCE_ID").unwrap_or_else(generated_instance_id),
            lease: Duration::from_secs(lease),
            max_queue_depth,
            max_body_bytes: max_body_bytes as usize,
            shutdown_grace: Duration::from_secs(shutdown_grace),
            sse_keepalive: Duration::from_secs(sse_keepalive),
            retention_days,
            log_json,
        };
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::new(
                problems
                    .into_iter()
                    .map(|p| format!("environment: {p}"))
                    .collect(),
            ))
        }
    }

    /// Instances whose last heartbeat is older than this moment count as gone: three
    /// leases without one (`/healthz` lists the others; only they can serve a provider).
    pub fn live_instances_since(&self, now_ms: i64) -> i64 {
        now_ms - 3 * i64::try_from(self.lease.as_millis()).unwrap_or(30_000)
    }

    /// The providers file this process loads.
    pub fn providers_file(&self) -> PathBuf {
        let name = if self.use_dummy {
            "providers.dummy.toml"
        } else {
            "providers.toml"
        };
        self.config_dir.join(name)
    }

    pub fn router_file(&self) -> PathBuf {
        self.config_dir.join("router.yaml")
    }
}

fn generated_instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "orch".into());
    let short = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &short[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = with(&[]).unwrap();
        assert_eq!(s.bind, "127.0.0.1:31001".parse().unwrap());
        assert_eq!(s.database_url, DatabaseUrl::Sqlite("./data/orch.db".into()));
        assert_eq!(s.api_key_header, "x-api-key");
        assert_eq!(s.retry_after_default, Duration::from_secs(30));
        assert_eq!(s.request_timeout, Duration::from_secs(600));
        assert_eq!(s.lease, Duration::from_secs(30));
        assert_eq!(s.max_queue_depth, 100_000);
        assert_eq!(s.max_body_bytes, 10_485_760);
        assert!(s.inbound_api_keys.is_empty());
        assert!(!s.use_dummy);
        assert!(s.providers_file().ends_with("providers.toml"));
    }

    #[test]
    fn dummy_switches_the_providers_file() {
        let s = with(&[("ORCH_USE_DUMMY", "1")]).unwrap();
        assert!(s.providers_file().ends_with("providers.dummy.toml"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = with(&[
            ("ORCH_LEASE_SECONDS", "abc"),
            ("ORCH_DATABASE_URL", "mysql://x"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("ORCH_LEASE_SECONDS"), "{err}");
        assert!(err.contains("ORCH_DATABASE_URL"), "{err}");
    }

    #[test]
    fn durability_is_normal_unless_full_is_asked() {
        let s = with(&[]).unwrap();
        assert_eq!(
            (s.sqlite_sync, s.postgres_sync),
            (SqliteSync::Normal, PostgresSync::Normal)
        );
        let s = with(&[
            ("ORCH_SQLITE_SYNCHRONOUS", "full"),
            ("ORCH_POSTGRES_SYNCHRONOUS", "FULL"),
        ])
        .unwrap();
        assert_eq!(
            (s.sqlite_sync, s.postgres_sync),
            (SqliteSync::Full, PostgresSync::Full)
        );
        let s = with(&[("ORCH_POSTGRES_SYNCHRONOUS", "normal")]).unwrap();
        assert_eq!(s.postgres_sync, PostgresSync::Normal);
        let err = with(&[
            ("ORCH_SQLITE_SYNCHRONOUS", "off"),
            ("ORCH_POSTGRES_SYNCHRONOUS", "sometimes"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ORCH_SQLITE_SYNCHRONOUS: expected NORMAL or FULL, got `OFF`"),
            "{err}"
        );
        assert!(err.contains("ORCH_POSTGRES_SYNCHRONOUS"), "{err}");
    }

    #[test]
    fn lists_are_split_and_trimmed() {
        let s = with(&[("ORCH_INBOUND_API_KEYS", " a, b ,,c")]).unwrap();
        assert_eq!(s.inbound_api_keys, vec!["a", "b", "c"]);
    }
}
