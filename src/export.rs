//! `llm-orch metrics export`: rewrites the JSONL request lines from job records, one file
//! per UTC day, with the same builder the live writer uses.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use chrono::{NaiveDate, TimeZone, Utc};

use crate::queue::{QueueStore, StoreError};
use crate::telemetry::jsonl;

/// Writes the lines of jobs finished on `[since, until]` (UTC days, inclusive) into
/// `out`, replacing those days' files. Returns (files, lines) written.
pub async fn export(
    store: &dyn QueueStore,
    since: NaiveDate,
    until: NaiveDate,
    out: &Path,
) -> Result<(usize, usize), ExportError> {
    let from = Utc
        .from_utc_datetime(&since.and_hms_opt(0, 0, 0).unwrap_or_default())
        .timestamp_millis();
    let to = Utc
        .from_utc_datetime(
            &until
                .succ_opt()
                .unwrap_or(until)
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default(),
        )
        .timestamp_millis();
    std::fs::create_dir_all(out).map_err(|e| ExportError::Io(format!("{}: {e}", out.display())))?;
    let mut files: BTreeMap<String, std::fs::File> = BTreeMap::new();
    let mut lines = 0;
    let mut after = None;
    loop {
        let jobs = store.finished_jobs(from, to, after.clone(), 1000).await?;
        let Some(last) = jobs.last() else { break };
        after = Some((last.finished_at.unwrap_or(0), last.id.clone()));
        for job in &jobs {
            let model = jsonl::last_model(store, job).await?;
            let name = jsonl::file_name(job.finished_at.unwrap_or(0));
            let file = match files.entry(name.clone()) {
                std::collections::btree_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let path = out.join(&name);
                    v.insert(
                        std::fs::File::create(&path)
                            .map_err(|e| ExportError::Io(format!("{}: {e}", path.display())))?,
                    )
                }
            };
            writeln!(file, "{}", jsonl::line(job, model.as_deref()).text())
                .map_err(|e| ExportError::Io(e.to_string()))?;
            lines += 1;
        }
    }
    Ok((files.len(), lines))
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot write: {0}")]
    Io(String),
}
