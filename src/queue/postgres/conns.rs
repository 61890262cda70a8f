//! The connections for the statements every request makes: accept, lease, finish and the
//! news that follow them.
//!
//! sqlx's pool pings each connection as it comes back, from a task it spawns. Under load a
//! statement so held its connection for a second round trip and for the wait until that
//! task ran, and requests queued for connections that sat idle on the server: measured at
//! 1,250 requests/s, 21 ms p50 to acquire a connection for a 3.6 ms `orch_finish`.
//!
//! Here a connection goes back to the set the moment its statement has ended. One whose
//! statement did not end cleanly (a dropped future, a broken socket) is closed instead:
//! its protocol state is unknown. One that sat idle for a while is pinged before use, as
//! the pool does, so that after a database restart a dead connection costs a ping, not a
//! request's error.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::IDLE_CHECK;
use super::listener::OwnBackends;
use crate::queue::StoreResult;

pub struct Conns {
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    slots: Semaphore,
    options: PgConnectOptions,
    own: OwnBackends,
    acquire_timeout: Duration,
}

/// One connection, checked out. Dropping it returns the connection if its last statement
/// ended (see `finished`), and closes it otherwise.
pub struct Conn<'a> {
    conn: Option<PgConnection>,
    reusable: bool,
    conns: &'a Conns,
    _slot: SemaphorePermit<'a>,
}

impl Conns {
    pub fn new(
        options: PgConnectOptions,
        size: usize,
        own: OwnBackends,
        acquire_timeout: Duration,
    ) -> Self {
        Self {
            idle: Mutex::new(Vec::with_capacity(size)),
            slots: Semaphore::new(size),
            options,
            own,
            acquire_timeout,
        }
    }

    /// A connection: an idle one if there is one that answers, else a new one.
    pub async fn get(&self) -> StoreResult<Conn<'_>> {
        // Waiting for a slot and connecting share one deadline, as with the pool: a dead
        // database fails requests fast instead of queueing them.
        tokio::time::timeout(self.acquire_timeout, self.checkout())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    async fn checkout(&self) -> StoreResult<Conn<'_>> {
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some((mut conn, since)) = idle else {
                break;
            };
            if since.elapsed() < IDLE_CHECK || conn.ping().await.is_ok() {
                return Ok(self.wrap(conn, slot));
            }
            // Dead (a restarted database): drop it and look at the next one.
        }
        let mut conn = PgConnection::connect_with(&self.options).await?;
        // Our own news need not come back through the listener (see `listener`).
        let pid =
            super::nodelay::backend_pid_and_nodelay(&mut conn, self.options.get_port()).await?;
        self.own.add(pid);
        Ok(self.wrap(conn, slot))
    }

    fn wrap<'a>(&'a self, conn: PgConnection, slot: SemaphorePermit<'a>) -> Conn<'a> {
        Conn {
            conn: Some(conn),
            reusable: true,
            conns: self,
            _slot: slot,
        }
    }
}

impl Conn<'_> {
    /// The connection for one statement. Until `finished` reports how it ended, the
    /// connection counts as mid-statement and dropping the guard closes it.
    pub fn start(&mut self) -> &mut PgConnection {
        self.reusable = false;
        self.conn.as_mut().expect("a checked-out connection")
    }

    /// The statement ended: keep the connection unless the failure may have left it
    /// out of step with the server (an error the server reported leaves it in step).
    pub fn finished<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.reusable = matches!(result, Ok(_) | Err(sqlx::Error::Database(_)));
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
        {
            let mut idle = self.conns.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push((conn, Instant::now()));
        }
        // The slot is released after the connection is back, so its next holder finds it.
    }
}

/// Runs one statement on a connection of `conns`: `on_conn!(self.conns, |c| q.fetch_one(c))`.
/// Evaluates to the statement's `Result<_, sqlx::Error>`; a failure to get a connection
/// returns from the enclosing function.
macro_rules! on_conn {
    ($conns:expr, |$c:ident| $statement:expr) => {{
        let mut guard = $conns.get().await?;
        let $c = guard.start();
        let result = $statement.await;
        guard.finished(&result);
        result
    }};
}
