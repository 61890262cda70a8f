//! `BatchStore` for the embedded SQLite store: the same writer and readers as the queue, so a batch's jobs and its row live in one database file.

use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::batches::{
    Batch, BatchEnd, BatchRow, BatchStatus, BatchStore, FileRow, JobCounts, LineError, ListOrder,
    NewFile, StoredFile, errors_json,
};
use super::row::{JobRow, error_json};
use super::sqlite::{SqliteStore, json_each_arg};
use super::{Job, JobError, JobStatus, StoreResult};
use crate::{batch_columns, file_columns, job_columns, list_files_sql};

/// Sets `status` to ?1 and stamps that status's time column with ?2.
macro_rules! set_status {
    () => {
        "status = ?1, \
         in_progress_at = CASE WHEN ?1 = 'in_progress' THEN ?2 ELSE in_progress_at END, \
         finalizing_at = CASE WHEN ?1 = 'finalizing' THEN ?2 ELSE finalizing_at END, \
         completed_at = CASE WHEN ?1 = 'completed' THEN ?2 ELSE completed_at END, \
         failed_at = CASE WHEN ?1 = 'failed' THEN ?2 ELSE failed_at END, \
         expired_at = CASE WHEN ?1 = 'expired' THEN ?2 ELSE expired_at END, \
         cancelling_at = CASE WHEN ?1 = 'cancelling' THEN ?2 ELSE cancelling_at END, \
         cancelled_at = CASE WHEN ?1 = 'cancelled' THEN ?2 ELSE cancelled_at END"
    };
}

fn insert_file(conn: &Connection, f: &NewFile) -> StoreResult<()> {
    let m = &f.meta;
    conn.prepare_cached(
        "INSERT INTO files (id, caller, filename, purpose, bytes, created_at, content) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        m.id,
        m.caller.as_deref().unwrap_or(""),
        m.filename,
        m.purpose,
        m.bytes,
        m.created_at,
        f.content
    ])?;
    Ok(())
}

#[async_trait]
impl BatchStore for SqliteStore {
    async fn insert_file(&self, file: &NewFile) -> StoreResult<()> {
        let file = file.clone();
        self.writer
            .write(move |conn| insert_file(conn, &file))
            .await
    }

    async fn get_file(&self, id: &str) -> StoreResult<Option<StoredFile>> {
        let row: Option<FileRow> = sqlx::query_as(concat!(
            "SELECT ",
            file_columns!(),
            " FROM files WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row.map(StoredFile::from))
    }

    async fn file_content(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT content FROM files WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.readers)
            .await?;
        Ok(row.map(|(c,)| c))
    }

    async fn list_files(
        &self,
        caller: Option<&str>,
        purpose: Option<&str>,
        after: Option<&str>,
        order: ListOrder,
        limit: i64,
    ) -> StoreResult<Vec<StoredFile>> {
        let sql = list_files_sql!(order, "?1", "?2", "?3", "?4");
        let rows: Vec<FileRow> = sqlx::query_as(sql)
            .bind(caller.unwrap_or(""))
            .bind(purpose)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.readers)
            .await?;
        Ok(rows.into_iter().map(StoredFile::from).collect())
    }

    async fn delete_file(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.writer
            .write(move |conn| {
                let done = conn
                    .prepare_cached("DELETE FROM files WHERE id = ?1")?
                    .execute(params![id])?;
                Ok(done == 1)
            })
            .await
    }

    async fn insert_batch(&self, b: &Batch) -> StoreResult<()> {
        let b = b.clone();
        self.writer
            .write(move |conn| {
                conn.prepare_cached(concat!(
                    "INSERT INTO batches (",
                    batch_columns!(),
                    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
                     ?17, ?18, ?19, ?20, ?21, ?22)"
                ))?
                .execute(params![
                    b.id,
                    b.caller.as_deref().unwrap_or(""),
                    b.status.as_str(),
                    b.endpoint,
                    b.input_file_id,
                    b.completion_window,
                    b.metadata,
                    errors_json(&b.errors),
                    b.total,
                    b.completed,
                    b.failed,
                    b.output_file_id,
                    b.error_file_id,
                    b.created_at,
                    b.expires_at,
                    b.in_progress_at,
                    b.finalizing_at,
                    b.completed_at,
                    b.failed_at,
                    b.expired_at,
                    b.cancelling_at,
                    b.cancelled_at,
                ])?;
                Ok(())
            })
            .await
    }

    async fn get_batch(&self, id: &str) -> StoreResult<Option<Batch>> {
        let row: Option<BatchRow> = sqlx::query_as(concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.readers)
        .await?;
        row.map(Batch::try_from).transpose()
    }

    async fn list_batches(
        &self,
        caller: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<Batch>> {
        let rows: Vec<BatchRow> = sqlx::query_as(concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE caller = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
        ))
        .bind(caller.unwrap_or(""))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter().map(Batch::try_from).collect()
    }

    async fn batches_in(&self, statuses: &[BatchStatus], limit: i64) -> StoreResult<Vec<Batch>> {
        let list = json_each_arg(statuses)?;
        let rows: Vec<BatchRow> = sqlx::query_as(concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE status IN (SELECT value FROM json_each(?1)) ORDER BY id LIMIT ?2"
        ))
        .bind(list)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter().map(Batch::try_from).collect()
    }

    async fn transition(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
        at: i64,
    ) -> StoreResult<bool> {
        let from = json_each_arg(from)?;
        let id = id.to_owned();
        self.writer
            .write(move |conn| {
                let done = conn
                    .prepare_cached(concat!(
                        "UPDATE batches SET ",
                        set_status!(),
                        " WHERE id = ?3 AND status IN (SELECT value FROM json_each(?4))"
                    ))?
                    .execute(params![to.as_str(), at, id, from])?;
                Ok(done == 1)
            })
            .await
    }

    async fn fail_validation(&self, id: &str, errors: &[LineError], at: i64) -> StoreResult<bool> {
        let (id, errors) = (id.to_owned(), errors_json(errors));
        self.writer
            .write(move |conn| {
                let done = conn
                    .prepare_cached(
                        "UPDATE batches SET status = 'failed', failed_at = ?1, errors = ?2 \
                         WHERE id = ?3 AND status = 'validating'",
                    )?
                    .execute(params![at, errors, id])?;
                Ok(done == 1)
            })
            .await
    }

    async fn end_batch(&self, id: &str, end: &BatchEnd) -> StoreResult<bool> {
        let (id, end) = (id.to_owned(), end.clone());
        self.writer
            .write(move |conn| {
                let done = conn
                    .prepare_cached(concat!(
                        "UPDATE batches SET ",
                        set_status!(),
                        ", completed = ?3, failed = ?4, output_file_id = ?5, error_file_id = ?6 \
                         WHERE id = ?7 AND status = ?8"
                    ))?
                    .execute(params![
                        end.to.as_str(),
                        end.at,
                        end.completed,
                        end.failed,
                        end.output.as_ref().map(|f| &f.meta.id),
                        end.error.as_ref().map(|f| &f.meta.id),
                        id,
                        end.from.as_str()
                    ])?;
                if done != 1 {
                    // Someone else ended it (or it moved on): write nothing.
                    return Ok(false);
                }
                for f in end.output.iter().chain(end.error.iter()) {
                    insert_file(conn, f)?;
                }
                Ok(true)
            })
            .await
    }

    async fn job_counts(&self, batch_id: &str) -> StoreResult<JobCounts> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs WHERE batch_id = ?1 GROUP BY status")
                .bind(batch_id)
                .fetch_all(&self.readers)
                .await?;
        let mut counts = JobCounts::default();
        for (status, n) in rows {
            counts.add(&status, n);
        }
        Ok(counts)
    }

    async fn batch_jobs(&self, batch_id: &str) -> StoreResult<Vec<Job>> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE batch_id = ?1 ORDER BY id"
        ))
        .bind(batch_id)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn cancel_batch_jobs(
        &self,
        batch_id: &str,
        error: &JobError,
        running: bool,
        at: i64,
    ) -> StoreResult<Vec<Job>> {
        let (batch_id, status, error) = (
            batch_id.to_owned(),
            i64::from(error.status),
            error_json(error),
        );
        self.writer
            .write(move |conn| {
                let jobs = conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        job_columns!(),
                        " FROM jobs WHERE batch_id = ?1 AND (status = 'queued' OR (?2 AND status = 'running'))"
                    ))?
                    .query_map(params![batch_id, running], JobRow::from_sqlite)?
                    .map(|row| Job::try_from(row?))
                    .collect::<StoreResult<Vec<Job>>>()?;
                for job in &jobs {
                    conn.prepare_cached(
                        "UPDATE jobs SET status = 'cancelled', finished_at = ?1, status_code = ?2, error = ?3, \
                         lease_owner = NULL, lease_expires_at = NULL WHERE id = ?4",
                    )?
                    .execute(params![at, status, error, job.id])?;
                    if job.status == JobStatus::Running {
                        conn.prepare_cached(
                            "UPDATE attempts SET outcome = 'cancelled', finished_at = ?1 \
                             WHERE job_id = ?2 AND outcome = 'running'",
                        )?
                        .execute(params![at, job.id])?;
                    }
                }
                Ok(jobs)
            })
            .await
    }
}
