//! JSONL request lines (CONTRACT §7), one per finished job, built only from the job record
//! so that `metrics export` regenerates exactly the lines written live.
//!
//! Finished jobs are handed to one writer task through a channel: the request path never
//! waits on the file or the database. The writer appends a batch of lines, syncs the file,
//! and only then marks those jobs `metrics_written`. A sweep of the same task writes the
//! lines of jobs that finished but were never marked (the process died between the
//! finish and the write, or the job was finished by the rescuer). Because the live path
//! and the sweep go through the same task, it can tell which lines it already wrote, so a
//! line is written once unless the process dies between the write and the mark.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, TimeZone, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::queue::{Job, JobStatus, QueueStore, StoreResult};

/// How long the writer waits for more lines after the first of a batch: every batch is a
/// file sync and a database write, and under load many small batches cost CPU that the
/// request path needs. A flush, a sweep or a close ends the wait at once.
const LINGER: Duration = Duration::from_millis(50);
/// How often the writer looks for finished jobs without a line.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A job this instance finished is swept only this long after its finish: by then its
/// live line has long been written and marked, unless the process died.
const OWN_GRACE: Duration = Duration::from_secs(10);
/// Jobs finished by another instance are left to it for longer (it marks in batches, and
/// its clock may differ a little); past this the other instance is presumed dead.
const FOREIGN_GRACE: Duration = Duration::from_secs(120);
/// How long the ids of swept jobs are remembered, to drop a late live message for them.
const SWEPT_MEMORY: Duration = Duration::from_secs(600);
/// Jobs read per sweep query, and the most sweep queries per round.
const SWEEP_BATCH: i64 = 500;
const SWEEP_ROUNDS: usize = 4;
/// Most messages taken from the channel before a write.
const MAX_BATCH: usize = 1024;

/// The metrics line of a finished job. `model` is the upstream model of its last attempt
/// (see [`last_model`]). [`Line::text`] is its JSON text.
pub fn line<'a>(job: &'a Job, model: Option<&'a str>) -> Line<'a> {
    let finished = job.finished_at.unwrap_or(job.created_at);
    let ts = Utc
        .timestamp_millis_opt(finished)
        .single()
        .unwrap_or_default();
    Line {
        batch_id: job.batch_id.as_deref(),
        error: job.error.as_ref().map(|e| e.message.as_str()),
        hops: job.hops,
        instance: job.finished_by.as_deref(),
        latency_ms: (finished - job.created_at).max(0),
        model,
        ok: job.status == JobStatus::Succeeded,
        provider: &job.provider,
        queue_ms: job.started_at.map(|s| (s - job.created_at).max(0)),
        req_id: &job.id,
        retries: (job.attempt_count - 1).max(0),
        status: job.status_code,
        task: &job.task,
        // `2026-01-31T12:00:00.000Z`, without parsing a format string per line.
        ts: ts.to_rfc3339_opts(SecondsFormat::Millis, true),
        usage_completion: job.usage_completion,
        usage_prompt: job.usage_prompt,
    }
}

/// One JSONL line (CONTRACT §7). Fields are in alphabetical order, as the lines have
/// always been written; serialized straight from the job, without a JSON tree between.
#[derive(Debug, serde::Serialize)]
pub struct Line<'a> {
    batch_id: Option<&'a str>,
    error: Option<&'a str>,
    hops: i64,
    instance: Option<&'a str>,
    latency_ms: i64,
    model: Option<&'a str>,
    ok: bool,
    provider: &'a str,
    queue_ms: Option<i64>,
    req_id: &'a str,
    retries: i64,
    status: Option<i64>,
    task: &'a str,
    ts: String,
    usage_completion: Option<i64>,
    usage_prompt: Option<i64>,
}

impl Line<'_> {
    /// The line's JSON text (without the newline).
    pub fn text(&self) -> String {
        // Strings, numbers and nulls only: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The `model` of a job's line: the upstream model of its last attempt, or null when it
/// never ran. Live lines and `metrics export` both use this rule.
pub async fn last_model(store: &dyn QueueStore, job: &Job) -> StoreResult<Option<String>> {
    if job.attempt_count == 0 {
        return Ok(None);
    }
    Ok(store.get_attempts(&job.id).await?.pop().map(|a| a.model))
}

/// `requests-YYYYMMDD.jsonl` for the UTC day a job finished.
pub fn file_name(finished_at_ms: i64) -> String {
    let day = Utc
        .timestamp_millis_opt(finished_at_ms)
        .single()
        .unwrap_or_default();
    format!("requests-{}.jsonl", day.format("%Y%m%d"))
}

enum Msg {
    /// The instance is stopping: write what is pending and end the task.
    Close(oneshot::Sender<()>),
    /// A job reached a terminal state here. `model: None` means "look it up".
    Finished {
        job: Box<Job>,
        model: Option<String>,
    },
    /// Answered once everything sent before is on disk and marked.
    Flush(oneshot::Sender<()>),
    /// Sweeps jobs finished more than `older_than` ago now; answers with lines written.
    Sweep {
        older_than: Duration,
        done: oneshot::Sender<usize>,
    },
}

impl Msg {
    /// A finished job's line may wait for company; everything else is waited on.
    fn can_wait(&self) -> bool {
        matches!(self, Msg::Finished { .. })
    }
}

pub struct JsonlWriter {
    tx: mpsc::UnboundedSender<Msg>,
}

impl JsonlWriter {
    /// Starts the writer task; it stops when the writer is dropped.
    pub fn start(dir: PathBuf, instance: String, store: Arc<dyn QueueStore>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            dir,
            instance,
            store,
            pending: Vec::new(),
            unmarked: Vec::new(),
            held: HashSet::new(),
            swept: HashMap::new(),
            failing: false,
        };
        tokio::spawn(task.run(rx));
        Self { tx }
    }

    /// Queues the line of a finished job. `model`: see [`last_model`]; `None` makes the
    /// writer read it from the job's attempts.
    pub fn write(&self, job: &Job, model: Option<&str>) {
        if job.finished_at.is_none() {
            return;
        }
        let _ = self.tx.send(Msg::Finished {
            job: Box::new(job.clone()),
            model: model.map(str::to_string),
        });
    }

    /// Waits until every line handed over so far is on disk and its job marked.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Writes what is pending and stops the task; waits until it has let go of the store.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Writes now the lines of finished jobs that have none and finished more than
    /// `older_than` ago (the periodic sweep does this on its own). Returns lines written.
    pub async fn sweep(&self, older_than: Duration) -> usize {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Msg::Sweep { older_than, done }).is_ok() {
            rx.await.unwrap_or(0)
        } else {
            0
        }
    }
}

/// A line to write: job id, file name, text.
struct PendingLine {
    id: String,
    file: String,
    text: String,
}

struct Task {
    dir: PathBuf,
    instance: String,
    store: Arc<dyn QueueStore>,
    /// Lines taken from the channel, not yet on disk.
    pending: Vec<PendingLine>,
    /// Jobs whose lines are on disk but whose mark has not reached the database yet.
    unmarked: Vec<String>,
    /// The jobs of `pending` and `unmarked`: a batch holds hundreds of lines under load,
    /// too many to look for a repeat by scanning.
    held: HashSet<String>,
    /// Jobs whose lines the sweep wrote, with when: a live message for one of them that
    /// arrives later (it sat in the channel during the sweep) is dropped.
    swept: HashMap<String, Instant>,
    /// Set while writes fail, so the error is logged once per outage, not per line.
    failing: bool,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = tick.tick() => {
                    self.sweep_now(OWN_GRACE).await;
                    continue;
                }
            };
            let Some(first) = first else {
                // Every sender is gone: the instance is stopping.
                self.commit().await;
                return;
            };
            let mut batch = vec![first];
            let linger_until = tokio::time::Instant::now() + LINGER;
            while batch.len() < MAX_BATCH && batch.iter().all(Msg::can_wait) {
                let next = match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        tokio::time::timeout_at(linger_until, rx.recv())
                            .await
                            .ok()
                            .flatten()
                    }
                };
                match next {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            for msg in batch {
                match msg {
                    Msg::Finished { job, model } => self.take(&job, model).await,
                    Msg::Flush(done) => {
                        self.commit().await;
                        let _ = done.send(());
                    }
                    Msg::Close(done) => {
                        self.commit().await;
                        // Dropping the task's store handle here releases the database
                        // (SQLite's file lock) before the caller returns.
                        drop(self);
                        let _ = done.send(());
                        return;
                    }
                    Msg::Sweep { older_than, done } => {
                        self.commit().await;
                        let _ = done.send(self.sweep_now(older_than).await);
                    }
                }
            }
            self.commit().await;
        }
    }

    /// Adds a job's line to the pending batch unless this writer already has it.
    async fn take(&mut self, job: &Job, model: Option<String>) {
        let Some(finished) = job.finished_at else {
            return;
        };
        if self.swept.contains_key(&job.id) || self.held.contains(&job.id) {
            return;
        }
        let model = match model {
            Some(m) => Some(m),
            None => match last_model(self.store.as_ref(), job).await {
                Ok(m) => m,
                Err(e) => {
                    // Without the model the line would differ from `metrics export`;
                    // leave it unmarked for the sweep, which retries later.
                    tracing::warn!(job_id = %job.id, error = %e, "cannot read the job's attempts for its metrics line");
                    return;
                }
            },
        };
        self.held.insert(job.id.clone());
        self.pending.push(PendingLine {
            id: job.id.clone(),
            file: file_name(finished),
            text: line(job, model.as_deref()).text(),
        });
    }

    /// Writes the pending lines, syncs them, then marks their jobs (and any whose mark
    /// failed before).
    async fn commit(&mut self) {
        if !self.pending.is_empty() {
            let lines = std::mem::take(&mut self.pending);
            let dir = self.dir.clone();
            let ids: Vec<String> = lines.iter().map(|l| l.id.clone()).collect();
            let written = tokio::task::spawn_blocking(move || append_all(&dir, &lines))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match written {
                Ok(()) => {
                    if self.failing {
                        tracing::info!(dir = %self.dir.display(), "JSONL metrics are written again");
                    }
                    self.failing = false;
                    self.unmarked.extend(ids);
                }
                Err(e) => {
                    // Not marked: the sweep writes these lines once the disk takes them.
                    for id in &ids {
                        self.held.remove(id);
                    }
                    if !self.failing {
                        tracing::error!(error = %e, dir = %self.dir.display(), "cannot write JSONL metrics");
                    }
                    self.failing = true;
                }
            }
        }
        if !self.unmarked.is_empty() {
            match self.store.mark_metrics_written(&self.unmarked).await {
                Ok(()) => {
                    for id in self.unmarked.drain(..) {
                        self.held.remove(&id);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, jobs = self.unmarked.len(), "cannot mark metrics lines written; will retry")
                }
            }
        }
    }

    /// Writes the lines of finished jobs that have none: jobs finished by a process that
    /// died before writing (or marking) them, and jobs ended by the rescuer.
    async fn sweep_now(&mut self, older_than: Duration) -> usize {
        let forget_before = Instant::now().checked_sub(SWEPT_MEMORY);
        self.swept
            .retain(|_, at| forget_before.is_none_or(|t| *at > t));
        let Ok(now) = self.store.now_ms().await else {
            return 0;
        };
        let own_cutoff = now - duration_ms(older_than);
        let foreign_cutoff = now - duration_ms(FOREIGN_GRACE.max(older_than));
        let mut written = 0;
        let mut seen = HashSet::new();
        for _ in 0..SWEEP_ROUNDS {
            let jobs = match self.store.unwritten_metrics(own_cutoff, SWEEP_BATCH).await {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for jobs without a metrics line");
                    break;
                }
            };
            let full = jobs.len() as i64 == SWEEP_BATCH;
            let mut fresh = 0;
            for job in &jobs {
                if !seen.insert(job.id.clone()) {
                    continue;
                }
                fresh += 1;
                // A SQLite file has one process (a lock enforces it): any other finisher
                // was a previous life of this one, with nothing left to write.
                let foreign = self.store.backend() != "sqlite"
                    && job
                        .finished_by
                        .as_deref()
                        .is_some_and(|f| f != self.instance);
                if foreign && job.finished_at.is_some_and(|f| f >= foreign_cutoff) {
                    continue;
                }
                let before = self.pending.len();
                self.take(job, None).await;
                if self.pending.len() > before {
                    self.swept.insert(job.id.clone(), Instant::now());
                    written += 1;
                }
            }
            self.commit().await;
            if !full || fresh == 0 {
                break;
            }
        }
        if written > 0 {
            tracing::info!(
                lines = written,
                "wrote metrics lines of jobs finished without one"
            );
        }
        written
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Appends the lines, one write per file, and syncs each file before returning: a line
/// is reported written only once the disk has it.
fn append_all(dir: &Path, lines: &[PendingLine]) -> std::io::Result<()> {
    let mut by_file: BTreeMap<&str, String> = BTreeMap::new();
    for l in lines {
        let buf = by_file.entry(&l.file).or_default();
        buf.push_str(&l.text);
        buf.push('\n');
    }
    std::fs::create_dir_all(dir)?;
    for (file, text) in by_file {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(file))?;
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::JobError;

    fn finished_job() -> Job {
        Job {
            id: "job_1".into(),
            task: "summarize".into(),
            status: JobStatus::Failed,
            hops: 1,
            attempt_count: 3,
            created_at: 1_764_288_000_000,
            started_at: Some(1_764_288_000_040),
            finished_at: Some(1_764_288_001_250),
            status_code: Some(502),
            error: Some(JobError {
                status: 502,
                kind: "provider_server_error".into(),
                message: "upstream said \"no\"".into(),
                code: None,
                param: None,
                retry_after: None,
            }),
            usage_prompt: Some(12),
            batch_id: Some("batch_9".into()),
            finished_by: Some("orch-1".into()),
            ..Job::running_for_test(&["a", "b"], 1, 1)
        }
    }

    /// The text of a line, byte for byte: live lines and `metrics export` are compared
    /// with what earlier versions wrote, so field order and escaping must not drift.
    #[test]
    fn a_line_is_written_as_it_always_was() {
        let job = finished_job();
        assert_eq!(
            line(&job, Some("gpt-x")).text(),
            r#"{"batch_id":"batch_9","error":"upstream said \"no\"","hops":1,"instance":"orch-1","latency_ms":1250,"model":"gpt-x","ok":false,"provider":"b","queue_ms":40,"req_id":"job_1","retries":2,"status":502,"task":"summarize","ts":"2025-11-28T00:00:01.250Z","usage_completion":null,"usage_prompt":12}"#
        );
        assert_eq!(
            file_name(job.finished_at.unwrap()),
            "requests-20251128.jsonl"
        );
    }
}
