//! llm-orch: a durable, queue-backed, OpenAI-compatible gateway for LLM APIs.
//!
//! Every accepted request becomes a job row first; per-provider worker pools lease jobs
//! within budgets shared through the database, call the upstream, and record every
//! attempt; the HTTP handler only inserts, waits and renders. See DESIGN.md.

// `ApiError` carries the whole OpenAI error body; it is built only on the failure path,
// where its size costs nothing measurable, and boxing it would clutter every handler.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod config;
pub mod export;
pub mod planner;
pub mod providers;
pub mod queue;
pub mod routing;
pub mod telemetry;
pub mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::{DatabaseUrl, Settings};
use planner::Planner;
use queue::{QueueStore, RescueScope, Signals};
use telemetry::Telemetry;
use worker::{Availability, Shared, StreamHub, Workers};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration problems:\n{0}")]
    Config(#[from] config::ConfigError),
    #[error("database: {0}")]
    Store(#[from] queue::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the store named by the settings and applies its migrations.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn QueueStore>, queue::StoreError> {
    match &settings.database_url {
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(
            queue::sqlite::SqliteStore::open(path, settings.sqlite_sync).await?,
        )),
        DatabaseUrl::Postgres(url) => Ok(Arc::new(
            queue::postgres::PostgresStore::connect_with(url, settings.postgres_sync).await?,
        )),
    }
}

/// Opens the store only to read from it (`metrics export`), beside a running gateway.
pub async fn open_store_for_reading(
    settings: &Settings,
) -> Result<Arc<dyn QueueStore>, queue::StoreError> {
    match &settings.database_url {
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(
            queue::sqlite::SqliteStore::open_for_reading(path, settings.sqlite_sync).await?,
        )),
        DatabaseUrl::Postgres(_) => open_store(settings).await,
    }
}

/// A built gateway: listening, workers running, not yet serving HTTP.
pub struct App {
    listener: TcpListener,
    state: api::AppState,
    workers: Workers,
    shutdown: CancellationToken,
}

impl App {
    /// Loads config, opens and migrates the store, takes back jobs a dead process left
    /// running, starts the worker pools and binds the listener.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let planner = Planner::load(&settings)?;
        for w in planner
            .current()
            .config
            .warnings(&settings.providers_file())
        {
            tracing::warn!("{w}");
        }
        let store = open_store(&settings).await?;
        let scope = match settings.database_url {
            DatabaseUrl::Sqlite(_) => RescueScope::All,
            DatabaseUrl::Postgres(_) => RescueScope::Owner(&settings.instance_id),
        };
        store
            .heartbeat(&settings.instance_id, &planner.current().provider_names())
            .await?;
        let rescued = store.rescue(scope).await?;
        if !rescued.is_empty() {
            tracing::warn!(providers = ?rescued, "re-queued jobs left running by a previous process");
        }
        let listener =
            TcpListener::bind(settings.bind)
                .await
                .map_err(|source| StartError::Bind {
                    addr: settings.bind,
                    source,
                })?;

        let settings = Arc::new(settings);
        let telemetry = Arc::new(Telemetry::new(
            settings.metrics_dir.clone(),
            settings.instance_id.clone(),
            store.clone(),
            planner.current().provider_names(),
        ));
        let shared = Arc::new(Shared {
            store,
            signals: Signals::new(),
            planner,
            settings: settings.clone(),
            telemetry,
            streams: Arc::new(StreamHub::default()),
            availability: Arc::new(Availability::default()),
            running: Mutex::new(Default::default()),
            stop_leasing: CancellationToken::new(),
            abort_calls: CancellationToken::new(),
            tracker: TaskTracker::new(),
            batch_nudge: tokio::sync::Notify::new(),
            slots: Default::default(),
            pools: Mutex::new(Default::default()),
            peer_providers: Default::default(),
            accepting: Default::default(),
        });
        worker::refresh(&shared).await;
        shared
            .store
            .start_listener(shared.signals.clone(), shared.stop_leasing.clone());
        let workers = Workers::start(shared.clone());
        let state = Arc::new(api::AppInner {
            shared,
            router: routing::Router::new(),
            shutting_down: CancellationToken::new(),
        });
        Ok(Self {
            listener,
            state,
            workers,
            shutdown: CancellationToken::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Cancel this token to shut the gateway down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.state.shared.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting and leasing, lets
    /// running calls finish within the grace period (requests waiting for them get their
    /// answers), tells the requests still waiting that their jobs are kept, gives unfinished
    /// jobs back to the queue, exits.
    pub async fn run(self) -> std::io::Result<()> {
        let Self {
            listener,
            state,
            workers,
            shutdown,
        } = self;
        let grace = state.shared.settings.shutdown_grace;
        tracing::info!(
            addr = %listener.local_addr()?,
            instance = %state.shared.settings.instance_id,
            backend = state.shared.store.backend(),
            "llm-orch listening"
        );
        let app = api::router(state.clone());
        let stop = shutdown.clone();
        let serve = axum::serve(without_nagle(listener), app).with_graceful_shutdown(async move {
            stop.cancelled().await;
            tracing::info!("shutting down: no new requests");
        });
        // The server waits for the requests under way; they wait for their jobs until the
        // calls running here have finished (or the grace period is over), then answer.
        let calls = async {
            shutdown.cancelled().await;
            workers.finish_calls(grace).await;
            state.shutting_down.cancel();
        };
        let serving = async {
            let result = serve.await;
            // Stopped by an error rather than the token: shut the rest down all the same.
            shutdown.cancel();
            result
        };
        let (result, ()) = tokio::join!(serving, calls);
        workers.release().await;
        state.shared.telemetry.close().await;
        // Let go of the store (and with it SQLite's file lock) before returning.
        drop(state);
        tracing::info!("stopped");
        result
    }
}

/// Resolves when SIGTERM or Ctrl-C arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `listener`, with TCP_NODELAY set on every connection it accepts. Without it, a
/// streamed answer's next chunk waits for the client to acknowledge the previous one,
/// which a client that only reads delays by up to 40 ms (Nagle's algorithm meeting
/// delayed ACKs): on a kept-alive connection, a stall in most streams.
fn without_nagle(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    listener.tap_io(|conn| {
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    })
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_waiting_for_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = without_nagle(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (conn, _) = listener.accept().await;
        assert!(conn.nodelay().unwrap());
    }
}
