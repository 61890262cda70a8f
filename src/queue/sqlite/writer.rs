//! The SQLite write path: one thread owns the only writing connection and runs every write
//! the store asks for, each as a closure over that connection.
//!
//! Why a thread of our own: through sqlx every statement is a hand-off to the connection's
//! thread and back (two context switches), and a lease or a finish is several statements.
//! Here a whole write is one hand-off, and its statements run back to back on prepared,
//! cached statements.
//!
//! Group commit: writes that arrive while the thread is busy are committed together in one
//! transaction. If one of them fails, the whole group is rolled back and each write runs
//! again in a transaction of its own, so that only the failing one fails (cheaper than a
//! savepoint per write, which copies every page it touches into a statement journal).
//! Nobody hears of a write until the commit that holds it has returned, so "committed
//! before the handler waits" holds as before.
//!
//! Inline writes: when no other write is under way and commits do not fsync
//! (`synchronous=NORMAL`, where a commit is a few WAL `write`s), the caller runs its write
//! itself, on its own thread: at low load a hand-off to the writer thread and back costs
//! more (two context switches) than the write. Under load writes go to the thread, where
//! they share commits: once several writes were under way at once, all go to the thread for
//! a while, even one that finds the others done. Otherwise, at a load where writes often
//! but not always overlap, a good share of them would each be a commit of their own (its
//! locks and WAL frames), on a request thread, holding the connection the writer thread
//! waits for. Checkpoints, which do fsync, are the writer thread's to start
//! (automatic checkpoints are off on this connection); see `checkpointer` for where they
//! run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use super::checkpointer::Checkpointer;
use crate::config::SqliteSync;
use crate::queue::{StoreError, StoreResult};

/// The most writes one transaction holds: bounds the time a commit keeps the rest waiting.
const MAX_GROUP: usize = 256;

/// A write as the thread sees it.
trait PendingWrite: Send {
    /// Runs the write (again, after a rollback) and keeps its result; true if it worked.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller, given how the transaction that held the write ended.
    fn answer(self: Box<Self>, commit: Result<(), String>);
}

type Op = Box<dyn PendingWrite>;

/// A write and, once run, its result.
struct Pending<T, F> {
    f: F,
    result: Option<StoreResult<T>>,
    answer: Option<oneshot::Sender<StoreResult<T>>>,
}

impl<T, F> Pending<T, F>
where
    F: Fn(&Connection) -> StoreResult<T>,
{
    fn new(f: F, answer: Option<oneshot::Sender<StoreResult<T>>>) -> Self {
        Self {
            f,
            result: None,
            answer,
        }
    }

    fn run_once(&mut self, conn: &Connection) -> bool {
        let result = catch_unwind(AssertUnwindSafe(|| (self.f)(conn)))
            .unwrap_or_else(|_| Err(StoreError::Write("a database write panicked".into())));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    /// The caller's answer: the write's own error if it failed, else the commit's.
    fn outcome(&mut self, commit: Result<(), String>) -> StoreResult<T> {
        match (self.result.take(), commit) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(why)) => Err(StoreError::Write(why)),
            (None, Ok(())) => Err(StoreError::Write("the write did not run".into())),
        }
    }
}

impl<T, F> PendingWrite for Pending<T, F>
where
    T: Send,
    F: Fn(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        self.run_once(conn)
    }

    fn answer(mut self: Box<Self>, commit: Result<(), String>) {
        let outcome = self.outcome(commit);
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(outcome);
        }
    }
}

/// How long the writer thread waits for work before it starts a checkpoint of what was
/// committed.
const CHECKPOINT_WHEN_IDLE: Duration = Duration::from_millis(100);
/// Under steady load, start a checkpoint after this many commits (SQLite's own default is
/// every 1,000 WAL pages; a commit here writes a handful).
#[cfg(not(test))]
const CHECKPOINT_AFTER_COMMITS: u64 = 1000;
/// Small in tests, so that a few thousand writes see many checkpoints.
#[cfg(test)]
const CHECKPOINT_AFTER_COMMITS: u64 = 50;
/// A write that finds this many others under way marks a spell of load ...
const LOAD_IN_FLIGHT: usize = 2;
/// ... during which every write goes to the thread. (Two at once is not load: a request's
/// write beside a background one, such as the metrics writer's mark.)
#[cfg(not(test))]
const LOAD_SPELL: Duration = Duration::from_millis(20);
/// Long in tests, so that a busy machine's pauses cannot end a spell a test looks at.
#[cfg(test)]
const LOAD_SPELL: Duration = Duration::from_millis(300);

pub(crate) struct Writer {
    conn: Arc<Mutex<Connection>>,
    ops: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
    /// Writes may run on the caller's thread (commits do not fsync).
    inline: bool,
    /// Commits since the last checkpoint was started.
    commits: Arc<AtomicU64>,
    /// Writes asked for and not yet answered.
    in_flight: AtomicUsize,
    /// When the writer was opened, and until when (µs after it) a spell of load lasts.
    opened: Instant,
    load_until_us: AtomicU64,
}

impl Writer {
    /// Opens the writing connection (read-only when `read_only`: any write then fails) and
    /// starts its thread.
    pub(crate) fn open(path: &Path, sync: SqliteSync, read_only: bool) -> StoreResult<Self> {
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let open_error = |e: rusqlite::Error| {
            StoreError::Open(format!(
                "cannot open SQLite database {}: {e}",
                path.display()
            ))
        };
        let conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_error)?;
        let sync = match sync {
            SqliteSync::Normal => "NORMAL",
            SqliteSync::Full => "FULL",
        };
        let inline = !read_only && sync == "NORMAL";
        let checkpoints = if read_only {
            None
        } else {
            // Checkpoints are ours to start (see the module comment and `checkpointer`).
            conn.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; \
                 PRAGMA wal_autocheckpoint = 0;"
            ))
            .map_err(open_error)?;
            Some(Checkpointer::start(path)?)
        };
        // Every statement of the store stays prepared (there are a few dozen).
        conn.set_prepared_statement_cache_capacity(128);
        let conn = Arc::new(Mutex::new(conn));
        let commits = Arc::new(AtomicU64::new(0));
        let (ops, queue) = mpsc::channel();
        let thread = {
            let (conn, commits) = (conn.clone(), commits.clone());
            std::thread::Builder::new()
                .name("sqlite-writer".into())
                .spawn(move || run(&conn, &queue, &commits, checkpoints.as_ref()))
                .map_err(|e| StoreError::Open(format!("cannot start the SQLite writer: {e}")))?
        };
        Ok(Self {
            conn,
            ops: Some(ops),
            thread: Some(thread),
            inline,
            commits,
            in_flight: AtomicUsize::new(0),
            opened: Instant::now(),
            load_until_us: AtomicU64::new(0),
        })
    }

    /// Runs `f` on the writing connection inside a transaction and returns its result once
    /// that transaction is committed. An error from `f` rolls back what `f` wrote, and only
    /// that. `f` reads the clock itself if it needs "now": it may wait for other writes.
    pub(crate) async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let others = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&self.in_flight);
        if self.inline && others == 0 && !self.under_load() {
            let conn = match self.conn.try_lock() {
                Ok(conn) => Some(conn),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(conn) = conn {
                let mut write = Pending::new(f, None);
                let commit = run_alone(&conn, |c| write.run_once(c));
                drop(conn);
                if self.commits.fetch_add(1, Ordering::AcqRel) + 1 == CHECKPOINT_AFTER_COMMITS {
                    // Nothing to run: the thread checkpoints after any write it is sent.
                    if let Some(ops) = &self.ops {
                        let _ = ops.send(Box::new(Pending::new(|_: &Connection| Ok(()), None)));
                    }
                }
                return write.outcome(commit);
            }
        }
        let (answer, answered) = oneshot::channel();
        self.ops
            .as_ref()
            .ok_or(StoreError::WriterGone)?
            .send(Box::new(Pending::new(f, Some(answer))))
            .map_err(|_| StoreError::WriterGone)?;
        let answer = answered.await.map_err(|_| StoreError::WriterGone)?;
        // A write sent beside enough others starts the spell when it is answered (while
        // it is under way, no write is alone anyway).
        if self.inline && others >= LOAD_IN_FLIGHT {
            self.mark_load();
        }
        answer
    }

    fn since_opened_us(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn under_load(&self) -> bool {
        self.since_opened_us() < self.load_until_us.load(Ordering::Relaxed)
    }

    fn mark_load(&self) {
        let spell = u64::try_from(LOAD_SPELL.as_micros()).unwrap_or(u64::MAX);
        let until = self.since_opened_us().saturating_add(spell);
        self.load_until_us.fetch_max(until, Ordering::Relaxed);
    }
}

/// Counts a write as under way until its caller has the answer (or gave up waiting).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Writer {
    /// Stops the thread after the writes already sent, and waits for it: the connection is
    /// closed when the store is gone (a restart in the same process opens the file again).
    fn drop(&mut self) {
        drop(self.ops.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    conn: &Mutex<Connection>,
    queue: &mpsc::Receiver<Op>,
    commits: &AtomicU64,
    checkpoints: Option<&Checkpointer>,
) {
    loop {
        let first = match queue.recv_timeout(CHECKPOINT_WHEN_IDLE) {
            Ok(op) => Some(op),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let conn = lock(conn);
        let idle = first.is_none();
        if let Some(first) = first {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(op) => group.push(op),
                    Err(_) => break,
                }
            }
            commit_group(&conn, group);
            commits.fetch_add(1, Ordering::AcqRel);
        }
        let Some(checkpoints) = checkpoints else {
            continue;
        };
        checkpoints.finish_tail(&conn);
        let pending = commits.load(Ordering::Acquire);
        if pending > 0 && (idle || pending >= CHECKPOINT_AFTER_COMMITS) && checkpoints.ask() {
            commits.store(0, Ordering::Release);
        }
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs one write in a transaction of its own; how the transaction ended.
fn run_alone(conn: &Connection, run: impl FnOnce(&Connection) -> bool) -> Result<(), String> {
    exec(conn, "BEGIN IMMEDIATE").map_err(|e| e.to_string())?;
    let end = if run(conn) {
        exec(conn, "COMMIT")
    } else {
        exec(conn, "ROLLBACK")
    };
    end.map_err(|e| {
        let _ = exec(conn, "ROLLBACK");
        e.to_string()
    })
}

/// One transaction for the group; if a write fails, each runs again alone.
fn commit_group(conn: &Connection, mut group: Vec<Op>) {
    if group.len() > 1 {
        if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
            for write in group {
                write.answer(Err(e.to_string()));
            }
            return;
        }
        // `all` stops at the first failure: what ran is rolled back below.
        if group.iter_mut().all(|w| w.run(conn)) {
            let commit = exec(conn, "COMMIT").map_err(|e| {
                let _ = exec(conn, "ROLLBACK");
                e.to_string()
            });
            for write in group {
                write.answer(commit.clone());
            }
            return;
        }
        let _ = exec(conn, "ROLLBACK");
        #[cfg(test)]
        tests::GROUPS_RUN_AGAIN.fetch_add(1, Ordering::Relaxed);
    }
    for mut write in group {
        let commit = run_alone(conn, |c| write.run(c));
        write.answer(commit);
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::StoreError;

    /// Groups rolled back because one write failed, whose writes then ran alone.
    pub(super) static GROUPS_RUN_AGAIN: AtomicUsize = AtomicUsize::new(0);

    fn open(dir: &tempfile::TempDir) -> Writer {
        Writer::open(&dir.path().join("w.db"), SqliteSync::Normal, false).unwrap()
    }

    /// `synchronous=FULL` turns inline writes off: every write goes through the thread.
    fn open_threaded(dir: &tempfile::TempDir) -> Writer {
        let w = Writer::open(&dir.path().join("w.db"), SqliteSync::Full, false).unwrap();
        assert!(!w.inline);
        w
    }

    async fn count(w: &Writer) -> i64 {
        w.write(|c| Ok(c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_in_a_group_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        failing_writes_leave_no_trace(&open_threaded(&dir)).await;
        // The writes were sent together: the thread took several at once, and the
        // failing ones made their groups run again write by write.
        assert!(GROUPS_RUN_AGAIN.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_inline_write_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let w = open(&dir);
        assert!(w.inline);
        failing_writes_leave_no_trace(&w).await;
    }

    async fn failing_writes_leave_no_trace(w: &Writer) {
        w.write(|c| Ok(c.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)")?))
            .await
            .unwrap();
        // Many writes at once so that they share transactions; every third one inserts
        // its row and then fails (or panics), which must leave no trace of it.
        let results = futures::future::join_all((0..300i64).map(|n| {
            w.write(move |c| {
                c.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                match n % 3 {
                    0 => Err(StoreError::Corrupt(format!("write {n} fails"))),
                    1 if n % 9 == 1 => panic!("write {n} panics"),
                    _ => Ok(n),
                }
            })
        }))
        .await;
        let mut kept = 0;
        for (n, r) in results.iter().enumerate() {
            match (n % 3, r) {
                (0, Err(StoreError::Corrupt(_))) => {}
                (1, Err(StoreError::Write(why))) if n % 9 == 1 => assert!(why.contains("panicked")),
                (_, Ok(v)) => {
                    assert_eq!(*v, n as i64);
                    kept += 1;
                }
                other => panic!("write {n}: unexpected {other:?}"),
            }
        }
        assert_eq!(count(w).await, kept);
        let none_failed: i64 = w
            .write(|c| Ok(c.query_row("SELECT COUNT(*) FROM t WHERE n % 3 = 0", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(none_failed, 0);
    }

    /// Whether a write ran on the writer thread (else inline, on the caller's thread).
    async fn ran_on_the_thread(w: &Writer) -> bool {
        w.write(|_| Ok(std::thread::current().name() == Some("sqlite-writer")))
            .await
            .unwrap()
    }

    /// Whether a lone write runs inline (it may meet the writer thread's own idle-time
    /// use of the connection and go to the thread instead: a few tries).
    async fn a_lone_write_can_run_inline(w: &Writer) -> bool {
        for _ in 0..5 {
            if !ran_on_the_thread(w).await {
                return true;
            }
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn after_writes_overlap_a_lone_write_goes_to_the_thread_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let w = Arc::new(open(&dir));
        assert!(a_lone_write_can_run_inline(&w).await, "at rest");
        // A write holds the connection (inline or on the thread) until two more are
        // under way beside it.
        let (started, has_started) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let holder = {
            let w = w.clone();
            tokio::spawn(async move {
                w.write(move |_| {
                    let _ = started.send(());
                    let _ = released
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(10));
                    Ok(())
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || has_started.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .unwrap();
        let more: Vec<_> = (0..2)
            .map(|_| {
                let w = w.clone();
                tokio::spawn(async move { w.write(|_| Ok(())).await })
            })
            .collect();
        while w.in_flight.load(Ordering::Acquire) < 3 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        for m in more {
            m.await.unwrap().unwrap();
        }
        // Three at once: a spell of load, in which even a lone write shares the thread's
        // commits ...
        assert!(w.under_load());
        assert!(ran_on_the_thread(&w).await);
        // ... until it has passed.
        tokio::time::sleep(LOAD_SPELL + Duration::from_millis(10)).await;
        assert!(!w.under_load());
        assert!(a_lone_write_can_run_inline(&w).await, "after the spell");
    }

    #[tokio::test]
    async fn writes_are_committed_when_answered_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let w = open(&dir);
            w.write(|c| {
                c.execute_batch(
                    "CREATE TABLE t (n INTEGER PRIMARY KEY); INSERT INTO t VALUES (1)",
                )?;
                Ok(())
            })
            .await
            .unwrap();
            // Another connection sees it at once: the answer came after the commit.
            let other = Connection::open(dir.path().join("w.db")).unwrap();
            let n: i64 = other
                .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 1);
        }
        let w = open(&dir);
        assert_eq!(count(&w).await, 1);
    }

    /// Under writes without a pause the writer thread is never idle, and checkpoints run
    /// beside it: the WAL must still start over, not grow with everything written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_unbroken_writes() {
        let dir = tempfile::tempdir().unwrap();
        let w = Arc::new(open(&dir));
        w.write(|c| Ok(c.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB)")?))
            .await
            .unwrap();
        let wal = dir.path().join("w.db-wal");
        let (writers, each) = (8, 2_500);
        let (mut largest, mut restarts, mut sequence) = (0, 0, wal_checkpoint_sequence(&wal));
        let loops: Vec<_> = (0..writers)
            .map(|k| {
                let w = w.clone();
                tokio::spawn(async move {
                    for i in 0..each {
                        let n = k * each + i;
                        w.write(move |c| {
                            c.execute("INSERT INTO t VALUES (?1, zeroblob(2048))", [n])?;
                            Ok(())
                        })
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        while !loops.iter().all(|l| l.is_finished()) {
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            let now = wal_checkpoint_sequence(&wal);
            if now != sequence {
                restarts += 1;
                sequence = now;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(count(&w).await, writers * each);
        // A WAL that never starts over holds every commit's pages (~400 MB here) and keeps
        // its header. One that does rewrites its header each time (a new checkpoint
        // sequence number) and holds what was committed during a checkpoint: how much
        // that is depends on how long the disk takes to fsync, so the size bound is loose.
        assert!(restarts >= 2, "the WAL started over {restarts} times");
        assert!(largest < 200 << 20, "the WAL grew to {largest} bytes");
    }

    /// The checkpoint sequence number in a WAL file's header (bytes 12..16, big-endian),
    /// which SQLite increments each time the WAL starts over; 0 while there is none.
    fn wal_checkpoint_sequence(wal: &Path) -> u32 {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(wal)
            .and_then(|mut f| f.read_exact(&mut header))
            .map_or(0, |()| {
                u32::from_be_bytes([header[12], header[13], header[14], header[15]])
            })
    }

    #[tokio::test]
    async fn a_read_only_writer_refuses_writes_with_a_database_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(&dir));
        let w = Writer::open(&dir.path().join("w.db"), SqliteSync::Normal, true).unwrap();
        let err = w
            .write(|c| Ok(c.execute_batch("CREATE TABLE t (n INTEGER)")?))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("database error"), "{err}");
    }
}
