//! Checkpoints of the SQLite WAL, mostly on a thread and connection of their own.
//!
//! A checkpoint copies the pages gathered in the WAL back into the database file and
//! fsyncs it. Under load (concurrency 64) one took ~30 ms every ~250 ms, and while the
//! writer thread ran it every write waited: a stall of an eighth of the time. A PASSIVE
//! checkpoint on another connection runs beside the writer instead, and commits go on.
//!
//! The WAL only starts over from its beginning once a checkpoint has copied all of it, and
//! under unbroken load commits land while the side checkpoint runs. So when it is done,
//! the writer thread checkpoints the tail itself (the frames committed meanwhile: a few
//! milliseconds' worth); no commit lands during that, so the log is then copied whole and
//! the next write starts it over. Without this, the WAL would grow for as long as the
//! load lasts. When the writer is idle, the side checkpoint copies everything and the tail
//! is empty.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::queue::{StoreError, StoreResult};

const IDLE: u8 = 0;
/// Asked for, or running on the side thread.
const RUNNING: u8 = 1;
/// The side checkpoint ended: the writer thread should checkpoint the tail.
const DONE: u8 = 2;

pub(crate) struct Checkpointer {
    asks: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    state: Arc<AtomicU8>,
}

impl Checkpointer {
    /// Opens a connection of its own to the database at `path` and starts its thread.
    pub(crate) fn start(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| c.busy_timeout(Duration::from_secs(10)).map(|()| c))
        .map_err(|e| {
            StoreError::Open(format!(
                "cannot open SQLite database {} for checkpoints: {e}",
                path.display()
            ))
        })?;
        let state = Arc::new(AtomicU8::new(IDLE));
        // One ask at a time: the state says whether one is under way.
        let (asks, asked) = mpsc::sync_channel(1);
        let thread = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("sqlite-checkpoint".into())
                .spawn(move || {
                    while asked.recv().is_ok() {
                        checkpoint(&conn, "side");
                        state.store(DONE, Ordering::Release);
                    }
                })
                .map_err(|e| {
                    StoreError::Open(format!("cannot start the SQLite checkpointer: {e}"))
                })?
        };
        Ok(Self {
            asks: Some(asks),
            thread: Some(thread),
            state,
        })
    }

    /// Starts a side checkpoint unless one is under way or its tail is still to do.
    /// Called by the writer thread only. True if it started one.
    pub(crate) fn ask(&self) -> bool {
        if self
            .state
            .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let sent = self.asks.as_ref().is_some_and(|a| a.try_send(()).is_ok());
        if !sent {
            self.state.store(IDLE, Ordering::Release);
        }
        sent
    }

    /// On the writer thread, between writes: checkpoints the tail of a side checkpoint
    /// that has ended (see the module comment).
    pub(crate) fn finish_tail(&self, conn: &Connection) {
        if self.state.load(Ordering::Acquire) == DONE {
            checkpoint(conn, "tail");
            self.state.store(IDLE, Ordering::Release);
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.asks.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn checkpoint(conn: &Connection, kind: &str) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, kind, "SQLite checkpoint failed; retrying later");
    }
}
