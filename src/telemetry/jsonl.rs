//! JSONL request lines (CONTRACT §7), one per finished job, built only from the job record
//! so that `metrics export` regenerates exactly the lines written live.
//!
//! Lines are handed to a writer task through a channel: the request path never waits on
//! the file.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::queue::{Job, JobStatus};

/// The metrics line of a finished job. `model` is the upstream model of its last attempt.
pub fn line(job: &Job, model: Option<&str>) -> Value {
    let finished = job.finished_at.unwrap_or(job.created_at);
    let ts = Utc
        .timestamp_millis_opt(finished)
        .single()
        .unwrap_or_default();
    json!({
        "ts": ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        "req_id": job.id,
        "task": job.task,
        "provider": job.provider,
        "model": model,
        "latency_ms": (finished - job.created_at).max(0),
        "ok": job.status == JobStatus::Succeeded,
        "status": job.status_code,
        "error": job.error.as_ref().map(|e| e.message.clone()),
        "retries": (job.attempt_count - 1).max(0),
        "usage_prompt": job.usage_prompt,
        "usage_completion": job.usage_completion,
        "queue_ms": job.started_at.map(|s| (s - job.created_at).max(0)),
        "hops": job.hops,
        "instance": job.finished_by,
        "batch_id": job.batch_id,
    })
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
    Line { file: String, text: String },
    Flush(oneshot::Sender<()>),
}

pub struct JsonlWriter {
    tx: mpsc::UnboundedSender<Msg>,
}

impl JsonlWriter {
    /// Starts the writer task (on a blocking thread: file appends are blocking I/O).
    pub fn start(dir: PathBuf, _instance: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("orch-jsonl".into())
            .spawn(move || writer_loop(&dir, rx))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the JSONL writer"));
        Self { tx }
    }

    pub fn write(&self, job: &Job, model: Option<&str>) {
        let Some(finished) = job.finished_at else {
            return;
        };
        let text = line(job, model).to_string();
        let _ = self.tx.send(Msg::Line {
            file: file_name(finished),
            text,
        });
    }

    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn writer_loop(dir: &Path, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut warned = false;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Line { file, text } => {
                if let Err(e) = append(dir, &file, &text)
                    && !warned
                {
                    tracing::error!(error = %e, dir = %dir.display(), "cannot write JSONL metrics");
                    warned = true;
                }
            }
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn append(dir: &Path, file: &str, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))?;
    f.write_all(format!("{text}\n").as_bytes())
}
